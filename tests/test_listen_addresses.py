"""What a run opens listens on the node's address (loopback in local runs), never on every
interface: the c10d rendezvous store of Ray Train workers and of ``run_local``, gloo, the
metrics servers. Checked on the real sockets (/proc/net/tcp*) of the processes concerned."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import base_config, shards  # noqa: E402

from avmoe.train import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listening_sockets(pid: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                hex_addr, hex_port = cols[1].split(":")
                raw = bytes.fromhex(hex_addr)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return out


def wildcard(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_unspecified


def test_local_process_group_store_listens_on_loopback_only():
    code = ("import json, os, sys; sys.path.insert(0, 'tests');"
            "from test_listen_addresses import listening_sockets;"
            "from avmoe.train.session import init_local_process_group;"
            "import torch, torch.distributed as dist;"
            "init_local_process_group(); t = torch.ones(1); dist.all_reduce(t);"
            "print(json.dumps({'sockets': listening_sockets(), 'port': int(os.environ['MASTER_PORT'])}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    socks = [tuple(s) for s in got["sockets"]]
    assert ("127.0.0.1", got["port"]) in socks  # the store
    assert not [s for s in socks if wildcard(s[0])], socks


class RecordsSockets(Trainer):
    """Writes the listening sockets of its own worker process after the first step."""

    def after_step(self) -> None:
        if self.state.step == 1:
            rec = {"rank": self.rank, "sockets": listening_sockets(),
                   "master": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])]}
            path = os.path.join(os.environ["AVMOE_TEST_SOCKETS_DIR"], f"rank{self.rank}.json")
            with open(path, "w") as f:
                json.dump(rec, f)


def test_ray_train_workers_listen_on_the_node_address_only(tmp_path_factory, tmp_path, ray_local,
                                                           monkeypatch):
    from avmoe.train.driver import fit, prepare

    data = shards(tmp_path_factory, "ave")
    out = tmp_path / "sockets"
    out.mkdir()
    cfg = base_config("ave", data, str(tmp_path / "runs"), "sockets", limit_train_batches=1,
                      limit_eval_batches=1, test=False)
    import avmoe.train.driver as driver

    real_env = driver.worker_env  # the workers learn where to write through their runtime env
    monkeypatch.setattr(driver, "worker_env",
                        lambda tcfg: {**real_env(tcfg), "AVMOE_TEST_SOCKETS_DIR": str(out)})
    fit(prepare(cfg), prepared=True, trainer_cls=RecordsSockets)
    recs = {r["rank"]: r for r in (json.loads(p.read_text()) for p in out.glob("rank*.json"))}
    assert sorted(recs) == [0, 1]
    master = tuple(recs[0]["master"])
    assert master[0] == "127.0.0.1" and tuple(recs[1]["master"]) == master
    assert master in [tuple(s) for s in recs[0]["sockets"]], "rank 0 does not host the store"
    for r in recs.values():
        socks = [tuple(s) for s in r["sockets"]]
        assert socks, "no listening socket seen (gloo and Ray's core worker listen)"
        assert not [s for s in socks if wildcard(s[0])], (r["rank"], socks)
