"""The four ops: argument checks, (N, C, S) reshaping, output allocation, running statistics, dispatch.

This is the NumPy frontend and the one place where op semantics live. Signatures follow
``torch.nn.functional``; ``forward`` also returns the saved statistics that ``backward`` takes back.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from . import registry
from .contract import DTYPES


class UnknownOpError(ValueError):
    """An op name that normkit does not know."""


class Saved(NamedTuple):
    """What forward saves for backward: per-set ``mean`` and ``rstd`` = 1/sqrt(var + eps).

    ``training`` says whether they are batch statistics (gradient flows through them) or running statistics
    (constants). ``backend`` is the backend that computed them.
    """

    mean: np.ndarray
    rstd: np.ndarray
    training: bool
    backend: str


# --- argument checks -------------------------------------------------------------------------------------------

def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


# Checks on metadata (shape tuples, dtype names), shared by the NumPy and PyTorch frontends so that both accept
# and reject the same arguments with the same messages.

def check_dtype(op: str, name: str, dtype_name: str) -> None:
    if dtype_name not in DTYPES:
        hint = ("; normkit has no half-precision kernels, cast to float32"
                if dtype_name in ("float16", "bfloat16") else "")
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {dtype_name}{hint}")


def check_shape(op: str, name: str, shape: tuple, min_ndim: int = 2) -> None:
    if len(shape) < min_ndim:
        want = "(N, C) or (N, C, *spatial)" if min_ndim == 2 else f"at least {min_ndim} dims"
        raise ValueError(f"{op}: {name} must have shape {want}, got shape {tuple(shape)}")
    if math.prod(shape) == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(shape)}); there is nothing to normalize")


def check_param(op: str, name: str, shape: tuple, dtype, want_shape: tuple, want_dtype) -> None:
    """weight / bias: exactly ``want_shape`` and the input's dtype."""
    if dtype != want_dtype:
        raise TypeError(f"{op}: {name} must have the input's dtype {want_dtype}, got {dtype}")
    if tuple(shape) != tuple(want_shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(want_shape)}, got {tuple(shape)}")


def check_running(op: str, name: str, shape: tuple, is_float: bool, dtype, c: int) -> None:
    """running_mean / running_var: a float vector of the input's C channels (any float dtype)."""
    if not is_float:
        raise TypeError(f"{op}: {name} must be a float array, got dtype {dtype}")
    if tuple(shape) != (c,):
        raise ValueError(f"{op}: {name} must have shape ({c},) to match the input's {c} channels, "
                         f"got {tuple(shape)}")


def check_running_pair(op: str, running_mean, running_var) -> bool:
    """Whether running statistics were given: both or neither."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    return running_mean is not None


def missing_running(op: str, flag: str) -> ValueError:
    return ValueError(f"{op}: {flag}=False normalizes with running_mean and running_var, and none were given; "
                      f"pass them, or {flag}=True to use the input's statistics")


def stats_count(op: str, shape: tuple, per_instance: bool) -> int:
    """How many values each batch statistic is computed from (batchnorm: N*S, instancenorm: S); at least 2,
    since the running variance is unbiased."""
    spatial = math.prod(shape[2:])
    if per_instance:
        if spatial < 2:
            raise ValueError(f"{op}: expected more than 1 spatial element when using input statistics, got "
                             f"input of shape {tuple(shape)}")
        return spatial
    count = shape[0] * spatial
    if count < 2:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(shape)}")
    return count


def check_num_groups(op: str, num_groups, c: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise ValueError(f"{op}: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must divide the number of channels C={c}")
    return int(num_groups)


def check_normalized_shape(op: str, normalized_shape) -> tuple:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        normalized_shape = tuple(int(d) for d in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: normalized_shape must be an int or a tuple of ints, got "
                        f"{_describe(normalized_shape)}") from None
    if not normalized_shape or min(normalized_shape) < 1:
        raise ValueError(f"{op}: normalized_shape must be a non-empty tuple of positive ints, got "
                         f"{normalized_shape}")
    return normalized_shape


def check_trailing(op: str, shape: tuple, normalized_shape: tuple) -> None:
    if tuple(shape[len(shape) - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"{op}: input of shape {tuple(shape)} does not end with normalized_shape "
                         f"{normalized_shape}")


# --- NumPy arrays ----------------------------------------------------------------------------------------------

def as_input(op: str, name: str, x, min_ndim: int = 2) -> np.ndarray:
    """A float32/float64, native-byte-order, C-contiguous array (copied only when needed; never modified)."""
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{op}: {name} must be a float32 or float64 array, got {_describe(x)}")
        x = np.asarray(x)
    check_dtype(op, name, x.dtype.name)
    check_shape(op, name, x.shape, min_ndim)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return np.ascontiguousarray(x)


def as_param(op: str, name: str, p, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """weight / bias: None, or an array of exactly ``shape`` and the input's dtype."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        p = np.asarray(p)
    check_param(op, name, p.shape, p.dtype.newbyteorder("="), shape, dtype)
    if not p.dtype.isnative:
        p = p.astype(p.dtype.newbyteorder("="))
    return np.ascontiguousarray(p)


def as_running(op: str, name: str, r, c: int, writable: bool) -> np.ndarray:
    """running_mean / running_var: a float ndarray of shape (C,), updated in place when ``writable``."""
    if not isinstance(r, np.ndarray):
        raise TypeError(f"{op}: {name} must be a NumPy array (it is updated in place), got {_describe(r)}")
    check_running(op, name, r.shape, r.dtype.kind == "f", r.dtype, c)
    if writable and not r.flags.writeable:
        raise ValueError(f"{op}: {name} is read-only but training updates it in place")
    return r


def check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(op: str, momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


def _running_pair(op, running_mean, running_var, c, writable):
    if not check_running_pair(op, running_mean, running_var):
        return None, None
    return (as_running(op, "running_mean", running_mean, c, writable),
            as_running(op, "running_var", running_var, c, writable))


def _check_grad_output(op: str, dy, x: np.ndarray) -> np.ndarray:
    dy = as_input(op, "grad_output", dy, min_ndim=1)
    if dy.shape != x.shape:
        raise ValueError(f"{op}: grad_output must have the input's shape {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: grad_output must have the input's dtype {x.dtype}, got {dy.dtype}")
    return dy


def _check_saved(op: str, saved, shape: tuple) -> Saved:
    if not isinstance(saved, Saved):
        raise TypeError(f"{op}: saved must be the Saved returned by forward, got {_describe(saved)}")
    if saved.mean.shape != shape or saved.rstd.shape != shape:
        raise ValueError(
            f"{op}: saved statistics have shape {saved.mean.shape}, expected {shape} for this input; "
            f"pass the same arguments to backward as to forward"
        )
    return saved


def _update_running(running_mean, running_var, batch_mean, batch_rstd, eps, count, momentum):
    """PyTorch's convention: running = (1 - momentum) * running + momentum * batch, unbiased batch variance.

    ``batch_mean``/``batch_rstd`` have the channel as their last axis; leading axes (instances) are averaged.
    The biased variance is recovered from rstd in float64; it is clamped at 0 because rounding of rstd can make
    1/rstd^2 - eps slightly negative when var << eps.
    """
    var = np.maximum(1.0 / np.square(batch_rstd.astype(np.float64)) - eps, 0.0) * (count / (count - 1))
    mean = batch_mean.astype(np.float64)
    if mean.ndim == 2:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var + momentum * var


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


# --- the ops ---------------------------------------------------------------------------------------------------

class Op:
    """A normalization op. Call it like its ``torch.nn.functional`` twin; ``forward``/``backward`` expose the
    saved statistics for code that does its own autograd."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    torch_name: str = ""  # the normkit.torch function a torch tensor is handed to

    def __call__(self, x, *args, **kwargs):
        if _is_torch(x):
            from . import torch as nk_torch

            return getattr(nk_torch, self.torch_name)(x, *args, **kwargs)
        return self.forward(x, *args, **kwargs)[0]

    def __repr__(self) -> str:
        return f"<normkit op {self.name} (aliases: {', '.join(self.aliases)})>"

    def _run(self, direction, dtype, backend, *args) -> str:
        name, kernel = registry.lookup(self.name, direction, dtype.name, backend)
        kernel(*args)
        return name


class BatchNorm(Op):
    name, aliases, torch_name = "batchnorm", ("bn", "batch_norm"), "batch_norm"

    def forward(self, x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5, *, backend=None):
        return _channel_forward(self, x, running_mean, running_var, weight, bias, training, momentum, eps,
                                backend, per_instance=False)

    def backward(self, grad_output, x, saved, running_mean=None, running_var=None, weight=None, bias=None,
                 training=False, momentum=0.1, eps=1e-5, *, backend=None):
        return _channel_backward(self, grad_output, x, saved, weight, bias, backend, per_instance=False)


class InstanceNorm(Op):
    name, aliases, torch_name = "instancenorm", ("in", "instance_norm"), "instance_norm"

    def forward(self, x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                momentum=0.1, eps=1e-5, *, backend=None):
        return _channel_forward(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                backend, per_instance=True)

    def backward(self, grad_output, x, saved, running_mean=None, running_var=None, weight=None, bias=None,
                 use_input_stats=True, momentum=0.1, eps=1e-5, *, backend=None):
        return _channel_backward(self, grad_output, x, saved, weight, bias, backend, per_instance=True)


def _channel_forward(op_obj, x, running_mean, running_var, weight, bias, training, momentum, eps, backend,
                     per_instance):
    """Forward of batchnorm (statistics per channel) and instancenorm (per sample and channel)."""
    op = op_obj.name
    x = as_input(op, "input", x)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    eps = check_eps(op, eps)
    weight = as_param(op, "weight", weight, (c,), x.dtype)
    bias = as_param(op, "bias", bias, (c,), x.dtype)
    running_mean, running_var = _running_pair(op, running_mean, running_var, c, writable=training)
    y = np.empty_like(x3)
    if training:
        momentum = check_momentum(op, momentum)
        count = stats_count(op, x.shape, per_instance)
        stats_shape = (n, c) if per_instance else (c,)
        mean, rstd = np.empty(stats_shape, x.dtype), np.empty(stats_shape, x.dtype)
        used = op_obj._run("forward", x.dtype, backend, x3, weight, bias, eps, y, mean, rstd)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, rstd, eps, count, momentum)
        return y.reshape(x.shape), Saved(mean, rstd, True, used)
    if running_mean is None:
        raise missing_running(op, "use_input_stats" if per_instance else "training")
    # copies: Saved must not alias buffers that a later training step updates in place
    rm, rv = np.array(running_mean, dtype=x.dtype), np.array(running_var, dtype=x.dtype)
    used = op_obj._run("forward_infer", x.dtype, backend, x3, weight, bias, rm, rv, eps, y)
    rstd = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(x.dtype)
    return y.reshape(x.shape), Saved(rm, rstd, False, used)


def _channel_backward(op_obj, grad_output, x, saved, weight, bias, backend, per_instance):
    """Backward of batchnorm and instancenorm: the saved statistics say which kernel applies."""
    op = op_obj.name
    x = as_input(op, "input", x)
    dy = _check_grad_output(op, grad_output, x)
    n, c = x.shape[:2]
    x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    weight = as_param(op, "weight", weight, (c,), x.dtype)
    bias = as_param(op, "bias", bias, (c,), x.dtype)
    training = isinstance(saved, Saved) and saved.training
    saved = _check_saved(op, saved, (n, c) if per_instance and training else (c,))
    dx = np.empty_like(x3)
    dweight = None if weight is None else np.empty(c, x.dtype)
    dbias = None if bias is None else np.empty(c, x.dtype)
    mean = np.ascontiguousarray(saved.mean, dtype=x.dtype)
    rstd = np.ascontiguousarray(saved.rstd, dtype=x.dtype)
    direction = "backward" if training else "backward_infer"
    op_obj._run(direction, x.dtype, backend, dy3, x3, mean, rstd, weight, dx, dweight, dbias)
    return dx.reshape(x.shape), dweight, dbias


class GroupNorm(Op):
    name, aliases, torch_name = "groupnorm", ("gn", "group_norm"), "group_norm"

    def _check(self, x, num_groups, weight, bias):
        op = self.name
        x = as_input(op, "input", x)
        n, c = x.shape[:2]
        num_groups = check_num_groups(op, num_groups, c)
        weight = as_param(op, "weight", weight, (c,), x.dtype)
        bias = as_param(op, "bias", bias, (c,), x.dtype)
        return x, x.reshape(n, c, -1), num_groups, weight, bias

    def forward(self, x, num_groups, weight=None, bias=None, eps=1e-5, *, backend=None):
        x, x3, g, weight, bias = self._check(x, num_groups, weight, bias)
        eps = check_eps(self.name, eps)
        y = np.empty_like(x3)
        mean, rstd = np.empty((x.shape[0], g), x.dtype), np.empty((x.shape[0], g), x.dtype)
        used = self._run("forward", x.dtype, backend, x3, g, weight, bias, eps, y, mean, rstd)
        return y.reshape(x.shape), Saved(mean, rstd, True, used)

    def backward(self, grad_output, x, saved, num_groups, weight=None, bias=None, eps=1e-5, *, backend=None):
        x, x3, g, weight, bias = self._check(x, num_groups, weight, bias)
        dy = _check_grad_output(self.name, grad_output, x)
        saved = _check_saved(self.name, saved, (x.shape[0], g))
        c = x.shape[1]
        dx = np.empty_like(x3)
        dweight = None if weight is None else np.empty(c, x.dtype)
        dbias = None if bias is None else np.empty(c, x.dtype)
        mean = np.ascontiguousarray(saved.mean, dtype=x.dtype)
        rstd = np.ascontiguousarray(saved.rstd, dtype=x.dtype)
        self._run("backward", x.dtype, backend, dy.reshape(x3.shape), x3, g, mean, rstd, weight, dx, dweight, dbias)
        return dx.reshape(x.shape), dweight, dbias


class LayerNorm(Op):
    name, aliases, torch_name = "layernorm", ("ln", "layer_norm"), "layer_norm"

    def _check(self, x, normalized_shape, weight, bias):
        op = self.name
        normalized_shape = check_normalized_shape(op, normalized_shape)
        x = as_input(op, "input", x, min_ndim=len(normalized_shape))
        check_trailing(op, x.shape, normalized_shape)
        weight = as_param(op, "weight", weight, normalized_shape, x.dtype)
        bias = as_param(op, "bias", bias, normalized_shape, x.dtype)
        size = math.prod(normalized_shape)
        flat = lambda p: None if p is None else p.reshape(size)  # noqa: E731
        return x, x.reshape(-1, size), flat(weight), flat(bias), normalized_shape

    def forward(self, x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
        x, x2, weight, bias, _ = self._check(x, normalized_shape, weight, bias)
        eps = check_eps(self.name, eps)
        y = np.empty_like(x2)
        mean, rstd = np.empty(x2.shape[0], x.dtype), np.empty(x2.shape[0], x.dtype)
        used = self._run("forward", x.dtype, backend, x2, weight, bias, eps, y, mean, rstd)
        return y.reshape(x.shape), Saved(mean, rstd, True, used)

    def backward(self, grad_output, x, saved, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                 backend=None):
        x, x2, weight, bias, shape = self._check(x, normalized_shape, weight, bias)
        dy = _check_grad_output(self.name, grad_output, x)
        saved = _check_saved(self.name, saved, (x2.shape[0],))
        dx = np.empty_like(x2)
        dweight = None if weight is None else np.empty(x2.shape[1], x.dtype)
        dbias = None if bias is None else np.empty(x2.shape[1], x.dtype)
        mean = np.ascontiguousarray(saved.mean, dtype=x.dtype)
        rstd = np.ascontiguousarray(saved.rstd, dtype=x.dtype)
        self._run("backward", x.dtype, backend, dy.reshape(x2.shape), x2, mean, rstd, weight, dx, dweight, dbias)
        unflat = lambda g: None if g is None else g.reshape(shape)  # noqa: E731
        return dx.reshape(x.shape), unflat(dweight), unflat(dbias)


_OPS = {cls.name: cls() for cls in (BatchNorm, LayerNorm, InstanceNorm, GroupNorm)}
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
