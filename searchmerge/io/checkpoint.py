"""Lazy, safe checkpoint reading: HF model folders (single or sharded safetensors) and bare .safetensors.

Tensors are read one at a time through ``safe_open`` (memory-mapped), so a merge holds only the
tensors it is working on. Pickle checkpoints (``.bin``, ``.pt``, ``.pth``) can run code when loaded;
they are refused unless the caller passes ``allow_pickle=True``, and then load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from searchmerge.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint, which can execute code when loaded. Convert it to safetensors, "
        "or pass allow_pickle=True (CLI: --allow-pickle) to load it with torch.load(weights_only=True)."
    )


class CheckpointReader:
    """Read-only, lazy view of one checkpoint: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._index()

    @property
    def folder(self) -> Path | None:
        """The HF model folder (for config and tokenizer files), or ``None`` for a bare file."""
        return self.path if self.path.is_dir() else None

    def _index(self) -> None:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {p}")
        if p.is_file():
            if p.suffix == ".safetensors":
                self._add_safetensors(p)
            elif p.suffix in PICKLE_SUFFIXES:
                self._load_pickle([p])
            else:
                raise CheckpointError(f"{p}: unknown checkpoint format (expected .safetensors or an HF folder).")
            return
        index = p / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (p / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard}, which is missing.")
            for shard in sorted(set(weight_map.values())):
                self._add_safetensors(p / shard)
            return
        singles = sorted(p.glob("*.safetensors"))
        if singles:
            for f in singles:
                self._add_safetensors(f)
            return
        pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            self._load_pickle(pickles)
            return
        raise CheckpointError(f"{p}: no model.safetensors (or index) found in this folder.")

    def _add_safetensors(self, f: Path) -> None:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc}).") from exc
        self._handles[f] = handle
        for k in handle.keys():  # type: ignore[attr-defined]
            if k in self._files:
                raise CheckpointError(f"{self.path}: tensor {k} appears in two files.")
            self._files[k] = f
            sl = handle.get_slice(k)  # type: ignore[attr-defined]
            self._meta[k] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.float32))

    def _load_pickle(self, files: list[Path]) -> None:
        if not self.allow_pickle:
            raise _pickle_refusal(files[0])
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if f.name.endswith(".index.json"):
                continue
            obj = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: expected a state dict, got {type(obj).__name__}.")
            tensors.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
        self._pickled = tensors
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, freshly materialised (never a view into another caller's tensor)."""
        if key not in self._meta:
            raise CheckpointError(f"{self.path}: no tensor named {key}.")
        if self._pickled is not None:
            return self._pickled[key].to(device, copy=True)
        handle = self._handles[self._files[key]]
        return handle.get_tensor(key).to(device)  # type: ignore[attr-defined]

    def items(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k, device)

    def state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return dict(self.items(device))


class StateDictReader:
    """The same read-only interface over an in-memory state dict (tests, the Python API)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], name: str = "<state dict>") -> None:
        self._sd = state_dict
        self.path = Path(name)
        self.folder = None

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self._sd[key].to(device)


def open_checkpoint(source: str | Path | dict[str, torch.Tensor], *, allow_pickle: bool = False):
    """A reader for a path (folder or file) or an in-memory state dict."""
    if isinstance(source, dict):
        return StateDictReader(source)
    return CheckpointReader(source, allow_pickle=allow_pickle)
