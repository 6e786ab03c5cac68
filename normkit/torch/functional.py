"""The functional ops, with the signatures of ``torch.nn.functional`` (plus ``backend=``).

Each op is a ``torch.library.custom_op`` in the ``normkit::`` namespace (forward and backward are separate custom
ops, both with a fake implementation), so autograd and ``torch.compile`` see them as single operators. The kernels
get NumPy views of the tensors' own memory: inputs are made contiguous (a copy only when they are not), outputs
are allocated by torch and handed to the kernel to write into.

Running statistics are updated here in the Python wrapper, with torch operations, and not inside the custom op:
torch refuses ``register_autograd`` on an op that declares ``mutates_args``, and the update is a handful of
elementwise operations on (C,) vectors that ``torch.compile`` traces like any other.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops, registry

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm"]


# --- helpers ---------------------------------------------------------------------------------------------------

def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor(op: str, name: str, t, optional: bool = True) -> Optional[Tensor]:
    """Type and device checks done before anything else, in the wrapper (the custom op never sees a non-CPU
    tensor: its only kernel is the CPU one, and torch's own error for a missing CUDA kernel is obscure)."""
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{op}: {name} is on device {t.device}; normkit's kernels run on the CPU only "
                         f"(move it with .cpu())")
    return t


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _np(t: Optional[Tensor]):
    """A NumPy view of a contiguous CPU tensor's memory (detach() is a view too: the kernel runs below autograd)."""
    return None if t is None else t.detach().numpy()


def _run(op: str, direction: str, x: Tensor, backend: Optional[str], *args) -> None:
    registry.lookup(op, direction, _dtype(x), backend)[1](*args)


def _check_input(op: str, x: Tensor, min_ndim: int = 2) -> None:
    ops.check_dtype(op, "input", _dtype(x))
    ops.check_shape(op, "input", x.shape, min_ndim)


def _check_params(op: str, x: Tensor, shape: tuple, **params) -> None:
    for name, p in params.items():
        if p is not None:
            ops.check_param(op, name, p.shape, _dtype(p), shape, _dtype(x))


def _check_running(op: str, x: Tensor, running_mean, running_var) -> bool:
    if not ops.check_running_pair(op, running_mean, running_var):
        return False
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        ops.check_running(op, name, r.shape, r.is_floating_point(), _dtype(r), x.shape[1])
    return True


def _check_backward(op: str, dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, stats_shape: tuple) -> None:
    if dy.shape != x.shape:
        raise ValueError(f"{op}: grad_output must have the input's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: grad_output must have the input's dtype {_dtype(x)}, got {_dtype(dy)}")
    for name, s in (("mean", mean), ("rstd", rstd)):
        if tuple(s.shape) != tuple(stats_shape) or s.dtype != x.dtype:
            raise ValueError(f"{op}: saved {name} must have shape {tuple(stats_shape)} and dtype {_dtype(x)}, got "
                             f"{tuple(s.shape)} and {_dtype(s)}; pass what forward returned")


def _grads(x: Tensor, shape: tuple, weight_grad: bool, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias; a gradient that is not wanted is an empty tensor (custom ops cannot return None)."""
    return (x.new_empty(x.shape), x.new_empty(shape if weight_grad else (0,)),
            x.new_empty(shape if bias_grad else (0,)))


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, rstd: Tensor, eps: float, count: int,
                    momentum: float) -> None:
    """torch.nn's convention, the same arithmetic as the NumPy frontend: running = (1 - momentum) * running +
    momentum * batch, with the unbiased batch variance recovered from rstd in float64 (clamped at 0: rounding
    of rstd can make 1/rstd^2 - eps slightly negative when var << eps). Per-instance statistics (instance_norm,
    shape (N, C)) are averaged over the instances first."""
    with torch.no_grad():
        var = (rstd.double().pow(-2) - eps).clamp_min(0.0) * (count / (count - 1))
        mean = mean.double()
        if mean.dim() == 2:
            mean, var = mean.mean(0), var.mean(0)
        running_mean.copy_((1.0 - momentum) * running_mean.double() + momentum * mean)
        running_var.copy_((1.0 - momentum) * running_var.double() + momentum * var)


# --- batchnorm and instancenorm: (N, C, S) with per-channel affine ---------------------------------------------

def _check_channel(op, per_instance, x, weight, bias, running_mean, running_var, batch_stats, eps):
    _check_input(op, x)
    _check_params(op, x, (x.shape[1],), weight=weight, bias=bias)
    ops.check_eps(op, eps)
    if batch_stats:
        ops.stats_count(op, x.shape, per_instance)
    elif not _check_running(op, x, running_mean, running_var):
        raise ops.missing_running(op, "use_input_stats" if per_instance else "training")
    n, c = x.shape[:2]
    return (n, c) if per_instance and batch_stats else (c,)


def _channel_forward(op, per_instance, x, weight, bias, running_mean, running_var, batch_stats, eps, backend):
    _check_channel(op, per_instance, x, weight, bias, running_mean, running_var, batch_stats, eps)
    x, weight, bias = _contiguous(x), _contiguous(weight), _contiguous(bias)
    n, c = x.shape[:2]
    y = x.new_empty(x.shape)
    x3, y3 = _np(x).reshape(n, c, -1), _np(y).reshape(n, c, -1)
    if batch_stats:
        shape = (n, c) if per_instance else (c,)
        mean, rstd = x.new_empty(shape), x.new_empty(shape)
        _run(op, "forward", x, backend, x3, _np(weight), _np(bias), eps, y3, _np(mean), _np(rstd))
        return y, mean, rstd
    # fresh tensors: outputs may not alias inputs, and the running stats change at the next training step
    mean = x.new_empty(c).copy_(running_mean)
    var = x.new_empty(c).copy_(running_var)
    _run(op, "forward_infer", x, backend, x3, _np(weight), _np(bias), _np(mean), _np(var), eps, y3)
    return y, mean, (var.double() + eps).rsqrt().to(x.dtype)


def _channel_forward_fake(op, per_instance, x, weight, bias, running_mean, running_var, batch_stats, eps, backend):
    shape = _check_channel(op, per_instance, x, weight, bias, running_mean, running_var, batch_stats, eps)
    return x.new_empty(x.shape), x.new_empty(shape), x.new_empty(shape)


def _channel_backward(op, per_instance, dy, x, mean, rstd, weight, batch_stats, weight_grad, bias_grad, backend):
    n, c = x.shape[:2]
    _check_input(op, x)
    _check_params(op, x, (c,), weight=weight)
    _check_backward(op, dy, x, mean, rstd, (n, c) if per_instance and batch_stats else (c,))
    dy, x, mean, rstd, weight = map(_contiguous, (dy, x, mean, rstd, weight))
    dx, dw, db = _grads(x, (c,), weight_grad, bias_grad)
    direction = "backward" if batch_stats else "backward_infer"
    _run(op, direction, x, backend, _np(dy).reshape(n, c, -1), _np(x).reshape(n, c, -1), _np(mean), _np(rstd),
         _np(weight), _np(dx).reshape(n, c, -1), _np(dw) if weight_grad else None, _np(db) if bias_grad else None)
    return dx, dw, db


def _channel_backward_fake(op, per_instance, dy, x, mean, rstd, weight, batch_stats, weight_grad, bias_grad,
                           backend):
    n, c = x.shape[:2]
    _check_input(op, x)
    _check_backward(op, dy, x, mean, rstd, (n, c) if per_instance and batch_stats else (c,))
    return _grads(x, (c,), weight_grad, bias_grad)


@torch.library.custom_op("normkit::batch_norm", mutates_args=(), device_types="cpu")
def _batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, eps: float,
                backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_forward("batchnorm", False, input, weight, bias, running_mean, running_var, training, eps,
                            backend)


@_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, training, eps, backend):
    return _channel_forward_fake("batchnorm", False, input, weight, bias, running_mean, running_var, training, eps,
                                 backend)


@torch.library.custom_op("normkit::batch_norm_backward", mutates_args=(), device_types="cpu")
def _batch_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                         training: bool, weight_grad: bool, bias_grad: bool,
                         backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_backward("batchnorm", False, grad_output, input, mean, rstd, weight, training, weight_grad,
                             bias_grad, backend)


@_batch_norm_backward.register_fake
def _(grad_output, input, mean, rstd, weight, training, weight_grad, bias_grad, backend):
    return _channel_backward_fake("batchnorm", False, grad_output, input, mean, rstd, weight, training, weight_grad,
                                  bias_grad, backend)


@torch.library.custom_op("normkit::instance_norm", mutates_args=(), device_types="cpu")
def _instance_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], use_input_stats: bool, eps: float,
                   backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_forward("instancenorm", True, input, weight, bias, running_mean, running_var, use_input_stats,
                            eps, backend)


@_instance_norm.register_fake
def _(input, weight, bias, running_mean, running_var, use_input_stats, eps, backend):
    return _channel_forward_fake("instancenorm", True, input, weight, bias, running_mean, running_var,
                                 use_input_stats, eps, backend)


@torch.library.custom_op("normkit::instance_norm_backward", mutates_args=(), device_types="cpu")
def _instance_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                            weight: Optional[Tensor], use_input_stats: bool, weight_grad: bool, bias_grad: bool,
                            backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_backward("instancenorm", True, grad_output, input, mean, rstd, weight, use_input_stats,
                             weight_grad, bias_grad, backend)


@_instance_norm_backward.register_fake
def _(grad_output, input, mean, rstd, weight, use_input_stats, weight_grad, bias_grad, backend):
    return _channel_backward_fake("instancenorm", True, grad_output, input, mean, rstd, weight, use_input_stats,
                                  weight_grad, bias_grad, backend)


def _channel_setup(ctx, inputs, output):
    x, weight, _bias, _rm, _rv, batch_stats, _eps, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.batch_stats, ctx.backend = batch_stats, backend
    ctx.mark_non_differentiable(mean, rstd)


def _channel_autograd(backward_op):
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = backward_op(dy, x, mean, rstd, weight, ctx.batch_stats, need_w, need_b, ctx.backend)
        # running statistics are not differentiable, as in torch
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None, None

    return backward


_batch_norm.register_autograd(_channel_autograd(_batch_norm_backward), setup_context=_channel_setup)
_instance_norm.register_autograd(_channel_autograd(_instance_norm_backward), setup_context=_channel_setup)


# --- groupnorm: (N, C, S), statistics per (sample, group) ------------------------------------------------------

def _check_group(x, num_groups, weight, bias, eps):
    op = "groupnorm"
    _check_input(op, x)
    ops.check_num_groups(op, num_groups, x.shape[1])
    _check_params(op, x, (x.shape[1],), weight=weight, bias=bias)
    ops.check_eps(op, eps)
    return x.shape[0], num_groups


@torch.library.custom_op("normkit::group_norm", mutates_args=(), device_types="cpu")
def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    shape = _check_group(input, num_groups, weight, bias, eps)
    x, weight, bias = _contiguous(input), _contiguous(weight), _contiguous(bias)
    n, c = x.shape[:2]
    y, mean, rstd = x.new_empty(x.shape), x.new_empty(shape), x.new_empty(shape)
    _run("groupnorm", "forward", x, backend, _np(x).reshape(n, c, -1), num_groups, _np(weight), _np(bias), eps,
         _np(y).reshape(n, c, -1), _np(mean), _np(rstd))
    return y, mean, rstd


@_group_norm.register_fake
def _(input, num_groups, weight, bias, eps, backend):
    shape = _check_group(input, num_groups, weight, bias, eps)
    return input.new_empty(input.shape), input.new_empty(shape), input.new_empty(shape)


def _check_group_backward(dy, x, mean, rstd, num_groups, weight):
    _check_group(x, num_groups, weight, None, 0.0)
    _check_backward("groupnorm", dy, x, mean, rstd, (x.shape[0], num_groups))


@torch.library.custom_op("normkit::group_norm_backward", mutates_args=(), device_types="cpu")
def _group_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                         weight: Optional[Tensor], weight_grad: bool, bias_grad: bool,
                         backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    _check_group_backward(grad_output, input, mean, rstd, num_groups, weight)
    dy, x, mean, rstd, weight = map(_contiguous, (grad_output, input, mean, rstd, weight))
    n, c = x.shape[:2]
    dx, dw, db = _grads(x, (c,), weight_grad, bias_grad)
    _run("groupnorm", "backward", x, backend, _np(dy).reshape(n, c, -1), _np(x).reshape(n, c, -1), num_groups,
         _np(mean), _np(rstd), _np(weight), _np(dx).reshape(n, c, -1), _np(dw) if weight_grad else None,
         _np(db) if bias_grad else None)
    return dx, dw, db


@_group_norm_backward.register_fake
def _(grad_output, input, mean, rstd, num_groups, weight, weight_grad, bias_grad, backend):
    _check_group_backward(grad_output, input, mean, rstd, num_groups, weight)
    return _grads(input, (input.shape[1],), weight_grad, bias_grad)


def _group_setup(ctx, inputs, output):
    x, num_groups, weight, _bias, _eps, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.num_groups, ctx.backend = num_groups, backend
    ctx.mark_non_differentiable(mean, rstd)


def _group_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = _group_norm_backward(dy, x, mean, rstd, ctx.num_groups, weight, need_w, need_b, ctx.backend)
    return dx if need_x else None, None, dw if need_w else None, db if need_b else None, None, None


_group_norm.register_autograd(_group_backward, setup_context=_group_setup)


# --- layernorm: (M, K), elementwise affine over the normalized shape -------------------------------------------

def _check_layer(x, normalized_shape, weight, bias, eps):
    op = "layernorm"
    shape = ops.check_normalized_shape(op, normalized_shape)
    _check_input(op, x, min_ndim=len(shape))
    ops.check_trailing(op, x.shape, shape)
    _check_params(op, x, shape, weight=weight, bias=bias)
    ops.check_eps(op, eps)
    return shape, math.prod(x.shape[:x.dim() - len(shape)]), math.prod(shape)


@torch.library.custom_op("normkit::layer_norm", mutates_args=(), device_types="cpu")
def _layer_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    _, m, k = _check_layer(input, normalized_shape, weight, bias, eps)
    x, weight, bias = _contiguous(input), _contiguous(weight), _contiguous(bias)
    y, mean, rstd = x.new_empty(x.shape), x.new_empty(m), x.new_empty(m)
    flat = lambda t: None if t is None else _np(t).reshape(k)  # noqa: E731
    _run("layernorm", "forward", x, backend, _np(x).reshape(m, k), flat(weight), flat(bias), eps,
         _np(y).reshape(m, k), _np(mean), _np(rstd))
    return y, mean, rstd


@_layer_norm.register_fake
def _(input, normalized_shape, weight, bias, eps, backend):
    _, m, _ = _check_layer(input, normalized_shape, weight, bias, eps)
    return input.new_empty(input.shape), input.new_empty(m), input.new_empty(m)


def _check_layer_backward(dy, x, mean, rstd, normalized_shape, weight):
    shape, m, k = _check_layer(x, normalized_shape, weight, None, 0.0)
    _check_backward("layernorm", dy, x, mean, rstd, (m,))
    return shape, m, k


@torch.library.custom_op("normkit::layer_norm_backward", mutates_args=(), device_types="cpu")
def _layer_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                         normalized_shape: list[int], weight: Optional[Tensor], weight_grad: bool, bias_grad: bool,
                         backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    shape, m, k = _check_layer_backward(grad_output, input, mean, rstd, normalized_shape, weight)
    dy, x, mean, rstd, weight = map(_contiguous, (grad_output, input, mean, rstd, weight))
    dx, dw, db = _grads(x, shape, weight_grad, bias_grad)
    flat = lambda t: None if t is None else _np(t).reshape(k)  # noqa: E731
    _run("layernorm", "backward", x, backend, _np(dy).reshape(m, k), _np(x).reshape(m, k), _np(mean), _np(rstd),
         flat(weight), _np(dx).reshape(m, k), flat(dw) if weight_grad else None, flat(db) if bias_grad else None)
    return dx, dw, db


@_layer_norm_backward.register_fake
def _(grad_output, input, mean, rstd, normalized_shape, weight, weight_grad, bias_grad, backend):
    shape, _, _ = _check_layer_backward(grad_output, input, mean, rstd, normalized_shape, weight)
    return _grads(input, shape, weight_grad, bias_grad)


def _layer_setup(ctx, inputs, output):
    x, normalized_shape, weight, _bias, _eps, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.normalized_shape, ctx.backend = normalized_shape, backend
    ctx.mark_non_differentiable(mean, rstd)


def _layer_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = _layer_norm_backward(dy, x, mean, rstd, ctx.normalized_shape, weight, need_w, need_b,
                                      ctx.backend)
    return dx if need_x else None, None, dw if need_w else None, db if need_b else None, None, None


_layer_norm.register_autograd(_layer_backward, setup_context=_layer_setup)


# --- the public functions --------------------------------------------------------------------------------------

def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, backend=None):
    """:func:`torch.nn.functional.batch_norm` computed by normkit; ``running_mean``/``running_var`` are updated
    in place when ``training``. ``backend`` picks a backend by name (default: the registry's order)."""
    return _channel("batchnorm", _batch_norm, False, input, running_mean, running_var, weight, bias, training,
                    momentum, eps, backend)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, backend=None):
    """:func:`torch.nn.functional.instance_norm` computed by normkit; running statistics, when given, are updated
    in place with the average over the instances when ``use_input_stats``."""
    return _channel("instancenorm", _instance_norm, True, input, running_mean, running_var, weight, bias,
                    use_input_stats, momentum, eps, backend)


def _channel(op, custom_op, per_instance, input, running_mean, running_var, weight, bias, batch_stats, momentum,
             eps, backend):
    x = _contiguous(_tensor(op, "input", input, optional=False))
    weight, bias = _contiguous(_tensor(op, "weight", weight)), _contiguous(_tensor(op, "bias", bias))
    running_mean, running_var = _tensor(op, "running_mean", running_mean), _tensor(op, "running_var", running_var)
    _check_input(op, x)
    update = _check_running(op, x, running_mean, running_var) and batch_stats
    if update:
        momentum = ops.check_momentum(op, momentum)
        y, mean, rstd = custom_op(x, weight, bias, None, None, True, eps, backend)
        _update_running(running_mean, running_var, mean, rstd, eps, ops.stats_count(op, x.shape, per_instance),
                        momentum)
        return y
    return custom_op(x, weight, bias, running_mean, running_var, batch_stats, eps, backend)[0]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, backend=None):
    """:func:`torch.nn.functional.group_norm` computed by normkit."""
    op = "groupnorm"
    x = _contiguous(_tensor(op, "input", input, optional=False))
    weight, bias = _contiguous(_tensor(op, "weight", weight)), _contiguous(_tensor(op, "bias", bias))
    _check_input(op, x)
    return _group_norm(x, ops.check_num_groups(op, num_groups, x.shape[1]), weight, bias, eps, backend)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """:func:`torch.nn.functional.layer_norm` computed by normkit."""
    op = "layernorm"
    x = _contiguous(_tensor(op, "input", input, optional=False))
    weight, bias = _contiguous(_tensor(op, "weight", weight)), _contiguous(_tensor(op, "bias", bias))
    shape = list(ops.check_normalized_shape(op, normalized_shape))
    return _layer_norm(x, shape, weight, bias, eps, backend)[0]
