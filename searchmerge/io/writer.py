"""Atomic output: a merged model is written to a temporary sibling folder and renamed into place.

An interrupted merge therefore leaves either no output or the previous one, never a half-written folder.
The folder loads with ``transformers`` ``from_pretrained``: config, generation config and tokenizer
files are copied from the base model's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from searchmerge.io.outdir import chmod_umask, staged_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_model_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config/tokenizer files (everything that is not a weight file) from ``src``; returns their names."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def write_safetensors_folder(
    tensors: dict[str, torch.Tensor],
    out: str | Path,
    *,
    config_from: Path | None = None,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensors`` as an HF folder (sharded with an index when large), atomically, with the user's umask.

    An existing ``out`` is refused (``OutputError``) unless ``overwrite``; then it is replaced only once the new
    folder is complete. ``before_publish(tmp)`` may add more to the folder before it is renamed into place."""
    with staged_dir(out, force=overwrite) as tmp:
        copy_model_files(config_from, tmp)
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        shards = _shards(contiguous, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = fname
                    total += v.numel() * v.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if before_publish is not None:
            before_publish(tmp)
    return Path(out)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        chmod_umask(Path(tmp), 0o666)  # mkstemp makes 0o600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
