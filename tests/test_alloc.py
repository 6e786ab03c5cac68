"""Large outputs that normkit allocates start on a 64-byte boundary (normkit.alloc), in both frontends; the NumPy
frontend's at or just below its inputs' addresses modulo 4 KiB."""

from __future__ import annotations

import numpy as np
import pytest
from support import OPS, op_args

import normkit
from normkit.alloc import ALIGN_MIN_BYTES, ALIGNMENT, PAGE, aligned_copy, aligned_empty, empty, page_offset
from normkit.contract import SPECS


def _aligned(a) -> bool:
    return a.ctypes.data % ALIGNMENT == 0


def _at(offset: int, shape, dtype=np.float32) -> np.ndarray:
    """An array whose data start ``offset`` bytes past a 4 KiB boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 2 * PAGE, np.uint8)
    start = (offset - raw.ctypes.data) % PAGE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _behind(out, a) -> bool:
    """Whether ``out`` starts at ``a``'s address modulo 4 KiB or less than 64 bytes below it."""
    return (a.ctypes.data - out.ctypes.data) % PAGE < ALIGNMENT


def _not_ahead(out, a) -> bool:
    """Whether ``out`` starts at or below ``a``'s address modulo 4 KiB, by less than half a page (and 64 bytes)."""
    return (a.ctypes.data - out.ctypes.data) % PAGE < PAGE // 2 + ALIGNMENT


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (2, 0, 5), (7, 33), [4, 5], 9])
@pytest.mark.parametrize("dtype", [np.float32, "float64", np.dtype(np.uint16)])
def test_aligned_empty(shape, dtype):
    a = aligned_empty(shape, dtype)
    want = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    assert a.shape == want and a.dtype == np.dtype(dtype)
    assert _aligned(a) and a.flags.c_contiguous and a.flags.writeable
    a.fill(1)  # the whole array is inside its allocation
    assert a.sum() == a.size


def test_aligned_copy_of_a_strided_view():
    a = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    for view in (a.transpose(0, 2, 1), a[:, ::2]):
        c = aligned_copy(view)
        assert _aligned(c) and c.flags.c_contiguous and c.dtype == view.dtype
        np.testing.assert_array_equal(c, view)
        assert not np.shares_memory(c, a)


def test_bench_channels_last_arrays_are_aligned():
    # the bench's NHWC inputs and outputs, for normkit's kernels and for torch's, as its NCHW ones are
    from normkit import bench

    a = np.ones((3, 4, 50), np.float32)
    assert all(_aligned(bench._nhwc(a)) for _ in range(10))


def test_empty_aligns_from_the_threshold_up():
    n = ALIGN_MIN_BYTES // 4
    assert all(_aligned(empty((n,), np.float32)) for _ in range(10))
    assert all(_aligned(empty((n // 4, 4), np.float32, n * 4)) for _ in range(10))
    small = empty((3, 5), np.float64)
    assert small.shape == (3, 5) and small.dtype == np.float64 and small.base is None  # plain np.empty


def test_aligned_empty_arrays_do_not_overlap():
    arrays = [aligned_empty((5, 3), np.float64) for _ in range(20)]
    for i, a in enumerate(arrays):
        a.fill(i)
    assert all((a == i).all() for i, a in enumerate(arrays))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_frontend_outputs_are_aligned(op, dtype, rng):
    """y and dx, and dweight/dbias where they are large (LayerNorm over all of a sample)."""
    x = rng.standard_normal((2, 4, ALIGN_MIN_BYTES // 4 // np.dtype(dtype).itemsize + 3)).astype(dtype)
    kw = op_args(op, x, rng, groups=2, affine="both")
    f = normkit.get(op)
    y, saved = f.forward(x, **kw)
    grads = f.backward(rng.standard_normal(x.shape).astype(dtype), x, saved, **kw)
    outputs = [y, *(grads if op == "layernorm" else grads[:1])]
    assert all(_aligned(a) for a in outputs), [a.ctypes.data % ALIGNMENT for a in outputs]


def test_numpy_frontend_inference_output_is_aligned(rng):
    x = rng.standard_normal((2, 4, ALIGN_MIN_BYTES // 8)).astype(np.float32)
    kw = op_args("batchnorm", x, rng, affine="both", training=False, running=True)
    y, _ = normkit.get("batchnorm").forward(x, **kw)
    assert _aligned(y)


@pytest.mark.parametrize("op", OPS)
def test_torch_frontend_outputs_are_aligned(op):
    torch = pytest.importorskip("torch")
    import normkit.torch as nkt

    k = ALIGN_MIN_BYTES // 4
    x = torch.randn(3, 4, k, requires_grad=True)
    row = SPECS[op].sets == "row"
    c = k if row else 4
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    y = {"batchnorm": lambda: nkt.batch_norm(x, None, None, w, b, True),
         "instancenorm": lambda: nkt.instance_norm(x, None, None, w, b),
         "groupnorm": lambda: nkt.group_norm(x, 2, w, b),
         "layernorm": lambda: nkt.layer_norm(x, (k,), w, b),
         "rmsnorm": lambda: nkt.rms_norm(x, (k,), w)}[op]()
    params = (w, b) if SPECS[op].centered else (w,)
    dx, *dparams = torch.autograd.grad(y, (x, *params), torch.randn_like(y))
    tensors = [y, dx, *(dparams if row else ())]  # torch's allocator: y, dx; normkit's: the parameter gradients
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in tensors), [t.data_ptr() % ALIGNMENT for t in tensors]


@pytest.mark.parametrize("offsets,want", [((16,), 0), ((64,), 64), ((16, 576), 0), ((576, 16), 0), ((3900, 16), 3840),
                                          ((16, 3900), 3840), ((100, 100, 200), 64), ((0, 2048), 0)])
def test_page_offset(offsets, want):
    """Below the input that the others lead by less than half a page (the first one when none is)."""
    assert page_offset([_at(o, (8,)) for o in offsets]) == want


@pytest.mark.parametrize("offsets", [(16,), (64,), (16, 576), (3900, 16), (4080,)])
def test_aligned_empty_near(offsets):
    near = [_at(o, (1000,)) for o in offsets]
    for i, n in enumerate(near):
        n[...] = np.arange(1000) + 1000 * i
    before = [a.copy() for a in near]
    a = aligned_empty((250, 4), np.float32, near)
    assert a.ctypes.data % PAGE == page_offset(near) and _aligned(a) and a.flags.c_contiguous
    a.fill(7)  # the whole array is inside its allocation, and no input is touched
    assert (a == 7).all() and all(np.array_equal(n, b) for n, b in zip(near, before))
    c = aligned_copy(near[0].reshape(250, 4), near)
    assert c.ctypes.data % PAGE == page_offset(near)
    np.testing.assert_array_equal(c, near[0].reshape(250, 4))


def test_near_reads_read_only_inputs():
    a = _at(16, (100,))
    a.flags.writeable = False
    assert page_offset([a]) == 0 and aligned_empty((4,), np.float64, [a]).ctypes.data % PAGE == 0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("offset", [16, 80, 4080])
def test_numpy_frontend_places_outputs_behind_inputs(op, offset, rng):
    """y at or just below x modulo 4 KiB, dx below x and dy (here at the same offset): never just ahead of an input
    that its pass reads (NumPy's large arrays start 16 bytes past a page; 64-byte alignment alone put outputs 48
    bytes ahead of them)."""
    shape = (2, 4, ALIGN_MIN_BYTES // 4 // 4 + 3)
    x = _at(offset, shape)
    x[...] = rng.standard_normal(shape)
    dy = _at(offset, shape)
    dy[...] = rng.standard_normal(shape)
    kw = op_args(op, x, rng, groups=2, affine="both")
    f = normkit.get(op)
    y, saved = f.forward(x, **kw)
    dx = f.backward(dy, x, saved, **kw)[0]
    assert _behind(y, x) and _behind(dx, x) and _behind(dx, dy), [
        a.ctypes.data % PAGE for a in (x, y, dx)]
    assert _aligned(y) and _aligned(dx)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_bench_places_outputs_behind_inputs(direction):
    """The bench times normkit's kernels on outputs placed as the NumPy frontend places them."""
    from normkit import bench, cases

    case = cases.select_cases("groupnorm", (2, 4, 64, 257), groups=2)[0]
    inputs = case.make_inputs()
    out = bench.prepare(case, direction, "cython", inputs).output()["y" if direction == "forward" else "dx"]
    assert out.nbytes >= ALIGN_MIN_BYTES
    assert _not_ahead(out, inputs["x"]) and (direction == "forward" or _not_ahead(out, inputs["dy"]))
    assert _behind(out, inputs["x"]) or _behind(out, inputs["dy"])
