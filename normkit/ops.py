"""The NumPy frontend: the ops of :data:`normkit.contract.SPECS` on NumPy arrays, with ``torch.nn.functional``'s
signatures. ``forward`` also returns the saved statistics that ``backward`` takes back.

Each call checks its arguments once, reshapes to the kernel's view ((N, C, S) or (M, K)), allocates the outputs
(the large ones 64-byte aligned, :mod:`normkit.alloc`) and calls the kernel. The common case (a C-contiguous
float32/float64 array) takes a short path: a few microseconds of Python on top of the kernel.

16-bit inputs: float16 arrays, and bfloat16 arrays of ``ml_dtypes`` (normkit itself needs ml_dtypes for nothing
else). As PyTorch's CPU kernels, they take weight, bias and running statistics in one dtype, float32 or the
input's (running statistics are updated in their own); the output has the input's dtype, the saved statistics are
float32, and weight / bias gradients have the dtype of weight / bias. The kernels see the data as ``np.uint16``
bit patterns (views, no copy) and everything else as float32 (:mod:`normkit.contract`).

Channels-last: an input of the channel ops whose strides are NHWC (NDHWC, ...), e.g.
``a.transpose(0, 3, 1, 2)`` of a C-contiguous (N, H, W, C) array, goes without a copy to the channels-last kernel as
its (N, S, C) view, and the outputs ``y`` / ``dx`` come back with the same strides (``dx`` follows ``x``; a
``grad_output`` in the other layout is copied). Without a channels-last kernel for the dtype (a backend names its
channels-last dtypes: contract.LAYOUT_DTYPES unless it says more) or the fused activation, a per-channel
direction (BatchNorm's, and the inference ones: contract.OpSpec.per_channel) runs the NCHW kernel on the
(N*S, C, 1) view, without a copy; any other runs the NCHW one on a copy, and the output is still handed back
channels-last. An array that is C-contiguous too (C = 1, or S = 1) takes the NCHW path: the memory is the same.

A torch tensor handed to an op goes to :mod:`normkit.torch`, which never comes back here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import activation as _activation, alloc, checks, recenter, registry
from .alloc import empty as _empty
from .running import numpy_variance, update_from_rstd
from .contract import ACT_PREFIX, HALF_DTYPES, NHWC, SPECS, OpSpec, on_columns, stat_dtype


class UnknownOpError(ValueError):
    """An op name that normkit does not know."""


class Saved(NamedTuple):
    """What forward saves for backward: per-set ``mean`` and ``rstd`` = 1/sqrt(var + eps) (for RMSNorm, which is
    not centered, ``mean`` is None and ``rstd`` = 1/sqrt(mean(x**2) + eps)).

    ``training`` says whether they are batch statistics (gradient flows through them) or running statistics
    (constants). ``backend`` is the backend that computed them.
    """

    mean: np.ndarray
    rstd: np.ndarray
    training: bool
    backend: str


# dtype -> kernel dtype name; a byte-swapped dtype is not a key, so it takes the slow path and is converted.
# bfloat16 (ml_dtypes, which normkit does not import) is added the first time an array of it arrives.
_KERNEL_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
_FLOAT32 = np.dtype(np.float32)


def _is_half(dt: np.dtype) -> bool:
    return dt.itemsize == 2


def _bits(a: np.ndarray) -> np.ndarray:
    """What a kernel gets for a data array: 16-bit values as their uint16 bit patterns (a view), others as they are."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


_STAT_DTYPES: dict = {}  # input dtype -> stat dtype, filled on first use (a dict look-up on every call after)


def _stat_dtype(dt: np.dtype) -> np.dtype:
    """The dtype of the saved statistics (and of the kernels' weight / bias / gradients) for input dtype ``dt``."""
    sdt = _STAT_DTYPES.get(dt)
    if sdt is None:
        sdt = _STAT_DTYPES[dt] = np.dtype(stat_dtype(_KERNEL_DTYPES[dt]))
    return sdt


def _half_params(op: str, x: np.ndarray, **arrays) -> None:
    """For a 16-bit input: the parameters given share one dtype, float32 or the input's (as in PyTorch)."""
    checks.half_params(op, x.dtype.name, {n: np.asarray(a).dtype.name for n, a in arrays.items() if a is not None})


def _grad_dtype(p, x: np.ndarray) -> np.dtype:
    """The dtype of the gradient of weight / bias ``p`` (as given) for input x: that of the parameter."""
    # (by name: a byte-swapped float16 parameter is float16 too; the gradient comes in native order)
    half_param = _is_half(x.dtype) and isinstance(p, np.ndarray) and p.dtype.name == x.dtype.name
    return x.dtype if half_param else _stat_dtype(x.dtype)


# --- NumPy arrays ----------------------------------------------------------------------------------------------

def as_input(op: str, name: str, x, min_ndim: int = 2) -> np.ndarray:
    """A float32/float64/bfloat16/float16, native-byte-order, C-contiguous, element-aligned, non-empty array
    (copied only when needed; never modified)."""
    if type(x) is np.ndarray and x.dtype in _KERNEL_DTYPES and x.ndim >= min_ndim and x.size:
        flags = x.flags
        if flags.c_contiguous and flags.aligned:
            return x
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes)) or x is None:
            raise checks.UnsupportedInputError(f"{op}: {name} must be a float32, float64, bfloat16 or float16 "
                                               f"array, got {checks.describe(x)}")
        x = np.asarray(x)
    checks.unmasked(op, name, x)
    checks.dtype(op, name, x.dtype.name)
    checks.shape(op, name, x.shape, min_ndim)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype.name in HALF_DTYPES:
        _KERNEL_DTYPES.setdefault(x.dtype, x.dtype.name)
    return alloc.kernel_array(x)


_CHANNELS_LAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def channels_last_view(x) -> np.ndarray | None:
    """The C-contiguous (N, S, C) view of a float array of 3 or more dims whose strides are channels-last (dim 1
    the fastest, then the spatial dims in order), or None: for any other array, and for one that is C-contiguous
    too (its NCHW view is the same memory). An array at an address that is no multiple of its element size (a
    view of a byte buffer) gets an aligned copy in the same order, so that its result keeps the layout."""
    if type(x) is not np.ndarray or x.ndim < 3 or x.flags.c_contiguous or not x.size:
        return None
    if x.dtype not in _CHANNELS_LAST_DTYPES:
        if x.dtype.name not in HALF_DTYPES or not x.dtype.isnative:
            return None
        _KERNEL_DTYPES.setdefault(x.dtype, x.dtype.name)
    t = np.moveaxis(x, 1, -1)
    if not t.flags.c_contiguous:
        return None
    return (t if t.flags.aligned else t.copy()).reshape(x.shape[0], -1, x.shape[1])


def _nhwc_output(a: np.ndarray, shape: tuple) -> np.ndarray:
    """An (N, S, C) kernel output as an array of ``shape`` (N, C, *spatial) with channels-last strides."""
    return np.moveaxis(a.reshape(shape[0], *shape[2:], shape[1]), -1, 1)


def _to_nchw(a: np.ndarray) -> np.ndarray:
    """(N, S, C) -> a C-contiguous (N, C, S) copy."""
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def as_param(op: str, name: str, p, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """weight / bias: None, or an array of exactly ``shape`` and the input's dtype (or float32 for a 16-bit input),
    as the kernel takes it (float32 for a 16-bit input)."""
    if p is None:
        return None
    if type(p) is np.ndarray and p.dtype == dtype and p.shape == shape and p.flags.c_contiguous and \
            p.flags.aligned and not _is_half(dtype):
        return p
    if not isinstance(p, np.ndarray):
        p = np.asarray(p)
    checks.unmasked(op, name, p)
    checks.param(op, name, p.shape, p.dtype.newbyteorder("="), shape, dtype)
    if not p.dtype.isnative:
        p = p.astype(p.dtype.newbyteorder("="))
    return alloc.kernel_array(p, _FLOAT32 if _is_half(dtype) else None)


def as_running(op: str, name: str, r, c: int, writable: bool) -> np.ndarray:
    """running_mean / running_var: a float ndarray of shape (C,), updated in place when ``writable``."""
    if not isinstance(r, np.ndarray):
        raise checks.ArgumentTypeError(f"{op}: {name} must be a NumPy array (it is updated in place), got "
                                       f"{checks.describe(r)}")
    checks.unmasked(op, name, r)
    checks.running(op, name, r.shape, r.dtype.kind == "f" or r.dtype.name in HALF_DTYPES, r.dtype, c)
    if writable and not r.flags.writeable:
        raise checks.ArgumentError(f"{op}: {name} is read-only but training updates it in place")
    return r


def _eps(op: str, eps) -> float:
    if type(eps) is float and 0.0 <= eps < math.inf:
        return eps
    return checks.eps(op, eps)


def _grad_output(op: str, dy, x: np.ndarray) -> np.ndarray:
    dy = as_input(op, "grad_output", dy, min_ndim=1)
    if dy.shape != x.shape:
        raise checks.ArgumentError(f"{op}: grad_output must have the input's shape {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise checks.ArgumentTypeError(f"{op}: grad_output must have the input's dtype {x.dtype}, got {dy.dtype}")
    return dy


def _grad_output_nhwc(op: str, dy, x: np.ndarray) -> np.ndarray:
    """grad_output as the (N, S, C) array that goes with a channels-last x (a copy unless it is channels-last)."""
    cl = channels_last_view(dy)
    if cl is not None and dy.shape == x.shape and dy.dtype == x.dtype:
        return cl
    dy = _grad_output(op, dy, x)
    return np.ascontiguousarray(np.moveaxis(dy, 1, -1)).reshape(x.shape[0], -1, x.shape[1])


def _output(a: np.ndarray, shape: tuple, cl) -> np.ndarray:
    """A kernel's y / dx as the input's shape, in its layout (channels-last when ``cl`` is not None)."""
    return a.reshape(shape) if cl is None else _nhwc_output(a, shape)


def _saved(op: str, saved, shape: tuple) -> Saved:
    if not isinstance(saved, Saved):
        raise checks.ArgumentTypeError(f"{op}: saved must be the Saved returned by forward, got "
                                       f"{checks.describe(saved)}")
    if (saved.mean is None) == SPECS[op].centered:  # another op's statistics: rmsnorm saves no mean
        raise checks.ArgumentTypeError(f"{op}: saved {'holds no' if saved.mean is None else 'holds a'} mean; pass "
                                       f"the Saved that this op's forward returned")
    if (saved.mean is not None and saved.mean.shape != shape) or saved.rstd.shape != shape:
        raise checks.ArgumentError(
            f"{op}: saved statistics have shape {saved.rstd.shape}, expected {shape} for this input; "
            f"pass the same arguments to backward as to forward"
        )
    return saved


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


# --- the ops ---------------------------------------------------------------------------------------------------

class Op:
    """A normalization op. Call it like its ``torch.nn.functional`` twin; ``forward``/``backward`` expose the
    saved statistics for code that does its own autograd."""

    spec: OpSpec

    def __init__(self) -> None:
        # plain attributes: read on every call
        self.name, self.aliases, self.grouped = self.spec.name, self.spec.aliases, self.spec.grouped

    # Each op's ``__call__`` spells out ``forward``'s signature (a test holds them equal): called with keywords, a
    # ``__call__(self, x, *args, **kwargs)`` that hands them on costs 0.4 µs more, most of a small call's Python.

    def _torch_function(self):
        """normkit.torch's function of this op: where a torch tensor handed to the NumPy op goes."""
        from . import torch as nk_torch

        return getattr(nk_torch, self.spec.torch_name)

    def __repr__(self) -> str:
        return f"<normkit op {self.name} (aliases: {', '.join(self.aliases)})>"

    def _kernel(self, direction, dtype, backend, nhwc, act=()):
        """(backend, kernel) of the NCHW kernel, or with ``nhwc`` of a channels-last one: a backend's own for the
        dtype, else for a per-channel direction the NCHW kernel on (N*S, C, 1) views (contract.on_columns), else
        None. With ``act`` (an activation's (index, slope)), of the ``act_`` twin of ``direction``."""
        dt = _KERNEL_DTYPES[dtype]
        if nhwc:
            found = registry.lookup(self.name, ACT_PREFIX + direction if act else direction, dt, backend, NHWC)
            if found is not None:
                return found
        if nhwc and not self.spec.per_channel(direction):
            return None
        if act:
            direction = ACT_PREFIX + direction
            found = _activation.kernel(self.name, direction, dt, backend)
        else:
            found = registry.lookup(self.name, direction, dt, backend)
        return (found[0], on_columns(self.spec, direction, found[1])) if nhwc else found

    def _forward(self, x, kshape, groups, weight, bias, eps, backend, nhwc=False, act=()):
        """The training forward kernel on the kernel view of x; returns (y, Saved). With ``nhwc``, x and y are
        (N, S, C) arrays. ``act``: () or a fused activation's (index, slope), the kernel arguments that follow
        eps."""
        if nhwc or act:
            found = self._kernel("forward", x.dtype, backend, nhwc, act)
            if found is None:  # no channels-last kernel: the NCHW one on a copy
                y, saved = self._forward(_to_nchw(x), kshape, groups, weight, bias, eps, backend, act=act)
                return np.ascontiguousarray(y.transpose(0, 2, 1)), saved
        else:  # the common call, without _kernel's frame (this path is most of a small call's cost)
            found = registry.lookup(self.name, "forward", _KERNEL_DTYPES[x.dtype], backend)
        used, kernel = found
        shape = (kshape[0], kshape[2], kshape[1]) if nhwc else kshape
        if x.shape != shape:
            x = x.reshape(shape)
        y = _empty(shape, x.dtype, x.nbytes, (x,))
        stat = self.spec.stat_shape(kshape, groups)
        sdt = _stat_dtype(x.dtype)
        rstd = np.empty(stat, sdt)  # one scalar store per set: alignment is moot
        if not self.spec.centered:
            kernel(_bits(x), weight, eps, _bits(y), rstd)
            return y, Saved(None, rstd, True, used)
        mean = np.empty(stat, sdt)
        if self.grouped:
            kernel(_bits(x), groups, weight, bias, eps, *act, _bits(y), mean, rstd)
        else:
            kernel(_bits(x), weight, bias, eps, *act, _bits(y), mean, rstd)
        return y, Saved(mean, rstd, True, used)

    def _backward(self, dy, x, kshape, groups, saved, weight, bias, backend, grad_dtypes=(None, None), nhwc=False,
                  act=()):
        """The backward kernel matching ``saved`` (training or inference statistics); returns (dx, dw, db), dw and
        db cast to ``grad_dtypes`` where given (a 16-bit parameter's). With ``nhwc``, dy, x and dx are (N, S, C)
        arrays. ``act``: as in :meth:`_forward`."""
        training = isinstance(saved, Saved) and saved.training
        saved = _saved(self.name, saved, self.spec.stat_shape(kshape, groups, training))
        dt = x.dtype
        direction = "backward" if training else "backward_infer"
        found = self._kernel(direction, dt, backend, nhwc, act)
        if found is None:  # no channels-last kernel: the NCHW one on copies
            dx, dweight, dbias = self._backward(_to_nchw(dy), _to_nchw(x), kshape, groups, saved, weight, bias,
                                                backend, grad_dtypes, act=act)
            return np.ascontiguousarray(dx.transpose(0, 2, 1)), dweight, dbias
        kernel = found[1]
        shape = (kshape[0], kshape[2], kshape[1]) if nhwc else kshape
        sdt = _stat_dtype(dt)
        pshape = self.spec.param_shape(kshape)
        dx = _empty(shape, dt, x.nbytes, (x, dy))
        dweight = None if weight is None else _empty(pshape, sdt)
        dbias = None if bias is None else _empty(pshape, sdt)
        rstd = alloc.kernel_array(saved.rstd, sdt)
        mean = alloc.kernel_array(saved.mean, sdt) if self.spec.centered else None
        dy, x = _bits(dy.reshape(shape)), _bits(x.reshape(shape))
        if training and dt == _FLOAT32 and mean is not None and recenter.needed(mean, rstd):
            x, mean = recenter.shifted(self.spec, x, mean, groups, nhwc)
        act = (bias, *act) if act else ()  # the act_ kernels recompute the activation's input, so need the bias
        if not self.spec.centered:
            kernel(dy, x, rstd, weight, _bits(dx), dweight)
        elif self.grouped:
            kernel(dy, x, groups, mean, rstd, weight, *act, _bits(dx), dweight, dbias)
        else:
            kernel(dy, x, mean, rstd, weight, *act, _bits(dx), dweight, dbias)
        dweight, dbias = (g if g is None or to is None or g.dtype == to else g.astype(to)
                          for g, to in zip((dweight, dbias), grad_dtypes))
        return dx, dweight, dbias


class _ChannelOp(Op):
    """batchnorm and instancenorm: per-channel affine, running statistics."""

    def _check(self, x, weight, bias):
        """(x, its (N, S, C) view or None, kshape, weight, bias)."""
        op = self.name
        cl = channels_last_view(x)
        x = x if cl is not None else as_input(op, "input", x)
        n, c = x.shape[:2]  # (each .shape is a new tuple: read once)
        kshape = (n, c, x.size // (n * c))
        if _is_half(x.dtype):
            _half_params(op, x, weight=weight, bias=bias)
        return (x, cl, kshape, as_param(op, "weight", weight, (c,), x.dtype),
                as_param(op, "bias", bias, (c,), x.dtype))

    def _channel_forward(self, x, running_mean, running_var, weight, bias, training, momentum, eps, backend, act):
        op, spec = self.name, self.spec
        if type(training) is not bool:
            training = checks.flag(op, spec.training_flag, training, (np.bool_,))
        weight_in, bias_in = weight, bias
        x, cl, kshape, weight, bias = self._check(x, weight, bias)
        eps = _eps(op, eps)
        c = kshape[1]
        if checks.running_pair(op, running_mean, running_var):
            running_mean = as_running(op, "running_mean", running_mean, c, writable=training)
            running_var = as_running(op, "running_var", running_var, c, writable=training)
            if _is_half(x.dtype):
                _half_params(op, x, weight=weight_in, bias=bias_in, running_mean=running_mean, running_var=running_var)
        if training:
            if not (type(momentum) is float and 0.0 <= momentum <= 1.0):
                momentum = checks.momentum(op, momentum)
            count = spec.set_size(kshape)
            if count < 2:
                checks.stats_count(op, x.shape, per_instance=spec.sets == "instance")  # raises
            if cl is None:
                y, saved = self._forward(x, kshape, None, weight, bias, eps, backend, act=act)
            else:
                y, saved = self._forward(cl, kshape, None, weight, bias, eps, backend, nhwc=True, act=act)
            if running_mean is not None:
                update_from_rstd(running_mean, running_var, saved.mean, saved.rstd, eps, count, momentum,
                                 numpy_variance(x, spec.sets == "instance"))
            return _output(y, x.shape, cl), saved
        if running_mean is None:
            raise checks.missing_running(op, spec.training_flag)
        # copies: Saved must not alias buffers that a later training step updates in place
        sdt = _stat_dtype(x.dtype)
        rm, rv = np.array(running_mean, dtype=sdt), np.array(running_var, dtype=sdt)
        found = self._kernel("forward_infer", x.dtype, backend, cl is not None, act)
        if found is None:  # no channels-last kernel: the NCHW one on a copy
            xk = np.ascontiguousarray(x).reshape(kshape)
            y = _empty(kshape, x.dtype, x.nbytes, (xk,))
            used, kernel = self._kernel("forward_infer", x.dtype, backend, False, act)
            kernel(_bits(xk), weight, bias, rm, rv, eps, *act, _bits(y))
            y = np.ascontiguousarray(y.transpose(0, 2, 1))
        else:
            used, kernel = found
            xk = x.reshape(kshape) if cl is None else cl
            y = _empty(xk.shape, x.dtype, x.nbytes, (xk,))
            kernel(_bits(xk), weight, bias, rm, rv, eps, *act, _bits(y))
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero (or negative) variance: inf / NaN, no warning
            rstd = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(sdt)
        return _output(y, x.shape, cl), Saved(rm, rstd, False, used)

    def _channel_backward(self, grad_output, x, saved, weight, bias, backend, act):
        x, cl, kshape, weight_k, bias_k = self._check(x, weight, bias)
        grad_dtypes = (_grad_dtype(weight, x), _grad_dtype(bias, x))
        if cl is None:
            dy = _grad_output(self.name, grad_output, x)
            dx, dweight, dbias = self._backward(dy, x, kshape, None, saved, weight_k, bias_k, backend, grad_dtypes,
                                                act=act)
        else:
            dy = _grad_output_nhwc(self.name, grad_output, x)
            dx, dweight, dbias = self._backward(dy, cl, kshape, None, saved, weight_k, bias_k, backend, grad_dtypes,
                                                nhwc=True, act=act)
        return _output(dx, x.shape, cl), dweight, dbias


class BatchNorm(_ChannelOp):
    spec = SPECS["batchnorm"]

    def __call__(self, x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, backend=None):
        if type(x) is not np.ndarray and _is_torch(x):
            return self._torch_function()(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                          activation=activation, negative_slope=negative_slope, backend=backend)
        return self._channel_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, backend,
                                     _act(self.name, activation, negative_slope))[0]

    def forward(self, x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, backend=None):
        return self._channel_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, backend,
                                     _act(self.name, activation, negative_slope))

    def backward(self, grad_output, x, saved, running_mean=None, running_var=None, weight=None, bias=None,
                 training=False, momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, backend=None):
        return self._channel_backward(grad_output, x, saved, weight, bias, backend,
                                      _act(self.name, activation, negative_slope))


class InstanceNorm(_ChannelOp):
    spec = SPECS["instancenorm"]

    def __call__(self, x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                 momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, backend=None):
        if type(x) is not np.ndarray and _is_torch(x):
            return self._torch_function()(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                          activation=activation, negative_slope=negative_slope, backend=backend)
        return self._channel_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                     backend, _act(self.name, activation, negative_slope))[0]

    def forward(self, x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, backend=None):
        return self._channel_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                     backend, _act(self.name, activation, negative_slope))

    def backward(self, grad_output, x, saved, running_mean=None, running_var=None, weight=None, bias=None,
                 use_input_stats=True, momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01,
                 backend=None):
        return self._channel_backward(grad_output, x, saved, weight, bias, backend,
                                      _act(self.name, activation, negative_slope))


class GroupNorm(Op):
    spec = SPECS["groupnorm"]

    def __call__(self, x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, negative_slope=0.01,
                 backend=None):
        if type(x) is not np.ndarray and _is_torch(x):
            return self._torch_function()(x, num_groups, weight, bias, eps, activation=activation,
                                          negative_slope=negative_slope, backend=backend)
        return self.forward(x, num_groups, weight, bias, eps, activation=activation, negative_slope=negative_slope,
                            backend=backend)[0]

    def _check(self, x, num_groups, weight, bias):
        op = self.name
        cl = channels_last_view(x)
        x = x if cl is not None else as_input(op, "input", x)
        n, c = x.shape[:2]
        groups = num_groups if type(num_groups) is int and num_groups > 0 and not c % num_groups else \
            checks.num_groups(op, num_groups, c)
        if x.size == groups:  # one value per group in the whole batch, which torch refuses
            checks.group_count(op, x.shape, groups)
        if _is_half(x.dtype):
            _half_params(op, x, weight=weight, bias=bias)
        weight = as_param(op, "weight", weight, (c,), x.dtype)
        bias = as_param(op, "bias", bias, (c,), x.dtype)
        return x, cl, (n, c, x.size // (n * c)), groups, weight, bias

    def forward(self, x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, negative_slope=0.01,
                backend=None):
        act = _act(self.name, activation, negative_slope)
        x, cl, kshape, groups, weight, bias = self._check(x, num_groups, weight, bias)
        eps = _eps(self.name, eps)
        if cl is None:
            y, saved = self._forward(x, kshape, groups, weight, bias, eps, backend, act=act)
        else:
            y, saved = self._forward(cl, kshape, groups, weight, bias, eps, backend, nhwc=True, act=act)
        return _output(y, x.shape, cl), saved

    def backward(self, grad_output, x, saved, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None,
                 negative_slope=0.01, backend=None):
        act = _act(self.name, activation, negative_slope)
        x, cl, kshape, groups, weight_k, bias_k = self._check(x, num_groups, weight, bias)
        grad_dtypes = (_grad_dtype(weight, x), _grad_dtype(bias, x))
        if cl is None:
            dy = _grad_output(self.name, grad_output, x)
            dx, dweight, dbias = self._backward(dy, x, kshape, groups, saved, weight_k, bias_k, backend, grad_dtypes,
                                                act=act)
        else:
            dy = _grad_output_nhwc(self.name, grad_output, x)
            dx, dweight, dbias = self._backward(dy, cl, kshape, groups, saved, weight_k, bias_k, backend, grad_dtypes,
                                                nhwc=True, act=act)
        return _output(dx, x.shape, cl), dweight, dbias


class _RowOp(Op):
    """layernorm and rmsnorm: sets are the rows of the trailing ``normalized_shape``, with elementwise parameters;
    both also have the fused residual add (``add_forward`` / ``add_backward``)."""

    def _check(self, x, normalized_shape, weight, bias=None):
        op = self.name
        if type(x) is np.ndarray and checks.ends_with(x.shape, normalized_shape):
            x = as_input(op, "input", x, min_ndim=len(normalized_shape))  # the short path: a tuple x ends with
        else:
            normalized_shape = checks.normalized_shape(op, normalized_shape)
            x = as_input(op, "input", x, min_ndim=len(normalized_shape))
            checks.trailing(op, x.shape, normalized_shape)
        k = math.prod(normalized_shape)
        if _is_half(x.dtype):
            _half_params(op, x, weight=weight, bias=bias)
        weight = as_param(op, "weight", weight, normalized_shape, x.dtype)
        bias = as_param(op, "bias", bias, normalized_shape, x.dtype)
        if len(normalized_shape) > 1:  # the kernels take them flat
            weight, bias = (None if p is None else p.reshape(k) for p in (weight, bias))
        return x, (x.size // k, k), weight, bias, normalized_shape

    def _eps(self, eps, x):
        return _eps(self.name, eps)

    def _row_forward(self, x, normalized_shape, weight, bias, eps, backend, act=()):
        x, kshape, weight, bias, _ = self._check(x, normalized_shape, weight, bias)
        y, saved = self._forward(x, kshape, None, weight, bias, self._eps(eps, x), backend, act=act)
        return (y if y.shape == x.shape else y.reshape(x.shape)), saved

    def _row_backward(self, grad_output, x, saved, normalized_shape, weight, bias, backend, act=()):
        x, kshape, weight_k, bias_k, shape = self._check(x, normalized_shape, weight, bias)
        dy = _grad_output(self.name, grad_output, x)
        dx, dweight, dbias = self._backward(dy, x, kshape, None, saved, weight_k, bias_k, backend,
                                            (_grad_dtype(weight, x), _grad_dtype(bias, x)), act=act)
        return dx.reshape(x.shape), _unflat(dweight, shape), _unflat(dbias, shape)

    def _add_forward(self, x, residual, normalized_shape, weight, bias, eps, backend):
        """(y, h, Saved) with h = x + residual and y = norm(h): one kernel where the chosen backend has the fused
        add for the dtype, else the sum and then the norm's forward kernel."""
        op, spec = self.name, self.spec
        x, kshape, weight, bias, _ = self._check(x, normalized_shape, weight, bias)
        residual = _same_as(op, "residual", residual, x)
        eps = self._eps(eps, x)
        used, fused = fused_kernel(op, "add_forward", _KERNEL_DTYPES[x.dtype], backend)
        if fused is None:
            h = np.add(x, residual)
            y, saved = self._forward(h, kshape, None, weight, bias, eps, used)
            return y.reshape(x.shape), h, saved
        near = (x, residual)
        y, h = _empty(kshape, x.dtype, x.nbytes, near), _empty(kshape, x.dtype, x.nbytes, near)
        stat, sdt = spec.stat_shape(kshape), _stat_dtype(x.dtype)
        rstd = np.empty(stat, sdt)
        mean = np.empty(stat, sdt) if spec.centered else None
        fused(*spec.kernel_args("add_forward", dict(
            x=_bits(x.reshape(kshape)), residual=_bits(residual.reshape(kshape)), weight=weight, bias=bias, eps=eps,
            y=_bits(y), h=_bits(h), mean=mean, rstd=rstd)))
        return y.reshape(x.shape), h.reshape(x.shape), Saved(mean, rstd, True, used)

    def _add_backward(self, grad_y, grad_h, h, saved, normalized_shape, weight, bias, backend):
        """(dx, dweight, dbias): dx is the gradient of both x and residual, the norm's backward at h plus the
        gradient ``grad_h`` flowing into h (None: none)."""
        op, spec = self.name, self.spec
        given = (weight, bias)  # the parameters as passed: their gradients take their dtype
        h, kshape, weight, bias, shape = self._check(h, normalized_shape, weight, bias)
        grad_dtypes = tuple(_grad_dtype(p, h) for p in given)
        dy = _grad_output(op, grad_y, h)
        dh = None if grad_h is None else _same_as(op, "grad_h", grad_h, h)
        used, fused = fused_kernel(op, "add_backward", _KERNEL_DTYPES[h.dtype], backend)
        if fused is None:
            dx, dweight, dbias = self._backward(dy, h, kshape, None, saved, weight, bias, used, grad_dtypes)
            if dh is not None:
                dx += dh.reshape(kshape)
            return dx.reshape(h.shape), _unflat(dweight, shape), _unflat(dbias, shape)
        saved = _saved(op, saved, spec.stat_shape(kshape))
        sdt = _stat_dtype(h.dtype)
        pshape = spec.param_shape(kshape)
        dx = _empty(kshape, h.dtype, h.nbytes, (h, dy) if dh is None else (h, dy, dh))
        dweight = None if weight is None else _empty(pshape, sdt)
        dbias = None if bias is None else _empty(pshape, sdt)
        mean = None if saved.mean is None else alloc.kernel_array(saved.mean, sdt)
        rstd = alloc.kernel_array(saved.rstd, sdt)
        hk = h.reshape(kshape)
        if h.dtype == _FLOAT32 and mean is not None and recenter.needed(mean, rstd):
            hk, mean = recenter.shifted(spec, hk, mean, None)
        fused(*spec.kernel_args("add_backward", dict(
            dy=_bits(dy.reshape(kshape)), dh=None if dh is None else _bits(dh.reshape(kshape)),
            h=_bits(hk), mean=mean, rstd=rstd, weight=weight,
            dx=_bits(dx), dweight=dweight, dbias=dbias)))
        dweight, dbias = (g if g is None or g.dtype == to else g.astype(to)
                          for g, to in zip((dweight, dbias), grad_dtypes))
        return dx.reshape(h.shape), _unflat(dweight, shape), _unflat(dbias, shape)


def _act(op: str, activation, negative_slope) -> tuple:
    """The kernel arguments of a fused activation: () for none, else (index into ACTIVATIONS, slope)."""
    return () if activation is None else _activation.code(op, activation, negative_slope)


def _unflat(g, shape):
    return None if g is None else g.reshape(shape)


def _same_as(op: str, name: str, a, x: np.ndarray) -> np.ndarray:
    """An array that must have x's shape and dtype (residual, grad_h)."""
    a = as_input(op, name, a, min_ndim=1)
    if a.shape != x.shape:
        raise checks.ArgumentError(f"{op}: {name} must have the input's shape {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise checks.ArgumentTypeError(f"{op}: {name} must have the input's dtype {x.dtype}, got {a.dtype}")
    return a


def fused_kernel(op: str, direction: str, dtype: str, backend):
    """(backend, kernel) for a fused-add direction from the backend that runs the op's plain kernels (the named
    one, or the first in the registry's order), or (that backend, None) when it has no such kernel: then the
    caller composes the plain kernel with a separate add, rather than running another backend's fused kernel."""
    plain = "forward" if direction == "add_forward" else "backward"
    used, _ = registry.lookup(op, plain, dtype, backend)
    try:
        return registry.lookup(op, direction, dtype, used)
    except (ValueError, TypeError):
        return used, None


class LayerNorm(_RowOp):
    spec = SPECS["layernorm"]

    def __call__(self, x, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None, negative_slope=0.01,
                 backend=None):
        if type(x) is not np.ndarray and _is_torch(x):
            return self._torch_function()(x, normalized_shape, weight, bias, eps, activation=activation,
                                          negative_slope=negative_slope, backend=backend)
        return self._row_forward(x, normalized_shape, weight, bias, eps, backend,
                                 _act(self.name, activation, negative_slope))[0]

    def forward(self, x, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None, negative_slope=0.01,
                backend=None):
        return self._row_forward(x, normalized_shape, weight, bias, eps, backend,
                                 _act(self.name, activation, negative_slope))

    def backward(self, grad_output, x, saved, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                 activation=None, negative_slope=0.01, backend=None):
        return self._row_backward(grad_output, x, saved, normalized_shape, weight, bias, backend,
                                  _act(self.name, activation, negative_slope))

    def add_forward(self, x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
        """``(y, h, saved)``: ``h = x + residual`` and ``y = layer_norm(h)``, in one pass where the backend can."""
        return self._add_forward(x, residual, normalized_shape, weight, bias, eps, backend)

    def add_backward(self, grad_y, grad_h, h, saved, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                     backend=None):
        """``(dx, dweight, dbias)`` of :meth:`add_forward`: ``dx`` is the gradient of both x and residual (the
        norm's backward at h plus ``grad_h``, the gradient of h's other uses, or None)."""
        return self._add_backward(grad_y, grad_h, h, saved, normalized_shape, weight, bias, backend)


class RMSNorm(_RowOp):
    """RMSNorm (``torch.nn.functional.rms_norm``): ``y = x / sqrt(mean(x**2) + eps) * weight``; ``eps=None`` is
    the machine epsilon of the type it computes in, as in torch: float32's for 16-bit data. It has no bias:
    backward returns ``(dx, dweight, None)``, the shape of every op's backward."""

    spec = SPECS["rmsnorm"]

    def _eps(self, eps, x):
        if eps is not None:
            return _eps(self.name, eps)
        return float(np.finfo(np.float32 if _is_half(x.dtype) else x.dtype).eps)

    def __call__(self, x, normalized_shape, weight=None, eps=None, *, backend=None):
        if type(x) is not np.ndarray and _is_torch(x):
            return self._torch_function()(x, normalized_shape, weight, eps, backend=backend)
        return self._row_forward(x, normalized_shape, weight, None, eps, backend)[0]

    def forward(self, x, normalized_shape, weight=None, eps=None, *, backend=None):
        return self._row_forward(x, normalized_shape, weight, None, eps, backend)

    def backward(self, grad_output, x, saved, normalized_shape, weight=None, eps=None, *, backend=None):
        return self._row_backward(grad_output, x, saved, normalized_shape, weight, None, backend)

    def add_forward(self, x, residual, normalized_shape, weight=None, eps=None, *, backend=None):
        """``(y, h, saved)``: ``h = x + residual`` and ``y = rms_norm(h)``, in one pass where the backend can."""
        return self._add_forward(x, residual, normalized_shape, weight, None, eps, backend)

    def add_backward(self, grad_y, grad_h, h, saved, normalized_shape, weight=None, eps=None, *, backend=None):
        """``(dx, dweight, None)`` of :meth:`add_forward`; ``dx`` is the gradient of both x and residual."""
        return self._add_backward(grad_y, grad_h, h, saved, normalized_shape, weight, None, backend)


_OPS = {cls.spec.name: cls() for cls in (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm)}
assert tuple(_OPS) == tuple(SPECS), "every op of the table has a NumPy frontend"
_NAMES = {alias: op for op in _OPS.values() for alias in (op.name, *op.aliases)}


def get(name: str) -> Op:
    """The op called ``name`` or one of its aliases (``"gn"``, ``"group_norm"``, ``"groupnorm"``)."""
    try:
        return _NAMES[name.lower()]
    except (KeyError, AttributeError):
        known = ", ".join(f"{op.name} ({', '.join(op.aliases)})" for op in _OPS.values())
        raise UnknownOpError(f"unknown op {name!r}; known ops: {known}") from None


def list_ops() -> tuple[str, ...]:
    return tuple(_OPS)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """``(y, h)`` with ``h = x + residual`` and ``y = layer_norm(h, normalized_shape, weight, bias, eps)``, in one
    pass over memory where the backend has the fused kernel. Torch tensors go to :mod:`normkit.torch`."""
    if type(x) is not np.ndarray and _is_torch(x):
        from . import torch as nk_torch

        return nk_torch.add_layer_norm(x, residual, normalized_shape, weight, bias, eps, backend=backend)
    y, h, _ = _OPS["layernorm"].add_forward(x, residual, normalized_shape, weight, bias, eps, backend=backend)
    return y, h


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, backend=None):
    """``(y, h)`` with ``h = x + residual`` and ``y = rms_norm(h, normalized_shape, weight, eps)``, in one pass
    over memory where the backend has the fused kernel. Torch tensors go to :mod:`normkit.torch`."""
    if type(x) is not np.ndarray and _is_torch(x):
        from . import torch as nk_torch

        return nk_torch.add_rms_norm(x, residual, normalized_shape, weight, eps, backend=backend)
    y, h, _ = _OPS["rmsnorm"].add_forward(x, residual, normalized_shape, weight, eps, backend=backend)
    return y, h
