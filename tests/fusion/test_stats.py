"""Statistics passes on tiny models, and their disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.bench import load_bench
from searchmerge.fusion import stats as S
from searchmerge.fusion.forward import iter_batches, task_module
from searchmerge.fusion.regmean import regmean_merge


def _train_x(bench, task):
    return np.asarray(bench.taskpool.tasks[task].splits["train"].inputs, dtype=np.float32)


def test_fisher_pass_matches_autograd(linear_bench_path):
    bench = load_bench(linear_bench_path)
    mp = bench.modelpool
    module = task_module(mp, mp.finetuned["t0"], "t0")
    x = torch.from_numpy(_train_x(bench, "t0")[:6])

    def grads(rows):
        module.zero_grad()
        logits = module({"x": x[rows]})
        p = torch.softmax(logits, -1).detach()
        (p.sqrt() * torch.log_softmax(logits, -1)).sum().backward()
        return module.backbone.net[0].weight.grad.clone()

    feats = {"x": x.numpy()}
    batch = S.fisher_pass(module, iter_batches(feats, np.arange(6), 3))
    expect = (grads([0, 1, 2]) ** 2 + grads([3, 4, 5]) ** 2) / 6  # square after the batch sum
    torch.testing.assert_close(batch["net.0.weight"], expect)
    per_ex = S.fisher_pass(module, iter_batches(feats, np.arange(6), 1))
    torch.testing.assert_close(per_ex["net.0.weight"], sum(grads([i]) ** 2 for i in range(6)) / 6)
    assert set(batch) == set(mp.base)  # every backbone parameter, no head tensor


def test_regmean_on_linear_model_is_least_squares(linear_bench_path, tmp_path):
    bench = load_bench(linear_bench_path)
    mp = bench.modelpool
    req = S.StatsRequest("gram", examples=10_000, cache=str(tmp_path / "c"))
    stats = S.pool_statistics(bench, req, progress=False)
    grams = [s[0] for s in stats]
    assert set(grams[0]) == {"net.0"} and stats[0][1]["transposed"] == {"net.0": True}
    x0, x1 = _train_x(bench, "t0"), _train_x(bench, "t1")
    assert len(x0) == len(x1)  # equal counts: mean Grams weigh the tasks like the stacked problem
    torch.testing.assert_close(grams[0]["net.0"].double(), torch.from_numpy(x0.T @ x0 / len(x0)).double(),
                               rtol=1e-5, atol=1e-5)
    merged = regmean_merge(mp.base, [mp.finetuned["t0"], mp.finetuned["t1"]], grams, alpha=1.0)
    x = torch.from_numpy(np.concatenate([x0, x1])).double()
    w = [mp.finetuned[t]["net.0.weight"].double() for t in ("t0", "t1")]
    y = torch.cat([torch.from_numpy(x0).double() @ w[0].T, torch.from_numpy(x1).double() @ w[1].T])
    ls = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(merged["net.0.weight"].double(), ls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged["net.0.bias"], (mp.finetuned["t0"]["net.0.bias"] + mp.finetuned["t1"]["net.0.bias"]) / 2)


def test_statistics_cached_and_recomputed_when_data_changes(tmp_path):
    from tests.fusion.conftest import make_linear_bench

    path = make_linear_bench(tmp_path / "pool")
    req = S.StatsRequest("fisher", examples=16, batch_size=4, cache=str(tmp_path / "c"))
    before = dict(S.CACHE_STATS)
    first = S.pool_statistics(load_bench(path), req, progress=False)
    assert S.CACHE_STATS["computed"] - before["computed"] == 2
    files = sorted((tmp_path / "c" / "fusion" / "fisher").glob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "c").rglob(".*tmp*"))
    again = S.pool_statistics(load_bench(path), req, progress=False)
    assert S.CACHE_STATS["hits"] - before["hits"] == 2 and S.CACHE_STATS["computed"] - before["computed"] == 2
    for (a, _), (b, _) in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed, count or variant is another key
    S.pool_statistics(load_bench(path), S.StatsRequest("fisher", examples=16, batch_size=4, seed=1,
                                                       cache=str(tmp_path / "c")), progress=False)
    assert S.CACHE_STATS["computed"] - before["computed"] == 4
    # rewrite t1's train file with different rows: only t1 is recomputed
    from searchmerge.bench.zoo.common import write_parquet

    rng = np.random.default_rng(5)
    write_parquet(tmp_path / "pool" / "data" / "t1" / "train.parquet",
                  {"x": rng.normal(size=(40, 4)).tolist(), "label": np.arange(40) % 2})
    third = S.pool_statistics(load_bench(path), req, progress=False)
    assert S.CACHE_STATS["computed"] - before["computed"] == 5
    assert torch.equal(third[0][0]["net.0.weight"], first[0][0]["net.0.weight"])
    assert not torch.equal(third[1][0]["net.0.weight"], first[1][0]["net.0.weight"])


def test_request_checked_before_work(linear_bench_path):
    bench = load_bench(linear_bench_path)
    for bad, match in [(dict(kind="hessian"), "kind"), (dict(kind="fisher", variant="exact"), "variant"),
                       (dict(kind="gram", split="test"), "never reads the report"),
                       (dict(kind="gram", examples=0), "examples")]:
        with pytest.raises(S.BenchSpecError, match=match):
            S.pool_statistics(bench, S.StatsRequest(**bad), progress=False)
