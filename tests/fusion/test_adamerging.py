"""AdaMerging: lowers the entropy of the batches it sees, never reads the report split, and its recipe
reproduces the merge exactly (also from the folders, as `searchmerge merge` does)."""

from __future__ import annotations

import pytest
import torch

from searchmerge.bench import load_bench
from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge, entropy, recipe_with_paths
from searchmerge.fusion.forward import task_module


def _mean_entropy(bench, state, split="validation"):
    from searchmerge.bench.evaluate import task_features

    mp, tp = bench.modelpool, bench.taskpool
    out = 0.0
    with torch.no_grad():
        for t in tp.names:
            feats = task_features(mp.model(mp.base), tp, t, split)
            out += float(entropy(task_module(mp, state, t)({k: torch.as_tensor(v) for k, v in feats.items()})))
    return out


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_lowers_entropy_and_never_reads_test(fixture_zoo, granularity):
    bench = load_bench(fixture_zoo)
    for t in bench.taskpool.tasks.values():  # the report split is gone: reading it would raise KeyError
        del t.splits["test"]
    cfg = AdaMergingConfig(granularity=granularity, steps=25, lr=1e-2, batch_size=64, seed=0)
    res = adamerge(bench, cfg)
    from searchmerge.merge import merge
    from searchmerge.recipe import Recipe

    names = bench.taskpool.names
    ta03 = merge(Recipe(method="task_arithmetic", base_model="base", models=[{"model": n} for n in names],
                        parameters={"lambda": 0.3}), base=bench.modelpool.base,
                 models=[bench.modelpool.finetuned[n] for n in names])
    assert _mean_entropy(bench, res.merged) < _mean_entropy(bench, ta03)  # λ = 0.3 everywhere is the start
    assert res.history[-1] < res.history[0]
    width = 1 if granularity == "task" else len(res.groups)
    assert res.coefficients.shape == (len(names), width)
    assert not torch.allclose(res.coefficients, torch.full_like(res.coefficients, 0.3))


def test_adamerging_recipe_reproduced_from_folders(fixture_zoo, tmp_path):
    bench = load_bench(fixture_zoo)
    res = adamerge(bench, AdaMergingConfig(granularity="layer", steps=5, lr=5e-2, clamp=True))
    assert float(res.coefficients.min()) >= 0.0 and float(res.coefficients.max()) <= 1.0
    recipe = recipe_with_paths(bench, res.recipe)
    path = tmp_path / "adamerging.yaml"
    path.write_text(recipe.to_yaml())
    from searchmerge.merge import merge

    out = merge(str(path))  # what `searchmerge merge adamerging.yaml` runs
    assert set(out) == set(res.merged)
    assert all(torch.equal(out[k], res.merged[k]) for k in out)
    # the merged weights are the functional forward's θ₀ + Σ λ τ
    mp = bench.modelpool
    k = res.groups[0][0]
    expect = mp.base[k] + sum(res.coefficients[i, 0] * (mp.finetuned[t][k] - mp.base[k])
                              for i, t in enumerate(bench.taskpool.names))
    torch.testing.assert_close(out[k], expect)


def test_adamerging_refuses_the_report_split(fixture_zoo):
    bench = load_bench(fixture_zoo)
    with pytest.raises(Exception, match="report split"):
        adamerge(bench, AdaMergingConfig(split="test"))
