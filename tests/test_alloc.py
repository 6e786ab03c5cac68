"""Outputs that normkit allocates start on a 64-byte boundary (normkit.alloc), in both frontends."""

from __future__ import annotations

import numpy as np
import pytest
from support import OPS, op_args

import normkit
from normkit.alloc import ALIGNMENT, aligned_empty


def _aligned(a) -> bool:
    return a.ctypes.data % ALIGNMENT == 0


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (2, 0, 5), (7, 33), [4, 5], 9])
@pytest.mark.parametrize("dtype", [np.float32, "float64", np.dtype(np.uint16)])
def test_aligned_empty(shape, dtype):
    a = aligned_empty(shape, dtype)
    want = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    assert a.shape == want and a.dtype == np.dtype(dtype)
    assert _aligned(a) and a.flags.c_contiguous and a.flags.writeable
    a.fill(1)  # the whole array is inside its allocation
    assert a.sum() == a.size


def test_aligned_empty_arrays_do_not_overlap():
    arrays = [aligned_empty((5, 3), np.float64) for _ in range(20)]
    for i, a in enumerate(arrays):
        a.fill(i)
    assert all((a == i).all() for i, a in enumerate(arrays))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_frontend_outputs_are_aligned(op, dtype, rng):
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    kw = op_args(op, x, rng, groups=2, affine="both")
    f = normkit.get(op)
    y, saved = f.forward(x, **kw)
    grads = f.backward(rng.standard_normal(x.shape).astype(dtype), x, saved, **kw)
    outputs = [y, saved.mean, saved.rstd, *grads]
    assert all(_aligned(a) for a in outputs), [a.ctypes.data % ALIGNMENT for a in outputs]


def test_numpy_frontend_inference_output_is_aligned(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    kw = op_args("batchnorm", x, rng, affine="both", training=False, running=True)
    y, _ = normkit.get("batchnorm").forward(x, **kw)
    assert _aligned(y)


@pytest.mark.parametrize("op", OPS)
def test_torch_frontend_outputs_are_aligned(op):
    torch = pytest.importorskip("torch")
    import normkit.torch as nkt

    x = torch.randn(3, 4, 5, requires_grad=True)
    c = 5 if op == "layernorm" else 4
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    y = {"batchnorm": lambda: nkt.batch_norm(x, None, None, w, b, True),
         "instancenorm": lambda: nkt.instance_norm(x, None, None, w, b),
         "groupnorm": lambda: nkt.group_norm(x, 2, w, b),
         "layernorm": lambda: nkt.layer_norm(x, (5,), w, b)}[op]()
    tensors = [y, *torch.autograd.grad(y, (x, w, b), torch.randn_like(y))]
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in tensors), [t.data_ptr() % ALIGNMENT for t in tensors]
