"""Sparsifiers for task vectors: magnitude (TIES), random (DARE), outliers (breadcrumbs), rank-sampled (DELLA).

Each returns a new tensor; inputs are never modified. Semantics follow MergeKit's ``sparsify.py``:
magnitude keeps exactly ``int(density·numel)`` entries (ties at the cut go to the lower index); the random
sparsifiers draw from the caller's (CPU) generator, so a seed gives the same masks on CPU and CUDA
and however the tensors are sharded.
"""

from __future__ import annotations

import torch


def rescale_masked(delta: torch.Tensor, mask: torch.Tensor, rescale: str, density: float) -> torch.Tensor:
    """Apply ``mask`` and rescale: ``l1`` matches the L1 norm (MergeKit), ``inverse`` divides by density (DARE)."""
    masked = delta * mask
    if rescale == "none":
        return masked
    if rescale == "inverse":
        return masked / density
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 for the top ``int(density·numel)`` entries of ``|delta|``, 0 elsewhere.

    Equal to a stable descending argsort's first k (ties at the cut go to the lower index), found with
    one O(n) ``kthvalue`` selection instead of a full sort.
    """
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    w = delta.abs().reshape(-1)
    cut = w.kthvalue(w.numel() - k + 1).values  # the k-th largest magnitude
    keep = w > cut
    missing = k - int(keep.sum())
    if missing > 0:  # fill with the lowest-index entries equal to the cut
        keep[torch.nonzero(w == cut).squeeze(1)[:missing]] = True
    return keep.reshape(delta.shape).to(delta.dtype)


def random_mask(delta: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(density) keep-mask (DARE: keep with probability 1 − p)."""
    if density >= 1:
        return torch.ones_like(delta)
    draws = torch.rand(delta.shape, generator=rng, dtype=torch.float32).to(delta.device)
    return (draws < density).to(delta.dtype)


def smallest_mask(abs_values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the first ``k`` entries of a stable ascending argsort of the flat ``abs_values`` (ties to
    the lower index), found with one O(n) ``kthvalue`` selection instead of a sort."""
    w = abs_values.reshape(-1)
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if k >= w.numel():
        return torch.ones_like(w, dtype=torch.bool)
    cut = w.kthvalue(k).values  # the k-th smallest
    keep = w < cut
    missing = k - int(keep.sum())
    if missing > 0:  # fill with the lowest-index entries equal to the cut
        keep[torch.nonzero(w == cut).squeeze(1)[:missing]] = True
    return keep


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then the smallest, keeping ``density``.

    Keeps the entries ranked ``[n_bot, n − n_top)`` in a stable ascending argsort of ``|delta|`` (MergeKit), as
    "among the n − n_top smallest, not among the n_bot smallest": two O(n) selections, no sort (tested equal).
    """
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    w = delta.abs().reshape(-1)
    keep = smallest_mask(w, n - n_top) & ~smallest_mask(w, n_bot)
    return keep.reshape(delta.shape).to(delta.dtype)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator | None) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude rank within each row."""
    if density >= 1:
        return torch.ones_like(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    draws = torch.rand(probs.shape, generator=rng, dtype=torch.float32).to(delta.device)
    return (draws < probs).to(delta.dtype).reshape(delta.shape)


def sparsify(
    delta: torch.Tensor,
    *,
    method: str,
    density: float,
    rescale: str = "none",
    rng: torch.Generator | None = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """Dispatch to one sparsifier and rescale; ``density >= 1`` returns ``delta`` unchanged (no copy)."""
    if density >= 1:
        return delta
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
    elif method == "random":
        mask = random_mask(delta, density, rng)
    elif method == "magnitude_outliers":
        mask = outlier_mask(delta, density, gamma)
    elif method == "della_magprune":
        mask = della_mask(delta, density, epsilon, rng)
    else:
        raise ValueError(f"unknown sparsification method {method!r}")
    return rescale_masked(delta, mask, rescale, density)
