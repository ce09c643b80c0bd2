"""A whole bench (model pool + task pool) loaded and cross-checked before any evaluation work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchmerge.bench.pool.models import ModelPool, load_modelpool, num_labels
from searchmerge.bench.pool.spec import BenchSpec, BenchSpecError, ModelPoolSpec, read_bench_spec
from searchmerge.bench.pool.tasks import TaskPool, load_taskpool


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
