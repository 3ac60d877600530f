"""AVQA (MUSIC-AVQA): AVST head on the adapted trunk (spec §3.4).

Loss = CE(answer) + 0.5 CE(match), match labels 1 for (audio, positive frame) and 0 for
(audio, negative frame) pairs. The question vocabulary is built by the data pipeline; the model
only takes its size (``vocab_size``) and the batch carries the token ids. Metric: per-type and
overall accuracy; primary "Overall".

``question_type`` in the batch may be (B,) indices into ``avmoe.metrics.AVQA_QUESTION_TYPES``,
(B, 2) integer pairs (index of the type in Audio / Visual / Audio-Visual, index of the subtype
within that type, in the table's order), or a list of (type, subtype) strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avmoe.config import (
    AVQAConfig, apply_overrides, paper_audio, paper_visual,
    tiny_adapter, tiny_audio, tiny_visual,
)
from avmoe.tasks.base import MetricAccumulator, Task


def question_types(qt: Any) -> list:
    """Batch ``question_type`` -> what ``avqa_accuracy`` takes (indices or (type, subtype) pairs)."""
    from avmoe.metrics import AVQA_QUESTION_TYPES

    if isinstance(qt, torch.Tensor):
        qt = qt.cpu().numpy()
    if isinstance(qt, np.ndarray) and qt.ndim == 2 and np.issubdtype(qt.dtype, np.integer):
        types = list(dict.fromkeys(t for t, _ in AVQA_QUESTION_TYPES))
        subtypes = {t: [s for tt, s in AVQA_QUESTION_TYPES if tt == t] for t in types}
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


class AVQATask(Task):
    name = "avqa"
    config_cls = AVQAConfig
    primary_metric = "Overall"

    def make_preset(self, preset: str) -> AVQAConfig:
        cfg = AVQAConfig(visual=paper_visual(), audio=paper_audio())
        # released train_v2.sh / test_v2.sh: 1 CMA + 2 UA, all 12 blocks, K 2, r 8, G 4, no BN,
        # audio adapters ungated (is_gate=0)
        apply_overrides(cfg, {"adapter": dict(num_cma=1, num_ua=2, num_skip=1, num_tokens=2, reduction=8,
                                              groups=4, use_bn=False, audio_gate=False, ua_variant="v2")})
        apply_overrides(cfg, {"optim": dict(lr=1e-4, scheduler="step", step_size=8, gamma=0.1, epochs=80,
                                            batch_size=2, grad_accum=4, early_stop=5, seed=1,
                                            select_split="val")})
        if preset == "official":
            apply_overrides(cfg, {"adapter.ua_variant": "none", "backbone_train_mode": True,
                                  "audio.spec_augment": True, "audio.mixup": True})
        elif preset == "tiny":
            cfg.visual, cfg.audio = tiny_visual(), tiny_audio()
            apply_overrides(cfg, {"adapter": tiny_adapter(num_skip=1, num_tokens=2, groups=4),
                                  "vocab_size": 20, "num_answers": 6, "max_question_len": 6,
                                  "match_hidden": (32, 16, 8)})
        return cfg

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
