"""A differentiable ``batch -> logits`` module per (model pool, backbone state, task), for the data passes.

:class:`TaskLogits` holds the pool's backbone as ``self.backbone`` (parameter names = the pool's backbone
state-dict keys, so ``"backbone." + key`` addresses a tensor for ``torch.func.functional_call``) and the
task's own head (none for causal-LM multiple choice: its logits are the choices' scores); ``forward(batch)``
gives the family's logits, whose argmax the evaluation predicts. Statistics passes hook or differentiate
``self.backbone`` only: heads are never merged.
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
        if self.task_model is not None:  # task-model folders: the architecture's own forward, as evaluated
            return self.task_model(**self.family.model_inputs(dict(batch))).logits
        return self.family.logits(self.backbone, self.head, dict(batch))


def task_module(pool: ModelPool, backbone: Mapping[str, Tensor], task: str) -> TaskLogits:
    """The pool's architecture with ``backbone`` weights and ``task``'s head (if any), in eval mode, on CPU."""
    if pool.family.needs_heads and task not in pool.heads:
        raise BenchSpecError(f"task `{task}` has no head in the model pool (heads: {sorted(pool.heads)}).")
    heads = {task: pool.heads[task]} if task in pool.heads else {}
    model = dataclasses.replace(pool.model(dict(backbone), name=f"fusion:{task}"), heads=heads)
    runner = model.runner()
    if getattr(pool.family, "heads_from_folders", False):
        mod = runner.module
        return TaskLogits(pool.family, mod.base, None, task, task_model=mod._tasks[task]).eval()
    return TaskLogits(pool.family, runner.module, runner.heads.get(task), task).eval()


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is refused before any work."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise BenchSpecError(f"device must be auto, cpu or cuda[:N], got {device!r}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchSpecError(f"device {device!r}: CUDA is not available here — use `cpu` (or `auto`).")
    return torch.device(device)


def iter_batches(features: Mapping[str, np.ndarray], index: np.ndarray, batch_size: int,
                 device: str | torch.device = "cpu") -> Iterator[dict[str, Tensor]]:
    """The rows ``index`` (in that order) as tensor batches of ``batch_size`` (the last one may be smaller)."""
    for s in range(0, len(index), batch_size):
        rows = index[s:s + batch_size]
        yield {k: torch.as_tensor(np.ascontiguousarray(v[rows])).to(device) for k, v in features.items()}
