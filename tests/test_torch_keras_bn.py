"""normkit.torch.BatchNormalization: tf_keras's BatchNormalization as a torch.nn.Module.

Step by step against normkit.BatchNormalization (the NumPy layer, itself checked against a float64 oracle and
tf_keras in tests/test_keras_bn.py): outputs, autograd gradients and every buffer; state_dict; eval; tf_keras
itself for one renorm + ghost-batch configuration when tf_keras is installed.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normkit  # noqa: E402
import normkit.torch as nkt  # noqa: E402

RENORM_VARS = ("moving_stddev", "renorm_mean", "renorm_stddev")
RTOL = {np.float32: 1e-6, np.float64: 1e-12}
CLIP = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}
CONFIGS = {
    "plain": {},
    "no_affine": {"center": False, "scale": False},
    "scale_only": {"center": False},
    "renorm": {"renorm": True, "renorm_momentum": 0.7},
    "renorm_clip": {"renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.6},
    "ghost": {"virtual_batch_size": 2},
    "renorm_ghost": {"renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.7, "virtual_batch_size": 3},
}
SHAPES = {"nchw": ((6, 3, 4, 5), 1), "nc": ((6, 4), 1), "nhwc": ((6, 4, 5, 3), -1), "ncl": ((6, 3, 7), 1)}


def close(got, want, rtol, what=""):
    got = np.asarray(got.detach() if isinstance(got, torch.Tensor) else got, np.float64).ravel()
    want = np.asarray(want, np.float64).ravel()
    scale = max(np.abs(want).max(initial=0.0), 1.0)
    err = np.abs(got - want).max(initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def pair(shape, axis, dtype, seed=0, **kw):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    layer = normkit.BatchNormalization(axis=axis, momentum=0.8, dtype=dtype, **kw)
    layer.build(shape)
    module = nkt.BatchNormalization(c, axis=axis, momentum=0.8, **kw)
    if dtype == np.float64:
        module = module.double()
    with torch.no_grad():
        if module.gamma is not None:
            g = (1 + 0.4 * rng.standard_normal(c)).astype(dtype)
            module.gamma.copy_(torch.from_numpy(g))
            layer.gamma = g.reshape(layer.gamma.shape)
        if module.beta is not None:
            b = (0.4 * rng.standard_normal(c)).astype(dtype)
            module.beta.copy_(torch.from_numpy(b))
            layer.beta = b.reshape(layer.beta.shape)
    return layer, module, rng


def buffers_of(layer):
    return ["moving_mean", "moving_variance"] + (list(RENORM_VARS) if layer.renorm else [])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_matches_numpy_layer_step_by_step(cfg, shape_name, dtype):
    shape, axis = SHAPES[shape_name]
    layer, module, rng = pair(shape, axis, dtype, **CONFIGS[cfg])
    rtol = RTOL[dtype]
    module.train()
    for step in range(5):
        x = (1.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = module(xt)
        yt.backward(torch.from_numpy(dy))
        y = layer(x, training=True)
        dx, dgamma, dbeta = layer.backward(dy)
        assert yt.dtype == xt.dtype and yt.shape == xt.shape
        close(yt, y, rtol, f"y step {step}")
        close(xt.grad, dx, rtol, f"dx step {step}")
        if layer.scale:
            close(module.gamma.grad, dgamma, rtol, f"dgamma step {step}")
            module.gamma.grad = None
        if layer.center:
            close(module.beta.grad, dbeta, rtol, f"dbeta step {step}")
            module.beta.grad = None
        for name in buffers_of(layer):
            buf = getattr(module, name)
            assert buf.shape == (shape[axis],) and buf.dtype == xt.dtype
            close(buf, getattr(layer, name), rtol, f"{name} step {step}")
    module.eval()
    x = rng.standard_normal(shape).astype(dtype)
    close(module(torch.from_numpy(x)), layer(x, training=False), rtol, "inference")


@pytest.mark.parametrize("cfg", ["plain", "renorm_ghost", "no_affine"])
def test_eval_gradients(cfg):
    """In eval, y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta, differentiable."""
    shape, axis = SHAPES["nchw"]
    _, module, rng = pair(shape, axis, np.float64, **CONFIGS[cfg])
    module.train()
    module(torch.from_numpy(rng.standard_normal(shape) + 1.0))      # moves the moving statistics
    module.eval()
    x = torch.from_numpy(rng.standard_normal(shape)).requires_grad_(True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = [p for p in (module.gamma, module.beta) if p is not None]
    torch.autograd.gradcheck(lambda x, *p: module(x), (x, *params))
    b = [1, -1, 1, 1]
    g = module.gamma.reshape(b) if module.gamma is not None else 1.0
    want = (x - module.moving_mean.reshape(b)) / torch.sqrt(module.moving_variance.reshape(b) + module.epsilon)
    want = want * g + (module.beta.reshape(b) if module.beta is not None else 0.0)
    close(module(x), want.detach().numpy(), 1e-12, "eval output")
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("vbs", [None, 2])
def test_train_gradcheck_renorm(vbs):
    """Training gradients by finite differences (float64). r and d are constants for the gradient, which finite
    differences see only where they are clipped: renorm_mean and renorm_stddev are set so that both are clipped
    in every channel. gradcheck runs forward again for every perturbation, so the state is reset each call."""
    shape = (4, 2, 3)
    rng = np.random.default_rng(3)
    module = nkt.BatchNormalization(2, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.2},
                                    virtual_batch_size=vbs).double()
    with torch.no_grad():
        module.gamma.copy_(torch.tensor([1.3, -0.7], dtype=torch.float64))
        module.renorm_mean.copy_(torch.tensor([3.0, -3.0], dtype=torch.float64))     # |d| ~ 10 > dmax
        module.renorm_stddev.copy_(torch.tensor([0.3, 0.4], dtype=torch.float64))    # r ~ 3 > rmax
    state = {k: v.clone() for k, v in module.named_buffers()}

    def f(x, gamma, beta):                   # gradcheck perturbs gamma and beta in place: reset the buffers only
        with torch.no_grad():
            for k, v in module.named_buffers():
                v.copy_(state[k])
        return module(x)

    x = torch.from_numpy(rng.standard_normal(shape)).requires_grad_(True)
    torch.autograd.gradcheck(f, (x, module.gamma, module.beta))


def test_state_dict_names_and_round_trip():
    m = nkt.BatchNormalization(3, renorm=True, virtual_batch_size=2)
    assert list(m.state_dict()) == ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev",
                                    "renorm_mean", "renorm_stddev"]
    assert [n for n, _ in m.named_parameters()] == ["gamma", "beta"]
    assert list(nkt.BatchNormalization(3, center=False).state_dict()) == ["gamma", "moving_mean",
                                                                           "moving_variance"]
    assert list(nkt.BatchNormalization(3, scale=False, center=False).state_dict()) == ["moving_mean",
                                                                                      "moving_variance"]
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 3, 5)).astype(np.float32))
    m.train()
    for _ in range(3):
        m(x * 2 + 1)
    m2 = nkt.BatchNormalization(3, renorm=True, virtual_batch_size=2)
    m2.load_state_dict(m.state_dict())
    for mod in (m, m2):
        mod.eval()
    assert torch.equal(m(x), m2(x))
    m.train(), m2.train()
    assert torch.equal(m(x), m2(x))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # a deep copy is independent
    m3 = copy.deepcopy(m)
    m3(x + 3)
    assert not torch.equal(m3.moving_mean, m.moving_mean)


def test_initial_values_dtype_and_repr():
    m = nkt.BatchNormalization(4, renorm=True)
    for name, value in [("gamma", 1), ("beta", 0), ("moving_mean", 0), ("moving_variance", 1),
                        ("moving_stddev", 1), ("renorm_mean", 0), ("renorm_stddev", 1)]:
        t = getattr(m, name)
        assert t.dtype == torch.float32 and torch.equal(t, torch.full((4,), float(value)))
    assert isinstance(m.gamma, torch.nn.Parameter) and isinstance(m.beta, torch.nn.Parameter)
    assert "virtual_batch_size=None" in repr(m) and "renorm=True" in repr(m)
    assert nkt.BatchNormalization(4, dtype=torch.float64).moving_mean.dtype == torch.float64


def test_no_grad_and_float64_input_to_float32_module():
    shape, axis = SHAPES["nchw"]
    layer, module, rng = pair(shape, axis, np.float32, **CONFIGS["renorm_ghost"])
    x = rng.standard_normal(shape)                                    # float64 input, float32 variables
    with torch.no_grad():
        y = module(torch.from_numpy(x))
    assert y.dtype == torch.float64
    close(y, layer(x, training=True), 1e-12, "y")
    for name in buffers_of(layer):
        assert getattr(module, name).dtype == torch.float32
        close(getattr(module, name), getattr(layer, name), 1e-7, name)


def test_two_calls_before_backward():
    """Each call keeps its own saved state: two forwards, one backward through both."""
    shape, axis = SHAPES["nc"]
    layer, module, rng = pair(shape, axis, np.float64, **CONFIGS["ghost"])
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape) + 2
    dy1, dy2 = rng.standard_normal(shape), rng.standard_normal(shape)
    t1, t2 = torch.from_numpy(x1).requires_grad_(True), torch.from_numpy(x2).requires_grad_(True)
    loss = (module(t1) * torch.from_numpy(dy1)).sum() + (module(t2) * torch.from_numpy(dy2)).sum()
    loss.backward()
    layer(x1, training=True)
    dx1, dg1, db1 = layer.backward(dy1)
    layer(x2, training=True)
    dx2, dg2, db2 = layer.backward(dy2)
    close(t1.grad, dx1, 1e-12, "dx1")
    close(t2.grad, dx2, 1e-12, "dx2")
    close(module.gamma.grad, dg1.ravel() + dg2.ravel(), 1e-12, "dgamma")
    close(module.beta.grad, db1.ravel() + db2.ravel(), 1e-12, "dbeta")


@pytest.mark.parametrize("kw, exc, match", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 3, "axis": 1.0}, TypeError, "axis"),
    ({"num_features": 3, "momentum": 1.5}, ValueError, "momentum"),
    ({"num_features": 3, "epsilon": -1}, ValueError, "epsilon"),
    ({"num_features": 3, "renorm_clipping": {"rmax": 1, "foo": 2}}, ValueError, "renorm_clipping"),
    ({"num_features": 3, "virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ({"num_features": 3, "renorm": "yes"}, TypeError, "renorm"),
    ({"num_features": 3, "dtype": torch.bfloat16}, TypeError,
     r"dtype must be torch.float32 or torch.float64, got torch.bfloat16"),
    ({"num_features": 3, "trainable": 0}, TypeError, "trainable must be a bool"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        nkt.BatchNormalization(**kw)


def test_trainable_false_freezes_as_in_keras():
    """Keras 2's freeze: with trainable False a module in train() runs inference (the moving statistics, which do
    not move) and gamma and beta get no gradient; assigning it was silently ignored before."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4) * 2 + 1
    frozen, reference = nkt.BatchNormalization(3), nkt.BatchNormalization(3).eval()
    for m in (frozen, reference):
        m(x)  # (reference: eval, statistics untouched)
    frozen.train()(x)  # one training call: the moving statistics move
    reference.load_state_dict(frozen.state_dict())
    frozen.trainable = False
    assert not frozen.gamma.requires_grad and not frozen.beta.requires_grad
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    xg = x.clone().requires_grad_()
    y = frozen(xg)
    y.sum().backward()
    assert torch.equal(y, reference(x)) and frozen.training
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    assert frozen.gamma.grad is None and xg.grad is not None
    frozen.trainable = True
    assert frozen.gamma.requires_grad and not torch.equal(frozen(x), reference(x))
    assert not nkt.BatchNormalization(3, trainable=False).gamma.requires_grad


def test_bad_inputs():
    m = nkt.BatchNormalization(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="num_features"):
        m(torch.zeros(8, 4, 2))
    with pytest.raises(ValueError, match="must divide the batch size"):
        m(torch.randn(6, 3, 2))
    with pytest.raises(TypeError, match="float32 or float64"):
        m(torch.zeros(8, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(np.zeros((8, 3), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        nkt.BatchNormalization(3, axis=2)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="axis cannot include 0"):
        nkt.BatchNormalization(4, axis=0, virtual_batch_size=2)(torch.zeros(4, 3))
    m.eval()
    assert m(torch.randn(6, 3, 2)).shape == (6, 3, 2)                 # inference takes any batch


def test_matches_tf_keras_renorm_ghost():
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras")
    shape = (6, 3, 4, 5)                                              # NHWC for tf_keras, C = 5
    kw = {"momentum": 0.9, "renorm": True, "renorm_clipping": {"rmax": 1.4, "rmin": 0.7, "dmax": 0.5},
          "renorm_momentum": 0.8, "virtual_batch_size": 3}
    ref = tf_keras.layers.BatchNormalization(fused=False, **kw)
    ref.build(shape)
    module = nkt.BatchNormalization(shape[-1], axis=-1, **kw)
    rng = np.random.default_rng(11)
    g = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    b = (0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    ref.gamma.assign(g.reshape(ref.gamma.shape))
    ref.beta.assign(b.reshape(ref.beta.shape))
    with torch.no_grad():
        module.gamma.copy_(torch.from_numpy(g))
        module.beta.copy_(torch.from_numpy(b))
    tol = 1e-5
    for step in range(5):
        x = (2.0 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            yt = ref(xt, training=True)
            loss = tf.reduce_sum(yt * dy)
        grads = tape.gradient(loss, [xt, ref.gamma, ref.beta])
        xp = torch.from_numpy(x).requires_grad_(True)
        module.train()
        y = module(xp)
        y.backward(torch.from_numpy(dy))
        close(y, yt.numpy(), tol, f"y step {step}")
        close(xp.grad, grads[0].numpy(), tol, f"dx step {step}")
        close(module.gamma.grad, grads[1].numpy(), tol, f"dgamma step {step}")
        close(module.beta.grad, grads[2].numpy(), tol, f"dbeta step {step}")
        module.gamma.grad = module.beta.grad = None
        for name in ("moving_mean", "moving_variance") + RENORM_VARS:
            close(getattr(module, name), getattr(ref, name).numpy(), tol, f"{name} step {step}")
    x = rng.standard_normal(shape).astype(np.float32)
    module.eval()
    close(module(torch.from_numpy(x)), ref(tf.constant(x), training=False).numpy(), tol, "inference")


# --- BatchRenorm*d and GhostBatchNorm*d (torch.nn conventions) -------------------------------------------------

RENORM = {1: nkt.BatchRenorm1d, 2: nkt.BatchRenorm2d, 3: nkt.BatchRenorm3d}
GHOST = {1: nkt.GhostBatchNorm1d, 2: nkt.GhostBatchNorm2d, 3: nkt.GhostBatchNorm3d}
TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
TORCH_SHAPES = {1: (8, 3, 5), 2: (8, 3, 4, 3), 3: (8, 3, 2, 3, 2)}


class TorchOracle:
    """float64, plainly: ghost batch j = samples j, j + G, j + 2G, ...; Batch Renormalization with r and d from
    the running statistics (before the step); torch's running-statistics update with the unbiased variance."""

    def __init__(self, c, eps, momentum, rmax=None, dmax=None, vbs=None, renorm_momentum=None):
        self.eps, self.momentum, self.rmax, self.dmax, self.vbs = eps, momentum, rmax, dmax, vbs
        self.rm, self.rv, self.steps = np.zeros(c), np.ones(c), 0
        self.renorm_momentum = renorm_momentum           # not None: r and d from separate renorm statistics
        self.renorm_mean, self.renorm_std = np.zeros(c), np.ones(c)

    def train(self, x, dy, w, b):
        n, c = x.shape[:2]
        g = 1 if self.vbs is None else n // self.vbs
        bshape = (1, c) + (1,) * (x.ndim - 2)
        w, b = w.reshape(bshape), b.reshape(bshape)
        y, dx = np.empty_like(x), np.empty_like(x)
        dw, db = np.zeros(c), np.zeros(c)
        means, vars_, counts = [], [], []
        ghost_stats = []
        for j in range(g):
            xs, dys = x[j::g], dy[j::g]
            red = (0,) + tuple(range(2, x.ndim))
            mu = xs.mean(axis=red, keepdims=True)
            var = ((xs - mu) ** 2).mean(axis=red, keepdims=True)
            means.append(mu), vars_.append(var), counts.append(xs.size // c)
            ghost_stats.append((xs, dys, mu, var, red))
        mean_b, var_b = np.mean(means, axis=0), np.mean(vars_, axis=0)
        if self.rmax is not None and self.renorm_momentum is not None:
            s = np.maximum(self.renorm_std.reshape(bshape), np.sqrt(self.eps))
            r = np.clip(np.sqrt(var_b + self.eps) / s, 1 / self.rmax, self.rmax)
            d = np.clip((mean_b - self.renorm_mean.reshape(bshape)) / s, -self.dmax, self.dmax)
            f = self.renorm_momentum
            self.renorm_mean = (1 - f) * self.renorm_mean + f * mean_b.ravel()
            self.renorm_std = (1 - f) * self.renorm_std + f * np.sqrt(var_b + self.eps).ravel()
        elif self.rmax is not None:
            sigma = np.sqrt(self.rv.reshape(bshape) + self.eps)
            r = np.clip(np.sqrt(var_b + self.eps) / sigma, 1 / self.rmax, self.rmax)
            d = np.clip((mean_b - self.rm.reshape(bshape)) / sigma, -self.dmax, self.dmax)
        else:
            r, d = np.ones(bshape), np.zeros(bshape)
        for j, (xs, dys, mu, var, red) in enumerate(ghost_stats):
            rstd = 1 / np.sqrt(var + self.eps)
            xhat = (xs - mu) * rstd
            y[j::g] = w * (xhat * r + d) + b
            gx = dys * w * r                                      # dL/dxhat
            m = counts[j]
            dx[j::g] = rstd / m * (m * gx - gx.sum(axis=red, keepdims=True)
                                   - xhat * (gx * xhat).sum(axis=red, keepdims=True))
            dw += (dys * (xhat * r + d)).sum(axis=red)
            db += dys.sum(axis=red)
        self.steps += 1
        f = 1 / self.steps if self.momentum is None else self.momentum
        m = counts[0]
        self.rm = (1 - f) * self.rm + f * mean_b.ravel()
        self.rv = (1 - f) * self.rv + f * var_b.ravel() * m / (m - 1)
        return y, dx, dw, db


def torch_pair(kind, dims, dtype, momentum=0.1, **kw):
    cls = (RENORM if kind == "renorm" else GHOST)[dims]
    m = cls(3, momentum=momentum, **kw)
    if dtype == np.float64:
        m = m.double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.3, -0.6, 0.9]))
        m.bias.copy_(torch.tensor([0.2, -0.1, 0.4]))
    o = TorchOracle(3, m.eps, momentum, rmax=kw.get("rmax", 3.0) if kind == "renorm" else None,
                    dmax=kw.get("dmax", 5.0), vbs=kw.get("virtual_batch_size"),
                    renorm_momentum=kw.get("renorm_momentum"))
    return m, o


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind, kw", [
    ("renorm", {"rmax": 1.5, "dmax": 0.5}),
    ("renorm", {"rmax": 3.0, "dmax": 5.0, "momentum": None}),
    ("renorm", {"rmax": 1.5, "dmax": 0.5, "renorm_momentum": 0.3}),
    ("renorm", {"rmax": 3.0, "dmax": 5.0, "renorm_momentum": 0.7, "momentum": None}),
    ("ghost", {"virtual_batch_size": 2}),
    ("ghost", {"virtual_batch_size": 4, "momentum": 0.3}),
])
def test_renorm_ghost_match_oracle(kind, kw, dims, dtype):
    kw = dict(kw)
    momentum = kw.pop("momentum", 0.1)
    m, o = torch_pair(kind, dims, dtype, momentum=momentum, **kw)
    rng = np.random.default_rng(dims)
    shape = TORCH_SHAPES[dims]
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for step in range(5):
        x = (0.5 * step + (1 + 0.3 * step) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        wy, wdx, wdw, wdb = o.train(x.astype(np.float64), dy.astype(np.float64),
                                    m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        xt = torch.from_numpy(x).requires_grad_(True)
        y = m(xt)
        y.backward(torch.from_numpy(dy))
        assert y.dtype == xt.dtype and m.weight.grad.dtype == xt.dtype
        close(y, wy, rtol, f"y step {step}")
        close(xt.grad, wdx, rtol, f"dx step {step}")
        close(m.weight.grad, wdw, rtol, f"dweight step {step}")
        close(m.bias.grad, wdb, rtol, f"dbias step {step}")
        m.weight.grad = m.bias.grad = None
        close(m.running_mean, o.rm, rtol, f"running_mean step {step}")
        close(m.running_var, o.rv, rtol, f"running_var step {step}")
        if o.renorm_momentum is not None:
            assert m.renorm_mean.dtype == m.renorm_std.dtype == xt.dtype
            close(m.renorm_mean, o.renorm_mean, rtol, f"renorm_mean step {step}")
            close(m.renorm_std, o.renorm_std, rtol, f"renorm_std step {step}")
        assert int(m.num_batches_tracked) == step + 1
    m.eval()
    x = rng.standard_normal(shape[:1] + (3,) + shape[2:]).astype(dtype)[:3]   # eval: any batch size
    b = (1, 3) + (1,) * dims
    want = ((x - o.rm.reshape(b)) / np.sqrt(o.rv.reshape(b) + m.eps) * m.weight.detach().double().numpy().reshape(b)
            + m.bias.detach().double().numpy().reshape(b))
    close(m(torch.from_numpy(x)), want, rtol, "eval")


@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_renorm_ghost_gradcheck(kind):
    """float64 finite differences on tiny shapes. For renorm the running statistics are set so that r and d are
    clipped in every channel (constants, as the analytical gradient takes them)."""
    if kind == "renorm":
        m = nkt.BatchRenorm1d(2, rmax=1.5, dmax=0.25).double()
        init = {"running_mean": torch.tensor([4.0, -4.0], dtype=torch.float64),
                "running_var": torch.tensor([0.04, 0.09], dtype=torch.float64)}
    else:
        m = nkt.GhostBatchNorm1d(2, virtual_batch_size=3).double()
        init = {}
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.2, -0.8], dtype=torch.float64))
        for k, v in init.items():
            getattr(m, k).copy_(v)
    state = {k: v.clone() for k, v in m.named_buffers()}

    def f(x, w, b):
        with torch.no_grad():
            for k, v in m.named_buffers():
                v.copy_(state[k])
        return m(x)

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((6, 2, 2))).requires_grad_(True)
    torch.autograd.gradcheck(f, (x, m.weight, m.bias))


@pytest.mark.parametrize("momentum, bias", [(0.1, True), (None, True), (0.1, False)])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_reduces_to_torch_batchnorm(kind, dims, momentum, bias):
    """rmax=1, dmax=0, or one ghost batch, is torch's BatchNorm; also with torch 2.13's bias=False."""
    shape = TORCH_SHAPES[dims]
    if kind == "renorm":
        m = RENORM[dims](3, momentum=momentum, rmax=1.0, dmax=0.0, bias=bias)
    else:
        m = GHOST[dims](3, momentum=momentum, virtual_batch_size=shape[0], bias=bias)
    ref = TORCH_BN[dims](3, momentum=momentum, bias=bias)
    assert (m.bias is None) is (not bias)
    with torch.no_grad():
        for mod in (m, ref):
            mod.weight.copy_(torch.tensor([1.3, -0.6, 0.9]))
            if bias:
                mod.bias.copy_(torch.tensor([0.2, -0.1, 0.4]))
    assert list(m.state_dict()) == list(ref.state_dict())
    rng = np.random.default_rng(1)
    for step in range(4):
        x = torch.from_numpy((1 + 2 * rng.standard_normal(shape)).astype(np.float32))
        dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [mod(xi) for mod, xi in zip((m, ref), xs)]
        for y in ys:
            y.backward(dy)
        close(ys[0], ys[1].detach().numpy(), 1e-5, "y")
        close(xs[0].grad, xs[1].grad.numpy(), 1e-5, "dx")
        for name in ("weight", "bias") if bias else ("weight",):
            close(getattr(m, name).grad, getattr(ref, name).grad.numpy(), 1e-5, f"d{name}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            close(getattr(m, name), getattr(ref, name).numpy(), 1e-6, name)
    m.eval(), ref.eval()
    x = torch.randn(shape)
    close(m(x), ref(x).detach().numpy(), 1e-6, "eval")


def test_untracked_renorm_is_batchnorm_and_eval_uses_batch_statistics():
    m, ref = nkt.BatchRenorm2d(3, track_running_stats=False), torch.nn.BatchNorm2d(3, track_running_stats=False)
    assert m.running_mean is None and list(m.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    close(m(x), ref(x).detach().numpy(), 1e-5, "train")
    m.eval(), ref.eval()
    close(m(x), ref(x).detach().numpy(), 1e-5, "eval")
    g = nkt.GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False, affine=False).eval()
    x = torch.randn(4, 3, 2, 2)
    want = torch.cat([torch.nn.functional.batch_norm(x[j::2], None, None, training=True) for j in range(2)])
    close(g(x), want[[0, 2, 1, 3]].numpy(), 1e-5, "ghost eval without running statistics")


@pytest.mark.parametrize("make, exc, match", [
    (lambda: nkt.GhostBatchNorm2d(3), ValueError, "virtual_batch_size"),
    (lambda: nkt.GhostBatchNorm2d(3, virtual_batch_size=0), ValueError, "virtual_batch_size"),
    (lambda: nkt.GhostBatchNorm2d(3, virtual_batch_size=2.0), ValueError, "virtual_batch_size"),
    (lambda: nkt.BatchRenorm2d(3, rmax=0.5), ValueError, "rmax"),
    (lambda: nkt.BatchRenorm2d(3, dmax=-1), ValueError, "dmax"),
    (lambda: nkt.BatchRenorm2d(3, rmax=float("inf")), ValueError, "rmax"),
    (lambda: nkt.BatchRenorm2d(3, renorm_momentum=-0.1), ValueError, "BatchRenorm2d: renorm_momentum"),
    (lambda: nkt.BatchRenorm1d(3, renorm_momentum=1.5), ValueError, "BatchRenorm1d: renorm_momentum"),
    (lambda: nkt.BatchRenorm3d(3, renorm_momentum=float("nan")), ValueError, "BatchRenorm3d: renorm_momentum"),
    (lambda: nkt.BatchRenorm2d(3, renorm_momentum=True), ValueError, "BatchRenorm2d: renorm_momentum"),
    (lambda: nkt.BatchRenorm2d(3, renorm_momentum="0.1"), ValueError, "BatchRenorm2d: renorm_momentum"),
])
def test_renorm_ghost_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_renorm_momentum_none_unchanged():
    """renorm_momentum=None (the default) is the paper's version: no extra buffers, r and d from the running
    statistics; an explicit None is the same module as the default, step for step."""
    shape = TORCH_SHAPES[2]
    a, b = nkt.BatchRenorm2d(3, rmax=1.5, dmax=0.5), nkt.BatchRenorm2d(3, rmax=1.5, dmax=0.5, renorm_momentum=None)
    assert a.renorm_momentum is None and not hasattr(a, "renorm_std")
    want = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(a.state_dict()) == list(b.state_dict()) == want
    o = TorchOracle(3, a.eps, 0.1, rmax=1.5, dmax=0.5)
    rng = np.random.default_rng(5)
    for step in range(4):
        x = (1 + 2 * rng.standard_normal(shape)).astype(np.float64)
        wy = o.train(x, np.zeros(shape), np.ones(3), np.zeros(3))[0]
        for m in (a, b):
            close(m(torch.from_numpy(x.astype(np.float32))), wy, 1e-5, f"y step {step}")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_renorm_momentum_floors_renorm_std():
    """As Keras, r and d divide by max(renorm_std, sqrt(eps)): renorm_std of 0 or below sqrt(eps) is floored."""
    m, o = torch_pair("renorm", 2, np.float64, rmax=1e3, dmax=1e3, renorm_momentum=0.2)
    with torch.no_grad():
        m.renorm_std.copy_(torch.tensor([0.0, 1e-4, 2.0], dtype=torch.float64))
        m.renorm_mean.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    o.renorm_std, o.renorm_mean = m.renorm_std.numpy().copy(), m.renorm_mean.numpy().copy()
    rng = np.random.default_rng(7)
    shape = TORCH_SHAPES[2]
    for step in range(2):
        x = 0.01 * rng.standard_normal(shape)
        wy = o.train(x, np.zeros(shape), m.weight.detach().numpy(), m.bias.detach().numpy())[0]
        close(m(torch.from_numpy(x)), wy, 1e-12, f"y step {step}")
        close(m.renorm_std, o.renorm_std, 1e-12, f"renorm_std step {step}")


def test_renorm_momentum_state_dict_round_trip():
    shape = TORCH_SHAPES[1]
    m = nkt.BatchRenorm1d(3, rmax=2.0, dmax=1.0, renorm_momentum=0.4)
    assert "renorm_momentum=0.4" in repr(m)
    assert torch.equal(m.renorm_mean, torch.zeros(3)) and torch.equal(m.renorm_std, torch.ones(3))
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                    "renorm_mean", "renorm_std"]
    rng = np.random.default_rng(2)
    for _ in range(3):
        m(torch.from_numpy((2 + 3 * rng.standard_normal(shape)).astype(np.float32)))
    assert not torch.equal(m.renorm_std, torch.ones(3)) and not torch.equal(m.renorm_mean, m.running_mean)
    m2 = nkt.BatchRenorm1d(3, rmax=2.0, dmax=1.0, renorm_momentum=0.4)
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = torch.from_numpy((1 + rng.standard_normal(shape)).astype(np.float32))
    assert torch.equal(m(x), m2(x))                                   # same renorm statistics, same r and d
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    with pytest.raises(RuntimeError, match="renorm_std"):           # the paper's module has no such buffers
        nkt.BatchRenorm1d(3).load_state_dict(m.state_dict())
    m.reset_running_stats()
    assert torch.equal(m.renorm_mean, torch.zeros(3)) and torch.equal(m.renorm_std, torch.ones(3))
    u = nkt.BatchRenorm1d(3, renorm_momentum=0.4, track_running_stats=False)
    assert u.renorm_mean is None and u.renorm_std is None and list(u.state_dict()) == ["weight", "bias"]


def test_renorm_ghost_bad_inputs():
    g = nkt.GhostBatchNorm2d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="must divide the batch size"):
        g(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="4D input"):                 # torch.nn.BatchNorm2d's dimension check
        g(torch.randn(8, 3, 2))
    with pytest.raises(ValueError, match="num_features"):
        g(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nkt.GhostBatchNorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nkt.BatchRenorm1d(3)(torch.randn(1, 3))
    g.eval()
    assert g(torch.randn(6, 3, 2, 2)).shape == (6, 3, 2, 2)
    assert isinstance(g, torch.nn.BatchNorm2d) and isinstance(nkt.BatchRenorm3d(2), torch.nn.BatchNorm3d)
    with pytest.raises(TypeError, match="torch.Tensor"):
        g(np.zeros((8, 3, 2, 2), np.float32))


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (4, 3, 0, 2)])
@pytest.mark.parametrize("kind", ["renorm", "ghost"])
def test_renorm_ghost_take_empty_batches_as_torch_batchnorm(kind, shape):
    """A batch without values (detection models and variable-length batching make them) gives what
    torch.nn.BatchNorm2d gives: an empty output, zero parameter gradients, running statistics untouched and
    num_batches_tracked counted (it raised an IndexError)."""
    m = nkt.BatchRenorm2d(3) if kind == "renorm" else nkt.GhostBatchNorm2d(3, virtual_batch_size=2)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for mod in (m, ref):
            mod.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    for mod in (m, ref):
        x = torch.zeros(shape, requires_grad=True)
        y = mod(x)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
        assert torch.equal(mod.weight.grad, torch.zeros(3)) and torch.equal(mod.bias.grad, torch.zeros(3))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m, name), getattr(ref, name)), name


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keras_module_takes_empty_batches_as_torch_batchnorm(train, dtype):
    """An empty batch through the Keras-style module: an empty output in the input's dtype, zero gradients of gamma
    and beta, the moving statistics untouched (it raised "input_shape must have positive sizes", in eval too)."""
    m = nkt.BatchNormalization(3, axis=-1)
    m.train(train)
    before = copy.deepcopy(m.state_dict())
    x = torch.zeros((0, 4, 3), dtype=dtype, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and y.dtype == dtype and x.grad.shape == x.shape
    assert torch.equal(m.gamma.grad, torch.zeros(3)) and torch.equal(m.beta.grad, torch.zeros(3))
    for name, value in m.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert m(torch.randn(5, 4, 3)).shape == (5, 4, 3)  # and the layer builds on the next real batch


def test_convert_sync_batchnorm_refuses_renorm_ghost_and_keras():
    """Renorm and ghost subclass torch.nn.BatchNorm*d, so a plain SyncBatchNorm would silently replace their
    semantics; the Keras-style layer, left alone, would silently normalize per process."""
    ghost = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), nkt.GhostBatchNorm2d(3, virtual_batch_size=2))
    for m in (nkt.BatchRenorm2d(3), ghost, torch.nn.Sequential(nkt.BatchNormalization(3))):
        with pytest.raises(TypeError, match="no synchronized version"):
            nkt.convert_sync_batchnorm(m)
    assert isinstance(nkt.convert_sync_batchnorm(torch.nn.BatchNorm2d(3)), nkt.SyncBatchNorm)


@pytest.mark.parametrize("make, train", [(lambda: nkt.BatchRenorm1d(3), True),
                                         (lambda: nkt.GhostBatchNorm1d(3, virtual_batch_size=4), True),
                                         (lambda: nkt.BatchNormalization(3), True),
                                         (lambda: nkt.BatchNormalization(3), False)])
def test_input_changed_in_place_after_forward_is_torchs_error(make, train):
    """Their backward reads NumPy views of the input's memory: an in-place change of it between forward and
    backward raises torch's error, as torch.nn.BatchNorm's does, rather than giving wrong gradients."""
    m = make().double().train(train)
    lin = torch.nn.Linear(3, 3).double()
    h = lin(torch.randn(8, 3, dtype=torch.float64))
    h += m(h)  # the Linear does not save its output: only the norm's check can catch it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.pow(2).sum().backward()


def test_keras_module_hyperparameters_take_effect_when_assigned():
    """As in tf_keras (and the NumPy layer), momentum, epsilon, renorm_clipping, renorm_momentum and
    virtual_batch_size are read at every call: assigning them changes the next call, and is checked."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 4, 4)) * 2 + 5)
    m = nkt.BatchNormalization(3, renorm=True).double()
    layer = normkit.BatchNormalization(axis=1, renorm=True, dtype="float64")
    for obj in (m, layer):
        obj.momentum, obj.epsilon, obj.renorm_momentum = 0.0, 100.0, 0.5
        obj.renorm_clipping = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}
        obj.virtual_batch_size = 4
    y = m(x)
    close(y, layer(x.numpy(), training=True), 1e-12, "y")
    for name in ("moving_mean", "moving_variance", *RENORM_VARS):
        close(getattr(m, name), getattr(layer, name), 1e-12, name)
    assert "momentum=0.0, epsilon=100.0" in repr(m)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        m.momentum = 1.5
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        m.epsilon = -1.0
    with pytest.raises(ValueError, match="renorm_clipping has keys"):
        m.renorm_clipping = {"r": 1.0}
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        m.virtual_batch_size = 0


def test_renorm_rmax_dmax_assigned_are_checked_at_the_call():
    m = nkt.BatchRenorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    for name, value, low in (("rmax", 0.5, 1.0), ("rmax", 0, 1.0), ("dmax", -1.0, 0.0)):
        setattr(m, name, value)
        with pytest.raises(ValueError, match=f"BatchRenorm2d: {name} must be a finite number >= {low}, got {value}"):
            m(x)
        setattr(m, name, 3.0)


NUMPY_STEP_LAYERS = {
    "BatchRenorm2d": (lambda **kw: nkt.BatchRenorm2d(3, rmax=2.0, dmax=1.0, **kw), "BatchRenorm*d"),
    "GhostBatchNorm2d": (lambda **kw: nkt.GhostBatchNorm2d(3, virtual_batch_size=2, **kw), "GhostBatchNorm*d"),
    "BatchNormalization": (lambda **kw: nkt.BatchNormalization(3, renorm=True, **kw), "BatchNormalization"),
}


@pytest.mark.parametrize("name", list(NUMPY_STEP_LAYERS))
def test_numpy_step_layers_under_torch_compile(name):
    """Their step is NumPy code, which torch.compile runs outside its graph (traced, dynamo guarded that code on
    per-call objects, and a SyncBatchNorm call ran a float64 kernel on float32 data): training steps and an eval
    call of the compiled module equal eager's, running statistics included; fullgraph=True says which layers
    cannot be captured whole."""
    make, family = NUMPY_STEP_LAYERS[name]
    rng = np.random.default_rng(1)
    xs = [torch.from_numpy(rng.standard_normal((4, 3, 5, 5)) * 2 + 3) for _ in range(3)]
    eager = make().double()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="eager")
    for step, x in enumerate(xs):
        if step == 2:
            eager.eval(), compiled_module.eval()
        outs = []
        for run, module in ((eager, eager), (compiled, compiled_module)):
            xi = x.clone().requires_grad_()
            y = run(xi)
            y.backward(torch.cos(x))
            outs.append([y.detach(), xi.grad, *[p.grad.clone() for p in module.parameters()],
                         *[b.clone() for b in module.buffers()]])
        for got, want in zip(outs[1], outs[0]):
            assert torch.equal(got, want), (name, step)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=rf"normkit's .*{re.escape(family)}.* run NumPy code"):
        torch.compile(make().double(), backend="eager", fullgraph=True)(xs[0])


@pytest.mark.parametrize("transform", ["grad", "vmap", "vmap-of-one"])
@pytest.mark.parametrize("name", list(NUMPY_STEP_LAYERS))
def test_numpy_step_layers_refuse_torch_func_transforms(name, transform):
    """torch.func's tensors have no memory for NumPy to read: a clear error naming the layer (torch's own named
    a tensor without storage, or autograd.Function's setup_context); also where vmap's sample is a batch of one,
    which GhostBatchNorm's batch-size check refused first, naming a batch the caller never passed."""
    make, _ = NUMPY_STEP_LAYERS[name]
    kw = {} if name == "BatchNormalization" else {"track_running_stats": False}  # (torch's own then works)
    m = make(**kw)
    params = dict(m.named_parameters())
    x = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=f"^{name}: torch.func transforms .* are not supported"):
        if transform == "grad":
            torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).pow(2).sum())(params)
        elif transform == "vmap":
            torch.func.vmap(m)(x.unsqueeze(1).expand(4, 2, 3, 3, 3))
        else:
            torch.func.vmap(m)(x.unsqueeze(1))


@pytest.mark.parametrize("name", list(NUMPY_STEP_LAYERS))
def test_numpy_step_layers_refuse_jit_trace_and_export(name):
    """A trace would record the NumPy step's results of the tracing call as constants (BatchRenorm's and
    GhostBatchNorm's running statistics were then rewritten with them at every call, silently); torch.export's
    FakeTensors have no memory to read. Both are clear errors. In eval BatchRenorm and GhostBatchNorm are
    batch_norm, which traces."""
    make, _ = NUMPY_STEP_LAYERS[name]
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=f"{name}: torch.jit.trace cannot record its step"):
        torch.jit.trace(make(), x, check_trace=False)
    with pytest.raises(RuntimeError, match=f"{name}: torch.export and FakeTensors cannot run its step"):
        torch.export.export(make(), (x,))
    if name != "BatchNormalization":
        m = make().eval()
        traced = torch.jit.trace(m, x)
        assert torch.equal(traced(2 * x + 1), m(2 * x + 1))


def test_layout_settings_are_fixed_and_a_dtype_mix_is_named():
    """axis, center, scale and renorm decide the parameters and buffers: assigning one was taken by repr and the
    input check while the computation kept the old one (or, for renorm, failed with an AttributeError)."""
    m = nkt.BatchNormalization(4, axis=1)
    for name, value in (("axis", 2), ("renorm", True), ("center", False), ("scale", False)):
        with pytest.raises(AttributeError, match=f"BatchNormalization: {name} is fixed at construction"):
            setattr(m, name, value)
    assert (m.axis, m.renorm, m.center, m.scale) == (1, False, True, True)
    copy.deepcopy(m)(torch.randn(3, 4, 2))
    m.moving_mean = m.moving_mean.double()
    with pytest.raises(TypeError, match=re.escape("must all be float32 or all float64, got ['torch.float32', "
                                                  "'torch.float64']")):
        m(torch.randn(3, 4, 2))
    with pytest.raises(TypeError, match=re.escape("got ['torch.float16']")):
        nkt.BatchNormalization(4).half()(torch.randn(3, 4, 2))


def test_keras_module_takes_fused_as_tf_keras():
    """fused (tf_keras's default None takes the fused path for float32 rank-4/5 channel axes: unbiased batch
    variance into moving_variance) was refused; decided again when the module's dtype changes."""
    x = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    count = x.numel() // 3
    biased = x.transpose(0, 1).reshape(3, -1).double().var(dim=1, unbiased=False)
    for fused, dtype, factor in ((None, torch.float32, count / (count - 1)), (False, torch.float32, 1.0),
                                 (True, torch.float32, count / (count - 1)), (None, torch.float64, 1.0)):
        module = nkt.BatchNormalization(3, momentum=0.0, fused=fused).to(dtype)
        module(x.to(dtype))
        assert module.fused is (factor != 1.0) and f"fused={module.fused}" in repr(module)
        torch.testing.assert_close(module.moving_variance.double(), biased * factor, rtol=1e-5, atol=1e-7)
    module = nkt.BatchNormalization(3, fused=True)
    module(x)
    with pytest.raises(ValueError, match="fused=True is only supported for float32 layers"):
        module.double()(x.double())
    with pytest.raises(ValueError, match="fused=True and renorm=True together are not supported"):
        nkt.BatchNormalization(3, fused=True, renorm=True)
    with pytest.raises(AttributeError, match="fused is fixed at construction"):
        module.fused = False


def test_keras_module_takes_initializers():
    module = nkt.BatchNormalization(3, gamma_initializer="zeros", moving_variance_initializer={
        "class_name": "Constant", "config": {"value": 9.0}}, renorm=True, dtype=torch.float64)
    assert module.gamma.dtype == torch.float64 and not module.gamma.any() and module.beta.eq(0).all()
    assert module.moving_variance.eq(9).all() and module.moving_stddev.eq(3).all() and module.renorm_stddev.eq(3).all()
    with pytest.raises(ValueError, match="beta_initializer must be 'zeros', 'ones'"):
        nkt.BatchNormalization(3, beta_initializer="he_normal")


def test_keras_module_takes_a_mask():
    """forward(input, mask): the NumPy layer's weighted statistics, gradients through autograd."""
    g = torch.Generator().manual_seed(0)
    x = (2 + torch.randn(4, 6, 3, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(4, 6, generator=g) < 0.6
    module = nkt.BatchNormalization(3, axis=-1, momentum=0.5).double()
    y = module(x, mask)
    dy = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    y.backward(dy)
    layer = normkit.BatchNormalization(momentum=0.5, dtype="float64")
    want = layer(x.detach().numpy(), training=True, mask=mask.numpy())
    dx, dgamma, dbeta = layer.backward(dy.numpy())
    torch.testing.assert_close(y.detach(), torch.from_numpy(want))
    torch.testing.assert_close(x.grad, torch.from_numpy(dx))
    torch.testing.assert_close(module.gamma.grad, torch.from_numpy(dgamma))
    torch.testing.assert_close(module.moving_variance, torch.from_numpy(layer.moving_variance))
    module.eval()
    torch.testing.assert_close(module(x, mask), module(x))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor or None, got list"):
        module(x, [1, 0])
    module.train()
    torch.testing.assert_close(module(x, mask.bfloat16()), module(x, mask))  # (NumPy has no bfloat16: it raised)


@pytest.mark.parametrize("make", [lambda: nkt.BatchRenorm2d(3), lambda: nkt.GhostBatchNorm2d(3, virtual_batch_size=2),
                                  lambda: nkt.BatchNormalization(3)], ids=["renorm", "ghost", "keras"])
def test_numpy_step_layers_name_forward_mode_ad(make):
    """Dual tensors in training got torch's "You must implement the jvp function" (the Function's author's
    business); the layer's own error now (SyncBatchNorm's too, in a process group)."""
    import torch.autograd.forward_ad as fwad

    x = torch.randn(4, 3, 2, 2)
    with fwad.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported where its step runs NumPy"):
            make()(fwad.make_dual(x, torch.randn_like(x)))


def test_keras_module_takes_a_list_of_axes():
    """axis=[1, 2] (tf_keras's and the NumPy layer's) was refused; num_features is the axes' sizes' product and
    the variables hold those dims flattened. Training and inference, values and gradients, as the NumPy layer."""
    g = torch.Generator().manual_seed(0)
    x = (1 + torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)
    module = nkt.BatchNormalization(6, axis=[1, -2], momentum=0.5).double()
    layer = normkit.BatchNormalization(axis=[1, -2], momentum=0.5, dtype="float64")
    for training in (True, False):
        module.train(training)
        x.grad = None
        y = module(x)
        y.backward(dy)
        want = layer(x.detach().numpy(), training=training)
        torch.testing.assert_close(y.detach(), torch.from_numpy(want))
        torch.testing.assert_close(module.moving_variance, torch.from_numpy(layer.moving_variance.reshape(-1)))
        if training:
            dx, dgamma, _ = layer.backward(dy.numpy())
            torch.testing.assert_close(x.grad, torch.from_numpy(dx))
            torch.testing.assert_close(module.gamma.grad, torch.from_numpy(dgamma.reshape(-1)))
        else:  # y = gamma * (x - moving_mean) * rstd + beta, per (dim 1, dim 2) pair
            rstd = (module.moving_variance + module.epsilon).rsqrt().view(1, 3, 2, 1)
            torch.testing.assert_close(x.grad, dy * module.gamma.detach().view(1, 3, 2, 1) * rstd)
    assert module.axis == [1, -2] and module.gamma.shape == (6,)
    with pytest.raises(ValueError, match=r"expected input's size at dims \[1, 2\] \(their sizes' product\) to match "
                                         r"num_features \(6\), got shape \(4, 3, 3, 5\)"):
        module(torch.randn(4, 3, 3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="axis must be an int or a non-empty list of ints, got \\[\\]"):
        nkt.BatchNormalization(6, axis=[])
    with pytest.raises(ValueError, match="axis \\[1, -2\\] names a dim twice for an input of rank 3"):
        nkt.BatchNormalization(3, axis=[1, -2])(torch.randn(2, 3, 4))
