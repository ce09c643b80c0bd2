"""The resident task-vector store: checkpoints are read once, task vectors stay on Ray actors, and every
search trial merges in memory (into a resident evaluation model) with no disk I/O.

Ray is an implementation detail: callers see a plain object with ``build``, ``merge``, ``merge_into``,
``attach_evaluator``, ``stats`` and ``close``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from searchmerge.errors import CheckpointError, RecipeError, SearchmergeError
from searchmerge.io.checkpoint import open_checkpoint
from searchmerge.io.task_models import backbone_views
from searchmerge.merge import DTYPES, check_compatible
from searchmerge.recipe import Recipe, layer_index
from searchmerge.cluster.placement import default_placement, node_affinity
from searchmerge.store.stages import from_numpy, to_numpy
from searchmerge.store.wholemodel import WholeModelStats
from searchmerge.store.worker import EvaluatorLost, ShardWorker

__all__ = ["TaskVectorStore", "ResidentEvaluator", "StoreError", "StoreActorDied"]


class StoreError(SearchmergeError, RuntimeError):
    """A store call failed (an actor died, a call timed out, the store was closed)."""


class StoreActorDied(StoreError):
    """A store actor died during a call; it restarts from the checkpoints, so the call can be retried."""


def _balance(sizes: dict[str, int], keys: Sequence[str], n: int) -> list[list[str]]:
    """Greedy largest-first assignment of tensors to ``n`` bins by bytes; each bin keeps checkpoint order."""
    load = [0] * n
    owner: dict[str, int] = {}
    for k in sorted(keys, key=lambda k: -sizes[k]):
        i = min(range(n), key=lambda j: load[j])
        owner[k] = i
        load[i] += sizes[k]
    return [[k for k in keys if owner[k] == i] for i in range(n)]


class ResidentEvaluator:
    """A handle to an evaluation model that lives on the store's first actor, next to its shard.

    A restarted actor rebuilds the model from the builder (kept in the object store) on the next call; a call
    that reads a merge the restart erased raises :class:`StoreActorDied` (merge again, then retry)."""

    def __init__(self, store: "TaskVectorStore", builder_ref: Any) -> None:
        self.store = store
        self.builder_ref = builder_ref
        self.incarnation: str | None = None  # the actor process holding the last merge (None: the builder's model)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` on the resident model (e.g. compute logits or a loss); returns its result."""
        s = self.store
        return s._get(s._actors[0].run_checked.remote(self.incarnation, self.builder_ref, s._passthrough_np,
                                                      fn, *args, **kwargs))


class TaskVectorStore(WholeModelStats):
    """Base weights and task vectors, sharded by tensor across Ray actors, merged per recipe in memory."""

    def __init__(self) -> None:  # use TaskVectorStore.build
        self._actors: list[Any] = []
        self._closed = True

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        base: str | Path | dict[str, torch.Tensor],
        models: Sequence[str | Path | dict[str, torch.Tensor]],
        *,
        num_actors: int = 1,
        device: str = "cpu",
        residency_dtype: str = "float32",
        names: Sequence[str] | None = None,
        cpus_per_actor: float | None = None,
        threads_per_actor: int | None = None,
        torch_threads: int = 1,
        cache_fraction: float = 0.2,
        chunk_elems: int = 1 << 14,
        max_restarts: int = 4,
        timeout_s: float = 600.0,
        allow_pickle: bool = False,
        allow_non_finite: bool = False,
        node_id: str | None = None,
    ) -> "TaskVectorStore":
        """Read ``base`` and ``models`` once (paths or state dicts), keep θ₀ and τ_i = θ_i − θ₀ on ``num_actors`` actors.

        ``names``: how recipes refer to the models (default: the paths as given, else ``model_{i}``); a recipe
        listing a subset of them merges that subset. ``cache_fraction``: the mask cache's bound, as a fraction of
        the resident bytes (base + task vectors). ``device``: ``cpu``, ``cuda`` (one GPU per actor) or ``auto``.
        ``cpus_per_actor`` (default: the CPUs Ray has free, shared among the actors, at least 1 each) and
        ``threads_per_actor`` (default: the actor's whole CPUs, at least 1): threads each actor's fused kernels and
        rank scans split their work over (elementwise, so the bits do not change). The defaults are the placement
        measured fastest (``benchmarks/bench_placement.py``): one actor using every core beats one actor per core,
        whose shards must travel to the evaluation model each trial. ``torch_threads`` (default 1): torch's intra-op threads in each
        actor, for the methods that run as torch ops (generic path, SVDs, L1 sums): whole-tensor sums follow torch's
        thread count, so the store matches a merge core run with the same count (1, as the tests run it); on a busy
        2-core machine two OpenMP threads also stall at every barrier (measured 10-100x slower per chunk).
        ``chunk_elems``: the elementwise combine runs in cache-sized chunks (16K entries: below torch's
        parallel grain, resident in L2), so its many small passes cost about one pass over memory.
        ``allow_non_finite``: keep checkpoints holding NaN/±Inf (refused by default, checked once as the actors
        read them: a ``NonFiniteError`` names the model and the tensor).
        ``node_id``: place the actors on that Ray node (soft affinity: a lost node's actors restart elsewhere).
        """
        import ray

        if residency_dtype not in ("float32", "bfloat16", "float16"):
            raise RecipeError(f"residency_dtype must be float32, bfloat16 or float16, got {residency_dtype!r}.")
        if not models:
            raise RecipeError("a store needs at least one fine-tuned model.")
        self = cls()
        self.timeout_s = float(timeout_s)
        opened = [open_checkpoint(src, allow_pickle=allow_pickle) for src in (base, *models)]
        (base_reader, *readers), _ = backbone_views(opened)  # task-model folders: their backbones
        keys = base_reader.keys()
        check_compatible(base_reader, "base model", readers, [f"models[{i}]" for i in range(len(readers))])
        self.keys = list(keys)
        self.float_keys = [k for k in keys if base_reader.dtype(k).is_floating_point]
        self.shapes = {k: tuple(base_reader.shape(k)) for k in keys}
        self.dtypes = {k: base_reader.dtype(k) for k in keys}
        layers = [i for i in (layer_index(k) for k in keys) if i is not None]
        self.n_layers = (max(layers) + 1) if layers else 1
        self.n_models = len(models)
        self.names = [str(n) for n in names] if names is not None else [
            str(m) if not isinstance(m, dict) else f"model_{i}" for i, m in enumerate(models)
        ]
        if len(self.names) != self.n_models:
            raise RecipeError(f"{len(self.names)} names given for {self.n_models} models.")
        self.passthrough = {k: base_reader.get(k) for k in keys if k not in self.float_keys}
        if not ray.is_initialized():  # only once every check above has passed
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._passthrough_np = ray.put({k: to_numpy(v) for k, v in self.passthrough.items()})
        self.residency_dtype = residency_dtype
        res_size = DTYPES[residency_dtype].itemsize
        numel = {k: int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.float_keys}
        self.n_params = sum(numel.values())
        sizes = {k: numel[k] * (self.dtypes[k].itemsize + self.n_models * res_size) for k in self.float_keys}
        num_actors = max(1, min(int(num_actors), len(self.float_keys) or 1))
        self.shards = _balance(sizes, self.float_keys, num_actors)

        # Sources: paths travel as strings; state dicts go into the object store once, as numpy (zero-copy).
        def source(s: Any) -> Any:
            if isinstance(s, dict):
                return ray.put({k: to_numpy(v) for k, v in s.items() if k in numel})
            return str(s)

        self._sources = [source(base), *[source(m) for m in models]]
        if device == "auto":  # a GPU per actor when the cluster has them free, else CPU memory
            device = "cuda" if ray.available_resources().get("GPU", 0.0) >= num_actors else "cpu"
        gpu = device.startswith("cuda")
        free = ray.available_resources().get("CPU", 0.0)
        cpus_per_actor, threads = default_placement(free, num_actors, cpus_per_actor, threads_per_actor)
        if cpus_per_actor * num_actors > free + 1e-9:
            raise StoreError(
                f"{num_actors} actor(s) x {cpus_per_actor} CPU exceed the {free:g} CPU(s) Ray has free; lower "
                "cpus_per_actor (threads_per_actor sets the kernel threads independently) or num_actors."
            )
        remote = ray.remote(ShardWorker).options(
            num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0, max_restarts=max_restarts, max_task_retries=0,
            **({"scheduling_strategy": node_affinity(node_id)} if node_id else {}),
        )
        total_bytes = sum(sizes.values())
        self._actors = []
        for shard in self.shards:
            shard_bytes = sum(sizes[k] for k in shard)
            self._actors.append(
                remote.remote(
                    self._sources[0], self._sources[1:], shard, self.n_layers, residency_dtype, device, threads,
                    int(cache_fraction * shard_bytes), chunk_elems, allow_pickle,
                    ["the base model", *[f"models[{i}] ({n})" for i, n in enumerate(self.names)]], allow_non_finite,
                    torch_threads,
                )
            )
        self._closed = False
        self.resident_bytes_expected = total_bytes
        try:
            self._get([a.ready.remote() for a in self._actors])
        except BaseException:
            self.close()
            raise
        self._thresholds: dict[Any, Any] = {}  # thresholds (a list), or with one actor the PendingTrim it resolves
        self._stats_cache: dict[Any, Any] = {}
        self._hist1: dict[Any, np.ndarray] = {}
        return self

    # --- helpers ----------------------------------------------------------------------------------------

    def _get(self, refs: Any, timeout: float | None = None) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if self._closed:
            raise StoreError("the store is closed.")
        try:
            return ray.get(refs, timeout=timeout or self.timeout_s)
        except GetTimeoutError as exc:
            raise StoreError(f"a store call did not finish within {timeout or self.timeout_s:.0f} s.") from exc
        except RayActorError as exc:
            raise StoreActorDied(
                "a store actor died during the call; it restarts from the checkpoints, so the next call can succeed."
            ) from exc
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, EvaluatorLost):
                raise StoreActorDied(f"{cause}; merge into it again.") from None
            if isinstance(cause, (RecipeError, ValueError)):
                raise cause from None
            raise StoreError(f"a store call failed: {cause}") from exc

    def _ensure_alive(self) -> None:
        """Wait (up to the timeout) for actors that are restarting after a crash or a kill."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get([a.ping.remote() for a in self._actors], timeout=self.timeout_s)
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise StoreError("store actors did not come back after a restart.") from None
                time.sleep(0.1)
            except Exception:  # noqa: BLE001 - surfaced by the real call with a clear message
                return

    def _select(self, recipe: Recipe) -> list[int]:
        """Which resident models a recipe merges, in the recipe's order (by name, else all in order)."""
        wanted = recipe.model_paths
        if all(w in self.names for w in wanted):
            return [self.names.index(w) for w in wanted]
        if len(wanted) == self.n_models:
            return list(range(self.n_models))
        raise RecipeError(
            f"the recipe lists {len(wanted)} model(s) {wanted} that are not among the store's {self.n_models}: {self.names}."
        )

    def _plan(self, recipe: Recipe) -> tuple[list[int], Any, str | None]:
        if not isinstance(recipe, Recipe):
            raise RecipeError(f"expected a Recipe, got {type(recipe).__name__}.")
        if self._closed:
            raise StoreError("the store is closed.")
        self._ensure_alive()
        out_dtype = recipe.out_dtype
        sel = self._select(recipe)
        return sel, self._stats(recipe, sel), out_dtype

    # --- API --------------------------------------------------------------------------------------------

    def merge(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The merged state dict (same tensors as ``searchmerge.merge.merge(recipe, base=..., models=...)``)."""
        sel, stats, out_dtype = self._plan(recipe)
        parts: dict[str, Any] = {}
        for p in self._get([a.merge.remote(recipe, sel, stats, out_dtype) for a in self._actors]):
            parts.update(p)
        return {k: self.passthrough[k] if k in self.passthrough else from_numpy(parts[k], copy=True) for k in self.keys}

    def attach_evaluator(self, builder: Callable[[], torch.nn.Module]) -> ResidentEvaluator:
        """Build the evaluation model on the first actor, next to its shard (``builder`` must be picklable,
        e.g. ``functools.partial(AutoModelForCausalLM.from_pretrained, base_dir)``)."""
        import ray

        ref = ray.put(builder)
        missing = self._get(self._actors[0].attach.remote(builder, self._passthrough_np))
        if missing:
            raise CheckpointError(f"the evaluation model has no parameter(s) {missing[:5]} that the checkpoints have.")
        return ResidentEvaluator(self, ref)

    def merge_into(self, recipe: Recipe, evaluator: "torch.nn.Module | ResidentEvaluator") -> None:
        """Merge straight into an evaluation model's existing parameters (``copy_``; no re-instantiation, no disk).

        A :class:`ResidentEvaluator` (from :meth:`attach_evaluator`) is merged in place on its actor: that actor's
        shard never leaves it, and the other actors' merged shards travel once, actor to actor. A plain
        ``torch.nn.Module`` in this process receives every merged shard once through the object store.
        """
        sel, stats, out_dtype = self._plan(recipe)
        if isinstance(evaluator, ResidentEvaluator):
            if evaluator.store is not self:
                raise StoreError("this evaluator belongs to another store.")
            others = [a.merge.remote(recipe, sel, stats, out_dtype) for a in self._actors[1:]]
            evaluator.incarnation = ""  # matches no actor until this merge has landed (a failed one: merge again)
            evaluator.incarnation = self._get(self._actors[0].merge_local.remote(
                recipe, sel, stats, out_dtype, evaluator.builder_ref, self._passthrough_np, *others
            ))
            return
        sd = evaluator.state_dict()
        missing = [k for k in self.float_keys if k not in sd]
        if missing:
            raise CheckpointError(f"the evaluation model has no parameter(s) {missing[:5]} that the checkpoints have.")
        parts = self._get([a.merge.remote(recipe, sel, stats, out_dtype) for a in self._actors])
        with torch.no_grad():
            for p in parts:
                for k, v in p.items():
                    sd[k].copy_(from_numpy(v))
            for k, v in self.passthrough.items():
                if k in sd:
                    sd[k].copy_(v)

    def stats(self) -> dict[str, Any]:
        """Resident bytes per actor and in total, cache use and hits, peak RSS, and the memory bound."""
        per = self._get([a.stats.remote() for a in self._actors])
        total = sum(s["resident_bytes"] for s in per)
        bound = 1.2 * (self.n_models + 1) * self.n_params * 4
        return {
            "actors": per,
            "resident_bytes": total,
            "cache_bytes": sum(s["cache_bytes"] for s in per),
            "cache_hits": sum(s["cache_hits"] for s in per),
            "cache_misses": sum(s["cache_misses"] for s in per),
            "store_peak_bytes": total + sum(s["cache_capacity"] for s in per),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in per),
            "evaluator_bytes": sum(s["evaluator_bytes"] for s in per),
            "bound_bytes": bound,
            "n_params": self.n_params,
            "n_models": self.n_models,
            "residency_dtype": self.residency_dtype,
            "thresholds_cached": len(self._thresholds),
        }

    def nodes(self) -> list[str]:
        """The Ray node id of each actor (a replica's actors share its node unless one restarted elsewhere)."""
        return self._get([a.node.remote() for a in self._actors])

    def digests(self) -> list[str]:
        """One hash per actor of every resident base and task-vector byte (immutability checks)."""
        return self._get([a.digest.remote() for a in self._actors])

    def clear_cache(self) -> None:
        self._get([a.clear_cache.remote() for a in self._actors])
        self._thresholds.clear()
        self._hist1.clear()
        self._stats_cache.clear()

    def close(self) -> None:
        import ray

        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        self._sources = []
        self._closed = True

    def __enter__(self) -> "TaskVectorStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

