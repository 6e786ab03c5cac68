"""PyTorch's own CPU kernels as the benchmark baseline, called directly: ``torch.ops.aten.native_*_norm`` and
their ``*_backward`` ops with the forward's saved statistics, the calls autograd makes in a training step. No
adapter of ours sits between the timer and ATen.

The input tensors share memory with the NumPy inputs the normkit backends read. PyTorch allocates its outputs on
every call, as it does in training; see :func:`normkit.bench.recycle_freed_memory` for how that is kept free of
page faults.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np

from .cases import EPS, Case

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


def _instancenorm(case, aten, x, dy, w, b):
    # PyTorch has no instance-norm kernel: at::instance_norm runs batch norm on a (1, N*C, S) view with the weight
    # repeated N times, and autograd sums the repeated weight's gradient back. We time the same.
    n, c, s = case.kernel_shape
    xv, dyv = x.view(1, n * c, s), dy.view(1, n * c, s)

    def forward():
        y, mean, rstd = aten.native_batch_norm(xv, w.repeat(n), b.repeat(n), None, None, True, 0.1, EPS)
        return y.view(case.shape), mean, rstd

    def backward(mean, rstd):
        dx, dw, db = aten.native_batch_norm_backward(dyv, xv, w.repeat(n), None, None, mean, rstd, True, EPS, MASK)
        return dx.view(case.shape), dw.view(n, c).sum(0), db.view(n, c).sum(0)

    return forward, backward


# op -> (forward, backward) builder: the ATen calls a training step of the op's torch.nn.functional twin makes
BASELINES = {"batchnorm": _batchnorm, "groupnorm": _groupnorm, "layernorm": _layernorm,
             "instancenorm": _instancenorm}


def prepare(case: Case, direction: str, inputs: dict) -> tuple[Callable[[], object], Callable[[], np.ndarray]]:
    """``(call, output)``: ``call()`` runs one pass; ``output()`` runs one and returns y or dx as NumPy, shaped
    like the kernels' outputs."""
    import torch

    if case.op not in BASELINES:
        raise ValueError(f"{case.op}: normkit's bench has no PyTorch baseline for this op")
    # 16-bit data: the same memory as the kernels' uint16 patterns, seen as torch's 16-bit dtype; weight and bias
    # stay float32, the mixed types autocast gives torch's kernels after a 16-bit convolution
    data = (lambda a: torch.from_numpy(a.view(np.int16)).view(getattr(torch, case.dtype))
            if a.dtype == np.uint16 else torch.from_numpy(a))
    x, dy = data(inputs["x"]).view(case.shape), data(inputs["dy"]).view(case.shape)
    w, b = torch.from_numpy(inputs["weight"]), torch.from_numpy(inputs["bias"])
    forward, backward = BASELINES[case.op](case, torch.ops.aten, x, dy, w, b)

    if direction == "forward":
        call = forward
    else:
        _, mean, rstd = forward()

        def call():
            return backward(mean, rstd)

    def output() -> np.ndarray:
        out = call()[0]
        if out.dtype in (torch.bfloat16, torch.float16):  # as the kernels store it
            return out.view(torch.int16).numpy().view(np.uint16).reshape(case.kernel_shape)
        return out.numpy().reshape(case.kernel_shape)

    return call, output
