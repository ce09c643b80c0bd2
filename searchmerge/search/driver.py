"""The search driver: Ray Tune drives trials; each trial merges a sampled recipe on the resident store into a
resident evaluation model (no checkpoint read from disk) and scores the search split chunk by chunk.

Concurrency k = k store replicas, each with its own resident evaluation model; a Tune trial process pins
one replica for its lifetime (``reuse_actors=True`` keeps the processes), so trials run asynchronously
with no generation barrier. Identical recipes are evaluated once. The report split is read only after the
search, for the best recipe (or every front member) and the fixed baselines.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

import numpy as np

from searchmerge.errors import SearchmergeError
from searchmerge.search.evaluation import chunk_features, delta_stats, new_scorer, objective_values, predict_chunk
from searchmerge.search.space import Space
from searchmerge.search.spec import SearchSpec

TUNE_DIR = "tune"


def recipe_key(yaml_text: str) -> str:
    return hashlib.blake2b(yaml_text.encode(), digest_size=12).hexdigest()


# --- the coordinator: replica pins, the duplicate cache, the failure count ---------------------------------


class Coordinator:
    """One small actor per search: which trial process holds which replica, the results of recipes already
    evaluated (duplicates), and the failure count. A holder is (node id, pid): pids mean nothing across nodes."""

    def __init__(self, n_replicas: int, known: dict[str, dict[str, Any]]) -> None:
        import ray

        self.holders: dict[int, tuple[str, int]] = {}  # replica -> (node id, pid) of the trial process
        self.n = n_replicas
        self.results = dict(known)
        self.failures = 0
        self.node = ray.get_runtime_context().get_node_id()

    def pin(self, pid: int, node: str | None = None) -> int | None:
        holder = (node or self.node, pid)
        for r, h in self.holders.items():
            if h == holder:
                return r
        for r in range(self.n):
            h = self.holders.get(r)
            if h is None or not self._holder_alive(*h):
                self.holders[r] = holder
                return r
        return None

    def _holder_alive(self, node: str, pid: int) -> bool:
        """Is that trial process alive: its node must be alive, and the pid alive on that node."""
        import ray

        if node == self.node:
            return _alive(pid)
        if node not in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return False
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            probe = ray.remote(num_cpus=0)(_alive).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
            return bool(ray.get(probe.remote(pid), timeout=30))
        except Exception:  # noqa: BLE001 - an unreachable node holds nothing
            return False

    def lookup(self, key: str) -> dict[str, Any] | None:
        return self.results.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        self.results[key] = result

    def fail(self) -> int:
        self.failures += 1
        return self.failures

    def failure_count(self) -> int:
        return self.failures


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


# --- the trial ------------------------------------------------------------------------------------------


def evaluate_resident(store: Any, evaluator: Any, recipe: Any, features: dict[str, Any],
                      chunks: list[tuple[str, np.ndarray]], scorer: Any, on_chunk: Any = None,
                      stats: bool = False, retries: int = 2, fusion: Any = None) -> dict[str, Any]:
    """Merge ``recipe`` into the resident model, then score ``chunks``; ``on_chunk(partial, merge_s, eval_s, fusion
    info)`` after each.
    With ``stats``, the model statistics (``delta_l2``, ``delta_l0``) of the merged model come with the result.
    A data recipe (Fisher, RegMean, ...) is merged from data on the replica (``fusion``: its
    :class:`~searchmerge.search.fusion.FusionSource`); its statistics counts and times come as ``fusion``.

    A store actor that dies (or restarts) mid-evaluation comes back from the checkpoints; the recipe is merged
    again (bit-identical: merges are deterministic) and the chunk in flight repeated, ``retries`` times at most
    (``store_retries`` in the result)."""
    from searchmerge.search.fusion import is_data_recipe, place_fusion
    from searchmerge.store.store import StoreActorDied

    t0 = time.perf_counter()
    merged, retried = False, 0
    info: dict[str, Any] = {}

    def call(fn: Any = None, *args: Any) -> Any:  # fn None: the merge only
        nonlocal merged, retried
        while True:
            try:
                if not merged:
                    if is_data_recipe(recipe):
                        info.update(place_fusion(store, evaluator, recipe, fusion))
                    else:
                        store.merge_into(recipe, evaluator)
                    merged = True
                return None if fn is None else evaluator.run(fn, *args)
            except StoreActorDied:
                if retried >= retries:
                    raise
                retried, merged = retried + 1, False

    model_stats = call(delta_stats) if stats else call() or {}
    merge_s = time.perf_counter() - t0
    for task, idx in chunks:
        preds = call(predict_chunk, task, chunk_features(features, task, idx))
        scorer.add(task, idx, np.asarray(preds))
        if on_chunk is not None:
            on_chunk(scorer.report(), merge_s, time.perf_counter() - t0 - merge_s, info)
    final = scorer.report(final=True)
    return {"result": final, "merge_s": merge_s, "eval_s": time.perf_counter() - t0 - merge_s, "stats": model_stats,
            "store_retries": retried, "fusion": info}


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    import ray
    from ray import tune

    space: Space = ctx["space"]
    coord = ctx["coord"]
    start = time.time()
    recipe = space.to_recipe(config, seed=ctx["seed"])
    text = recipe.to_yaml()
    key = recipe_key(text)
    base = {"recipe_yaml": text, "recipe_key": key, "method": recipe.method, "start_time": start}
    cached = ray.get(coord.lookup.remote(key))
    if cached is not None:
        tune.report({**cached, **base, "duplicate": True, "merge_s": 0.0, "eval_s": 0.0, "end_time": time.time()})
        return
    replica = None
    node = ray.get_runtime_context().get_node_id()
    while replica is None:
        replica = ray.get(coord.pin.remote(os.getpid(), node))
        if replica is None:
            time.sleep(0.05)
    store, evaluator = ctx["replicas"][replica]
    total = ctx["total"]

    def on_chunk(partial: dict[str, Any], merge_s: float, eval_s: float, info: dict[str, Any]) -> None:
        vals = objective_values(partial)
        for t in space.models:  # a task not reached yet: its estimate is the running average
            vals.setdefault(f"task_{t}", vals["average"])
        if ctx["report_partial"] and partial["n"] < total:
            tune.report({**vals, "examples": partial["n"], "complete": False, "merge_s": merge_s, "eval_s": eval_s,
                         "end_time": time.time(), **base, **fusion_fields(info)})

    try:
        out = evaluate_resident(store, evaluator, recipe, ctx["features"], ctx["chunks"],
                                new_scorer(ctx["taskpool"], ctx["split"], space.models), on_chunk,
                                stats=ctx["stats"], retries=ctx.get("store_retries", 2), fusion=ctx.get("fusion"))
        vals = objective_values(out["result"]) | out["stats"]
        if any(not math.isfinite(v) for v in vals.values()):
            raise SearchmergeError(f"non-finite metrics {vals}")
        where = {"replica": replica, "node": _replica_node(store), "store_retries": out["store_retries"],
                 **fusion_fields(out["fusion"])}
    except Exception:
        ray.get(coord.fail.remote())
        raise
    final = {**vals, "examples": out["result"]["n"], "complete": True, "duplicate": False}
    ray.get(coord.put.remote(key, {k: final[k] for k in vals} | {"examples": final["examples"], "complete": True}))
    tune.report({**final, **base, **where, "merge_s": out["merge_s"], "eval_s": out["eval_s"], "end_time": time.time()})


def fusion_fields(info: dict[str, Any]) -> dict[str, Any]:
    """A data-driven trial's statistics columns: seconds, and sets computed / read from the disk cache."""
    return {k: info[k] for k in ("stats_s", "stats_computed", "stats_hits") if k in info}


def _replica_node(store: Any) -> str | None:
    """The node the replica's evaluator lives on (``None`` if its actor is down right now)."""
    from searchmerge.store.store import StoreError

    try:
        return store.nodes()[0]
    except StoreError:
        return None


# --- searchers ------------------------------------------------------------------------------------------


def make_searcher(spec: SearchSpec, space: Space, points: list[dict[str, Any]]):  # noqa: ANN201
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    metrics = [o.key for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    metric, mode = (metrics[0], modes[0]) if len(metrics) == 1 else (metrics, modes)
    name = spec.searcher
    if name in ("random", "grid"):
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=spec.seed,
                                     max_concurrent=spec.concurrency)
    if name.startswith("optuna_"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        samplers = {
            "optuna_tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True),
            "optuna_cmaes": lambda: optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False),
            "optuna_gp": lambda: optuna.samplers.GPSampler(seed=spec.seed),
            "optuna_nsga2": lambda: optuna.samplers.NSGAIISampler(seed=spec.seed),
            "optuna_random": lambda: optuna.samplers.RandomSampler(seed=spec.seed),
        }
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        alg = OptunaSearch(metric=metric, mode=mode, sampler=samplers[name](), points_to_evaluate=points or None)
    else:
        import nevergrad as ng
        from ray.tune.search.nevergrad import NevergradSearch

        opt = {"nevergrad_cma": ng.optimizers.CMA, "nevergrad_de": ng.optimizers.DE,
               "nevergrad_twopointsde": ng.optimizers.TwoPointsDE, "nevergrad_ngopt": ng.optimizers.NGOpt}[name]
        budget = spec.budget.trials or 1000
        alg = NevergradSearch(optimizer=opt, optimizer_kwargs={"budget": budget, "num_workers": spec.concurrency},
                              metric=metric, mode=mode, points_to_evaluate=points or None)
        np.random.seed(spec.seed)  # nevergrad draws from numpy's global generator
    return ConcurrencyLimiter(alg, max_concurrent=spec.concurrency)


def grid_space(space: Space, points_per_dim: int = 5) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    if len(space.methods) > 1:
        out["method"] = tune.grid_search(list(space.methods))
    for d in space.dims:
        vals = list(d.choices) if d.choices is not None else [
            float(x) for x in np.linspace(float(d.low), float(d.high), points_per_dim)]  # type: ignore[arg-type]
        out[d.key] = tune.grid_search(vals)
    return out
