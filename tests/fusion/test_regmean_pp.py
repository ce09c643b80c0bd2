"""RegMean++: layer l's Grams come from the merged earlier layers."""

from __future__ import annotations

import numpy as np
import torch

from searchmerge.bench import load_bench
from searchmerge.fusion.regmean import regmean_merge, regmean_solve
from searchmerge.fusion.regmean_pp import regmean_plusplus
from searchmerge.fusion.stats import StatsRequest, example_index, pool_statistics


def test_single_layer_equals_regmean(linear_bench_path, tmp_path):
    bench = load_bench(linear_bench_path)
    mp = bench.modelpool
    req = StatsRequest("gram", examples=30, batch_size=8, cache=str(tmp_path / "c"))
    grams = [s[0] for s in pool_statistics(bench, req, progress=False)]
    plain = regmean_merge(mp.base, [mp.finetuned["t0"], mp.finetuned["t1"]], grams, alpha=0.9)
    pp = regmean_plusplus(bench, req, alpha=0.9)
    for k in plain:
        torch.testing.assert_close(pp[k], plain[k])


def test_second_layer_grams_from_merged_first_layer(fixture_bench):
    bench = fixture_bench
    mp, tp = bench.modelpool, bench.taskpool
    names = tp.names
    req = StatsRequest("gram", examples=40, batch_size=16)
    out = regmean_plusplus(bench, req, alpha=0.8)
    # by hand: net.0 is plain RegMean; net.2's Gram for model i is on relu(net.0*(x_i)) of the merged net.0
    xs = []
    for t in names:
        split = tp.tasks[t].splits["train"]
        idx = example_index(len(split), 40, 0)
        xs.append(torch.tensor(np.asarray(split.inputs, dtype=np.float32)[idx]))
    g0 = [x.double().T @ x.double() / len(x) for x in xs]
    w0 = regmean_solve([mp.finetuned[t]["net.0.weight"] for t in names], g0, 0.8)
    torch.testing.assert_close(out["net.0.weight"], w0, rtol=1e-4, atol=1e-5)
    b0 = torch.stack([mp.finetuned[t]["net.0.bias"] for t in names]).mean(0)
    torch.testing.assert_close(out["net.0.bias"], b0)
    hs = [torch.relu(x @ w0.T + b0).double() for x in xs]
    w2 = regmean_solve([mp.finetuned[t]["net.2.weight"] for t in names], [h.T @ h / len(h) for h in hs], 0.8)
    torch.testing.assert_close(out["net.2.weight"], w2, rtol=1e-4, atol=1e-5)
