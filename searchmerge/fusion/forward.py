"""A differentiable ``batch -> logits`` module per (model pool, backbone state, task), for the data passes.

:class:`TaskLogits` holds the pool's backbone as ``self.backbone`` (parameter names = the pool's backbone
state-dict keys, so ``"backbone." + key`` addresses a tensor for ``torch.func.functional_call``) and the
task's own head; ``forward(batch)`` gives the logits the pool's evaluation takes the argmax of. Statistics
passes hook or differentiate ``self.backbone`` only: heads are never merged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.pool import BenchSpecError, ModelPool

Tensor = torch.Tensor
PREFIX = "backbone."


class TaskLogits(nn.Module):
    """Backbone + one task's head; ``forward(batch)`` returns logits ``[B, C]``."""

    def __init__(self, family: Any, backbone: nn.Module, head: nn.Module | None, task: str,
                 task_model: nn.Module | None = None) -> None:
        super().__init__()
        self.family = family
        self.backbone = backbone
        self.head = head
        self.task = task
        self.task_model = task_model  # seqcls_task: the task's own HF model, sharing `backbone`

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.task_model is not None:
            mask = batch["attention_mask"]
            n = int(mask.sum(1).max())  # drop all-padding columns, as the evaluation does
            return self.task_model(input_ids=batch["input_ids"][:, :n], attention_mask=mask[:, :n]).logits
        assert self.head is not None
        return self.head(self.family.features(self.backbone, dict(batch)))


def check_supported(pool: ModelPool) -> None:
    """Data-driven fusion needs per-task logits: every family with heads (or task-model folders)."""
    fam = pool.family
    if not fam.needs_heads and not getattr(fam, "heads_from_folders", False):
        raise BenchSpecError(
            f"model pool family `{pool.spec.family}`: Fisher / RegMean / AdaMerging / ensembles need per-task "
            f"logits from a classification head; this family has none — use a family with heads "
            f"(seqcls_task, seqcls, image, mlp, clip)."
        )


def task_module(pool: ModelPool, backbone: Mapping[str, Tensor], task: str) -> TaskLogits:
    """The pool's architecture with ``backbone`` weights and ``task``'s head, in eval mode, on CPU."""
    check_supported(pool)
    if task not in pool.heads:
        raise BenchSpecError(f"task `{task}` has no head in the model pool (heads: {sorted(pool.heads)}).")
    model = dataclasses.replace(pool.model(dict(backbone), name=f"fusion:{task}"), heads={task: pool.heads[task]})
    runner = model.runner()
    if getattr(pool.family, "heads_from_folders", False):
        mod = runner.module
        return TaskLogits(pool.family, mod.base, None, task, task_model=mod._tasks[task]).eval()
    return TaskLogits(pool.family, runner.module, runner.heads[task], task).eval()


def iter_batches(features: Mapping[str, np.ndarray], index: np.ndarray, batch_size: int,
                 device: str | torch.device = "cpu") -> Iterator[dict[str, Tensor]]:
    """The rows ``index`` (in that order) as tensor batches of ``batch_size`` (the last one may be smaller)."""
    for s in range(0, len(index), batch_size):
        rows = index[s:s + batch_size]
        yield {k: torch.as_tensor(np.ascontiguousarray(v[rows])).to(device) for k, v in features.items()}
