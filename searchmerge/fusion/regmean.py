"""RegMean, the tensor maths (FusionBench ``merging_with_regmean_weights``, from MergeLM).

For every linear layer with Gram matrices G_i = mean over tokens of xᵀx of its inputs (one per model):
G̃_i = G_i ⊙ (α·11ᵀ + (1−α)·I) (off-diagonal shrink, α = ``reduce_non_diagonal_ratio``), and
W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ — computed with ``torch.linalg.solve``, never an explicit inverse.
Every other float tensor gets the simple mean of the fine-tuned values; excluded names and non-float
tensors keep the base. Gram matrices come from :mod:`searchmerge.fusion.stats`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from searchmerge.fusion.fisher import excluded

Tensor = torch.Tensor
DEFAULT_ALPHA = 0.95  # FusionBench's CLIP default since PR #115 (GPT-2: 0.6)
SOLVE_STATS = {"solve": 0, "lstsq": 0, "dead_features": 0}


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G ⊙ (α·11ᵀ + (1−α)·I): the diagonal unchanged, every off-diagonal entry times α."""
    scale = torch.full_like(gram, alpha)
    scale.diagonal().fill_(1.0)
    return gram * scale


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float, *,
                  transpose: bool = True) -> Tensor:
    """W* for one layer (float64 solve, result in the weights' dtype).

    ``transpose``: weights are ``[out, in]`` (``nn.Linear``); ``False`` for ``[in, out]`` (GPT-2 ``Conv1D``).
    An input feature that no model ever saw (a zero row and column in every G, e.g. a dead ReLU) would
    make the system singular; its column is the mean of the models' columns, which is what an identity
    Gram on that feature gives. A system that is still singular falls back to least squares.
    """
    g = [shrink_off_diagonal(x.double(), alpha) for x in grams]
    w = [(x.double().T if transpose else x.double()) for x in weights]  # [in, out]
    dead = torch.stack([x.diagonal() for x in g]).abs().sum(0) == 0
    if bool(dead.any()):
        SOLVE_STATS["dead_features"] += int(dead.sum())
        eye = torch.diag(dead.double())
        g = [x + eye for x in g]
    lhs = sum(g)
    rhs = sum(gi @ wi for gi, wi in zip(g, w))
    try:
        out = torch.linalg.solve(lhs, rhs)
        SOLVE_STATS["solve"] += 1
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        out = torch.linalg.lstsq(lhs, rhs).solution
        SOLVE_STATS["lstsq"] += 1
    return (out.T if transpose else out).to(weights[0].dtype)


def regmean_merge(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                  grams: Sequence[Mapping[str, Tensor]], *, alpha: float = DEFAULT_ALPHA,
                  transposed: Mapping[str, bool] | None = None, exclude: Sequence[str] = ()) -> dict[str, Tensor]:
    """A new state dict with ``base``'s keys and dtypes; ``grams[i]`` maps a module name to its G_i.

    ``transposed[module]`` is False for ``[in, out]`` weights (default True). Inputs are never modified.
    """
    if len(models) != len(grams) or not models:
        raise ValueError(f"regmean_merge needs one Gram set per model, got {len(models)} models, {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (reduce_non_diagonal_ratio) must lie in [0, 1], got {alpha}")
    transposed = transposed or {}
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if not b.is_floating_point() or excluded(k, exclude):
            out[k] = b.clone()
            continue
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if module is not None and all(module in g for g in grams):
            out[k] = regmean_solve([m[k] for m in models], [g[module] for g in grams], alpha,
                                   transpose=transposed.get(module, True)).to(b.dtype)
        else:
            dtype = torch.promote_types(b.dtype, torch.float32)
            out[k] = torch.stack([m[k].to(dtype) for m in models]).mean(0).to(b.dtype)
    return out
