"""The evaluable model bundle: :class:`BenchModel` (picklable) and the :class:`Runner` built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.families.base import Family, _head_module, get_family
from searchmerge.errors import SearchmergeError


@dataclass
class BenchModel:
    """A backbone state dict + the task heads, evaluable in-process or on Ray actors (picklable)."""

    family: str
    config: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_folder: str = ""
    name: str = "model"
    prefix_layers: int | None = None
    task_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # seqcls_task: each task's own config

    def prefix_hash(self) -> str | None:
        """Hash of the tensors behind the cached prefix (None: no prefix caching for this model)."""
        if not self.prefix_layers:
            return None
        import hashlib

        keys = get_family(self.family).prefix_keys(self.backbone, self.prefix_layers)
        if not keys:
            return None
        h = hashlib.blake2b(digest_size=16)
        for key in sorted(keys):
            t = self.backbone[key].detach().cpu()
            if t.is_floating_point():
                t = t + 0.0  # -0.0 -> +0.0: a delta merge adds +0.0 to unchanged tensors (same values)
            t = t.contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def runner(self) -> "Runner":
        fam = get_family(self.family)
        if getattr(fam, "heads_from_folders", False):  # task models: each task's own architecture and head
            module = fam.build_runner_module(self.config, self.backbone, self.heads, self.task_configs)  # type: ignore[attr-defined]
            return Runner(fam, module, {t: module for t in self.heads})
        return Runner(fam, fam.build(self.config, self.backbone), {t: _head_module(h) for t, h in self.heads.items()})


@dataclass
class Runner:
    family: Family
    module: nn.Module
    heads: dict[str, nn.Module]

    @torch.inference_mode()
    def predict(self, task: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        device = next(self.module.parameters()).device  # the resident model's device (a store's GPU, or CPU)
        tb = {k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        head = self.heads.get(task)
        if self.family.needs_heads and head is None:
            raise SearchmergeError(f"no head for task `{task}`")
        if head is not None:
            head.to(device)  # in place; a no-op once there
        if getattr(self.family, "heads_from_folders", False):
            return self.family.predict_task(self.module, task, tb).cpu().numpy().astype(np.int64)  # type: ignore[attr-defined]
        return self.family.predict(self.module, head, tb).cpu().numpy().astype(np.int64)
