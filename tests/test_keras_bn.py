"""normkit.BatchNormalization (normkit.keras): tf_keras 2.21's BatchNormalization on NumPy arrays.

Checked against a float64 oracle written plainly here from tf_keras's formulas (moments over the reduction axes,
Batch Renormalization's r and d, ghost batches from the reshape (virtual_batch_size, N // virtual_batch_size,
...)), against finite differences, and against tf_keras itself when tensorflow and tf_keras are installed (they
are not part of the test extra).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit

RENORM_VARS = ("moving_stddev", "renorm_mean", "renorm_stddev")


# --- the oracle ------------------------------------------------------------------------------------------------

class Oracle:
    """tf_keras's BatchNormalization, float64, written from its formulas; ``fused``: its fused path, which differs
    in putting the unbiased batch variance into moving_variance."""

    def __init__(self, shape, axis=-1, momentum=0.99, epsilon=1e-3, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, virtual_batch_size=None, fused=False):
        self.fused = fused
        nd = len(shape)
        axes = axis if isinstance(axis, list) else [axis]
        self.axes = sorted(a % nd for a in axes)
        self.c = int(np.prod([shape[a] for a in self.axes]))
        self.momentum, self.eps, self.renorm = momentum, epsilon, renorm
        self.clip, self.renorm_momentum, self.vbs = renorm_clipping or {}, renorm_momentum, virtual_batch_size
        self.v = {"gamma": np.ones(self.c), "beta": np.zeros(self.c), "moving_mean": np.zeros(self.c),
                  "moving_variance": np.ones(self.c), "moving_stddev": np.ones(self.c),
                  "renorm_mean": np.zeros(self.c), "renorm_stddev": np.ones(self.c)}

    def _shaped(self, x):
        """x reshaped as tf_keras does, the kept axes, the reduction axes, and the parameters' broadcast shape."""
        if self.vbs:
            xr = x.reshape((self.vbs, x.shape[0] // self.vbs) + x.shape[1:])
            axes = [a + 1 for a in self.axes]
            red = tuple(i for i in range(xr.ndim) if i not in axes and i != 1)
        else:
            xr, axes = x, self.axes
            red = tuple(i for i in range(xr.ndim) if i not in axes)
        bshape = [xr.shape[i] if i in axes else 1 for i in range(xr.ndim)]
        return xr, red, bshape

    def infer(self, x, gamma=True, beta=True):
        x = x.astype(np.float64)
        b = [x.shape[i] if i in self.axes else 1 for i in range(x.ndim)]
        v = {k: a.reshape(b) for k, a in self.v.items()}
        y = (x - v["moving_mean"]) / np.sqrt(v["moving_variance"] + self.eps)
        return y * (v["gamma"] if gamma else 1) + (v["beta"] if beta else 0)

    def train(self, x, dy, gamma=True, beta=True):
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        xr, red, b = self._shaped(x64)
        dyr = dy64.reshape(xr.shape)
        v = {k: a.reshape(b) for k, a in self.v.items()}
        mean = xr.mean(axis=red, keepdims=True)
        var = np.square(xr - mean).mean(axis=red, keepdims=True)
        if self.vbs:
            new_mean, new_var = mean.mean(axis=1, keepdims=True), var.mean(axis=1, keepdims=True)
        else:
            new_mean, new_var = mean, var
        rstd = 1 / np.sqrt(var + self.eps)
        xhat = (xr - mean) * rstd
        g = v["gamma"] if gamma else np.ones(b)
        r, d = np.ones(b), np.zeros(b)
        if self.renorm:
            sigma = np.sqrt(new_var + self.eps)
            s = np.maximum(v["renorm_stddev"], np.sqrt(self.eps))
            r, d = sigma / s, (new_mean - v["renorm_mean"]) / s
            if "rmin" in self.clip:
                r = np.maximum(r, self.clip["rmin"])
            if "rmax" in self.clip:
                r = np.minimum(r, self.clip["rmax"])
            if "dmax" in self.clip:
                d = np.clip(d, -self.clip["dmax"], self.clip["dmax"])
            m = self.renorm_momentum
            v["renorm_mean"] = v["renorm_mean"] * m + new_mean * (1 - m)
            v["renorm_stddev"] = v["renorm_stddev"] * m + sigma * (1 - m)
        y = g * (xhat * r + d) + (v["beta"] if beta else 0)
        m = self.momentum
        v["moving_mean"] = v["moving_mean"] * m + new_mean * (1 - m)
        if self.renorm:
            v["moving_stddev"] = v["moving_stddev"] * m + np.sqrt(new_var + self.eps) * (1 - m)
            v["moving_variance"] = np.maximum(v["moving_stddev"] ** 2 - self.eps, 0)
        else:
            count = xr.size // self.c
            unbiased = new_var * count / (count - 1) if count > 1 else 0 * new_var
            v["moving_variance"] = v["moving_variance"] * m + (unbiased if self.fused else new_var) * (1 - m)
        self.v = {k: a.reshape(self.c) for k, a in v.items()}
        # the gradient with r and d constants: y = (g * r) * xhat + const per ghost batch and channel
        gdy = dyr * g * r
        dx = rstd * (gdy - gdy.mean(axis=red, keepdims=True) - xhat * (gdy * xhat).mean(axis=red, keepdims=True))
        every = tuple(i for i in range(xr.ndim) if b[i] == 1)
        dgamma = (dyr * (xhat * r + d)).sum(axis=every).reshape(self.c)
        dbeta = dyr.sum(axis=every).reshape(self.c)
        return y.reshape(x.shape), dx.reshape(x.shape), dgamma, dbeta


def make_pair(shape, seed, dtype=np.float64, offset=0.0, **kw):
    """A layer and its oracle with the same random gamma and beta."""
    rng = np.random.default_rng(seed)
    layer = normkit.BatchNormalization(dtype=dtype, **kw)
    layer.build(shape)
    oracle = Oracle(shape, **{k: v for k, v in kw.items() if k not in ("center", "scale", "fused")},
                    fused=layer.fused)
    gamma, beta = 1 + 0.5 * rng.standard_normal(oracle.c), 0.5 * rng.standard_normal(oracle.c)
    if layer.scale:
        layer.gamma = gamma.astype(dtype).reshape(layer.gamma.shape)
        oracle.v["gamma"] = layer.gamma.astype(np.float64).ravel()
    if layer.center:
        layer.beta = beta.astype(dtype).reshape(layer.beta.shape)
        oracle.v["beta"] = layer.beta.astype(np.float64).ravel()
    return layer, oracle, rng


def data(rng, shape, dtype, offset=0.0, std=1.0):
    return ((offset + std * rng.standard_normal(shape)).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def close(got, want, rtol, atol=0.0, what=""):
    got = np.asarray(got, np.float64).ravel()
    want = np.asarray(want, np.float64).ravel()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol + rtol * np.abs(want).max(initial=1.0),
                               err_msg=what)


def run_steps(layer, oracle, rng, shape, dtype, steps, rtol, offset=0.0):
    center, scale = layer.center, layer.scale
    for step in range(steps):
        x, dy = data(rng, shape, dtype, offset)
        x0 = x.copy()
        y = layer(x, training=True)
        dx, dgamma, dbeta = layer.backward(dy)
        np.testing.assert_array_equal(x, x0)
        wy, wdx, wdg, wdb = oracle.train(x, dy, gamma=scale, beta=center)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape and dx.shape == shape
        close(y, wy, rtol, what=f"y step {step}")
        close(dx, wdx, rtol, what=f"dx step {step}")
        assert (dgamma is None) == (not scale) and (dbeta is None) == (not center)
        if scale:
            assert dgamma.shape == layer.gamma.shape
            close(dgamma, wdg, rtol, what=f"dgamma step {step}")
        if center:
            close(dbeta, wdb, rtol, what=f"dbeta step {step}")
        names = ["moving_mean", "moving_variance"] + (list(RENORM_VARS) if layer.renorm else [])
        for name in names:
            close(getattr(layer, name), oracle.v[name], rtol, what=f"{name} step {step}")
    x, _ = data(rng, shape, dtype, offset)
    close(layer(x, training=False), oracle.infer(x, gamma=scale, beta=center), rtol, what="inference")


# --- against the oracle ----------------------------------------------------------------------------------------

@st.composite
def configs(draw):
    rank = draw(st.integers(2, 4))
    axis = draw(st.sampled_from([1, -1]))
    vbs = draw(st.sampled_from([None, 1, 2, 3]))
    n = vbs * draw(st.integers(1, 3)) if vbs else draw(st.integers(1, 5))
    rest = [draw(st.integers(1, 3)) for _ in range(rank - 1)]
    renorm = draw(st.booleans())
    clipping = draw(st.sampled_from([None, {"rmax": 1.2, "rmin": 0.9, "dmax": 0.3}, {"rmax": 2.0}, {"dmax": 0.0}]))
    return dict(shape=(n, *rest), axis=axis, virtual_batch_size=vbs, renorm=renorm,
                renorm_clipping=clipping if renorm else None, center=draw(st.booleans()),
                scale=draw(st.booleans()), momentum=draw(st.sampled_from([0.99, 0.5, 0.0])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_matches_oracle_float64(cfg):
    cfg = dict(cfg)
    shape, seed = cfg.pop("shape"), cfg.pop("seed")
    layer, oracle, rng = make_pair(shape, seed, np.float64, renorm_momentum=0.9, **cfg)
    run_steps(layer, oracle, rng, shape, np.float64, 3, 1e-9)


@pytest.mark.parametrize("kw", [{}, {"axis": 1}, {"renorm": True}, {"renorm": True, "renorm_clipping": {
    "rmax": 1.1, "rmin": 0.95, "dmax": 0.05}}, {"virtual_batch_size": 4, "axis": 1},
    {"virtual_batch_size": 2, "renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 1.0}}, {"axis": [1, 3]}])
def test_matches_oracle_float32(kw):
    shape = (8, 3, 5, 4)
    layer, oracle, rng = make_pair(shape, 7, np.float32, renorm_momentum=0.8, momentum=0.7, **kw)
    run_steps(layer, oracle, rng, shape, np.float32, 4, 2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_large_offsets(dtype, kw):
    """Data of mean 1e4 and std 1: float64 statistics (no E[x^2] - E[x]^2), and in float32 the elementwise passes
    on the data shifted by its mean (split.centered): x * scale + shift with float32 coefficients lost 1e-4 of y's
    scale there (a test tolerance of 2e-3 hid it)."""
    shape = (6, 4, 3)
    layer, oracle, rng = make_pair(shape, 3, dtype, axis=1, **kw)
    run_steps(layer, oracle, rng, shape, dtype, 3, 1e-9 if dtype == np.float64 else 2e-6, offset=1e4)


def test_multi_axis_and_axis_0():
    for kw, shape in (({"axis": [1, 3]}, (4, 3, 2, 5)), ({"axis": 0}, (5, 3)), ({"axis": [-1, 2]}, (3, 2, 4, 2))):
        layer, oracle, rng = make_pair(shape, 1, np.float64, **kw)
        run_steps(layer, oracle, rng, shape, np.float64, 2, 1e-9)


# --- finite differences ----------------------------------------------------------------------------------------

def fd_check(layer, x, dy, h=1e-6):
    """backward against central differences of sum(y * dy) for x, gamma and beta (on copies of the layer)."""
    def loss(x=x, gamma=None, beta=None):
        one = copy.deepcopy(layer)
        if gamma is not None:
            one.gamma = gamma
        if beta is not None:
            one.beta = beta
        return float((one(x, training=True) * dy).sum())

    def numeric(f, a):
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            ap, am = a.copy(), a.copy()
            ap[i] += h
            am[i] -= h
            g[i] = (f(ap) - f(am)) / (2 * h)
        return g

    one = copy.deepcopy(layer)
    one(x, training=True)
    dx, dgamma, dbeta = one.backward(dy)
    np.testing.assert_allclose(dx, numeric(lambda a: loss(x=a), x), rtol=1e-6, atol=1e-7)
    if layer.scale:
        np.testing.assert_allclose(dgamma, numeric(lambda a: loss(gamma=a), layer.gamma), rtol=1e-6, atol=1e-7)
    if layer.center:
        np.testing.assert_allclose(dbeta, numeric(lambda a: loss(beta=a), layer.beta), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw,shape", [({}, (4, 3)), ({"axis": 1}, (3, 2, 2)), ({"virtual_batch_size": 2, "axis": 1},
                                      (4, 2, 3)), ({"axis": -1, "center": False}, (2, 2, 3)),
                                      ({"virtual_batch_size": 3, "scale": False}, (6, 2))])
def test_backward_finite_differences(kw, shape):
    rng = np.random.default_rng(5)
    layer = normkit.BatchNormalization(dtype="float64", **kw)
    layer.build(shape)
    if layer.scale:
        layer.gamma = 1 + 0.5 * rng.standard_normal(layer.gamma.shape)
    if layer.center:
        layer.beta = rng.standard_normal(layer.beta.shape)
    fd_check(layer, rng.standard_normal(shape), rng.standard_normal(shape))


@pytest.mark.parametrize("vbs", [None, 2])
def test_backward_finite_differences_renorm(vbs):
    """r and d are constants for the gradient (tf_keras's stop_gradient). Finite differences see r and d change
    with x unless they are clipped: renorm_stddev tiny and renorm_mean far away pin r at rmax and d at dmax."""
    shape = (4, 3)
    rng = np.random.default_rng(6)
    layer = normkit.BatchNormalization(dtype="float64", renorm=True, virtual_batch_size=vbs,
                                       renorm_clipping={"rmax": 1.5, "dmax": 0.7})
    layer.build(shape)
    layer.gamma = 1 + 0.5 * rng.standard_normal(layer.gamma.shape)
    layer.beta = rng.standard_normal(layer.beta.shape)
    layer.renorm_stddev = np.full(layer.gamma.shape, 0.05)
    layer.renorm_mean = np.full(layer.gamma.shape, -50.0)
    fd_check(layer, rng.standard_normal(shape), rng.standard_normal(shape))


# --- behaviour and errors --------------------------------------------------------------------------------------

def test_initial_values_and_build():
    layer = normkit.BatchNormalization(renorm=True)
    assert not layer.built and layer.gamma is None
    layer.build((2, 5, 3))
    assert layer.gamma.shape == (3,) and layer.gamma.dtype == np.float32
    for name, value in (("gamma", 1), ("beta", 0), ("moving_mean", 0), ("moving_variance", 1),
                        ("moving_stddev", 1), ("renorm_mean", 0), ("renorm_stddev", 1)):
        np.testing.assert_array_equal(getattr(layer, name), np.full(3, value, np.float32))
    assert len(layer.get_weights()) == 7
    ghost = normkit.BatchNormalization(virtual_batch_size=2, center=False)
    ghost(np.ones((4, 3), np.float32))
    assert ghost.gamma.shape == (1, 1, 3) and ghost.beta is None     # tf_keras's parameter shape with ghost batches
    assert len(ghost.get_weights()) == 3


def test_inference_does_not_update_and_ghost_inference_takes_any_batch():
    layer = normkit.BatchNormalization(virtual_batch_size=4)
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean, 0)
    with pytest.raises(ValueError, match="backward needs a training call"):
        layer.backward(np.ones_like(x))


def test_float64_input_to_float32_layer():
    layer = normkit.BatchNormalization()
    x = np.random.default_rng(0).standard_normal((5, 2))
    y = layer(x, training=True)
    assert y.dtype == np.float64 and layer.moving_mean.dtype == np.float32
    dx, dg, db = layer.backward(np.ones_like(x))
    assert dx.dtype == np.float64 and dg.dtype == np.float32


@pytest.mark.parametrize("kw,exc,match", [
    ({"axis": 1.0}, TypeError, "axis must be an int"),
    ({"axis": []}, TypeError, "axis must be an int"),
    ({"momentum": 1.5}, ValueError, "momentum must be a number in"),
    ({"renorm_momentum": -0.1}, ValueError, "renorm_momentum must be a number in"),
    ({"epsilon": -1e-3}, ValueError, "epsilon must be a finite number"),
    ({"center": 1}, TypeError, "center must be a bool"),
    ({"renorm_clipping": {"rmax": 2, "max": 3}}, ValueError, r"renorm_clipping has keys \['max'\]"),
    ({"renorm_clipping": [1, 2]}, TypeError, "renorm_clipping must be None or a dict"),
    ({"renorm_clipping": {"rmin": 2, "rmax": 1}}, ValueError, "is larger than"),
    ({"renorm_clipping": {"dmax": -1}}, ValueError, "dmax"),
    ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size must be a positive int, got 0"),
    ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size must be None or a positive int"),
    ({"dtype": "float16"}, TypeError, "dtype must be float32 or float64"),
    ({"dtype": object()}, TypeError, r"dtype must be float32 or float64 \(a NumPy dtype or its name\), got"),
    ({"backend": "nope"}, normkit.UnknownBackendError, "'batch_normalization': unknown backend 'nope'; installed "),
    ({"backend": 3}, TypeError, "backend must be a str or None, got int"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match) as info:
        normkit.BatchNormalization(**kw)
    assert "BatchNormalization" in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "cython", "numba"])
def test_constant_sets_give_beta_exactly(backend):
    """A batch of one sample (every channel constant) and a constant channel among others, float32, large values:
    y is beta exactly, as tf_keras gives it. x * scale + shift erred by the rounding of the float32 shift, half a
    unit of |mean| * scale (0.02 at values of 1e4)."""
    rng = np.random.default_rng(7)
    beta = rng.standard_normal(8).astype(np.float32)
    one = (rng.standard_normal((1, 8)) * 1e4).astype(np.float32)
    x = rng.standard_normal((4, 5, 3, 8)).astype(np.float32)
    x[..., 2] = 12345.678
    for data, ghosts in ((one, None), (x, None), (x, 2)):
        layer = normkit.BatchNormalization(backend=backend, virtual_batch_size=ghosts)
        layer.build(data.shape)
        layer.beta = beta.reshape(layer.beta.shape)
        y = layer(data, training=True)
        flat = y.reshape(-1, 8)
        assert np.array_equal(flat[:, 2], np.full(len(flat), beta[2])), (data.shape, ghosts)
        if data is one:
            assert np.array_equal(y[0], beta)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (the NaN is the answer, not normkit's arithmetic failing)
def test_epsilon_zero_and_a_constant_set_give_nan_as_the_formula():
    """With epsilon 0 a set without variance has rstd inf, and tf_keras's y = gamma * (x - mean) * rstd + beta is
    0 * inf, NaN, as this layer's own gradient there; the other channels are normalized. (y was beta, and with
    renorm the batch mean.)"""
    x = np.array([[1.5, -2.0, 0.25], [1.5, 2.0, 0.75]], np.float32)
    for kw in ({}, {"renorm": True}, {"virtual_batch_size": 1}):
        layer = normkit.BatchNormalization(epsilon=0.0, **kw)
        y = layer(x, training=True)
        dx = layer.backward(np.ones_like(x))[0]
        assert np.isnan(y[:, 0]).all() and np.isnan(dx[:, 0]).all(), kw
        if not kw:
            assert np.allclose(y[:, 1:], [[-1, -1], [1, 1]], atol=1e-6)


def test_variables_assigned_before_build_are_refused_and_set_weights_loads_them():
    """Assigning the variables of a layer that is not built was undone by the first call's build (gamma 1, beta 0,
    ...), silently. It is refused; build, then assign or set_weights (tf_keras's order and shapes), works."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    layer = normkit.BatchNormalization(renorm=True)
    assert layer.get_weights() == []
    layer.gamma = np.full(4, 2.0, np.float32)
    with pytest.raises(ValueError, match=r"'batch_normalization': gamma assigned before the layer was built; build "
                                         r"it first \(layer.build\(input_shape\)\), then assign them or call "
                                         r"set_weights"):
        layer(x)
    layer = normkit.BatchNormalization(renorm=True)
    with pytest.raises(ValueError, match="set_weights on a layer that is not built"):
        layer.set_weights([])
    layer.build((None, 4))
    values = [rng.uniform(0.5, 2.0, 4) for _ in range(7)]  # float64: stored in the layer's float32
    layer.set_weights(values)
    got = layer.get_weights()
    assert [w.dtype for w in got] == [np.float32] * 7
    assert all(np.array_equal(g, v.astype(np.float32)) for g, v in zip(got, values))
    gamma, beta, mean, var = (v.astype(np.float32).astype(np.float64) for v in values[:4])
    expected = gamma * (x - mean) / np.sqrt(var + 1e-3) + beta
    assert np.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"set_weights expects 7 arrays \(gamma, beta, moving_mean, "):
        layer.set_weights(values[:4])
    with pytest.raises(ValueError, match=r"set_weights: beta must have shape \(4,\), got \(1, 4\)"):
        layer.set_weights(values[:1] + [values[1][None]] + values[2:])
    assert all(np.array_equal(g, w) for g, w in zip(layer.get_weights(), got))  # a refused call changes nothing


def test_bad_inputs():
    x = np.zeros((4, 3, 2), np.float32)
    with pytest.raises(ValueError, match="axis 3 is out of range for inputs of rank 3"):
        normkit.BatchNormalization(axis=3)(x)
    with pytest.raises(ValueError, match="duplicate axis"):
        normkit.BatchNormalization(axis=[1, -2])(x)
    with pytest.raises(ValueError, match="axis cannot include 0"):
        normkit.BatchNormalization(axis=0, virtual_batch_size=2)(x)
    layer = normkit.BatchNormalization(name="bn1")
    layer(x)
    with pytest.raises(ValueError, match=r"BatchNormalization 'bn1': expected inputs of rank 3 \(as built\)"):
        layer(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"expected axis 2 of the input to have size 2 \(as built\), got shape"):
        layer(np.zeros((4, 3, 5), np.float32))
    with pytest.raises(TypeError, match="must be float32 or float64, got dtype int64"):
        layer(np.zeros((4, 3, 2), np.int64))
    with pytest.raises(ValueError, match="must not be empty"):
        layer(np.zeros((0, 3, 2), np.float32), training=True)
    with pytest.raises(TypeError, match="training must be a bool"):
        layer(x, training="yes")
    with pytest.raises(TypeError, match=r"training must be a bool \(or Keras's learning phase, 0 or 1\), got 2"):
        layer(x, training=2)
    with pytest.raises(ValueError, match="backward needs a training call"):
        layer.backward(x)
    layer(x, training=True)
    with pytest.raises(ValueError, match=r"dy must have the shape .* \(4, 3, 2\), got \(4, 3\)"):
        layer.backward(np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="dy must have the last training call's input dtype float32"):
        layer.backward(x.astype(np.float64))
    ghost = normkit.BatchNormalization(virtual_batch_size=3, name="g")
    with pytest.raises(ValueError, match=r"BatchNormalization 'g': virtual_batch_size=3 must divide the batch "
                                         r"size, got a batch of 4"):
        ghost(x, training=True)
    # a variable the user assigned with another size: the error names it
    for name, training in (("gamma", False), ("beta", True), ("moving_mean", False), ("moving_variance", False),
                           ("moving_stddev", True), ("renorm_mean", True), ("renorm_stddev", True)):
        layer = normkit.BatchNormalization(renorm=name.startswith(("renorm", "moving_stddev")), name="v")
        layer(x, training=True)
        setattr(layer, name, np.zeros(4, np.float32))
        with pytest.raises(ValueError, match=rf"BatchNormalization 'v': {name} has shape \(4,\), expected \(2,\)"):
            layer(x, training=training)


def test_inputs_and_saved_arrays_are_not_modified():
    rng = np.random.default_rng(2)
    x = np.asfortranarray(rng.standard_normal((4, 3, 5)).astype(np.float32))
    dy = rng.standard_normal((4, 3, 5)).astype(np.float32)
    x0, dy0 = x.copy(), dy.copy()
    layer = normkit.BatchNormalization(axis=1, renorm=True, virtual_batch_size=2)
    layer.build(x.shape)
    gamma = layer.gamma
    y = layer(x, training=True)
    layer.backward(dy)
    layer(x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(gamma, 1)
    assert y.flags.c_contiguous


# --- against tf_keras ------------------------------------------------------------------------------------------

TF_CASES = {
    "plain axis=-1 rank 2": ((16, 5), {}),
    "plain axis=1 rank 4": ((8, 3, 4, 5), {"axis": 1, "fused": False}),
    "fused (the default) axis=1 rank 4": ((8, 3, 4, 5), {"axis": 1}),
    "fused axis=-1 rank 5": ((4, 3, 2, 3, 2), {"fused": True}),
    "renorm": ((16, 4, 3), {"renorm": True}),
    "renorm clipped": ((16, 4, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.05, "rmin": 0.97, "dmax": 0.1}}),
    "ghost": ((12, 3, 4), {"virtual_batch_size": 4, "axis": 1}),
    "ghost rank 4 axis=-1": ((8, 2, 3, 4), {"virtual_batch_size": 2}),
    "ghost renorm clipped": ((12, 5), {"virtual_batch_size": 3, "renorm": True,
                                       "renorm_clipping": {"rmax": 1.1, "dmax": 0.2}}),
    "no center, no scale, renorm": ((10, 4), {"renorm": True, "center": False, "scale": False}),
}
TF_ERRORS: dict[str, dict[str, float]] = {}


def rel(got, want) -> float:
    """max |got - want| over max |want| (norm-wise relative error)."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("case", list(TF_CASES))
def test_matches_tf_keras(case):
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras")
    shape, kw = TF_CASES[case]
    kw = dict(kw, momentum=0.9, renorm_momentum=0.8) if kw.get("renorm") else dict(kw, momentum=0.9)
    ref = tf_keras.layers.BatchNormalization(**kw)
    ref.build(shape)
    layer = normkit.BatchNormalization(**kw)
    layer.build(shape)
    assert layer.fused == ref.fused
    rng = np.random.default_rng(11)
    if layer.scale:
        layer.gamma = (1 + 0.3 * rng.standard_normal(layer.gamma.shape)).astype(np.float32)
        ref.gamma.assign(layer.gamma)
    if layer.center:
        layer.beta = (0.3 * rng.standard_normal(layer.beta.shape)).astype(np.float32)
        ref.beta.assign(layer.beta)
    names = ["moving_mean", "moving_variance"] + (list(RENORM_VARS) if layer.renorm else [])
    errors = TF_ERRORS.setdefault(case, {})

    def record(what, got, want):
        e = rel(got, want)
        errors[what] = max(errors.get(what, 0.0), e)
        assert e <= 1e-5, f"{case}: {what} relative error {e:.3g}"

    for step in range(5):
        x = (2.0 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = tf.constant(x)
        params = [v for v in (ref.gamma, ref.beta) if v is not None]
        with tf.GradientTape() as tape:
            tape.watch(xt)
            yt = ref(xt, training=True)
            loss = tf.reduce_sum(yt * dy)
        grads = tape.gradient(loss, [xt, *params])
        y = layer(x, training=True)
        dx, dgamma, dbeta = layer.backward(dy)
        record("y", y, yt.numpy())
        record("dx", dx, grads[0].numpy())
        if layer.scale:
            record("dgamma", dgamma, grads[1].numpy())
        if layer.center:
            record("dbeta", dbeta, grads[-1].numpy())
        for name in names:
            assert getattr(layer, name).shape == tuple(getattr(ref, name).shape)
            record(name, getattr(layer, name), getattr(ref, name).numpy())
    x = rng.standard_normal(shape).astype(np.float32)
    record("y inference", layer(x, training=False), ref(tf.constant(x), training=False).numpy())
    print(f"\n{case}: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))


@pytest.mark.parametrize("shape, kw", [
    ((2, 3, 2, 4), {}), ((2, 3, 2, 4), {"axis": 1}), ((2, 3, 2, 4), {"axis": 2}), ((2, 3, 2, 4, 2), {"axis": 1}),
    ((2, 3, 2, 4, 2), {"axis": 2}), ((6, 4), {}), ((2, 3, 2, 4), {"renorm": True}), ((1, 1, 1, 3), {}),
    ((2, 3, 2, 4), {"virtual_batch_size": 1}), ((2, 3, 2, 4), {"dtype": "float64"}), ((2, 3, 2, 4), {"axis": [1, 2]}),
])
def test_fused_is_decided_as_tf_keras_decides_it(shape, kw):
    """tf_keras's default (fused=None) takes its fused path for rank 4 with axis 1 or 3 and rank 5 with axis 1 or
    4 (float32, no renorm, no ghost batches), which puts the unbiased batch variance count / (count - 1) (0 for one
    value) into moving_variance: normkit followed the non-fused path whatever fused said, and refused fused=."""
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras")
    x = (1 + 2 * np.random.default_rng(0).standard_normal(shape)).astype(kw.get("dtype", "float32"))
    ref = tf_keras.layers.BatchNormalization(momentum=0.5, **kw)
    y_ref = ref(tf.constant(x), training=True).numpy()
    layer = normkit.BatchNormalization(momentum=0.5, **kw)
    y = layer(x, training=True)
    assert layer.fused == ref.fused
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(layer.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fused_path_puts_the_unbiased_variance_into_the_moving_variance():
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 4)).astype(np.float32)
    count = x.size // x.shape[-1]
    biased = x.reshape(-1, 4).astype(np.float64).var(axis=0)
    for fused, want in ((None, biased * count / (count - 1)), (True, biased * count / (count - 1)), (False, biased)):
        layer = normkit.BatchNormalization(axis=-1, momentum=0.0, fused=fused)
        assert layer.fused is fused
        layer(x, training=True)
        assert layer.fused is (fused is not False)
        np.testing.assert_allclose(layer.moving_variance, want, rtol=1e-6)
    one = normkit.BatchNormalization(momentum=0.5)
    one(np.ones((1, 1, 1, 3), np.float32), training=True)
    np.testing.assert_array_equal(one.moving_variance, 0.5)  # FusedBatchNormV3: the variance of one value is 0
    for shape, kw in (((6, 4), {}), ((2, 3, 2, 4), {"axis": 2}), ((2, 3, 2, 4), {"dtype": "float64"}),
                      ((2, 3, 2, 4), {"renorm": True})):
        layer = normkit.BatchNormalization(**kw)
        layer.build(shape)
        assert layer.fused is False


def test_fused_errors_as_tf_keras():
    for kw, match in (({"renorm": True}, "fused=True and renorm=True together are not supported"),
                      ({"axis": 2}, r"fused=True is only supported when axis is 1 or 3 .*got axis=2"),
                      ({"axis": [1, 2]}, r"got axis=\[1, 2\]"),
                      ({"virtual_batch_size": 2}, "fused=True is not supported with virtual_batch_size"),
                      ({"dtype": "float64"}, "fused=True is only supported for float32 layers")):
        with pytest.raises(ValueError, match=match):
            normkit.BatchNormalization(fused=True, **kw)
    with pytest.raises(ValueError, match="fused=True supports inputs of rank 4 or 5 only, got rank 2"):
        normkit.BatchNormalization(fused=True)(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"takes axis 1 or 3 for inputs of rank 4, got axis \[0\]"):
        normkit.BatchNormalization(axis=-4)(np.ones((4, 3, 2, 2), np.float32))
    with pytest.raises(TypeError, match="fused must be None or a bool, got 'yes'"):
        normkit.BatchNormalization(fused="yes")


def test_initializers_as_tf_keras_takes_them():
    """beta/gamma/moving_mean/moving_variance_initializer (the zero-init residual idiom gamma_initializer="zeros")
    were refused. With renorm the standard deviations start at the square root of the variance's initializer, and
    renorm_mean at moving_mean's."""
    layer = normkit.BatchNormalization(gamma_initializer="zeros", beta_initializer="ones", renorm=True,
                                       moving_mean_initializer={"class_name": "Constant", "config": {"value": 2.5}},
                                       moving_variance_initializer=lambda shape, dtype: np.full(shape, 4.0))
    layer.build((None, 3))
    want = {"gamma": 0.0, "beta": 1.0, "moving_mean": 2.5, "moving_variance": 4.0, "moving_stddev": 2.0,
            "renorm_mean": 2.5, "renorm_stddev": 2.0}
    for name, value in want.items():
        v = getattr(layer, name)
        assert v.dtype == np.float32 and v.shape == (3,)
        np.testing.assert_array_equal(v, value, err_msg=name)
    ghost = normkit.BatchNormalization(axis=1, virtual_batch_size=2, gamma_initializer="Zeros", dtype="float64")
    ghost.build((4, 3, 2))
    assert ghost.gamma.shape == (1, 1, 3, 1) and ghost.gamma.dtype == np.float64 and not ghost.gamma.any()
    for kw, exc, match in (
            ({"gamma_initializer": "glorot_uniform"}, ValueError, "gamma_initializer must be 'zeros', 'ones'"),
            ({"beta_initializer": {"class_name": "RandomNormal", "config": {}}}, ValueError, "beta_initializer must"),
            ({"gamma_regularizer": "l2"}, ValueError, "gamma_regularizer must be None: normkit's layer has no loss"),
            ({"beta_constraint": object()}, ValueError, "beta_constraint must be None"),
            ({"adjustment": lambda shape: shape}, ValueError, "adjustment must be None"),
            ({"synchronized": True}, ValueError, "synchronized must be False")):
        with pytest.raises(exc, match=match):
            normkit.BatchNormalization(**kw)
    wrong = normkit.BatchNormalization(gamma_initializer=lambda shape, dtype: np.ones(5))
    with pytest.raises(ValueError, match=r"gamma_initializer gave an array of shape \(5,\), expected \(3,\)"):
        wrong.build((None, 3))


def test_get_config_from_config_round_trip():
    layer = normkit.BatchNormalization(axis=[1, 2], momentum=0.9, epsilon=1e-4, center=False, renorm=True,
                                       renorm_clipping={"rmax": 2.0}, gamma_initializer="zeros", name="bn7",
                                       trainable=False, dtype="float64", fused=False)
    config = layer.get_config()
    twin = normkit.BatchNormalization.from_config(config)
    assert twin.get_config() == config and config["axis"] == [1, 2] and config["renorm_clipping"] == {"rmax": 2.0}
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 5))
    layer.trainable = twin.trainable = True
    np.testing.assert_array_equal(layer(x, training=True), twin(x, training=True))
    with pytest.raises(TypeError, match="from_config: config must be a dict, got"):
        normkit.BatchNormalization.from_config([("axis", 1)])


def test_from_a_tf_keras_config_and_tf_keras_initializers():
    tf_keras = pytest.importorskip("tf_keras")
    initializers = tf_keras.initializers
    for kw in ({"renorm": True, "virtual_batch_size": 2, "gamma_initializer": initializers.Constant(2.0)},
               {"moving_variance_initializer": "zeros", "renorm": True, "renorm_clipping": {"rmax": 2.0}},
               {"gamma_initializer": "zeros", "axis": [1, 2]},
               {"moving_variance_initializer": initializers.Constant(4.0), "renorm": True}):
        ref = tf_keras.layers.BatchNormalization(**kw)
        config = ref.get_config()
        ref.build((4, 3, 2))
        for layer in (normkit.BatchNormalization(**kw), normkit.BatchNormalization.from_config(config)):
            layer.build((4, 3, 2))
            assert len(layer.get_weights()) == len(ref.get_weights())
            for got, want in zip(layer.get_weights(), ref.get_weights()):
                np.testing.assert_allclose(got, want, rtol=1e-6)
    layer = normkit.BatchNormalization(gamma_initializer=initializers.RandomNormal(seed=1))  # the object: called
    layer.build((4, 3))
    assert layer.gamma.shape == (3,) and len(set(layer.gamma.tolist())) == 3
    random = tf_keras.layers.BatchNormalization(gamma_initializer=initializers.RandomNormal(seed=1)).get_config()
    with pytest.raises(ValueError, match="gamma_initializer must be 'zeros', 'ones', a serialized Zeros"):
        normkit.BatchNormalization.from_config(random)  # serialized, a random draw normkit cannot repeat


def _masked_oracle(x, dy, weights, gamma, beta, eps):
    """tf.nn.weighted_moments's statistics over all axes but the last, and y = gamma * xhat + beta at every
    position; the gradient by autograd-free algebra checked against finite differences in the test."""
    x64, w = x.astype(np.float64), np.broadcast_to(weights[..., None], x.shape).astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    total = w.sum(axes)
    mean = np.where(total > 0, (w * x64).sum(axes) / np.where(total > 0, total, 1), 0)
    var = np.where(total > 0, (w * (x64 - mean) ** 2).sum(axes) / np.where(total > 0, total, 1), 0)
    return (x64 - mean) / np.sqrt(var + eps) * gamma + beta, mean, var


@pytest.mark.parametrize("shape", [(4, 6, 3), (3, 4, 5, 2), (8, 5)])
def test_mask_weights_the_training_statistics(shape):
    """tf_keras's call(inputs, training, mask): the weighted moments over the unmasked positions (the mask has the
    input's shape without its last axis), every position normalized with them. It was refused."""
    rng = np.random.default_rng(3)
    x = (2 + 1.5 * rng.standard_normal(shape))
    dy = rng.standard_normal(shape)
    mask = rng.random(shape[:-1]) < 0.6
    mask.flat[0] = True
    layer = normkit.BatchNormalization(momentum=0.5, dtype="float64", fused=False)
    layer.build(shape)
    layer.gamma = 1 + 0.3 * rng.standard_normal(shape[-1])
    layer.beta = 0.3 * rng.standard_normal(shape[-1])
    y = layer(x, training=True, mask=mask)
    want, mean, var = _masked_oracle(x, dy, mask, layer.gamma, layer.beta, 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, 0.5 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, 0.5 + 0.5 * var, rtol=1e-12)
    dx, dgamma, dbeta = layer.backward(dy)
    h = 1e-6
    for i in [0, 1, x.size // 2, x.size - 1]:  # finite differences of sum(y * dy) through the weighted moments
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        numeric = ((_masked_oracle(xp, dy, mask, layer.gamma, layer.beta, 1e-3)[0] -
                    _masked_oracle(xm, dy, mask, layer.gamma, layer.beta, 1e-3)[0]) * dy).sum() / (2 * h)
        np.testing.assert_allclose(dx.flat[i], numeric, rtol=1e-6, atol=1e-8)
    xhat = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(dgamma, (dy * xhat).reshape(-1, shape[-1]).sum(0), rtol=1e-10)
    np.testing.assert_allclose(dbeta, dy.reshape(-1, shape[-1]).sum(0), rtol=1e-10)
    ones = normkit.BatchNormalization(dtype="float64")
    np.testing.assert_allclose(ones(x, training=True, mask=np.ones(shape[:-1])), ones(x, training=True), rtol=1e-12,
                               atol=1e-12)


def test_mask_edges_and_errors():
    x = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)
    layer = normkit.BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=np.zeros((4, 6), bool))  # nothing unmasked: mean 0, variance 0 (tf's)
    np.testing.assert_allclose(y, x / np.sqrt(1e-3), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_variance, 0)
    one = np.zeros((4, 6), bool)
    one[1, 2] = True  # one value: variance 0, and the other values are not its mean
    y = layer(x, training=True, mask=one)
    np.testing.assert_allclose(y, (x - x[1, 2]) / np.sqrt(1e-3), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer(x, mask=one), layer(x))  # inference does not use it
    bad = x.astype(np.float64)
    bad[0, 0, 0], bad[1, 1, 1] = np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an inf / NaN in the data: NaN statistics, no RuntimeWarning
        y = normkit.BatchNormalization(dtype="float64")(bad, training=True, mask=one | True)
    assert np.isnan(y[..., :2]).all() and np.isfinite(y[..., 2]).all()  # (the channels holding them)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 3\) does not broadcast to the input's shape"):
        layer(x, training=True, mask=np.ones((4, 3)))
    with pytest.raises(TypeError, match="mask must hold bools or numbers, got dtype <U1"):
        layer(x, training=True, mask=np.full((4, 6), "a"))
    with pytest.raises(ValueError, match="mask with virtual_batch_size is not supported"):
        normkit.BatchNormalization(virtual_batch_size=2)(x, training=True, mask=np.ones((4, 6)))
    fused = normkit.BatchNormalization()
    x4 = np.random.default_rng(1).standard_normal((2, 3, 3, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match="mask is ignored on the fused path"):
        y = fused(x4, training=True, mask=np.zeros((2, 3, 3)))
    np.testing.assert_array_equal(y, normkit.BatchNormalization()(x4, training=True))


def test_mask_matches_tf_keras():
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(5)
    for shape, kw in (((4, 6, 3), {}), ((4, 6, 3), {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}),
                      ((3, 4, 5, 6), {"fused": False}), ((8, 5), {})):
        ref = tf_keras.layers.BatchNormalization(momentum=0.7, **kw)
        layer = normkit.BatchNormalization(momentum=0.7, **kw)
        ref.build(shape)
        layer.build(shape)
        for _ in range(3):
            x = (2 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            mask = rng.random(shape[:-1]) < 0.6
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                yt = ref(xt, training=True, mask=tf.constant(mask))
                loss = tf.reduce_sum(yt * dy)
            grads = tape.gradient(loss, [xt, ref.gamma, ref.beta])
            y = layer(x, training=True, mask=mask)
            got = [y, *layer.backward(dy), *layer.get_weights()]
            want = [yt.numpy(), *(g.numpy() for g in grads), *ref.get_weights()]
            for g, w in zip(got, want):
                assert rel(g, w) <= 1e-5, (shape, kw)


def test_keras_2_conventions_trainable_learning_phase_dtype_none_and_open_batch_size():
    """tf_keras 2.21: a layer with trainable=False runs in inference mode; training takes the learning phase 1 / 0;
    dtype=None is the float32 policy; build((None, C)) leaves the batch size open."""
    x = (np.random.default_rng(0).standard_normal((6, 3)) + 2).astype(np.float32)
    frozen = normkit.BatchNormalization(trainable=False)
    y = frozen(x, training=True)
    np.testing.assert_array_equal(frozen.moving_mean, 0)  # not updated
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)  # the moving statistics normalize
    frozen.trainable = True
    frozen(x, training=1)
    assert (frozen.moving_mean != 0).all()
    learning = normkit.BatchNormalization()
    np.testing.assert_array_equal(learning(x, training=0), normkit.BatchNormalization()(x, training=False))
    assert normkit.BatchNormalization(dtype=None).dtype == np.float32
    with pytest.raises(TypeError, match="trainable must be a bool, got 'no'"):
        normkit.BatchNormalization(trainable="no")
    open_batch = normkit.BatchNormalization()
    open_batch.build((None, 3))
    assert open_batch.gamma.shape == (3,)
    open_batch(x[:5], training=True)
    with pytest.raises(ValueError, match=r"the size of axis -1 must be known to build, got input_shape \(4, None\)"):
        normkit.BatchNormalization().build((4, None))


def test_a_failed_renorm_call_leaves_every_variable_as_it_was():
    """renorm_mean and renorm_stddev moved before the output was made: a call failing after the statistics (here a
    backend without the apply kernel) left them moved and the moving statistics not."""
    stats_only = {k: v for k, v in normkit.reference.KERNELS.items() if k[:2] == ("batchnorm", "stats")}
    normkit.register_backend(normkit.Backend("statsonly", normkit.registry.runtime_module(stats_only),
                                             kernels={"batchnorm": ["stats"]}), replace=True)
    try:
        layer = normkit.BatchNormalization(renorm=True, backend="statsonly")
        x = (np.random.default_rng(0).standard_normal((8, 3)) + 1).astype(np.float32)
        layer.build(x.shape)
        before = [w.copy() for w in layer.get_weights()]
        with pytest.raises(ValueError, match="does not implement apply"):
            layer(x, training=True)
        for b, a in zip(before, layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    finally:
        normkit.unregister_backend("statsonly")


def test_mask_and_initializer_edges_as_tf_keras():
    """A fifth campaign's findings: weights summing to a negative number normalize (tf's div_no_nan; they gave 0
    and 0), renorm_mean starts at moving_mean's initializer (it was 0), a Constant of an array loads from a config,
    and a mask the call does not use (inference, the fused path) is neither checked nor refused."""
    x = np.array([[1.0], [2.0], [4.0]])
    layer = normkit.BatchNormalization(dtype="float64", momentum=0.0, epsilon=0.0)
    y = layer(x, training=True, mask=np.array([-1.0, -1.0, -2.0]))
    mean = (1 * -1 + 2 * -1 + 4 * -2) / -4.0
    var = (-(1 - mean) ** 2 - (2 - mean) ** 2 - 2 * (4 - mean) ** 2) / -4.0
    np.testing.assert_allclose(y.ravel(), (x.ravel() - mean) / np.sqrt(var), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, [mean], rtol=1e-12)
    renorm = normkit.BatchNormalization(renorm=True, moving_mean_initializer="ones")
    renorm.build((None, 2))
    np.testing.assert_array_equal(renorm.renorm_mean, 1.0)
    constant = normkit.BatchNormalization.from_config(
        {"gamma_initializer": {"class_name": "Constant", "config": {"value": [1.0, 2.0, 3.0]}}})
    constant.build((None, 3))
    np.testing.assert_array_equal(constant.gamma, [1, 2, 3])
    with pytest.raises(ValueError, match=r"gamma_initializer's Constant value has shape \(3,\), which does not fit"):
        normkit.BatchNormalization.from_config(dict(constant.get_config())).build((None, 4))
    ghost = normkit.BatchNormalization(virtual_batch_size=2)
    x3 = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    ghost(x3, training=True)
    np.testing.assert_array_equal(ghost(x3, mask=np.ones((7,))), ghost(x3))  # inference: not read
    with pytest.raises(ValueError, match="mask with virtual_batch_size is not supported in training"):
        ghost(x3, training=True, mask=np.ones((4, 3)))
    with pytest.warns(UserWarning, match="mask is ignored on the fused path"):
        normkit.BatchNormalization()(np.ones((2, 3, 4, 5), np.float32), training=True, mask=np.ones((2, 3)))
