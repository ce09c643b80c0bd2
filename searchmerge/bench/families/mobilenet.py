"""``image``: the project's MobileNetV2 (torchvision-compatible) features + per-task linear heads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from searchmerge.bench.families.base import Family, _load_project_folder, _register
from searchmerge.bench.families.pixels import images_to_tensor


def _div(v: float, d: int = 8) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


class ConvBNReLU(nn.Sequential):
    def __init__(self, i: int, o: int, k: int = 3, st: int = 1, g: int = 1) -> None:
        super().__init__(nn.Conv2d(i, o, k, st, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, i: int, o: int, st: int, e: int) -> None:
        super().__init__()
        h = int(round(i * e))
        self.use_res = st == 1 and i == o
        layers: list[nn.Module] = [] if e == 1 else [ConvBNReLU(i, h, 1)]
        self.conv = nn.Sequential(*layers, ConvBNReLU(h, h, st=st, g=h), nn.Conv2d(h, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (loads ``mobilenet_v2-b0353104.pth`` with ``strict=True``)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        c, feats = 32, [ConvBNReLU(3, 32, st=2)]
        for t, ch, n, st in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]:
            for j in range(n):
                feats.append(InvertedResidual(c, ch, st if j == 0 else 1, t))
                c = ch
        feats.append(ConvBNReLU(c, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 without the ImageNet classifier: the merged part of the image zoo."""

    def __init__(self) -> None:
        super().__init__()
        self.features = MobileNetV2().features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)



@_register
class ImageFamily(Family):
    name = "image"

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return _load_project_folder(self, folder, "searchmerge_mobilenet_v2")

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return 1280

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        m = MobileNetV2Backbone()
        m.load_state_dict(state_dict, strict=True)
        return m.eval()

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        cfg = json.loads((Path(base_folder) / "config.json").read_text())
        x = images_to_tensor(task.splits[split].inputs, int(cfg.get("image_size", 32)))
        return {"pixels": x.numpy()}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["pixels"])
