"""The search space, read from the method registry: each method's declared parameters, types and ranges.

A spec only narrows (``[low, high]`` inside the declared range, or a sub-list of the declared choices),
fixes (a scalar) or searches the declared range (``search``); it never declares a parameter. Several methods
make the method a searched categorical; each method's parameters are conditional on it (namespaced
``method.param``, read only when that method is drawn). Per-model parameters get one dimension per task
(``granularity: per_model``) and, with ``layer_groups: G``, one per task and depth group, emitted as a
MergeKit depth gradient of G values; a searched global scalar (e.g. λ) then gets one value per depth group
(a global gradient: per-layer λ over TSV-M's cached subspace merge costs what a λ trial costs). ``tensor_kinds`` gives every numeric coordinate one value per listed kind
(norm / embedding / attention / mlp) plus one for the other tensors, emitted as MergeKit name filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from searchmerge.errors import RecipeError
from searchmerge.methods.registry import Param, get_method
from searchmerge.recipe import Conditional, Recipe
from searchmerge.search import fusion as F
from searchmerge.search.spec import SearchSpec, SearchSpecError

METHOD_KEY = "method"
OTHER_KIND = "other"
# Substring filters per tensor kind, in priority order (first match wins, as MergeKit's filters do): BERT /
# RoBERTa / DistilBERT / GPT-2 / Llama / Mistral / CLIP names. Every kind is always emitted, so a tensor is
# classified the same whichever kinds a spec lists.
KIND_FILTERS: dict[str, tuple[str, ...]] = {
    "norm": ("LayerNorm", "norm", "ln_"),
    "embedding": ("embed", "wte", "wpe", "lm_head"),
    "attention": ("attention", "attn"),
    "mlp": ("mlp", "intermediate", "output.dense", "ffn", "fc1", "fc2", "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h"),
}


def tensor_kind(name: str) -> str:
    """The kind a tensor name falls in (``other`` when no filter matches)."""
    for kind, subs in KIND_FILTERS.items():
        if any(s in name for s in subs):
            return kind
    return OTHER_KIND


def kind_conditionals(values: dict[str, Any]) -> list[Conditional]:
    """Name-filter conditionals giving each kind its value (a kind not in ``values`` takes the ``other`` one)."""
    other = values[OTHER_KIND]
    conds = [Conditional(filter=sub, value=values.get(kind, other)) for kind, subs in KIND_FILTERS.items() for sub in subs]
    return conds + [Conditional(filter=None, value=other)]


@dataclass(frozen=True)
class Dim:
    """One searched coordinate."""

    key: str
    method: str
    param: str
    model: int | None = None  # index into the task list (per-model parameters)
    group: int | None = None  # depth group (layer_groups > 1)
    kind: str | None = None  # tensor kind (tensor_kinds listed)
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False


@dataclass(frozen=True)
class Space:
    methods: tuple[str, ...]
    dims: tuple[Dim, ...]
    fixed: dict[str, dict[str, Any]]  # method -> param -> fixed value
    models: tuple[str, ...]
    layer_groups: int
    tensor_kinds: tuple[str, ...] = ()
    models_known: bool = True  # False when checking a spec alone: model names in points are checked at search start
    data_bench: str = ""  # the bench spec file a data recipe names (set at search start; the spec's `bench` before)

    def tune_space(self) -> dict[str, Any]:
        from ray import tune

        out: dict[str, Any] = {}
        if len(self.methods) > 1:
            out[METHOD_KEY] = tune.choice(list(self.methods))
        for d in self.dims:
            if d.choices is not None:
                out[d.key] = tune.choice(list(d.choices))
            elif d.integer:
                out[d.key] = tune.randint(int(d.low), int(d.high) + 1)  # type: ignore[arg-type]
            else:
                out[d.key] = tune.uniform(float(d.low), float(d.high))  # type: ignore[arg-type]
        return out

    @property
    def is_fixed(self) -> bool:
        """One method with every parameter fixed: the search is a single-trial job."""
        return len(self.methods) == 1 and not self.dims

    def method_of(self, config: dict[str, Any]) -> str:
        return str(config.get(METHOD_KEY, self.methods[0]))

    def to_recipe(self, config: dict[str, Any], seed: int = 0) -> Recipe:
        """The recipe a sampled config stands for (only the drawn method's coordinates are read); a data-driven
        method gives a data recipe on ``data_bench`` (:func:`searchmerge.search.fusion.fusion_recipe`)."""
        method = self.method_of(config)
        glob: dict[str, Any] = dict(self.fixed.get(method, {}))
        if F.is_fusion(method):
            for d in self.dims:
                if d.method == method:
                    v = config[d.key]
                    glob[d.param] = v.item() if hasattr(v, "item") else v
            return F.fusion_recipe(method, glob, self.data_bench, list(self.models))
        spec = get_method(method)
        per_model: list[dict[str, Any]] = [{} for _ in self.models]
        # (model or None, param) -> kind or None -> a value, or G gradient values
        values: dict[tuple[int | None, str], dict[str | None, Any]] = {}
        for d in self.dims:
            if d.method != method:
                continue
            v = config[d.key]
            v = v.item() if hasattr(v, "item") else v
            slot = values.setdefault((d.model, d.param), {})
            if d.group is None:
                slot[d.kind] = v
            else:
                slot.setdefault(d.kind, [0.0] * self.layer_groups)[d.group] = float(v)
        for (m, p), by_kind in values.items():
            value = by_kind[None] if None in by_kind else kind_conditionals(by_kind)  # type: ignore[arg-type]
            (glob if m is None else per_model[m])[p] = value
        base = "base" if spec.base != "none" else None
        return Recipe(
            method=method, base_model=base,
            models=[{"model": n, "parameters": pm} for n, pm in zip(self.models, per_model)],
            parameters=glob, seed=seed,
        )

    def point(self, user: dict[str, Any]) -> dict[str, Any]:
        """A full config from a user's starting point ``{method: ..., param: value, ...}``.

        A value given for a per-model parameter applies to every model (and depth group); a mapping
        ``{task: value}`` (or ``{task: [G values]}`` with ``layer_groups: G``) gives each model its own, clipped
        to the searched range (e.g. AdaMerging's learned coefficients, :func:`searchmerge.fusion.adamerging.search_point`).
        Coordinates not given take the declared default when it lies in the searched range, else the midpoint.
        """
        method = str(user.get(METHOD_KEY, self.methods[0]))
        if method not in self.methods:
            raise SearchSpecError(f"points_to_evaluate: method {method!r} is not among the searched methods {list(self.methods)}")
        declared = {p.name: p for p in params_of(method)}
        unknown = [k for k in user if k != METHOD_KEY and k not in declared]
        if unknown:
            raise SearchSpecError(f"points_to_evaluate: {method} has no parameter(s) {unknown}; it declares {sorted(declared)}")
        for k, v in user.items():
            if isinstance(v, dict):
                bad = sorted(set(v) - set(self.models)) if self.models_known else []
                if bad or not declared[k].per_model:
                    why = f"unknown model(s) {bad}; models: {list(self.models)}" if bad else "it is not a per-model parameter"
                    raise SearchSpecError(f"points_to_evaluate: {method}.{k} given per model, but {why}")
        out: dict[str, Any] = {METHOD_KEY: method} if len(self.methods) > 1 else {}
        for d in self.dims:
            p = {q.name: q for q in params_of(d.method)}[d.param]
            v = user.get(d.param, p.default) if d.method == method else p.default
            if isinstance(v, dict):
                out[d.key] = _per_model(d, v.get(self.models[d.model]) if d.model is not None else None, p.default)
            else:
                out[d.key] = _clip(d, v)
        return out


def params_of(method: str) -> tuple[Param, ...]:
    """The declared parameters of a registry method or of a data-driven one (:mod:`searchmerge.search.fusion`)."""
    return F.fusion_params(method) if F.is_fusion(method) else get_method(method).params


def _per_model(d: Dim, v: Any, default: Any) -> Any:
    """One model's starting value (a G-list picks the dimension's depth group), clipped into the range."""
    if isinstance(v, (list, tuple)):
        v = v[d.group] if d.group is not None and len(v) > d.group else (sum(v) / len(v) if v else None)
    if v is None or isinstance(v, bool) or d.choices is not None:
        return _clip(d, default if v is None else v)
    v = min(max(float(v), float(d.low)), float(d.high))  # type: ignore[arg-type]
    return int(round(v)) if d.integer else v


def _clip(d: Dim, v: Any) -> Any:
    if d.choices is not None:
        return v if v in d.choices else d.choices[0]
    if isinstance(v, (list, tuple)) or v is None or isinstance(v, bool):
        v = None
    if v is None or not (d.low <= float(v) <= d.high):  # type: ignore[operator]
        v = (float(d.low) + float(d.high)) / 2  # type: ignore[arg-type]
    return int(round(v)) if d.integer else float(v)


def _dims_for(method: str, p: Param, setting: Any, models: Sequence[str], spec: SearchSpec) -> tuple[list[Dim], Any]:
    """The dimensions of one declared parameter (or its fixed value)."""
    where = f"methods.{method}.{p.name}"
    if setting == "search":
        if p.choices is not None:
            choices: tuple[Any, ...] | None = tuple(p.choices)
            bounds = None
        else:
            bounds = p.search_bounds()
            choices = None
            if bounds is None or p.kind not in (float, int):
                raise SearchSpecError(f"{where}: `{p.name}` has no declared search range; give [low, high] or a value")
    elif isinstance(setting, list):
        if p.choices is not None:
            bad = [c for c in setting if c not in p.choices]
            if bad or not setting:
                raise SearchSpecError(f"{where}: choices {setting} must be a non-empty sub-list of {list(p.choices)}")
            choices, bounds = tuple(setting), None
        else:
            if p.kind not in (float, int) or len(setting) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in setting):
                raise SearchSpecError(f"{where}: a range is [low, high] of numbers, got {setting}")
            lo, hi = float(setting[0]), float(setting[1])
            if lo >= hi:
                raise SearchSpecError(f"{where}: range low {lo:g} must be below high {hi:g}")
            for x in (lo, hi):
                if p.range is not None and not p.range.contains(x):
                    raise SearchSpecError(f"{where}: range [{lo:g}, {hi:g}] leaves the declared range {p.range.describe()}")
            choices, bounds = None, (lo, hi)
    else:
        try:
            return [], p.check(setting, where)
        except RecipeError as exc:
            raise SearchSpecError(str(exc)) from None
    key = f"{method}.{p.name}"
    kinds: list[str | None] = [None]
    if spec.tensor_kinds and choices is None:
        kinds = [*spec.tensor_kinds, OTHER_KIND]
    tag = lambda k: f"%{k}" if k is not None else ""  # noqa: E731
    make = lambda k, m=None, g=None, kind=None: Dim(  # noqa: E731
        k + tag(kind), method, p.name, m, g, kind, *(bounds if bounds else (None, None)), choices, p.kind is int
    )
    if not p.per_model and choices is None and spec.layer_groups > 1:  # e.g. λ: one value per depth group
        return [make(f"{key}#{g}", None, g, kind=c) for g in range(spec.layer_groups) for c in kinds], None
    if not p.per_model or spec.granularity == "global" or choices is not None:
        return [make(key, kind=c) for c in kinds], None
    if spec.layer_groups == 1:
        return [make(f"{key}@{n}", i, kind=c) for i, n in enumerate(models) for c in kinds], None
    return [make(f"{key}@{n}#{g}", i, g, kind=c) for i, n in enumerate(models) for g in range(spec.layer_groups)
            for c in kinds], None


def build_space(spec: SearchSpec, models: Sequence[str] | None = None) -> Space:
    """The space of ``spec`` over ``models`` (task names); raises :class:`SearchSpecError` naming the field."""
    known = models is not None
    models = tuple(models) if models is not None else ("model_0", "model_1")
    dims: list[Dim] = []
    fixed: dict[str, dict[str, Any]] = {}
    methods = []
    for method, settings in spec.methods.items():
        if F.is_fusion(method):
            new_dims, values = _fusion_dims(method, settings, spec)
            methods.append(method)
            dims += new_dims
            fixed[method] = values
            continue
        try:
            m = get_method(method)
        except RecipeError as exc:
            raise SearchSpecError(f"methods: {exc}") from None
        methods.append(m.name)
        declared = {p.name: p for p in m.params}
        _refuse_unknown(method, m.name, settings, declared)
        if m.max_models is not None and len(models) > m.max_models:
            raise SearchSpecError(f"methods.{method}: merges at most {m.max_models} models, the bench has {len(models)}")
        for name, setting in settings.items():
            new, value = _dims_for(m.name, declared[name], setting, models, spec)
            dims += new
            if not new:
                fixed.setdefault(m.name, {})[name] = value
    space = Space(tuple(methods), tuple(dims), fixed, models, spec.layer_groups, tuple(spec.tensor_kinds),
                  models_known=known, data_bench=spec.bench_path())
    for i, pt in enumerate(spec.points_to_evaluate):
        try:
            space.point(pt)
        except SearchSpecError as exc:
            raise SearchSpecError(f"points_to_evaluate[{i}]: {str(exc).removeprefix('points_to_evaluate: ')}") from None
    return space


def _refuse_unknown(method: str, name: str, settings: dict[str, Any], declared: dict[str, Param]) -> None:
    unknown = [k for k in settings if k not in declared]
    if unknown:
        from searchmerge.suggest import did_you_mean

        hint = did_you_mean(unknown[0], declared)
        raise SearchSpecError(f"methods.{method}: no parameter(s) {unknown} — {hint + ' ' if hint else ''}"
                              f"{name} declares {sorted(declared)}")


def _fusion_dims(method: str, settings: dict[str, Any], spec: SearchSpec) -> tuple[list[Dim], dict[str, Any]]:
    """A data-driven method's dimensions and fixed values. Its parameters are whole-model scalars: never per
    model, per depth group or per tensor kind. Checked here, before any work: declared names, ranges, choices,
    the statistics split against the report split, and one sample through ``fusion.jobs.resolve_params``."""
    if method in F.NOT_SEARCHABLE:
        raise SearchSpecError(f"methods.{method}: {F.NOT_SEARCHABLE[method]}")
    declared = {p.name: p for p in F.fusion_params(method)}
    _refuse_unknown(method, method, settings, declared)
    plain = spec.model_copy(update={"granularity": "global", "layer_groups": 1, "tensor_kinds": []})
    dims: list[Dim] = []
    fixed: dict[str, Any] = {}
    for name, setting in settings.items():
        p = declared[name]
        if p.kind is list:
            fixed[name] = F.check_fixed_list(method, p, setting)
        elif name in F.DISCRETE and (isinstance(setting, list) or setting == "search"):
            dims.append(Dim(f"{method}.{name}", method, name, choices=F.discrete_choices(method, p, setting), integer=True))
        else:
            new, value = _dims_for(method, p, setting, (), plain)
            dims += new
            if not new:
                fixed[name] = value
    splits = next((d.choices for d in dims if d.param == "split"), None) or [fixed.get("split", declared["split"].default)]
    F.check_split(method, splits, spec.report_split)
    sample = {d.param: d.choices[0] if d.choices is not None else (int(d.low) if d.integer else d.low) for d in dims}
    F.check_resolved(method, {**fixed, **sample})
    return dims, fixed
