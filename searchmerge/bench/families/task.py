"""Task-model families: standard Hugging Face ``AutoModelFor<Task>`` folders, as users have them.

* ``seqcls_task`` — ``AutoModelForSequenceClassification`` (BERT, RoBERTa, DistilBERT, GPT-2, ...).
* ``image_task`` — ``AutoModelForImageClassification`` (ViT, ConvNeXt, ResNet, ...).

The merged part is the base model (the tensors under the architecture's own ``base_model_prefix``:
``bert.``, ``roberta.``, ``distilbert.``, ``transformer.``, ``vit.``, ``convnext.``, ``resnet.``, ...; BERT's
pooler lives there, so it is merged, as in FusionBench). Everything else (classifier, RoBERTa's dense +
out_proj, DistilBERT's pre_classifier, GPT-2's ``score``, ResNet's ``classifier.1``) is each task's head,
read from that task's own folder, never merged. Prediction runs the architecture's own forward with the
(merged) base model plugged in, so an unmerged fine-tuned model scores exactly what plain ``transformers``
gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.families.base import MAX_TOKENS, Family, _register
from searchmerge.bench.families.hf import _config_from_dict, _tokenizer
from searchmerge.bench.families.pixels import processor_pixels

SEQCLS_AUTO = "AutoModelForSequenceClassification"
IMAGE_AUTO = "AutoModelForImageClassification"


def _auto(auto_class: str):  # noqa: ANN202
    import transformers

    return getattr(transformers, auto_class)


def split_task_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(backbone, head)`` state dicts: backbone keys have the ``base_model_prefix`` stripped."""
    pre = f"{model.base_model_prefix}."
    sd = model.state_dict()
    backbone = {k[len(pre):]: v.detach().clone() for k, v in sd.items() if k.startswith(pre)}
    head = {k: v.detach().clone() for k, v in sd.items() if not k.startswith(pre)}
    return backbone, head


def load_task_model(folder: Path, auto_class: str = SEQCLS_AUTO) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(config, backbone, head)`` of a task-model folder (a bare base folder gets a random head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a pool loads 7+ folders: no "Loading weights" bar for each
    try:
        model = _auto(auto_class).from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    backbone, head = split_task_model(model)
    return model.config.to_dict(), backbone, head


class TaskModelRunner(nn.Module):
    """One shared base model (``self.base``: its keys are the backbone keys) inside each task's own model."""

    def __init__(self, base: nn.Module, task_models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.base = base
        self._tasks = task_models  # plain dict: not registered, so state_dict() keys == backbone keys

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.base.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.base.load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> "TaskModelRunner":  # type: ignore[override]
        """``.to(device)`` / ``.half()`` move the heads too (they hang off the unregistered task models); the shared
        base is reached twice, and moving a tensor already moved is a no-op."""
        super()._apply(fn, recurse)
        for m in self._tasks.values():
            m._apply(fn, recurse)
        return self


class TaskModelFamily(Family):
    """Shared by the task-model families: folders load through ``auto_class``; heads come from the folders."""

    heads_from_folders = True
    auto_class = SEQCLS_AUTO
    kind = "sequence-classification"  # for messages: "does not load as a <kind> model"

    def load_task(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return load_task_model(folder, self.auto_class)

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, backbone, _ = self.load_task(folder)
        return config, backbone

    def build_runner_module(self, config: dict[str, Any], backbone: dict[str, torch.Tensor],
                            heads: dict[str, dict[str, torch.Tensor]], task_configs: dict[str, dict[str, Any]]) -> nn.Module:
        """Each task's own architecture, its head loaded strictly, all sharing one merged base model."""
        auto = _auto(self.auto_class)
        models: dict[str, nn.Module] = {}
        base: nn.Module | None = None
        for t, h in heads.items():
            m = auto.from_config(_config_from_dict(task_configs.get(t, config)))
            pre = m.base_model_prefix
            if base is None:
                base = getattr(m, pre)
                base.load_state_dict(backbone, strict=True)
            else:
                setattr(m, pre, base)
            missing, unexpected = m.load_state_dict(h, strict=False)
            bad = [k for k in missing if not k.startswith(f"{pre}.")] + list(unexpected)
            if bad:
                raise ValueError(f"head of task `{t}` does not fit its architecture: {bad[:4]}")
            models[t] = m.eval()
        if base is None:
            m = auto.from_config(_config_from_dict(config))
            base = getattr(m, m.base_model_prefix)
            base.load_state_dict(backbone, strict=True)
        return TaskModelRunner(base.eval(), models).eval()

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_task(self, module: nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module._tasks[task](**self.model_inputs(batch)).logits.argmax(-1)


@_register
class SeqClsTaskFamily(TaskModelFamily):
    name = "seqcls_task"

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        tok = _tokenizer(base_folder)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        enc = tok([str(t) for t in task.splits[split].inputs], padding=True, truncation=True,
                  max_length=MAX_TOKENS, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        n = int(mask.sum(1).max())  # drop all-padding columns (results are unchanged)
        return {"input_ids": batch["input_ids"][:, :n], "attention_mask": mask[:, :n]}


@_register
class ImageTaskFamily(TaskModelFamily):
    name = "image_task"
    auto_class = IMAGE_AUTO
    kind = "image-classification"

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        """The base folder's own image processor (``preprocessor_config.json``), else the documented defaults."""
        return {"pixels": processor_pixels(task.splits[split].inputs, Path(base_folder))}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch["pixels"]}
