"""Merge paths whose sparsify stage is a per-entry keep rule applied inside the fused pass (no mask materialised).

Mixed into :class:`~searchmerge.store.paths.MergePaths` (which provides ``_combine_into``, and with the worker
``taus``, ``cache``, ``order_stats``, ``l1_norms``, ``threads`` and ``unit_cache_fits``):

* TIES per tensor and breadcrumbs: :mod:`~searchmerge.store.ranks` cut rules from order statistics. A new
  density takes the flagged pass (the histograms give each cut's bin; the pass keeps what lies above it, lists
  that bin's entries while they are in cache, and the listing gives the exact cuts and the entries to recompute):
  one pass, not a scan plus a pass, nor a sort. Cached cuts (a stage's later trials) and chunked targets take the
  plain fused pass. TIES' whole-model trim: thresholds from the driver (order statistics + one scan per τ), or
  with one actor from the shard's own flagged passes (:mod:`~searchmerge.store.modeltrim`);
* DARE (``dare_ties`` with ``trim_density: 1``, ``dare_linear``): the counter-based draws of
  ``sparsify.random_mask`` computed entry by entry inside the fused pass — a new density or seed costs one pass
  (plus, for ``rescale: l1``, one read pass per model summing the masked |τ| in torch's order, as the core sums);
* DELLA (``della``, ``della_linear``): the same draws against ``sparsify.della_mask``'s rank-dependent keep
  probability, from each τ's within-row magnitude ranks — computed once per tensor and model (the only sort,
  on the first DELLA trial) and kept beside the order statistics (2 bytes an entry; 4 for rows over 65,536).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from searchmerge.merge import tensor_rng
from searchmerge.methods.sparsify import mask_key
from searchmerge.store import kernels, l1sums, ranks, rankscan, rowranks
from searchmerge.store.stages import Combine, Stage, deliver, output_buffer, scale_add_into
from searchmerge.store.threadpool import MIN_PER_THREAD, map_threads

F32 = torch.float32

#: cache priorities: rebuilt by a fused pass (masks, merged deltas, cut rules) < rebuilt by the method (SVDs, …)
CHEAP, COSTLY = 0, 1


class CutPaths:
    """Keep-rule merge paths (a mixin of :class:`~searchmerge.store.paths.MergePaths`)."""

    def _hist(self, k: str, i: int) -> rankscan.Hist:
        """Model ``i``'s magnitude histogram for tensor ``k``: built on first use (one pass), then kept."""
        h = self.order_stats.get((k, i))
        if h is None:
            h = self.order_stats[(k, i)] = rankscan.histogram(kernels.as_kernel_array(self.taus[k][i].reshape(-1)))
        return h

    def _cut_stage(self, k: str, stage: Stage, sel: Sequence[int], taus: Sequence[torch.Tensor]) -> bool:
        """Whether the stage is a keep rule the fused pass can apply: a magnitude trim (TIES per tensor or whole
        model, breadcrumbs; no L1 rescale) on finite task vectors, or DARE's random drop with no trim after it; on
        float32 or bfloat16 task vectors."""
        if stage.post_density is not None or not taus:
            return False
        if len({t.dtype for t in taus}) != 1 or taus[0].dtype not in (F32, torch.bfloat16):
            return False
        if stage.sparsification in ("random", "della_magprune"):
            return stage.thresholds is None
        if stage.thresholds is not None:
            ok = stage.sparsification is None
        else:
            ok = stage.sparsification in ("magnitude", "magnitude_outliers") and stage.rescale in ("none", "inverse")
        return ok and all(self._hist(k, i).finite for i in sel)

    def _cuts(self, k: str, stage: Stage, sel: Sequence[int], taus: Sequence[torch.Tensor]
              ) -> tuple[list[ranks.Cut], list[tuple], bool, list[np.ndarray | None] | None]:
        """Each selected model's keep rule and rescale for tensor ``k`` (cached, a few bytes each), whether they
        were cached, and — when the L1 factors' pass drew the masks just now — each model's keep bytes."""
        key = ("keeps", k, stage, tuple(sel))
        hit = self.cache.get(key)
        if hit is not None:
            return hit[0], hit[1], True, None
        n = taus[0].numel()
        keep_bytes = None
        if stage.sparsification in ("random", "della_magprune"):
            cuts, ops, keep_bytes = self._random_cuts(k, stage, sel, taus)
        else:
            if stage.thresholds is not None:
                cuts = [ranks.threshold_keep(t, n) for t in stage.thresholds]
            else:
                def one(m: int) -> ranks.Cut:
                    return ranks.stage_keep(stage.sparsification, stage.density[m], _gamma(stage, m),
                                            kernels.as_kernel_array(taus[m].reshape(-1)), self._hist(k, sel[m]))

                cuts = map_threads(one, range(len(sel)), self._scan_threads(n))
            ops = _trim_ops(stage, len(sel))
        self._keep_cuts(key, cuts, ops)
        return cuts, ops, False, keep_bytes

    def _keep_cuts(self, key: tuple, cuts: list[ranks.Cut], ops: list[tuple]) -> None:
        self.cache.put(key, (cuts, ops), sum(c.nbytes for c in cuts), CHEAP)

    def _scan_threads(self, n: int) -> int:
        return self.threads if n >= MIN_PER_THREAD else 1  # small tensors: no pool hand-off

    def _flaggable(self, k: str, stage: Stage, sel: Sequence[int], base: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether a new per-tensor trim can take the flagged pass (no scan for its cuts): its rules are not cached
        yet and the pass runs over the whole tensor in place (float32 base and target)."""
        return (stage.sparsification in ("magnitude", "magnitude_outliers") and stage.thresholds is None
                and base.dtype == F32 and target.dtype == F32 and target.is_contiguous()
                and ("keeps", k, stage, tuple(sel)) not in self.cache)

    def _flagged_into(self, k: str, stage: Stage, comb: Combine, taus: Sequence[torch.Tensor], sel: Sequence[int],
                      base: torch.Tensor, target: torch.Tensor) -> None:
        """``target = base + combine(trim(τ))`` for a trim density not seen before, in one flagged pass: the
        histograms give each cut's bin, the pass keeps what lies above it and lists that bin's entries, whose values
        give the exact cuts (cached for the next trial of the stage), and the listed entries are recomputed."""
        hists = [self._hist(k, i) for i in sel]
        method = stage.sparsification
        pending = [ranks.stage_pending(method, stage.density[m], _gamma(stage, m), h) for m, h in enumerate(hists)]

        def resolve(at, values) -> list[ranks.Cut]:  # noqa: ANN001
            def one(m: int) -> ranks.Cut:
                return ranks.stage_keep(method, stage.density[m], _gamma(stage, m), values[m], hists[m], at)

            return map_threads(one, range(len(sel)), self.threads if len(at) >= 1 << 14 else 1)

        ops = _trim_ops(stage, len(sel))
        cuts = kernels.flagged_combine_into(
            [kernels.as_kernel_array(t.reshape(-1)) for t in taus], pending, resolve, ops, comb.weight,
            consensus=comb.consensus, merge_func=comb.merge_func, lambda_=comb.lambda_,
            base=base.reshape(-1).numpy(), out=target.view(-1).numpy(), threads=self.threads,
        )
        self._keep_cuts(("keeps", k, stage, tuple(sel)), cuts, ops)

    def _random_cuts(self, k: str, stage: Stage, sel: Sequence[int], taus: Sequence[torch.Tensor]
                     ) -> tuple[list[ranks.Cut], list[tuple], list[np.ndarray | None] | None]:
        """DARE's and DELLA's masks as the merge core draws them: the tensor's generator gives one key per mask, in
        model order, skipping models at density 1 (``sparsify`` returns those unchanged); rescales as
        ``rescale_masked``. With L1 factors summed in torch's order, their pass also writes each entry's keep bit
        (a byte), which the combine then reads instead of drawing again (the draws are most of a pass's work)."""
        rng = tensor_rng(stage.seed, k)
        cols = ranks.della_cols(taus[0].shape)
        n = taus[0].numel()
        cuts: list[ranks.Cut] = []
        for m in range(len(taus)):  # the keys, in model order
            d = stage.density[m]
            if d >= 1:
                cuts.append(ranks.Cut(ranks.ALL))
            elif stage.sparsification == "della_magprune":
                cuts.append(ranks.della_cut(mask_key(rng), d, _epsilon(stage, m), cols))
            else:
                cuts.append(ranks.random_cut(mask_key(rng), d))
        drawn = [m for m in range(len(taus)) if stage.density[m] < 1]
        ops: list[tuple] = [("none",)] * len(taus)
        keep_bytes: list[np.ndarray | None] | None = None
        if stage.rescale == "inverse":
            for m in drawn:
                d = stage.density[m]
                ops[m] = ("div", d) if d > 0 else ("none",)  # density 0 keeps nothing: no rescale (core)
        elif stage.rescale == "l1" and drawn:
            if stage.sparsification == "della_magprune":  # the L1 sums read the ranks
                self._sort_ranks(k, [sel[m] for m in drawn])
            if l1sums.in_order(n):
                scratch = self._keep_scratch(len(taus), n)
                keep_bytes = [scratch[m] if m in drawn else None for m in range(len(taus))]

            # the models' sums side by side on the actor's threads (one hand-off per tensor, not per model); a
            # lone model's sum splits across them instead (never both: pool threads do not wait on the pool)
            side = self._scan_threads(n) if keep_bytes is not None and len(drawn) > 1 else 1
            workers = self.threads if side == 1 else 1

            def l1(m: int) -> tuple:
                kb = None if keep_bytes is None else keep_bytes[m]
                return self._l1_op(k, sel[m], taus[m], cuts[m], kb, workers)

            for m, op in zip(drawn, map_threads(l1, drawn, side)):
                ops[m] = op
        return cuts, ops, keep_bytes

    def _keep_scratch(self, models: int, n: int) -> np.ndarray:
        """A (models, n) byte buffer for the keep bits of one tensor's trial, reused (no page faults per trial)."""
        buf = getattr(self, "_keep_buf", None)
        if buf is None or buf.shape[0] < models or buf.shape[1] < n:
            most = max(t.numel() for t in self.base.values())
            buf = self._keep_buf = np.empty((max(models, 0 if buf is None else buf.shape[0]), most), dtype=np.uint8)
        return buf[:models, :n]

    def _della_ranks(self, k: str, i: int) -> np.ndarray:
        """Each entry's 0-based rank by |τ| in its row (``sparsify.della_mask``'s rows; stable, as the core sorts),
        computed on first use — the one sort a DELLA search pays per tensor and model — then kept."""
        key = ("della_ranks", k, i)
        r = self.order_stats.get(key)
        if r is None:
            tau = self.taus[k][i]
            r = self.order_stats[key] = rowranks.row_ranks(kernels.as_kernel_array(tau.reshape(-1)),
                                                           ranks.della_cols(tau.shape))
        return r

    def _sort_ranks(self, k: str, models: Sequence[int]) -> None:
        """The first DELLA trial's sorts of tensor ``k`` for these models, on the actor's threads (numba's key pass
        and numpy's sort release the GIL)."""
        missing = [i for i in models if ("della_ranks", k, i) not in self.order_stats]
        if len(missing) > 1:
            map_threads(lambda i: self._della_ranks(k, i), missing, self._scan_threads(self.taus[k][0].numel()))

    def _ranks_for(self, k: str, sel: Sequence[int], cuts: Sequence[ranks.Cut]) -> list[np.ndarray] | None:
        """The ranks a DELLA stage's fused pass reads (a model keeping everything reads another's: unused)."""
        della = [m for m, c in enumerate(cuts) if c.kind == "della"]
        if not della:
            return None
        self._sort_ranks(k, [sel[m] for m in della])
        have = {m: self._della_ranks(k, sel[m]) for m in della}
        return [have.get(m, have[della[0]]) for m in range(len(cuts))]

    def _l1_op(self, k: str, i: int, tau: torch.Tensor, cut: ranks.Cut, keep_bytes: np.ndarray | None = None,
               workers: int = 1) -> tuple:
        """``rescale_masked``'s L1 factor: ``Σ|τ| / Σ|τ·mask|``, both in torch's summation order (and threads): the
        first summed by torch once per tensor, the second in one read pass that masks as it sums in that order
        (:mod:`~searchmerge.store.torchsum`) — or, where that order is not known, over the masked |τ| a kernel
        pass writes, summed by torch. ``keep_bytes``: where the pass also writes each entry's keep bit (order
        known only)."""
        before = self.l1_norms.get((k, i))
        if before is None:
            before = self.l1_norms[(k, i)] = np.float32(tau.to(F32).abs().sum().item())
        after = self._masked_l1(k, i, tau, cut, keep_bytes, workers)
        if before < l1sums.FLOOR or after < l1sums.FLOOR:  # torch compares float32 with the bound rounded to float32
            return ("none",)
        return ("mul", before / after)  # float32 ÷ float32, one rounding: the 0-dim tensors' quotient

    def _masked_l1(self, k: str, i: int, tau: torch.Tensor, cut: ranks.Cut,
                   keep_bytes: np.ndarray | None = None, workers: int = 1) -> np.float32:
        """``Σ|τ·mask|`` as torch sums it (:func:`l1sums.masked_abs_sum`; the scratch buffer, where no keep bytes are
        written, is one reused buffer: no page faults per trial)."""
        scratch = getattr(self, "_l1_scratch", None)
        if keep_bytes is None and (scratch is None or scratch.numel() < tau.numel()):
            scratch = self._l1_scratch = torch.empty(max(t.numel() for t in self.base.values()), dtype=F32)
        della = (self._della_ranks(k, i), ranks.della_cols(tau.shape)) if cut.kind == "della" else None
        return l1sums.masked_abs_sum(kernels.as_kernel_array(tau.reshape(-1)), cut, della, keep_bytes, scratch,
                                     workers)

    def _merge_cut(self, k: str, stage: Stage, comb: Combine, taus: list[torch.Tensor], sel: Sequence[int],
                   base: torch.Tensor, dst: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """One fused pass that applies the keep rules (a new trim density: the flagged pass, which finds its cuts
        as it goes); with unit weights a stage's second trial keeps its merged delta (then ``base + λ·cached``:
        three streams)."""
        target = output_buffer(dst, base, out_dtype)
        if self._flaggable(k, stage, sel, base, target):
            self.cache.misses += 1  # the rules were looked up, and are built now
            self._flagged_into(k, stage, comb, taus, sel, base, target)
            return deliver(target, dst)
        cuts, ops, seen, keep_bytes = self._cuts(k, stage, sel, taus)
        if keep_bytes is not None:  # the L1 sums' pass drew the masks: the combine reads their bits
            self._combine_into(comb, taus, ops, base, target, keep_bytes=keep_bytes)
            return deliver(target, dst)
        if all(w == 1.0 for w in comb.weight) and self.unit_cache_fits:
            key = ("combined", k, stage, comb.consensus, comb.merge_func, tuple(sel))
            unscaled = self.cache.get(key)
            nbytes = base.numel() * 4
            if unscaled is None and seen and self.cache.room(nbytes, CHEAP):  # a stage's 2nd trial: keep its delta
                unscaled = torch.empty(base.shape, dtype=F32, device=base.device)
                self._combine_into(replace(comb, lambda_=1.0), taus, ops, None, unscaled, cuts=cuts,
                                   della=self._della_inputs(k, sel, cuts, base))
                self.cache.put(key, unscaled, nbytes, CHEAP)
            if unscaled is not None:
                scale_add_into(base, unscaled, comb.lambda_, target)
                return deliver(target, dst)
        self._combine_into(comb, taus, ops, base, target, cuts=cuts, della=self._della_inputs(k, sel, cuts, base),
                           defer=target is dst or dst is None)
        return deliver(target, dst)

    def _della_inputs(self, k: str, sel: Sequence[int], cuts: Sequence[ranks.Cut],
                      base: torch.Tensor) -> tuple[list[np.ndarray], int] | None:
        r = self._ranks_for(k, sel, cuts)
        return None if r is None else (r, ranks.della_cols(base.shape))


def _epsilon(stage: Stage, m: int) -> float:
    """Model ``m``'s DELLA epsilon (the merge core's default 0.15 where the stage has none)."""
    return 0.15 if stage.epsilon is None else stage.epsilon[m]


def _gamma(stage: Stage, m: int) -> float:
    """Model ``m``'s breadcrumbs gamma (the merge core's default 0.01 where the stage has none)."""
    return 0.01 if stage.gamma is None else stage.gamma[m]


def _trim_ops(stage: Stage, n_models: int) -> list[tuple]:
    """The magnitude trims' rescale per model: ``÷ density`` for ``rescale: inverse`` below density 1."""
    return [("div", stage.density[m]) if stage.thresholds is None and stage.rescale == "inverse"
            and 0 < stage.density[m] < 1 else ("none",) for m in range(n_models)]
