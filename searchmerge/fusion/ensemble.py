"""Prediction ensembles (FusionBench ``SimpleEnsembleAlgorithm`` / ``WeightedEnsembleAlgorithm`` /
``MaxModelPredictorAlgorithm``): evaluated, never merged, at N forward passes per example.

Each task's prediction combines the N fine-tuned backbones, each under *that task's* head: the mean of
their logits (``simple``), Σ w_i·logits_i with w normalised to sum 1 (``weighted``, FusionBench's
``normalize: true``), or the element-wise max (``max``). FusionBench averages the backbones' outputs
before its (linear, zero-shot) head; with a linear head and weights summing to 1 that is the same
number as averaging the logits, which is what is done here for every family.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from searchmerge.bench.pool import Bench, BenchSpecError
from searchmerge.fusion.forward import iter_batches, task_module

Tensor = torch.Tensor
MODES = ("simple", "weighted", "max")


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """FusionBench's weighted ensemble with ``normalize: true``: w / Σ w (uniform when None)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise BenchSpecError(f"ensemble weights: {len(w)} value(s) for {n} model(s); give one weight per model.")
    total = sum(w)
    if not np.isfinite(total) or abs(total) < 1e-12:
        raise BenchSpecError(f"ensemble weights {w} sum to {total}; they must sum to a finite non-zero number.")
    return [x / total for x in w]


def combine_logits(stacked: Tensor, mode: str, weights: Sequence[float] | None = None) -> Tensor:
    """``[N, B, C]`` model logits -> ``[B, C]`` ensemble scores."""
    if mode == "simple":
        return stacked.mean(0)
    if mode == "weighted":
        w = torch.tensor(normalised_weights(weights, stacked.shape[0]), dtype=stacked.dtype)
        return (stacked * w.view(-1, 1, 1)).sum(0)
    if mode == "max":
        return stacked.max(0).values
    raise BenchSpecError(f"ensemble mode must be one of {list(MODES)}, got {mode!r}.")


@torch.inference_mode()
def task_logits(bench: Bench, backbone: dict[str, Tensor], task: str, split: str, batch_size: int = 64) -> Tensor:
    """Logits ``[n, C]`` of one backbone under ``task``'s head on a whole split (float32, CPU)."""
    from searchmerge.bench.evaluate import task_features

    mp, tp = bench.modelpool, bench.taskpool
    feats = task_features(mp.model(mp.base), tp, task, split)
    module = task_module(mp, backbone, task)
    n = len(tp.tasks[task].splits[split])
    return torch.cat([module(b).float() for b in iter_batches(feats, np.arange(n), batch_size)])


def ensemble_evaluate(bench: Bench, split: str, mode: str = "simple", *, weights: Sequence[float] | None = None,
                      batch_size: int = 64, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-task metric of the ensemble on ``split``, with its cost: ``forward_passes`` = N × examples."""
    from searchmerge.bench.metrics import get_metric

    if mode not in MODES:
        raise BenchSpecError(f"ensemble mode must be one of {list(MODES)}, got {mode!r}.")
    mp, tp = bench.modelpool, bench.taskpool
    members = [t for t in tp.names if t in mp.finetuned]
    if mode == "weighted":
        normalised_weights(weights, len(members))  # checked before any work
    per_task, passes, n_total = {}, 0, 0
    for t in tasks or tp.names:
        stacked = torch.stack([task_logits(bench, mp.finetuned[m], t, split, batch_size) for m in members])
        pred = combine_logits(stacked, mode, weights).argmax(-1).numpy()
        labels = tp.tasks[t].splits[split].labels
        per_task[t] = float(get_metric(tp.tasks[t].spec.metric)(pred, labels))
        passes += len(members) * len(labels)
        n_total += len(labels)
    return {"split": split, "per_task": per_task, "average": float(np.mean(list(per_task.values()))),
            "n": n_total, "forward_passes": passes, "models": len(members)}
