"""The per-tensor merge paths of a store shard, and the shard's cache.

:class:`MergePaths` is mixed into :class:`~searchmerge.store.worker.ShardWorker`, which provides ``base`` and
``taus`` (θ₀ and τ_i per tensor name), ``cache`` (an :class:`LRU`), ``order_stats`` (a dict), ``unit_cache_fits``,
``chunk``, ``threads``, ``n_layers`` and ``_sparse``. Each path gives the merge core's tensors (bit for bit for delta methods): the
generic path (the method's own per-tensor function), task arithmetic and the TIES family as fused passes,
cached merged deltas for unit weights, and cached unit-scale results for ``final_scale`` methods.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from searchmerge.merge import DTYPES, merge_tensor, tensor_rng
from searchmerge.recipe import Recipe, layer_fraction, resolve_params
from searchmerge.store import kernels, ranks
from searchmerge.store.cutpaths import COSTLY, CutPaths
from searchmerge.store.stages import (
    Combine,
    Sparse,
    Stage,
    deliver,
    output_buffer,
    combine,
    scale_add_into,
    split_gta,
    weighted_sum_into,
)
from searchmerge.store.sumorder import safe_chunks

F32 = torch.float32


class LRU:
    """A byte-bounded least-recently-used cache that never evicts what the current trial already used.

    Plain LRU thrashes when one trial's masks do not all fit (every lookup misses); here an insertion that
    would evict an entry of the current trial is dropped instead, so the part that fits keeps hitting. Entries
    carry a priority: an insertion never evicts entries of a higher one (the unit-scale results of TSV-M / ISO-C,
    seconds of SVDs each, stay while a search tries TIES densities whose entries cost one fused pass to rebuild).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.items: OrderedDict[Any, list] = OrderedDict()  # key -> [value, nbytes, epoch, priority]
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.epoch = 0

    def new_trial(self) -> None:
        self.epoch += 1

    def __contains__(self, key: Any) -> bool:
        """Whether ``key`` is held (no hit or miss counted, no recency change)."""
        return key in self.items

    def get(self, key: Any) -> Any:
        entry = self.items.get(key)
        if entry is not None:
            self.items.move_to_end(key)
            entry[2] = self.epoch
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def _victims(self, nbytes: int, priority: int, skip: Any = None) -> list | None:
        """Keys to evict so that ``nbytes`` more fit (oldest first, never this trial's or a higher priority's);
        ``None`` when they cannot be found."""
        need = self.bytes + nbytes - self.capacity - (self.items[skip][1] if skip in self.items else 0)
        victims, freed = [], 0
        if need <= 0:
            return victims
        for k, (_, size, epoch, prio) in self.items.items():  # oldest first; epochs never decrease along it
            if epoch == self.epoch:
                break
            if prio <= priority and k != skip:
                victims.append(k)
                freed += size
                if freed >= need:
                    return victims
        return None

    def room(self, nbytes: int, priority: int = 0) -> bool:
        """Whether :meth:`put` of ``nbytes`` would be kept (check before computing an expensive value)."""
        return nbytes <= self.capacity and self._victims(nbytes, priority) is not None

    def put(self, key: Any, value: Any, nbytes: int, priority: int = 0) -> None:
        if nbytes > self.capacity:
            return
        victims = self._victims(nbytes, priority, skip=key)
        if victims is None:
            return  # only this trial's or more valuable entries left: keep them, skip this one
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]
        for k in victims:
            self.bytes -= self.items.pop(k)[1]
        self.items[key] = [value, nbytes, self.epoch, priority]
        self.bytes += nbytes

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


def _freeze(v: Any) -> Any:
    """A hashable form of a resolved parameter value (lists of per-model values become tuples)."""
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


class MergePaths(CutPaths):
    """Per-tensor merge paths (a mixin of :class:`~searchmerge.store.worker.ShardWorker`)."""

    def _merge_one(self, recipe: Recipe, k: str, sel: Sequence[int], stats: Any, dst: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
        spec = recipe.spec
        params = resolve_params(recipe, k, layer_fraction(k, self.n_layers))
        base = self.base[k]
        split = split_gta(spec, params, stats, recipe.seed) if recipe.dtype == "float32" else None
        if split is None and self._final_scale_cacheable(recipe, base):
            return self._merge_final_scale(recipe, k, params, sel, stats, base, dst, out_dtype)
        if split is None:  # generic path: the merge core's own per-tensor function
            out = merge_tensor(
                spec, base, [self.taus[k][i] for i in sel], params,
                rng=tensor_rng(recipe.seed, k) if spec.uses_rng else None, stats=stats,
                compute_dtype=DTYPES[recipe.dtype], inputs_are_deltas=True,
            ).to(out_dtype)
            return deliver(out, dst)
        stage, comb = split
        taus = [self.taus[k][i] for i in sel]
        fused = self._kernels_ok(base, len(taus))
        if stage.trivial and comb.consensus is None and taus:  # task arithmetic: fused, bandwidth-bound path
            target = output_buffer(dst, base, out_dtype)
            if fused:
                mean = comb.merge_func == "mean"
                self._kernel_into(lambda vals, b, out, s, n, defer: kernels.weighted_sum_into(
                    vals, comb.weight, mean=mean, lambda_=comb.lambda_, base=b, out=out, offset=s, numel=n,
                    threads=self.threads, defer=defer), taus, base, target, defer=target is dst or dst is None)
            else:
                weighted_sum_into(comb, base, taus, target, chunk=self.chunk * 4)
            return deliver(target, dst)
        if fused and self._cut_stage(k, stage, sel, taus):  # TIES / breadcrumbs / DARE: cut rules, no masks
            return self._merge_cut(k, stage, comb, taus, sel, base, dst, out_dtype)
        if not stage.trivial and all(w == 1.0 for w in comb.weight):
            key = ("combined", k, stage, comb.consensus, comb.merge_func, tuple(sel))
            if self.unit_cache_fits:  # all of this shard's merged deltas fit: else masks only (no crowding out)
                return self._merge_unit_weights(key, k, stage, comb, taus, sel, base, dst, out_dtype)
        reprs = [Sparse(t.numel()) for t in taus] if stage.trivial else self._sparse(k, stage, sel)
        if fused:
            target = output_buffer(dst, base, out_dtype)
            pattern = self._keep_pattern(k, stage, sel, reprs)
            sources = [r.dense if r.dense is not None else t for r, t in zip(reprs, taus)]
            ops = [("none",) if r.dense is not None else r.op for r in reprs]
            self._combine_into(comb, sources, ops, base, target, pattern=pattern)
            return deliver(target, dst)
        target = output_buffer(dst, base, out_dtype)
        flat = target.view(-1)
        b = base.reshape(-1)
        # sign election makes ~3x more passes per chunk than a weighted sum; plain sums amortise op overhead better
        step = self.chunk if comb.consensus is not None else self.chunk * 4
        for s, e in safe_chunks(b.numel(), step):  # torch's sum order stays that of the whole tensor
            merged = b[s:e].to(F32) + combine(comb, [r.chunk(t, s, e) for r, t in zip(reprs, taus)])
            flat[s:e].copy_(merged)
        return deliver(target, dst)

    # --- fused kernels --------------------------------------------------------------------------------

    def _kernels_ok(self, base: torch.Tensor, n_models: int) -> bool:
        """Whether the generated CPU kernels can merge this tensor (a one-entry tensor of 8+ models is summed by
        torch in another order: it takes the torch path)."""
        return (kernels.available() and base.device.type == "cpu" and 0 < n_models <= kernels.MAX_MODELS
                and not (base.numel() == 1 and n_models >= 8))

    def _kernel_into(self, run: Any, sources: Sequence[torch.Tensor], base: torch.Tensor | None,
                     target: torch.Tensor, defer: bool = False) -> None:
        """``run(vals, base, out, offset, numel, defer)`` over the whole tensor zero-copy (float32 base and target,
        float32 or bfloat16 sources), or chunk by chunk on float32 copies; the same bits either way. ``defer``: the
        whole-tensor pass may finish after this returns (inside ``threadpool.deferred``: nothing reads ``target``
        before that block ends); chunks are copied out, so they never defer."""
        flat_out = target.detach().view(-1)
        flat_base = None if base is None else base.reshape(-1)
        flat = [x.reshape(-1) for x in sources]
        n = flat_out.numel()
        whole = (flat_out.dtype == F32 and (flat_base is None or flat_base.dtype == F32)
                 and len({x.dtype for x in flat}) == 1 and flat[0].dtype in (F32, torch.bfloat16))
        if whole:
            run([kernels.as_kernel_array(x) for x in flat], None if flat_base is None else flat_base.numpy(),
                flat_out.numpy(), 0, n, defer)
            return
        for s in range(0, n, self.chunk * 4):
            e = min(n, s + self.chunk * 4)
            out32 = torch.empty(e - s, dtype=F32)
            run([x[s:e].to(F32).numpy() for x in flat], None if flat_base is None else flat_base[s:e].to(F32).numpy(),
                out32.numpy(), s, n, False)
            flat_out[s:e].copy_(out32)

    def _combine_into(self, comb: Combine, sources: Sequence[torch.Tensor], ops: Sequence[tuple],
                      base: torch.Tensor | None, target: torch.Tensor, *, pattern: np.ndarray | None = None,
                      cuts: Sequence[ranks.Cut] | None = None,
                      della: tuple[Sequence[np.ndarray], int] | None = None,
                      keep_bytes: Sequence[np.ndarray | None] | None = None, defer: bool = False) -> None:
        """``target = base + combine(stage(τ))`` (``base=None``: the merged delta) in one fused CPU pass (``della``:
        DELLA cuts' ranks per model and row length; ``keep_bytes``: each model's keep bits, drawn before)."""
        def run(vals: list, b: Any, out: np.ndarray, s: int, n: int, whole_defer: bool) -> None:
            kernels.fused_combine_into(
                vals, None if pattern is None else pattern[s:s + len(out)], ops, comb.weight,
                consensus=comb.consensus, merge_func=comb.merge_func, lambda_=comb.lambda_, base=b, out=out,
                cuts=cuts, offset=s, numel=n, threads=self.threads,
                della_ranks=None if della is None else [r[s:s + len(out)] for r in della[0]],
                della_cols=0 if della is None else della[1],
                keep_bytes=None if keep_bytes is None else [None if b is None else b[s:s + len(out)]
                                                            for b in keep_bytes],
                defer=whole_defer,
            )

        self._kernel_into(run, sources, base, target, defer)

    # --- cached results -------------------------------------------------------------------------------

    def _final_scale_cacheable(self, recipe: Recipe, base: torch.Tensor) -> bool:
        """A method whose result is ``f(…)·λ`` (declared ``final_scale``), in float32, with room to cache f."""
        return (recipe.spec.final_scale is not None and recipe.dtype == "float32" and base.dtype == F32
                and self.unit_cache_fits)

    def _merge_final_scale(self, recipe: Recipe, k: str, params: dict[str, Any], sel: Sequence[int], stats: Any,
                           base: torch.Tensor, dst: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """``base + f(1)·λ`` with f(1) — the method's result at unit scale (e.g. TSV-M's SVD merge) — cached per
        tensor and every other parameter: a trial that changes only λ skips the SVDs. Bit-identical to the core
        (``b + f·λ``; ``f·1.0`` is exact)."""
        spec = recipe.spec
        scale = spec.final_scale
        rest = tuple(sorted((n, _freeze(v)) for n, v in params.items() if n != scale))
        key = ("final", k, spec.name, rest, tuple(sel), recipe.seed if spec.uses_rng else None)
        unscaled = self.cache.get(key)
        if unscaled is None:
            b = base.to(F32)
            unscaled = spec(b, [self.taus[k][i].to(F32) for i in sel], {**params, scale: 1.0},
                            rng=tensor_rng(recipe.seed, k) if spec.uses_rng else None, stats=stats).to(F32)
            self.cache.put(key, unscaled, unscaled.numel() * unscaled.element_size(), COSTLY)
        target = output_buffer(dst, base, out_dtype)
        scale_add_into(base, unscaled, float(params.get(scale, spec.param(scale).default)), target)
        return deliver(target, dst)

    def _keep_pattern(self, k: str, stage: Stage, sel: Sequence[int], reprs: Sequence[Sparse]) -> np.ndarray | None:
        """Which models keep each entry, one byte (word) per entry, cached beside the masks (``None``: all kept)."""
        bits = [None if r.dense is not None else r.bits for r in reprs]
        if all(b is None for b in bits):
            return None
        key = ("pattern", k, stage, tuple(sel))
        hit = self.cache.get(key)
        if hit is None:
            hit = kernels.keep_pattern(bits, reprs[0].numel)
            self.cache.put(key, hit, hit.nbytes)
        return hit

    def _merge_unit_weights(self, key: Any, k: str, stage: Stage, comb: Combine, taus: list[torch.Tensor],
                            sel: Sequence[int], base: torch.Tensor, dst: torch.Tensor | None,
                            out_dtype: torch.dtype) -> torch.Tensor:
        """All weights 1 (FusionBench's TIES/DARE; a λ search): the merged delta before λ depends only on the
        stage, so it is cached whole and a trial is ``base + λ·cached`` — the same float32 operations as
        ``combine`` (``merged·λ``, then ``+ base``; ``x·1.0`` is exact), at task-arithmetic cost."""
        unscaled = self.cache.get(key)
        if unscaled is None:
            reprs = self._sparse(k, stage, sel, store=False)  # the combined entry replaces the masks
            unit = replace(comb, lambda_=1.0)
            unscaled = torch.empty(base.numel(), dtype=F32, device=base.device)
            for s, e in safe_chunks(base.numel(), self.chunk * 4):
                unscaled[s:e] = combine(unit, [r.chunk(t, s, e) for r, t in zip(reprs, taus)])
            self.cache.put(key, unscaled, unscaled.numel() * unscaled.element_size())
        target = output_buffer(dst, base, out_dtype)
        scale_add_into(base, unscaled, comb.lambda_, target)
        return deliver(target, dst)
