"""``Σ|τ·mask|`` of DARE's and DELLA's L1 rescale (``sparsify.rescale_masked``), in torch's summation order.

Two ways, the same float32 bits: where torch's CPU sum order is known (:func:`in_order`), one read pass that
masks as it sums in that order (:mod:`~searchmerge.store.torchsum`) and writes each entry's keep bit as a byte for
the combine that follows (which then does not draw again); elsewhere a kernel pass writes the masked |τ| into a
scratch buffer and torch sums it. Both evaluate the masks of :mod:`~searchmerge.store.ranks`' random and DELLA
cuts with the merge core's draws.
"""

from __future__ import annotations

import numpy as np
import torch

from searchmerge.store import torchsum
from searchmerge.store.kernel_source import DELLA_MASKED_ABS_SOURCE, MASKED_ABS_SOURCE, compiled, della_keep
from searchmerge.store.ranks import Cut, della_span

#: ``rescale_masked``'s "nothing to rescale" bound, as torch compares it with a float32 sum (rounded to float32)
FLOOR = np.float32(1e-7)

# the torch-order kinds: the values of MASKED_ABS_SOURCE / DELLA_MASKED_ABS_SOURCE, each entry's keep bit written to
# ``kb``; the draws take the index as a uint32 (``counter24u``: tensors below 2**32 entries, ≈20% faster)
_DRAW = "counter24u(k1, k2, np.uint32(jj))"
_MASKED = "v = abs(load(x, j) * np.float32(keep))"
_WRITE = "kb[j] = np.uint8(keep)"
torchsum.register_kind("della_abs_keep", ("keep = " + della_keep(_DRAW, "r[j]", "dc", "de", "dcm"), _WRITE, _MASKED),
                       ("r", "k1", "k2", "dc", "de", "dcm", "kb"), arrays=("r", "kb"))
torchsum.register_kind("random_abs_keep", (f"keep = {_DRAW} < t", _WRITE, _MASKED), ("k1", "k2", "t", "kb"),
                       arrays=("kb",))


def in_order(numel: int) -> bool:
    """Whether a tensor's sums take the one-pass torch-order kinds (which also write the keep bytes): torch's CPU
    sum order is known here, and every index fits the uint32 draws."""
    return numel < 1 << 32 and torchsum.order_known()


def della_args(cut: Cut, ranks: np.ndarray, cols: int) -> tuple:
    """A DELLA cut's mask arguments ``(r, k1, k2, dc, de, dcm)`` as the masked-|τ| kernels take them."""
    return (ranks, np.uint32(cut.rand[0]), np.uint32(cut.rand[1]), np.float32(cut.della[0]),
            np.float32(cut.della[1]), della_span(cols))


def masked_abs_sum(x: np.ndarray, cut: Cut, della: tuple[np.ndarray, int] | None, keep_bytes: np.ndarray | None,
                   scratch: torch.Tensor | None, workers: int = 1) -> np.float32:
    """``Σ|x·mask|`` of a whole tensor's random or DELLA cut (``della``: its ranks and row length), as torch sums it:
    with ``keep_bytes`` (only where :func:`in_order`) in one read pass that also writes the keep bits there, else
    through ``scratch`` (float32, at least ``len(x)`` entries), summed by torch."""
    extra = della_args(cut, *della) if cut.kind == "della" else tuple(np.uint32(v) for v in cut.rand)
    if keep_bytes is not None:
        kind = "della_abs_keep" if cut.kind == "della" else "random_abs_keep"
        return np.float32(torchsum.torch_order_sum(kind, x, *extra, keep_bytes, workers=workers))
    masked = scratch[: len(x)]
    compiled(DELLA_MASKED_ABS_SOURCE if cut.kind == "della" else MASKED_ABS_SOURCE)(x, *extra, masked.numpy())
    return np.float32(masked.sum().item())

