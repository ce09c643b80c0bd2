"""Fisher merging, the tensor maths (FusionBench ``merging_with_fisher_weights``, from MergeLM).

θ* = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε), per parameter, over *full* weights. c_i = 1/N, times,
when ``normalize``, s_i = (1/(‖F_i‖ + ε)) / Σ_j 1/(‖F_j‖ + ε) with ‖F_i‖ the L2 norm of model i's whole
Fisher over the merged parameters (raw F, before the ε floor). Parameters without a Fisher (buffers),
non-float tensors and names matched by an ``exclude`` regex (``re.match``, as FusionBench) keep the base.
The data pass that estimates F lives in :mod:`searchmerge.fusion.stats`.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

Tensor = torch.Tensor
DEFAULT_EPSILON = 1e-6  # FusionBench `minimal_fisher_weight`


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """FusionBench's ``get_param_names_to_merge``: a name is excluded when a pattern ``re.match``-es it."""
    return any(re.match(p, name) for p in patterns)


def merged_names(fishers: Sequence[Mapping[str, Tensor]], exclude: Sequence[str] = ()) -> list[str]:
    """Names every model has a Fisher for, minus the excluded ones, in the first model's order."""
    common = [k for k in fishers[0] if all(k in f for f in fishers[1:])]
    return [k for k in common if not excluded(k, exclude)]


def fisher_norms(fishers: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> Tensor:
    """‖F_i‖₂ over all ``names`` per model (the L2 norm of the per-parameter L2 norms), float64."""
    per_param = torch.stack([
        torch.stack([torch.linalg.vector_norm(f[k].double()) for k in names]) for f in fishers
    ])
    return torch.linalg.vector_norm(per_param, dim=1)


def model_coefficients(fishers: Sequence[Mapping[str, Tensor]], names: Sequence[str], *,
                       coefficients: Sequence[float] | None = None, normalize: bool = True,
                       epsilon: float = DEFAULT_EPSILON) -> Tensor:
    """The per-model factor c_i (·s_i when ``normalize``) that scales each model's Fisher, float64."""
    n = len(fishers)
    c = torch.full((n,), 1.0 / n, dtype=torch.float64) if coefficients is None else \
        torch.tensor([float(x) for x in coefficients], dtype=torch.float64)
    if normalize:
        inv = 1.0 / (fisher_norms(fishers, names) + epsilon)
        c = c * inv / inv.sum()
    return c


def fisher_merge_tensor(tensors: Sequence[Tensor], fishers: Sequence[Tensor], coefficients: Tensor,
                        epsilon: float = DEFAULT_EPSILON) -> Tensor:
    """One parameter: Σ c_i (F_i+ε) θ_i / Σ c_i (F_i+ε), computed in float32 (float64 inputs stay float64)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    theta = torch.stack([t.to(dtype) for t in tensors])
    f = torch.stack([x.to(dtype) for x in fishers]) + epsilon
    c = coefficients.to(dtype).view(-1, *([1] * tensors[0].dim()))
    return (c * f * theta).sum(0) / (c * f).sum(0)


def fisher_merge(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                 fishers: Sequence[Mapping[str, Tensor]], *, coefficients: Sequence[float] | None = None,
                 normalize: bool = True, epsilon: float = DEFAULT_EPSILON,
                 exclude: Sequence[str] = ()) -> dict[str, Tensor]:
    """A new state dict with ``base``'s keys and dtypes; inputs are never modified."""
    if len(models) != len(fishers) or not models:
        raise ValueError(f"fisher_merge needs one Fisher per model, got {len(models)} models, {len(fishers)} Fishers")
    names = [k for k in merged_names(fishers, exclude) if k in base and base[k].is_floating_point()]
    c = model_coefficients(fishers, names, coefficients=coefficients, normalize=normalize, epsilon=epsilon)
    merged = set(names)
    out: dict[str, Tensor] = {}
    for k, b in base.items():
        if k in merged:
            out[k] = fisher_merge_tensor([m[k] for m in models], [f[k] for f in fishers], c, epsilon).to(b.dtype)
        else:
            out[k] = b.clone()
    return out
