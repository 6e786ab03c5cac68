"""The oracle itself: the reference backend against PyTorch (forward and autograd) and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from support import OPS, copy_args, op_args

import normkit
from normkit.contract import SPECS

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_forward(op, x, kw):
    """The same op through its torch.nn.functional twin, from the op table (running stats as tensors, updated in
    place). The NumPy frontend's keyword arguments are torch.nn.functional's."""
    spec = SPECS[op]
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    if spec.running:
        t = {"running_mean": None, "running_var": None, **t}
    return getattr(F, spec.torch_name)(x, **t)


@st.composite
def cases(draw, op):
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 7), max_size=2)))
    shape, s = (n, c, *spatial), int(np.prod(spatial)) if spatial else 1
    training = draw(st.booleans()) if op in ("batchnorm", "instancenorm") else True
    if training and op == "batchnorm":
        assume(n * s > 1)
    if training and op == "instancenorm":
        assume(s > 1)
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    if op == "groupnorm":  # torch (and normkit) refuse N * C/G * S == 1 ("more than 1 value per group")
        assume(n * (c // groups) * s > 1)
    return dict(shape=shape, training=training, running=draw(st.booleans()),
                affine=draw(st.sampled_from(["none", "weight", "bias", "both"])), groups=groups,
                ln_dims=draw(st.integers(1, len(shape) - 1)), seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_reference_matches_torch(op, data):
    case = data.draw(cases(op))
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["shape"])
    dy = rng.standard_normal(case["shape"])
    kw = op_args(op, x, rng, groups=case["groups"], affine=case["affine"], ln_dims=case["ln_dims"],
                 training=case["training"], running=case["running"])
    ours_kw, theirs_kw = copy_args(kw), copy_args(kw)
    nk = normkit.get(op)
    y, saved = nk.forward(x, **ours_kw, backend="reference")
    dx, dw, db = nk.backward(dy, x, saved, **ours_kw, backend="reference")

    params = {k: torch.tensor(theirs_kw[k], requires_grad=True) for k in ("weight", "bias") if k in theirs_kw}
    tx = torch.tensor(x, requires_grad=True)
    extra = {}
    if op == "groupnorm" and case["affine"] == "bias":
        # torch 2.13's group_norm backward fails with "tensor does not have a device" for bias without weight;
        # a constant weight of ones is the same function.
        extra["weight"] = torch.ones(x.shape[1], dtype=torch.float64)
    ty = torch_forward(op, tx, {**theirs_kw, **extra, **params})
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    for name, ours in (("weight", dw), ("bias", db)):
        if name in params:
            np.testing.assert_allclose(ours, params[name].grad.numpy(), rtol=1e-9, atol=1e-9)
        else:
            assert ours is None
    for name in ("running_mean", "running_var"):  # torch updated its copies in place through from_numpy
        if name in kw:
            np.testing.assert_allclose(ours_kw[name], theirs_kw[name], rtol=1e-12, atol=1e-12)


def numeric_grad(f, a, eps=1e-6):
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f()
        flat[i] = old - eps
        lo = f()
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("op,training", [(op, True) for op in OPS] + [("batchnorm", False), ("instancenorm", False)])
def test_reference_gradient_matches_finite_differences(op, training, rng):
    x = rng.standard_normal((2, 4, 3, 2))
    dy = rng.standard_normal(x.shape)
    kw = op_args(op, x, rng, groups=2, affine="both", training=training)
    nk = normkit.get(op)

    def loss():  # <dy, y>: its gradient is exactly what backward computes
        return float((nk.forward(x, **copy_args(kw), backend="reference")[0] * dy).sum())

    _, saved = nk.forward(x, **copy_args(kw), backend="reference")
    dx, dw, db = nk.backward(dy, x, saved, **copy_args(kw), backend="reference")
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(loss, kw["weight"]), rtol=1e-5, atol=1e-7)
    if "bias" in kw:
        np.testing.assert_allclose(db, numeric_grad(loss, kw["bias"]), rtol=1e-5, atol=1e-7)
    else:  # rmsnorm: no bias
        assert db is None
