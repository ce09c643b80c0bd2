"""A recipe that names its data: ``searchmerge merge`` of Fisher, RegMean, RegMean++ and AdaMerging.

::

    method: regmean
    data: {bench: bench.yaml, examples: 256, batch_size: 32, seed: 0, split: train}
    models: [{model: topic}, {model: lang}]     # the bench's fine-tuned models, by task name
    parameters: {alpha: 0.95}

``data`` holds the bench spec (its base, fine-tuned models, heads and task data) and how examples are drawn;
``parameters`` the method's own (:data:`searchmerge.fusion.jobs.PARAMS`). Everything that needs no file is
checked when the recipe is built, like every other recipe field (:func:`validate_data_recipe`); the bench file
and the model names when the merge starts, before any statistics pass (:func:`data_bench`). The merge is
:func:`searchmerge.fusion.jobs.fusion_merge` on the bench restricted to the listed models.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from searchmerge.bench.pool import Bench, BenchSpecError
from searchmerge.errors import RecipeError
from searchmerge.fusion.jobs import PARAMS, resolve_params
from searchmerge.io.yaml_safe import KEY
from searchmerge.suggest import did_you_mean

#: data-driven methods a recipe can merge (ensembles are evaluated, not merged: ``searchmerge bench``)
DATA_METHODS = tuple(m for m in PARAMS if m != "ensemble")
#: the fields that live under ``data:`` (the rest of a method's parameters under ``parameters:``)
DATA_FIELDS = ("split", "examples", "batch_size", "seed")


def validate_data_recipe(recipe: Any) -> None:
    """Method, base, models and every data and method parameter (names, types, ranges, the report split)."""
    method = recipe.method
    if method not in DATA_METHODS:
        why = ("ensembles are evaluated, not merged — run them with `searchmerge bench`" if method in PARAMS
               else f"`data:` is for the data-driven merges {list(DATA_METHODS)} — remove `data:` or pick one of them")
        raise RecipeError(f"method `{method}` takes no data: {why}", loc=("data",))
    if recipe.base_model is not None:
        raise RecipeError("a data recipe merges its bench's base model — remove `base_model`", loc=("base_model",))
    if recipe.seed != 0:
        raise RecipeError("a data recipe draws its examples and batches with `data.seed` — move `seed` under `data:`",
                          loc=("seed",))
    if recipe.dtype != "float32":
        raise RecipeError("data-driven merges compute in float32 — remove `dtype` (`out_dtype` sets the output's)",
                          loc=("dtype",))
    if not recipe.models:
        raise RecipeError("list the bench's fine-tuned models to merge under `models` (`- model: <task>`)",
                          loc=("models",))
    names = [m.model for m in recipe.models]
    for i, entry in enumerate(recipe.models):
        if entry.parameters:
            raise RecipeError(f"models[{i}] ({entry.model}): `{method}` has no per-model parameters — "
                              "set its parameters under `parameters`", loc=("models", i, "parameters"))
        if names.index(entry.model) != i:
            raise RecipeError(f"models[{i}]: `{entry.model}` is listed twice — list each model once", loc=("models", i))
    allowed = PARAMS[method]
    fields = recipe.data.fields()
    for k in fields:
        if k not in allowed:
            raise RecipeError(f"data.{k}: `{method}` takes no `{k}` — its data fields: "
                              f"{[f for f in DATA_FIELDS if f in allowed]}", loc=("data", k, KEY))
    for k in recipe.parameters:
        if k in DATA_FIELDS:
            raise RecipeError(f"parameters.{k}: `{k}` says how the data is drawn — set it under `data:`",
                              loc=("parameters", k, KEY))
        if k not in allowed:
            hint = did_you_mean(k, [p for p in allowed if p not in DATA_FIELDS])
            valid = ", ".join(p for p in allowed if p not in DATA_FIELDS)
            raise RecipeError(f"`{method}` has no parameter `{k}` — {hint + ' ' if hint else ''}(valid: {valid})",
                              loc=("parameters", k, KEY))
    try:
        resolve_params(method, data_params(recipe))
    except BenchSpecError as exc:
        loc = _loc_of(str(exc), fields, recipe.parameters)
        where = f"{loc[0]}.{loc[1]}: " if len(loc) == 2 else ""
        raise RecipeError(f"{where}{exc}", loc=loc) from None


def _loc_of(message: str, fields: dict[str, Any], parameters: dict[str, Any]) -> tuple[Any, ...]:
    """Where a parameter error points: the first data field or parameter the message names."""
    named = re.findall(r"\b(\w+)\b", message)
    for word in named:
        if word in fields:
            return ("data", word)
        if word in parameters:
            return ("parameters", word)
    return ("method",)


def data_params(recipe: Any, device: str | None = None) -> dict[str, Any]:
    """The flat parameters of :func:`~searchmerge.fusion.jobs.fusion_merge`: data fields + method parameters
    (``device``: the command line's, unless the recipe sets one)."""
    params: dict[str, Any] = {**recipe.data.fields(), **recipe.parameters}
    if device is not None and "device" not in params and "device" in PARAMS[recipe.method]:
        params["device"] = device
    return params


def data_bench(recipe: Any) -> Bench:
    """The recipe's bench restricted to its models (in the recipe's order); a missing file or an unknown model
    is a ``RecipeError`` naming the field, raised before any work."""
    from searchmerge.bench.pool import load_bench

    path = Path(recipe.data.bench).expanduser()
    if not path.is_file():
        raise RecipeError(f"data.bench: bench spec `{path}` not found — give the path of a bench spec YAML "
                          "(relative paths resolve against the recipe's folder)", loc=("data", "bench"))
    bench = load_bench(path)
    mp = bench.modelpool
    for i, entry in enumerate(recipe.models):
        if entry.model not in mp.finetuned or entry.model not in bench.taskpool.tasks:
            known = [t for t in bench.taskpool.names if t in mp.finetuned]
            hint = did_you_mean(entry.model, known)
            raise RecipeError(f"models[{i}]: `{entry.model}` is not a fine-tuned model of bench `{path}` — "
                              f"{hint + ' ' if hint else ''}models: {', '.join(known)}", loc=("models", i, "model"))
    names = [m.model for m in recipe.models]
    if names == [t for t in bench.taskpool.names if t in mp.finetuned]:
        return bench
    keep = lambda d: {k: v for k, v in d.items() if k in names}  # noqa: E731
    pool = dataclasses.replace(mp, finetuned=keep(mp.finetuned), heads=keep(mp.heads),
                               task_configs=keep(mp.task_configs))
    return Bench(spec=bench.spec, modelpool=pool, taskpool=bench.taskpool.subset(names))


def bench_paths(bench: Bench) -> tuple[str, list[str]]:
    """The folders of the bench's base and of its fine-tuned models (what the output's files come from)."""
    spec = bench.modelpool.spec
    members = [t for t in bench.taskpool.names if t in bench.modelpool.finetuned]
    return str(spec.path(spec.base)), [str(spec.path(spec.finetuned[t])) for t in members]


def run_data_recipe(recipe: Any, bench: Bench, *, device: str = "cpu", progress: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(merged backbone state dict, extra files for the output folder) on ``bench`` (:func:`data_bench`).
    AdaMerging adds its learned coefficients as an ordinary recipe on the pool's folders
    (``adamerging_recipe.yaml``: ``searchmerge merge`` of it reproduces the merge)."""
    from searchmerge.fusion.jobs import fusion_merge

    params = resolve_params(recipe.method, data_params(recipe, device))
    if recipe.method != "adamerging":
        state, _ = fusion_merge(bench, recipe.method, params, progress=progress)
        return state, {}
    from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge, recipe_with_paths

    res = adamerge(bench, AdaMergingConfig(**params), progress=progress)
    return res.merged, {"adamerging_recipe.yaml": recipe_with_paths(bench, res.recipe).to_yaml()}
