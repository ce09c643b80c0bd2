"""The per-tensor merge paths of a store shard, and the shard's cache.

:class:`MergePaths` is mixed into :class:`~searchmerge.store.worker.ShardWorker`, which provides ``base`` and
``taus`` (θ₀ and τ_i per tensor name), ``cache`` (an :class:`LRU`), ``unit_cache_fits``, ``chunk``,
``n_layers`` and ``_sparse``. Each path gives the merge core's tensors (bit for bit for delta methods): the
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
from searchmerge.store import kernels
from searchmerge.store.stages import Combine, Sparse, Stage, combine, scale_add_into, split_gta, weighted_sum_into

F32 = torch.float32


class LRU:
    """A byte-bounded least-recently-used cache that never evicts what the current trial already used.

    Plain LRU thrashes when one trial's masks do not all fit (every lookup misses); here an insertion that
    would evict an entry of the current trial is dropped instead, so the part that fits keeps hitting.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.items: OrderedDict[Any, list] = OrderedDict()  # key -> [value, nbytes, epoch]
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.epoch = 0

    def new_trial(self) -> None:
        self.epoch += 1

    def get(self, key: Any) -> Any:
        entry = self.items.get(key)
        if entry is not None:
            self.items.move_to_end(key)
            entry[2] = self.epoch
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.capacity:
            return
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]
        while self.bytes + nbytes > self.capacity:
            oldest = next(iter(self.items.values()))
            if oldest[2] == self.epoch:
                return  # full of this trial's entries: keep them, skip this one
            self.bytes -= self.items.popitem(last=False)[1][1]
        self.items[key] = [value, nbytes, self.epoch]
        self.bytes += nbytes

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


def _output(dst: torch.Tensor | None, base: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where a merged tensor is computed: ``dst`` itself when it can be written in place, else a new tensor."""
    if dst is not None and dst.dtype == out_dtype and dst.is_contiguous() and dst.device == base.device:
        return dst
    return torch.empty(base.shape, dtype=out_dtype, device=base.device)


def _deliver(target: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
    """``dst`` filled with ``target`` (a no-op when it was computed in place), or ``target`` when there is no ``dst``."""
    if dst is None or target is dst:
        return target
    dst.copy_(target)
    return dst


def _freeze(v: Any) -> Any:
    """A hashable form of a resolved parameter value (lists of per-model values become tuples)."""
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


class MergePaths:
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
            return _deliver(out, dst)
        stage, comb = split
        taus = [self.taus[k][i] for i in sel]
        if stage.trivial and comb.consensus is None and taus:  # task arithmetic: fused, bandwidth-bound path
            target = _output(dst, base, out_dtype)
            if self._zero_copy_kernel(base, taus, target):
                kernels.weighted_sum_into(
                    [kernels.as_kernel_array(t.reshape(-1)) for t in taus], comb.weight, mean=comb.merge_func == "mean",
                    lambda_=comb.lambda_, base=base.reshape(-1).numpy(), out=target.detach().view(-1).numpy(),
                )
            else:
                weighted_sum_into(comb, base, taus, target)
            return _deliver(target, dst)
        if not stage.trivial and all(w == 1.0 for w in comb.weight):
            key = ("combined", k, stage, comb.consensus, comb.merge_func, tuple(sel))
            if self.unit_cache_fits:  # all of this shard's merged deltas fit: else masks only (no crowding out)
                return self._merge_unit_weights(key, k, stage, comb, taus, sel, base, dst, out_dtype)
        reprs = [Sparse(t.numel()) for t in taus] if stage.trivial else self._sparse(k, stage, sel)
        if base.device.type == "cpu" and kernels.available() and len(taus) <= kernels.MAX_MODELS:
            return self._merge_fused(comb, reprs, self._keep_pattern(k, stage, sel, reprs), taus, base, dst, out_dtype)
        target = _output(dst, base, out_dtype)
        flat = target.view(-1)
        b = base.reshape(-1)
        n = b.numel()
        # sign election makes ~3x more passes per chunk than a weighted sum; plain sums amortise op overhead better
        step = self.chunk if comb.consensus is not None else self.chunk * 4
        for s in range(0, n, step):
            e = min(n, s + step)
            merged = b[s:e].to(F32) + combine(comb, [r.chunk(t, s, e) for r, t in zip(reprs, taus)])
            flat[s:e].copy_(merged)
        return _deliver(target, dst)

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
            self.cache.put(key, unscaled, unscaled.numel() * unscaled.element_size())
        target = _output(dst, base, out_dtype)
        scale_add_into(base, unscaled, float(params.get(scale, spec.param(scale).default)), target)
        return _deliver(target, dst)

    @staticmethod
    def _zero_copy_kernel(base: torch.Tensor, sources: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
        """Whether the numba kernels can read ``sources``/``base`` and write ``out`` in place: CPU, float32 base and
        output, and inputs all float32 or all bfloat16."""
        return (kernels.available() and base.device.type == "cpu" and base.dtype == F32 and out.dtype == F32
                and out.is_contiguous() and len({x.dtype for x in sources}) == 1
                and sources[0].dtype in (F32, torch.bfloat16) and len(sources) <= kernels.MAX_MODELS)

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

    def _merge_fused(self, comb: Combine, reprs: Sequence[Sparse], pattern: np.ndarray | None,
                     taus: Sequence[torch.Tensor], base: torch.Tensor, dst: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """``base + combine(stage(τ))`` in one fused CPU pass per chunk (:mod:`~searchmerge.store.kernels`): the
        sign election with per-model weights at about the cost of a weighted sum. Float32 (and bfloat16 τ) are
        passed whole, zero-copy; other dtypes are converted chunk by chunk."""
        target = _output(dst, base, out_dtype)
        flat_out, flat_base = target.detach().view(-1), base.reshape(-1)
        sources = [r.dense.reshape(-1) if r.dense is not None else t.reshape(-1) for r, t in zip(reprs, taus)]
        ops = [("none",) if r.dense is not None else r.op for r in reprs]
        n = flat_base.numel()
        whole = self._zero_copy_kernel(flat_base, sources, flat_out)  # else: float32 copies chunk by chunk
        step = n if whole else self.chunk * 4
        for s in range(0, n, max(step, 1)):
            e = min(n, s + step)
            out32 = flat_out[s:e] if whole else torch.empty(e - s, dtype=F32)
            kernels.fused_combine_into(
                [kernels.as_kernel_array(x[s:e]) if whole else x[s:e].to(F32).numpy() for x in sources],
                None if pattern is None else pattern[s:e], ops, comb.weight,
                consensus=comb.consensus, merge_func=comb.merge_func, lambda_=comb.lambda_,
                base=flat_base[s:e].to(F32).numpy(), out=out32.numpy(),
            )
            if not whole:
                flat_out[s:e].copy_(out32)
        return _deliver(target, dst)

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
            for s in range(0, base.numel(), self.chunk * 4):
                e = min(base.numel(), s + self.chunk * 4)
                unscaled[s:e] = combine(unit, [r.chunk(t, s, e) for r, t in zip(reprs, taus)])
            self.cache.put(key, unscaled, unscaled.numel() * unscaled.element_size())
        target = _output(dst, base, out_dtype)
        scale_add_into(base, unscaled, comb.lambda_, target)
        return _deliver(target, dst)
