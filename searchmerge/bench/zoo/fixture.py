"""FIXTURE zoo: a 64-64-64 MLP trunk on sklearn digits (docs/bench.md, Zoos); builds in seconds.

The trunk is pretrained on digits 0–4 only; five label-partition tasks over all ten digits (parity,
≥5, mod 3, prime, has-a-loop) are each fine-tuned (trunk + own head). Data: 70/30 train/test per
class (seed 0), no validation file, so the loader carves 10 % of train (seed 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from searchmerge.bench.families import MLPTrunk
from searchmerge.bench.zoo.common import (
    build_cached, progress_bar, save_head, save_plain_folder, stratified_split, torch_threads, write_parquet,
)

TASKS = {
    "parity": lambda y: y % 2,
    "ge5": lambda y: (y >= 5).astype(np.int64),
    "mod3": lambda y: y % 3,
    "prime": lambda y: np.isin(y, [2, 3, 5, 7]).astype(np.int64),
    "loop": lambda y: np.isin(y, [0, 6, 8, 9]).astype(np.int64),
}
DEFINITION = {
    "version": 1, "sizes": [64, 64, 64], "pretrain_digits": [0, 1, 2, 3, 4], "pretrain_steps": 200,
    "pretrain_lr": 1e-2, "ft_steps": 150, "ft_lr": 3e-3, "test_frac": 0.3, "seed": 0, "tasks": list(TASKS),
}


def _train(trunk: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(list(trunk.parameters()) + list(head.parameters()), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(trunk(x)), y).backward()
        opt.step()


def _build(folder: Path, progress: bool) -> None:
    from sklearn.datasets import load_digits

    d = DEFINITION
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int64)
    tr, te = stratified_split(y_all, d["test_frac"], d["seed"])
    xt = torch.from_numpy(x_all[tr])
    with progress_bar(progress, "fixture zoo", 1 + len(TASKS)) as advance, torch_threads(1):
        torch.manual_seed(d["seed"])
        trunk = MLPTrunk(d["sizes"])
        keep = np.isin(y_all[tr], d["pretrain_digits"])
        head0 = nn.Linear(d["sizes"][-1], len(d["pretrain_digits"]))
        _train(trunk, head0, xt[keep], torch.from_numpy(y_all[tr][keep]), d["pretrain_steps"], d["pretrain_lr"])
        cfg = {"model_type": "searchmerge_mlp", "sizes": d["sizes"]}
        save_plain_folder(folder / "base", cfg, trunk.state_dict())
        advance(description="fixture zoo: pretrained")
        tasks = []
        for i, (name, fn) in enumerate(TASKS.items()):
            y_task = fn(y_all)
            write_parquet(folder / "data" / name / "train.parquet", {"features": x_all[tr].tolist(), "label": y_task[tr]})
            write_parquet(folder / "data" / name / "test.parquet", {"features": x_all[te].tolist(), "label": y_task[te]})
            torch.manual_seed(d["seed"] + 1 + i)
            ft = MLPTrunk(d["sizes"])
            ft.load_state_dict(trunk.state_dict())
            head = nn.Linear(d["sizes"][-1], int(y_task.max()) + 1)
            # train on the same carved train part the loader will use (validation is held out)
            from searchmerge.bench.pool import VAL_FRACTION, VAL_SEED

            perm = np.random.default_rng(VAL_SEED).permutation(len(tr))
            fit = np.sort(perm[int(round(len(tr) * VAL_FRACTION)):])
            _train(ft, head, xt[fit], torch.from_numpy(y_task[tr][fit]), d["ft_steps"], d["ft_lr"])
            save_plain_folder(folder / "models" / name, cfg, ft.state_dict())
            save_head(folder / "heads" / f"{name}.safetensors", head)
            tasks.append({
                "name": name, "input_column": "features", "label_column": "label",
                "train": f"data/{name}/train.parquet", "test": f"data/{name}/test.parquet", "metric": "accuracy",
            })
            advance(description=f"fixture zoo: fine-tuned {name}")
    spec = {
        "name": "fixture",
        "modelpool": {
            "family": "mlp", "base": "base",
            "finetuned": {t: f"models/{t}" for t in TASKS},
            "heads": {t: f"heads/{t}.safetensors" for t in TASKS},
        },
        "taskpool": {"tasks": tasks},
    }
    (folder / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def build(cache_dir: str | Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
    return build_cached("fixture", DEFINITION, sys.modules[__name__], lambda f: _build(f, progress), cache_dir, force)
