"""``mlp``: a plain MLP trunk on feature vectors + per-task linear heads (the fixture zoo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.families.base import Family, _load_project_folder, _register


class MLPTrunk(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)



@_register
class MLPFamily(Family):
    name = "mlp"

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return _load_project_folder(self, folder, "searchmerge_mlp")

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return int(config["sizes"][-1])

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        m = MLPTrunk(list(config["sizes"]))
        m.load_state_dict(state_dict, strict=True)
        return m.eval()

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        return {"x": np.asarray(task.splits[split].inputs, dtype=np.float32)}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["x"])
