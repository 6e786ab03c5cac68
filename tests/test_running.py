"""normkit.running's eager update: the compiled loop (src/normkit_kernels/_running_update.pyx) against the NumPy
form it stands for, bit for bit, and which calls take which."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit import running


def _numpy_form(rm, rv, mean, rstd, eps, count, momentum, exact):
    running.update_running(rm, rv, mean, running.batch_variance(rstd, eps, count, exact), momentum)


def _compiled(rm, rv, mean, rstd, eps, count, momentum):
    return running._compiled_update(rm, rv, mean, rstd, eps, eps * running._TRUSTED, count / (count - 1), momentum)


def _case(seed: int, c: int, dtype, eps: float):
    rng = np.random.default_rng(seed)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.1, 3.0, c).astype(dtype)
    mean = (rng.standard_normal(c) * 10.0 ** rng.uniform(-3, 4, c)).astype(dtype)
    # variances from 1e4 down to eps / 8, just above the trust limit (eps / 16)
    var = 10.0 ** rng.uniform(np.log10(eps / 8), 4, c)
    rstd = (1 / np.sqrt(var + eps)).astype(dtype)
    return rm, rv, mean, rstd


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 70), dtype=st.sampled_from([np.float32, np.float64]),
       momentum=st.sampled_from([0.0, 0.1, 1 / 3, 0.9, 1.0]), eps=st.sampled_from([1e-5, 1e-3, 0.5]),
       count=st.sampled_from([2, 3, 512, 10**7]))
def test_compiled_update_is_the_numpy_form_to_the_bit(seed, c, dtype, momentum, eps, count):
    rm, rv, mean, rstd = _case(seed, c, dtype, eps)
    want_m, want_v = rm.copy(), rv.copy()
    _numpy_form(want_m, want_v, mean, rstd, eps, count, momentum, None)
    assert _compiled(rm, rv, mean, rstd, eps, count, momentum)
    np.testing.assert_array_equal(rm, want_m, strict=True)
    np.testing.assert_array_equal(rv, want_v, strict=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", ["near_eps", "nan", "zero"])
def test_compiled_update_refuses_doubtful_channels_and_writes_nothing(dtype, bad):
    """A channel whose 1/rstd^2 - eps is below eps/16 (or NaN: rstd 0 from eps = inf, or NaN data) needs the
    variance from the data: the loop writes nothing and says so; update_from_rstd then takes the NumPy form."""
    eps = np.inf if bad == "zero" else 1e-3
    rm, rv, mean, rstd = _case(0, 9, dtype, 1e-3)
    rstd[4] = {"near_eps": 1 / np.sqrt(eps * 1.01), "nan": np.nan, "zero": 0.0}[bad]
    before = rm.copy(), rv.copy()
    assert not _compiled(rm, rv, mean, rstd, eps, 8, 0.1)
    np.testing.assert_array_equal(rm, before[0], strict=True)
    np.testing.assert_array_equal(rv, before[1], strict=True)
    want_m, want_v = rm.copy(), rv.copy()
    exact = (lambda channels: np.full(len(channels), 7.0))
    _numpy_form(want_m, want_v, mean, rstd, eps, 8, 0.1, exact)
    running.update_from_rstd(rm, rv, mean, rstd, eps, 8, 0.1, exact)
    np.testing.assert_array_equal(rm, want_m, strict=True)
    np.testing.assert_array_equal(rv, want_v, strict=True)
    if bad == "near_eps":
        np.testing.assert_allclose(rv[4], 0.9 * float(before[1][4]) + 0.1 * 8.0, rtol=1e-6)  # the exact one, unbiased


@pytest.mark.parametrize("what", ["strided", "mixed dtypes", "float16", "per instance", "read-only"])
def test_what_the_compiled_update_does_not_take_goes_to_the_numpy_form(what):
    rm, rv, mean, rstd = _case(1, 6, np.float32, 1e-5)
    if what == "strided":
        rm = np.repeat(rm, 2)[::2]
    elif what == "mixed dtypes":
        rv = rv.astype(np.float64)
    elif what == "float16":
        rm, rv = rm.astype(np.float16), rv.astype(np.float16)
    elif what == "per instance":
        mean, rstd = np.stack([mean, mean * 2]), np.stack([rstd, rstd * 0.5])
    want_m, want_v = rm.copy(), rv.copy()
    _numpy_form(want_m, want_v, mean, rstd, 1e-5, 12, 0.1, None)
    if what == "read-only":
        rm.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):  # the NumPy form's own error, as before
            running.update_from_rstd(rm, rv, mean, rstd, 1e-5, 12, 0.1, None)
        return
    with pytest.raises((TypeError, ValueError)):
        _compiled(rm, rv, mean, rstd, 1e-5, 12, 0.1)
    running.update_from_rstd(rm, rv, mean, rstd, 1e-5, 12, 0.1, None)
    np.testing.assert_array_equal(rm, want_m, strict=True)
    np.testing.assert_array_equal(rv, want_v, strict=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [-1, 1, 0])
def test_buffers_that_share_memory_are_updated_as_numpy_updates_them(dtype, shift):
    """running_mean and running_var overlapping in one buffer (or being one array): NumPy writes all of
    running_mean, then computes running_var from what is there; the loop does the same, not channel by channel."""
    _, _, mean, rstd = _case(2, 5, dtype, 1e-5)
    results = []
    for form in (_numpy_form, running.update_from_rstd):
        buf = np.linspace(0.5, 2.0, 6).astype(dtype)
        rm, rv = (buf[:5], buf[1:]) if shift > 0 else (buf[1:], buf[:5]) if shift < 0 else (buf[:5], buf[:5])
        form(rm, rv, mean, rstd, 1e-5, 40, 0.3, None)
        results.append(buf)
    np.testing.assert_array_equal(results[1], results[0], strict=True)


def test_without_the_compiled_loop_the_numpy_form_runs():
    """A build that lacks normkit_kernels._running_update (a broken or partial one) still imports normkit and
    updates running statistics, as the registry goes on without a backend that does not load."""
    code = """
import sys
sys.modules["normkit_kernels._running_update"] = None  # its import fails
import numpy as np
import normkit
from normkit import running
assert running._compiled_update is None
x = np.random.default_rng(0).standard_normal((8, 3, 5)).astype(np.float32) * 2 + 1
rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
normkit.get("bn")(x, rm, rv, training=True, momentum=1.0, backend="reference")
np.testing.assert_allclose(rm, x.mean(axis=(0, 2)), rtol=1e-5)
np.testing.assert_allclose(rv, x.var(axis=(0, 2), ddof=1), rtol=1e-4)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _numpy_form_refused(*args):
    raise AssertionError("the NumPy form ran")


@pytest.mark.parametrize("frontend", ["numpy", "torch"])
def test_common_training_calls_take_the_compiled_update(frontend, monkeypatch):
    """Training BatchNorm with float32 buffers (every BatchNorm module's call) never reaches the NumPy form; and
    its buffers are updated as torch updates them."""
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 5, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rm, rv = torch.zeros(5), torch.ones(5)
    want_m, want_v = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x, want_m, want_v, training=True, momentum=0.2)
    monkeypatch.setattr(running, "update_running", _numpy_form_refused)
    if frontend == "torch":
        import normkit.torch as nkt
        nkt.batch_norm(x.requires_grad_(), rm, rv, training=True, momentum=0.2)
    else:
        normkit.get("bn")(x.numpy(), rm.numpy(), rv.numpy(), training=True, momentum=0.2)
    torch.testing.assert_close(rm, want_m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, want_v, rtol=1e-6, atol=1e-7)
    with pytest.raises(AssertionError, match="the NumPy form ran"):  # the monkeypatch is where the update looks
        normkit.get("bn")(x.detach().numpy(), rm.double().numpy(), rv.numpy(), training=True)
