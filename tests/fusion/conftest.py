"""Tiny benches for the fusion tests: an MLP pool with one linear layer, and the fixture zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


def make_linear_bench(root: Path, *, tasks: int = 2, d: int = 4, n: int = 40, seed: int = 0) -> Path:
    """An ``mlp`` pool whose backbone is one ``Linear(d, d)`` (+ ReLU), a 2-class head per task, n rows per train file."""
    from searchmerge.bench.families import MLPTrunk
    from searchmerge.bench.zoo.common import save_head, save_plain_folder, write_parquet

    g = torch.Generator().manual_seed(seed)
    cfg = {"model_type": "searchmerge_mlp", "sizes": [d, d]}
    torch.manual_seed(seed)
    base = MLPTrunk([d, d])
    save_plain_folder(root / "base", cfg, base.state_dict())
    spec_tasks, finetuned, heads = [], {}, {}
    for i in range(tasks):
        name = f"t{i}"
        ft = MLPTrunk([d, d])
        ft.load_state_dict({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        save_plain_folder(root / "models" / name, cfg, ft.state_dict())
        head = torch.nn.Linear(d, 2)
        with torch.no_grad():
            head.weight.copy_(torch.randn(2, d, generator=g))
            head.bias.zero_()
        save_head(root / "heads" / f"{name}.safetensors", head)
        x = (torch.randn(n, d, generator=g) + i).numpy()
        y = np.arange(n) % 2
        write_parquet(root / "data" / name / "train.parquet", {"x": x.tolist(), "label": y})
        write_parquet(root / "data" / name / "test.parquet", {"x": x[:8].tolist(), "label": y[:8]})
        spec_tasks.append({"name": name, "input_column": "x", "train": f"data/{name}/train.parquet",
                           "test": f"data/{name}/test.parquet"})
        finetuned[name], heads[name] = f"models/{name}", f"heads/{name}.safetensors"
    spec = {"name": "linear", "modelpool": {"family": "mlp", "base": "base", "finetuned": finetuned, "heads": heads},
            "taskpool": {"tasks": spec_tasks}}
    (root / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "bench.yaml"


@pytest.fixture()
def linear_bench_path(tmp_path):
    return make_linear_bench(tmp_path / "pool")


@pytest.fixture(scope="session")
def fixture_zoo(tmp_path_factory):
    from searchmerge.bench.zoo import build_zoo

    return build_zoo("fixture", tmp_path_factory.mktemp("smcache"), progress=False)


@pytest.fixture(scope="session")
def fixture_bench(fixture_zoo):
    from searchmerge.bench import load_bench

    return load_bench(fixture_zoo)
