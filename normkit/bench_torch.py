"""PyTorch's own CPU kernels as the benchmark baseline, called directly: ``torch.ops.aten.native_*_norm`` and
their ``*_backward`` ops with the forward's saved statistics, the calls autograd makes in a training step. No
adapter of ours sits between the timer and ATen.

The second peer (``normkit bench --compile``, :func:`prepare_compiled`) is ``torch.compile`` of the op's
``torch.nn.functional`` call: inductor's generated C++ for the same pass.

The input tensors share memory with the NumPy inputs the normkit backends read. PyTorch allocates its outputs on
every call, as it does in training; see :func:`normkit.bench.recycle_freed_memory` for how that is kept free of
page faults.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable

import numpy as np

from .alloc import aligned_copy
from .cases import EPS, NEGATIVE_SLOPE, Case

MASK = [True, True, True]  # dx, dweight, dbias: what the normkit kernels compute too


def available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _batchnorm(case, aten, x, dy, w, b):
    def forward():
        return aten.native_batch_norm(x, w, b, None, None, True, 0.1, EPS)

    def backward(mean, rstd):
        return aten.native_batch_norm_backward(dy, x, w, None, None, mean, rstd, True, EPS, MASK)

    return forward, backward


def _groupnorm(case, aten, x, dy, w, b):
    n, c, s = case.kernel_shape

    def forward():
        return aten.native_group_norm(x, w, b, n, c, s, case.groups, EPS)

    def backward(mean, rstd):
        return aten.native_group_norm_backward(dy, x, mean, rstd, w, n, c, s, case.groups, MASK)

    return forward, backward


def _layernorm(case, aten, x, dy, w, b):
    norm = list(case.normalized_shape)
    wl, bl = w.view(norm), b.view(norm)

    def forward():
        return aten.native_layer_norm(x, norm, wl, bl, EPS)

    def backward(mean, rstd):
        return aten.native_layer_norm_backward(dy, x, norm, mean, rstd, wl, bl, MASK)

    return forward, backward


def _rmsnorm(case, aten, x, dy, w, b):
    # F.rms_norm: torch's own training forward; its backward is autograd's over the ops it is made of, which we
    # time on a graph recorded once (retained)
    import torch

    norm = list(case.normalized_shape)
    wl = w.view(norm)

    def forward():
        return torch.nn.functional.rms_norm(x, norm, wl, EPS), None, None

    xg, wg = x.detach().requires_grad_(), wl.detach().requires_grad_()
    graph = torch.nn.functional.rms_norm(xg, norm, wg, EPS)

    def backward(mean, rstd):
        return torch.autograd.grad(graph, (xg, wg), dy, retain_graph=True)

    return forward, backward


def _instancenorm(case, aten, x, dy, w, b):
    # PyTorch has no instance-norm kernel: at::instance_norm runs batch norm on a (1, N*C, S) view with the weight
    # repeated N times, and autograd sums the repeated weight's gradient back. We time the same.
    # On a channels-last input it makes a contiguous copy first (input.contiguous().view(...)), timed here too.
    n, c, s = case.kernel_shape

    def forward():
        xv = x.contiguous().view(1, n * c, s)
        y, mean, rstd = aten.native_batch_norm(xv, w.repeat(n), b.repeat(n), None, None, True, 0.1, EPS)
        return y.view(case.shape), mean, rstd

    def backward(mean, rstd):
        xv, dyv = x.contiguous().view(1, n * c, s), dy.contiguous().view(1, n * c, s)
        dx, dw, db = aten.native_batch_norm_backward(dyv, xv, w.repeat(n), None, None, mean, rstd, True, EPS, MASK)
        return dx.view(case.shape), dw.view(n, c).sum(0), db.view(n, c).sum(0)

    return forward, backward


# op -> (forward, backward) builder: the ATen calls a training step of the op's torch.nn.functional twin makes
BASELINES = {"batchnorm": _batchnorm, "groupnorm": _groupnorm, "layernorm": _layernorm,
             "instancenorm": _instancenorm, "rmsnorm": _rmsnorm}


def _add_baseline(case, x, r, dy, dh, w, b):
    """The fused residual add's baseline: ``x + r`` then the norm's torch.nn.functional function, and autograd's
    backward of the two with gradients for both y and h (on a graph recorded once)."""
    import torch

    F = torch.nn.functional
    norm = list(case.normalized_shape)
    wl, bl = w.view(norm), b.view(norm)
    centered = case.spec.centered

    def norm_of(h, w, b):
        return F.layer_norm(h, norm, w, b, EPS) if centered else F.rms_norm(h, norm, w, EPS)

    def forward():
        h = x + r
        return norm_of(h, wl, bl), h

    leaves = [t.detach().requires_grad_() for t in ((x, r, wl, bl) if centered else (x, r, wl))]
    h = leaves[0] + leaves[1]
    outputs = (norm_of(h, *leaves[2:], *(() if centered else (None,))), h)

    def backward():
        return torch.autograd.grad(outputs, leaves, (dy, dh), retain_graph=True)

    return forward, backward


def _activation(case):
    """The case's activation as torch's function."""
    import torch.nn.functional as F

    return {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, NEGATIVE_SLOPE), "silu": F.silu,
            "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[case.activation]


def _act_baseline(case, x, dy, w, b):
    """A fused activation's baseline: the norm's torch.nn.functional call then the activation's, eager, and
    autograd's backward of the two (on a graph recorded once): the two calls a model makes."""
    import torch

    fn, act = _functional(case), _activation(case)

    def forward():
        return act(fn(x, w, b)), None, None

    leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
    graph = act(fn(*leaves))

    def backward():
        return torch.autograd.grad(graph, leaves, dy, retain_graph=True)

    return forward, backward


def _channels_last(case: Case, a: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """A (N, C, S) array's values as a channels-last tensor of the case's shape (N, C, *spatial), as :func:`_data`
    sees 16-bit patterns."""
    shape = case.shape
    nhwc = aligned_copy(a.transpose(0, 2, 1))  # as torch's allocator and the NCHW cases align
    return _tensor(nhwc, case.dtype).view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def prepare(case: Case, direction: str, inputs: dict,
            layout: str = "nchw") -> tuple[Callable[[], object], Callable[[], dict]]:
    """``(call, output)``: ``call()`` runs one pass; ``output()`` runs one and returns its outputs as
    :func:`outputs` names them. ``layout="nhwc"``: on channels-last tensors (PyTorch's channels-last kernels)."""
    import torch

    if case.op not in BASELINES:
        raise ValueError(f"{case.op}: normkit's bench has no PyTorch baseline for this op")
    if layout == "nhwc":
        x, dy = _channels_last(case, inputs["x"]), _channels_last(case, inputs["dy"])
    else:
        x, dy = _data(case, inputs["x"]), _data(case, inputs["dy"])
    w, b = torch.from_numpy(inputs["weight"]), torch.from_numpy(inputs["bias"])
    if case.add:
        r, dh = (_data(case, inputs[k]) for k in ("residual", "dh"))  # stored as x is (16-bit: uint16 patterns)
        call = _add_baseline(case, x, r, dy, dh, w, b)[direction == "backward"]
        return call, lambda: outputs(case, direction, call())
    if case.activation:
        call = _act_baseline(case, x, dy, w, b)[direction == "backward"]
        return call, lambda: outputs(case, direction, call())
    forward, backward = BASELINES[case.op](case, torch.ops.aten, x, dy, w, b)

    if direction == "forward":
        call = forward
    else:
        _, mean, rstd = forward()

        def call():
            return backward(mean, rstd)

    return call, lambda: outputs(case, direction, call())


def outputs(case: Case, direction: str, result) -> dict[str, np.ndarray]:
    """What the bench compares of a torch contender's pass, as the kernels store it: forward y (and the fused add's
    h), backward dx, dweight and dbias (those torch computes: RMSNorm has no dbias). ``result``: the pass's
    return, its tensors in the kernels' argument order (forward: y first, then h or the statistics; backward: the
    gradients of x, of the residual for the fused add, of weight and of bias)."""
    if direction == "forward":
        if not isinstance(result, (tuple, list)):
            result = (result,)
        named = {"y": result[0]}
        if case.add:
            named["h"] = result[1]
        return {k: _stored(case, t) for k, t in named.items()}
    grads = list(result)
    if case.add:
        del grads[1]  # the residual's gradient is x's
    out = {"dx": _stored(case, grads[0])}
    for name, g in zip(("dweight", "dbias"), grads[1:]):
        if g is not None:
            out[name] = g.detach().numpy().reshape(-1)  # (the parameters are float32 for 16-bit data)
    return out


def _data(case: Case, a: np.ndarray):
    """x or dy as a tensor of the case's shape. 16-bit data: the same memory as the kernels' uint16 patterns, seen
    as torch's 16-bit dtype; weight and bias stay float32, the mixed types autocast gives torch's kernels after a
    16-bit convolution."""
    return _tensor(a, case.dtype).view(case.shape)


def _tensor(a: np.ndarray, dtype: str):
    """An array as a tensor on its memory, uint16 patterns as ``dtype`` (bfloat16 or float16)."""
    import torch

    return torch.from_numpy(a.view(np.int16)).view(getattr(torch, dtype)) if a.dtype == np.uint16 else \
        torch.from_numpy(a)


def _stored(case: Case, out) -> np.ndarray:
    """An output tensor as the kernels store it (16-bit as uint16 patterns), in the kernels' shape."""
    import torch

    out = out.detach()
    if out.dtype in (torch.bfloat16, torch.float16):
        return out.view(torch.int16).numpy().view(np.uint16).reshape(case.kernel_shape)
    return out.numpy().reshape(case.kernel_shape)


# --- torch.compile ---------------------------------------------------------------------------------------------

class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here (no C++ compiler, or compilation failed)."""


def _functional(case: Case):
    """The op's torch.nn.functional call in training mode, as a function of (x, weight, bias) (without the case's
    activation: :func:`_peer`)."""
    import torch.nn.functional as F

    if case.op == "batchnorm":
        return lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS)
    if case.op == "instancenorm":
        return lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, EPS)
    if case.op == "groupnorm":
        return lambda x, w, b: F.group_norm(x, case.groups, w, b, EPS)
    norm = list(case.normalized_shape)
    if case.op == "layernorm":
        return lambda x, w, b: F.layer_norm(x, norm, w.view(norm), b.view(norm), EPS)
    return lambda x, w, b: F.rms_norm(x, norm, w.view(norm), EPS)


def _peer(case: Case):
    """What torch.compile compiles for the case, and its tensor arguments' names: :func:`_functional` followed by
    the case's activation if it has one (what the compiler may fuse); for the fused add, ``x + residual`` then the
    op, returning ``(y, h)``, as the eager baseline."""
    fn = _functional(case)
    if case.activation:
        act = _activation(case)
        return (lambda x, w, b: act(fn(x, w, b))), ("x", "weight", "bias")
    if case.add:
        def add_then_norm(x, r, w, b):
            h = x + r
            return fn(h, w, b), h
        return add_then_norm, ("x", "residual", "weight", "bias")
    return fn, ("x", "weight", "bias")


def check_compiler() -> None:
    """Raise :class:`CompileUnavailable` when inductor finds no C++ compiler (it compiles its kernels at run time)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - inductor raises several types, all meaning "no compiler"
        raise CompileUnavailable(f"torch.compile needs a C++ compiler at run time and found none "
                                 f"({type(exc).__name__}: {exc}); install g++ or set CXX") from None


def prepare_compiled(case: Case, direction: str, inputs: dict,
                     layout: str = "nchw") -> tuple[Callable[[], object], Callable[[], np.ndarray], float]:
    """``(call, output, compile_s)`` for ``torch.compile`` of the op's ``torch.nn.functional`` call, on
    channels-last tensors for ``layout="nhwc"`` (as :func:`prepare`).

    forward: the compiled function on inputs without gradients (inductor's forward kernel); backward: one
    compiled forward on inputs that require gradients, then ``torch.autograd.grad`` of its output with
    ``retain_graph`` (inductor's backward kernel, run again on each call; the gradients are returned, not
    accumulated into ``.grad``, which would add a pass). Compilation and the first calls happen here, timed as
    ``compile_s``, so that none of it lands in the timings. Raises :class:`CompileUnavailable`.
    """
    import torch

    check_compiler()
    torch._dynamo.reset()  # each case compiles afresh, never against dynamo's recompilation limit
    peer, names = _peer(case)
    fn = torch.compile(peer, dynamic=False, fullgraph=True)
    data = _channels_last if layout == "nhwc" else _data
    tensors = [torch.from_numpy(inputs[n]) if n in ("weight", "bias") else data(case, inputs[n]) for n in names]
    start = time.perf_counter()
    try:
        if direction == "forward":
            def call():
                return fn(*tensors)
        else:
            grads = tuple(data(case, inputs[n]) for n in (("dy", "dh") if case.add else ("dy",)))
            leaves = tuple(t.detach().requires_grad_() for t in tensors)
            out = fn(*leaves)

            def call():  # (RMSNorm's graph does not use the bias)
                return torch.autograd.grad(out, leaves, grads, retain_graph=True, allow_unused=True)
        call()
        call()
    except Exception as exc:  # noqa: BLE001 - dynamo and inductor raise many types; the bench goes on without it
        raise CompileUnavailable(f"torch.compile failed for {case.label} {direction}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    compile_s = time.perf_counter() - start
    return call, lambda: outputs(case, direction, call()), compile_s
