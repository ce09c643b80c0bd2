"""Model pools loaded and checked: backbones of the base and each fine-tuned folder, and each task's head.

Heads come from separate files (``heads:``), from the task models' own folders (``heads_from_folders``
families, e.g. ``seqcls_task``), or are zero-shot (computed later from the task pool, see :mod:`.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from searchmerge.bench.pool.spec import BenchSpecError, ModelPoolSpec


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
    """Task-model families: backbone = base-model tensors; each task's head (and label count) from its own folder."""
    from searchmerge.bench.families import get_family

    family = get_family(spec.family)
    if spec.heads:
        alt = " or use family `seqcls` for mean-pooled linear heads" if spec.family == "seqcls_task" else ""
        raise BenchSpecError(
            f"model pool `heads`: family `{spec.family}` reads each task's head from its fine-tuned folder; remove "
            f"`heads` ({sorted(spec.heads)}){alt}."
        )
    if task_names is not None:
        missing = [t for t in task_names if t not in spec.finetuned]
        extra = [t for t in spec.finetuned if t not in task_names]
        if missing or extra:
            raise BenchSpecError(
                f"model pool `finetuned`: family `{spec.family}` needs one fine-tuned folder per task; "
                f"tasks without one {missing}, folders without a task {extra}."
            )
    for label, rel in [("base", spec.base)] + [(f"fine-tuned `{t}`", p) for t, p in spec.finetuned.items()]:
        if not spec.path(rel).is_dir():
            raise BenchSpecError(f"{label} model folder {spec.path(rel)} does not exist.")

    def load(label: str, rel: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        p = spec.path(rel)
        try:
            return family.load_task(p)
        except Exception as exc:  # noqa: BLE001
            raise BenchSpecError(f"{label} model folder {p} does not load as a {family.kind} model: {exc}") from None

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
