"""Sparsifiers for task vectors: magnitude (TIES), random (DARE), outliers (breadcrumbs), rank-sampled (DELLA).

Each returns a new tensor; inputs are never modified. Semantics follow MergeKit's ``sparsify.py``:
magnitude keeps exactly ``int(density·numel)`` entries (ties at the cut go to the lower index); the random
sparsifiers draw from a counter-based generator (:func:`counter_draws`) keyed by one draw of the caller's
generator per mask, so a seed gives the same masks on CPU and CUDA, however the tensors are sharded, and
entry by entry inside a fused pass (the resident store's kernels compute the same integers).
"""

from __future__ import annotations

import math

import torch

#: the counter-based generator: 32-bit integer mixing (multiplier < 2**27, so int64 products never overflow)
_MIX = 0x45D9F3B
_M32 = 0xFFFFFFFF
#: a 24-bit draw u gives the uniform value u / 2**24 (what ``torch.rand`` draws in float32 as well)
DRAW_BITS = 24
_CHUNK = 1 << 16  # draws are computed in cache-sized chunks on CPU


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def mask_key(rng: torch.Generator | None) -> tuple[int, int]:
    """Two 32-bit keys for one mask: one draw of the per-tensor generator, so the models' masks differ."""
    key = int(torch.randint(0, 1 << 62, (1,), generator=rng, dtype=torch.int64))
    return key & _M32, (key >> 32) & _M32


def counter_draws(key: tuple[int, int], start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 24-bit draws (int64) of entries ``[start, stop)`` of a mask keyed ``key``: entry ``j`` draws
    ``mix(((j mod 2**32) + (k2 ^ (j >> 32))) mod 2**32 ^ k1) >> 8`` — a function of (key, j) alone (one round of a
    multiply-xorshift integer hash: the kernels compute it per entry at about a task-arithmetic pass's cost)."""
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    x = (((j & _M32) + (key[1] ^ (j >> 32))) & _M32) ^ key[0]
    return _mix32(x) >> (32 - DRAW_BITS)


def keep_threshold(density: float) -> int:
    """Entry kept where its draw ``u < keep_threshold(density)``, i.e. exactly where ``u / 2**24 < density``."""
    return math.ceil(density * (1 << DRAW_BITS))


def _draws(numel: int, rng: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A new mask's 24-bit draws for ``numel`` entries (chunked on CPU so the integer passes stay in cache)."""
    key = mask_key(rng)
    step = numel if device.type != "cpu" else _CHUNK
    return torch.cat([counter_draws(key, s, min(numel, s + step), device) for s in range(0, numel, max(step, 1))]
                     or [torch.empty(0, dtype=torch.int64, device=device)])


def rescale_masked(delta: torch.Tensor, mask: torch.Tensor, rescale: str, density: float) -> torch.Tensor:
    """Apply ``mask`` and rescale: ``l1`` matches the L1 norm (MergeKit), ``inverse`` divides by density (DARE).

    At density 0 nothing is kept and nothing is rescaled (``inverse`` would divide zeros by zero: NaN), as ``l1``
    leaves an empty mask alone."""
    masked = delta * mask
    if rescale == "none":
        return masked
    if rescale == "inverse":
        return masked / density if density > 0 else masked
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
    """Bernoulli(density) keep-mask (DARE: keep with probability 1 − p), from the counter-based generator."""
    if density >= 1:
        return torch.ones_like(delta)
    keep = _draws(delta.numel(), rng, delta.device) < keep_threshold(density)
    return keep.reshape(delta.shape).to(delta.dtype)


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


def breadcrumbs_band(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_bot, n_top)``: breadcrumbs drops the ``n_top`` largest and the ``n_bot`` smallest of ``n`` magnitudes,
    keeping ``int(density·n)``; when the two overlap the top cut shrinks (MergeKit's rule)."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then the smallest, keeping ``density``.

    Keeps the entries ranked ``[n_bot, n − n_top)`` in a stable ascending argsort of ``|delta|`` (MergeKit), as
    "among the n − n_top smallest, not among the n_bot smallest": two O(n) selections, no sort (tested equal).
    """
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    n_bot, n_top = breadcrumbs_band(n, density, gamma)
    w = delta.abs().reshape(-1)
    keep = smallest_mask(w, n - n_top) & ~smallest_mask(w, n_bot)
    return keep.reshape(delta.shape).to(delta.dtype)


def row_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based rank in a stable ascending sort of its row: ``argsort(argsort(values))`` with one sort
    (the inverse permutation scattered), the same integers at about half the cost."""
    order = torch.argsort(values, dim=1, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))


def della_mask(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator | None) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude rank within each row."""
    if density >= 1:
        return torch.ones_like(delta)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    ranks = row_ranks(rows.abs()).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    draws = _draws(probs.numel(), rng, delta.device).to(torch.float32).reshape(probs.shape) * 2.0**-DRAW_BITS
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
