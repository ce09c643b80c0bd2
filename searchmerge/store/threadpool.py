"""Work split across the threads a store actor is given (``threads_per_actor``): the fused kernels' pieces of a
tensor and the per-model rank work. numba releases the GIL, so a thread pool runs them in parallel; the kernels are
elementwise, so the bits do not depend on the split (tested with 2 threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

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


def run_pieces(n: int, threads: int, fn: Callable[[int, int], Any]) -> list[Any]:
    """``fn(start, stop)`` over :func:`split` pieces, on a pool of ``threads`` (the kernels release the GIL).
    Elementwise kernels give the same bits however they are split."""
    pieces = split(n, threads)
    if len(pieces) == 1:
        return [fn(*pieces[0])]
    return list(_pool(threads).map(lambda se: fn(*se), pieces))
