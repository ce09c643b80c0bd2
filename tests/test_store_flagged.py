"""The flagged pass: a new trim density in one fused pass (cuts found from the entries of their histogram bins, listed
as the pass goes), bit for bit with the merge core and with the scan-then-pass path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.store import kernels, ranks, rankscan, threadpool
from searchmerge.store.kernel_source import FLAG_BLOCK
from searchmerge.store.stages import Combine, combine
from searchmerge.store.sumorder import plain_count
from tests.test_store_density import _awkward, _bits_equal, _core

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")

METHODS = ("magnitude", "magnitude_outliers")


def _flagged(c: Combine, method: str, taus, densities, rescale, base, *, gamma=0.01, threads=1, based=True):
    """The flagged pass over whole tensors; also checks that its cuts are the scan's."""
    arrays = [kernels.as_kernel_array(t) for t in taus]
    hists = [rankscan.histogram(a) for a in arrays]
    pending = [ranks.stage_pending(method, d, gamma, h) for d, h in zip(densities, hists)]
    ops = [("div", d) if rescale == "inverse" and 0 < d < 1 else ("none",) for d in densities]  # as _trim_ops
    seen = []

    def resolve(at, values):
        assert len(at) == values.shape[1] and np.all(np.diff(at) > 0)
        seen.append(len(at))
        return [ranks.stage_keep(method, d, gamma, values[m], hists[m], at) for m, d in enumerate(densities)]

    out = np.empty(base.numel(), dtype=np.float32)
    cuts = kernels.flagged_combine_into(arrays, pending, resolve, ops, c.weight, consensus=c.consensus,
                                        merge_func=c.merge_func, lambda_=c.lambda_,
                                        base=base.numpy() if based else None, out=out, threads=threads)
    scanned = [ranks.stage_keep(method, d, gamma, a, h) for d, a, h in zip(densities, arrays, hists)]
    for got, want in zip(cuts, scanned):
        assert got.rule == want.rule and got.lo == want.lo and got.hi == want.hi
        assert np.array_equal(got.fix, want.fix)
    assert seen and seen[0] <= sum(p.size for p in pending)
    return torch.from_numpy(out)


@pytest.mark.parametrize("n_models", [1, 2, 4, 5])
@pytest.mark.parametrize("consensus,merge_func", [(None, "sum"), ("sum", "sum"), ("sum", "mean"), ("sum", "max"),
                                                  (None, "mean")])
def test_flagged_pass_is_bit_identical_to_core(n_models, consensus, merge_func):
    """Many blocks, a tail in torch's other sum order, ties and signed zeros, densities 0…1, 1 and 2 threads."""
    g = torch.Generator().manual_seed(100 + n_models)
    m = 3 * FLAG_BLOCK + 2 * 65_536 + 21  # several blocks, two thread pieces, a 21-entry tail
    taus = [_awkward(m, i % 4, g) for i in range(n_models)]
    if n_models >= 2:
        taus[1][3::29] = -taus[0][3::29]  # exact cancellations in the sign election
    base = torch.randn(m, generator=g)
    c = Combine(tuple([0.7, 1.3, -0.4, 1.0, 0.25][:n_models]), 0.37, consensus, merge_func)
    for method in METHODS:
        for rescale in ("none", "inverse"):
            for d in (0.0, 1e-5, 0.3, 0.9, 1.0):
                densities = [d, 1.0, 0.2, 0.6, 0.05][:n_models]
                want = _core(c, method, taus, densities, rescale, base, gamma=0.05)
                for threads in (1, 2):
                    got = _flagged(c, method, taus, densities, rescale, base, gamma=0.05, threads=threads)
                    assert _bits_equal(got, want), (method, rescale, d, threads)


def test_flagged_merged_delta_and_bfloat16():
    """``base=None`` (the unit-weight cache's delta) and bf16 task vectors (listed widened to float32)."""
    g = torch.Generator().manual_seed(12)
    m = 2 * FLAG_BLOCK + 77
    taus = [_awkward(m, 2, g).to(torch.bfloat16) for _ in range(3)]
    c = Combine((1.0, 1.0, 1.0), 1.0, "sum", "sum")
    for method in METHODS:
        for d in (0.1, 0.5):
            want = combine(c, [torch.from_numpy(np.asarray(x)) for x in [
                __import__("searchmerge.methods.sparsify", fromlist=["sparsify"]).sparsify(
                    t.float(), method=method, density=d, gamma=0.02) for t in taus]])
            got = _flagged(c, method, taus, [d] * 3, "none", torch.zeros(m), gamma=0.02, based=False)
            assert _bits_equal(got, want), (method, d)


def _one_bin(m: int, g: torch.Generator) -> torch.Tensor:
    """Every |x| in one histogram bin (0.5 ≤ |x| < 0.5 + 2^-9), a third of them tied, random signs and ±0 never."""
    x = 0.5 + torch.randint(0, 4, (m,), generator=g).float() * 2.0**-12
    x[::3] = 0.5
    return x * (torch.randint(0, 2, (m,), generator=g).float() * 2 - 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_flagged_edge_cases(threads):
    """All entries in one bin (every entry undecided), the cut exactly at a bin edge (nothing undecided to
    resolve in that model), ties across the cut, and undecided entries right at block, thread-piece and tail
    boundaries."""
    g = torch.Generator().manual_seed(3)
    m = 2 * 65_536 + 3 * FLAG_BLOCK + 29
    c = Combine((0.9, 1.1, 0.6), 0.5, "sum", "sum")
    base = torch.randn(m, generator=g)
    one_bin = _one_bin(m, g)
    two_bins = torch.where(torch.arange(m) % 2 == 0, 1.0, 0.25) * torch.sign(torch.randn(m, generator=g))
    sparse = torch.full((m,), 2.0**-20)  # far below: the boundaries below hold the cut's bin
    at = [FLAG_BLOCK - 1, FLAG_BLOCK, 2 * FLAG_BLOCK - 1, *(s for s, _ in threadpool.split(m, 2)), plain_count(m) - 1,
          plain_count(m), m - 1]
    sparse[at] = torch.tensor([0.5, -0.5, 0.5, 0.75, -0.75, 0.5, 0.5, -0.5][: len(at)])
    taus = [one_bin, two_bins, sparse]
    for method in METHODS:
        for d in (0.0, 0.5, 0.5 + 1 / m, 3 / m, 1.0):
            want = _core(c, method, taus, [d] * 3, "none", base, gamma=0.1)
            got = _flagged(c, method, taus, [d] * 3, "none", base, gamma=0.1, threads=threads)
            assert _bits_equal(got, want), (method, d)


def test_flagged_inputs_are_checked():
    x = np.zeros(64, dtype=np.float32)
    with pytest.raises(ValueError):
        kernels.flagged_combine_into([x, x], [ranks.Pending()], lambda at, v: [], [("none",)] * 2, [1.0, 1.0],
                                     consensus="sum", merge_func="sum", lambda_=1.0, base=x, out=x.copy())


def test_worker_takes_the_flagged_pass_for_new_densities(monkeypatch):
    """In a shard worker: a new density goes through the flagged pass (no scan), a revisited one through the cached
    cuts; both give the bits of the scan-then-pass path."""
    from searchmerge.store import cutpaths
    from searchmerge.store.stages import to_numpy
    from searchmerge.store.worker import ShardWorker
    from tests.test_store_density import STORE_CASES, _recipe, _tied_zoo

    base, models = _tied_zoo()
    names = [k for k, v in base.items() if v.is_floating_point()]
    as_src = lambda sd: {k: to_numpy(v) for k, v in sd.items()}  # noqa: E731
    worker = ShardWorker(as_src(base), [as_src(m) for m in models], names, n_layers=2, cache_bytes=1 << 30, threads=2)
    calls = []
    real = kernels.flagged_combine_into
    monkeypatch.setattr(kernels, "flagged_combine_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [(m, p, w) for m, p, w in STORE_CASES if p.get("trim_scope") != "model" and not m.startswith("dare")]
    runs = [_recipe(method, d, weights, **params) for method, params, weights in cases
            for d in (0.1, [0.8, 0.2, 0.5, 1.0, 0.9], 0.1)]
    flagged = [worker.merge(r, range(5), None, None) for r in runs]
    stages = 4  # TIES (3 cases: the stage does not depend on weights), TIES inverse, two breadcrumbs gammas
    assert len(calls) == len(names) * 2 * stages  # new densities only: the revisited one used its cached cuts
    monkeypatch.setattr(cutpaths.CutPaths, "_flaggable", lambda *a: False)
    worker.clear_cache()
    for r, got in zip(runs, flagged):
        scanned = worker.merge(r, range(5), None, None)
        for k in names:
            assert np.array_equal(got[k][1], scanned[k][1]), (r.method, k)


@pytest.mark.parametrize("residency", ["float32", "bfloat16"])
def test_worker_whole_model_trim_in_flagged_passes(monkeypatch, residency):
    """One shard given the thresholds' bins (``PendingTrim``, as the driver sends with one actor): the flagged passes
    find the thresholds from the listed low bits and give the bits of the scan's thresholds — and of the merge core
    (float32 residency) — for scalar and per-model densities (1 included), extreme ones, weights and ``max``; a
    revisited density takes the cached thresholds and the plain fused pass."""
    from searchmerge.merge import merge as core_merge
    from searchmerge.recipe import global_scalars
    from searchmerge.store.modeltrim import pending_trim
    from searchmerge.store.stages import to_numpy, trim_stage
    from searchmerge.store.worker import ShardWorker
    from tests.test_store_density import MODELS, _recipe, _tied_zoo

    base, models = _tied_zoo()
    names = [k for k, v in base.items() if v.is_floating_point()]
    as_src = lambda sd: {k: to_numpy(v) for k, v in sd.items()}  # noqa: E731
    worker = ShardWorker(as_src(base), [as_src(m) for m in models], names, n_layers=2, residency_dtype=residency,
                         cache_bytes=1 << 30, threads=2)
    calls = []
    real = kernels.flagged_pass
    monkeypatch.setattr(kernels, "flagged_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    sel = range(len(MODELS))
    runs = [(0.1, None, "sum"), ([0.8, 0.2, 0.5, 1.0, 0.9], [0.7, 0.4, 1.1, 0.2, 0.9], "max"), (1e-4, None, "sum"),
            (0.999, [0.7, 0.4, 1.1, -0.3, 0.9], "mean"), (0.1, None, "sum")]
    for i, (d, weights, merge_func) in enumerate(runs):
        r = _recipe("ties", d, weights, merge_func=merge_func, trim_scope="model")
        stage, densities = trim_stage(r.spec, global_scalars(r), r.seed)
        pending, _ = pending_trim(worker.trim_hist(stage, sel), worker.numel(), densities)
        before = len(calls)
        got = worker.merge(r, sel, pending, None)
        assert len(calls) - before == (0 if i == len(runs) - 1 else len(names))  # the last revisits the first
        scanned = worker.merge(r, sel, {"thresholds": worker._scanned_trim(sel, pending)}, None)
        core = core_merge(r, base=base, models=models) if residency == "float32" else None
        for k in names:
            assert np.array_equal(got[k][1], scanned[k][1]), (d, k)
            if core is not None:
                assert np.array_equal(got[k][1].view(np.int32), core[k].numpy().view(np.int32)), (d, k)
