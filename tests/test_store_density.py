"""A new trim density costs a threshold lookup plus one fused pass, and gives the merge core's bits (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.methods.sparsify import magnitude_mask, outlier_mask, sparsify
from searchmerge.store import kernels, ranks, rankscan, threadpool
from searchmerge.store.stages import Combine, combine

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")

DENSITIES = [1e-4, 0.01, 0.1, 0.2, 0.3333, 0.5, 0.77, 0.9, 0.999, 1.0]


def _awkward(n: int, kind: int, g: torch.Generator) -> torch.Tensor:
    """Task-vector-like values: continuous, heavy magnitude ties with signed zeros, bf16-rounded, mixed."""
    if kind == 0:
        return torch.randn(n, generator=g) * 0.01
    if kind == 1:
        return torch.randint(-5, 6, (n,), generator=g).float() * 0.125
    if kind == 2:
        return (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()
    x = torch.randn(n, generator=g)
    x[::3] = 0.0
    x[1::7] = -0.0
    x[2::5] = -1.5
    x[4::11] = 1.5
    return x


def _array(t: torch.Tensor) -> np.ndarray:
    return kernels.as_kernel_array(t)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_keep_rules_equal_the_core_masks(kind):
    """Per-tensor top-k (TIES) and breadcrumbs' band, from the histogram + one bin scan, equal sparsify's masks."""
    g = torch.Generator().manual_seed(kind)
    for n in (1, 2, 7, 64, 1000, 4099):
        x = _awkward(n, kind, g)
        for t in (x, x.to(torch.bfloat16)) if kind == 2 else (x,):
            arr = _array(t)
            hist = rankscan.histogram(arr)
            assert hist.n == n and hist.finite and int(hist.cum[-1]) == n
            for d in DENSITIES:
                want = magnitude_mask(t.float(), d).bool().numpy()
                cut = ranks.stage_keep("magnitude", d, 0.0, arr, hist)
                for exact in (True, False):  # the rule, and the kernels' thresholds + listed ties
                    assert (ranks.keep_mask(arr, cut, exact=exact) == want).all(), (n, d, exact)
                for gamma in (0.0, 0.01, 0.05, 0.3):
                    want = outlier_mask(t.float(), d, gamma).bool().numpy()
                    cut = ranks.stage_keep("magnitude_outliers", d, gamma, arr, hist)
                    for exact in (True, False):
                        assert (ranks.keep_mask(arr, cut, exact=exact) == want).all(), (n, d, gamma, exact)


def test_non_finite_values_are_flagged():
    x = torch.tensor([0.1, float("inf"), -0.2])
    assert not rankscan.histogram(x.numpy()).finite
    assert rankscan.histogram(torch.tensor([0.1, -0.2]).numpy()).finite


def test_threshold_rule_is_the_whole_model_compare():
    g = torch.Generator().manual_seed(5)
    x = _awkward(5000, 3, g)
    for thr in (0.0, 0.5, 1.5, float(x.abs().max()), 7.0):
        for exact in (True, False):
            got = ranks.keep_mask(x.numpy(), ranks.threshold_keep(thr, 5000), exact=exact)
            assert (got == (x.abs() >= thr).numpy()).all(), thr


def _core(c: Combine, method: str, taus, densities, rescale, base, gamma=0.01):
    sparse = [sparsify(t, method=method, density=d, rescale=rescale, gamma=gamma) for t, d in zip(taus, densities)]
    return base + combine(c, sparse)


def _fused(c: Combine, method: str, taus, densities, rescale, base, *, gamma=0.01, step=None, threads=1,
           based=True):
    m = base.numel()
    arrays = [_array(t) for t in taus]
    keeps = [ranks.stage_keep(method, d, gamma, a, rankscan.histogram(a)) for a, d in zip(arrays, densities)]
    ops = [("div", d) if rescale == "inverse" and 0 < d < 1 else ("none",) for d in densities]  # as _trim_ops
    out = np.empty(m, dtype=np.float32)
    step = step or m
    for s in range(0, m, step):
        e = min(m, s + step)
        kernels.fused_combine_into(
            [a[s:e] for a in arrays], None, ops, c.weight, consensus=c.consensus, merge_func=c.merge_func,
            lambda_=c.lambda_, base=base.numpy()[s:e] if based else None, out=out[s:e], cuts=keeps, offset=s, numel=m,
            threads=threads,
        )
    return torch.from_numpy(out)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("n_models", [1, 2, 4, 5])
@pytest.mark.parametrize("consensus,merge_func", [(None, "sum"), ("sum", "sum"), ("sum", "mean"), ("sum", "max"),
                                                  (None, "mean")])
def test_fused_pass_with_cuts_is_bit_identical_to_core(n_models, consensus, merge_func):
    g = torch.Generator().manual_seed(n_models)
    m = 3001
    taus = [_awkward(m, i % 4, g) for i in range(n_models)]
    if n_models >= 2:
        taus[1][3::29] = -taus[0][3::29]  # exact cancellations in the sign election
    base = torch.randn(m, generator=g)
    weights = tuple([0.7, 1.3, -0.4, 1.0, 0.25][:n_models])
    c = Combine(weights, 0.37, consensus, merge_func)
    for method in ("magnitude", "magnitude_outliers"):
        for rescale in ("none", "inverse"):
            for d in (0.05, 0.3, 0.5, 0.9, 1.0):
                densities = [d, 1.0, 0.2, 0.6, d][:n_models]
                want = _core(c, method, taus, densities, rescale, base, gamma=0.05)
                for step, threads in ((None, 1), (1000, 1), (7, 1), (None, 2)):
                    got = _fused(c, method, taus, densities, rescale, base, gamma=0.05, step=step, threads=threads)
                    assert _bits_equal(got, want), (method, rescale, d, step, threads)


def test_merged_delta_alone_and_bfloat16_inputs():
    """``base=None`` writes ``combine(…)·λ`` (what the unit-weight cache holds); bf16 τ are widened exactly."""
    g = torch.Generator().manual_seed(11)
    m = 2000
    taus = [_awkward(m, 2, g).to(torch.bfloat16) for _ in range(3)]
    c = Combine((1.0, 1.0, 1.0), 1.0, "sum", "sum")
    want = combine(c, [sparsify(t.float(), method="magnitude", density=0.3) for t in taus])
    got = _fused(c, "magnitude", taus, [0.3] * 3, "none", torch.zeros(m), based=False)
    assert _bits_equal(got, want)


def test_threads_split_in_aligned_pieces():
    for n, t in ((10, 2), (1 << 17, 2), ((1 << 17) + 5, 2), (10**6, 3), (0, 2)):
        pieces = threadpool.split(n, t)
        assert pieces[0][0] == 0 and pieces[-1][1] == n and len(pieces) <= max(1, t)
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert all(s % 64 == 0 for s, _ in pieces)


# --- the store: a new density every trial --------------------------------------------------------------

MODELS = ["a", "b", "c", "d", "e"]


def _tied_zoo(n_models: int = 5, dtype: torch.dtype = torch.float32):
    """Five fine-tunes whose task vectors repeat magnitudes exactly (multiples of 1/32, many zeros) or are
    continuous, with tensors big enough to split across threads and sizes that leave a tail for torch's sum."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (10, 6), "layers.0.w": (6, 6), "layers.0.b": (6,), "layers.1.w": (33, 7),
              "layers.1.b": (1,), "big.w": (140_001,)}
    base = {k: torch.round(torch.randn(s, generator=g) * 64) / 64 for k, s in shapes.items()}
    models = []
    for i in range(n_models):
        if i % 2 == 0:
            m = {k: v + torch.round(torch.randn(v.shape, generator=g) * 4) / 32 for k, v in base.items()}
        else:
            m = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        models.append(m)
    base["position_ids"] = torch.arange(10)
    for m in models:
        m["position_ids"] = torch.arange(10)
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(m) for m in models]


def _recipe(method: str, density, weights=None, **params):
    from searchmerge.recipe import recipe_from_dict

    dens = density if isinstance(density, list) else [density] * len(MODELS)
    models = []
    for i, name in enumerate(MODELS):
        mp = {"density": dens[i]}
        if weights is not None:
            mp["weight"] = weights[i]
        models.append({"model": name, "parameters": mp})
    return recipe_from_dict({"method": method, "base_model": "base", "models": models, "seed": 7,
                             "parameters": {"lambda": 0.8, **params}})


#: (method, extra parameters, per-model weights or None)
STORE_CASES = [
    ("ties", {"merge_func": "sum"}, None),
    ("ties", {"merge_func": "mean"}, [0.7, 0.4, 1.1, -0.3, 0.9]),
    ("ties", {"merge_func": "sum", "trim_scope": "model"}, None),
    ("ties", {"merge_func": "max", "trim_scope": "model"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
    ("ties", {"merge_func": "sum", "rescale": "inverse"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
    ("ties", {"merge_func": "sum"}, [[0.7, 1.2], 0.4, 1.1, [0.2, -0.1, 0.5], 0.9]),  # weight gradients
    ("breadcrumbs", {"gamma": 0.05}, None),
    ("breadcrumbs_ties", {"gamma": 0.02}, [0.7, 0.4, 1.1, 0.2, 0.9]),
    ("dare_ties", {"rescale": "inverse"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
]
#: DARE's random masks inside the fused pass (L1 rescale: torch sums the masked |τ| a kernel writes)
DARE_CASES = [
    ("dare_ties", {"rescale": "l1"}, None),
    ("dare_ties", {"rescale": "none", "merge_func": "mean"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
    ("dare_linear", {"rescale": "l1"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
    ("dare_linear", {"rescale": "inverse", "normalize": True}, None),
]
#: DELLA: draws against rank-dependent probabilities inside the fused pass (ranks cached per tensor and model)
DELLA_CASES = [
    ("della", {"epsilon": 0.01}, None),
    ("della_linear", {"epsilon": 0.01, "rescale": "inverse"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
]
#: scalars, per-model values and depth gradients (MergeKit's lists: a new value per layer, every trial)
DENSITY_RUN = [0.1, 0.37, 0.1, [0.8, 0.2, 0.5, 0.05, 0.9], 0.37, [[0.15, 0.6, 0.3]] * 5, 0.37, 0.05,
               [[0.9, 0.1], 0.4, [0.2, 0.5, 0.7], 0.05, [0.3, 0.31]]]


@pytest.mark.slow  # ~40 s with a cold kernel cache (every configuration compiles once), ~6 s warm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("num_actors,threads", [(1, 1), (2, 2)], ids=["1actor", "2actors-2threads"])
def test_new_density_every_trial_matches_core(ray_session, num_actors, threads):
    """Trials that change the density (and revisit densities, which keeps a merged delta) give the merge core's
    tensors bit for bit, for TIES per tensor and whole model, breadcrumbs and DARE (new seeds too), with and
    without per-model weights. The actors' 2 threads split the kernels; torch's sums run on 1 thread (L1 rescale
    factors are whole-tensor sums, whose bits follow torch's thread count, as in the core)."""
    from searchmerge.merge import merge as core_merge
    from searchmerge.recipe import recipe_from_dict
    from tests.test_store import assert_same, build_store

    base, models = _tied_zoo()
    with build_store(base, models, names=MODELS, num_actors=num_actors, threads_per_actor=threads,
                     cache_fraction=1.0) as s:
        for method, params, weights in STORE_CASES + DARE_CASES + DELLA_CASES:
            for i, d in enumerate(DENSITY_RUN):
                if params.get("trim_scope") == "model" and isinstance(d, list) and any(isinstance(x, list) for x in d):
                    continue  # a whole-model trim takes one density per model (gradients refused by the recipe)
                r = _recipe(method, d, weights, **params).with_parameters(**{"lambda": 0.3 + 0.1 * i})
                if method.startswith(("dare", "della")) and i % 2:
                    r = recipe_from_dict({**r.to_dict(), "seed": 100 + i})  # a new seed too
                assert_same(s.merge(r), core_merge(r, base=base, models=models), exact=True)
        st = s.stats()
        assert sum(a["order_stats_bytes"] for a in st["actors"]) > 0


@pytest.mark.timeout(300)
def test_bfloat16_checkpoints_new_density_matches_core(ray_session):
    from searchmerge.merge import merge as core_merge
    from tests.test_store import assert_same, build_store

    base, models = _tied_zoo(dtype=torch.bfloat16)
    with build_store(base, models, names=MODELS) as s:
        for method, params, weights in STORE_CASES[:4]:
            for d in (0.2, 0.6):
                r = _recipe(method, d, weights, **params)
                assert_same(s.merge(r), core_merge(r, base=base, models=models), exact=True)


@pytest.mark.slow  # ~40 s with a cold kernel cache, ~5 s warm
@pytest.mark.parametrize("residency", ["float32", "bfloat16"])
def test_ranked_path_equals_mask_path_in_a_worker(monkeypatch, residency):
    """In a shard worker (no Ray): cut rules give the bits of the cached-mask path for every residency
    (bf16 residency is not the core's float32 τ, so the two store paths are compared with each other)."""
    from searchmerge.store.paths import MergePaths
    from searchmerge.store.stages import to_numpy
    from searchmerge.store.worker import ShardWorker

    base, models = _tied_zoo()
    names = [k for k, v in base.items() if v.is_floating_point()]
    as_src = lambda sd: {k: to_numpy(v) for k, v in sd.items()}  # noqa: E731
    worker = ShardWorker(as_src(base), [as_src(m) for m in models], names, n_layers=2, residency_dtype=residency,
                         cache_bytes=1 << 30, threads=2)
    runs = [(_recipe(method, d, weights, **params), method, d) for method, params, weights in
            STORE_CASES[:2] + STORE_CASES[4:] + DARE_CASES for d in (0.1, [0.8, 0.2, 0.5, 1.0, 0.9])]
    ranked = [worker.merge(r, range(5), None, None) for r, _, _ in runs]
    kinds = {key[0] for key in worker.cache.items}
    assert "keeps" in kinds and not kinds & {"sparse", "pattern"}, kinds  # cut rules only: no masks were built
    monkeypatch.setattr(MergePaths, "_cut_stage", lambda *a: False)
    for got, (r, method, d) in zip(ranked, runs):
        masked = worker.merge(r, range(5), None, None)
        for k in names:
            assert np.array_equal(got[k][1], masked[k][1]), (method, d, k)


@pytest.mark.timeout(300)
def test_della_fused_matches_core_in_a_worker(monkeypatch):
    """DELLA / DELLA-linear with a new density, epsilon, rescale, weights and seed every trial: the fused pass
    (cached within-row ranks, draws against the rank-dependent probability, L1 factors) gives the core's bits,
    builds no mask, and sorts each tensor of each model once (rows of 1 entry, 1-D rows, density 1 models)."""
    from searchmerge.merge import merge as core_merge
    from searchmerge.recipe import recipe_from_dict
    from searchmerge.store.stages import to_numpy
    from searchmerge.store.worker import ShardWorker

    base, models = _tied_zoo()
    base["col.w"] = torch.randn(9, 1)  # rows of one entry: the core's rank 0/0 keeps nothing
    for i, m in enumerate(models):
        m["col.w"] = base["col.w"] + 0.1 * torch.randn(9, 1, generator=torch.Generator().manual_seed(i))
    names = [k for k, v in base.items() if v.is_floating_point()]
    as_src = lambda sd: {k: to_numpy(v) for k, v in sd.items()}  # noqa: E731
    worker = ShardWorker(as_src(base), [as_src(m) for m in models], names, n_layers=2, cache_bytes=1 << 30,
                         threads=2)
    cases = [("della", {"epsilon": 0.01}, None),
             ("della", {"epsilon": 0.04, "rescale": "none", "merge_func": "sum"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
             ("della_linear", {"epsilon": 0.03, "rescale": "inverse"}, [0.7, 0.4, 1.1, 0.2, 0.9]),
             ("della_linear", {"epsilon": 0.02, "rescale": "l1", "normalize": True}, None)]
    trials = 0
    for method, params, weights in cases:
        for i, d in enumerate((0.1, 0.37, [0.8, 0.2, 0.5, 1.0, 0.9], [[0.15, 0.6, 0.3]] * 5)):
            r = _recipe(method, d, weights, **params)
            r = recipe_from_dict({**r.to_dict(), "seed": 11 + i})
            got = worker.merge(r, range(5), None, None)
            ref = core_merge(r, base=base, models=models)
            for k in names:
                assert np.array_equal(got[k][1].view(np.uint32), ref[k].numpy().view(np.uint32)), (method, d, k)
            trials += 1
    assert {key[0] for key in worker.cache.items} == {"keeps"}  # cut rules only: no masks were built
    ranked = [key for key in worker.order_stats if key[0] == "della_ranks"]
    assert len(ranked) == len(names) * 5 and trials == 16
    # where torch's sum order is not known, the L1 factors sum a written masked |τ| with torch: the same bits
    from searchmerge.store import torchsum

    monkeypatch.setattr(torchsum, "order_known", lambda: False)
    worker.clear_cache()
    for method, params, weights in (cases[0], cases[3]):
        r = _recipe(method, [0.3, 0.6, 0.2, 0.5, 0.4], weights, **params)
        got = worker.merge(r, range(5), None, None)
        ref = core_merge(r, base=base, models=models)
        for k in names:
            assert np.array_equal(got[k][1].view(np.uint32), ref[k].numpy().view(np.uint32)), (method, k)


@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (64, 96), (2, 70_001), (9, 1), (0, 4)])
def test_store_row_ranks_are_the_cores(shape):
    """The store's key sort gives ``sparsify.row_ranks``'s integers (stable ties, ±0 alike, NaN and inf last) for
    float32 and bfloat16 task vectors; uint16 up to 65,536 columns, int32 past."""
    from searchmerge.methods.sparsify import row_ranks as core_ranks
    from searchmerge.store.rowranks import row_ranks

    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = torch.round(torch.randn(shape, generator=g) * 8) / 256  # many ties
    flat = x.view(-1)
    if flat.numel() >= 12:
        flat[:3], flat[3:6], flat[7], flat[9], flat[10] = 0.0, -0.0, float("nan"), float("inf"), -float("inf")
    for t in (x, x.to(torch.bfloat16)):
        want = core_ranks(t.to(torch.float32).abs()).reshape(-1).numpy()
        arr = t.reshape(-1).numpy() if t.dtype == torch.float32 else t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        got = row_ranks(arr, shape[1])
        assert got.dtype == (np.uint16 if shape[1] <= 1 << 16 else np.int32)
        assert np.array_equal(got.astype(np.int64), want), (shape, t.dtype)


def test_lru_keeps_costly_entries():
    """Cheap entries (masks, merged deltas) never evict a costly one (a TSV-M unit-scale result); the reverse can."""
    from searchmerge.store.paths import COSTLY, LRU

    c = LRU(100)
    c.put("final", "svd", 60, COSTLY)
    c.new_trial()
    c.put("mask1", "m", 30)
    c.new_trial()
    c.put("mask2", "m", 30)  # would need the costly entry's room: mask1 goes, final stays
    assert "final" in c.items and "mask2" in c.items and "mask1" not in c.items
    c.new_trial()
    c.put("mask3", "m", 50)  # only by evicting final: refused
    assert "final" in c.items and "mask3" not in c.items
    c.new_trial()
    c.put("final2", "svd", 70, COSTLY)  # a costly entry may evict anything older
    assert set(c.items) == {"mask2", "final2"} and c.bytes == 100


# --- the counter-based generator of DARE / DELLA masks ------------------------------------------------


def test_counter_draws_are_the_kernels_draws():
    """The merge core's draws (torch int64) and the kernels' (numba uint32) are the same integers, at any offset."""
    import numba

    from searchmerge.methods.sparsify import counter_draws
    from searchmerge.store.kernels_support import counter24

    @numba.njit
    def draws(k1, k2, start, out):
        for j in range(len(out)):
            out[j] = counter24(k1, k2, start + j)

    for key, start in [((5, 7), 0), ((0xFFFFFFFF, 0x12345678), (1 << 32) - 1000), ((123, 0), 3 << 33)]:
        out = np.empty(5000, dtype=np.uint32)
        draws(np.uint32(key[0]), np.uint32(key[1]), np.int64(start), out)
        assert np.array_equal(out.astype(np.int64), counter_draws(key, start, start + 5000).numpy())


def test_random_masks_keep_density_and_differ_per_model_and_seed():
    from searchmerge.merge import tensor_rng
    from searchmerge.methods.sparsify import DRAW_BITS, keep_threshold, random_mask

    x = torch.ones(400_000)
    for d in (0.05, 0.3, 0.5, 0.9):
        assert abs(random_mask(x, d, tensor_rng(1, "w")).mean().item() - d) < 0.005
        t = keep_threshold(d)  # u < t exactly where u / 2**24 < d
        assert (t - 1) / 2**DRAW_BITS < d <= t / 2**DRAW_BITS
    rng = tensor_rng(1, "w")
    a, b = random_mask(x, 0.5, rng), random_mask(x, 0.5, rng)  # two models of one tensor
    c = random_mask(x, 0.5, tensor_rng(2, "w"))
    for other in (b, c):
        assert abs((a == other).float().mean().item() - 0.5) < 0.005
    assert torch.equal(a, random_mask(x, 0.5, tensor_rng(1, "w")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_masks_are_the_same_on_cuda():
    from searchmerge.merge import tensor_rng
    from searchmerge.methods.sparsify import della_mask, random_mask

    x = torch.randn(70_001)
    for d in (0.1, 0.5):
        assert torch.equal(random_mask(x, d, tensor_rng(3, "w")), random_mask(x.cuda(), d, tensor_rng(3, "w")).cpu())
        assert torch.equal(della_mask(x.reshape(7, -1), d, 0.05, tensor_rng(3, "w")),
                           della_mask(x.reshape(7, -1).cuda(), d, 0.05, tensor_rng(3, "w")).cpu())
