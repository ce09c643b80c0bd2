"""TIES' whole-model trim (``trim_scope: model``) with a new density, in one flagged pass over the shard.

The merge core keeps, per model, ``|τ| ≥ t`` with ``t`` FusionBench's ``kthvalue`` over the whole model. The store
found ``t`` by radix selection: the high 16 bits of ``|τ|``'s bit pattern from the per-tensor histograms (no read
of τ), then the low 16 bits inside the selected bin from one scan of every τ — a scan plus the fused pass per trial.
With one actor (the default placement) the scan is gone: the driver sends the bin and the rank inside it
(:class:`PendingTrim`); the shard's flagged passes keep every entry above the bin, drop those below and list those
in it, and the listings' low 16 bits give ``t`` exactly (every entry of the bin, over the whole model, is listed);
then each tensor's listed entries are recomputed with ``|τ| ≥ t``. With several actors, or tensors the flagged
pass cannot take, the thresholds come from the scan as before (the driver's, or this shard's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from searchmerge.merge import DTYPES
from searchmerge.recipe import Recipe, layer_fraction, resolve_params
from searchmerge.store import kernels, ranks
from searchmerge.store.stages import Stage, output_buffer, split_gta

F32 = torch.float32


@dataclass(frozen=True)
class PendingTrim:
    """Per selected model, the high-16-bit bin holding the whole-model threshold and the threshold's rank in that
    bin (1-based), or ``None``: no trim (density ≥ 1, threshold 0)."""

    bins: tuple[tuple[int, int] | None, ...]


def radix_threshold(prefix: int, rest: int, low_counts: np.ndarray) -> float:
    """The ``rest``-th smallest (1-based) bit pattern among those with high bits ``prefix``, from the counts of
    their low 16 bits, as the float32 value ``kthvalue`` returns."""
    lo = int(np.searchsorted(np.cumsum(low_counts), rest))  # first low half whose cumulative count reaches rest
    return float(np.array([(int(prefix) << 16) | lo], dtype=np.int32).view(np.float32)[0])


def pending_trim(h1: np.ndarray, total: int, densities: Sequence[float]) -> tuple[PendingTrim, list[int]]:
    """From the per-model high-16-bit histograms of the whole model (``h1``, models × 2^15), each trimmed model's
    bin and rank in it (``kth_threshold``: the ``total − int(total·d)``-th smallest), and the models that trim."""
    bins: list[tuple[int, int] | None] = []
    need = []
    for i, d in enumerate(densities):
        k = total - int(total * d) if d < 1 else 0
        if k <= 0:
            bins.append(None)
            continue
        cum = np.cumsum(h1[i])
        b = int(np.searchsorted(cum, k))  # first bin with cumulative count >= k
        bins.append((b, k - (int(cum[b - 1]) if b > 0 else 0)))
        need.append(i)
    return PendingTrim(tuple(bins)), need


class ModelTrimPaths:
    """The flagged whole-model trim (a mixin of :class:`~searchmerge.store.worker.ShardWorker`)."""

    def _resolve_stats(self, recipe: Recipe, sel: Sequence[int], stats: Any,
                       targets: dict[str, torch.Tensor | None], out_dtypes: dict[str, torch.dtype]) -> tuple[Any, bool]:
        """``(stats, merged)``: the merge core's ``{"thresholds": …}`` for a :class:`PendingTrim` — from this
        shard's flagged passes, which then have written every tensor into ``targets`` (``merged``), or from its own
        scan; any other ``stats`` as given."""
        if not isinstance(stats, PendingTrim):
            return stats, False
        key = ("model_trim", stats, tuple(sel))
        hit = self.cache.get(key)
        if hit is None and self._flag_trim_ok(recipe, sel, targets, out_dtypes):
            thresholds = self._flagged_trim(recipe, sel, stats, targets)
            self.cache.put(key, thresholds, 64 + 8 * len(sel))
            return {"thresholds": thresholds}, True
        if hit is None:
            hit = self._scanned_trim(sel, stats)
            self.cache.put(key, hit, 64 + 8 * len(sel))
        return {"thresholds": list(hit)}, False

    def _flag_trim_ok(self, recipe: Recipe, sel: Sequence[int], targets: dict[str, torch.Tensor | None],
                      out_dtypes: dict[str, torch.dtype]) -> bool:
        """Whether every tensor can take the flagged pass: float32 in and out (a target written in place, if any),
        the generated kernels, finite float32/bfloat16 task vectors with order statistics."""
        if recipe.dtype != "float32" or not self._ranked_shard(sel):
            return False
        for k in self.names:
            dst = targets.get(k)
            if (self.base[k].dtype != F32 or out_dtypes[k] != F32 or not self._kernels_ok(self.base[k], len(sel))
                    or (dst is not None and (dst.dtype != F32 or not dst.is_contiguous()
                                             or dst.device != self.base[k].device))
                    or len({self.taus[k][i].dtype for i in sel}) != 1):
                return False
        return True

    def _scanned_trim(self, sel: Sequence[int], pending: PendingTrim) -> list[float]:
        """The thresholds from one scan of each τ for the low 16 bits inside its bin (this shard is the model)."""
        prefixes = [None if b is None else b[0] for b in pending.bins]
        h2 = self._trim_hist_ranked(sel, prefixes) if self._ranked_shard(sel) else \
            self._trim_hist_torch(Stage(), sel, prefixes)
        return [0.0 if b is None else radix_threshold(b[0], b[1], h2[m]) for m, b in enumerate(pending.bins)]

    def _flagged_trim(self, recipe: Recipe, sel: Sequence[int], pending: PendingTrim,
                      targets: dict[str, torch.Tensor | None]) -> list[float]:
        """Every tensor merged by a flagged pass into its target (``targets[k]`` filled in when ``None``), the
        thresholds resolved from the listings, the listed entries recomputed; returns the thresholds."""
        listings = {}
        placeholder = {"thresholds": [0.0] * len(sel)}
        for k in self.names:
            params = resolve_params(recipe, k, layer_fraction(k, self.n_layers))
            _, comb = split_gta(recipe.spec, params, placeholder, recipe.seed)
            base = self.base[k]
            target = output_buffer(targets.get(k), base, F32)
            targets[k] = target
            rules = [ranks.Pending() if b is None else self._bin_rule(k, i, b[0]) for i, b in zip(sel, pending.bins)]
            vals = [kernels.as_kernel_array(self.taus[k][i].reshape(-1)) for i in sel]
            flat_base = base.reshape(-1).numpy()
            listing = kernels.flagged_pass(
                vals, rules, [("none",)] * len(sel), comb.weight, consensus=comb.consensus,
                merge_func=comb.merge_func, lambda_=comb.lambda_, base=flat_base, out=target.view(-1).numpy(),
                threads=self.threads,
            )
            listings[k] = (listing, vals, flat_base)
        thresholds = []
        for m, b in enumerate(pending.bins):
            if b is None:
                thresholds.append(0.0)
                continue
            lows = []
            for listing, _, _ in listings.values():
                bits = listing.values[m].view(np.uint32) & np.uint32(0x7FFFFFFF)
                lows.append(bits[(bits >> 16) == b[0]] & np.uint32(0xFFFF))
            low = np.bincount(np.concatenate(lows), minlength=1 << 16)  # one count over the whole model
            thresholds.append(radix_threshold(b[0], b[1], low))
        for k, (listing, vals, flat_base) in listings.items():
            n = self.base[k].numel()
            kernels.finish_listing(listing, vals, flat_base, [ranks.threshold_keep(t, n) for t in thresholds])
        return thresholds

    def _bin_rule(self, k: str, i: int, b: int) -> ranks.Pending:
        """``|τ| ≥ t`` for a ``t`` in bin ``b``: above the bin kept, in it undecided (this tensor holds ``size``)."""
        hist = self._hist(k, i)
        at = int(np.searchsorted(hist.bins, b))
        size = int(hist.cum[at] - (hist.cum[at - 1] if at > 0 else 0)) if at < len(hist.bins) and hist.bins[at] == b \
            else 0
        return ranks.Pending((b + 1) << 16, ranks.NONE_BITS, b << 16, ranks.NONE_BITS, size)


def out_dtypes_of(base: dict[str, torch.Tensor], names: Sequence[str], out_dtype: str | None) -> dict[str, torch.dtype]:
    """Each tensor's output dtype (the recipe's ``out_dtype``, else the base tensor's)."""
    return {k: DTYPES[out_dtype] if out_dtype else base[k].dtype for k in names}
