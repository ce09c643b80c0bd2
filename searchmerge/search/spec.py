"""The search spec: one frozen pydantic model (``extra=forbid``), read from YAML and checked before any work.

    bench: fixture                      # an embedded zoo name, or a bench spec path
    search_split: validation            # the split trials are scored on
    report_split: test                  # read once, at the end, for the best recipe / front and baselines
    methods:                            # the method is a searched categorical when several are listed
      task_arithmetic: {lambda: search}             # `search`: the registry's search range
      ties: {density: [0.1, 0.9], lambda: [0.2, 1.5], merge_func: [sum, mean]}   # narrowed / choices
      tsv_m: {alpha: 1.0}                           # fixed
      regmean: {alpha: [0.5, 1.0], examples: [128, 256]}   # data-driven (searchmerge.search.fusion): counts are choices
    granularity: per_model              # global | per_model (per-model parameters get one value per task)
    layer_groups: 1                     # G > 1: per-model parameters become depth gradients of G values
    tensor_kinds: [attention, mlp]      # a value per tensor kind (and one for the rest), emitted as name filters
    points_to_evaluate: [{method: task_arithmetic, lambda: 0.3}]
    objectives: [{metric: average, mode: max}]     # average | worst | task:<name>
    searcher: optuna_tpe
    budget: {trials: 50, seconds: null}
    concurrency: 1
    scheduler: {type: fifo}             # or {type: asha, grace_fraction: 0.25, reduction_factor: 3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from searchmerge.errors import SearchmergeError
from searchmerge.io.yaml_safe import KEY, Positions, position_of, read_yaml_mapping
from searchmerge.suggest import did_you_mean

SEARCHERS = (
    "optuna_tpe", "optuna_cmaes", "optuna_gp", "optuna_nsga2", "optuna_random",
    "nevergrad_cma", "nevergrad_de", "nevergrad_twopointsde", "nevergrad_ngopt", "random", "grid",
)
MULTI_OBJECTIVE_SEARCHERS = ("optuna_nsga2", "optuna_tpe", "optuna_random", "random")
# cheap model statistics of the merged model (no evaluation): ‖θ − θ₀‖₂ over the merged tensors, in units of
# the task vectors' mean norm, and the fraction of entries θ moved away from θ₀
STAT_METRICS = ("delta_l2", "delta_l0")


class SearchSpecError(SearchmergeError, ValueError):
    """A search spec field is invalid (names the field, the value and the rule)."""


ParamSetting = Union[Literal["search"], float, int, bool, str, list[Any]]


class Objective(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str = "average"
    mode: Literal["max", "min"] = "max"

    @model_validator(mode="after")
    def _known(self) -> "Objective":
        if self.metric not in ("average", "worst", *STAT_METRICS) and not self.metric.startswith("task:"):
            raise ValueError(f"objective metric {self.metric!r} must be `average`, `worst`, `task:<name>`, "
                             f"or a model statistic {list(STAT_METRICS)}")
        return self

    @property
    def key(self) -> str:
        return self.metric.replace(":", "_")


class Budget(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    trials: int | None = Field(default=20, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> "Budget":
        if self.trials is None and self.seconds is None:
            raise ValueError("budget needs `trials`, `seconds` or both")
        return self


class Scheduler(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["fifo", "asha"] = "fifo"
    grace_fraction: float = Field(default=0.25, gt=0, le=1)  # of the search split's examples
    reduction_factor: float = Field(default=3.0, gt=1)


class SearchSpec(BaseModel):
    """Everything a search needs; ``SearchSpec.from_yaml(s.to_yaml()) == s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "search"
    bench: str
    search_split: Literal["train", "validation", "test"] = "validation"
    report_split: Literal["train", "validation", "test"] = "test"
    allow_search_on_test: bool = False
    methods: dict[str, dict[str, ParamSetting]]
    granularity: Literal["global", "per_model"] = "global"
    layer_groups: int = Field(default=1, ge=1, le=64)
    # each listed kind gets its own value of every searched numeric parameter; other tensors share one more
    tensor_kinds: list[Literal["norm", "embedding", "attention", "mlp"]] = Field(default_factory=list)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()])
    reference_point: list[float] | None = None  # hypervolume reference (objective units); default: worst possible
    searcher: str = "optuna_tpe"
    budget: Budget = Field(default_factory=Budget)
    concurrency: int = Field(default=1, ge=1, le=64)
    seed: int = 0
    scheduler: Scheduler = Field(default_factory=Scheduler)
    max_failures: int = Field(default=10, ge=0)
    eval_batch_size: int = Field(default=64, ge=1)
    num_threads: int = Field(default=1, ge=1)  # torch threads per store / evaluation actor
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU per replica where the cluster has them
    cpus_per_replica: float = Field(default=1.0, gt=0)  # the CPUs each store replica (+ its evaluator) reserves
    trial_retries: int = Field(default=2, ge=0)  # a trial whose process or node is lost runs again (Tune)
    store_retries: int = Field(default=2, ge=0)  # a trial whose store actor died is evaluated again
    # the store's cache of merged deltas (TIES/DARE masks, TSV-M/ISO SVD results at unit λ), as a fraction of the
    # resident bytes: 0.5 holds ~3 whole-model entries for 6 tasks, so switching methods rarely recomputes SVDs
    cache_fraction: float = Field(default=0.5, gt=0, le=4)
    root: str | None = None  # folder the spec was read from (relative bench paths resolve against it)

    @model_validator(mode="after")
    def _rules(self) -> "SearchSpec":
        if self.search_split == self.report_split:
            raise ValueError(f"search_split and report_split must differ (both {self.search_split!r})")
        if self.search_split == "test" and not self.allow_search_on_test:
            raise ValueError("search_split `test` is refused: it leaks the report split; set allow_search_on_test: true to force it")
        if not self.methods:
            raise ValueError("methods must list at least one merge method")
        if self.searcher not in SEARCHERS:
            hint = did_you_mean(self.searcher, SEARCHERS)
            raise ValueError(f"searcher {self.searcher!r} is not one of {list(SEARCHERS)}{' — ' + hint if hint else ''}")
        if len(self.objectives) > 1 and self.searcher not in MULTI_OBJECTIVE_SEARCHERS:
            raise ValueError(
                f"searcher {self.searcher!r} is single-objective; with {len(self.objectives)} objectives use one of "
                f"{list(MULTI_OBJECTIVE_SEARCHERS)}"
            )
        if len(self.objectives) > 1 and self.scheduler.type == "asha":
            raise ValueError("scheduler `asha` stops on one metric; use `fifo` with several objectives")
        stats = [o.metric for o in self.objectives if o.metric in STAT_METRICS]
        if stats and stats == [o.metric for o in self.objectives]:
            raise ValueError(f"objectives {stats} are model statistics only; add an evaluated metric (e.g. average)")
        if "delta_l2" in stats and self.reference_point is None:
            raise ValueError("objective delta_l2 is unbounded: set reference_point (e.g. [0.0, 3.0] for average max, delta_l2 min)")
        if len(set(self.tensor_kinds)) != len(self.tensor_kinds):
            raise ValueError(f"tensor_kinds lists a kind twice: {self.tensor_kinds}")
        if self.reference_point is not None and len(self.reference_point) != len(self.objectives):
            raise ValueError(f"reference_point has {len(self.reference_point)} value(s) for {len(self.objectives)} objective(s)")
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"root"})
        return yaml.safe_dump(data, sort_keys=False)

    def bench_path(self) -> str:
        """The zoo name as given, or the bench spec path resolved against the spec's folder."""
        from searchmerge.bench.zoo import ZOO_NAMES

        if self.bench in ZOO_NAMES:
            return self.bench
        p = Path(self.bench).expanduser()
        if not p.is_absolute() and self.root is not None:
            p = Path(self.root) / p
        return str(p)


_NESTED = {"budget": Budget, "scheduler": Scheduler, "objectives": Objective}


def _extra_hint(loc: tuple[Any, ...]) -> str:
    """" — did you mean `x`?" for an unknown spec field (top level, budget, scheduler, objectives[i])."""
    model = _NESTED.get(str(loc[0])) if len(loc) > 1 else SearchSpec
    fields = [f for f in (model.model_fields if model else {}) if f != "root"]
    hint = did_you_mean(str(loc[-1]), fields)
    return f" — {hint + ' ' if hint else ''}valid fields: {', '.join(fields)}" if fields else ""


def _format(exc: ValidationError, where: str, positions: Positions | None = None) -> str:
    parts = []
    errors = exc.errors()
    if positions and errors:
        first = tuple(errors[0]["loc"]) + ((KEY,) if errors[0]["type"] == "extra_forbidden" else ())
        where = f"{position_of(positions, first, where.rstrip(': '))}: "
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:
            parts.append(f"{loc}: unknown field{_extra_hint(tuple(e['loc']))}")
            continue
        value = e.get("input")
        shown = f" (got {value!r})" if loc != "spec" and not isinstance(value, dict) else ""
        parts.append(f"{loc}: {msg}{shown}")
    return f"{where}{'; '.join(parts)}"


def parse_search_spec(data: Any, root: str | Path | None = None, where: str = "",
                      positions: Positions | None = None) -> SearchSpec:
    if not isinstance(data, dict):
        raise SearchSpecError(f"{where}a search spec must be a YAML mapping, got {type(data).__name__}")
    if not all(isinstance(k, str) for k in data):
        raise SearchSpecError(f"{where}search spec keys must be strings — write `field: value` lines")
    try:
        spec = SearchSpec(**{**data, "root": str(root) if root is not None else None})
    except ValidationError as exc:
        raise SearchSpecError(_format(exc, where, positions)) from None
    from searchmerge.search.space import build_space  # every method / parameter checked against the registry

    try:
        build_space(spec)
    except SearchSpecError as exc:
        raise SearchSpecError(f"{_where_in_spec(str(exc), where, positions)}{exc}") from None
    return spec


def _where_in_spec(message: str, where: str, positions: Positions | None) -> str:
    """``path:line:col: `` of the field a space error names (``methods.ties.density: ...``), else ``where``."""
    if not positions or not where:
        return where
    head = message.split(":", 1)[0].split(" ", 1)[0]
    loc = tuple(head.replace("[", ".").replace("]", "").split("."))
    return f"{position_of(positions, loc, where.rstrip(': '))}: "


def read_search_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    data, positions = read_yaml_mapping(path, what="search spec", error=SearchSpecError, keys=("bench", "methods"))
    return parse_search_spec(data, root=path.resolve().parent, where=f"{path}: ", positions=positions)
