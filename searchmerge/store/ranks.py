"""Magnitude order statistics of a task vector, so a new trim density costs a threshold lookup, not a sort.

Why: TIES / breadcrumbs trim each τ to the entries of given magnitude ranks (``int(density·numel)`` of them, ties
at the cut to the lower index, as ``sparsify.magnitude_mask`` / ``smallest_mask`` keep them). Re-selecting for
every new density was a cold trial (``kthvalue`` + masks, seconds per 100M entries). Here each tensor of each
model gets, once, a histogram of the high 16 bits of ``|τ|``'s float32 bit pattern (which orders like ``|τ|``
for finite values). A rank query then finds its bin in the histogram and scans τ once for that bin's entries
(≈ 0.2% of them) to get the exact cut value and, for ties at the cut, the index of the last entry kept. The
result, a :data:`Keep`, says which entries survive — ``(a, j)`` compared with the cut — and the generated combine
kernels apply it inside their one fused pass (no mask is materialised or cached).

A :data:`Keep` rule is ``(kind, lc, lq, lr, uc, up)`` on ``a = absbits(τ_j)``:

* ``all``: every entry;
* ``lower``: ``a > lc  or  (a == lc and lq <= j <= lr)``;
* ``band``: ``lower  and  (a < uc  or  (a == uc and j <= up))``.

The kernels apply it as a :class:`Cut`: two thresholds (``lo <= a < hi``, compares that vectorise) and the
few entries tied at a cut that keeps only part of its ties, recomputed with the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

try:
    import numba

    from searchmerge.store.kernels_support import absbits
except ImportError:  # pragma: no cover - the store falls back to the torch paths
    numba = None

Keep = tuple  # (kind, lc, lq, lr, uc, up)

NONE_BITS = 0xFFFFFFFF  # above every finite |x| bit pattern
FINITE_BINS = 0x7F80  # high 16 bits of +inf: finite |x| lie in bins below it
ALL: Keep = ("all", 0, 0, 0, NONE_BITS, -1)
NOTHING: Keep = ("lower", NONE_BITS, 0, -1, NONE_BITS, -1)


@dataclass(frozen=True)
class Hist:
    """Histogram of the high 16 bits of ``|x|`` (nonzero bins only, ascending; ``cum``: entries up to each bin)."""

    n: int
    bins: np.ndarray  # uint16
    cum: np.ndarray  # int64, cum[i] = number of entries whose bin <= bins[i]
    finite: bool

    @property
    def nbytes(self) -> int:
        return int(self.bins.nbytes + self.cum.nbytes)

    def dense(self) -> np.ndarray:
        """Counts per bin over all 2^15 bins (int64), for the whole-model histograms."""
        out = np.zeros(1 << 15, dtype=np.int64)
        out[self.bins.astype(np.int64)] = np.diff(self.cum, prepend=0)
        return out


if numba is not None:

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _count_high(x, counts):  # noqa: ANN001, ANN202
        for j in range(len(x)):
            counts[absbits(x, j) >> np.uint32(16)] += 1

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _collect_bin(x, b, idx, lo):  # noqa: ANN001, ANN202
        c = 0
        for j in range(len(x)):
            a = absbits(x, j)
            if (a >> np.uint32(16)) == b:
                idx[c] = j
                lo[c] = a & np.uint32(0xFFFF)
                c += 1
        return c

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _collect_two_bins(x, b1, b2, idx1, lo1, idx2, lo2):  # noqa: ANN001, ANN202
        c1 = 0
        c2 = 0
        for j in range(len(x)):
            a = absbits(x, j)
            h = a >> np.uint32(16)
            if h == b1:
                idx1[c1] = j
                lo1[c1] = a & np.uint32(0xFFFF)
                c1 += 1
            elif h == b2:
                idx2[c2] = j
                lo2[c2] = a & np.uint32(0xFFFF)
                c2 += 1
        return c1 + c2

    @numba.njit(cache=True, nogil=True, fastmath=False)
    def _count_low_in_bin(x, b, counts):  # noqa: ANN001, ANN202
        for j in range(len(x)):
            a = absbits(x, j)
            if (a >> np.uint32(16)) == b:
                counts[a & np.uint32(0xFFFF)] += 1


def histogram(x: np.ndarray) -> Hist:
    """One pass over ``x`` (float32, or bfloat16 as uint16 bit patterns)."""
    counts = np.zeros(1 << 15, dtype=np.int64)
    _count_high(x, counts)
    nz = np.flatnonzero(counts)
    return Hist(len(x), nz.astype(np.uint16), np.cumsum(counts[nz]), not counts[FINITE_BINS:].any())


def low_histogram(x: np.ndarray, b: int, counts: np.ndarray) -> None:
    """Add the low 16 bits of the entries of ``x`` in high-bit bin ``b`` into ``counts`` (65536 int64)."""
    _count_low_in_bin(x, np.uint32(b), counts)


def _bin_of(hist: Hist, r: int) -> tuple[int, int, int]:
    """(bin, entries below it, entries in it) of the ``r``-th smallest |x| (1-based)."""
    i = int(np.searchsorted(hist.cum, r))  # first bin whose cumulative count reaches r
    before = int(hist.cum[i - 1]) if i > 0 else 0
    return int(hist.bins[i]), before, int(hist.cum[i]) - before


def _select(r: int, before: int, b: int, idx: np.ndarray, lo: np.ndarray) -> tuple[int, int, np.ndarray]:
    r_in = r - before
    c_lo = int(np.partition(lo, r_in - 1)[r_in - 1])
    less = before + int(np.count_nonzero(lo < c_lo))
    return (b << 16) | c_lo, less, idx[lo == c_lo]


def values_at(x: np.ndarray, hist: Hist, rs: Sequence[int]) -> list[tuple[int, int, np.ndarray]]:
    """For each rank ``r`` (1-based, at most two): the ``r``-th smallest |x| as bits, how many entries are smaller,
    and the ascending indices of the entries equal to it — from one scan of ``x`` for the entries of their bins."""
    bins = [_bin_of(hist, r) for r in rs]
    distinct = sorted({b for b, _, _ in bins})
    if len(distinct) > 2:
        raise ValueError("at most two ranks per scan")
    sizes = {b: size for b, _, size in bins}
    got = {b: (np.empty(sizes[b], dtype=np.int64), np.empty(sizes[b], dtype=np.uint32)) for b in distinct}
    if len(distinct) == 1:
        (b1,) = distinct
        found = _collect_bin(x, np.uint32(b1), *got[b1])
    else:
        b1, b2 = distinct
        found = _collect_two_bins(x, np.uint32(b1), np.uint32(b2), *got[b1], *got[b2])
    if found != sum(sizes.values()):
        raise RuntimeError(f"order statistics out of date: bins {distinct} hold {found} entries, not {sizes}")
    return [_select(r, before, b, *got[b]) for r, (b, before, _) in zip(rs, bins)]


def value_at(x: np.ndarray, hist: Hist, r: int) -> tuple[int, int, np.ndarray]:
    """The ``r``-th smallest |x| (1-based) as bits, how many entries are smaller, and the (ascending) indices of
    the entries equal to it: one scan of ``x`` for the entries of its bin."""
    return values_at(x, hist, [r])[0]


@dataclass(frozen=True)
class Cut:
    """Which entries one model keeps of one tensor: ``lo <= a < hi`` on ``a = absbits(x_j)`` — integer compares
    that vectorise — except at ``fix``, the entries tied at a cut that keeps only some of its ties, where the
    exact :data:`Keep` ``rule`` (which also compares indices) applies."""

    rule: Keep
    lo: int = 0
    hi: int = NONE_BITS
    fix: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    rand: tuple[int, int, int] = (0, 0, 0)  # a random mask's (k1, k2, threshold): rule ``("random", …)``

    @property
    def kind(self) -> str:
        """``all`` (no mask), ``ge`` (``a >= lo``), ``range``, or ``random`` (a draw below a threshold)."""
        if self.rule[0] in ("all", "random"):
            return self.rule[0]
        return "ge" if self.hi == NONE_BITS else "range"

    @property
    def nbytes(self) -> int:
        return 64 + int(self.fix.nbytes)


def largest_keep(x: np.ndarray, hist: Hist, k: int) -> Cut:
    """The ``k`` largest |x| with ties at the cut to the lower index (``sparsify.magnitude_mask``)."""
    n = hist.n
    if k <= 0:
        return Cut(NOTHING, NONE_BITS, NONE_BITS)
    if k >= n:
        return Cut(ALL)
    c, less, eq = value_at(x, hist, n - k + 1)  # the k-th largest value
    missing = k - (n - less - len(eq))  # ties at c kept, lowest indices first
    rule = ("lower", c, 0, int(eq[missing - 1]), NONE_BITS, -1)
    return Cut(rule, c) if missing == len(eq) else Cut(rule, c + 1, NONE_BITS, eq)


def band_keep(x: np.ndarray, hist: Hist, n_bot: int, m_top: int) -> Cut:
    """Among the ``m_top`` smallest and not among the ``n_bot`` smallest (``sparsify.outlier_mask``); both
    counts take ties at their cut lowest index first (``sparsify.smallest_mask``). One scan for both cuts."""
    n = hist.n
    ranks_needed = [r for r in (n_bot, m_top) if 0 < r < n]
    found = dict(zip(ranks_needed, values_at(x, hist, ranks_needed))) if ranks_needed else {}
    fix = []
    if n_bot <= 0:
        lc, lq, lr, lo = 0, 0, n, 0  # every entry is "not among the 0 smallest"
    elif n_bot >= n:
        lc, lq, lr, lo = NONE_BITS, 0, -1, NONE_BITS
    else:
        c, less, eq = found[n_bot]
        missing = n_bot - less  # ties at c among the n_bot smallest: the rest of them are kept
        lc, lq, lr, lo = c, int(eq[missing - 1]) + 1, n, c + 1
        if missing < len(eq):
            fix.append(eq)
    if m_top >= n:
        uc, up, hi = NONE_BITS, -1, NONE_BITS
    elif m_top <= 0:
        uc, up, hi = 0, -1, 0
    else:
        c, less, eq = found[m_top]
        missing = m_top - less
        uc, up = c, int(eq[missing - 1])
        hi = c + 1 if missing == len(eq) else c
        if missing < len(eq):
            fix.append(eq)
    fixed = np.unique(np.concatenate(fix)) if fix else np.empty(0, dtype=np.int64)
    return Cut(("band", lc, lq, lr, uc, up), lo, hi, fixed)


def threshold_keep(threshold: float, n: int) -> Cut:
    """``|x| >= threshold`` (the whole-model trim's rule), for a threshold that is a float32 value >= 0."""
    bits = int(np.array([threshold], dtype=np.float32).view(np.uint32)[0]) & 0x7FFFFFFF
    return Cut(("lower", bits, 0, n, NONE_BITS, -1), bits)


def stage_keep(method: str | None, density: float, gamma: float, x: np.ndarray, hist: Hist) -> Cut:
    """What the stage keeps of one tensor: ``magnitude`` (TIES) or ``magnitude_outliers`` (breadcrumbs), with the
    merge core's counts (``int(density·n)``, ``int(gamma·n)``)."""
    n = hist.n
    if method is None or density >= 1:
        return Cut(ALL)
    if method == "magnitude":
        return largest_keep(x, hist, int(density * n))
    if method == "magnitude_outliers":
        target = int(density * n)
        n_top = int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top += n_bot
            n_bot = 0
        return band_keep(x, hist, n_bot, n - n_top)
    raise ValueError(f"no order-statistics keep rule for {method!r}")


def random_cut(key: tuple[int, int], density: float) -> Cut:
    """DARE's keep rule: entry ``j`` kept where its counter-based draw is below ``keep_threshold(density)`` —
    ``sparsify.random_mask``'s mask, computed entry by entry inside the fused pass."""
    from searchmerge.methods.sparsify import keep_threshold

    return Cut(("random", 0, 0, -1, NONE_BITS, -1), rand=(int(key[0]), int(key[1]), keep_threshold(density)))


def keep_mask(x: np.ndarray, cut: Cut, start: int = 0, exact: bool = True) -> np.ndarray:
    """The boolean mask a :class:`Cut` selects (a numpy reference for tests): its exact rule (``exact``), or its
    thresholds with the rule applied at ``fix`` only — what the kernels do; the two must agree."""
    a = (x.astype(np.uint32) & 0x7FFF) << 16 if x.dtype == np.uint16 else x.view(np.uint32) & 0x7FFFFFFF
    j = np.arange(start, start + len(x), dtype=np.int64)
    kind, lc, lq, lr, uc, up = cut.rule
    if kind == "all":
        return np.ones(len(x), dtype=bool)
    if kind == "random":
        from searchmerge.methods.sparsify import counter_draws

        return counter_draws(cut.rand[:2], start, start + len(x)).numpy() < cut.rand[2]
    out = (a > lc) | ((a == lc) & (j >= lq) & (j <= lr))
    if kind == "band":
        out &= (a < uc) | ((a == uc) & (j <= up))
    if exact:
        return out
    fast = (a >= cut.lo) & (a < cut.hi)
    at = cut.fix[(cut.fix >= start) & (cut.fix < start + len(x))] - start
    fast[at] = out[at]
    return fast
