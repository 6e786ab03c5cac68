"""Every built-in backend against the NumPy reference: one suite, parametrized over backends.

Shapes come from hypothesis (including N=1, C=1, S=1, groups=1 and groups=C, odd sizes) plus fixed larger cases
that take the kernels' parallel paths; numerics cases (large offsets, constants, huge values, NaN/inf); no input
mutation; thread-count independence and run-to-run determinism.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from support import BACKENDS, OPS, SPECS, assert_close, copy_args, op_args

import normkit

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def run(op, x, kw, backend, dy=None):
    """Forward and backward of ``op`` on ``backend``; returns every output as a dict."""
    nk = normkit.get(op)
    kw = copy_args(kw)
    y, saved = nk.forward(x, **kw, backend=backend)
    out = {"y": y, "mean": saved.mean, "rstd": saved.rstd}
    for name in ("running_mean", "running_var"):
        if name in kw and saved.training:
            out[name] = kw[name]
    if dy is not None:
        dx, dw, db = nk.backward(dy, x, saved, **kw, backend=backend)
        out.update(dx=dx, dweight=dw, dbias=db)
    return out


def compare(op, x, kw, backend, dy=None, what=""):
    got = run(op, x, kw, backend, dy)
    want = run(op, x, kw, "reference", dy)
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, f"{what} {name}: expected None"
            continue
        direction = "backward" if name in ("dx", "dweight", "dbias") else "forward"
        scale = dx_scale(want, kw, dy) if name == "dx" else None
        assert_close(got[name], expected, x.dtype, direction, what=f"{op} {what} {name}", scale=scale)
    return got


def dx_scale(want, kw, dy):
    """The size against which dx's error is judged. dx is a difference of terms as large as rstd * |weight * dy|;
    float32 arithmetic (PyTorch's as well as ours) rounds those terms, so in a set of equal values, where rstd is
    1/sqrt(eps) ~ 316 and the exact dx is 0, the error is a few ulps of the terms (measured up to 4.9e-4 for
    PyTorch's group_norm on (3, 6) with 6 groups and weights ~3), not of dx. The scale keeps the tolerance at a
    few ulps of the largest term, and is 1 (as for the other outputs) for ordinary data."""
    def finite_max(a):
        a = np.abs(np.asarray(a, np.float64))
        return float(a[np.isfinite(a)].max(initial=0.0))

    weight = kw.get("weight")
    term = finite_max(want["rstd"]) * (1.0 if weight is None else finite_max(weight)) * finite_max(dy)
    return max(1.0, finite_max(want["dx"]), 5e-3 * term)


@st.composite
def cases(draw, op):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    shape = (n, c, *spatial)
    s = int(np.prod(spatial)) if spatial else 1
    training = draw(st.booleans()) if op in ("batchnorm", "instancenorm") else True
    if op == "batchnorm" and training:
        assume(n * s > 1)
    if op == "instancenorm" and training:
        assume(s > 1)
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    if op == "groupnorm":
        assume(n * (c // groups) * s > 1)  # (one value per group in the whole batch: refused, as by torch)
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        affine=draw(st.sampled_from(["none", "weight", "bias", "both"])),
        groups=groups,
        training=training,
        running=draw(st.booleans()),
        ln_dims=draw(st.integers(1, len(shape) - 1)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_matches_reference(backend, op, data):
    case = data.draw(cases(op))
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    dy = rng.standard_normal(case["shape"]).astype(case["dtype"])
    kw = op_args(op, x, rng, groups=case["groups"], affine=case["affine"], ln_dims=case["ln_dims"],
                 training=case["training"], running=case["running"])
    compare(op, x, kw, backend, dy, what=str(case))


# Larger shapes that take the parallel paths: BatchNorm with few channels split over (N, S) chunks, many sets,
# sets whose length is not a multiple of the vector width.
LARGE = [
    ("batchnorm", (256, 16), {}),  # numba: every task sums the whole (small) input
    ("batchnorm", (4096, 16), {}),  # numba: tiles of whole rows, merged per channel
    ("batchnorm", (64, 3, 32, 32), {}),
    ("batchnorm", (2, 3, 101, 97), {}),
    ("batchnorm", (5, 37, 13, 11), {}),  # numba: one channel per task, rows short enough to prefetch
    ("batchnorm", (1, 9, 40, 50), {}),  # numba: one channel per task, a single row longer than PREFETCH_BYTES
    ("batchnorm", (4, 70000), {}),
    ("batchnorm", (70, 100, 3, 3), {}),  # the Cython columns schedule, tasks of whole channels; a short last task
    ("batchnorm", (301, 5, 2, 3), {}),  # the Cython columns schedule with row blocks; a short last block
    ("batchnorm", (25, 40, 7, 7), {}),  # Cython: forward on the columns (a batch of S/2), backward by channel
    ("groupnorm", (2, 64, 33, 33), {"groups": 8}),
    ("groupnorm", (3, 12, 17, 19), {"groups": 12}),
    ("groupnorm", (4, 64, 7, 7), {"groups": 8}),  # sets of 8 short channel runs
    ("groupnorm", (1, 6, 1000), {"groups": 1}),
    ("layernorm", (300, 1000), {}),
    ("layernorm", (2051, 300), {}),  # blocks of 65 rows, flushes inside a block
    ("layernorm", (523, 2050), {}),  # blocks of 66 rows (the last 61): row pairs, a leftover row
    ("layernorm", (3, 5, 4097), {"ln_dims": 1}),
    ("layernorm", (31, 70000), {}),  # long rows: the backward's column-block path; an odd row count
    ("instancenorm", (2, 4, 129, 65), {}),
    ("instancenorm", (8, 96, 7, 7), {}),  # many sets of runs shorter than numba's vector loop
    ("instancenorm", (1, 1, 100000), {}),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op,shape,extra", LARGE, ids=lambda v: str(v))
def test_large_shapes(backend, op, shape, extra, dtype, rng):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    kw = op_args(op, x, rng, running=True, **extra)
    compare(op, x, kw, backend, dy)
    if op in ("batchnorm", "instancenorm"):
        compare(op, x, op_args(op, x, rng, training=False, **extra), backend, dy, what="inference")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", [op for op in OPS if SPECS[op].centered])  # rmsnorm: tests/test_rmsnorm.py
def test_constant_input_gives_bias_exactly(backend, op, dtype, rng):
    x = np.full((3, 8, 7, 5), 3.7, dtype=dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    kw = op_args(op, x, rng, groups=4, affine="both")
    nk = normkit.get(op)
    y, saved = nk.forward(x, **copy_args(kw), backend=backend)
    bias = kw["bias"].reshape((1, -1) + (1,) * (x.ndim - 2)) if op != "layernorm" else kw["bias"]
    np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))
    grads = nk.backward(dy, x, saved, **copy_args(kw), backend=backend)
    for g in grads:
        assert np.isfinite(g).all()


# (2, 4, 5): the one-thread schedules; (16, 64, 300): the parallel ones
@pytest.mark.parametrize("shape", [(2, 4, 5), (16, 64, 300)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_zero_eps_constant_input(backend, op, shape, rng):
    """eps = 0 on constant sets (zeros for RMSNorm): 1 / sqrt(0) is inf and y NaN, as in the reference, not an
    exception raised inside a compiled loop."""
    x = np.full(shape, 2.5 if SPECS[op].centered else 0.0, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    kw = {**op_args(op, x, rng, groups=2, affine="both"), "eps": 0.0}
    got = compare(op, x, kw, backend, dy)
    assert np.isposinf(got["rstd"]).all() and np.isnan(got["y"]).all()


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
@pytest.mark.parametrize("op", OPS)
def test_large_offset_float32(backend, op, offset, rng):
    """mean 1e4..1e8, std 1, in float32: within 2e-3 of the float64 reference on the same input."""
    x = (offset + rng.standard_normal((4, 8, 16, 16))).astype(np.float32)
    kw = op_args(op, x, rng, groups=4, affine="both")
    y, _ = normkit.get(op).forward(x, **copy_args(kw), backend=backend)
    want, _ = normkit.get(op).forward(x, **copy_args(kw), backend="reference")
    assert np.abs(y.astype(np.float64) - want).max() <= 2e-3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_huge_values(backend, op, dtype, rng):
    """Values near 1e30 (squares overflow float32): finite and correct."""
    x = (rng.standard_normal((2, 4, 9, 7)) * 1e30).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    kw = op_args(op, x, rng, groups=2, affine="both")
    got = compare(op, x, kw, backend, dy)
    assert all(np.isfinite(v).all() for k, v in got.items() if k not in ("mean", "rstd") and v is not None)


@pytest.mark.parametrize("op", OPS)
def test_float64_variance_beyond_float64(backend, op):
    """Finite float64 values whose squares overflow (1e160): the variance is inf, not inf - inf, so rstd is 0 and y
    the bias, as in the reference (Numba's statistics gave NaN)."""
    x = np.tile(np.array([1e160, -1e160, 3e159, 0.0]), (2, 4, 1))
    kw = op_args(op, x, np.random.default_rng(0), groups=2, affine="both")
    y, saved = normkit.get(op).forward(x, **copy_args(kw), backend=backend)
    want_y, want = normkit.get(op).forward(x, **copy_args(kw), backend="reference")
    np.testing.assert_array_equal(saved.rstd, want.rstd)
    assert (saved.rstd == 0).all()
    np.testing.assert_array_equal(y, want_y)


# (256, 4, 3, 3): layernorm's row quads, batchnorm's columns with row blocks; (32, 100, 3, 3): batchnorm's columns
# in tasks of whole channels
@pytest.mark.parametrize("shape", [(256, 4, 3, 3), (32, 100, 3, 3)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_huge_gradients_float32(backend, op, shape, rng):
    """dy and x near 1e20: the products dy * (x - mean) overflow float32, so any sum of them kept in float32
    must be redone in double (the backward results themselves are of moderate size)."""
    x = (rng.standard_normal(shape) * 1e20).astype(np.float32)
    dy = (rng.standard_normal(x.shape) * 1e20).astype(np.float32)
    kw = op_args(op, x, rng, groups=2, affine="both")
    got = compare(op, x, kw, backend, dy)
    assert all(np.isfinite(got[k]).all() for k in ("dx", "dweight", "dbias") if got[k] is not None)


@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (3, 200, 2, 3)], ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op", OPS)
def test_nan_inf_propagate(backend, op, bad, shape, rng):
    """A non-finite input poisons its own normalized set, exactly as in the reference, and nothing else."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[1, 2, 1, 2] = bad
    dy = rng.standard_normal(x.shape).astype(np.float32)
    kw = op_args(op, x, rng, groups=2, affine="both")
    got = compare(op, x, kw, backend, dy)
    assert np.isnan(got["y"]).any() and np.isfinite(got["y"]).any()


def test_inputs_not_mutated(backend, rng):
    for op in OPS:
        x = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        kw = op_args(op, x, rng, groups=2, affine="both")
        before = {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)}
        x0, dy0 = x.copy(), dy.copy()
        nk = normkit.get(op)
        y, saved = nk.forward(x, **kw, backend=backend)
        nk.backward(dy, x, saved, **kw, backend=backend)
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(dy, dy0)
        for k, v in before.items():
            np.testing.assert_array_equal(kw[k], v, err_msg=f"{op}: {k} was modified")


def test_non_contiguous_input(backend, rng):
    base = rng.standard_normal((6, 5, 8, 4)).astype(np.float32)
    for x in (base.transpose(3, 1, 2, 0), base[::2, :, ::3], np.asfortranarray(base)):
        for op in OPS:
            kw = op_args(op, x, rng, groups=5 if op == "groupnorm" else 1, affine="both")
            compare(op, x, kw, backend, rng.standard_normal(x.shape).astype(np.float32))


# batchnorm: the rows schedule, then the columns schedule with row blocks (numba: whole-input sums per task, and
# tiles of rows) and in tasks of whole channels
THREAD_CASES = [("batchnorm", (64, 3, 40, 40)), ("batchnorm", (301, 5, 2, 3)), ("batchnorm", (4096, 16)),
                ("batchnorm", (32, 100, 3, 3)),
                ("layernorm", (64, 3, 40, 40)), ("layernorm", (7, 70000)),  # long rows: groups of rows, a row pair
                ("layernorm", (6, 20000)),  # Cython: groups of rows from 4097 values
                ("instancenorm", (8, 16, 33, 31)), ("groupnorm", (8, 16, 33, 31)),
                ("instancenorm", (1, 1, 300, 301)), ("layernorm", (1, 70001))]  # one set / row: cut into pieces


@pytest.mark.parametrize("op,shape", THREAD_CASES, ids=str)
def test_thread_count_independent_and_deterministic(backend, op, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    kw = op_args(op, x, rng, groups=4, affine="both")
    threads = normkit.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2, 1):
            normkit.set_num_threads(min(n, threads))
            runs.append(run(op, x, kw, backend, dy))
    finally:
        normkit.set_num_threads(threads)
    for other in runs[1:]:
        for name, value in runs[0].items():
            if value is not None:
                np.testing.assert_array_equal(other[name], value, err_msg=f"{op} {name} differs between runs")
