"""One fused CPU pass for the GTA combine (weight, sign election, disjoint merge, ÷, ·λ, + base).

Why: with per-model weights ≠ 1 the TIES sign election depends on the trial's coefficients, so it runs on
every trial. In torch ops it is ~10 full passes over the N stacked task vectors (≈14 ns/entry for N=4 on
this CPU); this numba kernel reads each τ_i, its packed trim bit and the base once (≈ a task-arithmetic
trial's bytes) and writes the merged weight once.

Exactness: per entry it performs the very float32 operations of :func:`~searchmerge.methods.task_arithmetic.
generalized_task_arithmetic` on the sparsified inputs, in the same order — ``τ·mask`` (``x·0`` keeps the sign
of zero), the sparsifier's rescale (``÷d`` or ``·c``), ``·w_i``, the sequential sum over models (what torch's
``sum(dim=0)`` does for a stack), ``sign(v_i) == elected``, ``v_i·agree``, ``Σ w_i·agree``, ``÷``, ``·λ``,
``+ base`` — with no fast-math, so no reassociation or fused multiply-add. Tests compare bit for bit with
the merge core. Only CPU tensors take this path; other devices use the chunked torch ops.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

try:  # numba is a dependency; the guard keeps the torch path usable where it is absent (e.g. a bare GPU box)
    import numba

    from searchmerge.store.kernels_support import load
except ImportError:  # pragma: no cover
    numba = None

NONE, DIV, MUL = 0, 1, 2
CONSENSUS = {None: 0, "sum": 1, "count": 2}
MERGE_FUNC = {"sum": 0, "mean": 1, "max": 2}

_EMPTY_BITS = np.zeros(0, dtype=np.uint8)
BLOCK = 1 << 12  # entries per block: the (N, BLOCK) float32 scratch stays in L1/L2


def available() -> bool:
    return numba is not None


if numba is not None:
    @numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
    def _combine_block(vals, bits, has_bits, op_code, op_val, weights, bit_start, consensus, merge_func,
                       mean_divisor, lam, base, out, lo, hi):  # pragma: no cover - compiled
        # loops run over entries innermost (contiguous, branch-free), so LLVM vectorises them
        # slices, not offset indexing: indices known non-negative let LLVM drop wraparound checks and vectorise
        n = len(vals)
        m = hi - lo
        zero = np.float32(0.0)
        one = np.float32(1.0)
        mone = np.float32(-1.0)
        v = np.empty((n, m), dtype=np.float32)
        b0 = (bit_start + lo) >> 3  # bit_start and lo are multiples of 8
        for i in range(n):  # v_i = op_i(τ_i · mask_i) · w_i
            x = vals[i][lo:hi]
            vi = v[i]
            w = weights[i]
            if has_bits[i]:
                bi = bits[i][b0 : b0 + ((m + 7) >> 3)]
                for j in range(m):
                    vi[j] = load(x, j) * np.float32((bi[j >> 3] >> (7 - (j & 7))) & 1)
            else:
                for j in range(m):
                    vi[j] = load(x, j)
            if op_code[i] == DIV:
                d = op_val[i]
                for j in range(m):
                    vi[j] = vi[j] / d
            elif op_code[i] == MUL:
                c = op_val[i]
                for j in range(m):
                    vi[j] = vi[j] * c
            for j in range(m):
                vi[j] = vi[j] * w
        merged = v[0].copy()
        if consensus == 0:
            for i in range(1, n):
                vi = v[i]
                for j in range(m):
                    merged[j] = merged[j] + vi[j]
            if merge_func == 1:
                for j in range(m):
                    merged[j] = merged[j] / mean_divisor
        else:
            s = np.empty(m, dtype=np.float32)  # the election mass: Σ v_i, or Σ sign(v_i) for "count"
            for j in range(m):
                s[j] = merged[j] if consensus == 1 else np.float32(np.sign(merged[j]))
            for i in range(1, n):
                vi = v[i]
                if consensus == 1:
                    for j in range(m):
                        s[j] = s[j] + vi[j]
                else:
                    for j in range(m):
                        s[j] = s[j] + np.float32(np.sign(vi[j]))
            sg = np.empty(m, dtype=np.float32)  # the elected sign
            for j in range(m):
                sg[j] = one if s[j] >= zero else mone
            # agree_i = sign(v_i) == elected  <=>  v_i·elected > 0 (exact: ·±1); zeros and NaN never agree.
            # Branch-free loops over entries, one per model, so they vectorise.
            if merge_func == 2:
                for i in range(n):
                    vi = v[i]
                    for j in range(m):
                        k = abs(vi[j] * np.float32(vi[j] * sg[j] > zero))
                        merged[j] = k if i == 0 or k > merged[j] else merged[j]
                for j in range(m):
                    merged[j] = merged[j] * sg[j]
            else:
                div = np.empty(m, dtype=np.float32)
                w = weights[0]
                for j in range(m):
                    ag = np.float32(merged[j] * sg[j] > zero)
                    merged[j] = merged[j] * ag
                    div[j] = w * ag
                for i in range(1, n):
                    vi = v[i]
                    w = weights[i]
                    for j in range(m):
                        ag = np.float32(vi[j] * sg[j] > zero)
                        merged[j] = merged[j] + vi[j] * ag
                        div[j] = div[j] + w * ag
                if merge_func == 1:
                    for j in range(m):
                        merged[j] = merged[j] / (one if div[j] == zero else div[j])
        o = out[lo:hi]
        b = base[lo:hi]
        for j in range(m):
            o[j] = b[j] + merged[j] * lam

    @numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
    def _combine_serial(vals, bits, has_bits, op_code, op_val, weights, bit_start, consensus, merge_func,
                        mean_divisor, lam, base, out, block):  # pragma: no cover - compiled
        m = len(out)
        for lo in range(0, m, block):
            _combine_block(vals, bits, has_bits, op_code, op_val, weights, bit_start, consensus, merge_func,
                           mean_divisor, lam, base, out, lo, min(m, lo + block))


def as_kernel_array(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view the kernel reads: float32 as is, bfloat16 as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _f32(x: float | torch.Tensor) -> np.float32:
    """A scalar rounded to float32 as torch rounds a Python float (or 0-dim tensor) operand of an fp32 op."""
    if isinstance(x, torch.Tensor):
        return np.float32(x.to(torch.float32).item())
    return np.float32(x)


def fused_combine_into(
    vals: Sequence[np.ndarray],
    bits: Sequence[np.ndarray | None],
    ops: Sequence[tuple],
    weights: Sequence[float],
    *,
    bit_start: int,
    consensus: str | None,
    merge_func: str,
    lambda_: float,
    base: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out = base + λ·combine(op_i(vals_i·bits_i))`` for flat float32 arrays of one length, in one pass.

    ``vals`` are all float32, or all bfloat16 bit patterns as uint16 (widened exactly inside the pass).

    ``bits[i]`` is a big-endian packed keep-mask of the whole flat tensor (``None``: all kept) and
    ``bit_start`` the flat index of ``vals[i][0]`` in it; ``ops[i]`` is ``("none",)``, ``("div", d)`` or
    ``("mul", c)``.
    """
    assert numba is not None
    n = len(vals)
    w32 = np.asarray(list(weights), dtype=np.float32)
    total = float(sum(weights))
    mean_divisor = np.float32(total if abs(total) >= 1e-8 else 1.0)
    has_bits = np.array([b is not None for b in bits], dtype=np.bool_)
    codes = np.array([{"none": NONE, "div": DIV, "mul": MUL}[op[0]] for op in ops], dtype=np.int8)
    opv = np.array([_f32(op[1]) if op[0] != "none" else 1.0 for op in ops], dtype=np.float32)
    args = (tuple(vals), tuple(b if b is not None else _EMPTY_BITS for b in bits), has_bits, codes, opv, w32,
            np.int64(bit_start), CONSENSUS[consensus], MERGE_FUNC[merge_func], mean_divisor, _f32(lambda_), base, out)
    assert n > 0 and all(len(x) == len(out) for x in vals) and len(base) == len(out) and bit_start % 8 == 0
    _combine_serial(*args, np.int64(BLOCK))


# --- task arithmetic: one pass, generated per number of models --------------------------------------------
#
# A weighted sum has no data-dependent steps, so one pass over all N inputs per entry vectorises (≈1.5x faster
# than chunked torch ops, which re-read a partial sum N times). A loop over a run-time number of inputs per
# entry does not, so the source is generated per N, written once to a cache folder (atomically, named by its
# hash) and imported, which lets numba's on-disk cache serve later processes (each compiles an N once, ~1 s).

_TA_SOURCE = '''"""Generated by searchmerge.store.kernels (task arithmetic, {n} models); do not edit."""
import numba
import numpy as np
from searchmerge.store.kernels_support import load


@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def weighted_sum({xs}, w, div, lam, base, out):
{ws}    for j in range(len(out)):
        out[j] = base[j] + ({chain} / div) * lam
'''


def weighted_sum_source(n: int) -> str:
    """``out = base + ((((x0·w0 + x1·w1) + x2·w2) + …) ÷ div)·λ``: the order of ``weighted_sum_into`` (÷1 is exact)."""
    chain = "load(x0, j) * w0"
    for i in range(1, n):
        chain = f"({chain} + load(x{i}, j) * w{i})"
    return _TA_SOURCE.format(n=n, xs=", ".join(f"x{i}" for i in range(n)),
                             ws="".join(f"    w{i} = w[{i}]\n" for i in range(n)), chain=chain)


def _cache_dir() -> Path:
    root = os.environ.get("SEARCHMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "searchmerge")
    return Path(root) / "kernels"


@lru_cache(maxsize=None)
def _generated(kind: str, n: int) -> Callable[..., None]:
    src = weighted_sum_source(n)
    # numba's cache does not see edits to imported helpers: hash them into the module name too
    support = Path(__file__).with_name("kernels_support.py").read_bytes()
    name = f"searchmerge_{kind}_n{n}_{hashlib.sha1(src.encode() + support).hexdigest()[:12]}"
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.py"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # numba's cache resolves the function's module by name
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, kind)
    except OSError:  # pragma: no cover - no writable cache folder: compile in memory
        namespace: dict[str, Any] = {}
        exec(compile(src.replace("cache=True", "cache=False"), name, "exec"), namespace)
        return namespace[kind]


MAX_SUM_MODELS = 64  # more inputs take the torch path (the generated source grows with N)


def weighted_sum_into(
    vals: Sequence[np.ndarray], weights: Sequence[float], *, mean: bool, lambda_: float, base: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out = base + λ·Σ w_i·vals_i`` (÷ Σw for ``mean``) in one pass; the bits of ``stages.weighted_sum_into``.

    ``vals`` are float32 or bfloat16 bit patterns as uint16; ``base`` and ``out`` float32, all one length.
    """
    assert numba is not None
    n = len(vals)
    if not 0 < n <= MAX_SUM_MODELS or len(base) != len(out) or any(len(x) != len(out) for x in vals):
        raise ValueError(f"weighted_sum_into: bad shapes ({n} inputs).")
    total = float(sum(weights))
    div = (total if abs(total) >= 1e-8 else 1.0) if mean else 1.0
    w32 = np.asarray(list(weights), dtype=np.float32)
    _generated("weighted_sum", n)(*vals, w32, np.float32(div), _f32(lambda_), base, out)
