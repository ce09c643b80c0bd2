"""Linear averaging and the task-arithmetic family (TA, TIES, DARE, breadcrumbs, DELLA).

The family is one function, :func:`generalized_task_arithmetic` (MergeKit's GTA), configured per
method: sparsify each task vector, weight it, optionally elect a sign by mass and merge disjointly,
normalise, scale by λ. Defaults follow MergeKit for its method names; FusionBench's variants are
the documented options ``trim_scope: model`` (global top-k), ``merge_func: sum``, ``rescale: inverse``.

Known, documented differences from the references:
* sign election: where the weighted sum is exactly 0 we elect ``+`` (MergeKit); FusionBench takes the
  model-wide majority sign. Entries there are dropped or kept only when trimmed values cancel exactly.
* random masks come from a counter-based generator keyed per tensor (``seed``, tensor name) and mask
  (``sparsify.counter_draws``), not from one global RNG stream, so a merge is reproducible however tensors
  are ordered or sharded, and each entry's draw can be computed alone (inside the store's fused pass).
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Sequence

import torch

from searchmerge.errors import RecipeError
from searchmerge.methods._types import Density, ElectOn, MergeFunc, Rescale, Scale, TrimScope, Weight
from searchmerge.methods.registry import PerModel, Range, merge_method
from searchmerge.methods.sparsify import sparsify

Tensor = torch.Tensor


def _weights_like(weights: Sequence[float], ref: Tensor) -> Tensor:
    """Per-model weights shaped to broadcast over a stack: (n_models, 1, …, 1)."""
    w = torch.tensor(list(weights), dtype=ref.dtype, device=ref.device)
    return w.view(-1, *([1] * ref.dim()))


def elect_sign(votes: Tensor, consensus: str) -> tuple[Tensor, Tensor]:
    """TIES step 2 on a stack (n_models, *shape): the elected sign (+1 where the vote is exactly 0) and which
    entries agree with it (zeros never agree: they are dropped)."""
    tally = votes.sign().sum(dim=0) if consensus == "count" else votes.sum(dim=0)
    majority = torch.where(tally >= 0, 1.0, -1.0).to(votes.dtype)
    return majority, votes.sign() == majority


def elect_and_merge(weighted: Tensor, weights: Tensor, merge_func: str, consensus: str,
                    votes: Tensor | None = None) -> Tensor:
    """TIES steps 2–3 on a stack of weighted deltas (n_models, *shape): elect signs, disjoint merge.

    ``votes``: the stack the sign is elected on (default: ``weighted``, MergeKit; the unweighted trimmed
    deltas for ``elect_on: unweighted``)."""
    majority, agree = elect_sign(weighted if votes is None else votes, consensus)
    kept = weighted * agree
    if merge_func == "max":
        return kept.abs().amax(dim=0) * majority
    merged = kept.sum(dim=0)
    if merge_func == "mean":
        divisor = (weights * agree).sum(dim=0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


def generalized_task_arithmetic(
    deltas: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lambda_: float,
    sparsification: str | None,
    consensus: str | None,
    merge_func: str,
    rescale: str = "none",
    rng: torch.Generator | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    trim_thresholds: Sequence[float] | None = None,
    elect_on: str = "weighted",
) -> Tensor:
    """Merged delta of the GTA family; ``trim_thresholds`` (per model) replaces per-tensor magnitude trimming.

    ``elect_on: unweighted`` elects the sign on the sparsified deltas before the weights (see :func:`ties`).

    ``gamma`` / ``epsilon`` are per model, as MergeKit declares them (``NON_BASE``); ``None``: the defaults.
    """
    sparse = []
    for i, delta in enumerate(deltas):
        if sparsification is not None:
            delta = sparsify(
                delta, method=sparsification, density=density[i], rescale=rescale, rng=rng,
                gamma=0.01 if gamma is None else gamma[i], epsilon=0.15 if epsilon is None else epsilon[i],
            )
        if trim_thresholds is not None:
            delta = delta * (delta.abs() >= trim_thresholds[i])
        sparse.append(delta)
    stacked = torch.stack(sparse)  # (n_models, *shape)
    w = _weights_like(weight, sparse[0])
    weighted = stacked * w
    if consensus is not None:
        votes = stacked if elect_on == "unweighted" else None
        merged = elect_and_merge(weighted, w.expand_as(weighted), merge_func, consensus, votes)
    else:
        merged = weighted.sum(dim=0)
        if merge_func == "mean":
            total = float(sum(weight))
            merged = merged / (total if abs(total) >= 1e-8 else 1.0)
    return merged * lambda_


# --- whole-model trimming (FusionBench / the TIES paper) -------------------------------------------


def kth_threshold(abs_values: Tensor, density: float) -> float:
    """FusionBench's ``topk_values_mask`` cut-off: keep ``|τ| >=`` the (D − int(D·density))-th smallest."""
    d = abs_values.numel()
    k = d - int(d * density)
    if k <= 0:
        return 0.0
    return float(abs_values.kthvalue(k).values)


def _trim_needed(scalars: dict[str, Any]) -> bool:
    return scalars.get("trim_scope") == "model"


def prepare_model_trim(
    items: Iterable[tuple[str, Tensor, list[Tensor], torch.Generator | None]],
    scalars: dict[str, Any],
    sparsification: str | None = None,
) -> dict[str, list[float]]:
    """Per-model |τ| cut-offs over the whole model: collect all |τ_i| (after any random drop), then kthvalue."""
    key = "trim_density" if "trim_density" in scalars else "density"
    densities = scalars[key]
    chunks: list[list[Tensor]] | None = None
    for _, _, deltas, rng in items:
        if chunks is None:
            chunks = [[] for _ in deltas]
        for i, delta in enumerate(deltas):
            if sparsification is not None:
                delta = sparsify(
                    delta, method=sparsification, density=scalars["density"][i], rescale=scalars["rescale"], rng=rng
                )
            chunks[i].append(delta.detach().abs().reshape(-1).float().cpu())
    if chunks is None:
        return {"thresholds": []}
    thresholds = []
    for i, parts in enumerate(chunks):
        thresholds.append(kth_threshold(torch.cat(parts), float(densities[i])) if densities[i] < 1 else 0.0)
    return {"thresholds": thresholds}


def _prepare_ties(items, scalars):  # noqa: ANN001
    return prepare_model_trim(items, scalars)


def _prepare_dare_ties(items, scalars):  # noqa: ANN001
    return prepare_model_trim(items, scalars, sparsification="random")


_prepare_ties.needed = _trim_needed  # type: ignore[attr-defined]
_prepare_dare_ties.needed = _trim_needed  # type: ignore[attr-defined]
# the per-model parameters a whole-model pass reads (one value per model); the weights are applied per tensor after
_prepare_ties.reads = ("density",)  # type: ignore[attr-defined]
_prepare_dare_ties.reads = ("density", "trim_density")  # type: ignore[attr-defined]


def _thresholds(stats: Any, trim_scope: str, rescale: str = "none") -> list[float] | None:
    if trim_scope == "model" and rescale != "none":
        raise RecipeError(f"ties: `rescale: {rescale}` applies to per-tensor trimming; with `trim_scope: model` "
                         "use `rescale: none`")
    if trim_scope != "model":
        return None
    if not stats or "thresholds" not in stats:
        raise ValueError("trim_scope: model needs the whole-model prepare pass (stats['thresholds'])")
    return list(stats["thresholds"])


# --- registered methods ----------------------------------------------------------------------------


@merge_method("linear", inputs="weights", base="optional", reference="https://arxiv.org/abs/2203.05482",
              aliases=("weighted_average", "simple_average"))
def linear(base: Tensor | None, tensors: list[Tensor], *, weight: Weight = 1.0, normalize: bool = True) -> Tensor:
    """Weighted average of full weights, Σ w_i θ_i (/ Σ w_i when ``normalize``); the base is not an input."""
    w = _weights_like(weight, tensors[0])
    merged = (torch.stack(tensors) * w).sum(dim=0)
    if normalize:
        total = float(sum(weight))
        merged = merged / (total if abs(total) >= 1e-8 else 1.0)
    return merged


@merge_method("task_arithmetic", inputs="deltas", reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, lambda_: Scale = 1.0, normalize: bool = False
) -> Tensor:
    """θ₀ + λ·Σ w_i τ_i (FusionBench: weights 1, λ = scaling_factor)."""
    return generalized_task_arithmetic(
        deltas, weight=weight, density=[1.0] * len(deltas), lambda_=lambda_, sparsification=None,
        consensus=None, merge_func="mean" if normalize else "sum",
    )


@merge_method("ties", inputs="deltas", reference="https://arxiv.org/abs/2306.01708", prepare=_prepare_ties)
def ties(
    base: Tensor,
    deltas: list[Tensor],
    *,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Scale = 1.0,
    merge_func: MergeFunc = "mean",
    trim_scope: TrimScope = "tensor",
    rescale: Rescale = "none",
    elect_on: ElectOn = "weighted",
    stats: Any = None,
) -> Tensor:
    """Trim each τ to its top ``density`` by magnitude, elect signs by mass, merge disjointly, scale by λ.

    ``rescale: l1`` is MergeKit's ``rescale: true`` (the kept entries keep the τ's L1 norm).
    ``elect_on``: the sign is elected on the weighted trimmed deltas ``w_i·τ̂_i`` (``weighted``, MergeKit), or on
    the trimmed deltas ``τ̂_i`` themselves with the weights applied to the kept entries after (``unweighted``:
    ``Σ_i w_i·τ̂_i·[sign τ̂_i = sign Σ_j τ̂_j]``, the TIES paper's code with per-model weights, as AdaMerging++
    scales its TIES vectors). With equal positive weights the two are the same."""
    thresholds = _thresholds(stats, trim_scope, rescale)
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density if thresholds is None else [1.0] * len(deltas), lambda_=lambda_,
        sparsification="magnitude" if thresholds is None else None, consensus="sum", merge_func=merge_func,
        rescale=rescale, trim_thresholds=thresholds, elect_on=elect_on,
    )


@merge_method("dare_ties", inputs="deltas", reference="https://arxiv.org/abs/2311.03099", prepare=_prepare_dare_ties)
def dare_ties(
    base: Tensor,
    deltas: list[Tensor],
    *,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Scale = 1.0,
    rescale: Rescale = "l1",
    merge_func: MergeFunc = "sum",
    trim_density: Density = 1.0,
    trim_scope: TrimScope = "tensor",
    rng: torch.Generator | None = None,
    stats: Any = None,
) -> Tensor:
    """DARE drop-and-rescale (keep ``density``), then TIES sign election; optional TIES trim (``trim_density``).

    MergeKit's ``dare_ties`` is ``trim_density: 1``; FusionBench's DareTiesMerging is
    ``rescale: inverse, trim_density: 0.2, trim_scope: model, merge_func: sum``.
    """
    thresholds = _thresholds(stats, trim_scope)
    dropped = [
        sparsify(d, method="random", density=density[i], rescale=rescale, rng=rng) for i, d in enumerate(deltas)
    ]
    if thresholds is None and any(t < 1 for t in trim_density):
        dropped = [sparsify(d, method="magnitude", density=trim_density[i]) for i, d in enumerate(dropped)]
    return generalized_task_arithmetic(
        dropped, weight=weight, density=[1.0] * len(deltas), lambda_=lambda_, sparsification=None,
        consensus="sum", merge_func=merge_func, trim_thresholds=thresholds,
    )


@merge_method("dare_linear", inputs="deltas", reference="https://arxiv.org/abs/2311.03099",
              aliases=("dare_task_arithmetic",))
def dare_linear(
    base: Tensor,
    deltas: list[Tensor],
    *,
    weight: Weight = 1.0,
    density: Density = 1.0,
    lambda_: Scale = 1.0,
    rescale: Rescale = "l1",
    normalize: bool = False,
    rng: torch.Generator | None = None,
) -> Tensor:
    """DARE on task arithmetic: drop each τ entry with probability 1 − density, rescale, weighted sum."""
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density, lambda_=lambda_, sparsification="random", consensus=None,
        merge_func="mean" if normalize else "sum", rescale=rescale, rng=rng,
    )


#: Breadcrumbs' top fraction dropped as outliers; per model, as MergeKit (``ParameterScope.NON_BASE``).
Gamma = PerModel[Annotated[float, Range(0.0, 1.0, search=(0.0, 0.1))]]
#: DELLA's keep-probability spread around ``density``; per model, as MergeKit (``ParameterScope.NON_BASE``).
Epsilon = PerModel[Annotated[float, Range(0.0, 0.5, search=(0.0, 0.3))]]


@merge_method("breadcrumbs", inputs="deltas", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, density: Density = 1.0, gamma: Gamma = 0.01,
    lambda_: Scale = 1.0, normalize: bool = False, rescale: Rescale = "none",
) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest entries of each τ, weighted sum."""
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density, lambda_=lambda_, sparsification="magnitude_outliers",
        consensus=None, merge_func="mean" if normalize else "sum", rescale=rescale, gamma=gamma,
    )


@merge_method("breadcrumbs_ties", inputs="deltas", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, density: Density = 1.0, gamma: Gamma = 0.01,
    lambda_: Scale = 1.0, merge_func: MergeFunc = "sum", rescale: Rescale = "none",
) -> Tensor:
    """Breadcrumbs sparsification followed by TIES sign election and disjoint merge."""
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density, lambda_=lambda_, sparsification="magnitude_outliers",
        consensus="sum", merge_func=merge_func, rescale=rescale, gamma=gamma,
    )


@merge_method("della", inputs="deltas", reference="https://arxiv.org/abs/2406.11617")
def della(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, density: Density = 1.0,
    epsilon: Epsilon = 0.15, lambda_: Scale = 1.0, rescale: Rescale = "l1", merge_func: MergeFunc = "mean",
    rng: torch.Generator | None = None,
) -> Tensor:
    """DELLA: magnitude-rank sampled drop (MagPrune), rescale, TIES sign election, λ."""
    _check_della(density, epsilon)
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density, lambda_=lambda_, sparsification="della_magprune",
        consensus="sum", merge_func=merge_func, rescale=rescale, rng=rng, epsilon=epsilon,
    )


@merge_method("della_linear", inputs="deltas", reference="https://arxiv.org/abs/2406.11617")
def della_linear(
    base: Tensor, deltas: list[Tensor], *, weight: Weight = 1.0, density: Density = 1.0,
    epsilon: Epsilon = 0.15, lambda_: Scale = 1.0, rescale: Rescale = "l1", normalize: bool = False,
    rng: torch.Generator | None = None,
) -> Tensor:
    """DELLA sparsification with a plain weighted sum (no sign election)."""
    _check_della(density, epsilon)
    return generalized_task_arithmetic(
        deltas, weight=weight, density=density, lambda_=lambda_, sparsification="della_magprune",
        consensus=None, merge_func="mean" if normalize else "sum", rescale=rescale, rng=rng, epsilon=epsilon,
    )


def _check_della(density: Sequence[float], epsilon: Sequence[float]) -> None:
    for i, (d, e) in enumerate(zip(density, epsilon)):
        if d < 1 and not (0 < d - e and d + e < 1):
            raise ValueError(f"DELLA needs 0 < density ± epsilon < 1, got density={d}, epsilon={e} for model {i} — "
                             "lower epsilon or move density away from 0 and 1")


@merge_method("sce", inputs="deltas", min_models=1, reference="https://arxiv.org/abs/2408.07990")
def sce(
    base: Tensor, deltas: list[Tensor], *,
    select_topk: Annotated[float, Range(0.0, 1.0, search=(0.1, 1.0))] = 1.0, lambda_: Scale = 1.0,
) -> Tensor:
    """SCE: keep the top-variance positions, weight models by mean(τ²), TIES sign election, normalised sum."""
    stacked = torch.stack(deltas)  # (n_models, *shape)
    if select_topk < 1:
        variance = torch.var(stacked, dim=0, unbiased=False)
        k = int(select_topk * int(torch.count_nonzero(variance)))
        mask = torch.zeros_like(variance)
        if k > 0:
            mask.view(-1)[torch.topk(variance.abs().reshape(-1), k=k).indices] = 1
        stacked = stacked * mask
    energy = [float((d**2).sum()) / d.numel() for d in stacked]
    total = sum(energy)
    coeffs = [1.0 / len(energy)] * len(energy) if total == 0 else [e / total for e in energy]
    w = _weights_like(coeffs, deltas[0])
    majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    erased = w * (stacked.sign() == majority)
    divisor = erased.sum(dim=0)
    merged = (stacked * erased).sum(dim=0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged * lambda_
