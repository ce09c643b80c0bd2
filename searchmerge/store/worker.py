"""One shard of the resident store: base tensors and task vectors for a subset of tensor names.

A plain class; :mod:`searchmerge.store.store` wraps it as a Ray actor. It loads its tensors straight from
the checkpoints (or from state dicts the driver put into the object store once), so a restarted actor
rebuilds itself. Nothing here ever writes into ``self.base`` or ``self.taus``.
"""

from __future__ import annotations

import hashlib
import os
import resource
from typing import Any, Callable, Sequence

import numpy as np
import torch

from searchmerge.io.checkpoint import StateDictReader, open_checkpoint
from searchmerge.errors import NonFiniteError
from searchmerge.io.task_models import backbone_views
from searchmerge.merge import DTYPES, check_finite, tensor_rng
from searchmerge.recipe import Recipe, global_scalars
from searchmerge.store import kernels, rankscan
from searchmerge.store.modeltrim import ModelTrimPaths, out_dtypes_of
from searchmerge.store.paths import LRU, MergePaths
from searchmerge.store.threadpool import deferred, map_threads
from searchmerge.store.stages import (
    Sparse,
    Stage,
    apply_stage_parts,
    compact,
    from_numpy,
    pack_mask,
    to_numpy,
)

F32 = torch.float32


class EvaluatorLost(RuntimeError):
    """The actor restarted since the last merge into its evaluation model: the merged weights are gone."""


def _rss_anon() -> int:
    """Anonymous resident memory of this process (excludes mmap'd checkpoint pages), Linux only; 0 elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reader(src: Any, allow_pickle: bool):
    if isinstance(src, dict):  # {name: (dtype tag, ndarray)} from the object store
        return StateDictReader({k: from_numpy(v) for k, v in src.items()})
    return backbone_views([open_checkpoint(src, allow_pickle=allow_pickle)])[0][0]  # a task model: its backbone


class ShardWorker(MergePaths, ModelTrimPaths):
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
        torch_threads: int = 1,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, int(torch_threads)))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        srcs = [ray.get(s) if isinstance(s, ray.ObjectRef) else s for s in [base_src, *model_srcs]]
        base = _reader(srcs[0], allow_pickle)
        models = [_reader(s, allow_pickle) for s in srcs[1:]]
        res = DTYPES[residency_dtype]
        self.names = list(names)
        self.n_layers = n_layers
        self.chunk = max(32, int(chunk_elems) // 32 * 32)  # torch's sum order moves at multiples of 32 entries
        self.threads = max(1, int(threads))  # the fused kernels and rank scans split their work over these
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
        self.order_stats: dict[tuple[str, int], Any] = {}  # (tensor, model) -> rankscan.Hist, built on first use
        self.l1_norms: dict[tuple[str, int], np.float32] = {}  # (tensor, model) -> Σ|τ| (DARE/DELLA L1 rescale)
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
            "order_stats_bytes": sum(h.nbytes for h in self.order_stats.values()),
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
        if stage.trivial and self._ranked_shard(sel):
            out = self._trim_hist_ranked(sel, prefixes)
        else:
            out = self._trim_hist_torch(stage, sel, prefixes)
        self.cache.put(key, out, out.nbytes)
        return out

    def _ranked_shard(self, sel: Sequence[int]) -> bool:
        """Whether every tensor's τ can use the order statistics (CPU, numba, float32/bfloat16, finite)."""
        return (kernels.available() and self.device.type == "cpu"
                and all(self.taus[k][i].dtype in (F32, torch.bfloat16) and self._hist(k, i).finite
                        for k in self.names for i in sel))

    def _trim_hist_ranked(self, sel: Sequence[int], prefixes: Sequence[int | None] | None) -> np.ndarray:
        """:meth:`trim_hist` from the per-tensor order statistics (phase 1 reads no τ) and one scan of each τ for
        the selected bin (phase 2): a new whole-model density costs one pass, not a sort."""
        bins = 1 << 15 if prefixes is None else 1 << 16
        h = np.zeros((len(sel), bins), dtype=np.int64)

        def one(m: int) -> None:
            for k in self.names:
                if prefixes is None:
                    h[m] += self._hist(k, sel[m]).dense()
                elif prefixes[m] is not None:
                    rankscan.low_histogram(kernels.as_kernel_array(self.taus[k][sel[m]].reshape(-1)), int(prefixes[m]),
                                        h[m])

        map_threads(one, range(len(sel)), self.threads)
        return h

    def _trim_hist_torch(self, stage: Stage, sel: Sequence[int], prefixes: Sequence[int | None] | None) -> np.ndarray:
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
        return h.numpy()

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

    def merge(self, recipe: Recipe, sel: Sequence[int], stats: Any, out_dtype: str | None) -> dict[str, Any]:
        """Merged tensors of this shard, as numpy (zero-copy through the object store)."""
        self.cache.new_trial()
        ods = out_dtypes_of(self.base, self.names, out_dtype)
        targets: dict[str, torch.Tensor | None] = {k: None for k in self.names}
        with torch.no_grad():
            stats, merged = self._resolve_stats(recipe, sel, stats, targets, ods)  # merged: by flagged passes
            with deferred():  # whole-tensor passes overlap the next tensor's set-up; all done at the block's end
                done = {k: targets[k] if merged else self._merge_one(recipe, k, sel, stats, None, ods[k])
                        for k in self.names}
            out = {k: to_numpy(v) for k, v in done.items()}
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
        ods = out_dtypes_of(self.base, self.names, out_dtype)
        with torch.no_grad():
            stats, merged = self._resolve_stats(recipe, sel, stats, {k: sd[k] for k in self.names}, ods)
            with deferred():  # whole-tensor passes overlap the next tensor's set-up; all done at the block's end
                for k in () if merged else self.names:  # merged: by the flagged whole-model trim's passes
                    self._merge_one(recipe, k, sel, stats, sd[k], ods[k])
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
