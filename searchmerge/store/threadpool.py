"""Work split across the threads a store actor is given (``threads_per_actor``): the fused kernels' pieces of a
tensor and the per-model rank work. numba releases the GIL, so a thread pool runs them in parallel; the kernels are
elementwise, so the bits do not depend on the split (tested with 2 threads)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Sequence

#: below this many entries per thread a tensor runs on the calling thread (a pool hand-off costs ~50 µs)
MIN_PER_THREAD = 1 << 16
_pools: dict[int, ThreadPoolExecutor] = {}


def split(n: int, threads: int) -> list[tuple[int, int]]:
    """``[0, n)`` in at most ``threads`` contiguous pieces of at least :data:`MIN_PER_THREAD` entries (multiples
    of 64, so pieces start on cache lines and packed masks stay byte-aligned)."""
    parts = max(1, min(int(threads), n // MIN_PER_THREAD))
    step = (-(-n // parts) + 63) // 64 * 64 if parts > 1 else n
    return [(s, min(n, s + step)) for s in range(0, n, max(step, 1))] or [(0, 0)]


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="searchmerge-kernel")
    return pool


def map_threads(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``threads`` threads (for GIL-releasing work such as the rank scans)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(threads).map(fn, items))


_batch: ContextVar[list[Future] | None] = ContextVar("searchmerge_deferred", default=None)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, :func:`run_pieces` calls made with ``defer=True`` return at once and their pieces run on
    the pool while the caller prepares the next tensor; the block's end waits for all of them (re-raising the first
    error). Why: a trial is a sequence of per-tensor passes, and waiting after each leaves the pool's threads idle —
    on a virtual machine an idle core takes ~0.1 ms to wake, paid twice per tensor. Only for results nothing reads
    before the block ends (a merge straight into its destination)."""
    futures: list[Future] = []
    token = _batch.set(futures)
    try:
        yield
    finally:
        _batch.reset(token)
        errors = [f.exception() for f in futures]  # waits for every piece, even after an error in the block
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first


def run_pieces(n: int, threads: int, fn: Callable[[int, int], Any], defer: bool = False) -> list[Any]:
    """``fn(start, stop)`` over :func:`split` pieces, on a pool of ``threads`` (the kernels release the GIL).
    Elementwise kernels give the same bits however they are split. ``defer`` inside :func:`deferred`: submit the
    pieces and return ``[]`` (they finish by the block's end)."""
    pieces = split(n, threads)
    if len(pieces) == 1:
        return [fn(*pieces[0])]
    batch = _batch.get() if defer else None
    if batch is not None:
        pool = _pool(threads)
        batch.extend(pool.submit(fn, *se) for se in pieces)
        return []
    return list(_pool(threads).map(lambda se: fn(*se), pieces))
