"""The fused CPU combine kernel gives the merge core's bits (``generalized_task_arithmetic`` on sparsified τ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.store import kernel_source, kernels
from searchmerge.store.stages import Combine, Sparse, combine, pack_mask

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")

OPS = [("none",), ("div", 0.3), ("mul", torch.tensor(1.7)), ("div", 0.9)]


def _inputs(n: int, m: int, seed: int) -> tuple[list[torch.Tensor], list[Sparse], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(m, generator=g) * 0.01 for _ in range(n)]
    # awkward values: exact zeros, negative zeros, and entries whose weighted sum cancels exactly
    taus[0][::17] = 0.0
    taus[-1][5::23] = -0.0
    if n >= 2:
        taus[1][3::29] = -taus[0][3::29]
    sparse = []
    for i, t in enumerate(taus):
        keep = torch.rand(m, generator=g) < 0.4
        sparse.append(Sparse(m, pack_mask(keep), OPS[i % len(OPS)]) if i != 2 else Sparse(m, dense=t * keep))
    return taus, sparse, torch.randn(m, generator=g)


def _fused(c: Combine, taus, sparse, base, step: int) -> torch.Tensor:
    m = base.numel()
    out = np.empty(m, dtype=np.float32)
    src = [s.dense if s.dense is not None else t for s, t in zip(sparse, taus)]
    pattern = kernels.keep_pattern([None if s.dense is not None else s.bits for s in sparse], m)
    for s0 in range(0, m, step):
        e = min(m, s0 + step)
        kernels.fused_combine_into(
            [x.numpy()[s0:e] for x in src], pattern[s0:e], [("none",) if s.dense is not None else s.op for s in sparse],
            c.weight, consensus=c.consensus, merge_func=c.merge_func, lambda_=c.lambda_, base=base.numpy()[s0:e],
            out=out[s0:e], offset=s0, numel=m,
        )
    return torch.from_numpy(out)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
@pytest.mark.parametrize(
    "consensus,merge_func",
    [(None, "sum"), (None, "mean"), ("sum", "sum"), ("sum", "mean"), ("sum", "max"), ("count", "mean"), ("count", "max")],
)
def test_fused_combine_is_bit_identical_to_core(n, consensus, merge_func):
    taus, sparse, base = _inputs(n, 10_011, seed=n)
    weights = tuple([0.7, 1.3, -0.4, 1.0, 0.25, 2.0, 0.9, 0.6, 1.1][:n])
    c = Combine(weights, 0.37, consensus, merge_func)
    want = base + combine(c, [s.chunk(t, 0, t.numel()) for s, t in zip(sparse, taus)])
    for step in (10_011, 4096, 7):  # whole, and chunks at odd offsets
        got = _fused(c, taus, sparse, base, step)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), step  # bits, signed zeros included


def test_weights_summing_to_zero_and_unit_lambda():
    taus, sparse, base = _inputs(3, 1000, seed=7)
    for c in (Combine((0.5, -0.5, 0.0), 1.0, None, "mean"), Combine((1.0, 1.0, 1.0), 1.0, "sum", "mean")):
        want = base + combine(c, [s.chunk(t, 0, t.numel()) for s, t in zip(sparse, taus)])
        assert torch.equal(_fused(c, taus, sparse, base, 1000), want)


def test_bfloat16_inputs_are_widened_exactly():
    """τ resident in bfloat16 (uint16 bit patterns) give the bits of the same τ cast to float32 first."""
    taus, sparse, base = _inputs(4, 5003, seed=11)
    sparse[2] = Sparse(5003, pack_mask(torch.rand(5003) < 0.5), ("div", 0.7))  # no dense entry: all share a dtype
    t16 = [t.to(torch.bfloat16) for t in taus]
    c = Combine((0.7, 1.3, -0.4, 1.0), 0.37, "sum", "mean")
    want = base + combine(c, [s.chunk(t.float(), 0, t.numel()) for s, t in zip(sparse, t16)])
    out = np.empty(5003, dtype=np.float32)
    kernels.fused_combine_into(
        [kernels.as_kernel_array(t) for t in t16], kernels.keep_pattern([s.bits for s in sparse], 5003),
        [s.op for s in sparse], c.weight, consensus=c.consensus, merge_func=c.merge_func, lambda_=c.lambda_,
        base=base.numpy(), out=out,
    )
    assert torch.equal(torch.from_numpy(out), want)


@pytest.mark.parametrize("residency", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("checkpoint_dtype", [torch.float32, torch.bfloat16])
def test_worker_fused_path_equals_torch_path(monkeypatch, residency, checkpoint_dtype):
    """In a shard worker (no Ray needed): the fused kernel and the chunked torch ops give the same bits, for every
    residency and checkpoint dtype (zero-copy and converting branches)."""
    from searchmerge.store.stages import to_numpy
    from searchmerge.store.worker import ShardWorker
    from tests.helpers import perturbed, tiny_state
    from tests.test_store import make_recipe

    base = {k: v.to(checkpoint_dtype) if v.is_floating_point() else v for k, v in tiny_state(0).items()}
    models = [{k: v.to(checkpoint_dtype) if v.is_floating_point() else v for k, v in perturbed(base, 0.1, seed=20 + i).items()}
              for i in range(3)]
    names = [k for k, v in base.items() if v.is_floating_point()]
    as_src = lambda sd: {k: to_numpy(v) for k, v in sd.items()}  # noqa: E731
    worker = ShardWorker(as_src(base), [as_src(m) for m in models], names, n_layers=2, residency_dtype=residency,
                         chunk_elems=64, cache_bytes=1 << 20)
    for method, scope in [("task_arithmetic", None), ("ties", "tensor"), ("dare_ties", "tensor"), ("della", None),
                          ("breadcrumbs_ties", None), ("dare_linear", None)]:
        r = make_recipe(method, scope)
        fused = worker.merge(r, [0, 1, 2], None, None)
        monkeypatch.setattr(kernels, "available", lambda: False)
        plain = worker.merge(r, [0, 1, 2], None, None)
        monkeypatch.undo()
        for k in names:
            assert np.array_equal(fused[k][1], plain[k][1]), (method, k)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generated_weighted_sum_is_bit_identical_to_torch_path(n, merge_func, dtype):
    from searchmerge.store.stages import weighted_sum_into

    taus, _, base = _inputs(n, 3001, seed=20 + n)
    taus = [t.to(dtype) for t in taus]
    c = Combine(tuple([0.7, 1.3, -0.4, 1.0, 0.25, 2.0, 0.9][:n]), 0.37, None, merge_func)
    want = weighted_sum_into(c, base, taus, torch.empty(3001))
    out = np.empty(3001, dtype=np.float32)
    kernels.weighted_sum_into([kernels.as_kernel_array(t) for t in taus], c.weight, mean=merge_func == "mean",
                              lambda_=c.lambda_, base=base.numpy(), out=out)
    assert torch.equal(torch.from_numpy(out).view(torch.int32), want.view(torch.int32))


def test_generated_source_is_written_once_and_reused(tmp_path, monkeypatch):
    """A configuration's source lands in the cache folder under its content hash; a second load reuses the file."""
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path))
    kernel_source.compiled_module.cache_clear()
    try:
        src = kernel_source.combine_source(3, True, ["none", "div", "mul"], "sum", "mean")
        fn = kernel_source.compiled(src)
        files = sorted((tmp_path / "kernels").glob("*.py"))
        assert len(files) == 1 and files[0].read_text() == src
        kernel_source.compiled_module.cache_clear()
        assert kernel_source.compiled(src) is not fn  # imported again, from the same file
        assert sorted((tmp_path / "kernels").glob("*.py")) == files
    finally:
        kernel_source.compiled_module.cache_clear()


def test_bad_kernel_inputs_are_refused():
    x = np.zeros(16, dtype=np.float32)
    with pytest.raises(ValueError):
        kernels.fused_combine_into([x], np.zeros(16, np.uint16), [("none",)], [1.0], consensus="sum",
                                   merge_func="sum", lambda_=1.0, base=x, out=x.copy())
    with pytest.raises(ValueError):
        kernels.weighted_sum_into([x, x[:8]], [1.0, 1.0], mean=False, lambda_=1.0, base=x, out=x.copy())


@pytest.mark.parametrize("n", [1, 3, 8, 9, 17])
def test_keep_pattern_bits(n):
    g = torch.Generator().manual_seed(n)
    masks = [torch.rand(37, generator=g) < 0.5 for _ in range(n)]
    bits = [None if i == 1 else pack_mask(m) for i, m in enumerate(masks)]
    p = kernels.keep_pattern(bits, 37)
    assert p.dtype == kernels.pattern_dtype(n) and p.itemsize == (1 if n <= 8 else 2 if n <= 16 else 4)
    for i, m in enumerate(masks):
        want = np.ones(37, bool) if i == 1 else m.numpy()
        assert np.array_equal((p >> i) & 1 == 1, want)


# --- torch's summation order (searchmerge/store/sumorder.py) --------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("n", list(range(1, 34)))
def test_sum_trees_are_torchs_stack_sum(n):
    """The per-column and tail trees reproduce ``stack(xs).sum(dim=0)`` bit for bit, signed zeros included."""
    from searchmerge.store.sumorder import plain_count, sum_tree, tree_eval

    g = torch.Generator().manual_seed(n)
    for c in (2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 63, 100, 1000):
        for trial in range(3):
            v = torch.randn(n, c, generator=g) * torch.logspace(-4, 4, n).view(-1, 1)[torch.randperm(n, generator=g)]
            if trial == 1:
                v[torch.rand(n, c, generator=g) < 0.5] = -0.0
            if trial == 2:
                v[torch.rand(n, c, generator=g) < 0.7] = 0.0
                v[torch.rand(n, c, generator=g) < 0.5] *= -1
            want = v.sum(0)
            pc, zero = plain_count(c), torch.zeros(())
            got = torch.empty(c)
            if pc:
                got[:pc] = tree_eval(sum_tree(n, False), list(v[:, :pc]), zero)
            if pc < c:
                got[pc:] = tree_eval(sum_tree(n, True), list(v[:, pc:]), zero)
            assert torch.equal(_bits(got), _bits(want)), (n, c, trial)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 9, 12, 17])
@pytest.mark.parametrize("consensus,merge_func", [(None, "sum"), (None, "mean"), ("sum", "sum"), ("sum", "mean")])
def test_merged_delta_bits_in_tail_columns(n, consensus, merge_func):
    """With ``base=None`` nothing absorbs a last-bit difference: the kernels' merged delta equals ``combine``'s
    bits in the per-column part and in the last ``numel % 32`` entries (where torch interleaves partial sums)."""
    g = torch.Generator().manual_seed(100 + n)
    weights = tuple(float(w) for w in torch.randn(n, generator=g))
    c = Combine(weights, 0.37, consensus, merge_func)
    for m in (2, 5, 8, 31, 33, 1000, 3001):
        taus = [torch.randn(m, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g)) for _ in range(n)]
        for t in taus:
            t[torch.rand(m, generator=g) < 0.3] = -0.0
        want = combine(c, taus)
        for step in (m, 7, 64):
            out = np.empty(m, dtype=np.float32)
            for s in range(0, m, step):
                e = min(m, s + step)
                kernels.fused_combine_into([t.numpy()[s:e] for t in taus], None, [("none",)] * n, c.weight,
                                           consensus=consensus, merge_func=merge_func, lambda_=c.lambda_, base=None,
                                           out=out[s:e], offset=s, numel=m)
            assert torch.equal(_bits(torch.from_numpy(out)), _bits(want)), (m, step)
        if consensus is None:  # task arithmetic: onto a base of -0.0, which keeps the merged delta's sign of zero
            base = torch.full((m,), -0.0)
            want_ta = base + want
            out = np.empty(m, dtype=np.float32)
            kernels.weighted_sum_into([t.numpy() for t in taus], weights, mean=merge_func == "mean", lambda_=0.37,
                                      base=base.numpy(), out=out, threads=2)
            assert torch.equal(_bits(torch.from_numpy(out)), _bits(want_ta)), m
            from searchmerge.store.stages import weighted_sum_into

            assert torch.equal(_bits(weighted_sum_into(c, base, taus, torch.empty(m), chunk=64)), _bits(want_ta)), m


def test_one_entry_tensors_of_many_models_are_refused():
    """torch sums a one-entry stack of 8+ rows as a contiguous row (another order): the kernels refuse it."""
    x = [np.ones(1, dtype=np.float32)] * 8
    with pytest.raises(ValueError, match="one-entry"):
        kernels.weighted_sum_into(x, [1.0] * 8, mean=False, lambda_=1.0, base=x[0], out=np.empty(1, np.float32))


def test_deferred_pieces_finish_by_the_end_of_the_block_and_raise_there():
    """``run_pieces(defer=True)`` inside ``deferred()`` returns at once; the block's end waits for every piece and
    re-raises a piece's error; outside a block (or without ``defer``) the call is synchronous."""
    import threading

    from searchmerge.store import threadpool

    n = 4 * threadpool.MIN_PER_THREAD
    gate = threading.Event()
    done: list[tuple[int, int]] = []

    def slow(s: int, e: int) -> None:
        gate.wait(5)
        done.append((s, e))

    with threadpool.deferred():
        assert threadpool.run_pieces(n, 2, slow, defer=True) == []
        assert done == []  # still running: the caller went on
        gate.set()
    assert sorted(done) == threadpool.split(n, 2)
    done.clear()
    threadpool.run_pieces(n, 2, slow, defer=True)  # no block: synchronous
    assert sorted(done) == threadpool.split(n, 2)

    def fail(s: int, e: int) -> None:
        raise RuntimeError(f"piece {s}")

    with pytest.raises(RuntimeError, match="piece"):
        with threadpool.deferred():
            threadpool.run_pieces(n, 2, fail, defer=True)


def test_deferred_task_arithmetic_equals_synchronous():
    """A deferred whole-tensor pass writes the same bits once its block ends."""
    from searchmerge.store import kernels, threadpool

    rng = np.random.default_rng(3)
    n = 3 * threadpool.MIN_PER_THREAD + 77
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    base = rng.standard_normal(n).astype(np.float32)
    want, got = np.empty_like(base), np.full_like(base, np.nan)
    kernels.weighted_sum_into(vals, [0.5, 1.0, -0.25], mean=False, lambda_=0.7, base=base, out=want, threads=2)
    with threadpool.deferred():
        kernels.weighted_sum_into(vals, [0.5, 1.0, -0.25], mean=False, lambda_=0.7, base=base, out=got, threads=2,
                                  defer=True)
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("kind", ["random", "della"])
def test_narrow_draws_equal_wide_draws(kind):
    """The uint32-induction draws (indices below 2**32) are the int64-index draws, up to the last index below 2**32."""
    from searchmerge.store.kernel_source import combine_kernel

    rng = np.random.default_rng(5)
    n, m = 4099, 3
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(m)]
    base = rng.standard_normal(n).astype(np.float32)
    u32 = lambda a: np.array(a, dtype=np.uint32)  # noqa: E731
    args = [u32([0] * m), u32([0xFFFFFFFF] * m), u32([11, 12, 13]), u32([0xFFFFFFF0, 7, 1 << 31]),
            u32([1 << 23, 1 << 22, 3 << 22])]
    extra = ([rng.integers(0, 4096, n).astype(np.uint16) for _ in range(m)]
             + [np.array([0.3, 0.2, 0.4], np.float32), np.array([0.1, 0.05, 0.2], np.float32), np.float32(4095)]
             if kind == "della" else [])
    tail = [np.array([0.5, 0.4, 0.6], np.float32), np.array([1.0, 0.7, -0.3], np.float32), np.float32(1.4),
            np.float32(0.6), base]
    for j0 in (0, (1 << 31) + 5, (1 << 32) - n):
        outs = []
        for narrow in (False, True):
            out = np.empty(n, np.float32)
            combine_kernel(m, False, ("div",) * m, "sum", "sum", (kind,) * m, True, False, narrow=narrow)(
                *vals, *args, np.int64(j0), *extra, *tail, out)
            outs.append(out)
        assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), j0
