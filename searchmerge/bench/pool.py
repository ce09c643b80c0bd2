"""Model pools and task pools (FusionBench's ``modelpool`` / ``taskpool``): pydantic specs, YAML in/out.

A bench spec YAML holds both::

    modelpool:
      family: seqcls                # seqcls | causal_lm_mc | image | mlp | clip
      base: models/base             # local folder (relative paths resolve against the YAML's folder)
      finetuned: {topic: models/ft_topic, lang: models/ft_lang}
      heads: {topic: heads/topic.safetensors, lang: heads/lang.safetensors}
    taskpool:
      tasks:
        - name: topic
          input_column: text
          label_column: label
          train: data/topic/train.parquet
          test: data/topic/test.parquet     # no validation: 10 % of train is carved off (seed 0)
          metric: accuracy

Everything that can be wrong (files, columns, labels, head/task mismatch, folders that do not load) is
checked by :func:`load_bench` before any evaluation work, and raised as one :class:`BenchSpecError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from searchmerge.errors import SearchmergeError

SPLITS = ("train", "validation", "test")
VAL_FRACTION = 0.1
VAL_SEED = 0


class BenchSpecError(SearchmergeError, ValueError):
    """A model pool / task pool spec is invalid (names the file, task, column or folder)."""


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    train: str
    validation: str | None = None
    test: str
    input_column: str = "text"
    label_column: str = "label"
    choices_column: str | None = None  # causal-LM multiple choice: a list of answer strings per row
    choices: list[str] | None = None  # ... or one fixed list of answers for the whole task
    num_classes: int | None = None  # default: the head's output size, else the number of choices
    metric: str = "accuracy"
    class_names: list[str] | None = None  # clip: the zero-shot head's classes (count = number of labels)


class TaskPoolSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tasks: list[TaskSpec]
    root: str | None = None  # folder relative paths resolve against (set by the loader)

    @model_validator(mode="after")
    def _unique(self) -> "TaskPoolSpec":
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("a task pool needs at least one task")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task name(s) {dup}")
        return self

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.root is None else Path(self.root) / q


class ModelPoolSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    family: Literal["seqcls", "seqcls_task", "causal_lm_mc", "image", "mlp", "clip"]
    base: str
    finetuned: dict[str, str] = Field(default_factory=dict)  # task name -> fine-tuned folder
    heads: dict[str, str] = Field(default_factory=dict)  # task name -> safetensors {weight, bias}
    # seqcls only: the output of the embeddings + the first N layers is cached per distinct weights of that
    # prefix (hashed), so models that share it (zoos fine-tuned above layer N) run only the top layers.
    cache_prefix_layers: int | None = Field(default=None, ge=1)
    # clip only: zero-shot prompts per class name (`{name}` or `{}`), embeddings averaged over templates
    prompt_templates: list[str] | None = None
    root: str | None = None

    @model_validator(mode="after")
    def _templates(self) -> "ModelPoolSpec":
        if self.prompt_templates is not None:
            if not self.prompt_templates:
                raise ValueError("prompt_templates must not be empty")
            bad = [t for t in self.prompt_templates if "{name}" not in t and "{}" not in t]
            if bad:
                raise ValueError(f"prompt template(s) {bad} hold no `{{name}}` (or `{{}}`) placeholder")
            if self.family != "clip":
                raise ValueError("prompt_templates is only used by the `clip` family")
        return self

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.root is None else Path(self.root) / q


class BenchSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = "bench"
    modelpool: ModelPoolSpec
    taskpool: TaskPoolSpec

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        data["modelpool"].pop("root", None)
        data["taskpool"].pop("root", None)
        return yaml.safe_dump(data, sort_keys=False)


def _pydantic_error(exc: ValidationError, where: str) -> BenchSpecError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
    return BenchSpecError(f"invalid bench spec {where}:\n" + "\n".join(lines))


def parse_bench_spec(data: dict[str, Any], root: str | Path | None = None, where: str = "") -> BenchSpec:
    if not isinstance(data, dict) or "modelpool" not in data or "taskpool" not in data:
        raise BenchSpecError(f"bench spec {where}: a YAML mapping with `modelpool` and `taskpool` is required.")
    data = dict(data)
    if not isinstance(data["modelpool"], dict) or not isinstance(data["taskpool"], dict):
        raise BenchSpecError(f"bench spec {where}: `modelpool` and `taskpool` must be mappings.")
    if root is not None:
        data["modelpool"] = {**data["modelpool"], "root": str(root)}
        data["taskpool"] = {**data["taskpool"], "root": str(root)}
    try:
        return BenchSpec.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc, where) from None


def read_bench_spec(path: str | Path) -> BenchSpec:
    from searchmerge.io.yaml_safe import read_yaml_mapping

    path = Path(path)
    data, _ = read_yaml_mapping(path, what="bench spec", error=BenchSpecError, keys=("modelpool", "taskpool"))
    return parse_bench_spec(data, root=path.parent.resolve(), where=str(path))


# --- data -----------------------------------------------------------------------------------------


def read_table(path: Path) -> dict[str, list[Any]]:
    """Parquet / CSV / JSONL to a dict of columns (Python lists)."""
    import pyarrow as pa

    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    elif suffix in (".csv", ".csv.gz"):
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    elif suffix in (".jsonl", ".json", ".jsonl.gz"):
        import pyarrow.json as pjson

        table = pjson.read_json(path)
    else:
        raise BenchSpecError(f"{path}: unsupported data file type {suffix!r} (use .parquet, .csv or .jsonl).")
    assert isinstance(table, pa.Table)
    return {name: table.column(name).to_pylist() for name in table.column_names}


@dataclass
class Split:
    inputs: list[Any]
    labels: np.ndarray
    choices: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    spec: TaskSpec
    num_classes: int
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


def carve_validation(train: Split, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> tuple[Split, Split]:
    """Split ``fraction`` of train off as validation with a fixed permutation (seed 0)."""
    n = len(train)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def take(idx: np.ndarray) -> Split:
        return Split(
            inputs=[train.inputs[i] for i in idx],
            labels=train.labels[idx],
            choices=None if train.choices is None else [train.choices[i] for i in idx],
        )

    return take(tr_idx), take(val_idx)


def _load_split(pool: TaskPoolSpec, task: TaskSpec, split: str, rel: str) -> Split:
    path = pool.path(rel)
    where = f"task `{task.name}` {split} split ({path})"
    if not path.is_file():
        raise BenchSpecError(f"{where}: file not found.")
    try:
        cols = read_table(path)
    except BenchSpecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BenchSpecError(f"{where}: cannot be read: {exc}") from None
    needed = [task.input_column, task.label_column] + ([task.choices_column] if task.choices_column else [])
    for c in needed:
        if c not in cols:
            raise BenchSpecError(f"{where}: missing column `{c}` (columns: {sorted(cols)}).")
    labels_raw = cols[task.label_column]
    if any(v is None or isinstance(v, bool) or not float(v).is_integer() for v in labels_raw):
        raise BenchSpecError(f"{where}: column `{task.label_column}` must hold integer class ids.")
    if not labels_raw:
        raise BenchSpecError(f"{where}: the split is empty.")
    return Split(
        inputs=cols[task.input_column],
        labels=np.asarray(labels_raw, dtype=np.int64),
        choices=cols[task.choices_column] if task.choices_column else None,
    )


def load_task(pool: TaskPoolSpec, task: TaskSpec, num_classes: int | None) -> TaskData:
    """Read and check all three splits of one task (carving validation from train when absent)."""
    splits = {"train": _load_split(pool, task, "train", task.train), "test": _load_split(pool, task, "test", task.test)}
    if task.validation is not None:
        splits["validation"] = _load_split(pool, task, "validation", task.validation)
    else:
        splits["train"], splits["validation"] = carve_validation(splits["train"])
    n = task.num_classes or num_classes or (len(task.choices) if task.choices else None)
    if n is None:
        n = int(max(int(s.labels.max()) for s in splits.values())) + 1
    if task.class_names is not None:
        n_labels = int(max(int(s.labels.max()) for s in splits.values())) + 1
        if task.num_classes is not None and task.num_classes != len(task.class_names):
            raise BenchSpecError(
                f"task `{task.name}`: class_names has {len(task.class_names)} name(s) but num_classes is {task.num_classes}."
            )
        if task.num_classes is None and n_labels != len(task.class_names):
            raise BenchSpecError(
                f"task `{task.name}`: class_names has {len(task.class_names)} name(s) but the labels are "
                f"0..{n_labels - 1} ({n_labels} classes); give one name per label (or set num_classes when "
                f"some classes have no examples)."
            )
    if task.num_classes is not None and num_classes is not None and task.num_classes != num_classes:
        raise BenchSpecError(
            f"task `{task.name}`: num_classes is {task.num_classes} but its head has {num_classes} outputs."
        )
    for split, s in splits.items():
        bad = (s.labels < 0) | (s.labels >= n)
        if bad.any():
            i = int(np.argmax(bad))
            raise BenchSpecError(
                f"task `{task.name}` {split} split: label {int(s.labels[i])} at row {i} is out of range "
                f"[0, {n - 1}] ({n} classes)."
            )
        if s.choices is not None:
            for i, (ch, y) in enumerate(zip(s.choices, s.labels)):
                if not isinstance(ch, list) or not (0 <= y < len(ch)):
                    raise BenchSpecError(
                        f"task `{task.name}` {split} split: row {i} has label {int(y)} but "
                        f"{len(ch) if isinstance(ch, list) else 'no'} choices."
                    )
    from searchmerge.bench.metrics import get_metric

    get_metric(task.metric)
    return TaskData(spec=task, num_classes=n, splits=splits)


# --- loaded pools -----------------------------------------------------------------------------------


@dataclass
class TaskPool:
    """Loaded, checked tasks (inputs + labels per split), plus a cache of preprocessed features."""

    spec: TaskPoolSpec
    tasks: dict[str, TaskData]
    _features: dict[tuple[str, str, str], dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def subset(self, names: list[str]) -> "TaskPool":
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise BenchSpecError(f"unknown task(s) {unknown}; tasks: {self.names}")
        return TaskPool(self.spec, {n: self.tasks[n] for n in names}, self._features)


def load_taskpool(spec: TaskPoolSpec, num_classes: dict[str, int] | None = None) -> TaskPool:
    num_classes = num_classes or {}
    return TaskPool(spec, {t.name: load_task(spec, t, num_classes.get(t.name)) for t in spec.tasks})


@dataclass
class ModelPool:
    """A loaded model pool: backbone state dicts of the base and each fine-tuned model, heads per task."""

    spec: ModelPoolSpec
    family: Any  # searchmerge.bench.families.Family
    config: dict[str, Any]
    base: dict[str, Any]
    finetuned: dict[str, dict[str, Any]]
    heads: dict[str, dict[str, Any]]
    task_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model(self, state_dict: dict[str, Any] | None = None, name: str = "model"):  # noqa: ANN201
        """A :class:`~searchmerge.bench.families.BenchModel`: this backbone (base if None) + every task head."""
        from searchmerge.bench.families import BenchModel

        return BenchModel(
            family=self.spec.family, config=self.config, backbone=state_dict if state_dict is not None else self.base,
            heads=self.heads, base_folder=str(self.spec.path(self.spec.base)), name=name,
            prefix_layers=self.spec.cache_prefix_layers, task_configs=self.task_configs,
        )


def load_modelpool(spec: ModelPoolSpec, task_names: list[str] | None = None) -> ModelPool:
    from safetensors.torch import load_file

    from searchmerge.bench.families import get_family

    family = get_family(spec.family)
    if family.zero_shot and spec.heads:
        raise BenchSpecError(
            f"family `{spec.family}` computes zero-shot heads from each task's class_names; remove `heads` "
            f"({sorted(spec.heads)}) from the model pool."
        )
    from_folders = getattr(family, "heads_from_folders", False)
    if from_folders:
        return _load_task_model_pool(spec, task_names)
    if task_names is not None:
        if family.needs_heads and not family.zero_shot:
            missing = [t for t in task_names if t not in spec.heads]
            extra = [t for t in spec.heads if t not in task_names]
            if missing or extra or len(spec.heads) != len(task_names):
                raise BenchSpecError(
                    f"model pool has {len(spec.heads)} head(s) for {len(task_names)} task(s): "
                    f"tasks without a head {missing}, heads without a task {extra}."
                )
        extra_ft = [t for t in spec.finetuned if t not in task_names]
        if extra_ft:
            raise BenchSpecError(f"fine-tuned model(s) for unknown task(s) {extra_ft}; tasks: {task_names}.")
    for label, rel in [("base", spec.base)] + [(f"fine-tuned `{t}`", p) for t, p in spec.finetuned.items()]:
        if not spec.path(rel).is_dir():
            raise BenchSpecError(f"{label} model folder {spec.path(rel)} does not exist.")
    heads: dict[str, dict[str, Any]] = {}
    for t, rel in spec.heads.items():
        p = spec.path(rel)
        if not p.is_file():
            raise BenchSpecError(f"head of task `{t}`: file {p} not found.")
        try:
            h = load_file(str(p))
        except Exception as exc:  # noqa: BLE001
            raise BenchSpecError(f"head of task `{t}` ({p}) does not load: {exc}") from None
        if set(h) != {"weight", "bias"} or h["weight"].ndim != 2 or h["bias"].shape != h["weight"].shape[:1]:
            raise BenchSpecError(f"head of task `{t}` ({p}) must hold `weight` [C, H] and `bias` [C].")
        heads[t] = h

    def load(label: str, rel: str) -> tuple[dict[str, Any], dict[str, Any]]:
        p = spec.path(rel)
        try:
            return family.load_folder(p)
        except Exception as exc:  # noqa: BLE001
            raise BenchSpecError(f"{label} model folder {p} does not load as `{spec.family}`: {exc}") from None

    config, base = load(f"base", spec.base)
    finetuned = {}
    for t, rel in spec.finetuned.items():
        _, sd = load(f"fine-tuned `{t}`", rel)
        if set(sd) != set(base) or any(sd[k].shape != base[k].shape for k in base):
            raise BenchSpecError(f"fine-tuned `{t}` model {spec.path(rel)} does not match the base's tensors.")
        finetuned[t] = sd
    widths = {t: int(h["weight"].shape[1]) for t, h in heads.items()}
    hidden = family.feature_dim(config)
    for t, w in widths.items():
        if hidden is not None and w != hidden:
            raise BenchSpecError(f"head of task `{t}` takes {w} features but the `{spec.family}` backbone gives {hidden}.")
    return ModelPool(spec=spec, family=family, config=config, base=base, finetuned=finetuned, heads=heads)


def _load_task_model_pool(spec: ModelPoolSpec, task_names: list[str] | None) -> ModelPool:
    """``seqcls_task``: backbone = base-model tensors; each task's head (and label count) from its own folder."""
    from searchmerge.bench.families import get_family
    from searchmerge.bench.task_models import load_task_model

    family = get_family(spec.family)
    if spec.heads:
        raise BenchSpecError(
            f"model pool `heads`: family `seqcls_task` reads each task's head from its fine-tuned folder; remove "
            f"`heads` ({sorted(spec.heads)}) or use family `seqcls` for mean-pooled linear heads."
        )
    if task_names is not None:
        missing = [t for t in task_names if t not in spec.finetuned]
        extra = [t for t in spec.finetuned if t not in task_names]
        if missing or extra:
            raise BenchSpecError(
                f"model pool `finetuned`: family `seqcls_task` needs one fine-tuned folder per task; "
                f"tasks without one {missing}, folders without a task {extra}."
            )
    for label, rel in [("base", spec.base)] + [(f"fine-tuned `{t}`", p) for t, p in spec.finetuned.items()]:
        if not spec.path(rel).is_dir():
            raise BenchSpecError(f"{label} model folder {spec.path(rel)} does not exist.")

    def load(label: str, rel: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        p = spec.path(rel)
        try:
            return load_task_model(p)
        except Exception as exc:  # noqa: BLE001
            raise BenchSpecError(f"{label} model folder {p} does not load as a sequence-classification model: {exc}") from None

    config, base, _ = load("base", spec.base)
    finetuned, heads, task_configs = {}, {}, {}
    for t, rel in spec.finetuned.items():
        cfg, sd, head = load(f"fine-tuned `{t}`", rel)
        if set(sd) != set(base) or any(sd[k].shape != base[k].shape for k in base):
            raise BenchSpecError(f"fine-tuned `{t}` model {spec.path(rel)}: its base-model tensors do not match the base's.")
        finetuned[t], heads[t], task_configs[t] = sd, head, cfg
    return ModelPool(spec=spec, family=family, config=config, base=base, finetuned=finetuned, heads=heads,
                     task_configs=task_configs)


def num_labels(config: dict[str, Any]) -> int:
    """A transformers config's label count (``id2label`` is what ``num_labels`` reads)."""
    return len(config.get("id2label") or {}) or int(config.get("num_labels", 2))


@dataclass
class Bench:
    spec: BenchSpec
    modelpool: ModelPool
    taskpool: TaskPool


def load_bench(spec: BenchSpec | str | Path) -> Bench:
    """Load and check a whole bench spec (model pool + task pool); every error is raised before any work."""
    if not isinstance(spec, BenchSpec):
        spec = read_bench_spec(spec)
    names = [t.name for t in spec.taskpool.tasks]
    from searchmerge.bench.families import get_family

    zero_shot = get_family(spec.modelpool.family).zero_shot
    if zero_shot:
        check_class_names(spec)
    mp = load_modelpool(spec.modelpool, names)
    if zero_shot:
        nc = {t.name: len(t.class_names) for t in spec.taskpool.tasks}  # type: ignore[arg-type]
    elif mp.task_configs:
        nc = {t: num_labels(c) for t, c in mp.task_configs.items()}
    else:
        nc = {t: int(h["weight"].shape[0]) for t, h in mp.heads.items()}
    tp = load_taskpool(spec.taskpool, nc)
    if zero_shot:  # every check passed: now the (cached) text-tower work
        mp.heads = mp.family.task_heads(
            str(mp.spec.path(mp.spec.base)), {t.name: list(t.class_names) for t in spec.taskpool.tasks},  # type: ignore[arg-type]
            mp.spec.prompt_templates, zero_shot_cache_dir(mp.spec),
        )
    return Bench(spec=spec, modelpool=mp, taskpool=tp)


def zero_shot_cache_dir(spec: ModelPoolSpec) -> Path:
    """Where zero-shot heads are cached on disk: next to the pool (the spec's folder, else the base's parent)."""
    from searchmerge.bench.families import ZERO_SHOT_CACHE_DIR

    root = Path(spec.root) if spec.root is not None else spec.path(spec.base).resolve().parent
    return root / ZERO_SHOT_CACHE_DIR


def check_class_names(spec: BenchSpec) -> None:
    """Zero-shot families: every task names its classes, as many as its labels (checked before any work)."""
    for t in spec.taskpool.tasks:
        if not t.class_names:
            raise BenchSpecError(
                f"task `{t.name}`: family `{spec.modelpool.family}` builds zero-shot heads from `class_names`; "
                f"give one name per label."
            )
        if t.num_classes is not None and t.num_classes != len(t.class_names):
            raise BenchSpecError(
                f"task `{t.name}`: class_names has {len(t.class_names)} name(s) but num_classes is {t.num_classes}."
            )
        dup = sorted({n for n in t.class_names if t.class_names.count(n) > 1})
        if dup:
            raise BenchSpecError(f"task `{t.name}`: duplicate class name(s) {dup}.")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
