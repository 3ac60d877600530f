"""AVQA (MUSIC-AVQA): AVST head on the adapted trunk (spec §3.4).

Loss = CE(answer) + 0.5 CE(match), match labels 1 for (audio, positive frame) and 0 for
(audio, negative frame) pairs. The question vocabulary is built by the data pipeline; the model
only takes its size (``vocab_size``) and the batch carries the token ids. Metric: per-type and
overall accuracy; primary "Overall".

``question_type`` in the batch may be (B,) indices into ``QUESTION_TYPES``, (B, 2) integer
pairs (index of the type in Audio / Visual / Audio-Visual, index of the subtype within that
type, in the table's order), or a list of (type, subtype) strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avmoe.config import OptimConfig, tiny_adapter, tiny_audio, tiny_visual
from avmoe.models.heads.avqa import AVQAConfig, AVQAHead
from avmoe.tasks.base import MetricAccumulator, Task, register_task
from data_pipeline.datasets.avqa import QUESTION_TYPES


def question_types(qt: Any) -> list:
    """Batch ``question_type`` -> what ``avqa_accuracy`` takes (indices or (type, subtype) pairs)."""
    if isinstance(qt, torch.Tensor):
        qt = qt.cpu().numpy()
    if isinstance(qt, np.ndarray) and qt.ndim == 2 and np.issubdtype(qt.dtype, np.integer):
        types = list(dict.fromkeys(t for t, _ in QUESTION_TYPES))
        subtypes = {t: [s for tt, s in QUESTION_TYPES if tt == t] for t in types}
        return [(types[i], subtypes[types[i]][j]) for i, j in qt.tolist()]
    if isinstance(qt, np.ndarray):
        return qt.tolist()
    return list(qt)


class AVQAAccumulator(MetricAccumulator):
    def reset(self) -> None:
        self.preds: list[int] = []
        self.answers: list[int] = []
        self.types: list = []

    def update(self, preds: dict[str, Any], batch) -> None:
        self.preds += np.asarray(preds["answer"]).reshape(-1).tolist()
        self.answers += batch.targets["answer"].cpu().reshape(-1).tolist()
        self.types += question_types(batch.targets["question_type"])

    def compute(self) -> dict[str, float]:
        from avmoe.metrics import avqa_accuracy

        if not self.preds:
            return {"Overall": float("nan")}
        return avqa_accuracy(self.preds, self.answers, self.types)


@register_task("avqa")
class AVQATask(Task):
    head = AVQAHead
    primary_metric = "Overall"
    supports_ogm = True
    demo_schedule = dict(epochs=2, batch_size=4, grad_accum=1, lr=1e-3, scheduler="none")

    config_class = AVQAConfig
    presets = {
        # released train_v2.sh / test_v2.sh: 1 CMA + 2 UA, all 12 blocks, K 2, r 8, G 4, no BN,
        # audio adapters ungated (is_gate=0)
        "base": {"adapter": dict(num_cma=1, num_ua=2, num_skip=1, num_tokens=2, reduction=8, groups=4,
                                 use_bn=False, audio_gate=False, ua_variant="v2")},
        "official": {"adapter.ua_variant": "none", "backbone_train_mode": True, "audio.spec_augment": True,
                     "audio.mixup": True, "visual.antialias": False},
        "tiny": {"visual": tiny_visual(), "audio": tiny_audio(),
                 "adapter": tiny_adapter(num_skip=1, num_tokens=2, groups=4), "vocab_size": 20, "num_answers": 6,
                 "max_question_len": 6, "match_hidden": (32, 16, 8)},
    }
    training = OptimConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, scheduler="step", step_size=8, gamma=0.1,
                           epochs=80, batch_size=2, grad_accum=4, early_stop=5, seed=1)

    def model_keys(self, manifest):
        keys = super().model_keys(manifest)
        vocab = manifest.get("label_vocab") or {}
        if "question_tokens" in vocab:
            keys["vocab_size"] = len(vocab["question_tokens"])
        if "answers" in vocab:
            keys["num_answers"] = len(vocab["answers"])
        if "max_question_len" in vocab:
            keys["max_question_len"] = int(vocab["max_question_len"])
        return keys

    def example_targets(self, cfg, batch_size, generator):
        b = batch_size
        ids = torch.randint(1, cfg.vocab_size, (b, cfg.max_question_len), generator=generator)
        ids[:, -2:] = 0  # padding
        return {"question_ids": ids, "answer": torch.arange(b) % cfg.num_answers,
                "question_type": torch.arange(b) % len(QUESTION_TYPES)}

    def loss(self, out, batch, cfg):
        logits = out["answer_logits"]
        answer = batch.targets["answer"].to(logits.device).long().view(-1)
        match = out["match_logits"]  # (BT, 2: pos/neg, 2)
        match_labels = torch.tensor([1, 0], device=logits.device).repeat(match.shape[0])
        parts = {"qa": F.cross_entropy(logits, answer),
                 "match": F.cross_entropy(match.reshape(-1, 2), match_labels)}
        total = parts["qa"] + cfg.match_weight * parts["match"]
        total = self.add_load_balance(total, parts, out, cfg)
        return total, self._floats(parts)

    def predict(self, out, batch):
        logits = out["answer_logits"].detach()
        return {"answer": logits.argmax(-1).cpu(), "answer_logits": logits.cpu()}

    def metric_accumulator(self, cfg):
        return AVQAAccumulator()

    def prediction_record(self, preds, cfg, vocab):
        """The answer and the top 5 with their probabilities."""
        answers = list(vocab.get("answers") or [])
        p = torch.softmax(preds["answer_logits"][0].float(), -1)
        top = torch.topk(p, min(5, p.numel()))
        return {"answer": answers[int(top.indices[0])],
                "top5": [{"answer": answers[int(i)], "probability": float(v)} for v, i in zip(top.values, top.indices)]}

    def plot_prediction(self, record, frames, out_dir, title):
        from avmoe.plots import plot_clip_answer

        top = [(a["answer"], a["probability"]) for a in record["top5"]]
        return [plot_clip_answer(frames, f"{record.get('question', '')} ({record.get('question_type', '')})", top,
                                 out_dir, title)]

    @torch.no_grad()
    def ogm_scores(self, model, out, batch):
        """The concat-fusion split of OGM-GE: ``fc_fusion`` acts on [audio ; visual]; the audio
        estimate uses the first half of its weight (+ b/2) with the visual half zeroed, and
        vice versa, then the answer classifier; softmax, probability of the true answer."""
        head = model.head
        f, q = out["fusion_in"].detach(), out["question"].detach()
        d = f.shape[-1] // 2
        w, b = head.fc_fusion.weight, head.fc_fusion.bias
        y = batch.targets["answer"].to(f.device).long().view(-1)
        scores = []
        for half in (slice(0, d), slice(d, 2 * d)):
            logits = head.fc_ans(torch.tanh((f[:, half] @ w[:, half].T + b / 2) * q))
            scores.append(F.softmax(logits, -1).gather(1, y[:, None]).sum())
        return scores[0], scores[1]
