"""BatchNorm's training step from the split kernels (:mod:`normkit.contract`): statistics and gradient sums that
can be merged across batches or processes before the elementwise passes.

    stats = batchnorm_stats(x)                         # count, float64 mean and m2 per channel
    stats = merge_stats(stats, other)                  # Chan's formula: e.g. after gathering every process's
    rstd = stats.rstd(eps)
    xc, mean = centered(x, stats.mean, rstd)          # float32 data far from zero: shifted by its mean
    y = batchnorm_apply(xc, *apply_coefficients(mean, rstd, weight, bias, x.dtype))

    sum_dy, sum_dy_xhat = batchnorm_backward_reduce(dy, xc, mean, rstd)  # sum these over processes
    a, b, d = backward_coefficients(mean, rstd, weight, sum_dy, sum_dy_xhat, stats.count, x.dtype)
    dx = batchnorm_backward_apply(dy, xc, a, b, d)

:func:`batchnorm_forward` and :func:`batchnorm_backward` compose them for one batch; they equal the fused
``forward``/``backward`` kernels within the conformance kit's tolerances (tests/test_split.py).

Arrays are (N, C, *spatial) of float32 or float64, as for :func:`normkit.get`; per-channel statistics and sums
are float64, the coefficients of the elementwise passes have the data's dtype. ``backend`` picks the kernels'
backend (by default the first in the dispatch order that implements the direction).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import alloc, recenter, registry

__all__ = ["Stats", "apply_coefficients", "backward_coefficients", "batchnorm_apply", "batchnorm_backward",
           "batchnorm_backward_apply", "batchnorm_backward_reduce", "batchnorm_forward", "batchnorm_stats",
           "merge_stats"]

OP = "batchnorm"


@dataclass(frozen=True)
class Stats:
    """Per-channel statistics of ``count`` values each: the mean and m2 (the sum of squared deviations from the
    mean), float64 (C,) arrays."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """The biased (population) variance."""
        return self.m2 / self.count

    def rstd(self, eps: float) -> np.ndarray:
        """``1 / sqrt(var + eps)``, float64."""
        return 1.0 / np.sqrt(self.var + eps)


def merge_stats(a: Stats, b: Stats) -> Stats:
    """The statistics of the union of two disjoint sets of values (Chan, Golub and LeVeque), in float64:
    ``mean = mean_a + delta * n_b / n``, ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``, delta = mean_b - mean_a."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"merge_stats: statistics of {a.mean.shape[0]} and {b.mean.shape[0]} channels")
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Stats(n, mean, m2)


# --- arguments -------------------------------------------------------------------------------------------------

def _view(name: str, a) -> np.ndarray:
    """A C-contiguous (N, C, S) view (or copy) of an (N, C, *spatial) float32/float64 array."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{OP}: {name} must be a NumPy array, got {type(a).__name__}")
    # (not a new dtype object per call where the array's own is native: torch.compile guards the code that traced
    # this on the object's identity, and a later call's new object at a freed address passed that guard)
    native = a.dtype if a.dtype.isnative else a.dtype.newbyteorder("=")
    if native not in (np.float32, np.float64):
        raise TypeError(f"{OP}: {name} must be float32 or float64, got dtype {a.dtype}")
    if a.ndim < 2 or a.size == 0:
        raise ValueError(f"{OP}: {name} must be a non-empty (N, C) or (N, C, *spatial) array, got shape {a.shape}")
    return alloc.kernel_array(a, native).reshape(a.shape[0], a.shape[1], -1)  # byte-swapped or misaligned data: copied


def _pair(dy, x) -> tuple[np.ndarray, np.ndarray]:
    xk = _view("x", x)
    if not isinstance(dy, np.ndarray) or dy.shape != x.shape or dy.dtype.newbyteorder("=") != xk.dtype:
        raise ValueError(f"{OP}: dy must have x's shape {x.shape} and dtype {xk.dtype}, got "
                         f"{getattr(dy, 'shape', None)} {getattr(dy, 'dtype', None)}")
    return _view("dy", dy), xk


def _per_channel(name: str, v, c: int, dtype) -> np.ndarray:
    v = alloc.kernel_array(v, dtype)
    if v.shape != (c,):
        raise ValueError(f"{OP}: {name} must have shape ({c},), got {v.shape}")
    return v


def _kernel(direction: str, dtype, backend: str | None):
    return registry.lookup(OP, direction, np.dtype(dtype).name, backend)[1]


# --- the four kernels ------------------------------------------------------------------------------------------

def batchnorm_stats(x: np.ndarray, backend: str | None = None) -> Stats:
    """Per-channel count, mean and m2 of x over (N, *spatial) (the ``stats`` kernel)."""
    xk = _view("x", x)
    c = xk.shape[1]
    mean, m2 = np.empty(c), np.empty(c)
    _kernel("stats", xk.dtype, backend)(xk, mean, m2)
    return Stats(xk.shape[0] * xk.shape[2], mean, m2)


def batchnorm_apply(x: np.ndarray, scale, shift, backend: str | None = None) -> np.ndarray:
    """``y = x * scale[c] + shift[c]`` (the ``apply`` kernel); scale and shift are cast to x's dtype."""
    xk = _view("x", x)
    c = xk.shape[1]
    scale, shift = _per_channel("scale", scale, c, xk.dtype), _per_channel("shift", shift, c, xk.dtype)
    y = np.empty_like(xk)
    _kernel("apply", xk.dtype, backend)(xk, scale, shift, y)
    return y.reshape(x.shape)


def batchnorm_backward_reduce(dy: np.ndarray, x: np.ndarray, mean, rstd,
                              backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * xhat)``, xhat = (x - mean) * rstd (``backward_reduce``)."""
    dyk, xk = _pair(dy, x)
    c = xk.shape[1]
    mean, rstd = _per_channel("mean", mean, c, np.float64), _per_channel("rstd", rstd, c, np.float64)
    sum_dy, sum_dy_xhat = np.empty(c), np.empty(c)
    _kernel("backward_reduce", xk.dtype, backend)(dyk, xk, mean, rstd, sum_dy, sum_dy_xhat)
    return sum_dy, sum_dy_xhat


def batchnorm_backward_apply(dy: np.ndarray, x: np.ndarray, a, b, d, backend: str | None = None) -> np.ndarray:
    """``dx = a[c] * dy + b[c] * x + d[c]`` (the ``backward_apply`` kernel); a, b, d are cast to x's dtype."""
    dyk, xk = _pair(dy, x)
    c = xk.shape[1]
    a, b, d = (_per_channel(n, v, c, xk.dtype) for n, v in (("a", a), ("b", b), ("d", d)))
    dx = np.empty_like(xk)
    _kernel("backward_apply", xk.dtype, backend)(dyk, xk, a, b, d, dx)
    return dx.reshape(x.shape)


# --- the coefficients (the contract's docstring), in float64 ---------------------------------------------------

def centered(x: np.ndarray, mean, rstd) -> tuple[np.ndarray, np.ndarray]:
    """``(x - m, mean - m)``, m the float32 mean per channel, for float32 data far from zero (a channel's mean more
    than :data:`normkit.recenter.OFFSET` of its standard deviations from it); else ``(x, mean)``. Hand the
    coefficients and the elementwise passes these: y and dx are the same functions of the shifted data and mean,
    and the float32 coefficients no longer cancel. ``x * scale + shift`` with ``|shift|`` about ``|mean| * scale``
    errs by half a float32 unit of ``|mean| * scale`` (1.5e-4 of y's scale at mean 1e4 and std 1); on the shifted
    data (exact for x within a factor 2 of m) by units of y. Costs one pass over the data, only for such calls.
    ``x``: (N, C, *spatial); ``mean``, ``rstd``: per channel."""
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32):  # (the kernels' checks name what else it is)
        return x, mean
    mean, rstd = np.asarray(mean, np.float64), np.asarray(rstd, np.float64)
    if not recenter.needed(mean, rstd):
        return x, mean
    m = mean.astype(np.float32)
    return x - m.reshape((1, -1) + (1,) * (x.ndim - 2)), mean - m


def apply_coefficients(mean, rstd, weight=None, bias=None, dtype=np.float32,
                       var=None) -> tuple[np.ndarray, np.ndarray]:
    """``scale = weight * rstd`` and ``shift = bias - mean * scale`` in ``dtype`` (the shift from the scale as
    rounded to ``dtype``). ``x * scale + shift`` then errs by the shift's rounding, half a unit of ``|mean| *
    scale``: for a set whose every value is its mean (``var``, the sets' variances, 0 there: a batch of one sample,
    a constant channel) the scale is 0, so that y is the bias exactly, as ``(x - mean) * scale`` gives it. Not
    where the scale is not finite (eps 0 there: rstd is inf), where ``(x - mean) * scale`` is 0 * inf, NaN, as in
    torch and tf_keras."""
    mean, rstd = np.asarray(mean, np.float64), np.asarray(rstd, np.float64)
    scale = rstd if weight is None else np.asarray(weight, np.float64) * rstd
    if var is not None:
        scale = np.where((np.asarray(var) == 0) & np.isfinite(scale), 0.0, scale)
    scale = scale.astype(dtype)
    shift = -mean * scale.astype(np.float64)
    if bias is not None:
        shift = shift + np.asarray(bias, np.float64)
    return scale, shift.astype(dtype)


def backward_coefficients(mean, rstd, weight, sum_dy, sum_dy_xhat, count: int,
                          dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a, b, d of ``dx = a * dy + b * x + d`` for the training-mode BatchNorm gradient (the contract's docstring):
    ``a = w * rstd``, ``b = -w * rstd**2 * sum_dy_xhat / count``, ``d = -a * sum_dy / count - b * mean`` (with b as
    rounded to ``dtype``). ``count`` is the number of values behind the sums (N * S, summed over processes)."""
    mean, rstd = np.asarray(mean, np.float64), np.asarray(rstd, np.float64)
    w = 1.0 if weight is None else np.asarray(weight, np.float64)
    a = w * rstd
    b = (-a * rstd * np.asarray(sum_dy_xhat, np.float64) / count).astype(dtype)
    d = -a * np.asarray(sum_dy, np.float64) / count - b.astype(np.float64) * mean
    return a.astype(dtype), b, d.astype(dtype)


# --- one batch -------------------------------------------------------------------------------------------------

def _params(c: int, **params) -> None:
    """weight / bias of a C-channel input: None or of shape (C,)."""
    for name, p in params.items():
        if p is not None and np.shape(p) != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},) to match the input's {c} channels, got "
                             f"{np.shape(p)}")


def batchnorm_forward(x: np.ndarray, weight=None, bias=None, eps: float = 1e-5,
                      backend: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode BatchNorm from ``stats`` and ``apply``: ``(y, mean, rstd)``, mean and rstd float64."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{OP}: eps must be a number, got {eps!r} ({type(eps).__name__})")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{OP}: eps must be a finite number >= 0, got {eps!r}")
    stats = batchnorm_stats(x, backend)
    _params(x.shape[1], weight=weight, bias=bias)
    rstd = stats.rstd(eps)
    xc, centre = centered(x, stats.mean, rstd)
    scale, shift = apply_coefficients(centre, rstd, weight, bias, x.dtype, stats.var)
    return batchnorm_apply(xc, scale, shift, backend), stats.mean, rstd


def batchnorm_backward(dy: np.ndarray, x: np.ndarray, mean, rstd, weight=None,
                       backend: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training-mode BatchNorm gradient from ``backward_reduce`` and ``backward_apply``: ``(dx, dweight,
    dbias)``, dweight and dbias in x's dtype (as the fused backward's)."""
    xc, centre = centered(x, mean, rstd)
    sum_dy, sum_dy_xhat = batchnorm_backward_reduce(dy, xc, centre, rstd, backend)
    _params(x.shape[1], weight=weight)
    count = x.shape[0] * math.prod(x.shape[2:])
    a, b, d = backward_coefficients(centre, rstd, weight, sum_dy, sum_dy_xhat, count, x.dtype)
    dx = batchnorm_backward_apply(dy, xc, a, b, d, backend)
    return dx, sum_dy_xhat.astype(dx.dtype), sum_dy.astype(dx.dtype)
