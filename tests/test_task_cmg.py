"""CMG: the official evaluation loops (re-implemented from haihuangcode/CMG code/src/ave.py and
avvp.py, in torch as the code computes them) against ``avmoe.metrics.cmg_*``; the codebook's
MM-EMA update, reset and straight-through estimator by hand; the protocols' labels; and the task on
Ray Train: pre-training on 2 workers keeps one codebook on every rank, resumes and survives a
worker loss bit-identically (codebook, EMA statistics, CLUB networks and their optimiser), and the
downstream protocols run from the job script on a pre-trained run."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import base_config, latest_checkpoint, shards  # noqa: E402

from avmoe.metrics import cmg_ave_accuracy, cmg_avvp_scores, cmg_micro_scores  # noqa: E402
from avmoe.models.cmg import CrossCodebook, CrossCPC, CLUBSample, cmcm_loss, mm_ema_stats  # noqa: E402
from avmoe.tasks import get_task  # noqa: E402
from avmoe.tasks.cmg import segment_targets  # noqa: E402
from avmoe.train import Trainer  # noqa: E402
from avmoe.train.checkpoint import TAG  # noqa: E402
from avmoe.train.engine import safe_load  # noqa: E402

# --------------------------------------------------------------------------- official loops


class AverageMeter:  # the code's utils.AverageMeter
    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n

    @property
    def avg(self):
        return self.sum / self.count


def official_ave(logits: torch.Tensor, labels: torch.Tensor, batch_size: int = 80) -> float:
    """ave.py validate_epoch: labels (N, 10, 29) one-hot, background last; x100."""
    meter = AverageMeter()
    for i in range(0, len(labels), batch_size):
        lab, out = labels[i:i + batch_size].double(), logits[i:i + batch_size]
        b = lab.shape[0]
        labels_foreground = lab[:, :, :-1]
        _, labels_event = labels_foreground.max(-1)
        labels_event, _ = labels_event.max(-1)
        _, pred = out.max(-1)
        acc = torch.sum(pred == labels_event).double() * (100.0 / b)
        meter.update(acc.item(), b * 10)
    return meter.avg


def official_avvp(logits: torch.Tensor, labels: torch.Tensor, batch_size: int = 80) -> tuple[float, float, float]:
    """avvp.py validate_epoch + compute_accuracy_supervised_sigmoid: logits (N, 10, C) double."""
    p_meter, r_meter = AverageMeter(), AverageMeter()
    for i in range(0, len(labels), batch_size):
        b = labels[i:i + batch_size].shape[0]
        lab = labels[i:i + batch_size].double().reshape(b * 10, -1).to(torch.float32)
        pred = (torch.sigmoid(logits[i:i + batch_size].reshape(b * 10, -1)) > 0.5).float()
        if pred.sum() == 0:
            precision, recall = torch.zeros(1), torch.zeros(1)
        else:
            tp = (pred * lab).sum()
            precision, recall = tp / pred.sum(), tp / lab.sum()
        p_meter.update(precision.item(), b * 10)
        r_meter.update(recall.item(), b * 10)
    p, r = p_meter.avg, r_meter.avg
    return p, r, 2.0 * p * r / (p + r)


@pytest.mark.parametrize("seed", range(6))
def test_cmg_metrics_equal_the_official_loops(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(81, 250, (1,), generator=g))  # several batches of 80, a partial last one
    # AVE: one class per video over a random span, background elsewhere (class 0 included)
    cls = torch.randint(0, 28, (n,), generator=g)
    start = torch.randint(0, 10, (n,), generator=g)
    seg = torch.full((n, 10), 28)
    for i in range(n):
        seg[i, start[i]:] = cls[i]
    labels = torch.nn.functional.one_hot(seg, 29).float()
    scores = torch.randn(n, 28, generator=g)
    scores[: n // 2, :].scatter_(1, cls[: n // 2, None], 5.0)  # half of them right
    assert abs(cmg_ave_accuracy(scores, labels) * 100 - official_ave(scores, labels)) < 1e-9
    assert abs(cmg_ave_accuracy(scores, labels, batch_size=None) - float((scores.argmax(1) == cls).double().mean())) < 1e-12

    # AVVP: multi-label segments with a background column; one batch with no positive prediction
    c = 26
    y = (torch.rand(n, 10, c, generator=g) < 0.15).float()
    y[..., -1] = (y[..., :-1].sum(-1) == 0).float()
    logits = torch.randn(n, 10, c, generator=g, dtype=torch.float64) * 2 - 1.5
    logits[:min(n, 80)] = -10.0 if seed % 2 else logits[:min(n, 80)]
    probs = torch.sigmoid(logits)
    ours = cmg_avvp_scores(probs, y)
    p, r, f1 = official_avvp(logits, y)
    assert abs(ours["precision"] - p) < 1e-9 and abs(ours["recall"] - r) < 1e-9 and abs(ours["f1"] - f1) < 1e-9
    # the plain alternative: one micro P / R over the whole set
    micro = cmg_micro_scores(probs, y)
    pred = (probs > 0.5).double()
    tp = float((pred * y).sum())
    assert micro["precision"] == pytest.approx(tp / max(1.0, float(pred.sum())), abs=1e-12)
    assert micro["recall"] == pytest.approx(tp / float(y.sum()), abs=1e-12)


def test_cmg_avvp_quirks_by_hand():
    """A batch with no positive prediction counts P = R = 0 with its full weight; F1 comes from
    the averaged P and R; batches weigh by their video count."""
    y = np.zeros((3, 10, 2), np.float32)
    y[:, :, 1] = 1
    probs = np.zeros_like(y)
    probs[2, :, 1] = 0.9  # only the last video predicts (all right)
    s = cmg_avvp_scores(probs, y, batch_size=2)  # batches: videos 0-1 (nothing predicted), video 2
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3)
    assert cmg_micro_scores(probs, y)["precision"] == 1.0
    with pytest.raises(ValueError, match="binary"):
        cmg_avvp_scores(probs, y + 0.5)


# --------------------------------------------------------------------------- codebook and losses


def test_mm_ema_update_and_statistics_sum_over_ranks():
    torch.manual_seed(0)
    cb = CrossCodebook(6, 4)
    z_a, z_v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    i_a, i_v = cb.nearest(z_a), cb.nearest(z_v)
    stats = mm_ema_stats(cb, z_a, z_v, i_a, i_v, "code")
    # the all-reduce argument: two ranks' statistics add up to the whole batch's
    halves = [mm_ema_stats(cb, z_a[k:k + 1], z_v[k:k + 1], i_a[k:k + 1], i_v[k:k + 1], "code") for k in (0, 1)]
    for key in stats:
        assert torch.allclose(stats[key], halves[0][key] + halves[1][key], atol=1e-6)
    # the code's two sequential steps, by hand
    count, weight = cb.ema_count.clone(), cb.ema_weight.clone()
    d, eps, m = 0.99, 1e-5, 6
    for mod, own, other, idx in (("a", z_a, z_v, i_a), ("v", z_v, z_a, i_v)):
        onehot = torch.nn.functional.one_hot(idx.reshape(-1), m).float()
        count = d * count + (1 - d) * onehot.sum(0)
        n = count.sum()
        count = (count + eps) / (n + m * eps) * n
        weight = d * weight + 0.5 * (1 - d) * onehot.t() @ own.reshape(-1, 4) + 0.5 * (1 - d) * onehot.t() @ other.reshape(-1, 4)
    cb.ema_update(stats, d, eps, "code")
    assert torch.allclose(cb.ema_count, count, atol=1e-6) and torch.allclose(cb.ema_weight, weight, atol=1e-6)
    assert torch.allclose(cb.embedding, weight / count[:, None], rtol=1e-5)


def test_code_reset_replaces_only_long_idle_codes():
    torch.manual_seed(1)
    cb = CrossCodebook(5, 3)
    before = cb.embedding.clone()
    cb.unused.copy_(torch.tensor([300, 5, 200, 299, 50]))
    used = torch.tensor([False, True, False, False, False])
    g = torch.Generator().manual_seed(0)
    n = cb.reset_idle(used, after=300, pool_within=100, noise=1 / 1024, generator=g)
    # +1: code 0 reaches 301 > 300 (reset, counter 0); code 3 reaches 300 (kept); pool: codes 1 (used, 0) and 4 (51)
    assert n == 1 and int(cb.resets_total) == 1
    assert cb.unused.tolist() == [0, 0, 201, 300, 51]
    assert torch.equal(cb.embedding[1:], before[1:])
    diffs = [(cb.embedding[0] - before[k]).abs().max() for k in (1, 4)]
    assert min(diffs) <= 1 / 1024 + 1e-7  # a pool code plus U(-1/1024, 1/1024)


def test_straight_through_cmcm_cpc_and_club():
    torch.manual_seed(2)
    cb = CrossCodebook(8, 4)
    z = torch.randn(2, 5, 4, requires_grad=True)
    idx, e, q = cb.quantize(z)
    assert torch.allclose(q.detach(), e, atol=1e-6) and torch.equal(idx, cb.nearest(z))  # value: the code
    q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the gradient passes straight through
    # L_cmcm: identical soft histograms for every clip -> log B (the diagonal is one of B equal terms)
    same = torch.zeros(4, 5, 4)
    assert cmcm_loss(same, same, cb.embedding).item() == pytest.approx(math.log(4), abs=1e-4)
    # Cross-CPC needs more segments than prediction steps + min start
    with pytest.raises(ValueError, match="segments"):
        CrossCPC(4, 4, 1)(torch.randn(2, 2, 4), torch.randn(2, 2, 4))
    nce, accs = CrossCPC(4, 4, 2)(torch.randn(3, 10, 4), torch.randn(3, 10, 4))
    assert nce.item() > 0 and set(accs) == {"a2v", "v2a", "v2v", "a2a"}
    # CLUB's variational net learns q(y|x) by maximum likelihood
    club = CLUBSample(4, 3, 16)
    x = torch.randn(16, 5, 4)
    y = x[..., :3] * 2
    opt = torch.optim.Adam(club.parameters(), lr=1e-2)
    first = club.loglikeli(x, y).item()
    for _ in range(200):
        opt.zero_grad()
        (-club.loglikeli(x, y)).backward()
        opt.step()
    assert club.loglikeli(x, y).item() > first + 1.0
    assert club.mi_est(x, y, torch.randperm(16)).item() > 0  # y depends on x: a positive bound


def test_protocol_labels():
    cfg = get_task("cmg-downstream").config("tiny", protocol="ave", num_classes=28)
    seg = torch.tensor([[28, 2, 2, 28], [0, 0, 28, 28]])
    batch = type("B", (), {"targets": {"segment_labels": seg}})()
    y, w = segment_targets(cfg, batch, "audio")
    assert y.shape == (2, 4, 29) and y[0, 0, 28] == 1 and y[0, 1, 2] == 1 and w.tolist() == [1, 1]
    # AVE -> AVVP: "Bark" (AVE 2) is LLP's "Dog" (shared index 1); AVE's "Church bell" (0) has no LLP class
    from data_pipeline.datasets.ave import CATEGORIES

    keys = get_task("cmg-downstream").model_keys({"dataset": "ave", "segments": 4,
                                                  "label_vocab": {"classes": CATEGORIES}})
    cfg = get_task("cmg-downstream").config("tiny", protocol="ave_avvp", **keys)
    y, w = segment_targets(cfg, batch, "visual")
    assert y.shape == (2, 4, 13) and y[0, 1, 1] == 1 and y[0, 0, 12] == 1 and w.tolist() == [1, 0]
    # LLP: each modality's own segment annotations (C, T) -> (T, C + 1) with background
    gt_a = torch.zeros(1, 25, 4, dtype=torch.uint8)
    gt_a[0, 3, 1:3] = 1  # Dog
    batch = type("B", (), {"targets": {"gt_audio": gt_a, "gt_visual": torch.zeros_like(gt_a)}})()
    cfg = get_task("cmg-downstream").config("tiny", protocol="avvp", num_classes=25)
    y, _ = segment_targets(cfg, batch, "audio")
    assert y[0, :, 3].tolist() == [0, 1, 1, 0] and y[0, :, 25].tolist() == [1, 0, 0, 1]
    assert segment_targets(cfg, batch, "visual")[0][0, :, 25].tolist() == [1, 1, 1, 1]
    cfg = get_task("cmg-downstream").config("tiny", protocol="ave_avvp")
    y, _ = segment_targets(cfg, batch, "audio")
    assert y.shape == (1, 4, 13) and y[0, :, 1].tolist() == [0, 1, 1, 0]


# --------------------------------------------------------------------------- on Ray Train


class CodebookWatch(Trainer):
    """After every optimiser step every rank compares its codebook state (embedding, EMA
    statistics, idle counters) and CLUB networks with every other rank's, bit for bit, and
    counts the checks in a file; rank ``RANK`` dies once after step ``STEP`` when ``DIE`` is set."""

    STEP, RANK, DIE = 3, 1, False

    def after_step(self):
        cb = self.module.head.encoder.codebook
        flat = torch.cat([cb.embedding.flatten(), cb.ema_count, cb.ema_weight.flatten(), cb.unused.double(),
                          *[p.detach().flatten() for p in self.aux.club_params]]).double()
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks hold different codebooks"
        if self.rank == 0:
            with open(os.path.join(self.tcfg.paths.storage, f"{self.run_name}.checks"), "a") as f:
                f.write(f"{self.state.step}\n")
        marker = os.path.join(self.tcfg.paths.storage, "crashed-once")
        if self.DIE and self.state.step == self.STEP and self.rank == self.RANK \
                and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)


class CodebookWatchDies(CodebookWatch):
    DIE = True


def _state(run_dir: str) -> tuple[dict, dict]:
    sd = safe_load(os.path.join(latest_checkpoint(run_dir), "ds", TAG, "mp_rank_00_model_states.pt"))
    return dict(sd["module"]), sd["aux"]


def test_pretraining_on_two_workers_one_codebook_resume_and_worker_loss(tmp_path, tmp_path_factory, ray_local):
    """2 CPU workers, ZeRO 0, 4 steps (batch 1 per rank): every rank holds the same codebook after
    every step (its statistics are all-reduced); a run whose rank 1 dies after step 3 (checkpoint
    every 2 steps), so that Ray Train restarts the group from the step-2 checkpoint (mid-epoch: the
    trainer's resume path), ends bit-identical to the uninterrupted one: weights, codebook, EMA
    statistics, idle counters, CLUB nets and optimiser, reset generator, history."""
    from avmoe.train import fit, prepare

    data = shards(tmp_path_factory, "vggsound-avel", 8)
    storage = str(tmp_path)
    common = dict(test=False, keep_checkpoints=3, batch_size=1, tracking="none",
                  **{"model.reset_after": 1, "model.reset_pool": 2})  # resets happen in 4 steps
    full = fit(prepare(base_config("cmg", data, storage, "full", **common)), prepared=True, trainer_cls=CodebookWatch)
    assert full["history"][-1]["step"] == 4
    assert open(os.path.join(storage, "full.checks")).read().split() == ["1", "2", "3", "4"]
    resumed = fit(prepare(base_config("cmg", data, storage, "resumed", checkpoint_every=2, max_failures=1,
                                      **common)), prepared=True, trainer_cls=CodebookWatchDies)
    assert (tmp_path / "crashed-once").exists()
    assert os.path.isdir(os.path.join(storage, "resumed", "epoch-0000-step-0000002"))  # restarted from here
    assert resumed["history"] == full["history"]
    w_full, aux_full = _state(os.path.join(storage, "full"))
    w, aux = _state(os.path.join(storage, "resumed"))
    assert set(w) == set(w_full) and any(k.endswith("codebook.ema_weight") for k in w)
    for k in w_full:
        assert torch.equal(w[k], w_full[k]), k
    assert int(w["head.encoder.codebook.resets_total"]) > 0  # the reset ran (and resumed exactly)
    for net in ("club_a", "club_v"):
        for k in aux_full[net]:
            assert torch.equal(aux[net][k], aux_full[net][k]), (net, k)
    assert torch.equal(aux["generator"], aux_full["generator"])
    assert aux["club_opt"]["state"][0]["step"] == aux_full["club_opt"]["state"][0]["step"]
    val = full["history"][-1]["val"]
    assert {"retrieval", "code_agreement", "live_codes", "perplexity_audio"} <= set(val)


def _run_job(argv, monkeypatch, capsys) -> str:
    import runpy

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr(sys, "argv", ["jobs/cmg.py"] + argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(os.path.join(repo, "jobs", "cmg.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    return out


FAST = ["--workers", "1", "--cpus-per-worker", "0.5", "--epochs", "1", "--batch-size", "2", "decode_cpus=0.5",
        "metrics_address=127.0.0.1", "metrics_port=0", "shuffle_buffer=16", "tracking=none"]


def test_jobs_demo_then_each_downstream_protocol(tmp_path, tmp_path_factory, ray_local, monkeypatch, capsys):
    """``jobs/cmg.py`` with no --data runs the task's several-run demo (here a 2-run plan:
    pre-training, then AVE V->A from it via "{run:pretrain}") and prints its table; then
    --stage downstream runs AVVP (trained on the LLP split with segment labels) and AVE -> AVVP
    (--eval-data) from that pre-training run's directory; a downstream run without
    --pretrained, or on the wrong shards, is a config error."""
    from avmoe.tasks.base import DemoRun
    from avmoe.tasks.cmg import CMGTask
    from avmoe.train.cli import main

    fast = dict(epochs=1, batch_size=2, grad_accum=1)
    monkeypatch.setattr(CMGTask, "demo_plan", lambda self: [
        DemoRun("pretrain", "pretrain", "vggsound-avel", dict(fast), size=8),
        DemoRun("ave-v2a", "downstream", "ave", {**fast, "model.protocol": "ave", "model.pretrained": "{run:pretrain}"},
                size=8)])
    monkeypatch.setenv("AVMOE_DEMO_DIR", str(tmp_path / "demo-data"))
    storage = str(tmp_path)
    out = _run_job(["--storage", storage, "--name", "demo"] + FAST[:4] + FAST[8:], monkeypatch, capsys)
    assert "the embedded demo, 2 runs" in out and "CMG cross-modal generalisation" in out
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("ave "))
    assert row.split()[1] == "accuracy"
    pre = tmp_path / "demo-pretrain"
    r = json.load(open(pre / "results.json"))
    assert r["task"] == "cmg-pretrain" and "retrieval" in r["test"]
    assert os.path.exists(pre / "plots" / "codebook_usage.png")
    r = json.load(open(tmp_path / "demo-ave-v2a" / "results.json"))
    assert r["model_config"]["pretrained"].startswith(str(pre / "epoch-"))
    assert {"transfer", "labelled", "constant_guess"} <= set(r["test"])

    ave, avvp = (shards(tmp_path_factory, d, 8) for d in ("ave", "avvp"))
    out = _run_job(["--stage", "downstream", "--protocol", "avvp", "--direction", "a2v", "--pretrained",
                    str(pre), "--data", avvp, "--storage", storage, "--name", "down-avvp"] + FAST,
                   monkeypatch, capsys)
    r = json.load(open(tmp_path / "down-avvp" / "results.json"))
    assert r["config"]["paths"]["train_split"] == "val" and r["model_config"]["code_dim"] == 32
    assert {"transfer", "labelled", "transfer_precision", "transfer_f1", "transfer_micro_f1"} <= set(r["test"])
    assert r["test"]["transfer"] == r["test"]["transfer_precision"]

    _run_job(["--stage", "downstream", "--protocol", "ave_avvp", "--direction", "v2a", "--pretrained",
              str(pre), "--data", ave, "--eval-data", avvp, "--storage", storage, "--name", "down-x"]
             + FAST, monkeypatch, capsys)
    r = json.load(open(tmp_path / "down-x" / "results.json"))
    assert r["test"]["transfer"] == r["test"]["transfer_f1"]
    assert len(r["model_config"]["ave_to_shared"]) == 28

    assert main("cmg", ["--stage", "downstream", "--data", ave, "--storage", storage]) == 2
    assert "pretrained" in capsys.readouterr().err
    assert main("cmg", ["--stage", "downstream", "--protocol", "ave_avvp", "--pretrained", str(pre),
                        "--data", ave, "--storage", storage]) == 2
    assert "--eval-data" in capsys.readouterr().err
    assert main("cmg", ["--stage", "downstream", "--protocol", "ave", "--pretrained", str(pre),
                        "--data", avvp, "--storage", storage]) == 2  # LLP shards for the AVE protocol
    assert "'avvp' data" in capsys.readouterr().err
