"""Model pools and task pools (FusionBench's ``modelpool`` / ``taskpool``): pydantic specs, YAML in/out.

A bench spec YAML holds both::

    modelpool:
      family: seqcls_task           # seqcls_task | image_task | seqcls | causal_lm_mc | image | mlp | clip
      base: models/base             # local folder (relative paths resolve against the YAML's folder)
      finetuned: {topic: models/ft_topic, lang: models/ft_lang}   # each with its own head
    taskpool:
      tasks:
        - name: topic
          input_column: text
          label_column: label
          train: data/topic/train.parquet
          test: data/topic/test.parquet     # no validation: 10 % of train is carved off (seed 0)
          metric: accuracy

Everything that can be wrong (files, columns, labels, head/task mismatch, folders that do not load) is
checked by :func:`~searchmerge.bench.pool.load.load_bench` before any evaluation work, and raised as one
:class:`BenchSpecError`. This module holds the specs; :mod:`.tasks` loads task data, :mod:`.models` model
folders and heads, :mod:`.load` the whole bench.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from searchmerge.errors import SearchmergeError

SPLITS = ("train", "validation", "test")


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
    family: Literal["seqcls", "seqcls_task", "image_task", "causal_lm_mc", "image", "mlp", "clip"]
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
