"""Shared zoo machinery: cache folder, definition hash, atomic build, writers, rich progress."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from searchmerge.errors import SearchmergeError


class ZooUnavailable(SearchmergeError, RuntimeError):
    """A zoo's packages (PyPI / Debian) are not installed; the message says how to install them."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SEARCHMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "searchmerge"


def definition_hash(definition: dict[str, Any], module: Any = None) -> str:
    """Hash of a zoo's definition dict (tasks, hyper-parameters, seeds, source package paths, a ``version``
    bumped whenever the build code changes what it produces): a changed definition rebuilds the zoo."""
    blob = json.dumps(definition, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def zoo_dir(name: str, digest: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "zoo" / f"{name}-{digest}"


def build_cached(
    name: str, definition: dict[str, Any], module: Any, builder: Callable[[Path], None],
    cache_dir: str | Path | None, force: bool = False,
) -> Path:
    """Run ``builder(tmp_folder)`` unless ``<cache>/zoo/<name>-<hash>/bench.yaml`` exists; atomic rename."""
    final = zoo_dir(name, definition_hash(definition, module), cache_dir)
    if (final / "bench.yaml").is_file() and not force:
        return final / "bench.yaml"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        builder(tmp)
        (tmp / "definition.json").write_text(json.dumps(definition, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "bench.yaml"


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in columns.items()}
    pq.write_table(pa.table(cols), path)


def save_head(path: Path, head: torch.nn.Linear) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().contiguous().clone(), "bias": head.bias.detach().contiguous().clone()}, str(path))


def save_plain_folder(folder: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(folder / "model.safetensors"))


def stratified_split(labels: np.ndarray, test_frac: float, seed: int, max_test: int | None = None,
                     max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split with a fixed seed: (train indices, test indices)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_te = int(round(len(idx) * test_frac))
        if max_test is not None:
            n_te = min(n_te, max_test)
        te.append(idx[:n_te])
        rest = idx[n_te:]
        tr.append(rest if max_train is None else rest[:max_train])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[..., None]]:
    """``advance(n=1, description=None)`` over a rich progress bar (no-op when disabled)."""
    if not enabled:
        yield lambda n=1, description=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn()) as prog:
        task = prog.add_task(label, total=total)
        last = [label]

        def advance(n: int = 1, description: str | None = None) -> None:
            if description is not None and description != last[0]:
                last[0] = description
                if not prog.console.is_terminal:
                    prog.console.print(description)
            prog.update(task, advance=n, description=description or last[0])

        yield advance


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_threads() -> int:
    return int(os.environ.get("SEARCHMERGE_THREADS", str(min(2, os.cpu_count() or 1))))


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
