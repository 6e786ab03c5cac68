"""bfloat16 and float16 in the frontends: NumPy (float16, ml_dtypes' bfloat16) and PyTorch (tensors, mixed float32
parameters, autograd, the custom ops, modules and models under torch.autocast). The kernels come from the
registry's order: the reference where no compiled backend declares 16-bit kernels, theirs where one does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from support import BACKENDS, ulps

import normkit
from normkit import half, reference, registry
from normkit.contract import HALF_DTYPES

ml_dtypes = pytest.importorskip("ml_dtypes")
NUMPY = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


# --- NumPy -----------------------------------------------------------------------------------------------------

def _calls(x, w, b):
    c = x.shape[1]
    rm, rv = np.linspace(-0.5, 0.5, c).astype(w.dtype), np.linspace(0.5, 2, c).astype(w.dtype)
    return {
        "batchnorm": (normkit.get("bn"), (x, None, None, w, b, True), {}),
        "batchnorm_infer": (normkit.get("bn"), (x, rm, rv, w, b, False), {}),
        "instancenorm": (normkit.get("in"), (x, None, None, w, b, True), {}),
        "groupnorm": (normkit.get("gn"), (x, 3, w, b), {}),
        "layernorm": (normkit.get("ln"), (x, x.shape[-1:], np.ones(x.shape[-1], w.dtype), None), {}),
    }


def test_byte_swapped_float16_parameters_get_float16_gradients():
    """A '>f2' weight is float16: its gradients are float16 (native order), as a native one's."""
    x = np.random.default_rng(0).standard_normal((4, 6, 5)).astype(np.float16)
    for op, args, pshape in ((normkit.get("gn"), (2,), 6), (normkit.get("rms"), (5,), 5)):
        w = np.ones(pshape, ">f2")
        y, saved = op.forward(x, *args, w)
        _, dw, *_ = op.backward(np.ones_like(y), x, saved, *args, w)
        assert dw.dtype == np.dtype(np.float16) and dw.dtype.isnative, op.name


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("params", ["float32", "same"])
def test_numpy_ops_take_16_bit_arrays(dtype, params):
    rng = np.random.default_rng(0)
    dt = NUMPY[dtype]
    pdt = np.dtype(np.float32) if params == "float32" else dt
    x64 = 3 + 2 * rng.standard_normal((4, 6, 7, 5))
    x = x64.astype(np.float32).astype(dt)
    w, b = (1 + 0.5 * rng.standard_normal(6)).astype(pdt), (0.5 * rng.standard_normal(6)).astype(pdt)
    for name, (op, args, kw) in _calls(x, w, b).items():
        before = x.copy()
        y, saved = op.forward(*args, **kw)
        assert y.dtype == dt and y.shape == x.shape and saved.mean.dtype == np.float32, name
        assert np.array_equal(x.view(np.uint16), before.view(np.uint16))  # input untouched
        # the float64 ops on the widened input, rounded once: exactly with the reference backend, within the
        # contract's 1 ulp (y) / 2 ulp (dx) with a compiled backend's float32 arithmetic (the registry's first)
        args64 = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args]
        y64 = op(*args64)
        assert ulps(y, half.narrow(y64, dtype)) <= (0 if saved.backend == "reference" else 1), name
        dy = rng.standard_normal(x.shape).astype(np.float32).astype(dt)
        dx, dw, db = op.backward(dy, args[0], saved, *args[1:], **kw)
        assert dx.dtype == dt
        if name != "layernorm":
            assert dw.dtype == pdt and db.dtype == pdt
        saved64 = normkit.ops.Saved(saved.mean.astype(np.float64), saved.rstd.astype(np.float64), saved.training,
                                    saved.backend)
        dx64, dw64, _ = op.backward(dy.astype(np.float64), args64[0], saved64, *args64[1:], **kw)
        assert ulps(dx, half.narrow(dx64, dtype)) <= (0 if saved.backend == "reference" else 2), name


@settings(max_examples=20)
@given(dtype=st.sampled_from(HALF_DTYPES), n=st.integers(1, 3), c=st.sampled_from([1, 2, 6]),
       s=st.integers(1, 9), offset=st.sampled_from([0.0, 100.0]), strided=st.booleans(), data=st.data())
def test_numpy_16_bit_shapes_match_the_rounded_float64_ops(dtype, n, c, s, offset, strided, data):
    """Awkward shapes (N=1, C=1, S=1, groups=C), offsets and strided inputs: the 16-bit result is the float64
    op's on the widened input, rounded once (the kernels come from the registry's order)."""
    groups = data.draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
    rng = np.random.default_rng(n * 100 + c * 10 + s)
    x = (offset + rng.standard_normal((n, c, 2 * s))).astype(np.float32).astype(NUMPY[dtype])
    x = x[:, :, ::2] if strided else np.ascontiguousarray(x[:, :, :s])
    w, b = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    x64 = x.astype(np.float64)
    for op, args in (("gn", (groups, w, b)), ("ln", ((s,),)), ("in", (None, None, w, b, True))):
        if (op == "in" and s == 1) or (op == "gn" and n * (c // groups) * s == 1):
            continue  # no statistics of one value (for groupnorm: one in the whole batch, which torch refuses)
        y = normkit.get(op)(x, *args)
        y64 = normkit.get(op)(x64, *[a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args])
        assert np.array_equal(y.view(np.uint16), half.narrow(y64, dtype)), op
    if n * s > 1:
        y = normkit.get("bn")(x, None, None, w, b, True)
        y64 = normkit.get("bn")(x64, None, None, w.astype(np.float64), b.astype(np.float64), True)
        assert np.array_equal(y.view(np.uint16), half.narrow(y64, dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("running", ["float32", "same"])
def test_numpy_running_statistics_update_in_their_own_dtype(dtype, running):
    dt = NUMPY[dtype]
    rdt = np.dtype(np.float32) if running == "float32" else dt
    x = np.random.default_rng(1).standard_normal((8, 4, 3)).astype(np.float32).astype(dt)
    rm, rv = np.zeros(4, rdt), np.ones(4, rdt)
    normkit.get("bn")(x, rm, rv, training=True, momentum=0.5)
    assert rm.dtype == rdt and rv.dtype == rdt
    x64 = x.astype(np.float64)
    want_mean = 0.5 * x64.mean(axis=(0, 2))
    want_var = 0.5 + 0.5 * x64.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(rm.astype(np.float64), want_mean, rtol=2 * float(np.finfo(rdt).eps), atol=1e-6)
    np.testing.assert_allclose(rv.astype(np.float64), want_var, rtol=2 * float(np.finfo(rdt).eps))


def test_numpy_16_bit_mixed_dtypes_follow_torch():
    x = np.ones((2, 4, 3), ml_dtypes.bfloat16)
    f32, bf = np.ones(4, np.float32), np.ones(4, ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="groupnorm: weight must have the input's dtype bfloat16 or float32, got "
                                        "float16"):
        normkit.get("gn")(x, 2, np.ones(4, np.float16))
    with pytest.raises(TypeError, match="groupnorm: with a bfloat16 input, weight, bias and running statistics must "
                                        "share one dtype \\(float32 or bfloat16\\), got weight float32, bias bfloat16"):
        normkit.get("gn")(x, 2, f32, bf)
    with pytest.raises(TypeError, match="batchnorm: with a bfloat16 input.*weight bfloat16, running_mean float32"):
        normkit.get("bn")(x, np.zeros(4, np.float32), np.ones(4, np.float32), bf, None, True)
    with pytest.raises(TypeError, match="layernorm: weight must have the input's dtype float32, got bfloat16"):
        normkit.get("ln")(np.ones((2, 4), np.float32), (4,), bf)
    with pytest.raises(TypeError, match="grad_output must have the input's dtype bfloat16, got float16"):
        y, s = normkit.get("gn").forward(x, 2)
        normkit.get("gn").backward(np.ones(x.shape, np.float16), x, s, 2)


def test_numpy_non_contiguous_and_byte_order_16_bit_inputs():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((4, 6, 10)).astype(np.float32).astype(ml_dtypes.bfloat16)
    x = base[:, :, ::2]
    y = normkit.get("gn")(x, 2)
    assert np.array_equal(y.view(np.uint16), normkit.get("gn")(np.ascontiguousarray(x), 2).view(np.uint16))
    h = rng.standard_normal((3, 4, 5)).astype(np.float16)
    swapped = h.astype(h.dtype.newbyteorder(">"))
    assert np.array_equal(normkit.get("in")(swapped), normkit.get("in")(h))


def test_numpy_primitives_round_once_to_16_bit():
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32).astype(ml_dtypes.bfloat16)
    mean, var = normkit.moments(x, [0])
    assert mean.dtype == x.dtype and var.dtype == x.dtype
    x64 = x.astype(np.float64)
    assert np.array_equal(var.view(np.uint16), half.narrow(x64.var(axis=0), "bfloat16"))
    y = normkit.batch_normalization(x, mean, var, None, None, 1e-3)
    assert y.dtype == x.dtype


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_numpy_primitives_on_0_d_results(dtype):
    """Every axis reduced (a 0-d result) and a 0-d input: NumPy's operators give a 0-d array's result as a scalar,
    which the rounding to bfloat16 assigned into (a TypeError)."""
    x = np.array([1.0, 2.0, 3.0], NUMPY[dtype])
    mean, var = normkit.moments(x, [0])
    assert mean.shape == var.shape == () and mean.dtype == var.dtype == x.dtype
    assert float(mean) == 2.0 and var.view(np.uint16) == half.narrow(np.float64(2 / 3), dtype)
    y = normkit.batch_normalization(x[2], mean, np.ones((), x.dtype), None, None, 0.0)
    assert y.shape == () and y.dtype == x.dtype and float(y) == 1.0
    assert half.narrow(np.float32("nan"), dtype).shape == ()


# The fused residual add (add_forward / add_backward) on 16-bit data: the fused kernel of a backend that has it
# for the dtype (through a spy that records which kernels run), the sum then the norm for one that has not.

ROW_OPS = ("layernorm", "rmsnorm")
ADD_SHAPE = (5, 1100)  # rows longer than one 16-bit tile of the Cython kernels (1024 values)


def _spy_backend(name, op, dtype, inner, seen, directions):
    """A backend whose ``directions`` of ``op`` are ``inner``'s own 16-bit kernels, recording each call in seen."""
    def spy(direction):
        kernel = registry.lookup(op, direction, dtype, inner)[1]

        def run(*args):
            seen.append(direction)
            kernel(*args)
        return run
    normkit.register_backend(normkit.Backend(name, registry.runtime_module(
        {(op, d, dtype): spy(d) for d in directions}), {op: directions}, dtypes=(dtype,)))


def _add_inputs(op, dt, pdt, seed, shape=ADD_SHAPE):
    rng = np.random.default_rng(seed)
    k = shape[1]
    x, r, dy, dh = (rng.standard_normal(shape).astype(np.float32).astype(dt) for _ in range(4))
    w = (1 + 0.5 * rng.standard_normal(k)).astype(np.float32).astype(pdt)
    kw = {"weight": w}
    if op == "layernorm":
        kw["bias"] = (0.5 * rng.standard_normal(k)).astype(np.float32).astype(pdt)
    return x, r, dy, dh, kw


def _numpy_add_pass(op, x, r, dy, dh, kw, backend):
    nk = normkit.get(op)
    y, h, saved = nk.add_forward(x, r, (x.shape[-1],), **kw, backend=backend)
    dx, dw, db = nk.add_backward(dy, dh, h, saved, (x.shape[-1],), **kw, backend=backend)
    return {"y": y, "h": h, "mean": saved.mean, "rstd": saved.rstd, "dx": dx, "dweight": dw, "dbias": db}


def _assert_add_like_reference(got, want, dtype, pdt, what, bias=None):
    """The contract's 16-bit accuracy against the reference's fused add (float64 on the exact sum, rounded once):
    h exact, y within 1 ulp (or, where xhat * w and the bias nearly cancel, a few float32 roundings of their size:
    the kernels compute y in float32), the float32 statistics as a float32 kernel's; dx and the parameter gradients
    (sums over rows, rounded to the parameters' dtype) within a few roundings of their scale."""
    half_ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    assert np.array_equal(got["h"].view(np.uint16), want["h"].view(np.uint16)), what
    if bias is None:
        assert ulps(got["y"], want["y"].view(np.uint16)) <= 1, what
    else:
        yg, yw = got["y"].astype(np.float64), want["y"].astype(np.float64)
        slack = 8 * 2.0**-24 * (np.abs(yw) + 2 * np.abs(bias.astype(np.float64)))
        far = np.abs(yg - yw) > slack
        if far.any():
            assert ulps(got["y"][far], want["y"][far].view(np.uint16)) <= 1, what
    for name in ("mean", "rstd"):
        if want[name] is None:
            assert got[name] is None, what
        else:
            assert got[name].dtype == np.float32, what
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{what} {name}")
    for name, rel in (("dx", 4 * half_ulp), ("dweight", 1e-4 if pdt == np.float32 else 4 * half_ulp),
                      ("dbias", 1e-4 if pdt == np.float32 else 4 * half_ulp)):
        if want[name] is None:
            assert got[name] is None, what
            continue
        assert got[name].dtype == want[name].dtype, what
        g, e = got[name].astype(np.float64), want[name].astype(np.float64)
        assert np.abs(g - e).max() <= rel * np.abs(e).max(), f"{what} {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("params", ["float32", "same"])
def test_numpy_16_bit_add_forms_run_the_fused_kernel(backend, op, dtype, params):
    dt = NUMPY[dtype]
    pdt = np.dtype(np.float32) if params == "float32" else dt
    x, r, dy, dh, kw = _add_inputs(op, dt, pdt, seed=len(op) + len(dtype))
    want = _numpy_add_pass(op, x, r, dy, dh, kw, "reference")
    seen = []
    _spy_backend("spy16add", op, dtype, backend, seen, ("forward", "backward", "add_forward", "add_backward"))
    try:
        got = _numpy_add_pass(op, x, r, dy, dh, kw, "spy16add")
    finally:
        normkit.unregister_backend("spy16add")
    assert seen == ["add_forward", "add_backward"]
    assert got["y"].dtype == dt and got["dx"].dtype == dt and got["dweight"].dtype == pdt
    _assert_add_like_reference(got, want, dtype, pdt, f"{backend} {op} {dtype} params {params}")


# Rows over 65536 values in fewer than four blocks of rows: the backward of both backends shares each row among the
# threads by pieces ((3, 70001): few rows; (5, 270001): partial sums beyond the budget), each piece with its own
# weight and bias accumulators; so does Cython's for up to 16 rows over 16384 values, in groups of rows ((16, 40000):
# groups of 6 rows on two threads, of 3 on one, the last one shorter).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(3, 70001), (5, 270001), (16, 40000)], ids=str)
def test_numpy_16_bit_add_forms_on_long_rows(backend, op, dtype, shape):
    dt = NUMPY[dtype]
    x, r, dy, dh, kw = _add_inputs(op, dt, np.dtype(np.float32), seed=shape[0], shape=shape)
    want = _numpy_add_pass(op, x, r, dy, dh, kw, "reference")
    got = _numpy_add_pass(op, x, r, dy, dh, kw, backend)
    _assert_add_like_reference(got, want, dtype, np.float32, f"{backend} {op} {dtype} {shape}", kw.get("bias"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_numpy_16_bit_add_forms_with_non_finite_sums(backend, op, dtype):
    """A NaN and an inf in the residual of two rows, and in a third a sum beyond the format's range (not float32's):
    h holds them as the reference rounds the sum, the first two rows' y and dx hold NaN where the reference's do,
    and the third row, whose float32 sum is finite, is normalized as accurately as the others."""
    dt = NUMPY[dtype]
    x, r, dy, dh, kw = _add_inputs(op, dt, np.dtype(np.float32), seed=11)
    r[0, 5], r[1, 1099] = np.nan, np.inf
    x[2, 17], r[2, 17] = (60000.0, 60000.0) if dtype == "float16" else (2.0**127, 2.0**127 * (1 - 2.0**-8))
    want = _numpy_add_pass(op, x, r, dy, dh, kw, "reference")
    got = _numpy_add_pass(op, x, r, dy, dh, kw, backend)
    h, h_want = got["h"], want["h"]
    assert np.isinf(h_want[2, 17]) and np.array_equal(np.isnan(h), np.isnan(h_want))
    assert np.array_equal(h.view(np.uint16)[~np.isnan(h)], h_want.view(np.uint16)[~np.isnan(h_want)])
    for name in ("y", "dx"):
        assert np.array_equal(np.isnan(got[name]), np.isnan(want[name])), name
    assert np.isnan(got["y"][:2]).any(axis=1).all()
    assert ulps(got["y"][2:], want["y"][2:].view(np.uint16)) <= 1


@pytest.mark.parametrize("op", ROW_OPS)
def test_numpy_16_bit_add_forms_without_a_fused_kernel_compose(op):
    """A backend with the plain kernels only: the 16-bit sum, then the norm (of that rounded sum); the same h, and
    y within a few bfloat16 roundings of its scale (normalizing the rounded rather than the exact sum adds some)."""
    x, r, dy, dh, kw = _add_inputs(op, NUMPY["bfloat16"], np.dtype(np.float32), seed=7)
    want = _numpy_add_pass(op, x, r, dy, dh, kw, "reference")
    seen = []
    _spy_backend("spy16plain", op, "bfloat16", BACKENDS[0], seen, ("forward", "backward"))
    try:
        got = _numpy_add_pass(op, x, r, dy, dh, kw, "spy16plain")
    finally:
        normkit.unregister_backend("spy16plain")
    assert seen == ["forward", "backward"]
    assert np.array_equal(got["h"].view(np.uint16), want["h"].view(np.uint16))
    y, y_want = got["y"].astype(np.float64), want["y"].astype(np.float64)
    assert np.abs(y - y_want).max() <= 4 * 2.0**-8 * np.abs(y_want).max()
    assert got["dx"].dtype == x.dtype and got["dweight"].dtype == np.float32


def _rows_below_resolution(op, dtype, seed):
    """Rows of 1.0 and residuals of up to 3 ulps of 1.0: the 16-bit sum rounds them to a few values, whose spread
    differs from the exact sum's by more than the rows' own spread."""
    dt = NUMPY[dtype]
    rng = np.random.default_rng(seed)
    shape = (4, 64)
    r = rng.uniform(-3, 3, shape) * half.ulp(np.ones(1), dtype)
    dy = rng.standard_normal(shape)
    kw = {"weight": (1 + 0.5 * rng.standard_normal(64)).astype(np.float32)}
    if op == "layernorm":
        kw["bias"] = rng.standard_normal(64).astype(np.float32)
    return np.ones(shape, dt), r.astype(np.float32).astype(dt), dy.astype(np.float32).astype(dt), kw


@pytest.mark.parametrize("backend", (*BACKENDS, "reference"))
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_numpy_16_bit_add_normalizes_the_rounded_sum(backend, op, dtype):
    """The fused forms normalize the h they return (the sum rounded to 16 bits), as the 16-bit add then the norm
    does, so that backward, which reads h, differentiates what forward normalized: y and dx as that composition's
    within an ulp. With the exact sum's statistics and the rounded h, dx was off by 7.5 in 1062 (float16)."""
    x, r, dy, kw = _rows_below_resolution(op, dtype, seed=5)
    got = _numpy_add_pass(op, x, r, dy, None, kw, backend)
    nk, h = normkit.get(op), x + r
    y, saved = nk.forward(h, (64,), **kw, backend=backend)
    dx = nk.backward(dy, h, saved, (64,), **kw, backend=backend)[0]
    assert np.array_equal(got["h"].view(np.uint16), h.view(np.uint16))
    assert ulps(got["y"], y.view(np.uint16)) <= 1
    assert ulps(got["dx"], dx.view(np.uint16)) <= 1


# --- PyTorch ---------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normkit.torch as nt  # noqa: E402

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_torch_kernels_get_views_not_copies(dtype, monkeypatch):
    """The 16-bit data reach the kernel as uint16 views of the tensors' memory; the output is written in place."""
    seen = {}
    kernel = reference.KERNELS[("groupnorm", "forward", dtype)]

    def spy(x, groups, w, b, eps, y, mean, rstd):
        seen.update(x=x, y=y, w=w)
        kernel(x, groups, w, b, eps, y, mean, rstd)

    normkit.register_backend(normkit.Backend("spy16", normkit.registry.runtime_module(
        {("groupnorm", "forward", dtype): spy}), {"groupnorm": ("forward",)}, dtypes=(dtype,)))
    try:
        x = torch.randn(2, 4, 3).to(TORCH[dtype])
        y = nt.group_norm(x, 2, torch.ones(4), None, backend="spy16")
    finally:
        normkit.unregister_backend("spy16")
    assert seen["x"].dtype == np.uint16 and seen["x"].ctypes.data == x.data_ptr()
    assert seen["y"].ctypes.data == y.data_ptr() and seen["w"].dtype == np.float32
    assert y.dtype == x.dtype


def test_torch_16_bit_errors_follow_torch():
    x = torch.ones(2, 4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="groupnorm: weight must have the input's dtype float32, got bfloat16"):
        nt.group_norm(torch.ones(2, 4, 3), 2, torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="weight must have the input's dtype bfloat16 or float32, got float16"):
        nt.layer_norm(x, (3,), torch.ones(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="must share one dtype .*weight bfloat16, running_mean float32"):
        nt.batch_norm(x, torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.bfloat16), None, True)
    for f in (F, nt):  # torch refuses the same
        with pytest.raises((TypeError, RuntimeError)):
            f.group_norm(x, 2, torch.ones(4), torch.ones(4, dtype=torch.bfloat16))


def test_layers_without_a_16_bit_path_say_so():
    x = torch.randn(2, 4, 3, 3).bfloat16()
    for layer in (nt.BatchRenorm2d(4), nt.GhostBatchNorm2d(4, virtual_batch_size=1)):
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: training takes a float32 or float64 input, "
                                            f"got bfloat16"):
            layer(x)
    assert nt.BatchRenorm2d(4).eval()(x).dtype == torch.bfloat16  # eval is plain batch_norm


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_torch_running_statistics_in_their_own_dtype(dtype):
    for rdt in (torch.float32, TORCH[dtype]):
        x = torch.randn(8, 4, 3).to(TORCH[dtype])
        rm, rv = torch.zeros(4, dtype=rdt), torch.ones(4, dtype=rdt)
        rm_t, rv_t = rm.clone(), rv.clone()
        nt.batch_norm(x, rm, rv, None, None, True, 0.5)
        F.batch_norm(x, rm_t, rv_t, None, None, True, 0.5)
        assert rm.dtype == rdt and rv.dtype == rdt
        torch.testing.assert_close(rm, rm_t, atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(rv, rv_t, atol=2e-3, rtol=1e-2)


def _forward_samples(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g).to(dtype)
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    wh, bh = w.to(dtype), b.to(dtype)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    ops = torch.ops.normkit
    return [
        (ops.batch_norm, (x, w, b, None, None, True, 1e-5, None)),
        (ops.batch_norm, (x, wh, None, rm.to(dtype), rv.to(dtype), False, 1e-3, None)),
        (ops.instance_norm, (x, w, b, rm, rv, False, 1e-5, None)),
        (ops.group_norm, (x, 2, wh, bh, 1e-5, None)),
        (ops.layer_norm, (x, [5], torch.randn(5, generator=g), None, 1e-5, None)),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_custom_ops_opcheck_16_bit(dtype):
    ops = torch.ops.normkit
    for op, args in _forward_samples(dtype):
        torch.library.opcheck(op, args)
        x = args[0]
        _, mean, rstd = op(*args)
        assert mean.dtype == torch.float32
        dy = torch.randn(x.shape).to(dtype)
        if op in (ops.batch_norm, ops.instance_norm):
            backward = ops.batch_norm_backward if op is ops.batch_norm else ops.instance_norm_backward
            bargs = (dy, x, mean, rstd, args[1], args[5], True, args[2] is not None, None)
        else:
            backward = ops.group_norm_backward if op is ops.group_norm else ops.layer_norm_backward
            bargs = (dy, x, mean, rstd, args[1], args[2], True, args[3] is not None, None)
        torch.library.opcheck(backward, bargs)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    for w in (torch.randn(5), torch.randn(5).to(dtype), None):
        args = (x, [5], w, 1e-6, None)
        torch.library.opcheck(ops.rms_norm, args)
        _, rstd = ops.rms_norm(*args)
        for weight_grad in (True, False) if w is not None else (False,):
            # (weight_grad False: the empty placeholder was of x's dtype where the fake one is float32)
            torch.library.opcheck(ops.rms_norm_backward, (torch.randn(x.shape).to(dtype), x, rstd, [5], w,
                                                          weight_grad, None))


# --- models under torch.autocast -------------------------------------------------------------------------------

def _assert_model_like_torch(model, inputs, dtype, atol):
    """model (torch.nn) and its converted twin, under autocast, from the same weights: output dtype and values,
    parameter and gradient dtypes, gradients, running statistics."""
    twin = nt.convert(copy.deepcopy(model))
    outs = []
    for m in (model, twin):
        with torch.autocast("cpu", dtype=dtype):
            y = m(*inputs)
        g = torch.Generator().manual_seed(7)
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype
    scale = outs[0].float().abs().max().item()
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=atol * scale, rtol=0)
    # gradients on the scale of the largest one: a bias before a norm layer that removes per-channel constants
    # (GroupNorm with a channel per group) has a gradient of exactly 0, and what autograd computes is noise
    grad_scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert q.dtype == p.dtype and q.grad.dtype == p.grad.dtype, name
        torch.testing.assert_close(q.grad, p.grad, atol=atol * grad_scale, rtol=0, msg=name)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(b.float(), a.float(), atol=atol * (1 + a.float().abs().max().item()), rtol=0,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("stack", ["bn_relu", "gn_silu"])
def test_converted_cnn_under_autocast_matches_torch(stack, dtype):
    torch.manual_seed(0)
    if stack == "bn_relu":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    else:
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                              nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                              nn.Conv2d(32, 3, 1))
    x = torch.randn(4, 3, 12, 12)
    # one 16-bit ulp of difference in a norm layer's output moves the next layers' by about as much
    atol = 4 * float(torch.finfo(dtype).eps)
    _assert_model_like_torch(model, (x,), dtype, atol)
    # eval mode: running statistics
    model.eval()
    twin = nt.convert(copy.deepcopy(model)).eval()
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        y, y_nk = model(x), twin(x)
    assert y_nk.dtype == y.dtype
    torch.testing.assert_close(y_nk.float(), y.float(), atol=atol * y.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ["resnet", "unet", "transformer"])
def test_normkit_models_under_bf16_autocast(name):
    from normkit.torch.models import MODELS

    model, inputs = MODELS[name](quick=True)
    _assert_model_like_torch(model, inputs, torch.bfloat16, 8 * float(torch.finfo(torch.bfloat16).eps))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("same", [True, False], ids=["weight_16_bit", "weight_float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_compile_16_bit_rms_norm_matches_eager(dtype, same):
    """rms_norm's custom ops on 16-bit data under torch.compile: the fakes give rstd and dweight in float32, as the
    kernels do (they gave the input's dtype, and the backward's check refused the real rstd), and dweight comes back
    in the weight's dtype, as in eager."""
    g = torch.Generator().manual_seed(0)
    wdtype = dtype if same else torch.float32
    x0, w0 = torch.randn(4, 16, generator=g).to(dtype), torch.randn(16, generator=g).to(wdtype)
    outs = []
    for compiled in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        f = (lambda a, b: nt.rms_norm(a, (16,), b, 1e-5))
        y = (torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f)(x, w)
        y.float().pow(2).sum().backward()
        outs.append((y, x.grad, w.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    assert outs[0][2].dtype == wdtype


def test_torch_compile_under_autocast_matches_eager():
    """The custom ops under torch.compile with 16-bit inputs and float32 parameters: fake outputs of the right
    dtypes (fullgraph: no graph break), the same results as eager. aot_eager traces with fake tensors and autograd
    as inductor does, without inductor's C++ compilation (minutes on a shared machine)."""
    torch.manual_seed(0)
    model = nt.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(),
                                     nn.Linear(8 * 25, 16), nn.LayerNorm(16)))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 5, 5)
    proj = torch.randn(4, 16)
    outs = []
    for m in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        (y.float() * proj).sum().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert q.grad.dtype == p.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, float32 weight
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("params", ["float32", "same"])
def test_torch_16_bit_add_forms_run_the_fused_kernel(backend, op, dtype, params):
    """add_layer_norm / add_rms_norm on 16-bit tensors: the fused kernels (bit views of the tensors), the NumPy
    frontend's results bit for bit, and gradients of x, residual and the parameters in their own dtypes; close to
    torch's x + r then the norm."""
    dt, tdt = NUMPY[dtype], TORCH[dtype]
    pdt = np.dtype(np.float32) if params == "float32" else dt
    x, r, dy, dh, kw = _add_inputs(op, dt, pdt, seed=3)
    want = _numpy_add_pass(op, x, r, dy, dh, kw, backend)

    def tensor(a):
        return torch.from_numpy(a.view(np.int16)).view(tdt).clone().requires_grad_()
    tx, tr, tdy, tdh = (tensor(a) for a in (x, r, dy, dh))
    tp = {name: tensor(p) if p.dtype == dt else torch.from_numpy(p).requires_grad_() for name, p in kw.items()}
    k = (x.shape[-1],)
    seen = []
    _spy_backend("spy16add", op, dtype, backend, seen, ("forward", "backward", "add_forward", "add_backward"))
    try:
        if op == "layernorm":
            y, h = nt.add_layer_norm(tx, tr, k, tp["weight"], tp["bias"], backend="spy16add")
        else:
            y, h = nt.add_rms_norm(tx, tr, k, tp["weight"], backend="spy16add")
        grads = torch.autograd.grad((y, h), (tx, tr, *tp.values()), (tdy, tdh))
    finally:
        normkit.unregister_backend("spy16add")
    assert seen == ["add_forward", "add_backward"]

    def bits(t):
        return t.detach().view(torch.int16).numpy().view(np.uint16)
    assert y.dtype == h.dtype == tdt and np.array_equal(bits(y), want["y"].view(np.uint16))
    assert np.array_equal(bits(h), want["h"].view(np.uint16))
    for g in grads[:2]:  # x and residual: the same gradient
        assert g.dtype == tdt and np.array_equal(bits(g), want["dx"].view(np.uint16))
    for g, name in zip(grads[2:], ("dweight", "dbias")):
        assert g.dtype == tp[{"dweight": "weight", "dbias": "bias"}[name]].dtype
        np.testing.assert_array_equal(g.float().numpy(), want[name].astype(np.float32))
    with torch.no_grad():
        hh = tx + tr
        ref = F.layer_norm(hh, k, tp["weight"], tp["bias"]) if op == "layernorm" else F.rms_norm(hh, k, tp["weight"])
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, float32 weight
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_torch_16_bit_add_forms_on_rows_below_resolution_follow_torch(op, dtype):
    """On the rows of test_numpy_16_bit_add_normalizes_the_rounded_sum: add_layer_norm / add_rms_norm give torch's
    x + r then the norm, forward and the gradient of x, within torch's own float32 rounding."""
    x, r, dy, kw = _rows_below_resolution(op, dtype, seed=6)
    tdt = TORCH[dtype]

    def tensor(a):
        return torch.from_numpy(a.view(np.int16)).view(tdt).clone()
    tx, tr, tdy = tensor(x).requires_grad_(), tensor(r), tensor(dy)
    w, b = torch.from_numpy(kw["weight"]), torch.from_numpy(kw["bias"]) if "bias" in kw else None
    if op == "layernorm":
        y = nt.add_layer_norm(tx, tr, (64,), w, b)[0]
        want = F.layer_norm(tx + tr, (64,), w, b)
    else:
        y = nt.add_rms_norm(tx, tr, (64,), w)[0]
        want = F.rms_norm(tx + tr, (64,), w)
    (dx,), (dx_want,) = torch.autograd.grad(y, tx, tdy), torch.autograd.grad(want, tx, tdy)
    half_ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    for got, exp in ((y, want), (dx, dx_want)):
        assert got.dtype == tdt
        err = (got.double() - exp.double()).abs().max().item()
        assert err <= 4 * half_ulp * exp.double().abs().max().item()
