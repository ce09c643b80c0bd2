"""SVD subspace merges from FusionBench: ISO-C, ISO-CTS (isotropic merging) and TSV-M (task singular vectors).

Per tensor, as FusionBench's per-key loops (``isotropic_merging/iso_utils.py``,
``task_singular_vector/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``):

* A tensor takes the matrix path when it is 2-D and ``svd`` is true (every 2-D tensor by default,
  embeddings and LM heads included, as FusionBench with ``exclude_keys: null``). Every other tensor
  gets the plain mean of the task vectors, scaled by λ.
* FusionBench's whole-model ``exclude_keys`` (exact key names sent to the mean path) is the per-tensor
  ``svd: false``, set by a name conditional in the recipe, e.g.
  ``svd: [{filter: text_projection, value: false}, {value: true}]`` (a substring match, where
  FusionBench compares whole keys).
* SVDs are thin (``torch.linalg.svd(full_matrices=False)``); "orthogonalise" is the polar factor
  ``U Vᵀ`` of the thin SVD of the concatenated singular vectors, as FusionBench. Matrices that are not
  float32/float64 go through float32 and come back in their own dtype (FusionBench's TSV-M does so;
  the driver passes float32 anyway).
* Where LAPACK's float32 SVD fails to converge (seen here on a fully fine-tuned MiniLM's
  position-embedding task vectors, with one thread: ill-conditioned, rank 282 of 384), that one SVD is
  recomputed in float64 and its factors cast back (:func:`_svd`). FusionBench raises there; every SVD
  that converges is unchanged.
* Where a summed matrix is rank-deficient, ISO's isotropic spectrum gives the SVD's arbitrary
  null-space directions a weight: the result then depends on the SVD backend, as in FusionBench.
"""

from __future__ import annotations

import functools
from typing import Annotated

import torch

from searchmerge.methods._types import Scale, Weight
from searchmerge.methods.registry import Range, merge_method

Tensor = torch.Tensor

#: Fraction of the rank given to the common subspace in ISO-CTS.
CommonFraction = Annotated[float, Range(0.0, 1.0, search=(0.5, 1.0))]


def _is_matrix(x: Tensor, svd: bool) -> bool:
    return svd and x.dim() == 2


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _running_mean(xs: list[Tensor]) -> Tensor:
    """FusionBench's incremental mean ``m += (x_i − m)/i`` (ISO-CTS, TSV-M non-matrix tensors), out of place."""
    mean = xs[0].clone()
    for i, x in enumerate(xs[1:], start=2):
        mean = mean + (x - mean) / i
    return mean


def _svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``; on a convergence failure, in float64, cast back."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _polar(a: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows): ``U Vᵀ`` of ``a``'s thin SVD."""
    u, _, vh = _svd(a)
    return u @ vh


@merge_method("iso_c", inputs="deltas", min_models=1, reference="https://arxiv.org/abs/2502.04959", final_scale="lambda")
def iso_c(base: Tensor, deltas: list[Tensor], *, lambda_: Scale = 1.0, svd: bool = True) -> Tensor:
    """ISO-C: flatten the spectrum of Σ τ_t. Matrices: M = Σ τ_t = U S Vᵀ → λ·U·(mean(S)·I)·Vᵀ.

    Other tensors: λ·mean(τ). ``lambda`` is FusionBench's ``scaling_factor`` (default 1.0; its docs'
    results use 1.5).
    """
    n = len(deltas)
    mean = functools.reduce(torch.add, deltas) / n  # FusionBench: sum(tvs) / n, then × n for matrices
    if not _is_matrix(mean, svd):
        return mean * lambda_
    total = mean.to(_work_dtype(mean)) * n  # (rows, cols)
    u, s, vh = _svd(total)
    flat = torch.ones_like(s) * s.mean()  # (r,), r = min(rows, cols)
    return torch.linalg.multi_dot((u, torch.diag(flat), vh)).to(mean.dtype) * lambda_


def iso_cts_split(size: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """ISO-CTS's (common rank, per-task rank) for a matrix of rank ``size = min(rows, cols)``.

    The common part starts at ``int(size·fraction)``; the task-specific remainder is rounded (Python
    ``round``, halves to even) to a multiple of the task count and the common part takes the rest.
    """
    common = int(size * common_space_fraction)
    specific = round((size - common) / n_tasks) * n_tasks
    common = size - specific
    if common < 0:
        raise ValueError(
            f"ISO-CTS: {n_tasks} task(s) cannot share the {size - int(size * common_space_fraction)} task-specific "
            f"dimension(s) left by common_space_fraction={common_space_fraction} of a rank-{size} matrix "
            "(FusionBench fails here too); raise `common_space_fraction` or exclude this tensor with `svd: false`."
        )
    return common, specific // n_tasks


@merge_method("iso_cts", inputs="deltas", min_models=1, reference="https://arxiv.org/abs/2502.04959", final_scale="lambda")
def iso_cts(
    base: Tensor, deltas: list[Tensor], *, lambda_: Scale = 1.0, common_space_fraction: CommonFraction = 0.8,
    svd: bool = True,
) -> Tensor:
    """ISO-CTS: common subspace of Σ τ_t plus per-task subspaces, orthogonalised, isotropic spectrum.

    Matrices: the top ``c`` singular triplets of Σ τ_t form the common space; each τ_t, with the common
    space projected out of its columns (τ_t − U_c U_cᵀ τ_t), gives its top ``p`` triplets
    (:func:`iso_cts_split`). The blocks [task 1 … task T, common] are concatenated, U and Vᵀ replaced by
    their polar factors, every singular value by their mean: λ·U·(mean(s)·I)·Vᵀ. Other tensors:
    λ·mean(τ).

    Difference from FusionBench: the projection is computed as ``U_c (U_cᵀ τ)`` instead of
    ``(U_c U_cᵀ) τ`` (same maths, no rows × rows matrix: a 50k-row embedding would need 10 GB).
    """
    n = len(deltas)
    if not _is_matrix(deltas[0], svd):
        return _running_mean(deltas) * lambda_
    dtype = deltas[0].dtype
    ts = [d.to(_work_dtype(d)) for d in deltas]  # T × (rows, cols)
    common, per_task = iso_cts_split(min(ts[0].shape), n, common_space_fraction)
    u, s, vh = _svd(functools.reduce(torch.add, ts))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common, :]  # (rows, c), (c,), (c, cols)
    us, ss, vhs = [], [], []
    for t in ts:
        specific = t - u_c @ (u_c.mT @ t)  # (rows, cols), common space removed
        u_t, s_t, vh_t = _svd(specific)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task, :])
    u_all = _polar(torch.cat(us + [u_c], dim=1))  # (rows, r): T·p + c = r columns
    vh_all = _polar(torch.cat(vhs + [vh_c], dim=0))  # (r, cols)
    s_all = torch.cat(ss + [s_c])  # (r,)
    flat = torch.ones_like(s_all) * s_all.mean()
    return torch.linalg.multi_dot((u_all, torch.diag(flat), vh_all)).to(dtype) * lambda_


@merge_method("tsv_m", inputs="deltas", min_models=1, reference="https://arxiv.org/abs/2412.00081", final_scale="lambda")
def tsv_m(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, lambda_: Scale = 1.0, svd: bool = True
) -> Tensor:
    """TSV-M: keep each τ_t's top-k singular triplets, orthogonalise the stacked vectors, sum.

    Matrices: k = ``int(r · (1/T))`` with r = min(rows, cols) (FusionBench's float product: k can come
    out one below ``r // T``, e.g. r = T = 49 gives k = 0, and a 1-row matrix merged from 2 tasks gives
    k = 0, a zero update). Task t's top-k U columns, singular values and Vᵀ rows fill block t of
    U (rows, r), s (r,), Vᵀ (r, cols) (unfilled slots stay zero); the result is
    λ·polar(U)·diag(s)·polar(Vᵀ). Other tensors: λ·mean(τ). One task: k = r and the result is λ·τ.

    ``lambda`` is FusionBench's scalar ``alpha`` (applied to the merged task vector); ``weight`` is its
    per-task list form (each τ_t is scaled before the SVDs). Both default to 1.
    """
    n = len(deltas)
    scaled = [d * w for d, w in zip(deltas, weight)]
    if not _is_matrix(scaled[0], svd):
        return _running_mean(scaled) * lambda_
    dtype = scaled[0].dtype
    ts = [d.to(_work_dtype(d)) for d in scaled]  # T × (rows, cols)
    rows, cols = ts[0].shape
    r = min(rows, cols)
    k = int(r * (1 / n))
    us, ss, vhs = [], [], []
    for t in ts:
        u_t, s_t, vh_t = _svd(t)
        us.append(u_t[:, :k])
        ss.append(s_t[:k])
        vhs.append(vh_t[:k, :])
    pad = r - n * k  # trailing slots left at zero
    like = dict(dtype=ts[0].dtype, device=ts[0].device)
    sum_u = torch.cat(us + [torch.zeros(rows, pad, **like)], dim=1)  # (rows, r)
    sum_s = torch.cat(ss + [torch.zeros(pad, **like)])  # (r,)
    sum_vh = torch.cat(vhs + [torch.zeros(pad, cols, **like)], dim=0)  # (r, cols)
    u_u, _, vh_u = _svd(sum_u)
    u_v, _, vh_v = _svd(sum_vh)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v)).to(dtype) * lambda_
