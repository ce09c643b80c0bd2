"""Data-free merges that select or re-weight task vectors without an SVD: MagMax and Model Stock.

* ``magmax`` follows FusionBench's ``MagMaxAlgorithm`` (itself matched to the official MagMax release).
* ``model_stock`` follows MergeKit's ``model_stock``; FusionBench's ``ModelStock`` differs slightly, see
  its docstring.
"""

from __future__ import annotations

import torch

from searchmerge.methods._types import Scale
from searchmerge.methods.registry import merge_method

Tensor = torch.Tensor


@merge_method("magmax", inputs="deltas", min_models=1, reference="https://arxiv.org/abs/2407.06322")
def magmax(base: Tensor, deltas: list[Tensor], *, lambda_: Scale = 0.5) -> Tensor:
    """MagMax: per entry keep the task-vector value of largest magnitude, then scale: θ₀ + λ·τ_max.

    ``τ_max[j] = τ_{t*}[j]`` with ``t* = argmax_t |τ_t[j]|``; ties go to the *later* model (the fold
    uses ``>=``, as FusionBench and the official release). ``lambda`` is FusionBench's
    ``scaling_factor`` (default 0.5, the paper's value for independent fine-tunes). Integer buffers never
    reach a merge function (the driver copies them from the base), as FusionBench skips them.
    """
    best = deltas[0]
    for delta in deltas[1:]:
        best = torch.where(delta.abs() >= best.abs(), delta, best)  # later model wins ties
    return best * lambda_


@merge_method("model_stock", inputs="deltas", min_models=2, reference="https://arxiv.org/abs/2403.19522")
def model_stock(base: Tensor, deltas: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (MergeKit): θ = t·mean(θ_i) + (1−t)·θ₀ = θ₀ + t·mean(τ_i), t = N·c / (1 + (N−1)·c).

    ``c`` is the mean over model pairs of cos(τ_i, τ_j), computed on the flattened tensor, or, with
    ``filter_wise``, per row (along the last dimension; a 1-D or 0-D tensor is one row), giving one
    ``t`` per row. Cosines use ``‖τ_i‖·‖τ_j‖`` clamped below at 1e-6 (so a zero task vector gives c = 0,
    t = 0: the base) and are clamped to [−1, 1]. ``t`` is not clamped: extrapolation (t > 1 or t < 0)
    happens as in MergeKit, and at exactly ``1 + (N−1)·c = 0`` (e.g. two exactly opposite task
    vectors) the result is not finite, as in MergeKit.

    FusionBench's ``ModelStock`` differs in small ways: it averages pairwise *angles* (degrees, via
    acos) rather than cosines when N > 2; its cosine is ``Σ τ_iτ_j / (sqrt(Σ τ_i² Σ τ_j²) + 1e-8)``;
    its ratio has ``+ 1e-8`` in the denominator (``N·c / ((N−1)·c + 1 + 1e-8)``); it has no per-row
    mode; and its ``ignore_keys`` get the plain mean of the models (here: select another method for
    those tensors). For N = 2 and non-degenerate tensors the two agree to ~1e-8 relative.
    """
    shape = deltas[0].shape
    if filter_wise:
        rows = [d.reshape(1, -1) if d.dim() < 2 else d for d in deltas]  # (..., row)
    else:
        rows = [d.reshape(-1) for d in deltas]  # (numel,)
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cosines = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (..., 1): one value per row, or (1,)
    n = len(rows)
    t = (n * cos) / (1 + (n - 1) * cos)
    mean = sum(rows[1:], rows[0]) / n
    return (t * mean).reshape(shape)
