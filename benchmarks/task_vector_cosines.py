"""Pairwise cosines of task vectors per tensor, and the Model Stock ratio they imply.

    python benchmarks/task_vector_cosines.py BASE FT1 FT2 [...] [--min-numel 1000]
    python benchmarks/task_vector_cosines.py --zoo text      # the embedded text zoo (built by `make run`)

Why: Model Stock interpolates θ₀ + t·mean(τ_i) with t = N·c / (1 + (N−1)·c), c the mean pairwise cosine. On
task vectors of *different* tasks c ≈ 0, so t ≈ 0 and the merge is ≈ the base; this prints c and t per
tensor so a user can see that before choosing the method. Same cosine as ``methods.selection.model_stock``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from searchmerge.io.checkpoint import open_checkpoint
from searchmerge.io.task_models import backbone_views


def pairwise_cosines(taus: list[torch.Tensor]) -> list[float]:
    flat = [t.reshape(-1).double() for t in taus]
    norms = [torch.linalg.vector_norm(t) for t in flat]
    return [float((flat[i] @ flat[j]) / (norms[i] * norms[j]).clamp(min=1e-6))
            for i in range(len(flat)) for j in range(i + 1, len(flat))]


def model_stock_ratio(c: float, n: int) -> float:
    return n * c / (1 + (n - 1) * c)


def zoo_paths(name: str) -> tuple[str, list[str]]:
    import yaml

    from searchmerge.bench.cli import resolve_spec

    spec_file = resolve_spec(name, progress=False)  # the zoo's bench.yaml (built once, then cached)
    folder = spec_file.parent
    spec = yaml.safe_load(spec_file.read_text())["modelpool"]
    return str(folder / spec["base"]), [str(folder / p) for p in spec["finetuned"].values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="base folder, then two or more fine-tuned folders")
    ap.add_argument("--zoo", help="an embedded zoo name instead of paths (e.g. text)")
    ap.add_argument("--min-numel", type=int, default=1000, help="skip smaller tensors (biases, norms)")
    args = ap.parse_args()
    base_path, ft_paths = zoo_paths(args.zoo) if args.zoo else (args.paths[0], args.paths[1:])
    if len(ft_paths) < 2:
        ap.error("need a base and at least two fine-tuned checkpoints")
    (base, *fts), _ = backbone_views([open_checkpoint(p) for p in (base_path, *ft_paths)])  # task models: backbones
    n = len(fts)
    rows = []
    for k in base.keys():
        b = base.get(k)
        if not b.is_floating_point() or b.numel() < args.min_numel:
            continue
        c = statistics.mean(pairwise_cosines([m.get(k).float() - b.float() for m in fts]))
        rows.append((k, c, model_stock_ratio(c, n)))
    for k, c, t in rows:
        print(f"{k:60s} cos {c:+.3f}  t {t:+.3f}")
    cs, ts = [r[1] for r in rows], [r[2] for r in rows]
    print(f"\n{len(rows)} tensors, N = {n}: mean pairwise cos {statistics.mean(cs):.3f} "
          f"(min {min(cs):.3f}, max {max(cs):.3f}); Model Stock t mean {statistics.mean(ts):.3f} "
          f"(min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
