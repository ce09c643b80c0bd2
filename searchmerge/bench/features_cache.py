"""Preprocessed evaluation features (token ids and masks, normalised pixels) cached on disk.

Tokenising a split is paid once per machine, not once per process: arrays are stored under
``$SEARCHMERGE_CACHE/features/<key>.npz``, where the key hashes exactly what they depend on — the family
and the source of its ``preprocess``, the tokenizer / image-processor files of the base folder (contents, not
paths), the maximum length, the installed ``transformers``/``tokenizers`` versions, and the split's input data
(contents). Any change makes a new key; nothing is ever invalidated in place. Writes are atomic."""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                      "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                      "preprocessor_config.json")
MAX_DISK_BYTES = 256 << 20  # bigger feature sets (e.g. CLIP pixels) stay in memory only


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("transformers", "tokenizers"):
        try:
            out.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg}=-")
    return ",".join(out)


def preprocessor_fingerprint(base_folder: str | Path) -> str:
    """Hash of the contents of the tokenizer / image-processor files in ``base_folder`` (empty if none)."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(base_folder) if base_folder else None
    for name in PREPROCESSOR_FILES:
        p = folder / name if folder is not None else None
        if p is not None and p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def data_fingerprint(split: Any) -> str:
    """Hash of a split's inputs (and choices): the data the features are made from, by content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(pickle.dumps(list(split.inputs), protocol=5))
    h.update(pickle.dumps(split.choices, protocol=5))
    return h.hexdigest()


def features_key(family: Any, base_folder: str | Path, split_data: Any, max_tokens: int) -> str:
    """The cache key: family + its preprocess code, preprocessor files, max length, library versions, data."""
    h = hashlib.blake2b(digest_size=20)
    try:
        code = inspect.getsource(type(family).preprocess)
    except (OSError, TypeError):
        code = type(family).__qualname__
    for part in (family.name, code, preprocessor_fingerprint(base_folder), str(max_tokens), _versions(),
                 data_fingerprint(split_data)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def load(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):  # a truncated or foreign file: recompute (and overwrite atomically)
        return None


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic: a temp file in the same folder, then ``os.replace``."""
    if sum(a.nbytes for a in arrays.values()) > MAX_DISK_BYTES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_preprocess(family: Any, task: Any, split: str, base_folder: str, max_tokens: int,
                      cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``family.preprocess(task, split, base_folder)``, read from / written to the disk cache."""
    from searchmerge.bench.zoo.common import cache_root

    path = cache_root(cache_dir) / "features" / f"{features_key(family, base_folder, task.splits[split], max_tokens)}.npz"
    arrays = load(path)
    if arrays is None:
        arrays = family.preprocess(task, split, base_folder)
        save(path, arrays)
    return arrays
