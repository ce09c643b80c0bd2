"""``Σ v(x_j)`` in the float32 order of torch's CPU ``t.sum()``, one read pass, nothing materialised.

Why: ``rescale_masked``'s L1 factor sums ``|τ·mask|`` with torch (:mod:`searchmerge.methods.sparsify`). To give
its bits the store wrote ``|τ·mask|`` to a scratch buffer and called ``.sum()`` on it (three memory streams).
Here a generated numba kernel computes each entry's value as it reads it and adds it into the very accumulators,
in the very order, of ATen's ``cascade_sum`` (``SumKernel.cpp``) — so the result is bit-identical to ``torch.sum``
of the same float32 values — and :func:`torch_order_sum` applies the thread split of ``parallel_reduce``.

The order, for a contiguous float32 tensor of ``n`` entries (verified bit for bit, tests/test_store_torchsum.py):

* threads: with ``T = torch.get_num_threads()``, one chunk if ``n <= GRAIN`` or ``T == 1``; otherwise
  ``nt = min(T, ceil(n / GRAIN))`` chunks of ``ceil(n / nt)`` entries, chunk ``t``'s sum (``0 + s``) in slot ``t``
  of a ``T``-slot buffer of zeros, and the result is the chunk sum of that buffer (``0 + s`` again);
* a chunk of ``m >= W`` entries (``W = 8`` float32 lanes, AVX2's ``Vectorized<float>``; with AVX512 dispatch too,
  see :data:`WIDTHS`): its ``m // W`` vectors in groups of 4 (``4·W`` independent float32 accumulators, entry
  ``i·4W + L`` into lane ``L``) with ``multi_row_sum``'s 4-level cascade; the leftover 0–3 vectors into lanes
  ``0..W-1``; lanes ``W..4W-1`` folded into them vector by vector; then from ``0``: the leftover ``m % W``
  entries, then lanes ``0..W-1``, in order;
* a chunk of ``m < W`` entries: the same cascade with 4 scalar accumulators over ``m // 4`` groups, the 0–3
  leftovers into the first, the other three folded into it.

Past its third level the cascade adds whole superblocks (``level_step**3`` groups, each summed from zeroed lower
levels) into the top level in order, so one chunk can be summed on several threads too (``workers``): the
superblocks in parallel, then their sums in order and the rest — the same bits (the store runs torch with one
thread, so its single chunk would otherwise take one core).

An entry's value is a hook (:class:`ValueKind`: source lines that set a float32 ``v`` from entry ``j`` of the
chunk, ``jj = j + j0`` its index in the whole tensor), so masks and ranks are applied as the entry is read.
:func:`order_known` says whether this process's torch sums in that order (its CPU dispatch is AVX2 or AVX512
and a self-check against ``torch.sum`` passes); callers fall back to a buffer and torch where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from searchmerge.store.kernel_source import compiled_module
from searchmerge.store.threadpool import map_threads

#: at::internal::GRAIN_SIZE: below it (or at it) ``parallel_reduce`` runs one chunk
GRAIN = 32768
#: float32 lanes of the sum kernel's ``Vectorized<float>`` per CPU capability: 8 on AVX512 too, since ``sum_stub``
#: is registered with ``REGISTER_DISPATCH``, which leaves the AVX512 slot empty (the AVX2 kernel runs)
WIDTHS = {"AVX512": 8, "AVX2": 8}


@dataclass(frozen=True)
class ValueKind:
    """How an entry's float32 value is computed: ``lines`` set ``v`` from ``x`` at chunk index ``j`` (global index
    ``jj``; ``load``, ``absbits``, ``counter24`` and ``np`` are in scope), reading the kernel arguments ``args``
    (after ``x``), of which ``arrays`` are per-entry arrays cut into chunks alongside ``x``."""

    lines: tuple[str, ...]
    args: tuple[str, ...] = ()
    arrays: tuple[str, ...] = ()


KINDS: dict[str, ValueKind] = {
    "plain": ValueKind(("v = load(x, j)",)),
    "abs": ValueKind(("v = abs(load(x, j))",)),
    # kernel_source.MASKED_ABS_SOURCE's value: |x·mask| of a whole tensor's counter-based random mask
    "random_abs": ValueKind(("v = abs(load(x, j) * np.float32(counter24(k1, k2, jj) < t))",), ("k1", "k2", "t")),
}


#: names the generated kernels use themselves (their other locals start with ``_``)
_RESERVED = frozenset({"x", "j", "jj", "j0", "v", "np", "numba", "load", "absbits", "counter24", "counter24u", "ZERO", "value",
                       "run", "finish", "kernel", "superblocks", "power_of"})


def register_kind(name: str, value_lines: Sequence[str], extra_args: Sequence[str] = (),
                  arrays: Sequence[str] = ()) -> None:
    """Add a value kind (e.g. a rank-based keep rule); re-registering a name with other lines is an error."""
    kind = ValueKind(tuple(value_lines), tuple(extra_args), tuple(arrays))
    bad = [a for a in kind.args if not a.isidentifier() or a.startswith("_") or a in _RESERVED]
    if bad:
        raise ValueError(f"torchsum kind {name!r}: extra_args {bad} clash with the kernel's own names — use "
                         f"identifiers other than {sorted(_RESERVED)} that do not start with '_'")
    if not set(kind.arrays) <= set(kind.args):
        raise ValueError(f"torchsum kind {name!r}: arrays {list(kind.arrays)} must be among its extra_args "
                         f"{list(kind.args)} — name each per-entry array there too")
    old = KINDS.get(name)
    if old is not None and old != kind:
        raise ValueError(f"torchsum kind {name!r} is already registered with other lines — choose another name")
    KINDS[name] = kind


_HEADER = '''"""Generated by searchmerge.store.torchsum ({what}); do not edit."""
import numba
import numpy as np
from searchmerge.store.kernels_support import absbits, counter24, counter24u, load

ZERO = np.float32(0.0)
'''

_INLINE = '@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False, inline="always")\n'

# multi_row_sum's loop over `_ng` groups of `_G` consecutive values from the state `_acc` (its 4 levels of `_G`
# accumulators), without the final fold. `_G` is a run-time value on purpose: a literal lane loop is unrolled,
# and LLVM's SLP pass then leaves it scalar (the accumulator stores might alias x: 0.9 ns/entry); a run-time trip
# count goes to the loop vectoriser, which checks at run time. The per-entry arrays are read through views from
# a block's start, so indices from 0 up need no wraparound check, which would also keep the loop scalar.
_RUN = '''
@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def run(x, {args}j0, _ng, _G, _power, _acc):
    _step = 1 << _power
    _mask = _step - 1
    _a0 = _acc[0]
    _i = 0
    while _i + _step <= _ng:
        _s0 = _i * _G
        _e0 = _s0 + _step * _G
        _xb = x[_s0:_e0]
{views8}        for _g in range(_step):
            _b = _g * _G
            for _q in range(_G):
                _a0[_q] += value(_xb, {bargs}_b + _q, j0 + _s0)
        _i += _step
        for _lv in range(1, 4):
            _lo = _acc[_lv - 1]
            _hi = _acc[_lv]
            for _q in range(_G):
                _hi[_q] += _lo[_q]
                _lo[_q] = ZERO
            if _i & (_mask << (_lv * _power)):
                break
    _s0 = _i * _G
    _e0 = _ng * _G
    _xb = x[_s0:_e0]
{views4}    for _g in range(_ng - _i):
        _b = _g * _G
        for _q in range(_G):
            _a0[_q] += value(_xb, {bargs}_b + _q, j0 + _s0)
'''

# A chunk's sum. Past level 3 the cascade adds whole superblocks (step**3 groups, from zeroed lower levels) into
# the top accumulator in order, so `superblocks` can sum them on several threads and `finish` adds them up in order
# and runs the rest; `kernel` is `finish` with no superblocks done.
_KERNEL = '''
@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def finish(x, {args}j0, _W, _power, _parts, _done):
    _n = len(x)
    if _n < _W:  # scalar row_sum: 4 interleaved partials
        _acc = np.zeros((4, 4), dtype=np.float32)
        run(x, {args}j0, _n // 4, 4, power_of(_n // 4), _acc)
        _p = _acc[0]
        for _lv in range(1, 4):
            for _q in range(4):
                _p[_q] += _acc[_lv, _q]
        for _j in range(_n // 4 * 4, _n):
            _p[0] += value(x, {args}_j, j0)
        for _k in range(1, 4):
            _p[0] += _p[_k]
        return ZERO + _p[0]
    _nv = _n // _W
    _G = 4 * _W
    _ng = _nv // 4
    if _power < 0:
        _power = power_of(_ng)
    _acc = np.zeros((4, _G), dtype=np.float32)
    _top = _acc[3]
    for _b in range(_parts.shape[0]):
        _row = _parts[_b]
        for _q in range(_G):
            _top[_q] += _row[_q]
    _s0 = _done * _G
    _e0 = _n
{views4}    run(x[_s0:_e0], {bargs}j0 + _s0, _ng - _done, _G, _power, _acc)
    _p = _acc[0]
    for _lv in range(1, 4):
        _hi = _acc[_lv]
        for _q in range(_G):
            _p[_q] += _hi[_q]
    for _r in range(_nv // 4 * 4, _nv):  # leftover vectors into partial 0
        for _q in range(_W):
            _p[_q] += value(x, {args}_r * _W + _q, j0)
    for _k in range(1, 4):
        for _q in range(_W):
            _p[_q] += _p[_k * _W + _q]
    _f = ZERO
    for _j in range(_nv * _W, _n):
        _f += value(x, {args}_j, j0)
    for _q in range(_W):
        _f += _p[_q]
    return ZERO + _f


@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def kernel(x, {args}j0, _W):
    return finish(x, {args}j0, _W, -1, np.zeros((0, 4 * _W), dtype=np.float32), 0)


@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def superblocks(x, {args}j0, _W, _power, _b0, _b1, _out):
    _G = 4 * _W
    _per = 1 << (3 * _power)
    for _b in range(_b0, _b1):
        _s0 = _b * _per * _G
        _e0 = _s0 + _per * _G
{views8}        _acc = np.zeros((4, _G), dtype=np.float32)
        run(x[_s0:_e0], {bargs}j0 + _s0, _per, _G, _power, _acc)
        _o = _out[_b]
        for _q in range(_G):
            _o[_q] = _acc[3, _q]
'''

_POWER = '''
@numba.njit(cache=True, nogil=True)
def power_of(_ng):
    _t = _ng - 1
    _cl = 0
    while _t > 0:
        _t >>= 1
        _cl += 1
    return max(4, (1 if _ng <= 2 else _cl) // 4)
'''


def level_power(ng: int) -> int:
    """``multi_row_sum``'s ``level_power`` for ``ng`` rows: ``max(4, CeilLog2(ng) // 4)``."""
    return max(4, (1 if ng <= 2 else (ng - 1).bit_length()) // 4)


def chunk_source(kind: ValueKind) -> str:
    """The generated module: ``kernel(x, *args, j0, W) -> float32``, one chunk's sum ``0 + chunk_sum`` in ATen's
    order for ``W`` lanes; ``superblocks`` and ``finish``, the same sum in parts."""
    args = "".join(f"{a}, " for a in kind.args)
    src = _HEADER.format(what=f"torch-order sum of {list(kind.lines)}") + _POWER
    src += f"\n\n{_INLINE}def value(x, {args}j, j0):\n    jj = j + j0\n"
    src += "".join(f"    {line}\n" for line in kind.lines) + "    return v\n"
    bargs = "".join(f"_{a}_b, " if a in kind.arrays else f"{a}, " for a in kind.args)
    views = [f"_{a}_b = {a}[_s0:_e0]\n" for a in kind.arrays]
    fill = {"args": args, "bargs": bargs, "views8": "".join(" " * 8 + v for v in views),
            "views4": "".join(" " * 4 + v for v in views)}
    return src + "\n" + _RUN.format(**fill) + "\n" + _KERNEL.format(**fill)


@lru_cache(maxsize=64)
def chunk_module(name: str) -> Any:
    """The compiled module of a registered kind (compiled once per source, cached on disk)."""
    return compiled_module(chunk_source(KINDS[name]))


def chunk_kernel(name: str) -> Any:
    """A registered kind's ``kernel(x, *args, j0, W)``: one chunk's sum on the calling thread."""
    return chunk_module(name).kernel


def torch_width() -> int | None:
    """``Vectorized<float>::size()`` of this process's torch CPU dispatch, or ``None`` when not AVX2/AVX512."""
    return WIDTHS.get(torch.backends.cpu.get_cpu_capability())


def chunks(n: int, threads: int) -> list[tuple[int, int]]:
    """``parallel_reduce``'s split of ``[0, n)`` for ``threads`` torch threads (one chunk when it runs serially)."""
    if n <= GRAIN or threads <= 1:
        return [(0, n)]
    nt = min(threads, -(-n // GRAIN))
    size = -(-n // nt)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def torch_order_sum(kind: str, x: np.ndarray, *extra: Any, threads: int | None = None,
                    width: int | None = None, workers: int | None = None) -> np.float32:
    """``torch.sum`` of the float32 values ``kind`` computes for the entries of 1-D ``x`` (float32, or bfloat16
    as uint16), bit for bit, as torch sums with ``threads`` threads (default: its current count). Torch's chunks
    run on ``workers`` pool threads (default: one per chunk); a single chunk is split into ``workers`` parts at
    the cascade's superblocks (default 1: the calling thread). Check :func:`order_known` first."""
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"torchsum: unknown value kind {kind!r} — use one of {sorted(KINDS)} or register_kind()")
    if len(extra) != len(spec.args):
        raise ValueError(f"torchsum kind {kind!r} takes {len(spec.args)} extra arguments {list(spec.args)}, "
                         f"got {len(extra)}")
    if x.ndim != 1 or x.dtype not in (np.float32, np.uint16):
        raise ValueError(f"torchsum: x must be a 1-D float32 or uint16 (bfloat16) array, got {x.dtype} "
                         f"with shape {x.shape} — pass a flattened tensor's numpy view")
    w = width or torch_width()
    if w is None:
        raise ValueError(f"torchsum: torch's CPU capability {torch.backends.cpu.get_cpu_capability()!r} has no "
                         "known sum order — check order_known() and use torch's sum")
    t = torch.get_num_threads() if threads is None else int(threads)
    mod = chunk_module(kind)
    cut = [spec.args.index(a) for a in spec.arrays]

    def one(se: tuple[int, int], k: int) -> np.float32:
        s, e = se
        return _chunk_sum(mod, x[s:e], [a[s:e] if i in cut else a for i, a in enumerate(extra)], s, w, k)

    parts = chunks(len(x), t)
    if len(parts) == 1:
        return one(parts[0], workers or 1)
    slots = np.zeros(t, dtype=np.float32)
    slots[: len(parts)] = map_threads(lambda se: one(se, 1), parts, workers or len(parts))
    return np.float32(chunk_kernel("plain")(slots, 0, w))


def _chunk_sum(mod: Any, x: np.ndarray, extra: Sequence[Any], j0: int, w: int, workers: int) -> np.float32:
    """One torch chunk's sum; with several workers its whole superblocks (``level_step**3`` groups of ``4·w``)
    are summed on the pool and added up in order by ``finish``."""
    ng = len(x) // (4 * w)
    power = level_power(ng)
    per = 1 << (3 * power)
    nsb = ng // per
    if workers <= 1 or nsb < 2:
        return np.float32(mod.kernel(x, *extra, j0, w))
    out = np.empty((nsb, 4 * w), dtype=np.float32)
    k = min(workers, nsb)
    bounds = [(i * nsb // k, (i + 1) * nsb // k) for i in range(k)]
    map_threads(lambda b: mod.superblocks(x, *extra, j0, w, power, b[0], b[1], out), bounds, k)
    return np.float32(mod.finish(x, *extra, j0, w, power, out, nsb * per))


def _self_check_arrays(width: int, threads: int) -> list[np.ndarray]:
    """Seeded float32 arrays of awkward sizes with values over 16 decades (their sums depend on the order), and
    one whose first chunk has > 2**19 groups (level step 2**5): zeros (untouched pages, read from the shared zero
    page: a few ms) after a dense prefix (skipped past 8 threads, where it would span > 0.5 GB of address space)."""
    rng = np.random.default_rng(20261205)
    g = 4 * width
    sizes = [0, 1, 3, 15, 17, 63, 64, 65, 1000, 16 * g - 1, 16 * g + 5, 32767, 32768, 32769, 65537 + 3 * g + 7,
             300_001]
    out = [rng.lognormal(0.0, 4.0, n).astype(np.float32) * rng.choice(np.float32([-1, 1]), n) for n in sizes]
    if threads <= 8:
        big = np.zeros(max(threads, 1) * ((1 << 19) * g + 3 * g) + 5, dtype=np.float32)
        big[0] = 2.0**24  # lane 0: 2**24, then 1.0 in groups 1..31 — each lost if added one by one (level step
        big[g:32 * g:g] = 1.0  # 32), summed to 16 first if the step were 16: 2**24 + 16
        big[1024 * g:1024 * g + (1 << 16)] = rng.uniform(0.5, 1.5, 1 << 16).astype(np.float32)
        out.append(big)
    return out


@lru_cache(maxsize=8)
def _order_known(threads: int, capability: str) -> bool:
    w = WIDTHS.get(capability)
    if w is None:
        return False
    for v in _self_check_arrays(w, threads):
        want = torch.from_numpy(v).sum().numpy()
        got = torch_order_sum("plain", v, threads=threads, width=w)
        if want.view(np.uint32) != np.float32(got).view(np.uint32):
            return False
    return True


def order_known() -> bool:
    """Whether :func:`torch_order_sum` gives this process's ``torch.sum`` bits at torch's current thread count:
    its CPU dispatch has a known width and a self-check on seeded arrays agrees (cached per thread count)."""
    return _order_known(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
