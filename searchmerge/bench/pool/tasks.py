"""Task data: tables read, splits checked (columns, labels, choices), validation carved; the loaded :class:`TaskPool`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchmerge.bench.pool.spec import BenchSpecError, TaskPoolSpec, TaskSpec

VAL_FRACTION = 0.1
VAL_SEED = 0


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
