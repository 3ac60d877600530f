"""A multi-node Ray cluster on one machine, and what a cloud does to it: node loss, spot drain,
ingest-node loss, a cluster that comes back smaller. Used by ``tests/test_multinode.py`` and
runnable on its own to measure (the closing figures of issue 15):

    scripts/loopback .venv/bin/python tests/multinode.py --out /tmp/mn.json [--scenarios ref,chaos,elastic]

Topology (``ray.cluster_utils.Cluster``: one raylet per node, each with its own resources, all on
127.0.0.1), as ``cluster/aws.yaml`` lays a cloud cluster out:

* head: ``{"CPU": 0}`` -- no training and no decode work lands there;
* two CPU-only ingest nodes: ``{"CPU": 1, "ingest": 1}`` -- decode tasks ask for ``ingest=1``;
* two trainer nodes: ``{"CPU": 1, "trainer": 1}`` -- training workers ask for ``trainer=1``.

Shards and checkpoints live on an S3-compatible server (moto, 127.0.0.1): no node's disk holds
anything a run needs. Each rank records, per optimiser step, the sample keys it trained on and
the node it ran on (``StepLog``; a local directory: the harness is one machine) -- the
scenarios' evidence besides the checkpoints themselves.

Scenarios (each a fit of the tiny AVE preset, 16 training samples, batch 1 per rank, 8 steps):

* ``ref``: uninterrupted; placement checked from Ray's own records (the state API's task and
  actor tables: node ids of every ``decode_task`` and every training worker).
* ``chaos``: the same run, while (1) a trainer node is *drained* (``drain_node``, reason
  preemption, as the autoscaler or ``ray drain-node`` does on a spot notice) -- the ranks
  checkpoint at the next step boundary and leave; the harness then removes that node and adds a
  replacement; (2) an ingest node is killed mid-epoch; (3) the other original trainer node is
  killed without notice, and a replacement added. Must end bit-identical to ``ref`` with the
  same keys at every step.
* ``elastic``: ``min_workers=1``: a trainer node is killed and *not* replaced; Ray Train re-forms
  the group with one worker, which gets the rest of the epoch re-dealt: every sample of the epoch
  exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avmoe.ray_env import apply_loopback_env  # noqa: E402

apply_loopback_env()
# Ray Train's PreemptionWatcher polls the GCS for draining nodes every 5 s by default; the
# scenarios' steps are ~1 s, so poll faster (an env var of every Ray process of this cluster)
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
# an elastic group that asked for 2 workers and found 1 trainer node gives up waiting for the
# second after this long (Ray's default: 60 s) and starts with what fits
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")

from avmoe.train import Trainer  # noqa: E402

STEP_SECONDS = float(os.environ.get("AVMOE_MN_STEP_SECONDS", "1.0"))  # slows steps so chaos lands mid-epoch
# run -> the last step the harness acts at: later steps (and the reference run) are not slowed
SLOW_UNTIL = {"chaos": 7, "elastic": 3}


class StepLog(Trainer):
    """A Trainer that records, per optimiser step and rank, the keys it trained on, its node and
    the time, into ``$AVMOE_MN_LOG/<run>/`` (one JSON line per step), and sleeps
    ``AVMOE_MN_STEP_SECONDS`` after each step up to the last one the harness acts at
    (``SLOW_UNTIL``). Sleeping changes no weight."""

    def train_step(self, it):
        keys: list[str] = []

        class Tap:
            def __next__(self_inner):
                b = next(it)
                keys.extend(b.keys)
                return b

        loss = super().train_step(Tap())
        import ray

        node = ray.get_runtime_context().get_node_id()
        d = Path(os.environ["AVMOE_MN_LOG"]) / self.run_name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank-{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.state.step, "epoch": self.state.epoch, "rank": self.rank,
                                "world": self.world, "keys": keys, "node": node, "time": time.time(),
                                "pid": os.getpid()}) + "\n")
        if self.state.step <= SLOW_UNTIL.get(self.run_name, 0):
            time.sleep(STEP_SECONDS)
        return loss


def read_steps(log_dir: Path, run: str) -> list[dict]:
    rows = []
    for p in sorted((log_dir / run).glob("rank-*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["time"])


# ----------------------------------------------------------------------------- infrastructure
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """The suite's S3 (AWS_ENDPOINT_URL set) or a moto server of our own on 127.0.0.1."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_shards(work: Path, bucket: str, n: int = 16, frame_size: int = 32) -> str:
    """Synthetic AVE shards (n train, n/4 val and test) packed locally once, uploaded to S3."""
    import boto3
    import fsspec

    from data_pipeline.demo import prepare_demo_shards

    local = prepare_demo_shards("ave", root=str(work / f"shards-{n}-{frame_size}"), n=n, frame_size=frame_size,
                                workers=1, log=lambda *_: None)
    s3 = boto3.client("s3")
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    fs = fsspec.filesystem("s3")
    url = f"s3://{bucket}/mn/ave-{n}-{frame_size}/shards"
    for p in sorted(Path(local).iterdir()):
        fs.put_file(str(p), f"{url}/{p.name}")
    return url


class LocalCluster:
    """Head (no work), two ingest nodes, two trainer nodes: separate raylets on 127.0.0.1."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.dashboard_port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.dashboard_port}"
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
            "object_store_memory": 150 * 2**20})
        self.ingest = [self.add("ingest") for _ in range(2)]
        self.trainer = [self.add("trainer") for _ in range(2)]

    def add(self, kind: str):
        return self.cluster.add_node(num_cpus=1, resources={kind: 1}, node_ip_address="127.0.0.1",
                                     object_store_memory=150 * 2**20)

    @staticmethod
    def node_id(node) -> str:
        return node.node_id

    def remove(self, node, graceful: bool = False) -> None:
        self.cluster.remove_node(node, allow_graceful=graceful)
        for group in (self.ingest, self.trainer):
            if node in group:
                group.remove(node)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def node_kinds() -> dict[str, str]:
    """node id -> 'head' | 'ingest' | 'trainer' (from the GCS node table: Ray's resources)."""
    import ray

    out = {}
    for n in ray.nodes():
        res = n.get("Resources", {})
        out[n["NodeID"]] = "ingest" if "ingest" in res else "trainer" if "trainer" in res else "head"
    return out


def placement_records(job_start: float) -> dict:
    """From the state API (Ray's task-event and actor tables): the node of every decode task and
    every Ray Train worker actor seen so far."""
    from ray.util.state import list_actors, list_tasks

    tasks = list_tasks(filters=[("name", "=", "MapBatches(decode_task)")], detail=True, limit=10000,
                       raise_on_missing_output=False)

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000,
                         raise_on_missing_output=False)
    return {"decode_tasks": [{"node": t.node_id, "state": t.state, "attempt": t.attempt_number,
                              "started": (t.start_time_ms or 0) / 1000} for t in tasks if t.node_id],
            "train_workers": [{"node": a.node_id, "state": a.state} for a in actors if a.node_id]}


def config(data: str, storage: str, name: str, **kw):
    from avmoe.train import TrainConfig

    cfg = TrainConfig.of(task="ave", data=data, storage=storage, name=name, workers=2, cpus_per_worker=1,
                         worker_resources={"trainer": 1}, decode_resources={"ingest": 1}, decode_cpus=0.5,
                         epochs=1, batch_size=1, grad_accum=1, lr=1e-3, scheduler="none", plots=False,
                         metrics_address="127.0.0.1", metrics_port=0, shuffle_buffer=2, checkpoint_every=1,
                         keep_checkpoints=2, max_failures=3, test=False)
    return cfg.apply(kw)


# ----------------------------------------------------------------------------- scenarios
class Harness:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.log_dir = work / "steps"
        os.environ["AVMOE_MN_LOG"] = str(self.log_dir)
        self.report: dict = {"events": []}

    def event(self, what: str, **kw) -> None:
        e = {"what": what, "time": time.time(), **kw}
        self.report["events"].append(e)
        print(f"[multinode] {time.strftime('%H:%M:%S')} {what} {kw if kw else ''}", flush=True)

    def steps(self, run: str) -> list[dict]:
        return read_steps(self.log_dir, run)

    def wait_step(self, run: str, step: int, timeout: float = 240, after: float = 0.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = [r for r in self.steps(run) if r["step"] >= step and r["time"] > after]
            if rows:
                return rows[0]
            time.sleep(0.1)
        raise TimeoutError(f"{run}: step {step} not reached in {timeout} s")

    def fit_in_thread(self, cfg):
        from avmoe.train import fit, prepare

        out: dict = {}

        def run():
            try:
                out["result"] = fit(prepare(cfg), prepared=True, trainer_cls=StepLog)
            except BaseException as e:  # reported to the caller
                out["error"] = repr(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, out


def checkpoints(storage: str, run: str) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3")
    base = storage.removeprefix("s3://") + "/" + run
    with contextlib.suppress(FileNotFoundError):
        fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base) if p.rsplit("/", 1)[-1].startswith("epoch-"))
    return []


def trainable_weights(storage: str, run: str):
    """The final trainable weights of a run: its latest checkpoint, read from S3."""
    import fsspec

    from avmoe.train import checkpoint as ckpt_io

    name = checkpoints(storage, run)[-1]
    fs = fsspec.filesystem("s3")
    d = tempfile.mkdtemp(prefix="mn-ckpt-")
    fs.get(storage.removeprefix("s3://") + f"/{run}/{name}/", d + "/", recursive=True)
    try:
        return name, ckpt_io.trainable_state(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def scenario_ref(h: Harness, lc: LocalCluster, data: str, storage: str) -> dict:
    t0 = time.time()
    t, out = h.fit_in_thread(config(data, storage, "ref", checkpoint_every=None))
    t.join()
    if "error" in out:
        raise RuntimeError(f"ref run failed: {out['error']}")
    rec = placement_records(t0)
    return {"seconds": time.time() - t0, "placement": rec, "kinds": node_kinds(),
            "final_step": out["result"]["history"][-1]["step"], "history": out["result"]["history"]}


def scenario_chaos(h: Harness, lc: LocalCluster, data: str, storage: str) -> dict:
    """Drain a trainer node (spot notice) at step 2, kill an ingest node at step 4, kill the
    other original trainer node at step 6; replacements are added for the trainer nodes."""
    from ray._private.state import state  # noqa: F401  (initialised by ray.init)
    import ray

    res: dict = {}
    t0 = time.time()
    t, out = h.fit_in_thread(config(data, storage, "chaos", checkpoint_every=None))
    # 1. spot drain of the trainer node that hosts rank 1
    row = h.wait_step("chaos", 2)
    rank1 = [r for r in h.steps("chaos") if r["rank"] == 1][-1]
    victim = next(n for n in lc.trainer if lc.node_id(n) == rank1["node"])
    done_before = max(r["step"] for r in h.steps("chaos"))
    t_drain = time.time()
    h.event("drain trainer node", node=lc.node_id(victim)[:12], steps_done=done_before)
    gcs = ray._raylet.GcsClient(address=lc.cluster.address)
    from ray.core.generated import autoscaler_pb2

    accepted, why = gcs.drain_node(lc.node_id(victim), autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), "spot preemption notice (test)", int((time.time() + 60) * 1000))
    if not accepted:
        raise RuntimeError(f"drain rejected: {why}")
    deadline = time.time() + 120
    while not (pre := _mid_epoch_ckpt(storage, "chaos")):  # (no periodic checkpoints in this run)
        if time.time() > deadline:
            raise TimeoutError("no preemption checkpoint within 120 s of the drain")
        time.sleep(0.2)
    res["drain"] = {"steps_done_at_notice": done_before, "checkpoint": pre,
                    "checkpoint_step": int(pre.rsplit("-", 1)[-1]),
                    "seconds_notice_to_checkpoint": time.time() - t_drain}
    h.event("preemption checkpoint", name=pre)
    # the cloud reclaims the node at the deadline; here as soon as the worker on it has left
    # (the checkpoint committed: removing the node while the report is in flight loses it)
    deadline = t_drain + 60
    while _alive(rank1["pid"]) and time.time() < deadline:
        time.sleep(0.2)
    res["drain"]["seconds_notice_to_worker_exit"] = time.time() - t_drain
    lc.remove(victim)
    lc.trainer.append(lc.add("trainer"))
    h.event("replaced drained node")
    row = h.wait_step("chaos", res["drain"]["checkpoint_step"] + 1, after=t_drain)
    res["drain"]["seconds_to_first_step_after"] = row["time"] - t_drain
    # 2. an ingest node dies mid-epoch
    row = h.wait_step("chaos", res["drain"]["checkpoint_step"] + 1, after=t_drain)
    t_ingest = time.time()
    res["ingest_loss"] = {"node": lc.node_id(lc.ingest[0]), "time": t_ingest}
    h.event("kill ingest node", node=lc.node_id(lc.ingest[0])[:12])
    lc.remove(lc.ingest[0])
    # 3. the other original trainer node dies without notice
    row = h.wait_step("chaos", 7, after=t_ingest)
    original = [n for n in lc.trainer if lc.node_id(n) != lc.node_id(lc.trainer[-1])]
    killed = original[0]
    t_loss = time.time()
    h.event("kill trainer node", node=lc.node_id(killed)[:12])
    lc.remove(killed)
    lc.trainer.append(lc.add("trainer"))
    h.event("replaced lost node")
    last_ckpt_step = max(r["step"] for r in h.steps("chaos") if r["time"] < t_loss)
    row = h.wait_step("chaos", last_ckpt_step + 1, after=t_loss + 1.0)
    res["trainer_loss"] = {"seconds_to_first_step_after": row["time"] - t_loss}
    t.join()
    if "error" in out:
        raise RuntimeError(f"chaos run failed: {out['error']}")
    res["seconds"] = time.time() - t0
    res["final_step"] = out["result"]["history"][-1]["step"]
    res["history"] = out["result"]["history"]
    res["trainer_loss"].update(time=t_loss, node=lc.node_id(killed))
    res["placement"] = placement_records(t0)
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _mid_epoch_ckpt(storage: str, run: str) -> str | None:
    """The first mid-epoch checkpoint of a run written without periodic checkpoints: the one a
    preemption notice made."""
    names = [n for n in checkpoints(storage, run) if not n.startswith("epoch-0001")]
    return names[0] if names else None


def scenario_elastic(h: Harness, lc: LocalCluster, data: str, storage: str) -> dict:
    """min_workers=1: a trainer node dies at step 3 and is not replaced."""
    t0 = time.time()
    t, out = h.fit_in_thread(config(data, storage, "elastic", min_workers=1))
    h.wait_step("elastic", 3)
    rank1 = [r for r in h.steps("elastic") if r["rank"] == 1][-1]
    victim = next(n for n in lc.trainer if lc.node_id(n) == rank1["node"])
    t_loss = time.time()
    h.event("kill trainer node (no replacement)", node=lc.node_id(victim)[:12])
    lc.remove(victim)
    t.join()
    if "error" in out:
        raise RuntimeError(f"elastic run failed: {out['error']}")
    after = [r for r in h.steps("elastic") if r["time"] > t_loss]
    return {"seconds": time.time() - t0, "world_after": sorted({r["world"] for r in after}),
            "seconds_to_first_step_after": (after[0]["time"] - t_loss) if after else None,
            "final_step": out["result"]["history"][-1]["step"]}


def scenario_datawait(h: Harness, lc: LocalCluster, data: str, storage: str) -> dict:
    """Data-wait of a real run (no sleeps) with 1 and with 2 decode CPUs on the one ingest node,
    on 224x224 frames; the capacity planner's prediction from this machine's calibrated decode
    rate and the run's own compute time per step, beside it (issue 15's planner check)."""
    from avmoe.train import fit, prepare

    from data_pipeline.capacity import measure_decode_rate, predict_data_wait

    # AVMOE_MN_FRAME_SIZE: larger frames make decoding the bottleneck of the tiny model's steps
    big = s3_shards(h.work, "avmoe-test", n=64, frame_size=int(os.environ.get("AVMOE_MN_FRAME_SIZE", "224")))
    cal = measure_decode_rate(big, "train", max_samples=32, seconds=4.0)  # this machine, same shards
    h.event("calibrated", samples_per_core_s=round(cal["samples_per_core_s"], 1))
    for node in list(lc.ingest):
        lc.remove(node)
    out: dict = {"calibration": cal}
    for cpus in (1, 2):
        node = lc.cluster.add_node(num_cpus=cpus, resources={"ingest": cpus}, node_ip_address="127.0.0.1",
                                   object_store_memory=300 * 2**20)
        name = f"datawait-{cpus}"
        cfg = config(big, storage, name, checkpoint_every=None, batch_size=4, shuffle_buffer=16, decode_cpus=1, epochs=3,
                     prefetch_batches=2, limit_eval_batches=1)
        r = fit(prepare(cfg), prepared=True)
        timing = r["timing"]
        out[name] = {"decode_cpus": cpus, "data_wait_ratio": timing.get("data_wait_ratio"),
                     "median_step_s": timing.get("median_step_s"), "steps": timing.get("steps_timed"),
                     "compute_step_s": timing.get("median_compute_s"), "global_batch": 8}
        if out[name]["compute_step_s"]:
            args = (cal["samples_per_core_s"], cpus, out[name]["compute_step_s"], 4, 2)
            out[name]["predicted_data_wait_ratio"] = predict_data_wait(*args)
            # with the pipeline's fill at every epoch start (3 epochs of 8 steps)
            out[name]["predicted_with_fill"] = predict_data_wait(*args, steps=8)
        h.event("datawait run", **out[name])
        lc.cluster.remove_node(node)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="report JSON")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--scenarios", default="ref,chaos,elastic")
    ap.add_argument("--bucket", default="avmoe-test")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="avmoe-mn-"))
    work.mkdir(parents=True, exist_ok=True)
    h = Harness(work)
    with s3_server():
        data = s3_shards(work, args.bucket)
        storage = f"s3://{args.bucket}/mn/runs-{int(time.time())}"
        h.report.update(data=data, storage=storage, log_dir=str(h.log_dir))
        lc = LocalCluster()
        try:
            import ray

            from avmoe.console import job_runtime_env

            env = job_runtime_env()
            env["env_vars"]["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"]
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
                env["env_vars"][k] = os.environ[k]
            ray.init(address=lc.cluster.address, runtime_env=env)
            h.report["nodes"] = {"head": lc.node_id(lc.cluster.head_node),
                                 "ingest": [lc.node_id(n) for n in lc.ingest],
                                 "trainer": [lc.node_id(n) for n in lc.trainer]}
            for name in args.scenarios.split(","):
                h.event(f"scenario {name}")
                fn = {"ref": scenario_ref, "chaos": scenario_chaos, "elastic": scenario_elastic,
                      "datawait": scenario_datawait}[name]
                h.report[name] = fn(h, lc, data, storage)
                h.report[name]["steps"] = h.steps(name)
                Path(args.out).write_text(json.dumps(h.report, indent=1, default=str))
            if "chaos" in h.report and "ref" in h.report:
                import torch

                a, wa = trainable_weights(storage, "ref")
                b, wb = trainable_weights(storage, "chaos")
                h.report["chaos"]["bit_identical_to_ref"] = (set(wa) == set(wb) and all(
                    torch.equal(wa[k], wb[k]) for k in wa))
                h.report["chaos"]["final_checkpoints"] = [a, b]
        finally:
            Path(args.out).write_text(json.dumps(h.report, indent=1, default=str))
            lc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
