"""DELLA's within-row magnitude ranks, sorted once per tensor and model (:meth:`CutPaths._della_ranks`).

Why not ``sparsify.row_ranks`` (torch's stable argsort, then a scatter): the store sorts every tensor of every model
on a DELLA search's first trial, and torch's stable argsort of float32 rows is ≈ 3× slower than sorting one uint64
key per entry — ``|x|``'s bit pattern above the column index — with numpy's vectorised integer sort. The keys order
entries exactly as the stable sort of ``|x|`` does (a finite ``|x|``'s bits order like its value, NaN's above
infinity as torch sorts NaN last, ``−0`` and ``+0`` alike, ties by index), so the ranks are the same integers
(tested against ``row_ranks``).
"""

from __future__ import annotations

import numba
import numpy as np

from searchmerge.store.kernels_support import absbits


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _keys(x, cols, keys):  # noqa: ANN001, ANN202
    for j in range(len(x)):
        keys[j] = (np.uint64(absbits(x, j)) << np.uint64(32)) | np.uint64(j % cols)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _scatter(sorted_keys, cols, out):  # noqa: ANN001, ANN202
    for s in range(0, len(sorted_keys), cols):
        for r in range(cols):
            out[s + np.int64(sorted_keys[s + r] & np.uint64(0xFFFFFFFF))] = r


def row_ranks(x: np.ndarray, cols: int) -> np.ndarray:
    """Each entry's 0-based rank by ``|x|`` in its row of ``cols`` entries (stable: ties by index), for a flat float32
    (or bfloat16-as-uint16) array: uint16 where ``cols <= 65,536``, else int32."""
    if cols <= 0 or len(x) % cols:
        raise ValueError(f"row_ranks: {len(x)} entries are not rows of {cols}.")
    keys = np.empty(len(x), dtype=np.uint64)
    _keys(x, np.int64(cols), keys)
    keys = np.sort(keys.reshape(-1, cols), axis=1).reshape(-1)
    out = np.empty(len(x), dtype=np.uint16 if cols <= 1 << 16 else np.int32)
    _scatter(keys, np.int64(cols), out)
    return out
