"""Spherical interpolation methods: SLERP, NuSLERP and the Karcher mean (MergeKit semantics, in torch)."""

from __future__ import annotations

from typing import Annotated

import torch

from searchmerge.methods._types import Unit, Weight
from searchmerge.methods.registry import Range, merge_method

Tensor = torch.Tensor
DOT_THRESHOLD = 0.9995


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors treated as flat vectors; lerp when nearly colinear.

    As MergeKit: directions are normalised for the angle only, and the weights apply to the original
    (unnormalised) tensors.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = torch.sum(ua * ub)
    if torch.abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta_0 = torch.arccos(dot)
    sin_theta_0 = torch.sin(theta_0)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return s0 * v0 + s1 * v1


@merge_method("slerp", inputs="weights", base="required", min_models=1, max_models=1,
              reference="https://github.com/arcee-ai/mergekit")
def slerp(base: Tensor, tensors: list[Tensor], *, t: Unit = 0.5) -> Tensor:
    """SLERP from the base (t=0) to the one other model (t=1); lerp fallback when |cos| > 0.9995."""
    return slerp_tensors(t, base, tensors[0])


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """MergeKit's ``nuslerp``: slerp along rows/columns (or flattened), lerp where vectors are colinear."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(ua * ub, dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    colinear = (sin.abs() < eps).expand_as(res)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@merge_method("nuslerp", inputs="weights", base="optional", min_models=2, max_models=2,
              reference="https://github.com/arcee-ai/mergekit")
def nuslerp(
    base: Tensor | None, tensors: list[Tensor], *, weight: Weight = 1.0, nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """Slerp two models at t = w₂/(w₁+w₂); with a base, slerp their task vectors and add to the base."""
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return base + nuslerp_tensors(
        t, tensors[0] - base, tensors[1] - base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten
    )


def karcher_mean(tensors: list[Tensor], alphas: list[float], *, max_iter: int, tol: float) -> Tensor:
    """Weighted Riemannian (Karcher) mean of directions on the unit sphere, rescaled by Σ α_i‖x_i‖."""
    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [float(torch.linalg.vector_norm(x)) for x in tensors]
    units = [x / n if n > 0 else torch.zeros_like(x) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]
    u = [units[i] for i in valid]
    mean = sum(ai * ui for ai, ui in zip(a, u))
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = u[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent = tangent + ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        t_norm = torch.linalg.vector_norm(tangent)
        if float(t_norm) < tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = float(torch.linalg.vector_norm(mean))
        if m_norm > tol:
            mean = mean / m_norm
    return sum(al * n for al, n in zip(alphas, norms)) * mean


@merge_method("karcher", inputs="weights", base="optional", min_models=1,
              reference="https://en.wikipedia.org/wiki/Karcher_mean")
def karcher(
    base: Tensor | None, tensors: list[Tensor], *,
    max_iter: Annotated[int, Range(1, 1000)] = 10, tol: Annotated[float, Range(0.0, 1.0, low_open=True)] = 1e-5,
) -> Tensor:
    """Karcher mean of all inputs (the base too, when given) with equal weights 1/N, as MergeKit."""
    inputs = ([base] if base is not None else []) + list(tensors)
    return karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs), max_iter=max_iter, tol=tol)
