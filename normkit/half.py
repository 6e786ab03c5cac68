"""The 16-bit formats in NumPy: bit patterns (``np.uint16``, the kernels' storage) to and from float values.

:func:`widen` is exact. :func:`narrow` rounds once, to nearest even, from float32 or float64 values: a float64
value goes through float32 rounded to odd (toward zero, then the last bit set when inexact), which keeps enough bits
for the second rounding to equal a direct one. NaN stays a quiet NaN; beyond the range gives +-inf.

NumPy has float16; bfloat16 arrays need ``ml_dtypes`` (an optional dependency), asked for only by
:func:`numpy_dtype`.
"""

from __future__ import annotations

import functools

import numpy as np

from .contract import HALF_DTYPES, OUTPUTS, SPECS, arg_dtype

_BF16_QUIET = np.uint32(0x0040)


def numpy_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a normkit dtype name (``bfloat16`` is ``ml_dtypes.bfloat16``)."""
    if dtype != "bfloat16":
        return np.dtype(dtype)
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("NumPy arrays of dtype bfloat16 need the ml_dtypes package: pip install ml_dtypes") \
            from None
    return np.dtype(ml_dtypes.bfloat16)


def _check(dtype: str) -> None:
    if dtype not in HALF_DTYPES:
        raise ValueError(f"expected a 16-bit dtype ({', '.join(HALF_DTYPES)}), got {dtype!r}")


def widen(bits: np.ndarray, dtype: str, to=np.float64) -> np.ndarray:
    """The values of 16-bit patterns ``bits`` of format ``dtype``, exactly, as ``to`` (float32 or float64)."""
    _check(dtype)
    bits = np.asarray(bits, np.uint16)
    with np.errstate(invalid="ignore"):  # a signalling NaN pattern stays a NaN
        if dtype == "float16":
            return bits.view(np.float16).astype(to)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(to, copy=False)


def _f32_round_to_odd(v: np.ndarray) -> np.ndarray:
    """float64 -> float32 bits, rounded to odd: truncated toward zero, with the last bit set when inexact."""
    f = v.astype(np.float32)
    bits = f.view(np.uint32).copy()
    bits[np.abs(f.astype(np.float64)) > np.abs(v)] -= np.uint32(1)  # one step toward zero (inf -> the max)
    bits[(bits.view(np.float32).astype(np.float64) != v) & ~np.isnan(v)] |= np.uint32(1)
    return bits


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` (float32 or float64) rounded once to the 16-bit format ``dtype``, as ``np.uint16`` patterns."""
    _check(dtype)
    values = np.asarray(values)
    if values.ndim == 0:  # NumPy's operators give a 0-d array's result as a scalar, which cannot be assigned into
        return narrow(values.reshape(1), dtype).reshape(())
    with np.errstate(over="ignore", invalid="ignore"):
        if values.dtype == np.float64:
            u = _f32_round_to_odd(values)
        else:
            u = np.asarray(values, np.float32).view(np.uint32)
        if dtype == "float16":
            return u.view(np.float32).astype(np.float16).view(np.uint16)
        rounded = (u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = rounded.astype(np.uint16)
        nan = np.isnan(u.view(np.float32))
        out[nan] = ((u[nan] >> 16) | _BF16_QUIET).astype(np.uint16)
        return out


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of the 16-bit format ``dtype`` at ``|values|`` (float64): the gap to the next larger value of
    the binade that holds them (the smallest subnormal step below the normal range; inf and NaN give NaN)."""
    _check(dtype)
    mant, emin = (10, -14) if dtype == "float16" else (7, -126)
    a = np.abs(np.asarray(values, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(np.where((a > 0) & np.isfinite(a), e, emin), emin)
    return np.where(np.isfinite(a), np.ldexp(1.0, (e - mant).astype(np.int64)), np.nan)


def rounded_sum(x: np.ndarray, residual: np.ndarray, dtype: str) -> np.ndarray:
    """``x + residual`` (float32 or float64 values of the 16-bit format ``dtype``) rounded once to ``dtype``, as
    values of their float type: the ``h`` that a fused residual add stores and normalizes (see the contract)."""
    return widen(narrow(x + residual, dtype), dtype, x.dtype)


def through(kernel, op: str, direction: str, dtype: str, work=np.float64):
    """A 16-bit ``direction`` kernel of ``op`` from a float64 or float32 one (``work``): the data arrays (uint16
    patterns) widened exactly to ``work``, each 16-bit output computed in ``work`` and rounded once. The other
    arguments pass through (float32, as the contract gives them to 16-bit kernels). The reference is made this
    way; a compiled backend uses it (with ``work=np.float32``) for ops that have no native 16-bit loops, at the
    cost of the widened copies. A fused add's ``work`` kernel is given h rounded to 16 bits as its x and a zero
    residual, so that it normalizes the rounded h, as the contract asks."""
    names = SPECS[op].args(direction)
    at = [(i, name in OUTPUTS[direction]) for i, name in enumerate(names) if arg_dtype(direction, name, dtype) == dtype]
    adds = (names.index("x"), names.index("residual")) if direction == "add_forward" else None

    def run(*args):
        args, rounds = list(args), []
        for i, is_output in at:
            if args[i] is None:  # an optional argument (add_backward's dh)
                continue
            if is_output:
                rounds.append((args[i], np.empty(args[i].shape, work)))
                args[i] = rounds[-1][1]
            else:
                args[i] = widen(args[i], dtype, work)
        if adds:
            ix, ir = adds
            args[ix], args[ir] = rounded_sum(args[ix], args[ir], dtype), np.zeros_like(args[ir])
        kernel(*args)
        for out, values in rounds:
            out[...] = narrow(values, dtype)

    return functools.wraps(kernel)(run)
