"""MergeKit YAML in and out.

``from_mergekit`` turns a MergeKit ``MergeConfiguration`` (``models`` / ``base_model`` / ``merge_method`` /
``parameters`` with gradients and filters / ``dtype``) into a :class:`Recipe`; ``to_mergekit`` writes
a recipe back as a MergeKit config. Parameters are renamed where the two tools spell one idea
differently: MergeKit's ``normalize`` (TIES family) is our ``merge_func: mean|sum``, its boolean
``rescale`` is our ``rescale: l1|none``. What MergeKit cannot express (``trim_scope: model``,
``merge_func: max``, ``rescale: inverse``, methods it lacks) is refused with a message, never dropped.
"""

from __future__ import annotations

import warnings
from typing import Any

import yaml

from searchmerge.errors import RecipeError
from searchmerge.io.yaml_safe import KEY, load_yaml
from pydantic import ValidationError

from searchmerge.recipe import Conditional, Recipe, recipe_from_dict

#: MergeKit method names searchmerge implements with the same semantics.
SHARED_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "sce", "slerp", "nuslerp", "karcher", "model_stock",
)
#: Methods whose MergeKit `normalize` means "divide by the agreeing weights" (our merge_func: mean).
_CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
#: Methods where MergeKit lists the base among `models` and treats it as an endpoint/anchor.
_BASE_IN_MODELS = ("slerp",)
_REQUIRES_WEIGHT = {m: True for m in (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "nuslerp")}
_IGNORED_KEYS = ("tokenizer_source", "tokenizer", "chat_template", "name")
_DROPPED_PARAMS = ("int8_mask",)  # a memory option in MergeKit; no effect on the result
#: GTA methods whose MergeKit boolean `rescale` (L1-norm matching after sparsifying) is our `rescale: l1|none`.
_RESCALED = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
#: Our parameters that the MergeKit method lacks (MergeKit would ignore them): exported only at their default.
_OURS_ONLY = {"sce": {"lambda": 1.0}, "ties": {"elect_on": "weighted"}}


def _model_path(entry: Any, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and "model" in entry:
        return _model_path(entry["model"], where)
    raise RecipeError(f"{where}: cannot read a model reference from {entry!r} (expected a path string).")


def _plain_value(value: Any, loc: tuple[Any, ...]) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        try:
            return [Conditional(**v).model_dump() for v in value]
        except (ValidationError, TypeError):
            raise RecipeError(f"{'.'.join(map(str, loc))}: a conditional is `{{filter: <substring>, value: <number>}}`, "
                              f"got {value!r} — fix the list entries", loc=loc) from None
    return value


def _mapping(value: Any, where: str, loc: tuple[Any, ...]) -> dict[str, Any]:
    """``value`` (``None`` → ``{}``) if it is a mapping with string keys; a RecipeError naming ``where`` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise RecipeError(f"{where}: expected a mapping of `name: value`, got {value!r} — write `key: value` lines",
                          loc=loc)
    return value


_KNOWN_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "slices", "modules",
               *_IGNORED_KEYS)


def _convert_params(method: str, params: dict[str, Any], where: str, loc: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key in _DROPPED_PARAMS:
            continue
        if key == "normalize" and method in _CONSENSUS:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: `normalize` must be true or false, got {value!r}.")
            out["merge_func"] = "mean" if value else "sum"
        elif key == "rescale" and method in _RESCALED:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: `rescale` must be true or false, got {value!r} — MergeKit's rescale is "
                                  "a boolean", loc=(*loc, key))
            out["rescale"] = "l1" if value else "none"
        elif key in ("rescale", "density") and method == "task_arithmetic":
            continue  # MergeKit reads both only to sparsify; its task_arithmetic never sparsifies: no effect
        elif key == "rescale":
            if value is not False:
                raise RecipeError(f"{where}: `rescale: {value}` is not supported by `{method}` in searchmerge — "
                                  "remove it", loc=(*loc, key))
        elif key in _OURS_ONLY.get(method, {}) and value != _OURS_ONLY[method][key]:
            raise RecipeError(f"{where}: MergeKit's `{method}` has no `{key}` (MergeKit ignores it) — remove it",
                              loc=(*loc, key))
        else:
            out[key] = _plain_value(value, (*loc, key))
    return out


def from_mergekit(config: dict[str, Any] | str) -> Recipe:
    """A :class:`Recipe` from a MergeKit config (a dict, or YAML text)."""
    if isinstance(config, str):
        config, _ = load_yaml(config, name="<mergekit config>", error=RecipeError)
    if not isinstance(config, dict) or "merge_method" not in config:
        raise RecipeError("a MergeKit config is a mapping with `merge_method` — add `merge_method: <name>`")
    method = config["merge_method"]
    if method not in SHARED_METHODS:
        from searchmerge.suggest import did_you_mean

        hint = did_you_mean(str(method), SHARED_METHODS)
        raise RecipeError(
            f"MergeKit method `{method}` is not implemented by searchmerge — {hint + ' ' if hint else ''}"
            f"supported: {', '.join(SHARED_METHODS)}", loc=("merge_method",)
        )
    if "slices" in config or "modules" in config:
        raise RecipeError("MergeKit `slices`/`modules` (layer-range frankenmerges) are not supported — use `models`",
                          loc=("slices" if "slices" in config else "modules",))
    for key in config:
        if key not in _KNOWN_KEYS:
            from searchmerge.suggest import did_you_mean

            hint = did_you_mean(str(key), _KNOWN_KEYS)
            raise RecipeError(f"unknown MergeKit key `{key}` — {hint + ' ' if hint else ''}valid keys: "
                              f"{', '.join(_KNOWN_KEYS)}", loc=(key, KEY))
    for key in _IGNORED_KEYS:
        if key in config:
            warnings.warn(f"MergeKit `{key}` is ignored: searchmerge copies config and tokenizer from the base.",
                          stacklevel=2)
    base = _model_path(config["base_model"], "base_model") if config.get("base_model") else None
    entries = config.get("models") or []
    if not isinstance(entries, list):
        raise RecipeError(f"models: expected a list of `- model: <path>` entries, got {entries!r}", loc=("models",))
    models, index = [], []
    for i, entry in enumerate(entries):
        path = _model_path(entry, f"models[{i}]")
        params = _mapping(entry.get("parameters") if isinstance(entry, dict) else None, f"models[{i}].parameters",
                          ("models", i, "parameters"))
        if path == base and method not in ("linear",):
            continue  # MergeKit lists the base among the inputs; it is the anchor, not a task model
        models.append({"model": path, "parameters": _convert_params(method, params, f"models[{i}]", ("models", i, "parameters"))})
        index.append(i)
    data: dict[str, Any] = {
        "method": method,
        "base_model": base,
        "models": models,
        "parameters": _convert_params(method, _mapping(config.get("parameters"), "parameters", ("parameters",)),
                                      "parameters", ("parameters",)),
    }
    if method == "linear":
        data["base_model"] = None  # MergeKit's linear averages exactly the listed models
    if config.get("dtype"):
        data["dtype"] = config["dtype"]
    if config.get("out_dtype"):
        data["out_dtype"] = config["out_dtype"]
    try:
        return recipe_from_dict(data)
    except RecipeError as exc:  # our models[j] is the config's models[index[j]] (the base entry is skipped)
        loc = exc.loc or ()
        if len(loc) > 1 and loc[0] == "models" and isinstance(loc[1], int) and loc[1] < len(index):
            loc = ("models", index[loc[1]], *loc[2:])
        raise RecipeError(str(exc), loc=loc) from None


def _export_params(method: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "merge_func":
            if method not in _CONSENSUS or value == "max":
                raise RecipeError(f"{where}: `merge_func: {value}` has no MergeKit equivalent for `{method}`.")
            out["normalize"] = value == "mean"
        elif key == "rescale":
            if value == "inverse":
                raise RecipeError(f"{where}: `rescale: inverse` (1/density) has no MergeKit equivalent; use l1.")
            out["rescale"] = value == "l1"
        elif key == "trim_scope":
            if value != "tensor":
                raise RecipeError(f"{where}: MergeKit trims per tensor; `trim_scope: {value}` cannot be exported.")
        elif key == "trim_density":
            if value != 1 and value != 1.0:
                raise RecipeError(f"{where}: `trim_density` (TIES trim after DARE) has no MergeKit equivalent.")
        elif key in _OURS_ONLY.get(method, {}) and value != _OURS_ONLY[method][key]:
            raise RecipeError(f"{where}: MergeKit's `{method}` has no `{key}`; only {_OURS_ONLY[method][key]} "
                              "(no effect) can be exported.")
        else:
            out[key] = value
    return out


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The MergeKit config for ``recipe``; raises ``RecipeError`` for what MergeKit cannot express."""
    if recipe.method not in SHARED_METHODS:
        raise RecipeError(f"method `{recipe.method}` does not exist in MergeKit; cannot export.")
    dumped = recipe.to_dict()
    models = []
    if recipe.method in _BASE_IN_MODELS and recipe.base_model:
        models.append({"model": recipe.base_model})
    for i, entry in enumerate(dumped["models"]):
        item: dict[str, Any] = {"model": entry["model"]}
        params = _export_params(recipe.method, entry.get("parameters", {}), f"models[{i}]")
        if params:
            item["parameters"] = params
        models.append(item)
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model:
        out["base_model"] = recipe.base_model
    out["models"] = models
    params = _export_params(recipe.method, dumped.get("parameters", {}), "parameters")
    if _REQUIRES_WEIGHT.get(recipe.method) and "weight" not in params:
        if not all("weight" in m.get("parameters", {}) for m in models):
            params["weight"] = 1.0  # MergeKit requires `weight`; ours defaults to 1.0
    if params:
        out["parameters"] = params
    out["dtype"] = recipe.dtype
    if recipe.out_dtype:
        out["out_dtype"] = recipe.out_dtype
    return out


def to_mergekit_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_mergekit(recipe), sort_keys=False, default_flow_style=None)
