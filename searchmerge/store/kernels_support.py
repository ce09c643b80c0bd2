"""Compiled helpers that the generated combine kernels (:mod:`searchmerge.store.kernels`) import.

``load(x, j)`` reads entry ``j`` as float32: float32 arrays as they are; bfloat16 carried as uint16 bit
patterns widened exactly (a bfloat16 is the high half of a float32, so the widening is a shift and a bit cast).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload


@intrinsic
def _bits_to_float32(typingctx, bits):  # noqa: ANN001, ARG001
    """Reinterpret a uint32 as float32 (no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def load(x, j):  # noqa: ANN001
    """Entry ``j`` of ``x`` as float32 (pure-Python reference; compiled code uses the overload below)."""
    if x.dtype == np.uint16:
        return (np.asarray(x[j], dtype=np.uint32) << np.uint32(16)).view(np.float32)[()]
    return np.float32(x[j])


@overload(load, inline="always")
def _load_impl(x, j):  # noqa: ANN001
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        def widen(x, j):  # noqa: ANN001
            return _bits_to_float32(np.uint32(x[j]) << np.uint32(16))

        return widen
    if isinstance(x, types.Array) and x.dtype == types.float32:
        def read(x, j):  # noqa: ANN001
            return x[j]

        return read
    return None
