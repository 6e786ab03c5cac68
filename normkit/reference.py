"""The NumPy reference backend: the oracle every other backend is tested against, and the backend of last resort.

Written for clarity, not speed: every op is "normalize over the last axis of a float64 view", with statistics
from a two-pass mean/variance in float64 (RMSNorm: the mean of squares in float64). It follows the kernel contract
in :mod:`normkit.contract` exactly.
"""

from __future__ import annotations

import functools

import numpy as np

from . import activation, half
from .contract import ACT_PREFIX, HALF_DTYPES, kernel_table
from .registry import Backend

_CHANNEL = ("forward", "forward_infer", "backward", "backward_infer")
_SPLIT = ("stats", "apply", "backward_reduce", "backward_apply")
_ROW = ("forward", "backward", "add_forward", "add_backward")
_PLAIN = ("forward", "backward")
_ACT, _ACT_PLAIN = (tuple(ACT_PREFIX + d for d in ds) for ds in (_CHANNEL, _PLAIN))
backend = Backend(
    name="reference",
    module="normkit.reference",
    # exactly what KERNELS below implements
    kernels={"batchnorm": _CHANNEL + _SPLIT + _ACT, "instancenorm": _CHANNEL + _ACT,
             "groupnorm": _PLAIN + _ACT_PLAIN, "layernorm": _ROW + _ACT_PLAIN, "rmsnorm": _ROW},
    dtypes=("float32", "float64", "bfloat16", "float16"),
    description="pure NumPy, float64 statistics; the oracle and the fallback",
)


# Every op is expressed through "sets": a float64 view of shape (..., m) whose last axis is one normalized set.
# Channel-indexed weights are broadcast to the same view.

def _set_stats(sets: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    # Two passes on data shifted by each set's first element: as accurate as plain two-pass, and a constant set
    # gets its mean exactly (so y == bias), which plain float64 summation does not guarantee.
    pivot = sets[..., :1]
    pivot = np.where(np.isfinite(pivot), pivot, 0.0)  # an inf pivot would turn a set's mean of inf into NaN
    d = sets - pivot
    d_mean = d.mean(axis=-1, keepdims=True)
    var = np.square(d - d_mean).mean(axis=-1)
    return (pivot + d_mean)[..., 0], 1.0 / np.sqrt(var + eps)


def _affine(xhat: np.ndarray, weight, bias, shape) -> np.ndarray:
    if weight is not None:
        xhat = xhat * weight.astype(np.float64).reshape(shape)
    if bias is not None:
        xhat = xhat + bias.astype(np.float64).reshape(shape)
    return xhat


def _channel_sets(x: np.ndarray) -> np.ndarray:
    """(N, C, S) -> float64 (C, N*S): BatchNorm's sets."""
    return np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)


# --- forward ---------------------------------------------------------------------------------------------------

def batchnorm_forward(x, weight, bias, eps, y, mean, rstd):
    mu, r = _set_stats(_channel_sets(x), eps)
    xhat = (x - mu[None, :, None]) * r[None, :, None]
    y[...] = _affine(xhat, weight, bias, (1, -1, 1))
    mean[...], rstd[...] = mu, r


def groupnorm_forward(x, num_groups, weight, bias, eps, y, mean, rstd):
    n, c, s = x.shape
    sets = x.astype(np.float64).reshape(n, num_groups, -1)
    mu, r = _set_stats(sets, eps)
    xhat = ((sets - mu[..., None]) * r[..., None]).reshape(n, c, s)
    y[...] = _affine(xhat, weight, bias, (1, -1, 1))
    mean[...], rstd[...] = mu, r


def instancenorm_forward(x, weight, bias, eps, y, mean, rstd):
    groupnorm_forward(x, x.shape[1], weight, bias, eps, y, mean, rstd)


def layernorm_forward(x, weight, bias, eps, y, mean, rstd):
    sets = x.astype(np.float64)
    mu, r = _set_stats(sets, eps)
    y[...] = _affine((sets - mu[:, None]) * r[:, None], weight, bias, (1, -1))
    mean[...], rstd[...] = mu, r


def rmsnorm_forward(x, weight, eps, y, rstd):
    sets = x.astype(np.float64)
    r = 1.0 / np.sqrt(np.square(sets).mean(axis=-1) + eps)
    y[...] = _affine(sets * r[:, None], weight, None, (1, -1))
    rstd[...] = r


def channel_forward_infer(x, weight, bias, running_mean, running_var, eps, y):
    mu = running_mean.astype(np.float64)[None, :, None]
    r = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)[None, :, None]
    y[...] = _affine((x.astype(np.float64) - mu) * r, weight, bias, (1, -1, 1))


# --- backward --------------------------------------------------------------------------------------------------

def _set_backward(dy_sets, x_sets, mean, rstd, w_sets):
    """dx for sets (..., m) given per-set mean/rstd (...,) and the weight broadcast to the sets (or None)."""
    xhat = (x_sets - mean[..., None]) * rstd[..., None]
    g = dy_sets if w_sets is None else dy_sets * w_sets
    return rstd[..., None] * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


def _param_grads(dy, xhat, dweight, dbias, axes):
    if dweight is not None:
        dweight[...] = (dy * xhat).sum(axis=axes)
    if dbias is not None:
        dbias[...] = dy.sum(axis=axes)


def batchnorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    n, c, s = x.shape
    dy_sets, x_sets = _channel_sets(dy), _channel_sets(x)
    mu, r = mean.astype(np.float64), rstd.astype(np.float64)
    w_sets = None if weight is None else weight.astype(np.float64)[:, None]
    d = _set_backward(dy_sets, x_sets, mu, r, w_sets)
    dx[...] = np.moveaxis(d.reshape(c, n, s), 0, 1)
    _param_grads(dy_sets, (x_sets - mu[:, None]) * r[:, None], dweight, dbias, axes=1)


def groupnorm_backward(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias):
    n, c, s = x.shape
    dy64, x64 = dy.astype(np.float64), x.astype(np.float64)
    mu, r = mean.astype(np.float64), rstd.astype(np.float64)
    w_sets = None
    if weight is not None:
        w_sets = np.broadcast_to(weight.astype(np.float64)[:, None], (c, s)).reshape(num_groups, -1)[None]
    d = _set_backward(dy64.reshape(n, num_groups, -1), x64.reshape(n, num_groups, -1), mu, r, w_sets)
    dx[...] = d.reshape(n, c, s)
    xhat = ((x64.reshape(n, num_groups, -1) - mu[..., None]) * r[..., None]).reshape(n, c, s)
    _param_grads(dy64, xhat, dweight, dbias, axes=(0, 2))


def instancenorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, dx, dweight, dbias)


def layernorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    dy64, x64 = dy.astype(np.float64), x.astype(np.float64)
    mu, r = mean.astype(np.float64), rstd.astype(np.float64)
    w_sets = None if weight is None else weight.astype(np.float64)[None, :]
    dx[...] = _set_backward(dy64, x64, mu, r, w_sets)
    _param_grads(dy64, (x64 - mu[:, None]) * r[:, None], dweight, dbias, axes=0)


def rmsnorm_backward(dy, x, rstd, weight, dx, dweight):
    dy64, x64, r = dy.astype(np.float64), x.astype(np.float64), rstd.astype(np.float64)[:, None]
    xhat = x64 * r
    g = dy64 if weight is None else dy64 * weight.astype(np.float64)[None, :]
    dx[...] = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    _param_grads(dy64, xhat, dweight, None, axes=0)


def channel_backward_infer(dy, x, mean, rstd, weight, dx, dweight, dbias):
    dy64 = dy.astype(np.float64)
    r = rstd.astype(np.float64)[None, :, None]
    scale = r if weight is None else r * weight.astype(np.float64)[None, :, None]
    dx[...] = dy64 * scale
    xhat = (x.astype(np.float64) - mean.astype(np.float64)[None, :, None]) * r
    _param_grads(dy64, xhat, dweight, dbias, axes=(0, 2))


# --- the split directions (batchnorm) ----------------------------------------------------------------------------

def batchnorm_stats(x, mean, m2):
    sets = _channel_sets(x)
    mu, _ = _set_stats(sets, 0.0)
    # the mean from shifted data, as in _set_stats; m2 by a second pass around it
    mean[...] = mu
    m2[...] = np.square(sets - mu[:, None]).sum(axis=1)


def batchnorm_apply(x, scale, shift, y):
    y[...] = x.astype(np.float64) * scale.astype(np.float64)[None, :, None] + shift.astype(np.float64)[None, :, None]


def batchnorm_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat):
    dy_sets, x_sets = _channel_sets(dy), _channel_sets(x)
    xhat = (x_sets - mean.astype(np.float64)[:, None]) * rstd.astype(np.float64)[:, None]
    sum_dy[...] = dy_sets.sum(axis=1)
    sum_dy_xhat[...] = (dy_sets * xhat).sum(axis=1)


def batchnorm_backward_apply(dy, x, a, b, d, dx):
    per = (lambda v: v.astype(np.float64)[None, :, None])
    dx[...] = per(a) * dy.astype(np.float64) + per(b) * x.astype(np.float64) + per(d)


# --- the fused residual add (row ops): h = x + residual, y = norm(h) ---------------------------------------------

def _add(x, residual, h):
    """h = x + residual, rounded once to h's dtype (what every kernel stores and normalizes)."""
    h[...] = x.astype(np.float64) + residual.astype(np.float64)
    return h


def layernorm_add_forward(x, residual, weight, bias, eps, y, h, mean, rstd):
    layernorm_forward(_add(x, residual, h), weight, bias, eps, y, mean, rstd)


def rmsnorm_add_forward(x, residual, weight, eps, y, h, rstd):
    rmsnorm_forward(_add(x, residual, h), weight, eps, y, rstd)


def _plus(dx, dh):
    if dh is not None:
        dx[...] = dx.astype(np.float64) + dh.astype(np.float64)


def layernorm_add_backward(dy, dh, h, mean, rstd, weight, dx, dweight, dbias):
    # the norm's gradient in float64, plus dh, rounded once
    d = np.empty(dx.shape)
    layernorm_backward(dy, h, mean, rstd, weight, d, dweight, dbias)
    _plus(d, dh)
    dx[...] = d


def rmsnorm_add_backward(dy, dh, h, rstd, weight, dx, dweight):
    d = np.empty(dx.shape)
    rmsnorm_backward(dy, h, rstd, weight, d, dweight)
    _plus(d, dh)
    dx[...] = d


def _quiet(kernel):
    """NaN/inf inputs propagate to NaN outputs by design; NumPy's invalid-value warnings about it are noise."""
    @functools.wraps(kernel)
    def run(*args):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            kernel(*args)
    return run


KERNELS = kernel_table({
    ("batchnorm", "forward"): batchnorm_forward,
    ("batchnorm", "forward_infer"): channel_forward_infer,
    ("batchnorm", "backward"): batchnorm_backward,
    ("batchnorm", "backward_infer"): channel_backward_infer,
    ("batchnorm", "stats"): batchnorm_stats,
    ("batchnorm", "apply"): batchnorm_apply,
    ("batchnorm", "backward_reduce"): batchnorm_backward_reduce,
    ("batchnorm", "backward_apply"): batchnorm_backward_apply,
    ("instancenorm", "forward"): instancenorm_forward,
    ("instancenorm", "forward_infer"): channel_forward_infer,
    ("instancenorm", "backward"): instancenorm_backward,
    ("instancenorm", "backward_infer"): channel_backward_infer,
    ("groupnorm", "forward"): groupnorm_forward,
    ("groupnorm", "backward"): groupnorm_backward,
    ("layernorm", "forward"): layernorm_forward,
    ("layernorm", "backward"): layernorm_backward,
    ("layernorm", "add_forward"): layernorm_add_forward,
    ("layernorm", "add_backward"): layernorm_add_backward,
    ("rmsnorm", "forward"): rmsnorm_forward,
    ("rmsnorm", "backward"): rmsnorm_backward,
    ("rmsnorm", "add_forward"): rmsnorm_add_forward,
    ("rmsnorm", "add_backward"): rmsnorm_add_backward,
}, dtypes=("float32", "float64"))
# the fused activations: the plain kernels above and normkit.activation's functions, in float64
KERNELS.update({(op, d, dtype): activation.compose(KERNELS[(op, d.removeprefix(ACT_PREFIX), dtype)], op, d, exact=True)
                for op, directions in backend.kernels.items() for d in directions if d.startswith(ACT_PREFIX)
                for dtype in ("float32", "float64")})

KERNELS.update({(op, direction, dtype): half.through(KERNELS[(op, direction, "float64")], op, direction, dtype)
                for (op, direction, _) in list(KERNELS) for dtype in HALF_DTYPES})
KERNELS = {key: _quiet(kernel) for key, kernel in KERNELS.items()}
