"""The family registry and the :class:`Family` interface every architecture family implements.

A family says how a local folder loads (config + backbone state dict), how a task's inputs are
preprocessed into model-ready arrays, and how a backbone (+ head) predicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from searchmerge.errors import SearchmergeError

FAMILIES: dict[str, "Family"] = {}
MAX_TOKENS = 64


def get_family(name: str) -> "Family":
    if name not in FAMILIES:
        raise SearchmergeError(f"unknown family `{name}`; families: {sorted(FAMILIES)}.")
    return FAMILIES[name]


def _register(cls: type["Family"]) -> type["Family"]:
    FAMILIES[cls.name] = cls()
    return cls


def _load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _head_module(h: dict[str, torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(h["weight"].shape[1], h["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(h["weight"].float())
        lin.bias.copy_(h["bias"].float())
    return lin.eval()


class Family:
    name = ""
    needs_heads = True
    zero_shot = False  # heads are computed from the task pool (class names), not read from the spec

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config, backbone state dict)`` of a local model folder; raises if it does not load."""
        raise NotImplementedError

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return None

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        """Model-ready arrays for one split of one task (zero is padding in every array)."""
        raise NotImplementedError

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def prefix_keys(self, state_dict: dict[str, torch.Tensor], k: int) -> list[str]:
        """Tensors that determine the cached prefix output (families without prefix caching: none)."""
        return []

    def prefix_features(self, module: nn.Module, feats: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"family `{self.name}` has no prefix cache")

    def logits(self, module: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class scores ``[B, C]`` (differentiable: the data-driven fusion passes use them)."""
        return head(self.features(module, batch))

    def predict(self, module: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(module, head, batch).argmax(-1)



def _load_project_folder(family: "Family", folder: Path, model_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A folder of one of the project's own architectures: check ``model_type``, load, build strictly."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected {model_type!r}")
    sd = _load_safetensors_folder(folder)
    family.build(config, sd)  # strict load check
    return config, sd
