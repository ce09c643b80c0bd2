"""One shard of the resident store: base tensors and task vectors for a subset of tensor names.

A plain class; :mod:`searchmerge.store.store` wraps it as a Ray actor. It loads its tensors straight from
the checkpoints (or from state dicts the driver put into the object store once), so a restarted actor
rebuilds itself. Nothing here ever writes into ``self.base`` or ``self.taus``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
import resource
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from searchmerge.io.checkpoint import StateDictReader, open_checkpoint
from searchmerge.errors import NonFiniteError
from searchmerge.io.task_models import backbone_views
from searchmerge.merge import DTYPES, check_finite, merge_tensor, tensor_rng
from searchmerge.recipe import Recipe, global_scalars, layer_fraction, resolve_params
from searchmerge.store import kernels
from searchmerge.store.stages import (
    Sparse,
    Stage,
    Combine,
    apply_stage_parts,
    combine,
    scale_add_into,
    weighted_sum_into,
    compact,
    from_numpy,
    pack_mask,
    split_gta,
    to_numpy,
)

F32 = torch.float32


class EvaluatorLost(RuntimeError):
    """The actor restarted since the last merge into its evaluation model: the merged weights are gone."""


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


def _rss_anon() -> int:
    """Anonymous resident memory of this process (excludes mmap'd checkpoint pages), Linux only; 0 elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def _reader(src: Any, allow_pickle: bool):
    if isinstance(src, dict):  # {name: (dtype tag, ndarray)} from the object store
        return StateDictReader({k: from_numpy(v) for k, v in src.items()})
    return backbone_views([open_checkpoint(src, allow_pickle=allow_pickle)])[0][0]  # a task model: its backbone


def _freeze(v: Any) -> Any:
    """A hashable form of a resolved parameter value (lists of per-model values become tuples)."""
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


class ShardWorker:
    """Holds θ₀ and τ_i = θ_i − θ₀ (in ``residency_dtype``) for ``names``; merges them per recipe."""

    def __init__(
        self,
        base_src: Any,
        model_srcs: Sequence[Any],
        names: Sequence[str],
        n_layers: int,
        residency_dtype: str = "float32",
        device: str = "cpu",
        threads: int = 1,
        cache_bytes: int = 0,
        chunk_elems: int = 1 << 14,
        allow_pickle: bool = False,
        labels: Sequence[str] | None = None,
        allow_non_finite: bool = False,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, int(threads)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        srcs = [ray.get(s) if isinstance(s, ray.ObjectRef) else s for s in [base_src, *model_srcs]]
        base = _reader(srcs[0], allow_pickle)
        models = [_reader(s, allow_pickle) for s in srcs[1:]]
        res = DTYPES[residency_dtype]
        self.names = list(names)
        self.n_layers = n_layers
        self.chunk = max(8, int(chunk_elems) // 8 * 8)
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, list[torch.Tensor]] = {}
        labels = list(labels) if labels is not None else ["the base model", *[f"models[{i}]" for i in range(len(models))]]
        self.problem: NonFiniteError | None = None  # raised by ready(): a failed __init__ would restart forever
        with torch.no_grad():
            for k in self.names:
                b = base.get(k, self.device).clone()  # owned (state dict sources are read-only views)
                thetas = [m.get(k, self.device) for m in models]
                if not allow_non_finite and self.problem is None:
                    try:  # once, as each tensor is read: the store's only pass over the checkpoints
                        for t, label in zip([b, *thetas], labels):
                            check_finite(t, k, label)
                    except NonFiniteError as exc:
                        self.problem = exc
                b32 = b.to(F32)
                self.base[k] = b
                self.taus[k] = [(t.to(F32) - b32).to(res) for t in thetas]
                del thetas
        self.resident_bytes = sum(
            t.numel() * t.element_size() for k in self.names for t in [self.base[k], *self.taus[k]]
        )
        self.cache = LRU(cache_bytes)
        self.unit_cache_fits = 4 * sum(self.base[k].numel() for k in self.names) <= self.cache.capacity
        self.evaluator: torch.nn.Module | None = None
        self._ev_sd: dict[str, torch.Tensor] = {}
        self.merges = 0
        self.incarnation = os.urandom(8).hex()  # new on every (re)start: a restart loses the merged evaluator

    # --- info -------------------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        import os

        if self.problem is not None:
            raise self.problem
        return {"pid": os.getpid(), "device": str(self.device), "resident_bytes": self.resident_bytes}

    def ping(self, delay: float = 0.0) -> int:
        """Liveness probe (``delay`` seconds: a stand-in for a long call in fault tests)."""
        import os
        import time

        time.sleep(delay)
        return os.getpid()

    def node(self) -> str:
        """The Ray node id this shard lives on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, Any]:
        ev_bytes = 0
        if self.evaluator is not None:
            ev_bytes = sum(t.numel() * t.element_size() for t in {id(v): v for v in self._ev_sd.values()}.values())
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "tensors": len(self.names),
            "resident_bytes": self.resident_bytes,
            "cache_bytes": self.cache.bytes,
            "cache_capacity": self.cache.capacity,
            "cache_entries": len(self.cache.items),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "evaluator_bytes": ev_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_anon_bytes": _rss_anon(),
            "merges": self.merges,
        }

    def digest(self) -> str:
        """A hash of every resident byte (base and task vectors), for immutability checks."""
        h = hashlib.blake2b(digest_size=16)
        for k in self.names:
            for t in [self.base[k], *self.taus[k]]:
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def clear_cache(self) -> None:
        self.cache.clear()

    # --- stages -----------------------------------------------------------------------------------

    def _taus32(self, k: str, sel: Sequence[int]) -> list[torch.Tensor]:
        return [self.taus[k][i].to(F32) for i in sel]

    def _sparse(self, k: str, stage: Stage, sel: Sequence[int], store: bool = True) -> list[Sparse]:
        """The stage's sparsified τ for tensor ``k`` in compact form, from the cache when possible."""
        key = ("sparse", k, stage, tuple(sel))
        hit = self.cache.get(key) if store else None
        if hit is not None:
            return hit
        taus = self._taus32(k, sel)
        if stage.thresholds is not None:
            pre = self._sparse(k, stage.pre_threshold(), sel, store)
            out = []
            for i, (sp, t) in enumerate(zip(pre, taus)):
                x = sp.chunk(t, 0, t.numel())
                fin = x * (x.abs() >= stage.thresholds[i])
                cand = Sparse(t.numel(), pack_mask(fin != 0), sp.op)
                if sp.dense is not None or not torch.equal(cand.chunk(t, 0, t.numel()), fin):
                    cand = Sparse(t.numel(), dense=fin)
                out.append(cand)
        else:
            rng = tensor_rng(stage.seed, k) if stage.random else None
            first, final = apply_stage_parts(stage, taus, rng)
            out = compact(stage, taus, first, final)
        if store:
            self.cache.put(key, out, sum(s.nbytes for s in out) + 64)
        return out

    def _stage_values(self, k: str, stage: Stage, sel: Sequence[int]) -> list[torch.Tensor]:
        taus = self._taus32(k, sel)
        if stage.trivial:
            return taus
        return [sp.chunk(t, 0, t.numel()) for sp, t in zip(self._sparse(k, stage, sel), taus)]

    def trim_hist(self, stage: Stage, sel: Sequence[int], prefixes: Sequence[int | None] | None = None) -> np.ndarray:
        """Radix-select histograms of |x_i| bit patterns over this shard: the high 16 bits (``prefixes`` None),
        or the low 16 bits of the entries whose high bits equal ``prefixes[i]``."""
        self.cache.new_trial()
        key = ("hist", stage, tuple(sel), None if prefixes is None else tuple(prefixes))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        bins = 1 << 15 if prefixes is None else 1 << 16
        h = torch.zeros(len(sel), bins, dtype=torch.int64)
        for k in self.names:
            for i, x in enumerate(self._stage_values(k, stage, sel)):
                if prefixes is not None and prefixes[i] is None:
                    continue
                bits = x.abs().reshape(-1).contiguous().view(torch.int32)
                if prefixes is None:
                    h[i] += torch.bincount((bits >> 16).long(), minlength=bins).cpu()
                else:
                    lo = bits[(bits >> 16) == int(prefixes[i])] & 0xFFFF
                    h[i] += torch.bincount(lo.long(), minlength=bins).cpu()
        out = h.numpy()
        self.cache.put(key, out, out.nbytes)
        return out

    def numel(self) -> int:
        return sum(self.base[k].numel() for k in self.names)

    def prepare_local(self, recipe: Recipe, sel: Sequence[int]) -> Any:
        """Run a method's own whole-model ``prepare`` over this (only) shard, in checkpoint order."""
        spec = recipe.spec
        compute = DTYPES[recipe.dtype]

        def items():
            for k in self.names:
                b = self.base[k].to(compute)
                yield k, b, [self.taus[k][i].to(compute) for i in sel], tensor_rng(recipe.seed, k)

        return spec.prepare(items(), global_scalars(recipe))  # type: ignore[misc]

    def export(self, sel: Sequence[int]) -> dict[str, Any]:
        """Base and selected task vectors as numpy (for a driver-side prepare of an unknown method)."""
        return {k: (to_numpy(self.base[k]), [to_numpy(self.taus[k][i]) for i in sel]) for k in self.names}

    # --- merging ----------------------------------------------------------------------------------

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

    def merge(self, recipe: Recipe, sel: Sequence[int], stats: Any, out_dtype: str | None) -> dict[str, Any]:
        """Merged tensors of this shard, as numpy (zero-copy through the object store)."""
        out = {}
        self.cache.new_trial()
        with torch.no_grad():
            for k in self.names:
                od = DTYPES[out_dtype] if out_dtype else self.base[k].dtype
                out[k] = to_numpy(self._merge_one(recipe, k, sel, stats, None, od))
        self.merges += 1
        return out

    # --- co-located evaluator -------------------------------------------------------------------------

    def attach(self, builder: Callable[[], torch.nn.Module], passthrough: dict[str, Any]) -> list[str]:
        """Build the evaluation model here; returns merged tensor names the model lacks (should be empty)."""
        model = builder().to(self.device)  # the evaluation model lives where the shard does (CPU or its GPU)
        model.eval()
        self.evaluator = model
        self._ev_sd = dict(model.state_dict())
        self._passthrough = passthrough
        return [k for k in self.names if k not in self._ev_sd]

    def merge_local(self, recipe: Recipe, sel: Sequence[int], stats: Any, out_dtype: str | None,
                    builder: Callable[[], torch.nn.Module], passthrough: dict[str, Any], *shards: dict[str, Any]) -> str:
        """Merge this shard straight into the resident model's parameters, then copy in other actors' shards.
        Returns this process's incarnation: calls that read the merged model check it (:meth:`run_checked`)."""
        if self.evaluator is None:  # first use, or rebuilt after a restart
            self.attach(builder, passthrough)
        sd = self._ev_sd
        self.cache.new_trial()
        with torch.no_grad():
            for k in self.names:
                od = DTYPES[out_dtype] if out_dtype else self.base[k].dtype
                self._merge_one(recipe, k, sel, stats, sd[k], od)
            for shard in shards:
                for k, v in shard.items():
                    sd[k].copy_(from_numpy(v))
            for k, v in self._passthrough.items():
                if k in sd:
                    sd[k].copy_(from_numpy(v))
        self.merges += 1
        return self.incarnation

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` on the resident evaluation model."""
        if self.evaluator is None:
            raise RuntimeError("no evaluator attached (or the actor restarted): merge into it first.")
        with torch.no_grad():
            return fn(self.evaluator, *args, **kwargs)

    def run_checked(self, incarnation: str | None, builder: Callable[[], torch.nn.Module], passthrough: dict[str, Any],
                    fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """:meth:`run` on the model merged by ``incarnation`` (``None``: the builder's model, rebuilt after a
        restart); a model whose merge a restart erased raises :class:`EvaluatorLost` (merge again, retry)."""
        if self.evaluator is None:
            self.attach(builder, passthrough)
        if incarnation is not None and incarnation != self.incarnation:
            raise EvaluatorLost("the store actor restarted since the last merge into its evaluation model")
        return self.run(fn, *args, **kwargs)
