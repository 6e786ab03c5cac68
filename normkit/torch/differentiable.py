"""Gradients that can be differentiated again: normkit's backward under ``create_graph=True``.

The kernels return gradients as numbers, not as a graph. Autograd runs a backward with grad mode on only when it
was asked for a graph (``create_graph=True``: gradient penalties, Hessian-vector products, meta-learning), and
there normkit's autograd Functions take their gradients from this module instead: the call's output recomputed
with torch's own differentiable operations (``torch.nn.functional``'s norm with the call's arguments, then its
activation) and differentiated by autograd, which records the graph. The first-order values are then torch's
(float32 arithmetic for 16-bit data), the speed torch's; every other backward stays on the kernels. So does a
backward of batched output gradients (``torch.autograd.grad(..., is_grads_batched=True)``, the vectorized
``jacobian`` / ``hessian``: autograd's vmap over dy), which kernels reading memory cannot take.

The layers whose step is NumPy code and has no such form (BatchRenorm, GhostBatchNorm, the Keras-style
BatchNormalization, SyncBatchNorm across processes) take from here what tells the user so instead: :func:`refuse`
in their backward, :func:`numpy_step` around their forward.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..contract import ACTIVATIONS

_HALF = (torch.bfloat16, torch.float16)


def activation(z: Tensor, act: Optional[tuple[int, float]]) -> Tensor:
    """The fused activation ``act`` (normkit.torch.functional's code for it, or None) of z."""
    if act is None:
        return z
    name, slope = ACTIVATIONS[act[0]], act[1]
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, slope)
    if name == "silu":
        return F.silu(z)
    return F.gelu(z, approximate="tanh" if name == "gelu_tanh" else "none")


def _norm(call, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """The call's norm (before its activation) on x, in torch operations."""
    op = call.spec.name
    if op in ("batchnorm", "instancenorm") and not call.batch_stats:
        # normalized by running statistics: constants, the ones the call's forward used (the buffers may have
        # moved since)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, rstd = (torch.from_numpy(s).to(x.dtype).view(shape) for s in (call.mean, call.rstd))
        y = (x - mean) * rstd
        if weight is not None:
            y = y * weight.view(shape)
        return y if bias is None else y + bias.view(shape)
    if op == "batchnorm":
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, call.eps)
    if op == "instancenorm":
        return F.instance_norm(x, None, None, weight, bias, True, 0.0, call.eps)
    if op == "groupnorm":
        return F.group_norm(x, call.groups, weight, bias, call.eps)
    if op == "layernorm":
        return F.layer_norm(x, call.pshape, weight, bias, call.eps)
    return F.rms_norm(x, call.pshape, weight, call.eps)


def grads(call, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], dy: Tensor,
          need: tuple[bool, bool, bool], bias_dtype) -> tuple[Optional[Tensor], ...]:
    """(dx, dweight, dbias) of the call's output for the output gradient ``dy``, by autograd (recorded where grad
    mode is on: create_graph=True); ``need`` says which of x, weight and bias want one. A wanted bias may come as
    None: without an activation the callers do not keep it (it enters no other gradient), and its gradient, dy
    summed over the other dimensions, comes in ``bias_dtype``."""
    compute = torch.float32 if x.dtype in _HALF else x.dtype  # as the kernels: 16-bit data computed in float32
    create_graph = torch.is_grad_enabled()

    def up(t):
        # contiguous: torch's batch-norm backward gives wrong gradients for some layouts (instance_norm of one
        # sample with a channels-last dy, batch_norm with the channels fastest), and its channels-last group_norm
        # backward can crash; normkit's own kernels take any layout, so its gradients must not depend on one
        return None if t is None else t.to(compute).contiguous()

    with torch.enable_grad():
        # Differentiate through aliases (new autograd nodes), not the tensors themselves: with x or weight as inputs
        # autograd also runs the caller's graph between them (layer_norm(x * w, w): the weight's gradient took the
        # path through x too, counting it twice, and the caller's nodes freed their saved tensors, so its own
        # retain_graph=True backward found the graph gone); the aliases' nodes lead to no other input.
        x, weight, bias = (None if t is None else t.view_as(t) for t in (x, weight, bias))
        y = activation(_norm(call, up(x), up(weight), up(bias)), call.act).to(x.dtype)
    dy = dy.contiguous()
    wanted = [t if n else None for t, n in zip((x, weight, bias), need)]
    inputs = [t for t in wanted if t is not None]
    found = iter(torch.autograd.grad(y, inputs, dy, create_graph=create_graph, allow_unused=True) if inputs else ())
    dx, dw, db = (None if t is None else next(found) for t in wanted)
    if need[2] and bias is None:
        dims = tuple(range(dy.dim() - len(call.pshape))) if call.spec.sets == "row" else (0, *range(2, dy.dim()))
        db = dy.to(compute)
        if dims:  # (sum over () would sum over every dimension)
            db = db.sum(dims)
        db = db.to(bias_dtype)
    return dx, dw, db


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def batched(t: Tensor) -> bool:
    """Whether a backward's output gradient is batched, without memory to read: by autograd's own vmap
    (is_grads_batched=True, a vectorized jacobian), or by torch.func's transforms around an autograd.grad of a
    graph built outside them (vmap(lambda v: autograd.grad(y, x, v))), whose wrappers have no storage either."""
    return _legacy_batched(t) or _functorch_wrapped(t)


def refuse(name: str, dy: Tensor) -> None:
    """In the backward of an autograd Function that has no differentiable form: a clear error under
    ``create_graph=True`` (``once_differentiable`` is not enough: its error fires only if a later backward walks
    through it, and ``torch.autograd.grad(loss, inputs)`` prunes it away, silently dropping the term), and for a
    batched ``dy`` (torch's own error there names a tensor without storage)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: gradients of its gradients (create_graph=True) are not supported")
    if batched(dy):
        raise RuntimeError(f"{name}: batched gradients (is_grads_batched=True, a vectorized jacobian or hessian, "
                           f"torch.func.vmap around torch.autograd.grad) are not supported")


def no_jvp(name: str):
    """An autograd Function's ``jvp`` for steps that have no forward-mode form: torch calls it for dual inputs
    (``torch.autograd.forward_ad``), where its own error asks the Function's author to implement it."""
    def jvp(ctx, *tangents):
        raise RuntimeError(f"{name}: forward-mode AD (torch.autograd.forward_ad's dual tensors) is not supported "
                           f"where its step runs NumPy code")
    return staticmethod(jvp)


# inside torch.func.grad, vmap, jacrev, ...
transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def numpy_step(layers: str):
    """Decorator for the forward methods of the layers whose step runs NumPy code on the tensors' memory
    (``layers`` names them in messages). torch.func's transforms (grad, vmap, jacrev, ...), torch.export and
    FakeTensors get a clear error, since their tensors have no memory to read; so does torch.jit.trace, which
    would record this call's NumPy results as constants and replay them at every later call. torch.compile runs
    the step outside its graph: traced, dynamo guards the NumPy code on transient objects (a dtype made per call)
    whose address a later call's object can reuse, and then ran a float64 kernel on float32 data."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            name = type(self).__name__
            if transforms_active():
                raise RuntimeError(f"{name}: torch.func transforms (grad, vmap, jacrev, ...) are not supported: its "
                                   f"step runs NumPy code on the tensors' memory")
            if torch.jit.is_tracing():
                raise RuntimeError(f"{name}: torch.jit.trace cannot record its step, NumPy code whose results the "
                                   f"trace would replay as constants at every call; use torch.compile")
            if torch.compiler.is_exporting() or any(isinstance(a, Tensor) and is_fake(a) for a in args):
                raise RuntimeError(f"{name}: torch.export and FakeTensors cannot run its step, NumPy code on the "
                                   f"tensors' memory")
            return method(self, *args, **kwargs)

        return torch.compiler.disable(run, reason=f"normkit's {layers} run NumPy code, which torch.compile leaves "
                                                  f"outside its graph (a graph break)")
    return wrap
