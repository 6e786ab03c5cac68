"""The Cython kernels write large outputs (forward y, backward dx) with non-temporal stores: the same values as
ordinary stores, at any alignment of the output and any length (the vector loop's head and tail), with and without
a fused activation, in every schedule that streams (no backward with an activation does: it keeps g = dy * act'(z)
in dx between its passes, so there both sides use ordinary stores, the same bits).

The same values, up to one thing: a streamed output is computed into a chunk on the stack, a loop the compiler
vectorizes on its own, and where it contracts a multiply and an add into one fused multiply-add may differ from
the ordinary loop's; and LayerNorm's backward with parameter gradients makes a streamed dx in a loop of its own,
not in the one that adds up the gradients (a few elements). Such a
difference is one rounding of a term of the sum, so the bound is a few roundings of the output's largest value,
not of each element (an element that cancels to a small value may then differ by several of its own ulps).
"""

from __future__ import annotations

import numpy as np
import pytest

from normkit import registry
from normkit.contract import NCHW, NHWC

kernels = pytest.importorskip("normkit_kernels.cython.kernels")

# (op, kernel shape, groups, layout): BatchNorm's channels schedule (S >= 32, C >= 32), its columns schedule's
# separate elementwise pass (short rows: a channels-last (N*H*W, C, 1) view, and rows of 3 channels of 5 values, so
# that the streamed chunks start part way into rows), GroupNorm, InstanceNorm (groups =
# C), GroupNorm's single set cut into pieces (2**16 values or more), LayerNorm rows longer than a chunk (1024
# values) and longer than a tile of its long-row backward (2**16 values), and a single such row (its forward by
# tiles); lengths that are not multiples of a vector. Channels-last GroupNorm and InstanceNorm ((N, S, C) kernel
# shapes): a task per sample (8 samples or more), and samples cut into row blocks (fewer), rows of 24 and 5 values.
SHAPES = [("batchnorm", (3, 33, 45), None, NCHW), ("batchnorm", (1000, 64, 1), None, NCHW),
          ("batchnorm", (200, 3, 5), None, NCHW), ("groupnorm", (9, 37, 24), 4, NHWC),
          ("groupnorm", (2, 300, 24), 6, NHWC), ("instancenorm", (3, 257, 5), None, NHWC),
          ("groupnorm", (2, 6, 37), 3, NCHW), ("groupnorm", (1, 4, 16411), 1, NCHW),
          ("instancenorm", (2, 5, 1031), None, NCHW), ("layernorm", (3, 2053), None, NCHW),
          ("layernorm", (2, 65541), None, NCHW), ("layernorm", (1, 65541), None, NCHW)]
OFFSETS = (0, 1, 3)  # elements past a 64-byte boundary


def _outputs(op, direction, dtype, shape, groups, layout, act, offset):
    """Every output of a forward (y, mean, rstd) or backward (dx, dweight, dbias) call on fixed data, y / dx placed
    ``offset`` elements past an aligned start of a zeroed buffer, which is returned too."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype) * 3 + 5
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[-1] if op == "layernorm" or layout == NHWC else shape[1]
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    stat = {"batchnorm": (c,), "groupnorm": (shape[0], groups), "instancenorm": (shape[0], c),
            "layernorm": (shape[0],)}[op]
    mean, rstd = np.empty(stat, dtype), np.empty(stat, dtype)
    buf = np.zeros(x.size + 16, dtype)
    out = buf[offset:offset + x.size].reshape(shape)
    grouped = (groups,) if op == "groupnorm" else ()
    prefix = "act_" if act else ""
    forward = registry.lookup(op, prefix + "forward", np.dtype(dtype).name, "cython", layout)[1]
    if direction == "forward":
        forward(x, *grouped, w, b, 1e-5, *act, out, mean, rstd)
        return (out.copy(), mean, rstd), buf
    forward(x, *grouped, w, b, 1e-5, *act, np.empty_like(x), mean, rstd)
    dw, db = np.empty(c, dtype), np.empty(c, dtype)
    backward = registry.lookup(op, prefix + "backward", np.dtype(dtype).name, "cython", layout)[1]
    backward(dy, x, *grouped, mean, rstd, w, *((b, *act) if act else ()), out, dw, db)
    return (out.copy(), dw, db), buf


@pytest.mark.parametrize("op,shape,groups,layout", SHAPES,
                         ids=[f"{s[0]}-{'x'.join(map(str, s[1]))}-{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [(), (2, 0.0)], ids=["plain", "silu"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_streamed_outputs_equal_ordinary_ones(op, shape, groups, layout, dtype, act, direction):
    try:
        for offset in OFFSETS:
            kernels.set_stream_min_bytes(1 << 62)
            want, _ = _outputs(op, direction, dtype, shape, groups, layout, act, offset)
            kernels.set_stream_min_bytes(0)
            got, buf = _outputs(op, direction, dtype, shape, groups, layout, act, offset)
            for a, b in zip(want, got):
                eps = np.finfo(dtype).eps
                if act and direction == "backward":  # ordinary stores on both sides
                    np.testing.assert_array_equal(b, a)
                np.testing.assert_allclose(b, a, rtol=2 * eps, atol=2 * eps * float(np.abs(a).max()))
            assert not buf[:offset].any() and not buf[offset + np.prod(shape):].any()  # nothing written outside
    finally:
        kernels.set_stream_min_bytes(None)


@pytest.mark.parametrize("shape", [(3, 33, 45), (2, 64, 1024)])
def test_streaming_keeps_the_bits_of_the_inference_backward(shape):
    """BatchNorm's inference backward with parameter gradients (a frozen BatchNorm whose affine parameters train)
    computes them in the pass that writes dx, whatever the output's size: the same bits with streaming on."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    mean, rstd = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    backward = registry.lookup("batchnorm", "backward_infer", "float32", "cython")[1]
    results = []
    try:
        for threshold in (1 << 62, 0):
            kernels.set_stream_min_bytes(threshold)
            dx, dw, db = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
            backward(dy, x, mean, rstd, w, dx, dw, db)
            results.append((dx, dw, db))
    finally:
        kernels.set_stream_min_bytes(None)
    for a, b in zip(*results):
        np.testing.assert_array_equal(b, a)
