"""The float32 order of torch's CPU ``stack(xs).sum(dim=0)``, so fused kernels and chunked paths reproduce its bits.

Why: the merge core sums the N stacked task vectors with ``sum(dim=0)``. On CPU that is ATen's ``cascade_sum``
(``SumKernel.cpp``): for an (N, C) contiguous input the columns in whole groups (32 columns when C >= 8, else 4)
are summed per column by ``multi_row_sum`` — sequentially from +0, with a cascade of 4 levels once N >= 16 —
and the remaining columns (the last ``C % group``) by ``row_sum`` with 4 interleaved partial sums (rows
k, k+4, …), the leftover rows added to the first, then the partials folded. A plain sequential sum differs in
the last bit at those tail columns once N >= 5 (and in the sign of zero elsewhere), so a fused pass must
follow the same tree per column. Checked against torch for N = 1…33 and many C (tests/test_store_density.py).

A tree is an ``int`` (term ``i``), ``None`` (the +0.0 accumulators start from) or a pair ``(left, right)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

Tree = Any

_LEVELS = 4
_ILP = 4


def plain_count(numel: int) -> int:
    """How many leading columns of a ``numel``-column sum are summed per column (the rest use the ILP tree)."""
    group = 32 if numel >= 8 else 4
    return numel // group * group


def _add(a: Tree, b: Tree) -> Tree:
    return (a, b)


def _cascade(get: Callable[[int, int], Tree], nrows: int, size: int) -> list[Tree]:
    """``multi_row_sum``'s accumulation over ``size`` rows, symbolically (``nrows`` independent partials)."""
    bits = (size - 1).bit_length() if size > 0 else 0
    power = max(4, bits // _LEVELS)
    step = 1 << power
    mask = step - 1
    acc: list[list[Tree]] = [[None] * nrows for _ in range(_LEVELS)]
    i = 0
    while i + step <= size:
        for _ in range(step):
            for k in range(nrows):
                acc[0][k] = _add(acc[0][k], get(i, k))
            i += 1
        for j in range(1, _LEVELS):
            for k in range(nrows):
                acc[j][k] = _add(acc[j][k], acc[j - 1][k])
                acc[j - 1][k] = None
            if i & (mask << (j * power)):
                break
    while i < size:
        for k in range(nrows):
            acc[0][k] = _add(acc[0][k], get(i, k))
        i += 1
    for j in range(1, _LEVELS):
        for k in range(nrows):
            acc[0][k] = _add(acc[0][k], acc[j][k])
    return acc[0]


@lru_cache(maxsize=256)
def sum_tree(n: int, ilp: bool) -> Tree:
    """The addition tree of ``n`` stacked terms for a column in the per-column part (``ilp=False``) or the tail."""
    if not ilp:
        return _cascade(lambda i, k: i, 1, n)[0]
    size = n // _ILP
    parts = _cascade(lambda i, k: i * _ILP + k, _ILP, size)
    out = parts[0]
    for i in range(size * _ILP, n):
        out = _add(out, i)
    for p in parts[1:]:
        out = _add(out, p)
    return out


def tree_source(tree: Tree, names: Sequence[str], zero: str = "ZERO") -> str:
    """The tree as a Python expression over ``names`` (for the generated kernels)."""
    if tree is None:
        return zero
    if isinstance(tree, int):
        return names[tree]
    return f"({tree_source(tree[0], names, zero)} + {tree_source(tree[1], names, zero)})"


def tree_eval(tree: Tree, terms: Sequence[Any], zero: Any) -> Any:
    """The tree evaluated over ``terms`` (tensors or scalars), one float32 addition per node."""
    if tree is None:
        return zero
    if isinstance(tree, int):
        return terms[tree]
    return tree_eval(tree[0], terms, zero) + tree_eval(tree[1], terms, zero)


def safe_chunks(n: int, step: int) -> list[tuple[int, int]]:
    """``[0, n)`` in chunks on which the core's ``sum(dim=0)`` gives the whole tensor's bits: boundaries on
    multiples of 32 (so per-column and tail columns do not move) and no final chunk shorter than 32."""
    step = max(32, step // 32 * 32)
    out = []
    s = 0
    while s < n:
        e = min(n, s + step)
        if n - e < 32:
            e = n
        out.append((s, e))
        s = e
    return out
