"""The text zoo's build definition: full fine-tuning moves every backbone tensor; splits are per-class seeded."""

from __future__ import annotations

import numpy as np
import torch

from searchmerge.bench.zoo import text
from searchmerge.bench.zoo.text_data import split_task
from tests.bench.test_task_models import WORDS, _config, _tok


def test_full_finetune_moves_every_backbone_tensor() -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = _config("bert")
    cfg.num_labels = 3
    model = BertForSequenceClassification(cfg)
    before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=4)) for _ in range(20)]
    text.finetune(model, _tok(), texts, rng.integers(0, 3, 20), seed=0, recipe={**text.DEFINITION, "steps": 3, "batch": 4})
    assert text.unchanged_tensors(before, model.bert.state_dict()) == []
    assert set(text.unchanged_tensors(before, before)) == set(before)


def test_split_is_per_class_disjoint_and_seeded() -> None:
    labels = [c for c in range(3) for _ in range(100)]
    texts = [f"t{i}" for i in range(300)]
    a = split_task(texts, labels, 0, (50, 0.25), (25, 0.15), 30)
    b = split_task(texts, labels, 0, (50, 0.25), (25, 0.15), 30)
    assert a["test"][0] == b["test"][0]
    assert [np.bincount(a[s][1]).tolist() for s in ("test", "validation", "train")] == [[25] * 3, [15] * 3, [30] * 3]
    seen = [set(a[s][0]) for s in a]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    f = text.lr_lambda(10, 2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
