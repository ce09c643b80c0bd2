"""The method registry: a merge method is one typed per-tensor function, registered once.

Its keyword-only parameters, with their ``Annotated`` ranges, are the method's whole contract:
recipes are validated against them and searches read their space from them.

    @merge_method("task_arithmetic", inputs="deltas", reference="https://arxiv.org/abs/2212.04089")
    def task_arithmetic(base, deltas, *, weight: PerModel[Weight] = 1.0, lambda_: Scale = 1.0):
        ...

* ``inputs="deltas"``: the function gets ``deltas`` (τ_i = θ_i − θ₀) and returns the merged delta;
  the caller adds it to the base. ``inputs="weights"``: it gets ``tensors`` (θ_i) and returns the
  merged weight. The resident store (which keeps task vectors) and the file merge share one function.
* Optional injected arguments: ``rng`` (a ``torch.Generator`` seeded per tensor, for the random
  methods) and ``stats`` (whole-model statistics made by the method's ``prepare`` step).
* A trailing underscore is dropped from the public name (``lambda_`` → ``lambda``).
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence

import torch

from searchmerge.errors import RecipeError
from searchmerge.suggest import unknown

__all__ = [
    "Range",
    "Choice",
    "PerModel",
    "Param",
    "MethodSpec",
    "merge_method",
    "get_method",
    "list_methods",
    "METHODS",
]


@dataclass(frozen=True)
class Range:
    """Valid closed (or open) interval of a numeric parameter, and the sub-interval worth searching."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    search: tuple[float, float] | None = None

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True)
class Choice:
    """A categorical parameter's allowed values."""

    values: tuple[Any, ...]


class _PerModelMarker:
    pass


_PER_MODEL = _PerModelMarker()


class PerModel:
    """``PerModel[Annotated[float, Range(...)]]``: one value per merged model (MergeKit's tensor parameters)."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item, _PER_MODEL]


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method."""

    name: str
    arg: str
    kind: type
    default: Any
    per_model: bool = False
    range: Range | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False

    @property
    def searchable(self) -> bool:
        return self.choices is not None or (self.kind in (float, int) and self.range is not None)

    def search_bounds(self) -> tuple[float, float] | None:
        if self.range is None:
            return None
        if self.range.search is not None:
            return self.range.search
        if self.range.low is not None and self.range.high is not None:
            return (self.range.low, self.range.high)
        return None

    def check(self, value: Any, where: str) -> Any:
        """Coerce one resolved scalar value and check type and range; raise ``RecipeError`` naming ``where``."""
        if value is None and self.optional:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise RecipeError(f"{where}: `{self.name}` must be one of {list(self.choices)}, got {value!r}.")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: `{self.name}` must be true or false, got {value!r}.")
            return value
        if self.kind in (float, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: `{self.name}` must be a number, got {value!r}.")
            if not math.isfinite(value):
                raise RecipeError(f"{where}: `{self.name}` must be a finite number, got {value!r} — "
                                  "NaN and infinities make every merged weight NaN; give a number")
            if self.kind is int and float(value) != int(value):
                raise RecipeError(f"{where}: `{self.name}` must be an integer, got {value!r}.")
            value = self.kind(value)
            if self.range is not None and not self.range.contains(value):
                raise RecipeError(
                    f"{where}: `{self.name}` must lie in {self.range.describe()}, got {value!r}."
                )
            return value
        if not isinstance(value, self.kind):
            raise RecipeError(f"{where}: `{self.name}` must be {self.kind.__name__}, got {value!r}.")
        return value


PrepareFn = Callable[..., dict]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: the per-tensor function and what it declares."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    inputs: Literal["deltas", "weights"]
    base: Literal["required", "optional", "none"]
    min_models: int
    max_models: int | None
    uses_rng: bool
    uses_stats: bool
    reference: str
    doc: str
    prepare: PrepareFn | None = None
    aliases: tuple[str, ...] = field(default=())
    final_scale: str | None = None  # a parameter the result is multiplied by last, and used nowhere else

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        what, fix = unknown(f"parameter of `{self.name}`", name, [p.name for p in self.params])
        raise RecipeError(f"method `{self.name}` has no parameter `{name}` — {fix}")

    def needs_prepare(self, scalars: dict[str, Any]) -> bool:
        """Whether this call needs a whole-model statistics pass (e.g. TIES with ``trim_scope: model``)."""
        if self.prepare is None:
            return False
        check = getattr(self.prepare, "needed", None)
        return True if check is None else bool(check(scalars))

    def __call__(
        self,
        base: torch.Tensor | None,
        inputs: Sequence[torch.Tensor],
        params: dict[str, Any],
        *,
        rng: torch.Generator | None = None,
        stats: Any = None,
    ) -> torch.Tensor:
        """Run the per-tensor function with public parameter names; returns a new tensor."""
        kwargs = {p.arg: params[p.name] for p in self.params if p.name in params}
        if self.uses_rng:
            kwargs["rng"] = rng
        if self.uses_stats:
            kwargs["stats"] = stats
        return self.fn(base, list(inputs), **kwargs)


METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def _param_from_annotation(arg: str, ann: Any, default: Any) -> Param:
    per_model = False
    rng: Range | None = None
    choices: tuple[Any, ...] | None = None
    optional = False
    base_type: Any = ann
    # unwrap nested Annotated (PerModel[Annotated[float, Range]] == Annotated[float, Range, _PER_MODEL])
    while typing.get_origin(base_type) is Annotated:
        args = typing.get_args(base_type)
        base_type = args[0]
        for meta in args[1:]:
            if meta is _PER_MODEL:
                per_model = True
            elif isinstance(meta, Range):
                rng = meta
            elif isinstance(meta, Choice):
                choices = meta.values
    origin = typing.get_origin(base_type)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        members = [a for a in typing.get_args(base_type) if a is not type(None)]
        optional = len(members) < len(typing.get_args(base_type))
        base_type = members[0]
    if typing.get_origin(base_type) is Literal:
        choices = typing.get_args(base_type)
        base_type = type(choices[0])
    if base_type not in (float, int, bool, str):
        raise TypeError(f"merge method parameter `{arg}`: unsupported annotation {ann!r}")
    name = arg[:-1] if arg.endswith("_") else arg
    return Param(
        name=name,
        arg=arg,
        kind=base_type,
        default=default,
        per_model=per_model,
        range=rng,
        choices=choices,
        optional=optional,
    )


def merge_method(
    name: str,
    *,
    inputs: Literal["deltas", "weights"],
    base: Literal["required", "optional", "none"] = "required",
    min_models: int = 1,
    max_models: int | None = None,
    reference: str = "",
    prepare: PrepareFn | None = None,
    aliases: Sequence[str] = (),
    final_scale: str | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a per-tensor merge function; its keyword-only parameters become the method's parameters.

    ``final_scale``: a parameter (e.g. ``lambda``) the function's result is multiplied by as its last
    operation and that it uses nowhere else, so ``f(λ) == f(1)·λ`` bit for bit; the resident store then
    caches ``f(1)`` and a trial that changes only that parameter costs one scale-and-add pass."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS or name in _ALIASES:
            raise ValueError(f"merge method `{name}` is registered twice")
        if inputs == "deltas" and base != "required":
            raise ValueError(f"`{name}`: a delta method needs a base model")
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = []
        uses_rng = uses_stats = False
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "rng":
                uses_rng = True
                continue
            if p.name == "stats":
                uses_stats = True
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"`{name}`: parameter `{p.name}` needs a default")
            params.append(_param_from_annotation(p.name, hints[p.name], p.default))
        spec = MethodSpec(
            name=name,
            fn=fn,
            params=tuple(params),
            inputs=inputs,
            base=base,
            min_models=min_models,
            max_models=max_models,
            uses_rng=uses_rng,
            uses_stats=uses_stats,
            reference=reference,
            doc=inspect.getdoc(fn) or "",
            prepare=prepare,
            aliases=tuple(aliases),
            final_scale=final_scale,
        )
        if final_scale is not None and final_scale not in {p.name for p in params}:
            raise ValueError(f"`{name}`: final_scale `{final_scale}` is not one of its parameters")
        METHODS[name] = spec
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return register


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (or one of its aliases); a clear error otherwise."""
    from searchmerge import methods as _  # noqa: F401  (registers the built-ins)

    key = _ALIASES.get(name, name)
    if key not in METHODS:
        what, fix = unknown("merge method", name, [*METHODS, *_ALIASES])
        raise RecipeError(f"{what} — {fix}; `searchmerge methods` lists them", loc=("method",))
    return METHODS[key]


def method_names() -> list[str]:
    """Every name a recipe may use: registered methods and their aliases."""
    from searchmerge import methods as _  # noqa: F401

    return sorted([*METHODS, *_ALIASES])


def list_methods() -> list[MethodSpec]:
    from searchmerge import methods as _  # noqa: F401

    return [METHODS[k] for k in sorted(METHODS)]
