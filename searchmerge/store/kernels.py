"""Fused CPU passes for the store's trials: the GTA combine and the task-arithmetic weighted sum, on threads.

Why: with per-model weights ≠ 1 the TIES sign election depends on the trial's coefficients, so it runs on
every trial. In torch ops it is ~10 full passes over the N stacked task vectors (≈14 ns/entry for N=4 on this
CPU). These kernels read each τ_i, its keep rule and the base once, keep an entry's N values in registers, and
write the merged weight once, so a trial runs near memory bandwidth. The kernels themselves are generated per
configuration (:mod:`~searchmerge.store.kernel_source`, which says why and how they stay exact); this module
checks inputs, splits a tensor where torch's sum order changes and across threads, and recomputes the few
entries a keep rule's thresholds cannot decide. Tests compare bit for bit with the merge core. Only CPU tensors
take these paths; other devices use the chunked torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from searchmerge.store.kernel_source import (
    MAX_MODELS,
    combine_kernel,
    weighted_sum_kernel,
)
from searchmerge.store.ranks import ALL, DELLA_ALL, NONE_BITS, Cut, Pending, della_span
from searchmerge.store.sumorder import plain_count
from searchmerge.store.threadpool import run_pieces

try:  # numba is a dependency; the guard keeps the torch path usable where it is absent (e.g. a bare GPU box)
    import numba
except ImportError:  # pragma: no cover
    numba = None

CONSENSUS = (None, "sum", "count")
MERGE_FUNCS = ("sum", "mean", "max")


def available() -> bool:
    return numba is not None


def pattern_dtype(n: int) -> np.dtype:
    """The smallest unsigned integer with a bit per model."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n <= np.iinfo(dt).bits:
            return np.dtype(dt)
    raise ValueError(f"at most {MAX_MODELS} models per kernel, got {n}.")


def keep_pattern(bits: Sequence[np.ndarray | None], numel: int) -> np.ndarray:
    """Per entry, bit ``i`` set where model ``i`` is kept (``bits[i]``: big-endian packed mask; ``None``: all kept).

    One contiguous byte (or word) per entry vectorises in the kernel; N packed bit arrays (an ``[j >> 3]`` gather
    each) do not — measured 0.9 vs ≈6 ns/entry for N = 4.
    """
    out = np.zeros(numel, dtype=pattern_dtype(len(bits)))
    for i, b in enumerate(bits):
        keep = np.ones(numel, dtype=bool) if b is None else np.unpackbits(b, count=numel).view(bool)
        out |= keep.astype(out.dtype) << out.dtype.type(i)
    return out


# --- API ---------------------------------------------------------------------------------------------


def as_kernel_array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view the kernels read: float32 as is, bfloat16 as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _f32(x: float | torch.Tensor) -> np.float32:
    """A scalar rounded to float32 as torch rounds a Python float (or 0-dim tensor) operand of an fp32 op."""
    if isinstance(x, torch.Tensor):
        return np.float32(x.to(torch.float32).item())
    return np.float32(x)


def _check(vals: Sequence[np.ndarray], base: np.ndarray | None, out: np.ndarray, offset: int, numel: int) -> None:
    if (not 0 < len(vals) <= MAX_MODELS or (base is not None and len(base) != len(out))
            or any(len(x) != len(out) for x in vals) or not 0 <= offset <= numel - len(out)):
        raise ValueError(f"kernel inputs: {len(vals)} arrays of lengths {[len(x) for x in vals]}, out {len(out)}, "
                         f"entries [{offset}, {offset + len(out)}) of {numel}.")
    if numel == 1 and len(vals) >= 8:  # torch sums a one-entry stack as a contiguous row (another order)
        raise ValueError("one-entry tensors with 8 or more models: use the merge core's torch ops.")


def _by_order(offset: int, length: int, numel: int, threads: int, fn: Callable[[bool, int, int], Any],
              defer: bool = False) -> None:
    """``fn(ilp, start, stop)`` over ``[0, length)`` (entries ``offset + …`` of a ``numel``-entry tensor), split
    where torch's sum switches from per-column to tail order, the per-column part across ``threads`` (``defer``:
    see :func:`~searchmerge.store.threadpool.deferred`)."""
    cut = min(length, max(0, plain_count(numel) - offset))
    if cut > 0:
        run_pieces(cut, threads, lambda s, e: fn(False, s, e), defer)
    if cut < length:
        fn(True, cut, length)


def weighted_sum_into(
    vals: Sequence[np.ndarray], weights: Sequence[float], *, mean: bool, lambda_: float, base: np.ndarray,
    out: np.ndarray, offset: int = 0, numel: int | None = None, threads: int = 1, defer: bool = False,
) -> None:
    """``out = base + λ·Σ w_i·vals_i`` (÷ Σw for ``mean``) in one pass: the merge core's task-arithmetic bits.

    ``vals`` are float32 or bfloat16 bit patterns as uint16; ``base`` and ``out`` float32, all one length: entries
    ``[offset, offset + len(out))`` of a tensor of ``numel`` entries (default: the whole tensor).
    """
    numel = offset + len(out) if numel is None else numel
    _check(vals, base, out, offset, numel)
    total = float(sum(weights))
    div = np.float32((total if abs(total) >= 1e-8 else 1.0) if mean else 1.0)
    w = np.asarray(list(weights), dtype=np.float32)
    lam = _f32(lambda_)

    def piece(ilp: bool, s: int, e: int) -> None:
        weighted_sum_kernel(len(vals), ilp)(*[x[s:e] for x in vals], w, div, lam, base[s:e], out[s:e])

    _by_order(offset, len(out), numel, threads, piece, defer)


@dataclass(frozen=True)
class _Combine:
    """One fused combine's configuration and per-call scalars, checked (what every kernel variant takes)."""

    config: tuple  # (n, patterned, ops kinds, consensus, merge_func)
    scalars: tuple  # (rescale operands, weights, Σw for mean, λ)
    based: bool


def _combine_setup(vals: Sequence[np.ndarray], pattern: np.ndarray | None, ops: Sequence[tuple],
                   weights: Sequence[float], consensus: str | None, merge_func: str, lambda_: float,
                   base: np.ndarray | None, out: np.ndarray, offset: int, numel: int) -> _Combine:
    _check(vals, base, out, offset, numel)
    if consensus not in CONSENSUS or merge_func not in MERGE_FUNCS:
        raise ValueError(f"fused_combine_into: consensus {consensus!r}, merge_func {merge_func!r}.")
    if pattern is not None and (len(pattern) != len(out) or pattern.dtype != pattern_dtype(len(vals))):
        raise ValueError(f"fused_combine_into: keep pattern of {len(pattern)} {pattern.dtype} for {len(out)} entries.")
    ops = _uniform_ops(ops)
    total = float(sum(weights))
    scalars = (
        np.array([_f32(op[1]) if op[0] != "none" else 1.0 for op in ops], dtype=np.float32),
        np.asarray(list(weights), dtype=np.float32),
        np.float32(total if abs(total) >= 1e-8 else 1.0),
        _f32(lambda_),
    )
    return _Combine((len(vals), pattern is not None, tuple(op[0] for op in ops), consensus, merge_func), scalars,
                    base is not None)


def _rand_arrays(cuts: Sequence[Cut]) -> tuple[np.ndarray, ...]:
    return tuple(np.array([c.rand[f] for c in cuts], dtype=np.uint32) for f in range(3))


def fused_combine_into(
    vals: Sequence[np.ndarray],
    pattern: np.ndarray | None,
    ops: Sequence[tuple],
    weights: Sequence[float],
    *,
    consensus: str | None,
    merge_func: str,
    lambda_: float,
    base: np.ndarray | None,
    out: np.ndarray,
    cuts: Sequence[Cut] | None = None,
    offset: int = 0,
    numel: int | None = None,
    threads: int = 1,
    della_ranks: Sequence[np.ndarray] | None = None,
    della_cols: int = 0,
    keep_bytes: Sequence[np.ndarray | None] | None = None,
    defer: bool = False,
) -> None:
    """``out = base + λ·combine(op_i(vals_i·keep_i))`` in one pass (``stages.combine`` + base, bit for bit).

    ``vals`` are float32 or bfloat16 bit patterns as uint16; ``base`` and ``out`` float32, all one length: entries
    ``[offset, offset + len(out))`` of a tensor of ``numel`` entries (default: the whole tensor). ``base=None``:
    ``out`` gets the merged delta ``combine(…)·λ`` alone. Which entries model ``i`` keeps comes from ``pattern``
    (from :func:`keep_pattern`, same length), or from ``cuts[i]`` (a :class:`~searchmerge.store.ranks.Cut` on the
    whole tensor: one pass with its thresholds, then the entries it lists recomputed with its exact rule), or
    from neither (all kept). ``ops[i]`` is ``("none",)``, ``("div", d)`` or ``("mul", c)``. DELLA cuts also take
    each model's within-row magnitude ranks (``della_ranks[i]``, the same entries as ``vals[i]``; any array of
    the right length for a model that keeps everything) and the tensor's row length ``della_cols``. ``keep_bytes``
    (instead of ``cuts``): each model's keep bit per entry as a byte (``None``: all kept), as a pass before this
    one drew them (the L1 sums' pass), over the same entries as ``vals``.
    """
    numel = offset + len(out) if numel is None else numel
    setup = _combine_setup(vals, pattern, ops, weights, consensus, merge_func, lambda_, base, out, offset, numel)
    if cuts is not None and (pattern is not None or len(cuts) != len(vals)):
        raise ValueError(f"fused_combine_into: {len(cuts)} cuts for {len(vals)} models (and no pattern).")
    if keep_bytes is not None:  # keep bits drawn before: the cuts only fill the threshold arguments
        if cuts is not None or pattern is not None or len(keep_bytes) != len(vals) or any(
                b is not None and len(b) != len(out) for b in keep_bytes):
            raise ValueError("fused_combine_into: keep bytes per model over the same entries, and no cuts or pattern.")
        cuts = [Cut(ALL)] * len(vals)
        kinds = tuple("all" if b is None else "byte" for b in keep_bytes)
    elif cuts is not None:
        cuts = _uniform_cuts(cuts, numel)
        kinds = tuple(c.kind if c.kind in ("random", "della") else "range" for c in cuts)
    else:
        kinds = None
    thresholds = () if cuts is None else (np.array([c.lo for c in cuts], dtype=np.uint32),
                                          np.array([c.hi for c in cuts], dtype=np.uint32), *_rand_arrays(cuts))
    della = kinds is not None and "della" in kinds
    if della and (della_ranks is None or len(della_ranks) != len(vals) or any(len(r) != len(out) for r in della_ranks)):
        raise ValueError("fused_combine_into: DELLA cuts need each model's ranks over the same entries.")
    della_scalars = () if not della else (
        np.array([c.della[0] for c in cuts], dtype=np.float32), np.array([c.della[1] for c in cuts], dtype=np.float32),
        della_span(della_cols))

    narrow = numel < 1 << 32  # every index fits a uint32: draws from a 16-lane induction variable

    def piece(ilp: bool, s: int, e: int) -> None:
        combine_kernel(*setup.config, kinds, setup.based, ilp, narrow=narrow)(
            *[x[s:e] for x in vals],
            *(() if pattern is None else (pattern[s:e],)),
            *thresholds,
            *(() if cuts is None else (np.int64(offset + s),)),
            *([r[s:e] for r in della_ranks] + list(della_scalars) if della else ()),
            *(() if keep_bytes is None else [b[s:e] for b in keep_bytes if b is not None]),
            *setup.scalars,
            *(() if base is None else (base[s:e],)),
            out[s:e],
        )

    fixes = cuts is not None and any(len(c.fix) for c in cuts)
    _by_order(offset, len(out), numel, threads, piece, defer and not fixes)  # fixes are rewritten after the pass
    if not fixes:
        return
    # entries tied at a cut that keeps part of its ties: recompute them with the exact rules
    fix = np.unique(np.concatenate([c.fix for c in cuts]))
    _recompute(setup, vals, cuts, fix[(fix >= offset) & (fix < offset + len(out))] - offset, base, out, offset,
               numel)


@dataclass
class Listing:
    """What a flagged pass leaves to finish: the undecided entries (ascending ``at``), each model's value at them
    (``values[i]``, float32) and the base's (``bases``), and the pass's configuration and output."""

    setup: _Combine
    at: np.ndarray
    values: np.ndarray  # (models, entries) float32
    bases: np.ndarray
    out: np.ndarray


def flagged_pass(
    vals: Sequence[np.ndarray],
    pending: Sequence[Pending],
    ops: Sequence[tuple],
    weights: Sequence[float],
    *,
    consensus: str | None,
    merge_func: str,
    lambda_: float,
    base: np.ndarray | None,
    out: np.ndarray,
    threads: int = 1,
) -> Listing:
    """The first half of :func:`flagged_combine_into`: ``out`` for the entries the rules decide, and the listing of
    the others (which :func:`finish_listing` recomputes once their exact cuts are known)."""
    numel = len(out)
    setup = _combine_setup(vals, None, ops, weights, consensus, merge_func, lambda_, base, out, 0, numel)
    if len(pending) != len(vals):
        raise ValueError(f"flagged_combine_into: {len(pending)} rules for {len(vals)} models.")
    u32 = lambda f: np.array([getattr(p, f) for p in pending], dtype=np.uint32)  # noqa: E731
    zeros = np.zeros(len(vals), dtype=np.uint32)
    rules = (u32("lo"), u32("hi"), u32("flo"), u32("fhi"), zeros, zeros, zeros)
    upper = any(p.hi != NONE_BITS or p.fhi != NONE_BITS for p in pending)
    kinds = ("flag" if upper else "flag_ge",) * len(vals)
    bound = sum(p.size for p in pending)  # the undecided entries lie in the cuts' bins
    parts: dict[int, tuple] = {}

    def piece(ilp: bool, s: int, e: int) -> None:
        listing = (np.empty(bound, np.int64), np.empty((len(vals), bound), np.float32), np.empty(bound, np.float32))
        count = combine_kernel(*setup.config, kinds, setup.based, ilp)(
            *[x[s:e] for x in vals], *rules, np.int64(s), *listing, *setup.scalars,
            *(() if base is None else (base[s:e],)), out[s:e],
        )
        if count < 0:
            raise RuntimeError(f"order statistics out of date: more than {bound} undecided entries")
        parts[s] = (listing[0][:count], listing[1][:, :count], listing[2][:count])

    _by_order(0, numel, numel, threads, piece)
    ordered = [parts[s] for s in sorted(parts)]
    if len(ordered) == 1:
        return Listing(setup, *ordered[0], out)
    return Listing(setup, np.concatenate([p[0] for p in ordered]), np.concatenate([p[1] for p in ordered], axis=1),
                   np.concatenate([p[2] for p in ordered]), out)


def finish_listing(listing: Listing, vals: Sequence[np.ndarray], base: np.ndarray | None, cuts: Sequence[Cut]) -> None:
    """Recompute a flagged pass's listed entries with the exact ``cuts`` (the bits of :func:`fused_combine_into`
    with them): from the listing, in order, writing only ``out`` at the listed indices."""
    if len(listing.at):
        _recompute(listing.setup, list(listing.values), _uniform_cuts(cuts, len(listing.out)), listing.at, base,
                   listing.out, 0, len(listing.out), listed_base=listing.bases)


def flagged_combine_into(
    vals: Sequence[np.ndarray],
    pending: Sequence[Pending],
    resolve: Callable[[np.ndarray, np.ndarray], Sequence[Cut]],
    ops: Sequence[tuple],
    weights: Sequence[float],
    *,
    consensus: str | None,
    merge_func: str,
    lambda_: float,
    base: np.ndarray | None,
    out: np.ndarray,
    threads: int = 1,
) -> list[Cut]:
    """:func:`fused_combine_into` over a whole tensor for keep rules known only up to the histogram bins that hold
    their cuts (:class:`~searchmerge.store.ranks.Pending`), without a scan of ``vals`` for the exact cuts.

    One pass keeps the entries certainly kept and lists, block by block while they are in cache, the entries where
    some model's keep is undecided (their index, every model's value and the base); ``resolve(at, values)`` gets
    that listing (ascending indices; ``values[i][t]`` is model ``i``'s value at ``at[t]``), which includes every
    entry of every cut's bin, and returns the exact cuts; the listed entries are then recomputed from the listing
    with those cuts' exact rules. Returns the exact cuts (the next trial of the same stage applies them with
    :func:`fused_combine_into`). The bits are :func:`fused_combine_into`'s with those cuts.
    """
    listing = flagged_pass(vals, pending, ops, weights, consensus=consensus, merge_func=merge_func, lambda_=lambda_,
                           base=base, out=out, threads=threads)
    cuts = list(resolve(listing.at, listing.values))
    finish_listing(listing, vals, base, cuts)
    return cuts


def _recompute(setup: _Combine, vals: Sequence[np.ndarray], cuts: Sequence[Cut], at: np.ndarray,
               base: np.ndarray | None, out: np.ndarray, offset: int, numel: int,
               listed_base: np.ndarray | None = None) -> None:
    """Entries ``at`` (ascending, relative to ``offset``) recomputed with the cuts' exact rules (a gather variant
    of the kernel), each in the sum order of its column. ``listed_base`` given: ``vals`` and it are a listing of
    those entries (``vals[i][t]``, ``listed_base[t]`` at entry ``at[t]``), read in order instead of gathered."""
    if not len(at):
        return
    rules = _rule_arrays([c.rule for c in cuts])
    kinds = tuple(c.rule[0] for c in cuts)
    listed = listed_base is not None
    cut = int(np.searchsorted(at, plain_count(numel) - offset))  # torch's tail order from there on
    for ilp, sl in ((False, slice(0, cut)), (True, slice(cut, len(at)))):
        if sl.stop > sl.start:
            b = () if base is None else (listed_base[sl],) if listed else (base,)
            combine_kernel(*setup.config, kinds, setup.based, ilp, True, listed)(
                *([x[sl] for x in vals] if listed else vals), at[sl], *rules, *_rand_arrays(cuts), np.int64(offset),
                *setup.scalars, *b, out,
            )


def _uniform_ops(ops: Sequence[tuple]) -> list[tuple]:
    """``none`` written as the other models' rescale by 1 (``x/1`` and ``x·1`` are exact): fewer kernel variants."""
    kinds = {op[0] for op in ops} - {"none"}
    if len(kinds) != 1:
        return list(ops)
    (kind,) = kinds
    return [(kind, 1.0) if op[0] == "none" else op for op in ops]


def _uniform_cuts(cuts: Sequence[Cut], numel: int) -> list[Cut]:
    """Every model's cut in one kind (keep-all as a range or a random mask that keeps every draw, ``x·1`` being
    exact; rules as bands), so a stage compiles one kernel whatever its per-model densities."""
    random = any(c.kind == "random" for c in cuts)
    della = any(c.kind == "della" for c in cuts)
    out = []
    for c in cuts:
        if c.kind == "all":
            c = (DELLA_ALL if della else Cut(("random", 0, 0, -1, NONE_BITS, -1), rand=(0, 0, 1 << 24)) if random
                 else Cut(("band", 0, 0, numel, NONE_BITS, -1), 0, NONE_BITS))
        elif c.rule[0] == "lower":
            c = Cut(("band", *c.rule[1:4], NONE_BITS, -1), c.lo, c.hi, c.fix, c.rand)
        out.append(c)
    return out


def _rule_arrays(keeps: Sequence[tuple]) -> tuple[np.ndarray, ...]:
    """The per-model parameters (lc, lq, lr, uc, up) of :data:`~searchmerge.store.ranks.Keep` rules."""
    return (
        np.array([k[1] for k in keeps], dtype=np.uint32),
        np.array([k[2] for k in keeps], dtype=np.int64),
        np.array([k[3] for k in keeps], dtype=np.int64),
        np.array([k[4] for k in keeps], dtype=np.uint32),
        np.array([k[5] for k in keeps], dtype=np.int64),
    )


