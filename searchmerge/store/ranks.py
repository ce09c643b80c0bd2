"""Keep rules of the magnitude trims, so a new trim density costs a threshold lookup, not a sort.

Why: TIES / breadcrumbs trim each τ to the entries of given magnitude ranks (``int(density·numel)`` of them, ties
at the cut to the lower index, as ``sparsify.magnitude_mask`` / ``smallest_mask`` keep them). Re-selecting for
every new density was a cold trial (``kthvalue`` + masks, seconds per 100M entries). Here each tensor of each
model has, once, a histogram of the high 16 bits of ``|τ|``'s bit pattern (:mod:`~searchmerge.store.rankscan`).
A rank query finds its bin in the histogram: that alone says what lies above and below the cut — a
:class:`Pending` rule, which the flagged pass applies while it lists the bin's entries — and the bin's entries
(from that listing, or from one scan of τ) give the exact cut value and, for ties at the cut, the index of the
last entry kept: a :data:`Keep` rule, which says which entries survive — ``(a, j)`` compared with the cut. The
generated combine kernels apply either inside their one fused pass (no mask is materialised or cached).

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

from searchmerge.methods.sparsify import breadcrumbs_band
from searchmerge.store.rankscan import Hist, bin_of, value_at, values_at

Keep = tuple  # (kind, lc, lq, lr, uc, up)

NONE_BITS = 0xFFFFFFFF  # above every finite |x| bit pattern
ALL: Keep = ("all", 0, 0, 0, NONE_BITS, -1)
NOTHING: Keep = ("lower", NONE_BITS, 0, -1, NONE_BITS, -1)


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
    della: tuple[float, float] = (0.0, 0.0)  # a DELLA mask's float32 (d − ε, ε): rule ``("della", …)``

    @property
    def kind(self) -> str:
        """``all`` (no mask), ``ge`` (``a >= lo``), ``range``, or ``random`` (a draw below a threshold)."""
        if self.rule[0] in ("all", "random", "della"):
            return self.rule[0]
        return "ge" if self.hi == NONE_BITS else "range"

    @property
    def nbytes(self) -> int:
        return 64 + int(self.fix.nbytes)


def largest_keep(x: np.ndarray, hist: Hist, k: int, at: np.ndarray | None = None) -> Cut:
    """The ``k`` largest |x| with ties at the cut to the lower index (``sparsify.magnitude_mask``)."""
    n = hist.n
    if k <= 0:
        return Cut(NOTHING, NONE_BITS, NONE_BITS)
    if k >= n:
        return Cut(ALL)
    c, less, eq = value_at(x, hist, n - k + 1, at)  # the k-th largest value
    missing = k - (n - less - len(eq))  # ties at c kept, lowest indices first
    rule = ("lower", c, 0, int(eq[missing - 1]), NONE_BITS, -1)
    return Cut(rule, c) if missing == len(eq) else Cut(rule, c + 1, NONE_BITS, eq)


def band_keep(x: np.ndarray, hist: Hist, n_bot: int, m_top: int, at: np.ndarray | None = None) -> Cut:
    """Among the ``m_top`` smallest and not among the ``n_bot`` smallest (``sparsify.outlier_mask``); both
    counts take ties at their cut lowest index first (``sparsify.smallest_mask``). One scan for both cuts."""
    n = hist.n
    if _empty_band(n, n_bot, m_top):
        return Cut(NOTHING, NONE_BITS, NONE_BITS)
    ranks_needed = [r for r in (n_bot, m_top) if 0 < r < n]
    found = dict(zip(ranks_needed, values_at(x, hist, ranks_needed, at))) if ranks_needed else {}
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


def stage_keep(method: str | None, density: float, gamma: float, x: np.ndarray, hist: Hist,
               at: np.ndarray | None = None) -> Cut:
    """What the stage keeps of one tensor: ``magnitude`` (TIES) or ``magnitude_outliers`` (breadcrumbs), with the
    merge core's counts (``int(density·n)``, ``int(gamma·n)``). With ``at``, ``x`` is a listing (``x[t]`` is entry
    ``at[t]``) that holds every entry of the cuts' bins — the flagged pass's undecided entries — not the tensor."""
    n = hist.n
    if method is None or density >= 1:
        return Cut(ALL)
    if method == "magnitude":
        return largest_keep(x, hist, int(density * n), at)
    if method == "magnitude_outliers":
        n_bot, n_top = breadcrumbs_band(n, density, gamma)
        return band_keep(x, hist, n_bot, n - n_top, at)
    raise ValueError(f"no order-statistics keep rule for {method!r}")


@dataclass(frozen=True)
class Pending:
    """A keep rule before its cuts are resolved, from the histogram alone (no read of ``x``): entries with
    ``lo <= a < hi`` are certainly kept, those in ``[flo, fhi)`` but not in ``[lo, hi)`` — the entries of the
    bins that hold the cuts, at most ``size`` — undecided; all others dropped. The flagged pass applies it."""

    lo: int = 0
    hi: int = NONE_BITS
    flo: int = 0
    fhi: int = NONE_BITS
    size: int = 0


def _cut_bin(hist: Hist, r: int) -> tuple[int, int]:
    """(bin, its size) of the ``r``-th smallest |x| (``0 < r < n``)."""
    b, _, size = bin_of(hist, r)
    return b, size


def stage_pending(method: str | None, density: float, gamma: float, hist: Hist) -> Pending:
    """:func:`stage_keep`'s rule up to its cut bins: what the flagged pass keeps, drops and leaves undecided."""
    n = hist.n
    if method is None or density >= 1:
        return Pending()
    if method == "magnitude":
        k = int(density * n)
        if k <= 0:
            return Pending(NONE_BITS, NONE_BITS, NONE_BITS, NONE_BITS)
        if k >= n:
            return Pending()
        b, size = _cut_bin(hist, n - k + 1)  # the k-th largest's bin: above it kept, below dropped
        return Pending((b + 1) << 16, NONE_BITS, b << 16, NONE_BITS, size)
    if method != "magnitude_outliers":
        raise ValueError(f"no order-statistics keep rule for {method!r}")
    n_bot, n_top = breadcrumbs_band(n, density, gamma)
    m_top = n - n_top
    if _empty_band(n, n_bot, m_top):
        return Pending(NONE_BITS, NONE_BITS, NONE_BITS, NONE_BITS)
    lo = flo = hi = fhi = 0
    sizes = {}
    if n_bot > 0:  # the n_bot-th smallest's bin: above it not among the n_bot smallest
        b, sizes[b] = _cut_bin(hist, n_bot)
        lo, flo = (b + 1) << 16, b << 16
    if m_top >= n:
        hi = fhi = NONE_BITS
    else:  # the m_top-th smallest's bin: below it among the m_top smallest
        b, sizes[b] = _cut_bin(hist, m_top)
        hi, fhi = b << 16, (b + 1) << 16
    return Pending(lo, hi, flo, fhi, sum(sizes.values()))


def _empty_band(n: int, n_bot: int, m_top: int) -> bool:
    """Whether no entry is among the ``m_top`` smallest but not the ``n_bot`` smallest (one order, ties by index)."""
    return n_bot >= min(m_top, n) or m_top <= 0


def random_cut(key: tuple[int, int], density: float) -> Cut:
    """DARE's keep rule: entry ``j`` kept where its counter-based draw is below ``keep_threshold(density)`` —
    ``sparsify.random_mask``'s mask, computed entry by entry inside the fused pass."""
    from searchmerge.methods.sparsify import keep_threshold

    return Cut(("random", 0, 0, -1, NONE_BITS, -1), rand=(int(key[0]), int(key[1]), keep_threshold(density)))


def della_cols(shape: Sequence[int]) -> int:
    """The row length ``sparsify.della_mask`` ranks within: the whole tensor below 2-D, else ``numel / shape[0]``."""
    if len(shape) < 2:
        return max(1, int(np.prod(shape)))
    return max(1, int(np.prod(shape[1:])))


def della_span(cols: int) -> np.float32:
    """The kernels' ``dcm``, ``cols − 1`` as float32 — at least 1: a one-column row's cut keeps nothing whatever it
    divides by (:func:`della_cut`), and the kernels must not divide by zero."""
    return np.float32(max(1, cols - 1))


def della_cut(key: tuple[int, int], density: float, epsilon: float, cols: int) -> Cut:
    """DELLA's keep rule (``sparsify.della_mask``): entry ``j`` of a row of ``cols`` kept where its counter-based draw
    ``u/2**24 < (d − ε) + ((rank_j / (cols − 1))·2)·ε`` — the scalars rounded to float32 as torch rounds them; the
    ranks come from the store's cache. One-entry rows keep nothing (the core's 0/0 rank is NaN)."""
    if cols <= 1:
        return Cut(("della", 0, 0, -1, NONE_BITS, -1), rand=(int(key[0]), int(key[1]), 0), della=(-1.0, 0.0))
    return Cut(("della", 0, 0, -1, NONE_BITS, -1), rand=(int(key[0]), int(key[1]), 0),
               della=(float(np.float32(density - epsilon)), float(np.float32(epsilon))))


#: a model at density 1 in a DELLA stage keeps every entry: probability 2 > every draw (its rank term is ·0)
DELLA_ALL = Cut(("della", 0, 0, -1, NONE_BITS, -1), della=(2.0, 0.0))


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
