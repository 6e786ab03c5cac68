"""BatchNorm's split directions composed into a training step (normkit.split): equal to the fused kernels and the
reference within the conformance kit's tolerances, on every backend; statistics that merge across slices.

The tolerances are the kit's (normkit.testing): derived from the rounding of the inputs to the dtype, so that at
mean 1e8 and std 1 in float32 (where the data's spacing is 8) they ask for little more than finite numbers, as for
the fused kernels, while a float64 composition is held to float64 accuracy.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import BACKENDS, assert_close

import normkit
from normkit import half, reference, split, testing

ALL = (*BACKENDS, "reference")
DATA = ("normal", "offset1e4", "offset1e8", "constant", "nan")
EPS = 1e-5


def make(shape, dtype, data, seed):
    rng = np.random.default_rng(seed)
    if data == "constant":
        x = np.full(shape, 1.1)
    elif data.startswith("offset"):
        x = float(data[len("offset"):]) + rng.standard_normal(shape)
    else:
        x = rng.standard_normal(shape)
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if data == "nan":
        at = tuple(s // 2 for s in shape)
        x[at] = np.nan
    c = shape[1]
    weight = (1.0 + 0.5 * rng.standard_normal(c)).astype(dtype)
    bias = (0.5 * rng.standard_normal(c)).astype(dtype)
    return x, dy, weight, bias


def kshape(shape):
    return (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)))


def check(name, got, want, tol, what):
    """The kit's rule: NaN exactly where the reference has NaN; elsewhere finite and within tol."""
    got = np.asarray(got, np.float64)
    want_nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), want_nan, err_msg=f"{what} {name}: NaN pattern")
    ok = ~want_nan
    assert np.isfinite(got[ok]).all(), f"{what} {name}: non-finite values"
    err = np.abs(got - want)[ok]
    limit = np.broadcast_to(tol, want.shape)[ok]
    assert (err <= limit).all(), (f"{what} {name}: error {err.max():.3g}, worst ratio "
                                  f"{(err / np.maximum(limit, 1e-300)).max():.3g} of the tolerance")


def compare_training_step(backend, shape, dtype, data, seed=0):
    x, dy, weight, bias = make(shape, dtype, data, seed)
    ks = kshape(shape)
    case = testing.Case("batchnorm", "forward", dtype, ks, None, "weight+bias", data, EPS)
    what = f"{backend} {shape} {dtype} {data}"
    # forward: stats + apply against the reference's fused forward on the same (rounded) input, in float64
    y, mean, rstd = split.batchnorm_forward(x, weight, bias, EPS, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape and mean.dtype == rstd.dtype == np.float64
    inputs = {"x": x.reshape(ks), "weight": weight, "bias": bias}
    want = {"y": np.empty(ks), "mean": np.empty(ks[1]), "rstd": np.empty(ks[1])}
    with np.errstate(all="ignore"):
        reference.KERNELS[("batchnorm", "forward", "float64")](x.reshape(ks).astype(np.float64), weight.astype(
            np.float64), bias.astype(np.float64), EPS, want["y"], want["mean"], want["rstd"])
        tol = testing._tolerances(case, inputs, want)
    check("y", y.reshape(ks), want["y"], tol["y"], what)
    check("mean", mean, want["mean"], tol["mean"], what)
    check("rstd", rstd, want["rstd"], tol["rstd"], what)
    # backward: backward_reduce + backward_apply, from the float64 statistics the split forward gives
    dx, dweight, dbias = split.batchnorm_backward(dy, x, mean, rstd, weight, backend=backend)
    bcase = testing.Case("batchnorm", "backward", dtype, ks, None, "weight+bias", data, EPS)
    binputs = {"x": x.reshape(ks), "dy": dy.reshape(ks), "weight": weight, "bias": bias, "mean": mean, "rstd": rstd}
    bwant = {"dx": np.empty(ks), "dweight": np.empty(ks[1]), "dbias": np.empty(ks[1])}
    with np.errstate(all="ignore"):
        reference.KERNELS[("batchnorm", "backward", "float64")](
            dy.reshape(ks).astype(np.float64), x.reshape(ks).astype(np.float64), mean, rstd,
            weight.astype(np.float64), bwant["dx"], bwant["dweight"], bwant["dbias"])
        btol = testing._tolerances(bcase, binputs, bwant)
    check("dx", dx.reshape(ks), bwant["dx"], btol["dx"], what)
    check("dweight", dweight, bwant["dweight"], btol["dweight"], what)
    check("dbias", dbias, bwant["dbias"], btol["dbias"], what)
    return x, dy, weight, bias, (y, mean, rstd, dx, dweight, dbias)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float32_far_from_zero_is_accurate(backend, offset):
    """y and dx of float32 data of std 1 far from zero, against float64 on the same values: the elementwise passes
    run on the data shifted by its mean (split.centered), where x * scale + shift with float32 coefficients lost
    9e-5 of y's scale at mean 1e4 and 6e-3 at 1e6 (the kit's tolerances, scaled by the offset, let that pass)."""
    x, dy, weight, bias = make((8, 16, 10), "float32", "normal", 1)
    x = (x.astype(np.float64) + offset).astype(np.float32)
    y, mean, rstd = split.batchnorm_forward(x, weight, bias, EPS, backend=backend)
    dx, _, _ = split.batchnorm_backward(dy, x, mean, rstd, weight, backend=backend)
    x64, w, b = x.astype(np.float64), weight[:, None].astype(np.float64), bias[:, None].astype(np.float64)
    m, v = x64.mean((0, 2), keepdims=True), x64.var((0, 2), keepdims=True)
    xhat = (x64 - m) / np.sqrt(v + EPS)
    g = dy * w
    want_dx = (g - g.mean((0, 2), keepdims=True) - xhat * (g * xhat).mean((0, 2), keepdims=True)) / np.sqrt(v + EPS)
    for got, want in ((y, xhat * w + b), (dx, want_dx)):
        assert np.abs(got - want).max() < 1e-6 * np.abs(want).max()


@st.composite
def shapes(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    return (n, c, *spatial)


@pytest.mark.parametrize("backend", ALL)
@given(shape=shapes(), dtype=st.sampled_from(["float32", "float64"]), data=st.sampled_from(DATA),
       seed=st.integers(0, 2**32 - 1))
def test_composition_matches_reference(backend, shape, dtype, data, seed):
    compare_training_step(backend, shape, dtype, data, seed)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 1), (5, 1, 1), (1, 1, 9), (2, 3)], ids=str)
def test_degenerate_shapes(backend, shape, dtype, data):
    """N=1, C=1, S=1 and (N, C) inputs, including sets of one value (m2 = 0, rstd = 1/sqrt(eps))."""
    compare_training_step(backend, shape, dtype, data)


# shapes that take each backend's parallel paths (see tests/test_backends.py: LARGE, THREAD_CASES); (8199, 1) and
# (3077, 1, 3): the Cython columns schedule's rows of few values summed k at a time, with rows left over
LARGE = [(64, 3, 40, 40), (5, 37, 13, 11), (2, 3, 101, 97), (301, 5, 2, 3), (70, 100, 3, 3), (4096, 16), (256, 16),
         (4, 70000), (8199, 1), (3077, 1, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_large_shapes(backend, shape, dtype):
    compare_training_step(backend, shape, dtype, "offset1e4", seed=7)
    # and against the backend's own fused kernels (the frontend's training step), with test_backends.py's
    # tolerances; on standard normal data, where the fused backward's statistics rounded to the dtype (the split
    # one's are float64) make no difference at that level
    x, dy, weight, bias, got = compare_training_step(backend, shape, dtype, "normal", seed=8)
    nk = normkit.get("batchnorm")
    y, saved = nk.forward(x, weight=weight, bias=bias, training=True, eps=EPS, backend=backend)
    dx, dw, db = nk.backward(dy, x, saved, weight=weight, bias=bias, training=True, eps=EPS, backend=backend)
    for name, a, b, direction in (("y", got[0], y, "forward"), ("mean", got[1], saved.mean, "forward"),
                                  ("rstd", got[2], saved.rstd, "forward"), ("dx", got[3], dx, "backward"),
                                  ("dweight", got[4], dw, "backward"), ("dbias", got[5], db, "backward")):
        assert_close(a, b, dtype, direction, what=f"{backend} {shape} split vs fused {name}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(8, 5, 7, 3), (64, 3, 40, 40), (301, 5, 2, 3), (40, 100, 3, 3), (4096, 16)],
                         ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merged_statistics_equal_the_whole_batch(backend, shape, offset):
    """float64: the statistics of two slices of the batch, merged with Chan's formula, equal the whole batch's to
    1e-12 relative (mean relative to its size plus the standard deviation)."""
    rng = np.random.default_rng(3)
    x = offset + rng.standard_normal(shape)
    whole = split.batchnorm_stats(x, backend=backend)
    for cut in (1, shape[0] // 3, shape[0] - 1):
        merged = split.merge_stats(split.batchnorm_stats(x[:cut], backend=backend),
                                   split.batchnorm_stats(x[cut:], backend=backend))
        assert merged.count == whole.count
        np.testing.assert_array_less(np.abs(merged.mean - whole.mean),
                                     1e-12 * (np.abs(whole.mean) + np.sqrt(whole.var)))
        np.testing.assert_array_less(np.abs(merged.m2 - whole.m2), 1e-12 * whole.m2)


@pytest.mark.parametrize("backend", ALL)
def test_merge_at_offset_1e8_is_limited_by_the_mean_s_rounding(backend):
    """At mean 1e8 a float64 mean is rounded to 1.5e-8: the merged m2 moves by about 2 * |delta| * 1.5e-8 * n / 4,
    some 1e-9 relative; the merge adds nothing beyond it."""
    rng = np.random.default_rng(4)
    x = 1e8 + rng.standard_normal((16, 4, 50))
    whole = split.batchnorm_stats(x, backend=backend)
    merged = split.merge_stats(split.batchnorm_stats(x[:5], backend=backend),
                               split.batchnorm_stats(x[5:], backend=backend))
    np.testing.assert_array_less(np.abs(merged.mean - whole.mean), 4 * np.spacing(whole.mean))
    np.testing.assert_array_less(np.abs(merged.m2 - whole.m2), 1e-8 * whole.m2)


def test_merge_stats_identities():
    a = split.Stats(3, np.array([1.0, 2.0]), np.array([0.5, 0.0]))
    empty = split.Stats(0, np.zeros(2), np.zeros(2))
    assert split.merge_stats(a, empty) is a and split.merge_stats(empty, a) is a
    m = split.merge_stats(a, split.Stats(1, np.array([3.0, 2.0]), np.zeros(2)))
    assert m.count == 4
    np.testing.assert_allclose(m.mean, [1.5, 2.0])
    np.testing.assert_allclose(m.m2, [0.5 + 4 * 3 / 4, 0.0])
    with pytest.raises(ValueError, match="statistics of 2 and 3 channels"):
        split.merge_stats(a, split.Stats(1, np.zeros(3), np.zeros(3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 3, 40, 40), (301, 5, 2, 3), (4096, 16), (32, 100, 3, 3), (8, 64, 9, 9),
                                   (9001, 2)], ids=str)
def test_split_kernels_thread_count_independent(backend, shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(shape[1])).astype(np.float32)
    threads = normkit.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2, 1):
            normkit.set_num_threads(min(n, threads))
            y, mean, rstd = split.batchnorm_forward(x, w, None, backend=backend)
            s = split.batchnorm_stats(x, backend=backend)
            runs.append((y, mean, rstd, s.m2, *split.batchnorm_backward(dy, x, mean, rstd, w, backend=backend)))
    finally:
        normkit.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_stats_are_float64_for_float32_data(backend):
    """stats accumulates in float64: float32 data at mean 1e4 gets the float64 statistics of its own values."""
    rng = np.random.default_rng(6)
    for shape in ((16, 4, 50), (200, 6, 3)):
        x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
        s = split.batchnorm_stats(x, backend=backend)
        x64 = np.moveaxis(x.astype(np.float64), 1, 0).reshape(shape[1], -1)
        np.testing.assert_allclose(s.mean, x64.mean(axis=1), rtol=1e-14)
        np.testing.assert_allclose(s.m2, np.square(x64 - x64.mean(axis=1, keepdims=True)).sum(axis=1), rtol=1e-10)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_apply_coefficients_make_a_constant_input_exact(backend):
    """Given the variances, a set whose values all equal its mean gets the bias exactly (without them, the shift's
    float32 rounding, half a unit of |mean| * scale, stays in y); so does split.batchnorm_forward."""
    bias = np.arange(4, dtype=np.float32) - 1.5
    want = np.broadcast_to(bias[None, :, None], (3, 4, 5))
    for value in (3.7, 12345.678):
        x = np.full((3, 4, 5), value, np.float32)
        stats = split.batchnorm_stats(x, backend=backend)
        scale, shift = split.apply_coefficients(stats.mean, stats.rstd(EPS), np.ones(4, np.float32), bias,
                                                np.float32, stats.var)
        assert scale.dtype == shift.dtype == np.float32
        np.testing.assert_array_equal(split.batchnorm_apply(x, scale, shift, backend=backend), want)
        np.testing.assert_array_equal(split.batchnorm_forward(x, None, bias, EPS, backend)[0], want)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("s", [5, 37, 300])
def test_backward_reduce_at_large_offsets(backend, s):
    """sum_dy_xhat about the float64 mean, also where that mean is not a float32 (offsets 1e4, 1e6): Cython's sums,
    about the mean rounded to float32, were 0.2% and 18% off (the Keras-style layer's gamma gradient, SyncBatchNorm's
    backward); both schedules (short and long runs)."""
    rng = np.random.default_rng(s)
    for offset in (1e4, 1e6):
        x = (rng.standard_normal((8, 4, s)) + offset + 0.1234).astype(np.float32)
        dy = rng.standard_normal((8, 4, s)).astype(np.float32)
        stats = split.batchnorm_stats(x, backend="reference")
        rstd = stats.rstd(EPS)
        x64 = x.astype(np.float64)
        want = (dy * (x64 - x64.mean(axis=(0, 2))[None, :, None])).sum(axis=(0, 2)) * rstd
        got = split.batchnorm_backward_reduce(dy, x, stats.mean, rstd, backend)[1]
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"offset {offset}")


def _kernel_data(a: np.ndarray) -> np.ndarray:
    """A data array as a kernel takes it (16-bit: its bit patterns)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
@pytest.mark.parametrize("s", [5, 37, 300])
def test_backward_reduce16_at_large_offsets(backend, fmt, s):
    """The 16-bit kernels (the split API takes float32 / float64; a kernel's user calls them through the registry,
    uint16 bit patterns): Cython's sums were about the float32 rounding of the float64 mean, as in the test above,
    6e-4 off for float16 data at an offset of 1e3."""
    pytest.importorskip("ml_dtypes")
    dtype = half.numpy_dtype(fmt)
    rng = np.random.default_rng(s)
    kernel = normkit.registry.lookup("batchnorm", "backward_reduce", fmt, backend)[1]
    for offset, std in ((1e3, 1.0), (1e2, 1.0), (1e4, 64.0)):
        x = (rng.standard_normal((8, 4, s)) * std + offset + 0.1234).astype(dtype)
        dy = rng.standard_normal((8, 4, s)).astype(dtype)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        mean = x64.mean(axis=(0, 2))
        rstd = 1 / x64.std(axis=(0, 2))
        want = (dy64 * (x64 - mean[None, :, None])).sum(axis=(0, 2)) * rstd
        sum_dy, got = np.empty(4), np.empty(4)
        kernel(_kernel_data(dy), _kernel_data(x), mean, rstd, sum_dy, got)
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"offset {offset}")


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("fmt", ["float32", "float64", "bfloat16", "float16"])
def test_backward_reduce_infinite_dy(backend, fmt):
    """An infinite dy makes sum_dy_xhat the infinity of dy * (x - mean)'s sign, at a mean that is not a value of
    the data's type: the rounding correction above, (m - mean) * sum(dy), gave NaN where its sign differed."""
    if fmt == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dtype = half.numpy_dtype(fmt)
    x = (np.random.default_rng(1).standard_normal((4, 3, 37)) + 0.1234).astype(dtype)
    dy = np.ones(x.shape, dtype)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    for sign in (1, -1):
        at = np.unravel_index(np.argmax(sign * x64[:, 1]), x64[:, 1].shape)  # dy * (x - mean) > 0 there
        d = dy.copy()
        d[at[0], 1, at[1]] = sign * np.inf
        kernel = normkit.registry.lookup("batchnorm", "backward_reduce", fmt, backend)[1]
        sum_dy, got = np.empty(3), np.empty(3)
        kernel(_kernel_data(d), _kernel_data(x), mean, np.ones(3), sum_dy, got)
        assert sum_dy[1] == sign * np.inf and got[1] == np.inf, (sum_dy, got)
        assert np.isfinite(got[[0, 2]]).all()


def test_argument_errors():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="x must be float32 or float64, got dtype int64"):
        split.batchnorm_stats(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        split.batchnorm_stats(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="dy must have x's shape"):
        split.batchnorm_backward_reduce(np.zeros((2, 3, 5), np.float32), x, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        split.batchnorm_apply(x, np.ones(2), np.zeros(3))
    with pytest.raises(ValueError, match="eps must be"):
        split.batchnorm_forward(x, eps=-1.0)
    with pytest.raises(TypeError, match="batchnorm: eps must be a number, got True"):
        split.batchnorm_forward(x, eps=True)
    for eps in (np.float32(1e-5), np.int64(1)):  # NumPy scalars, as the functional ops take them
        split.batchnorm_forward(x, eps=eps)
    for name, shape in (("weight", (2,)), ("weight", (3, 1)), ("bias", (4,))):
        with pytest.raises(ValueError, match=re.escape(f"batchnorm: {name} must have shape (3,) to match the "
                                                       f"input's 3 channels, got {shape}")):
            split.batchnorm_forward(x, **{name: np.ones(shape, np.float32)})
    with pytest.raises(ValueError, match=re.escape("weight must have shape (3,) to match the input's 3 channels")):
        split.batchnorm_backward(x, x, np.zeros(3), np.ones(3), np.ones(2, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (3, 200, 2, 3), (40, 3, 40)], ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_statistics_as_the_reference(backend, shape, bad):
    """A NaN or inf poisons its own channel's statistics exactly as in the reference (mean +-inf and m2 NaN for
    an inf), and nothing else."""
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    x[1, 2, 1] = bad
    got, want = split.batchnorm_stats(x, backend=backend), split.batchnorm_stats(x, backend="reference")
    for name in ("mean", "m2"):
        g, w = getattr(got, name), getattr(want, name)
        np.testing.assert_array_equal(g[2], w[2])
        assert np.isfinite(np.delete(g, 2)).all()
        np.testing.assert_allclose(np.delete(g, 2), np.delete(w, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (256, 4, 3, 3), (32, 100, 3, 3)], ids=str)
def test_huge_values_float32(backend, shape):
    """x and dy near 1e20: squares and products overflow float32; the float64 statistics and the sums' double
    fallback keep the composition correct."""
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 1e20).astype(np.float32)
    dy = (rng.standard_normal(shape) * 1e20).astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(shape[1])).astype(np.float32)
    y, mean, rstd = split.batchnorm_forward(x, w, None, backend=backend)
    want_y, want_mean, want_rstd = split.batchnorm_forward(x, w, None, backend="reference")
    assert_close(y, want_y, "float32", "forward", what="y")
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(rstd, want_rstd, rtol=1e-12)
    got = split.batchnorm_backward(dy, x, mean, rstd, w, backend=backend)
    want = split.batchnorm_backward(dy, x, mean, rstd, w, backend="reference")
    for name, g, r in zip(("dx", "dweight", "dbias"), got, want):
        assert np.isfinite(g).all(), name
        assert_close(g, r, "float32", "backward", what=name)


def test_byte_swapped_input_is_copied():
    """As normkit.get("bn") and the Keras-style layer take them: copied to native order (the dtype test had refused
    '>f8' as not float64)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5))
    dy = rng.standard_normal(x.shape)
    swapped = np.dtype(np.float64).newbyteorder("S")
    got, want = split.batchnorm_forward(x.astype(swapped)), split.batchnorm_forward(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    mean, rstd = want[1:]
    got = split.batchnorm_backward(dy.astype(swapped), x.astype(swapped), mean, rstd)
    for g, w in zip(got, split.batchnorm_backward(dy, x, mean, rstd)):
        assert g.dtype.isnative
        np.testing.assert_array_equal(g, w)
    layer, native = normkit.BatchNormalization(axis=1, dtype="float64"), normkit.BatchNormalization(axis=1,
                                                                                                   dtype="float64")
    np.testing.assert_array_equal(layer(x.astype(swapped), training=True), native(x, training=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_keep_a_native_arrays_dtype_object(dtype):
    """No new dtype object per call where the array's is native: torch.compile guards code it traced through
    these functions on the object's identity, and a later call's float32 dtype at a freed float64 one's address
    passed that guard (a float64 kernel then ran on float32 data). Byte-swapped data is still copied to native."""
    a = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    assert split._view("x", a).dtype is a.dtype
    swapped = a.astype(a.dtype.newbyteorder("S"))
    view = split._view("x", swapped)
    assert view.dtype == dtype and view.dtype.isnative and np.array_equal(view, a.reshape(2, 3, 4))
