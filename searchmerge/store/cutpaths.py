"""Merge paths whose sparsify stage is a per-entry keep rule applied inside the fused pass (no mask materialised).

Mixed into :class:`~searchmerge.store.paths.MergePaths` (which provides ``_combine_into``, and with the worker
``taus``, ``cache``, ``order_stats``, ``l1_norms``, ``threads`` and ``unit_cache_fits``):

* TIES per tensor and whole model, breadcrumbs: :mod:`~searchmerge.store.ranks` cut rules from order statistics
  (one scan of each τ for its cut, then the fused pass) — a new density costs about two passes, not a sort;
* DARE (``dare_ties`` with ``trim_density: 1``, ``dare_linear``): the counter-based draws of
  ``sparsify.random_mask`` computed entry by entry inside the fused pass — a new density or seed costs one pass
  (plus, for ``rescale: l1``, one pass per model writing the masked |τ| that torch sums as the core does).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from searchmerge.merge import tensor_rng
from searchmerge.methods.sparsify import mask_key
from searchmerge.store import kernels, ranks
from searchmerge.store.stages import Combine, Stage, deliver, output_buffer, scale_add_into

F32 = torch.float32

#: cache priorities: rebuilt by a fused pass (masks, merged deltas, cut rules) < rebuilt by the method (SVDs, …)
CHEAP, COSTLY = 0, 1


class CutPaths:
    """Keep-rule merge paths (a mixin of :class:`~searchmerge.store.paths.MergePaths`)."""

    def _hist(self, k: str, i: int) -> ranks.Hist:
        """Model ``i``'s magnitude histogram for tensor ``k``: built on first use (one pass), then kept."""
        h = self.order_stats.get((k, i))
        if h is None:
            h = self.order_stats[(k, i)] = ranks.histogram(kernels.as_kernel_array(self.taus[k][i].reshape(-1)))
        return h

    def _cut_stage(self, k: str, stage: Stage, sel: Sequence[int], taus: Sequence[torch.Tensor]) -> bool:
        """Whether the stage is a keep rule the fused pass can apply: a magnitude trim (TIES per tensor or whole
        model, breadcrumbs; no L1 rescale) on finite task vectors, or DARE's random drop with no trim after it; on
        float32 or bfloat16 task vectors."""
        if stage.post_density is not None or not taus:
            return False
        if len({t.dtype for t in taus}) != 1 or taus[0].dtype not in (F32, torch.bfloat16):
            return False
        if stage.sparsification == "random":
            return stage.thresholds is None
        if stage.thresholds is not None:
            ok = stage.sparsification is None
        else:
            ok = stage.sparsification in ("magnitude", "magnitude_outliers") and stage.rescale in ("none", "inverse")
        return ok and all(self._hist(k, i).finite for i in sel)

    def _cuts(self, k: str, stage: Stage, sel: Sequence[int],
              taus: Sequence[torch.Tensor]) -> tuple[list[ranks.Cut], list[tuple], bool]:
        """Each selected model's keep rule and rescale for tensor ``k`` (cached, a few bytes each), and whether
        they were cached."""
        key = ("keeps", k, stage, tuple(sel))
        hit = self.cache.get(key)
        if hit is not None:
            return hit[0], hit[1], True
        n = taus[0].numel()
        if stage.sparsification == "random":
            cuts, ops = self._random_cuts(k, stage, sel, taus)
        else:
            if stage.thresholds is not None:
                cuts = [ranks.threshold_keep(t, n) for t in stage.thresholds]
            else:
                def one(m: int) -> ranks.Cut:
                    gamma = 0.01 if stage.gamma is None else stage.gamma[m]
                    return ranks.stage_keep(stage.sparsification, stage.density[m], gamma,
                                            kernels.as_kernel_array(taus[m].reshape(-1)), self._hist(k, sel[m]))

                threads = self.threads if n >= kernels.MIN_PER_THREAD else 1  # small tensors: no pool hand-off
                cuts = kernels.map_threads(one, range(len(sel)), threads)
            ops = [("div", stage.density[m]) if stage.thresholds is None and stage.rescale == "inverse"
                   and stage.density[m] < 1 else ("none",) for m in range(len(sel))]
        self.cache.put(key, (cuts, ops), sum(c.nbytes for c in cuts), CHEAP)
        return cuts, ops, False

    def _random_cuts(self, k: str, stage: Stage, sel: Sequence[int],
                     taus: Sequence[torch.Tensor]) -> tuple[list[ranks.Cut], list[tuple]]:
        """DARE's masks as the merge core draws them: the tensor's generator gives one key per mask, in model order,
        skipping models at density 1 (``sparsify`` returns those unchanged); rescales as ``rescale_masked``."""
        rng = tensor_rng(stage.seed, k)
        cuts, ops = [], []
        for m, tau in enumerate(taus):
            d = stage.density[m]
            if d >= 1:
                cuts.append(ranks.Cut(ranks.ALL))
                ops.append(("none",))
                continue
            cut = ranks.random_cut(mask_key(rng), d)
            cuts.append(cut)
            if stage.rescale == "inverse":
                ops.append(("div", d))
            elif stage.rescale == "l1":
                ops.append(self._l1_op(k, sel[m], tau, cut))
            else:
                ops.append(("none",))
        return cuts, ops

    def _l1_op(self, k: str, i: int, tau: torch.Tensor, cut: ranks.Cut) -> tuple:
        """``rescale_masked``'s L1 factor: ``Σ|τ| / Σ|τ·mask|``, both summed by torch (its order and threads): the
        first once per tensor, the second over the masked |τ| one kernel pass writes."""
        before = self.l1_norms.get((k, i))
        if before is None:
            before = self.l1_norms[(k, i)] = tau.to(F32).abs().sum()
        scratch = getattr(self, "_l1_scratch", None)
        if scratch is None or scratch.numel() < tau.numel():  # one buffer, reused: no page faults per trial
            scratch = self._l1_scratch = torch.empty(max(t.numel() for t in self.base.values()), dtype=F32)
        masked = scratch[: tau.numel()]
        kernels.random_masked_abs(kernels.as_kernel_array(tau.reshape(-1)), cut.rand, masked.numpy())
        after = masked.sum()
        if before < 1e-7 or after < 1e-7:
            return ("none",)
        return ("mul", before / after)

    def _merge_cut(self, k: str, stage: Stage, comb: Combine, taus: list[torch.Tensor], sel: Sequence[int],
                   base: torch.Tensor, dst: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """One fused pass that applies the keep rules; with unit weights a stage's second trial keeps its merged
        delta (then ``base + λ·cached``: three streams)."""
        cuts, ops, seen = self._cuts(k, stage, sel, taus)
        target = output_buffer(dst, base, out_dtype)
        if all(w == 1.0 for w in comb.weight) and self.unit_cache_fits:
            key = ("combined", k, stage, comb.consensus, comb.merge_func, tuple(sel))
            unscaled = self.cache.get(key)
            nbytes = base.numel() * 4
            if unscaled is None and seen and self.cache.room(nbytes, CHEAP):  # a stage's 2nd trial: keep its delta
                unscaled = torch.empty(base.shape, dtype=F32, device=base.device)
                self._combine_into(replace(comb, lambda_=1.0), taus, ops, None, unscaled, cuts=cuts)
                self.cache.put(key, unscaled, nbytes, CHEAP)
            if unscaled is not None:
                scale_add_into(base, unscaled, comb.lambda_, target)
                return deliver(target, dst)
        self._combine_into(comb, taus, ops, base, target, cuts=cuts)
        return deliver(target, dst)
