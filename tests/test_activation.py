"""Fused activations on the NumPy side: normkit.activation's functions and the reference's act_ kernels against
torch (forward and autograd) and finite differences, the NumPy frontend's ``activation=`` on every op, the
composition a backend without fused kernels gets, and clear errors. (The conformance kit holds every backend's act_
kernels to the reference: test_conformance.py and the backends' own tests.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normkit
from normkit import activation, reference, registry
from normkit.contract import ACTIVATIONS, SPECS
from normkit.registry import Backend, runtime_module

F = torch.nn.functional
ACT_OPS = [op for op, spec in SPECS.items() if spec.activation]
TORCH_ACT = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "silu": F.silu, "gelu": F.gelu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def torch_norm(op, x, w, b, rm=None, rv=None):
    if op == "batchnorm":
        return F.batch_norm(x, rm, rv, w, b, training=rm is None)
    if op == "instancenorm":
        return F.instance_norm(x, rm, rv, w, b, use_input_stats=rm is None)
    if op == "groupnorm":
        return F.group_norm(x, 3, w, b)
    return F.layer_norm(x, x.shape[-2:], w, b)


def nk_args(op, x, w, b, rm=None, rv=None):
    """(positional args, keyword args) of the NumPy op for the same call."""
    if op in ("batchnorm", "instancenorm"):
        flag = "training" if op == "batchnorm" else "use_input_stats"
        return (x, rm, rv, w, b), {flag: rm is None}
    if op == "groupnorm":
        return (x, 3, w, b), {}
    return (x, x.shape[-2:], w.reshape(x.shape[-2:]), b.reshape(x.shape[-2:])), {}


def data(op, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shape = (3, 6, 4, 5)
    c = 20 if op == "layernorm" else 6
    x = (2.0 + rng.standard_normal(shape)).astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(c)).astype(dtype)
    b = (0.3 * rng.standard_normal(c)).astype(dtype)
    return x, w, b, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_functions_match_torch(name):
    z = np.concatenate([np.linspace(-9, 9, 301), [-40.0, -1e-30, 0.0, 1e-30, 40.0]])
    act = ACTIVATIONS.index(name)
    zt = torch.tensor(z, requires_grad=True)
    y = TORCH_ACT[name](zt)
    y.backward(torch.ones_like(y))
    # torch's gelu_tanh cancels in 1 + tanh(u) for z << 0 (normkit's does not): absolute errors of eps * |z|
    np.testing.assert_allclose(activation.apply(act, z, 0.2), y.detach().numpy(), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(activation.derivative(act, z, 0.2), zt.grad.numpy(), rtol=1e-13, atol=1e-14)
    with np.errstate(invalid="ignore"):
        assert np.isnan(activation.apply(act, np.array([np.nan]), 0.2)).all()


def test_gelu_keeps_the_digits_of_its_negative_tail():
    """Phi(z) as erfc(-z / sqrt(2)) / 2: 1 + erf(z / sqrt(2)) cancels to a multiple of 2**-53 below z = -8 (Phi's
    values from the series, to 15 digits)."""
    z = np.array([-8.0, -10.0, -20.0])
    phi = np.array([6.22096057427178e-16, 7.61985302416047e-24, 2.75362411860623e-89])
    pdf = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    gelu = ACTIVATIONS.index("gelu")
    np.testing.assert_allclose(activation.apply(gelu, z, 0.0), z * phi, rtol=1e-13)
    np.testing.assert_allclose(activation.derivative(gelu, z, 0.0), phi + z * pdf, rtol=1e-13)


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_derivative_at_nan_is_torchs(name):
    """torch's relu backward passes dy at a NaN (its test is result <= 0), leaky_relu's scales it by the slope
    (its test is z > 0): in a set with a NaN, dbias (the sum of dy * act'(z)) is the dy torch's has, in every
    backend."""
    act = ACTIVATIONS.index(name)
    zt = torch.tensor([np.nan, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    TORCH_ACT[name](zt).backward(torch.ones(3, dtype=torch.float64))
    np.testing.assert_array_equal(activation.derivative(act, zt.detach().numpy(), 0.2), zt.grad.numpy())
    x = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 4.0]], np.float32)
    w, b, dy = np.ones(3, np.float32), np.zeros(3, np.float32), np.ones((2, 3), np.float32)
    xt, bt = torch.tensor(x), torch.zeros(3, requires_grad=True)
    TORCH_ACT[name](F.layer_norm(xt, (3,), torch.ones(3), bt)).backward(torch.tensor(dy))
    ln = normkit.get("ln")
    for backend in ("reference", "cython", "numba"):
        _, saved = ln.forward(x, (3,), w, b, activation=name, negative_slope=0.2, backend=backend)
        db = ln.backward(dy, x, saved, (3,), w, b, activation=name, negative_slope=0.2, backend=backend)[2]
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-6, err_msg=backend)


@pytest.mark.parametrize("training", [True, False])
def test_relu_passes_no_nan_from_an_inactive_unit(training):
    """torch's relu backward is a select (threshold_backward): a unit with z <= 0 passes 0 even where grad_output
    is NaN, so the rest of its set keeps finite gradients; normkit's took dy * 0 = NaN there, which spread to
    the whole set (training) and to dbias, in every backend."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = (None, None) if training else (np.zeros(3, np.float32), np.ones(3, np.float32))
    xt, bt = torch.tensor(x, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64,
                                                                                requires_grad=True)
    z = F.batch_norm(xt, None if training else torch.tensor(rm, dtype=torch.float64),
                     None if training else torch.tensor(rv, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                     bt, training=training)
    inactive = tuple(np.argwhere(z.detach().numpy()[:, 1] <= 0)[0])  # a unit of channel 1 that relu turns off
    dy[:, 1][inactive] = np.nan
    F.relu(z).backward(torch.tensor(dy, dtype=torch.float64))
    assert np.isfinite(xt.grad.numpy()).all() and np.isfinite(bt.grad.numpy()).all()
    bn = normkit.get("bn")
    for backend in ("reference", "cython", "numba"):
        _, saved = bn.forward(x, rm, rv, w, b, training=training, activation="relu", backend=backend)
        dx, _, db = bn.backward(dy, x, saved, rm, rv, w, b, training=training, activation="relu", backend=backend)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-5, err_msg=backend)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_nonfinite_input_in_inference_gives_torchs_gradients(name, bad):
    """BatchNorm in inference with a NaN or an infinite x: dx at that element and dbias as torch's norm then
    activation give them, NaN where torch's are NaN and finite where they are finite (leaky_relu passes dy times
    the slope at a NaN), in every backend and for shapes of each of the Numba schedules (act_rows: S = 17, 100;
    the flat view: S = 5). Cython's gelu_tanh derivative gave a finite value at a NaN or infinite z, and Numba's
    dx at a NaN x was NaN on act_rows (its (x - m) * 0 term)."""
    for s in (5, 17, 100):
        rng = np.random.default_rng(s)
        x = rng.standard_normal((2, 3, s)).astype(np.float32)
        x[1, 1, 3] = bad
        dy = rng.standard_normal(x.shape).astype(np.float32)
        w, b = np.array([0.5, -1.5, 2.0], np.float32), np.array([0.1, 0.2, -0.3], np.float32)
        rm, rv = np.array([0.1, -0.2, 0.3], np.float32), np.array([1.5, 0.5, 2.0], np.float32)
        xt, wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
        z = F.batch_norm(xt, torch.tensor(rm, dtype=torch.float64), torch.tensor(rv, dtype=torch.float64), wt, bt)
        TORCH_ACT[name](z).backward(torch.tensor(dy, dtype=torch.float64))
        want_dx, want_db = xt.grad[1, 1, 3].item(), bt.grad[1].item()
        bn = normkit.get("bn")
        for backend in ("reference", "cython", "numba"):
            _, saved = bn.forward(x, rm, rv, w, b, training=False, activation=name, negative_slope=0.2,
                                  backend=backend)
            dx, _, db = bn.backward(dy, x, saved, rm, rv, w, b, training=False, activation=name,
                                    negative_slope=0.2, backend=backend)
            where = f"{backend}, S={s}"
            assert np.isnan(dx[1, 1, 3]) == np.isnan(want_dx), where
            assert np.isnan(db[1]) == np.isnan(want_db), where
            if not np.isnan(want_dx):
                np.testing.assert_allclose(dx[1, 1, 3], want_dx, rtol=1e-5, err_msg=where)
                np.testing.assert_allclose(db[1], want_db, rtol=1e-5, err_msg=where)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_a_nan_bias_gives_nan_gradients(name):
    """A NaN z from finite x (a NaN bias, or statistic): act'(z) is NaN in every backend, as in torch. Numba's
    float32 gelu_tanh derivative, from two sigmoids of a NaN (finite, from its exp) whose product underflowed,
    gave about 1e-38."""
    x = np.array([-3.0, -0.5, 0.0, 0.5, 3.0], np.float32).reshape(1, 1, -1)
    act = ACTIVATIONS.index(name)
    for backend in ("reference", "cython", "numba"):
        for dtype in (np.float32, np.float64):
            kernel = registry.lookup("batchnorm", "act_backward_infer", np.dtype(dtype).name, backend)[1]
            xx = x.astype(dtype)
            dx, dw, db = np.empty_like(xx), np.empty(1, dtype), np.empty(1, dtype)
            kernel(np.ones_like(xx), xx, np.zeros(1, dtype), np.ones(1, dtype), np.ones(1, dtype),
                   np.full(1, np.nan, dtype), act, 0.0, dx, dw, db)
            assert np.isnan(dx).all() and np.isnan(db).all(), (backend, np.dtype(dtype).name)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_derivatives_match_finite_differences(name):
    z, h, act = np.linspace(-6, 6, 97), 1e-6, ACTIVATIONS.index(name)
    numeric = (activation.apply(act, z + h, 0.2) - activation.apply(act, z - h, 0.2)) / (2 * h)
    np.testing.assert_allclose(activation.derivative(act, z, 0.2), numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("op, training", [(op, t) for op in ACT_OPS for t in (True, False) if t or SPECS[op].running])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_frontend_matches_torch(op, name, training):
    """normkit.get(op).forward / backward with activation= (the reference's act_ kernels) against torch's norm then
    activation, with autograd."""
    x, w, b, dy = data(op)
    rm = rv = None
    if not training:
        rm, rv = np.linspace(1.5, 2.5, 6), np.linspace(0.5, 2.0, 6)
    args, kw = nk_args(op, x, w, b, rm, rv)
    nk = normkit.get(op)
    y, saved = nk.forward(*args, **kw, activation=name, negative_slope=0.2, backend="reference")
    dx, dw, db = nk.backward(dy, x, saved, *args[1:], **kw, activation=name, negative_slope=0.2, backend="reference")
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    rmt, rvt = (None, None) if training else (torch.tensor(rm), torch.tensor(rv))
    wv, bv = (wt.reshape(x.shape[-2:]), bt.reshape(x.shape[-2:])) if op == "layernorm" else (wt, bt)
    yt = TORCH_ACT[name](torch_norm(op, xt, wv, bv, rmt, rvt))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dw.reshape(-1), wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db.reshape(-1), bt.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", ["batchnorm", "groupnorm"])
def test_reference_backward_matches_finite_differences(op):
    """The act_ backward of the reference is the gradient of its act_ forward (gelu: the smooth case with the most
    curvature): a directional derivative along a random direction, against the loss sum(dy * y)."""
    x, w, b, dy = data(op)
    args, kw = nk_args(op, x, w, b)
    nk = normkit.get(op)
    y, saved = nk.forward(*args, **kw, activation="gelu", backend="reference")
    dx, dw, db = nk.backward(dy, x, saved, *args[1:], **kw, activation="gelu", backend="reference")
    rng = np.random.default_rng(1)
    v, h = rng.standard_normal(x.shape), 1e-6

    def loss(xx):
        return float(np.sum(dy * nk.forward(xx, *args[1:], **kw, activation="gelu", backend="reference")[0]))
    numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    assert numeric == pytest.approx(float(np.sum(dx * v)), rel=1e-6)


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_float32_frontend_matches_reference(backend):
    """The built-in backends (fused kernels, or their plain kernels composed) through the frontend, float32."""
    for op in ACT_OPS:
        x, w, b, dy = data(op, dtype=np.float32)
        args, kw = nk_args(op, x, w, b)
        nk = normkit.get(op)
        got = nk.forward(*args, **kw, activation="silu", backend=backend)
        want = nk.forward(*args, **kw, activation="silu", backend="reference")
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
        g = nk.backward(dy, x, got[1], *args[1:], **kw, activation="silu", backend=backend)
        r = nk.backward(dy, x, want[1], *args[1:], **kw, activation="silu", backend="reference")
        for a, e in zip(g, r):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_fused_gelus_keep_their_negative_tails(backend, name):
    """z from -7.7 to -4.3, where gelu's y is 1e-14 to 1e-5 of |z|: bfloat16 y within one of its ulps of the
    float64 result, dx within two, float32 y within 2e-5 of it (gelu's Phi was Abramowitz & Stegun's erf, whose
    absolute error left y 3 bfloat16 ulps off below z = -4.5 and 1e7 times too large at z = -8; Numba's
    gelu_tanh cancelled 1 + tanh u to 0 there)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ln = normkit.get("ln")
    x64 = np.linspace(-1, 1, 1001)[None, :]
    dy64 = np.linspace(0.5, 1.5, 1001)[None, :]
    bias = np.full(1001, -6.0)
    kw = dict(activation=name)

    def run(dtype, be):
        x, dy, b = x64.astype(dtype), dy64.astype(dtype), bias.astype(np.float32 if dtype != np.float64 else dtype)
        y, saved = ln.forward(x, (1001,), None, b, backend=be, **kw)
        return y, ln.backward(dy, x, saved, (1001,), None, b, backend=be, **kw)[0]

    bf16 = ml_dtypes.bfloat16
    got_y, got_dx = run(bf16, backend)
    want_y, want_dx = run(bf16, "reference")  # the float64 results rounded once

    def ulps(a, b):  # bfloat16 ulps between a and b's nearest bfloat16
        key = [np.ascontiguousarray(v.astype(bf16)).view(np.uint16).astype(np.int64) for v in (a, b)]
        key = [np.where(k >= 0x8000, 0x8000 - k, k) for k in key]
        return np.abs(key[0] - key[1])
    assert ulps(got_y, want_y).max() <= 1
    assert ulps(got_dx, want_dx).max() <= 2
    assert (got_y != 0).all()
    y32, _ = run(np.float32, backend)
    ref32, _ = run(np.float32, "reference")
    np.testing.assert_allclose(y32, ref32, rtol=2e-5, atol=0)


@pytest.fixture
def plain_only():
    """A backend with the reference's plain kernels and no act_ ones."""
    table = {k: v for k, v in reference.KERNELS.items() if not k[1].startswith("act_")}
    kernels = {op: tuple(d for d in spec.directions if not d.startswith("act_")) for op, spec in SPECS.items()}
    normkit.register_backend(Backend("plain_only", runtime_module(table), kernels=kernels), replace=True)
    yield "plain_only"
    normkit.unregister_backend("plain_only")


def test_backend_without_fused_kernels_composes(plain_only):
    """Its plain kernels run, with the activation composed in NumPy: never another backend's fused kernel."""
    x, w, b, dy = data("groupnorm", dtype=np.float32)
    nk = normkit.get("groupnorm")
    used, kernel = activation.kernel("groupnorm", "act_forward", "float32", plain_only)
    assert used == plain_only and kernel is not reference.KERNELS[("groupnorm", "act_forward", "float32")]
    y, saved = nk.forward(x, 3, w, b, activation="leaky_relu", negative_slope=0.3, backend=plain_only)
    assert saved.backend == plain_only
    want = nk.forward(x, 3, w, b, activation="leaky_relu", negative_slope=0.3, backend="reference")[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    dx = nk.backward(dy, x, saved, 3, w, b, activation="leaky_relu", negative_slope=0.3, backend=plain_only)[0]
    want = nk.backward(dy, x, saved, 3, w, b, activation="leaky_relu", negative_slope=0.3, backend="reference")[0]
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4)


def test_channels_last_input_keeps_its_layout():
    x, w, b, dy = data("groupnorm")
    xcl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = normkit.get("gn")(xcl, 3, w, b, activation="relu")
    assert y.strides == xcl.strides
    np.testing.assert_allclose(y, normkit.get("gn")(x, 3, w, b, activation="relu"), rtol=1e-12, atol=1e-12)


def test_bfloat16_matches_float32_rounded_once():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, w, b, _ = data("layernorm", dtype=np.float32)
    xb = x.astype(ml_dtypes.bfloat16)
    y = normkit.get("ln")(xb, x.shape[-2:], w.reshape(4, 5), b.reshape(4, 5), activation="gelu")
    assert y.dtype == xb.dtype
    want = normkit.get("ln")(xb.astype(np.float64), x.shape[-2:], w.reshape(4, 5).astype(np.float64),
                             b.reshape(4, 5).astype(np.float64), activation="gelu", backend="reference")
    ulp = np.spacing(np.abs(want).astype(ml_dtypes.bfloat16).astype(np.float32)).astype(np.float64) * 2**16
    assert (np.abs(y.astype(np.float64) - want) <= ulp + 1e-6).all()


def test_a_backend_with_16_bit_kernels_only_runs_a_fused_activation():
    """16-bit data compose a float32 plain kernel (z must not be rounded to 16 bits before the activation); a
    backend without float32 kernels got TypeError ("no float32 kernel") although it runs the plain op: the
    registry order's float32 kernel composes instead."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    table = {k: v for k, v in reference.KERNELS.items() if k[0] == "groupnorm" and k[2] == "bfloat16"
             and not k[1].startswith("act_")}
    normkit.register_backend(Backend("bf16_only", runtime_module(table), kernels={"groupnorm": ("forward",
                                                                                                "backward")},
                                     dtypes=("bfloat16",)), replace=True)
    try:
        x, w, b, dy = data("groupnorm", dtype=np.float32)
        xb, dyb = x.astype(ml_dtypes.bfloat16), dy.astype(ml_dtypes.bfloat16)
        nk = normkit.get("groupnorm")
        for backend in ("bf16_only", "reference"):
            y, saved = nk.forward(xb, 3, w, b, activation="silu", backend=backend)
            dx = nk.backward(dyb, xb, saved, 3, w, b, activation="silu", backend=backend)[0]
            if backend == "bf16_only":
                got = (y, dx)
        for a, want, ulps in ((got[0], y, 1), (got[1], dx, 2)):  # (the contract's y and dx tolerances)
            ulp = np.spacing(np.abs(want.astype(np.float32))).astype(np.float64) * 2**16
            assert (np.abs(a.astype(np.float64) - want.astype(np.float64)) <= ulps * ulp + 1e-6).all()
    finally:
        normkit.unregister_backend("bf16_only")


@pytest.mark.parametrize("bad, match", [("tanh", "activation must be None or one of .*got 'tanh'"),
                                        (1, "activation must be None .*got int")])
def test_unknown_activation_is_a_clear_error(bad, match):
    x, w, b, _ = data("batchnorm")
    with pytest.raises(ValueError, match="batchnorm: " + match):
        normkit.get("bn")(x, None, None, w, b, training=True, activation=bad)


@pytest.mark.parametrize("bad,got", [("0.1", "str"), (float("nan"), "nan"), (float("inf"), "inf"),
                                     (-float("inf"), "-inf")])
def test_bad_slope_is_a_clear_error(bad, got):
    x, w, b, _ = data("groupnorm")
    with pytest.raises(ValueError, match=f"groupnorm: negative_slope must be a finite number, got {got}"):
        normkit.get("gn")(x, 3, w, b, activation="leaky_relu", negative_slope=bad)


def test_rmsnorm_has_no_activation():
    with pytest.raises(TypeError, match="activation"):
        normkit.get("rms").forward(np.ones((2, 4)), (4,), activation="relu")
