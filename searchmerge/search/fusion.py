"""Data-driven fusion methods (Fisher, RegMean, RegMean++, AdaMerging) as searched methods.

A spec names them in ``methods:`` like registry methods, with the same syntax (a scalar fixes, ``[low, high]``
narrows a numeric range, a list of a choice parameter's values picks choices, ``search`` takes the declared
range). Their parameters are declared here, over the defaults of :data:`searchmerge.fusion.jobs.PARAMS`
(one home for the defaults). The statistics parameters (``examples``, ``batch_size``, ``seed``) are
*discrete*: a list gives the values to try, because each value is one statistics pass (cached on disk) and a
continuous range would make nearly every trial a new pass.

A trial for such a method is a data recipe (``method: regmean``, ``data: {bench, split, examples, ...}``, the
bench's models, ``parameters``: :mod:`searchmerge.fusion.data_recipe`, what ``searchmerge merge`` runs); it is
merged by :func:`searchmerge.fusion.jobs.fusion_merge` on the replica's store actor (where the resident evaluation model lives and its CPUs / GPU are reserved),
loaded in place into that model, and evaluated like every other trial. The statistics come from the disk
cache after the first trial that needs them (``stats_hits`` / ``stats_computed`` in trials.parquet).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

from searchmerge.fusion.stats import FISHER_VARIANTS
from searchmerge.methods.registry import Param, Range

DISCRETE = ("examples", "batch_size", "seed")  # statistics parameters: a list is a set of values, never a range
DISCRETE_SEARCH = {"examples": (64, 128, 256, 512)}  # what `examples: search` tries
NOT_SEARCHABLE = {"ensemble": "ensembles are evaluated, not merged: there is no single model to search over; "
                              "run it as a `searchmerge bench` row"}
_HIDDEN = {"allow_test"}  # a search never adapts on the test split

_DECLARED: dict[str, tuple[type, Range | None, tuple[Any, ...] | None]] = {
    "alpha": (float, Range(0.0, 1.0), None),
    "examples": (int, Range(low=1), None),
    "batch_size": (int, Range(low=1), None),
    "seed": (int, Range(low=0), None),
    "split": (str, None, ("train", "validation")),
    "exclude": (list, None, None),
    "device": (str, None, ("auto", "cpu", "cuda")),
    "variant": (str, None, FISHER_VARIANTS),
    "normalize": (bool, None, (True, False)),
    "epsilon": (float, Range(0.0, None, low_open=True, search=(1e-8, 1e-4)), None),
    "granularity": (str, None, ("task", "layer")),
    "steps": (int, Range(low=1, search=(50, 1000)), None),
    "lr": (float, Range(0.0, None, low_open=True, search=(1e-4, 1e-2)), None),
    "init": (float, Range(search=(0.0, 1.0)), None),
    "clamp": (bool, None, (True, False)),
    "ties": (bool, None, (True, False)),
    "ties_density": (float, Range(0.0, 1.0, low_open=True), None),
}


def _declaration(name: str, default: Any) -> tuple[type, Range | None, tuple[Any, ...] | None]:
    """A parameter's type, range and choices: declared above, else read from its default (a new parameter of
    ``fusion.jobs.PARAMS`` is fixed-only until declared here, except a flag: true / false)."""
    if name in _DECLARED:
        return _DECLARED[name]
    if isinstance(default, bool):
        return bool, None, (True, False)
    if default is None or isinstance(default, list):
        return list, None, None
    return type(default), None, None


def is_fusion(method: str) -> bool:
    from searchmerge.fusion.jobs import PARAMS

    return method in PARAMS


def fusion_params(method: str) -> tuple[Param, ...]:
    """The declared parameters of a data-driven method, with their defaults from ``fusion.jobs.PARAMS``."""
    from searchmerge.fusion.jobs import PARAMS

    out = []
    for name, default in PARAMS[method].items():
        if name in _HIDDEN:
            continue
        kind, rng, choices = _declaration(name, default)
        out.append(Param(name=name, arg=name, kind=kind, default=default, range=rng, choices=choices))
    return tuple(out)


def check_fixed_list(method: str, p: Param, setting: Any) -> list[str]:
    """A list parameter is fixed, never searched; ``exclude`` is a list of regular expressions."""
    where = f"methods.{method}.{p.name}"
    from searchmerge.search.spec import SearchSpecError

    if p.name != "exclude":
        return setting  # its type is checked by fusion.jobs.resolve_params
    if not isinstance(setting, list) or not all(isinstance(s, str) for s in setting):
        raise SearchSpecError(f"{where}: a list of regular expressions (parameter names to keep at the base), got {setting!r}")
    for s in setting:
        try:
            re.compile(s)
        except re.error as exc:
            raise SearchSpecError(f"{where}: {s!r} is not a regular expression ({exc})") from None
    return list(setting)


def discrete_choices(method: str, p: Param, setting: Any) -> tuple[Any, ...]:
    """The values of a statistics parameter given as a list (or ``search``), each checked."""
    from searchmerge.errors import RecipeError
    from searchmerge.search.spec import SearchSpecError

    where = f"methods.{method}.{p.name}"
    if setting == "search":
        if p.name not in DISCRETE_SEARCH:
            raise SearchSpecError(f"{where}: `{p.name}` has no declared search values; give a list of values or one value")
        return DISCRETE_SEARCH[p.name]
    if not setting:
        raise SearchSpecError(f"{where}: give a non-empty list of values (each is one statistics pass)")
    try:
        values = [p.check(v, where) for v in setting]
    except RecipeError as exc:
        raise SearchSpecError(str(exc)) from None
    return tuple(dict.fromkeys(values))


def check_split(method: str, values: Any, report_split: str) -> None:
    """The data a method reads (statistics / adaptation) must not be the report split."""
    from searchmerge.search.spec import SearchSpecError

    for v in values:
        if v == report_split:
            raise SearchSpecError(f"methods.{method}.split: `{v}` is the report split (report_split: {report_split}); "
                                  f"a data-driven merge must not read it — use the other of train / validation")


def check_resolved(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One sample of the method's parameters through ``fusion.jobs.resolve_params`` (types, cross-field rules),
    with ``device: cpu`` (the GPU is the replicas' business, not the driver's)."""
    from searchmerge.bench.pool import BenchSpecError
    from searchmerge.fusion.jobs import resolve_params
    from searchmerge.search.spec import SearchSpecError

    try:
        return resolve_params(method, {**params, "device": "cpu"})
    except BenchSpecError as exc:
        raise SearchSpecError(f"methods.{method}: {str(exc).rstrip('.')}") from None


# --- the candidate: a data recipe ----------------------------------------------------------------------


def fusion_recipe(method: str, params: dict[str, Any], bench: str, models: list[str]) -> Any:
    """The recipe a data-driven trial stands for: ``method`` with ``data: {bench, split, examples, batch_size,
    seed}`` and its own parameters, every default filled in (canonical text: identical candidates are evaluated
    once), over all of the bench's models. ``searchmerge merge`` of it reproduces the trial's merge."""
    from searchmerge.fusion.data_recipe import DATA_FIELDS
    from searchmerge.fusion.jobs import resolve_params
    from searchmerge.recipe import DataSpec, Recipe

    full = resolve_params(method, params)
    data = {k: v for k, v in full.items() if k in DATA_FIELDS}
    rest = {k: v for k, v in sorted(full.items()) if k not in DATA_FIELDS}
    return Recipe(method=method, data=DataSpec(bench=bench, **data), models=[{"model": m} for m in models],
                  parameters=rest)


def is_data_recipe(recipe: Any) -> bool:
    return getattr(recipe, "data", None) is not None


# --- merging a candidate into the resident evaluation model --------------------------------------------


@dataclass(frozen=True)
class FusionSource:
    """What the replicas need to compute a data-driven merge: the bench without the report split (in Ray's
    object store; boxed in a list so Ray passes the reference, not the bench, to each call) and the driver's
    statistics cache root."""

    bench_box: list[Any]
    cache: str

    @classmethod
    def put(cls, bench: Any, report_split: str) -> "FusionSource":
        import ray

        from searchmerge.bench.zoo.common import cache_root

        return cls([ray.put(without_split(bench, report_split))], str(cache_root()))


def without_split(bench: Any, split: str) -> Any:
    """The bench with ``split`` removed from every task: the statistics passes can never read it."""
    import dataclasses

    from searchmerge.bench.pool import TaskPool

    tp = bench.taskpool
    tasks = {n: dataclasses.replace(t, splits={s: d for s, d in t.splits.items() if s != split}) for n, t in tp.tasks.items()}
    return dataclasses.replace(bench, taskpool=TaskPool(tp.spec, tasks))


def base_recipe(names: list[str]) -> Any:
    """θ₀ (task arithmetic at λ = 0): merged first so the store records the evaluator's incarnation."""
    from searchmerge.recipe import Recipe

    return Recipe(method="task_arithmetic", base_model="base", models=[{"model": n} for n in names],
                  parameters={"lambda": 0.0})


_BENCH: dict[str, Any] = {}  # per process (a store actor): the last bench fetched, by object id


def _resident_bench(ref: Any) -> Any:
    import ray

    key = ref.hex()
    if key not in _BENCH:
        _BENCH.clear()
        _BENCH[key] = ray.get(ref)
    return _BENCH[key]


@contextlib.contextmanager
def _cache_env(root: str) -> Iterator[None]:
    """The driver's statistics cache for this call (an actor started before the driver set it would not see it)."""
    old = os.environ.get("SEARCHMERGE_CACHE")
    os.environ["SEARCHMERGE_CACHE"] = root
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SEARCHMERGE_CACHE", None)
        else:
            os.environ["SEARCHMERGE_CACHE"] = old


def load_fusion(module: Any, bench_box: list[Any], method: str, params: dict[str, Any], cache: str) -> dict[str, float]:
    """Run on the store actor (``ResidentEvaluator.run``): the merge of ``method`` copied into ``module``'s own
    tensors. Returns its times and how many statistics sets were computed / read from the cache."""
    import torch

    from searchmerge.fusion import stats as S
    from searchmerge.fusion.jobs import fusion_merge

    bench = _resident_bench(bench_box[0])
    before = dict(S.CACHE_STATS)
    with torch.enable_grad(), _cache_env(cache):  # Fisher and AdaMerging need gradients; `run` is under no_grad
        state, times = fusion_merge(bench, method, params)
    t0 = time.perf_counter()
    own = module.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise ValueError(f"the merged backbone does not fit the evaluation model: no {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return {"stats_s": float(times["stats_s"]), "fusion_merge_s": float(times["merge_s"]),
            "load_s": time.perf_counter() - t0,
            "stats_computed": S.CACHE_STATS["computed"] - before["computed"],
            "stats_hits": S.CACHE_STATS["hits"] - before["hits"]}


def place_fusion(store: Any, evaluator: Any, recipe: Any, source: FusionSource | None) -> dict[str, float]:
    """Put a data recipe's merge into the replica's resident model: θ₀ merged by the store (which records the actor
    incarnation, so a restart between this and the evaluation is detected), then the data-driven merge loaded.
    The merge reads the bench shipped in ``source`` (the search's own, without its report split), not
    ``data.bench`` from disk: a worker node need not hold the bench's files."""
    from searchmerge.errors import SearchmergeError
    from searchmerge.fusion.data_recipe import data_params

    if source is None:
        raise SearchmergeError(f"a `{recipe.method}` recipe needs the bench's data (no fusion source given)")
    if [m.model for m in recipe.models] != list(store.names):
        raise SearchmergeError(f"a `{recipe.method}` trial merges every model of the bench {list(store.names)}")
    store.merge_into(base_recipe(list(store.names)), evaluator)
    return evaluator.run(load_fusion, source.bench_box, recipe.method, data_params(recipe), source.cache)
