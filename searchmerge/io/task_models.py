"""Hugging Face task-model folders in a merge: the backbone is merged, each model's head is its own.

A ``BertForSequenceClassification`` (or any ``…For<Task>`` architecture) keeps its base model under the
class's ``base_model_prefix`` (``bert.``, ``roberta.``, ``distilbert.``, ``transformer.``, ...); the rest
(classifier, pooler-less heads, ``score``) is the task head, with a per-task shape. As in FusionBench's
``merge_backbone``, only the prefixed tensors are matched and merged (prefix stripped, so a plain base-model
folder can be the base); heads are left out, or carried into one complete task folder per model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from searchmerge.errors import CheckpointError

TASK_SUFFIXES = ("ForSequenceClassification", "ForImageClassification", "ForTokenClassification",
                 "ForMultipleChoice", "ForQuestionAnswering", "ForAudioClassification")
HEAD_MODES = ("drop", "per_task")


@dataclass(frozen=True)
class TaskModel:
    """What a task-model folder holds beside its backbone."""

    architecture: str
    prefix: str
    head_keys: tuple[str, ...]
    config: dict[str, Any]


def _architecture(folder: Path | None) -> tuple[str | None, dict[str, Any]]:
    if folder is None or not (folder / "config.json").is_file():
        return None, {}
    config = json.loads((folder / "config.json").read_text())
    archs = config.get("architectures") or [None]
    return archs[0], config


def task_model(reader: Any) -> TaskModel | None:
    """The task-model description of a checkpoint, or ``None`` for a plain base model / bare file."""
    arch, config = _architecture(reader.folder)
    if arch is None or not arch.endswith(TASK_SUFFIXES):
        return None
    import transformers

    prefix = getattr(getattr(transformers, arch, None), "base_model_prefix", None)
    if not prefix:
        raise CheckpointError(
            f"{reader.folder}: architecture {arch} is not known to transformers {transformers.__version__}, so its "
            "backbone prefix is unknown; merge backbone-only copies instead.")
    keys = reader.keys()
    if not any(k.startswith(f"{prefix}.") for k in keys):
        return None  # a task config over stripped (backbone-only) weights
    return TaskModel(arch, prefix, tuple(k for k in keys if not k.startswith(f"{prefix}.")), config)


class BackboneView:
    """Read-only view of a task model's backbone: the prefixed tensors, prefix stripped."""

    def __init__(self, reader: Any, prefix: str) -> None:
        self.reader, self.prefix = reader, f"{prefix}."
        self.path, self.folder = reader.path, reader.folder
        self._keys = [k[len(self.prefix):] for k in reader.keys() if k.startswith(self.prefix)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.reader

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(self.prefix + key)

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.dtype(self.prefix + key)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.reader.get(self.prefix + key, device)


def backbone_views(readers: Sequence[Any]) -> tuple[list[Any], list[TaskModel | None]]:
    """Each reader, as its backbone view when it is a task model; the task-model descriptions beside them."""
    infos = [task_model(r) if r is not None else None for r in readers]
    prefixes = {i.prefix for i in infos if i is not None}
    if len(prefixes) > 1:
        raise CheckpointError(f"task models with different backbone prefixes {sorted(prefixes)} cannot be merged.")
    views = [BackboneView(r, i.prefix) if i is not None else r for r, i in zip(readers, infos)]
    return views, infos


def backbone_config(config: dict[str, Any]) -> dict[str, Any]:
    """A task model's config as its base model's (``architectures`` = the ``AutoModel`` class, no labels)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    out = {k: v for k, v in config.items() if k not in ("id2label", "label2id", "problem_type")}
    base_cls = MODEL_MAPPING_NAMES.get(config.get("model_type", ""))
    if base_cls:
        out["architectures"] = [base_cls]
    return out


def heads_message(infos: Sequence[TaskModel | None], names: Sequence[str], mode: str) -> str | None:
    """One line that says what happened to the heads (``None`` when no input is a task model)."""
    tasks = [(n, i) for n, i in zip(names, infos) if i is not None]
    if not tasks:
        return None
    prefix = tasks[0][1].prefix
    heads = sorted({k.split(".")[0] for _, i in tasks for k in i.head_keys})
    if mode == "drop":
        return (f"merged the `{prefix}.` backbone of {len(tasks)} task model(s); their heads ({', '.join(heads)}) "
                "are left out (--heads per_task writes one complete task folder per model under tasks/).")
    return (f"merged the `{prefix}.` backbone of {len(tasks)} task model(s); each model's own head "
            f"({', '.join(heads)}) is carried into tasks/<model>/.")


def task_folder_names(names: Sequence[str]) -> list[str]:
    """Distinct folder names for the per-task outputs (the model folder's name, numbered when repeated)."""
    out: list[str] = []
    for i, n in enumerate(names):
        stem = Path(n).name or f"model{i}"
        out.append(stem if stem not in out else f"{stem}-{i}")
    return out


def write_task_folders(root: Path, merged: dict[str, torch.Tensor], readers: Sequence[Any],
                       infos: Sequence[TaskModel | None], names: Sequence[str]) -> None:
    """``root/tasks/<model>/``: the merged backbone under the prefix plus that model's own head and files."""
    from safetensors.torch import save_file

    from searchmerge.io.writer import copy_model_files

    for folder_name, r, info in zip(task_folder_names(names), readers, infos):
        if info is None:
            continue
        out = root / "tasks" / folder_name
        out.mkdir(parents=True)
        copy_model_files(r.folder, out)
        tensors = {f"{info.prefix}.{k}": v.detach().contiguous().cpu() for k, v in merged.items()}
        base_reader = r.reader if isinstance(r, BackboneView) else r
        tensors.update({k: base_reader.get(k).contiguous() for k in info.head_keys})
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
