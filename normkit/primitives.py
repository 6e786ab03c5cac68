"""The two primitives TensorFlow users know: ``tf.nn.moments`` and ``tf.nn.batch_normalization``."""

from __future__ import annotations

import numbers

import numpy as np

from . import checks, half
from .contract import HALF_DTYPES


def _float_array(fn: str, name: str, a) -> np.ndarray:
    checks.unmasked(fn, name, a)
    a = np.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name not in HALF_DTYPES:  # ml_dtypes' bfloat16 is not of kind "f"
        raise TypeError(f"{fn}: {name} must be a float array, got dtype {a.dtype}")
    return a


def _rounded(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 values in ``dtype``, rounded once (a float64 -> bfloat16 cast would round twice, via float32)."""
    if dtype.name in HALF_DTYPES:
        return half.narrow(values, dtype.name).view(dtype)
    with np.errstate(over="ignore"):  # a variance beyond the dtype's range is inf there, as it must be
        return values.astype(dtype)


def moments(x, axes, keepdims: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x`` over ``axes`` (like ``tf.nn.moments``).

    Two passes accumulated in float64 (never E[x^2] - E[x]^2), returned in ``x``'s dtype (rounded once, also to
    float16 or ml_dtypes' bfloat16).
    For BatchNorm statistics of an NCHW batch use ``axes=(0, 2, 3)``; of an (N, C) batch ``axes=[0]``.
    ``axes=[]`` reduces nothing: the mean is x and the variance 0, both of x's shape, as NumPy's reductions over
    ``axis=()`` (``tf.nn.moments`` also squeezes every dimension of size 1 there).
    """
    x = _float_array("moments", "x", x)
    if isinstance(axes, numbers.Integral):
        axes = (axes,)
    try:
        if isinstance(axes, (str, bytes)):
            raise TypeError
        axes = tuple(axes)
        if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes):
            raise TypeError  # (int() would truncate 1.7 to 1)
        axes = tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise TypeError(f"moments: axes must be an int or a sequence of ints, got {axes!r}") from None
    for a in axes:
        if not -x.ndim <= a < x.ndim:
            raise ValueError(f"moments: axis {a} is out of range for x with {x.ndim} dims")
    axes = tuple(a % x.ndim for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"moments: axes {axes} contain a repeated axis")
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"moments: x of shape {x.shape} has no elements along axes {axes}")
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=keepdims)
    if not keepdims:
        mean = mean.reshape(var.shape)
    return _rounded(mean, x.dtype), _rounded(var, x.dtype)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon):
    """``(x - mean) / sqrt(variance + variance_epsilon) * scale + offset``, broadcasting like
    ``tf.nn.batch_normalization``. ``offset``/``scale`` may be None. Computed in float64, returned in x's dtype."""
    x = _float_array("batch_normalization", "x", x)
    eps = variance_epsilon
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:  # (NaN too)
        raise ValueError(f"batch_normalization: variance_epsilon must be a number >= 0, got {variance_epsilon!r}")
    terms = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    arrays = {k: None if v is None else _float_array("batch_normalization", k, v).astype(np.float64)
              for k, v in terms.items()}
    for k, v in arrays.items():
        if v is not None:
            try:
                np.broadcast_shapes(v.shape, x.shape)
            except ValueError:
                raise ValueError(f"batch_normalization: {k} of shape {v.shape} does not broadcast against x of "
                                 f"shape {x.shape}") from None
    y = (x.astype(np.float64) - arrays["mean"]) / np.sqrt(arrays["variance"] + float(variance_epsilon))
    if arrays["scale"] is not None:
        y = y * arrays["scale"]
    if arrays["offset"] is not None:
        y = y + arrays["offset"]
    return _rounded(y, x.dtype)
