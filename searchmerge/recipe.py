"""Recipes: which models, which method, which parameters — one frozen pydantic model, YAML in and out.

A parameter value is a scalar, a depth gradient (a list of numbers interpolated piecewise-linearly
over layer index, as MergeKit does) or a list of ``{filter, value}`` conditionals on the tensor name
(substring match, first match wins, ``filter: null`` / ``"*"`` is the fallback). Per-model values sit
under ``models[i].parameters``; a global value of a per-model parameter applies to every model.
Only registered method names are accepted: a recipe never names a class or runs code. A data-driven merge
(Fisher, RegMean, RegMean++, AdaMerging) names its bench and how examples are drawn under ``data:``; its checks
live in :mod:`searchmerge.fusion.data_recipe`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from searchmerge.errors import RecipeError
from searchmerge.io.yaml_safe import KEY, Positions, load_yaml, position_of, read_yaml_mapping
from searchmerge.methods.registry import MethodSpec, Param, get_method
from searchmerge.suggest import did_you_mean

Scalar = Union[bool, int, float, str]
DType = Literal["float32", "float16", "bfloat16", "float64"]


class Conditional(BaseModel):
    """``{filter, value}``: applies ``value`` to tensors whose name contains ``filter``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[Conditional], list[str]]  # list[str]: data-driven `exclude` regexes


class DataSpec(BaseModel):
    """``data:`` of a data-driven merge (``method: fisher | regmean | regmean_plusplus | adamerging``): the bench
    spec whose pool and task data it reads (relative: to the recipe's folder), and how the data is drawn; an
    unset field takes the method's default (:data:`searchmerge.fusion.jobs.PARAMS`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    bench: str
    split: str | None = None
    examples: StrictInt | None = None
    batch_size: StrictInt | None = None
    seed: StrictInt | None = None

    def fields(self) -> dict[str, Any]:
        """The data fields that are set (without ``bench``)."""
        return {k: v for k, v in self.model_dump(exclude={"bench"}).items() if v is not None}


class ModelEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A merge recipe. ``Recipe.from_yaml(r.to_yaml()) == r`` for every valid recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DType = "float32"
    out_dtype: DType | None = None
    seed: int = 0
    data: DataSpec | None = None  # a data-driven merge: its models are the bench's (searchmerge.fusion.data_recipe)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _recipe_error(exc) from None

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        validate_recipe(self)
        return self

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def model_paths(self) -> list[str]:
        return [m.model for m in self.models]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str | bytes, name: str = "<recipe>") -> "Recipe":
        data, positions = load_yaml(text, name=name, error=RecipeError)
        if not isinstance(data, dict):
            raise RecipeError(f"{name}: a recipe must be a YAML mapping with `method` and `models` — "
                              "write `method: …` and `models: […]` lines")
        return _located(lambda: recipe_from_dict(data), positions, name)

    def with_parameters(self, **params: ParamValue) -> "Recipe":
        """A copy with global parameters replaced (how a search turns a trial's config into a recipe)."""
        return recipe_from_dict({**self.to_dict(), "parameters": {**self.parameters, **params}})


_FIELDS = {(): ("method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "data"),
           ("models",): ("model", "parameters"), ("filter",): ("filter", "value"),
           ("data",): ("bench", "split", "examples", "batch_size", "seed")}


def _one_error(err: Any) -> tuple[str, tuple[Any, ...]]:
    """(message, loc) of one pydantic error; our own RecipeError inside keeps its text and loc."""
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, RecipeError):
        return str(inner), tuple(inner.loc or ())
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and loc:
        owner = () if len(loc) == 1 else ("models",) if loc[0] == "models" and len(loc) == 3 else \
            ("data",) if loc[0] == "data" else ("filter",)
        hint = did_you_mean(str(loc[-1]), _FIELDS.get(owner, ()))
        msg = f"unknown key `{loc[-1]}` — {hint + ' ' if hint else ''}valid keys: {', '.join(_FIELDS.get(owner, ()))}"
        loc = (*loc, KEY)
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return (f"{where}: {msg}" if where else msg), tuple(loc)


def _recipe_error(exc: ValidationError) -> RecipeError:
    """All of a recipe's problems on one line; the first one's place (``loc``) for file:line:col."""
    parts = [_one_error(e) for e in exc.errors()]
    text = "; ".join(p[0] for p in parts)
    return RecipeError(f"invalid recipe: {text}", loc=parts[0][1] if parts else None)


def _located(build: Any, positions: Positions, name: str) -> Recipe:
    """Run ``build``; a RecipeError gets the file:line:col of what it names (else the file) in front."""
    try:
        return build()
    except RecipeError as exc:
        where = position_of(positions, exc.loc or (), name)
        raise RecipeError(f"{where}: {exc}", loc=exc.loc) from None


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a plain dict; every problem comes back in one ``RecipeError``."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping with `method` and `models`, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"recipe keys must be strings, got {bad[0]!r} — write `key: value` lines")
    return Recipe(**data)


def load_recipe(path: str | Path) -> Recipe:
    """Load our recipe YAML, or a MergeKit config (recognised by its ``merge_method`` key)."""
    data, positions = read_yaml_mapping(path, what="recipe", error=RecipeError, keys=("method", "models"))
    if "merge_method" in data:
        from searchmerge.mergekit import from_mergekit

        return _located(lambda: from_mergekit(data), positions, str(path))
    recipe = _located(lambda: recipe_from_dict(data), positions, str(path))
    if recipe.data is not None and not Path(recipe.data.bench).expanduser().is_absolute():
        bench = str((Path(path).parent / Path(recipe.data.bench).expanduser()).resolve())
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"bench": bench})})
    return recipe


# --- validation -----------------------------------------------------------------------------------


def _leaf_values(value: ParamValue) -> list[Any]:
    """Every scalar a value can resolve to (gradient points, conditional values)."""
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            if isinstance(item, Conditional):
                out.extend(item.value if isinstance(item.value, list) else [item.value])
            else:
                out.append(item)
        return out
    return [value]


def _check_value(param: Param, value: ParamValue, where: str) -> None:
    if isinstance(value, list) and param.kind not in (float, int) and not all(isinstance(v, Conditional) for v in value):
        raise RecipeError(f"{where}: `{param.name}` is {param.kind.__name__}; a gradient list needs a number.")
    for leaf in _leaf_values(value):
        param.check(leaf, where)


def validate_recipe(recipe: Recipe) -> None:
    """Check everything that needs no file: method, parameter names, types, ranges, model counts, base."""
    if recipe.data is not None:
        from searchmerge.fusion.data_recipe import validate_data_recipe

        return validate_data_recipe(recipe)
    spec = _checked(lambda: _registered(recipe.method), ("method",))
    n = len(recipe.models)
    loc: tuple[Any, ...] = ("models",)
    if n < spec.min_models:
        raise RecipeError(f"method `{spec.name}` needs at least {spec.min_models} model(s) besides the base, "
                          f"got {n} — list them under `models`", loc=loc)
    if spec.max_models is not None and n > spec.max_models:
        raise RecipeError(f"method `{spec.name}` takes at most {spec.max_models} model(s) besides the base, "
                          f"got {n} — remove the extra entries or pick another method", loc=loc)
    if spec.base == "required" and not recipe.base_model:
        raise RecipeError(f"method `{spec.name}` needs a `base_model` — add `base_model: <path>`", loc=("method",))
    if spec.base == "none" and recipe.base_model:
        raise RecipeError(f"method `{spec.name}` takes no `base_model` — remove it", loc=("base_model",))
    for name, value in recipe.parameters.items():
        param = _checked(lambda: spec.param(name), ("parameters", name, KEY))
        _checked(lambda: _check_value(param, value, "parameters"), ("parameters", name))
    for i, entry in enumerate(recipe.models):
        for name, value in entry.parameters.items():
            loc = ("models", i, "parameters", name)
            param = _checked(lambda: spec.param(name), (*loc, KEY))
            if not param.per_model:
                raise RecipeError(
                    f"models[{i}] ({entry.model}): `{name}` is a global parameter of `{spec.name}` — "
                    "set it under the recipe's `parameters`", loc=loc,
                )
            _checked(lambda: _check_value(param, value, f"models[{i}] ({entry.model})"), loc)
    if spec.prepare is not None and spec.needs_prepare(global_scalars(recipe)):
        reads = getattr(spec.prepare, "reads", None)  # default: every per-model parameter
        for p in spec.params:
            if p.per_model and (reads is None or p.name in reads):
                for i in range(n):
                    v = _raw_value(recipe, p, i)
                    if isinstance(v, list):
                        raise RecipeError(
                            f"models[{i}]: `{p.name}` must be a single value per model for a whole-model "
                            f"step (e.g. `trim_scope: model`), got {v!r}."
                        )


def _registered(method: str) -> MethodSpec:
    """The registered method; a data-driven method's name says that it needs ``data:``."""
    try:
        return get_method(method)
    except RecipeError:
        from searchmerge.fusion.data_recipe import DATA_METHODS

        if method in DATA_METHODS:
            raise RecipeError(f"`{method}` learns from data: add a `data:` block naming a bench spec "
                              f"(`data: {{bench: bench.yaml}}`, docs/fusion.md)", loc=("method",)) from None
        raise


def _checked(check: Any, loc: tuple[Any, ...]) -> Any:
    """Run ``check``; a RecipeError it raises learns where in the recipe it happened."""
    try:
        return check()
    except RecipeError as exc:
        raise RecipeError(str(exc), loc=exc.loc or loc) from None


def _raw_value(recipe: Recipe, param: Param, model_index: int | None) -> ParamValue:
    if param.per_model and model_index is not None:
        local = recipe.models[model_index].parameters
        if param.name in local:
            return local[param.name]
    if param.name in recipe.parameters:
        return recipe.parameters[param.name]
    return param.default


# --- per-tensor resolution ------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first dotted integer in a tensor name (``model.layers.3.mlp`` → 3); ``None`` outside layers."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_fraction(name: str, n_layers: int) -> float:
    """Depth t ∈ [0, 1] of a tensor, as MergeKit's planner: ``idx/(L−1)`` inside layers (1 when L = 1),
    and 0 for tensors outside the layers (embeddings, final norm, head)."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return 1.0 if n_layers <= 1 else min(1.0, idx / (n_layers - 1))


def interpolate_gradient(values: list[float], t: float) -> float:
    """MergeKit's gradient: piecewise-linear over ``len(values)`` evenly spaced knots at depth ``t``."""
    if len(values) == 1:
        return values[0]
    s = t * (len(values) - 1)
    i0 = int(math.floor(s))
    i1 = min(len(values) - 1, i0 + 1)
    frac = s - i0
    return (1 - frac) * values[i0] + frac * values[i1]


_MISSING = object()


def evaluate_value(value: ParamValue, name: str, t: float) -> Any:
    """Resolve one parameter value for tensor ``name`` at depth ``t``; ``_MISSING`` if no conditional matches."""
    if isinstance(value, list):
        if value and all(isinstance(v, Conditional) for v in value):
            for cond in value:
                if cond.filter in (None, "*") or cond.filter in name:
                    return evaluate_value(cond.value, name, t)
            return _MISSING
        return interpolate_gradient([float(v) for v in value], t)
    return value


def _resolve_one(recipe: Recipe, param: Param, model_index: int | None, name: str, t: float) -> Any:
    levels: list[ParamValue] = []
    if param.per_model and model_index is not None and param.name in recipe.models[model_index].parameters:
        levels.append(recipe.models[model_index].parameters[param.name])
    if param.name in recipe.parameters:
        levels.append(recipe.parameters[param.name])
    for value in levels:
        out = evaluate_value(value, name, t)
        if out is not _MISSING:
            return param.kind(out) if param.kind in (float, int) and not isinstance(out, bool) else out
    return param.default


def resolve_params(recipe: Recipe, name: str, t: float) -> dict[str, Any]:
    """Parameters for one tensor: scalars for global parameters, lists (one per model) for per-model ones."""
    spec = recipe.spec
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.per_model:
            out[p.name] = [_resolve_one(recipe, p, i, name, t) for i in range(len(recipe.models))]
        else:
            out[p.name] = _resolve_one(recipe, p, None, name, t)
    return out


def global_scalars(recipe: Recipe) -> dict[str, Any]:
    """Tensor-independent parameter values (for whole-model steps); gradients/conditionals resolve at t=0."""
    return resolve_params(recipe, "", 0.0)
