"""Compiled helpers that the generated combine kernels (:mod:`searchmerge.store.kernels`) import.

``load(x, j)`` reads entry ``j`` as float32: float32 arrays as they are; bfloat16 carried as uint16 bit
patterns widened exactly (a bfloat16 is the high half of a float32, so the widening is a shift and a bit cast).
``absbits(x, j)`` is the uint32 bit pattern of ``|load(x, j)|``: for finite values it orders like ``|x|`` (the
order statistics of :mod:`searchmerge.store.ranks` compare these integers instead of floats).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload, register_jitable


@intrinsic
def _bits_to_float32(typingctx, bits):  # noqa: ANN001, ARG001
    """Reinterpret a uint32 as float32 (no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _float32_to_bits(typingctx, value):  # noqa: ANN001, ARG001
    """Reinterpret a float32 as uint32 (no conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ARG001
        return builder.bitcast(args[0], ir.IntType(32))

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


def absbits(x, j):  # noqa: ANN001
    """The bit pattern of ``|x[j]|`` widened to float32, as uint32 (pure-Python reference)."""
    if x.dtype == np.uint16:
        return np.uint32((int(x[j]) & 0x7FFF) << 16)
    return np.uint32(int(np.asarray(x[j], dtype=np.float32).view(np.uint32)) & 0x7FFFFFFF)


@overload(absbits, inline="always")
def _absbits_impl(x, j):  # noqa: ANN001
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        def widen(x, j):  # noqa: ANN001
            return (np.uint32(x[j]) & np.uint32(0x7FFF)) << np.uint32(16)

        return widen
    if isinstance(x, types.Array) and x.dtype == types.float32:
        def bits(x, j):  # noqa: ANN001
            return _float32_to_bits(x[j]) & np.uint32(0x7FFFFFFF)

        return bits
    return None


_U = np.uint32
_MIX = np.uint32(0x45D9F3B)
_S16 = np.uint32(16)
_S8 = np.uint32(8)


@register_jitable(inline="always")
def _mix32(x):  # noqa: ANN001, ANN202
    x = _U(_U((x >> _S16) ^ x) * _MIX)
    x = _U(_U((x >> _S16) ^ x) * _MIX)
    return _U((x >> _S16) ^ x)


@register_jitable(inline="always")
def counter24(k1, k2, j):  # noqa: ANN001, ANN202
    """Entry ``j``'s 24-bit draw of the mask keyed (k1, k2): ``searchmerge.methods.sparsify.counter_draws``'s integers,
    in uint32 arithmetic (a sum's or product's low 32 bits are the int64 result masked to 32 bits)."""
    return _U(_mix32(_U(_U(_U(j & 0xFFFFFFFF) + _U(k2 ^ _U(j >> 32))) ^ k1)) >> _S8)


@register_jitable(inline="always")
def counter24u(k1, k2, ju):  # noqa: ANN001, ANN202
    """:func:`counter24` for an entry index below 2**32, as a uint32 (``j >> 32`` is 0): a loop's uint32 induction
    variable vectorises 16 lanes wide where the int64 index's split into halves runs 8 wide (≈10% of a DELLA pass)."""
    return _U(_mix32(_U(_U(ju + k2) ^ k1)) >> _S8)
