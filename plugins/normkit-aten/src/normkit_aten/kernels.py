"""The aten backend's kernels: normkit's kernel contract mapped onto PyTorch's native normalization ops.

Inputs are handed to torch as zero-copy views (``torch.from_numpy``); aten allocates its results, which are then
copied into the output arrays normkit gave us. Instance norm is group norm with one channel per group; the
inference directions of batch and instance norm are both aten's eval-mode batch norm, which is the same formula.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from normkit.contract import kernel_table

aten = torch.ops.aten

# No set_num_threads: aten's kernels run on torch's thread count, which is the user's (torch.set_num_threads) and
# shared with the rest of the process; a backend never changes it (plugins/README.md).
INFO = {"torch": torch.__version__, "threads": "torch's"}


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    """A tensor sharing ``a``'s memory. torch warns about read-only arrays because a tensor could write to
    them; these views are only read, so the warning is noise."""
    if a is None:
        return None
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _store(dst: np.ndarray | None, src: torch.Tensor) -> None:
    if dst is not None:
        torch.from_numpy(dst).copy_(src.reshape(dst.shape))


def _mask(dx, dweight, dbias) -> list[bool]:
    return [dx is not None, dweight is not None, dbias is not None]


def batchnorm_forward(x, weight, bias, eps, y, mean, rstd):
    out, save_mean, save_invstd = aten.native_batch_norm(_t(x), _t(weight), _t(bias), None, None, True, 0.0, eps)
    _store(y, out)
    _store(mean, save_mean)
    _store(rstd, save_invstd)


def channel_forward_infer(x, weight, bias, running_mean, running_var, eps, y):
    out = aten.native_batch_norm(_t(x), _t(weight), _t(bias), _t(running_mean), _t(running_var), False, 0.0, eps)[0]
    _store(y, out)


def batchnorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    grads = aten.native_batch_norm_backward(
        _t(dy), _t(x), _t(weight), None, None, _t(mean), _t(rstd), True, 0.0, _mask(dx, dweight, dbias)
    )
    for dst, src in zip((dx, dweight, dbias), grads):
        _store(dst, src)


def channel_backward_infer(dy, x, mean, rstd, weight, dx, dweight, dbias):
    # aten's eval-mode backward takes the running variance and eps; with eps = 0 and var = 1/rstd^2 it uses
    # 1/sqrt(var) = rstd (to a rounding or two). 1/rstd^2 is formed in float64 so that it cannot overflow there.
    var = (1.0 / np.square(rstd.astype(np.float64))).astype(rstd.dtype)
    grads = aten.native_batch_norm_backward(
        _t(dy), _t(x), _t(weight), _t(mean), torch.from_numpy(var), None, None, False, 0.0,
        _mask(dx, dweight, dbias),
    )
    for dst, src in zip((dx, dweight, dbias), grads):
        _store(dst, src)


def groupnorm_forward(x, num_groups, weight, bias, eps, y, mean, rstd):
    n, c, s = x.shape
    out, save_mean, save_rstd = aten.native_group_norm(_t(x), _t(weight), _t(bias), n, c, s, num_groups, eps)
    _store(y, out)
    _store(mean, save_mean)
    _store(rstd, save_rstd)


def groupnorm_backward(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias):
    n, c, s = x.shape
    # a bias without a weight: aten's CPU kernel cannot give the bias gradient alone ("tensor does not have a
    # device"), and a weight of ones leaves dx as it is
    w = torch.ones(c, dtype=_t(x).dtype) if weight is None and dbias is not None else _t(weight)
    grads = aten.native_group_norm_backward(
        _t(dy), _t(x), _t(mean), _t(rstd), w, n, c, s, num_groups, _mask(dx, dweight, dbias)
    )
    for dst, src in zip((dx, dweight, dbias), grads):
        _store(dst, src)


def instancenorm_forward(x, weight, bias, eps, y, mean, rstd):
    groupnorm_forward(x, x.shape[1], weight, bias, eps, y, mean, rstd)


def instancenorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, dx, dweight, dbias)


def layernorm_forward(x, weight, bias, eps, y, mean, rstd):
    out, save_mean, save_rstd = aten.native_layer_norm(_t(x), [x.shape[1]], _t(weight), _t(bias), eps)
    _store(y, out)
    _store(mean, save_mean)
    _store(rstd, save_rstd)


def layernorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    m, k = x.shape
    # aten reads the bias only for the shape of its gradient, and needs it when that gradient is wanted
    bias_like = None if dbias is None else torch.empty(k, dtype=_t(x).dtype)
    grads = aten.native_layer_norm_backward(
        _t(dy), _t(x), [k], _t(mean).view(m, 1), _t(rstd).view(m, 1), _t(weight), bias_like,
        _mask(dx, dweight, dbias),
    )
    for dst, src in zip((dx, dweight, dbias), grads):
        _store(dst, src)


KERNELS = kernel_table({
    ("batchnorm", "forward"): batchnorm_forward,
    ("batchnorm", "forward_infer"): channel_forward_infer,
    ("batchnorm", "backward"): batchnorm_backward,
    ("batchnorm", "backward_infer"): channel_backward_infer,
    ("instancenorm", "forward"): instancenorm_forward,
    ("instancenorm", "forward_infer"): channel_forward_infer,
    ("instancenorm", "backward"): instancenorm_backward,
    ("instancenorm", "backward_infer"): channel_backward_infer,
    ("groupnorm", "forward"): groupnorm_forward,
    ("groupnorm", "backward"): groupnorm_backward,
    ("layernorm", "forward"): layernorm_forward,
    ("layernorm", "backward"): layernorm_backward,
})
