"""The NumPy frontend: names, argument checks and their messages, layouts, mutation, running statistics, and the
tf.nn-style primitives."""

from __future__ import annotations

import re

import numpy as np
import pytest
from support import BACKENDS, OPS, copy_args, op_args

import normkit
from normkit.contract import SPECS

REF = {"backend": "reference"}


def test_names_and_aliases():
    for name, aliases in {"batchnorm": ("bn", "batch_norm", "BN"), "layernorm": ("ln", "layer_norm"),
                          "instancenorm": ("in", "instance_norm"), "groupnorm": ("gn", "group_norm"),
                          "rmsnorm": ("rms", "rms_norm", "RMSNorm")}.items():
        assert normkit.get(name).name == name
        for alias in aliases:
            assert normkit.get(alias) is normkit.get(name)
    assert normkit.list_ops() == ("batchnorm", "layernorm", "instancenorm", "groupnorm", "rmsnorm")


def test_unknown_op_lists_known_names():
    with pytest.raises(normkit.UnknownOpError, match=r"unknown op 'pixelnorm'.*batchnorm \(bn.*groupnorm") as err:
        normkit.get("pixelnorm")
    assert isinstance(err.value, ValueError)


def test_unknown_backend_lists_installed(rng):
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    with pytest.raises(normkit.UnknownBackendError, match=r"unknown backend 'cuda'; installed backends: .*reference"):
        normkit.get("gn")(x, 2, backend="cuda")


def test_call_equals_forward_output(rng):
    x = rng.standard_normal((2, 4, 3))
    y1 = normkit.get("gn")(x, 2, **REF)
    y2, saved = normkit.get("gn").forward(x, 2, **REF)
    np.testing.assert_array_equal(y1, y2)
    assert saved.mean.shape == saved.rstd.shape == (2, 2) and saved.training and saved.backend == "reference"


@pytest.mark.parametrize("op", OPS)
def test_call_takes_forwards_arguments(op, rng):
    """Each op's __call__ spells out forward's signature (for speed) and hands every argument on."""
    import inspect

    front = normkit.get(op)
    assert inspect.signature(type(front).__call__) == inspect.signature(type(front).forward)
    x = rng.standard_normal((3, 4, 5))
    kw = op_args(op, x, rng, groups=2, running=SPECS[op].running)
    kw.update(eps=0.25, backend="reference")  # eps not the default, so an argument dropped on the way shows
    if SPECS[op].running:
        kw["momentum"] = 0.5
    if SPECS[op].activation:
        kw.update(activation="leaky_relu", negative_slope=0.5)
    by_call, by_forward = copy_args(kw), copy_args(kw)
    y = front(x, **by_call)
    np.testing.assert_array_equal(y, front.forward(x, **by_forward)[0])
    for name in ("running_mean", "running_var"):
        if name in kw:
            np.testing.assert_array_equal(by_call[name], by_forward[name])
            assert not np.array_equal(by_call[name], kw[name])
    assert not np.array_equal(y, front(x, **{**kw, "eps": 1e-5}))
    if SPECS[op].activation:
        assert (y < 0).any() and not np.array_equal(y, front(x, **{**kw, "negative_slope": 0.01}))


def x4(dtype=np.float32, shape=(2, 4, 3, 3)):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


BAD_CALLS = [
    # (op, args, kwargs, exception, message pattern)
    ("bn", (x4()[0, 0, 0],), dict(training=True), ValueError, r"batchnorm: input must have shape \(N, C\).*got shape \(3,\)"),
    ("bn", (x4(),), dict(weight=np.ones(3, np.float32), training=True), ValueError,
     r"batchnorm: weight must have shape \(4,\), got \(3,\)"),
    ("bn", (x4(),), dict(bias=np.ones(5, np.float32), training=True), ValueError, r"batchnorm: bias must have shape \(4,\)"),
    ("bn", (x4(), np.zeros(3), np.ones(3)), dict(training=True), ValueError,
     r"batchnorm: running_mean must have shape \(4,\) to match the input's 4 channels, got \(3,\)"),
    ("bn", (x4(), np.zeros(4)), dict(training=True), ValueError, r"both running_mean and running_var, or neither"),
    ("bn", (x4(),), dict(training=False), ValueError, r"batchnorm: training=False normalizes with running_mean"),
    ("bn", (x4(shape=(1, 4)),), dict(training=True), ValueError,
     r"batchnorm: expected more than 1 value per channel when training, got input of shape \(1, 4\)"),
    ("bn", (x4(np.float64),), dict(weight=np.ones(4, np.float32), training=True), TypeError,
     r"batchnorm: weight must have the input's dtype float64, got float32"),
    ("bn", (x4(),), dict(training=True, eps=-1.0), ValueError, r"batchnorm: eps must be a finite number >= 0, got -1.0"),
    ("bn", (x4(), np.zeros(4), np.ones(4)), dict(training=True, momentum=1.5), ValueError,
     r"batchnorm: momentum must be a number in \[0, 1\], got 1.5"),
    ("bn", (x4(), [0.0] * 4, [1.0] * 4), dict(training=True), TypeError,
     r"batchnorm: running_mean must be a NumPy array \(it is updated in place\), got list"),
    ("in", (x4(shape=(2, 4, 1, 1)),), {}, ValueError,
     r"instancenorm: expected more than 1 spatial element when using input statistics, got input of shape \(2, 4, 1, 1\)"),
    ("in", (x4(),), dict(use_input_stats=False), ValueError, r"instancenorm: use_input_stats=False normalizes"),
    ("gn", (x4(), 3), {}, ValueError, r"groupnorm: num_groups=3 must divide the number of channels C=4"),
    ("gn", (x4(), 0), {}, ValueError, r"groupnorm: num_groups must be a positive int, got 0"),
    ("gn", (x4(), 2.0), {}, TypeError, r"groupnorm: num_groups must be a positive int, got float"),
    ("ln", (x4(), (3, 4)), {}, ValueError,
     r"layernorm: input of shape \(2, 4, 3, 3\) does not end with normalized_shape \(3, 4\)"),
    ("ln", (x4(), (3, 3)), dict(weight=np.ones(9, np.float32)), ValueError,
     r"layernorm: weight must have shape \(3, 3\), got \(9,\)"),
    ("ln", (x4(), "3"), {}, TypeError, r"layernorm: normalized_shape must be an int or a tuple of ints, got str"),
    ("ln", (x4(), None), {}, TypeError, r"layernorm: normalized_shape must be an int or a tuple of ints, got NoneType"),
    ("ln", (x4(), (3.0,)), {}, TypeError, r"layernorm: normalized_shape must be an int or a tuple of ints, got tuple"),
    ("gn", (np.ones((2, 4, 3), np.int64), 2), {}, TypeError,
     r"groupnorm: input must be float32, float64, bfloat16 or float16, got dtype int64"),
    ("gn", (np.ones((2, 4, 3), np.complex128), 2), {}, TypeError, r"got dtype complex128"),
    ("gn", (np.ones((2, 4, 3), object), 2), {}, TypeError, r"got dtype object"),
    ("gn", (np.ones((2, 4, 3), np.float16), 2, np.ones(4, np.float64)), {}, TypeError,
     r"groupnorm: weight must have the input's dtype float16 or float32, got float64"),
    ("gn", ("abc", 2), {}, TypeError, r"groupnorm: input must be a float32, float64, bfloat16 or float16 array, got str"),
    ("gn", (np.ones((0, 4, 3), np.float32), 2), {}, ValueError, r"groupnorm: input is empty \(shape \(0, 4, 3\)\)"),
]


@pytest.mark.parametrize("op,args,kwargs,exc,pattern", BAD_CALLS, ids=[p[4][:40] for p in BAD_CALLS])
def test_bad_input_gets_a_clear_error(op, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        normkit.get(op).forward(*args, **kwargs, **REF)


def test_read_only_running_stats_refused_in_training():
    rm, rv = np.zeros(4), np.ones(4)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="batchnorm: running_mean is read-only but training updates it in place"):
        normkit.get("bn")(x4(), rm, rv, training=True, **REF)
    normkit.get("bn")(x4(), rm, rv, training=False, **REF)  # inference only reads them


def test_backward_checks_its_arguments():
    x = x4()
    gn = normkit.get("gn")
    _, saved = gn.forward(x, 2, **REF)
    with pytest.raises(ValueError, match=r"groupnorm: grad_output must have the input's shape \(2, 4, 3, 3\)"):
        gn.backward(x[:1], x, saved, 2, **REF)
    with pytest.raises(TypeError, match="groupnorm: grad_output must have the input's dtype float32, got float64"):
        gn.backward(x.astype(np.float64), x, saved, 2, **REF)
    with pytest.raises(ValueError, match=r"saved statistics have shape \(2, 2\), expected \(2, 4\)"):
        gn.backward(x, x, saved, 4, **REF)
    with pytest.raises(TypeError, match="groupnorm: saved must be the Saved returned by forward, got tuple"):
        gn.backward(x, x, (saved.mean, saved.rstd), 2, **REF)


@pytest.mark.parametrize("op", OPS)
def test_layouts_give_the_same_answer(op, rng):
    """Transposed, strided, Fortran-ordered and byte-swapped inputs equal the contiguous computation."""
    base = rng.standard_normal((5, 6, 4, 8))
    views = [base.transpose(3, 1, 2, 0), base[::2, :, 1:], np.asfortranarray(base),
             base.astype(base.dtype.newbyteorder(">"))]
    for x in views:
        kw = op_args(op, np.ascontiguousarray(x), rng, groups=3, affine="both")
        dy = rng.standard_normal(x.shape)
        nk = normkit.get(op)
        y, saved = nk.forward(x, **copy_args(kw), **REF)
        y2, saved2 = nk.forward(np.ascontiguousarray(x, dtype=np.float64), **copy_args(kw), **REF)
        np.testing.assert_array_equal(y, y2)
        grads = nk.backward(dy, x, saved, **copy_args(kw), **REF)
        grads2 = nk.backward(dy, np.ascontiguousarray(x, np.float64), saved2, **copy_args(kw), **REF)
        for g, g2 in zip(grads, grads2):
            np.testing.assert_array_equal(g, g2)


@pytest.mark.parametrize("op", OPS)
def test_nothing_but_running_stats_is_mutated(op, rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    kw = op_args(op, x, rng, groups=2, affine="both", running=True)
    frozen = {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray)}
    x0 = x.copy()
    y, saved = normkit.get(op).forward(x, **kw)
    np.testing.assert_array_equal(x, x0)
    for k, v in frozen.items():
        if k in ("running_mean", "running_var"):
            assert not np.array_equal(kw[k], v), f"{k} was not updated"
        else:
            np.testing.assert_array_equal(kw[k], v)


def test_running_stats_follow_pytorch_over_several_steps(rng):
    torch = pytest.importorskip("torch")
    for op, tfn in (("bn", torch.nn.functional.batch_norm), ("in", torch.nn.functional.instance_norm)):
        rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
        trm, trv = torch.zeros(4), torch.ones(4)
        for step in range(5):
            x = (rng.standard_normal((3, 4, 6)) * (step + 1) + step).astype(np.float32)
            flag = {"training": True} if op == "bn" else {"use_input_stats": True}
            normkit.get(op)(x, rm, rv, momentum=0.3, **flag)
            tfn(torch.from_numpy(x), trm, trv, momentum=0.3, **flag)
        np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5, atol=1e-6)


def _nearly_constant_channels(rng, layout, dtype):
    """(4, 5, 6, 3) data whose channels have variances 1, 1e-10, 0, 9e-6 and 1e4 around offsets up to 1e3."""
    scale = np.array([1.0, 1e-5, 0.0, 3e-3, 1e2])
    x = rng.standard_normal((4, 6, 3, 5)) * scale + np.array([0.0, 1.0, 3.0, -2.0, 1e3])  # NHWC
    x = x.astype(dtype).transpose(0, 3, 1, 2)
    return x if layout == "nhwc" else np.ascontiguousarray(x)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_running_var_of_nearly_constant_channels(backend, dtype, layout, rng):
    """running_var is the batch's unbiased variance also where it is far below eps (var 1e-10 with eps 1e-3, a
    constant channel, eps 10), where 1/rstd^2 - eps, from the saved float32 rstd, is cancellation noise."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = _nearly_constant_channels(rng, layout, dtype)
    x0 = x.copy()
    x64 = x.astype(np.float64)
    for op, flag, axes in (("bn", "training", (0, 2, 3)), ("in", "use_input_stats", (2, 3))):
        want = x64.var(axis=axes, ddof=1)
        want = want if want.ndim == 1 else want.mean(axis=0)
        for eps in (1e-3, 10.0):
            rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
            normkit.get(op)(x, rm, rv, momentum=1.0, eps=eps, backend=backend, **{flag: True})
            np.testing.assert_allclose(rv, want, rtol=2e-5, atol=0, err_msg=f"{op} eps={eps}")
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("s", [1, 5, 300])
def test_inference_with_zero_variance_and_eps_is_the_references(backend, dtype, s, rng):
    """running_var 0 and eps 0: rstd = inf, and y = (x - mean) * inf + bias, +-inf where x is not the mean and NaN
    where it is (torch's and the reference's). Cython's correction of the shift for the mean's rounding, 0 * inf,
    made every y of such a channel NaN."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = rng.standard_normal((3, 4, s)).astype(dtype)
    x[0, :, 0] = 0.5  # the mean, exactly
    rm, rv = np.full(4, 0.5, np.float32), np.array([0.0, 0.0, 1.0, 0.0], np.float32)
    w, b = np.ones(4, np.float32), np.array([0.0, 1.0, 0.0, -2.0], np.float32)
    if np.dtype(dtype) == np.float64:
        rm, rv, w, b = (a.astype(np.float64) for a in (rm, rv, w, b))
    want = normkit.get("bn")(x, rm, rv, w, b, training=False, eps=0.0, **REF)
    assert np.isinf(want.astype(np.float64)).any() and np.isnan(want[0, :, 0].astype(np.float64))[[0, 1, 3]].all()
    for xin in (x, np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)):  # NCHW and channels-last
        got = normkit.get("bn")(xin, rm, rv, w, b, training=False, eps=0.0, backend=backend)
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


def test_saved_inference_stats_do_not_alias_running_buffers():
    x = x4(np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    _, saved = normkit.get("bn").forward(x, rm, rv, training=False, **REF)
    normkit.get("bn")(x, rm, rv, training=True, **REF)
    np.testing.assert_array_equal(saved.mean, np.zeros(4))


@pytest.mark.parametrize("op", OPS)
def test_nan_propagates_through_default_dispatch(op, rng):
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    x[0, 0, 0] = np.nan
    y = normkit.get(op).forward(x, **op_args(op, x, rng, groups=2))[0]
    assert np.isnan(y[0, 0, 0]) and np.isfinite(y).any()


def test_set_num_threads_validates():
    for bad in (0, -1, 1.5, True, 10**6):
        with pytest.raises(ValueError, match="set_num_threads"):
            normkit.set_num_threads(bad)
    n = normkit.get_num_threads()
    normkit.set_num_threads(1)
    assert normkit.get_num_threads() == 1
    normkit.set_num_threads(n)


# --- tf.nn-style primitives ------------------------------------------------------------------------------------

def test_moments_match_numpy_and_keep_dims(rng):
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    mean, var = normkit.moments(x, axes=[0, 2, 3])
    assert mean.shape == var.shape == (3,) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-6)
    mean, var = normkit.moments(x, axes=(-1,), keepdims=True)
    assert mean.shape == var.shape == (4, 3, 5, 1)
    dense = rng.standard_normal((6, 10))
    mean, var = normkit.moments(dense, axes=[0])  # the MLP case of the tutorials
    np.testing.assert_allclose(var, dense.var(axis=0))
    # no axes: nothing reduced, the shape kept as by NumPy's reductions (tf.nn.moments squeezes size-1 dims there)
    mean, var = normkit.moments(x[:1], axes=[])
    assert mean.shape == var.shape == (1, 3, 5, 6)
    np.testing.assert_array_equal(mean, x[:1])
    np.testing.assert_array_equal(var, 0)


def test_moments_large_offset_float32(rng):
    x = (1e8 + rng.standard_normal(10000)).astype(np.float32)
    _, var = normkit.moments(x, axes=0)
    np.testing.assert_allclose(var, x.astype(np.float64).var(), rtol=1e-6)


@pytest.mark.parametrize("axes,exc,pattern", [((5,), ValueError, "axis 5 is out of range"),
                                              ((0, 0), ValueError, "repeated axis"),
                                              ("a", TypeError, "axes must be an int or a sequence of ints"),
                                              ([1.7], TypeError, "axes must be an int"),  # (int() truncated it)
                                              ([True], TypeError, "axes must be an int")])
def test_moments_errors(axes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        normkit.moments(np.ones((2, 3)), axes)


def test_batch_normalization_formula_and_broadcasting(rng):
    x = rng.standard_normal((6, 10))
    mean, var = normkit.moments(x, axes=[0])
    scale, offset = rng.standard_normal(10), rng.standard_normal(10)
    y = normkit.batch_normalization(x, mean, var, offset, scale, variance_epsilon=1e-3)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3) * scale + offset, rtol=1e-12)
    y = normkit.batch_normalization(x, mean, var, None, None, 1e-3)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-12)
    with pytest.raises(ValueError, match=re.escape("offset of shape (3,) does not broadcast against x of shape (6, 10)")):
        normkit.batch_normalization(x, mean, var, np.zeros(3), None, 1e-3)
    with pytest.raises(TypeError, match="x must be a float array, got dtype int64"):
        normkit.batch_normalization(np.ones((2, 2), np.int64), 0.0, 1.0, None, None, 1e-3)
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="variance_epsilon must be a number >= 0"):
            normkit.batch_normalization(x, mean, var, None, None, bad)


def test_numpy_frontend_errors_are_the_same_classes():
    gn, ln = normkit.get("gn"), normkit.get("ln")
    with pytest.raises(normkit.ArgumentError, match=r"groupnorm: num_groups=4 must divide"):
        gn(np.ones((2, 6, 3), np.float32), num_groups=4)
    with pytest.raises(normkit.UnsupportedInputError, match=r"layernorm: input must be float32, float64, bfloat16 "
                                                          r"or float16"):
        ln(np.ones((2, 6), np.int64), 6)
    with pytest.raises(normkit.ArgumentTypeError, match=r"groupnorm: weight must have the input's dtype"):
        gn(np.ones((2, 6, 3), np.float32), num_groups=3, weight=np.ones(6))
    assert issubclass(normkit.ArgumentError, ValueError) and issubclass(normkit.ArgumentError, RuntimeError)
    assert issubclass(normkit.ArgumentTypeError, TypeError) and issubclass(normkit.ArgumentTypeError, RuntimeError)
    assert issubclass(normkit.UnsupportedInputError, TypeError)
    assert issubclass(normkit.UnsupportedInputError, NotImplementedError)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, groups", [((1, 4), 4), ((1, 1), 1), ((1, 6, 1, 1), 6)])
def test_groupnorm_refuses_one_value_per_group_in_the_batch(backend, shape, groups):
    """As torch (and normkit.torch) do; the NumPy frontend returned zeros."""
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=re.escape(f"groupnorm: expected more than 1 value per group in the batch, "
                                                   f"got input of shape {shape} with num_groups={groups}")):
        normkit.get("gn")(x, groups, backend=backend)
    normkit.get("gn")(np.ones((2, 4), np.float32), 4, backend=backend)  # two values per group: taken


def test_masked_arrays_are_refused():
    """Their mask would be dropped and the hidden values counted."""
    x = np.ma.masked_array(np.ones((4, 8), np.float32), mask=np.zeros((4, 8), bool))
    with pytest.raises(TypeError, match="layernorm: input is a masked array, whose mask normkit cannot honour"):
        normkit.get("ln")(x, 8)
    w = np.ma.masked_array(np.ones(8, np.float32))
    with pytest.raises(TypeError, match="layernorm: weight is a masked array"):
        normkit.get("ln")(np.ones((4, 8), np.float32), 8, w)
    # the running statistics (BatchNorm wrote into their masked slots) and the TensorFlow primitives (their
    # statistics counted the hidden values)
    running = np.ma.masked_array(np.zeros(8, np.float32), mask=[True] + [False] * 7)
    with pytest.raises(TypeError, match="batchnorm: running_mean is a masked array"):
        normkit.get("bn")(np.ones((4, 8), np.float32), running, np.ones(8, np.float32), training=True)
    with pytest.raises(TypeError, match="moments: x is a masked array"):
        normkit.moments(x, axes=[0])
    with pytest.raises(TypeError, match="batch_normalization: x is a masked array"):
        normkit.batch_normalization(x, 0.0, 1.0, None, None, 1e-3)
    with pytest.raises(TypeError, match="batch_normalization: scale is a masked array"):
        normkit.batch_normalization(x.data, 0.0, 1.0, None, w, 1e-3)


def test_exact_running_variance_of_a_constant_channel_widens_pieces_only():
    """A channel of variance below eps / 16 gets its running variance from the data again (batch_variance); that
    took float64 copies of the whole channel and temporaries in var(): 9x the input's size for bfloat16 data. It
    widens pieces of 2**20 values at a time, and gives the same variance."""
    import tracemalloc

    x = np.full((256, 2, 16384), 3.0, np.float32)  # 32 MiB, two constant channels
    x[:, 1, ::7] = 3.0001
    rm, rv = np.zeros(2), np.ones(2)
    tracemalloc.start()
    try:
        y = normkit.get("bn")(x, rm, rv, training=True, momentum=1.0, backend="cython")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - y.nbytes < 5 * 8 * 2**20, (peak - y.nbytes) / 2**20  # a few float64 pieces (before: 130 MiB)
    want = x.astype(np.float64).var(axis=(0, 2)) * (x[:, 0].size / (x[:, 0].size - 1))
    np.testing.assert_allclose(rv, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_of_non_finite_or_huge_data_warn_nothing(backend, recwarn):
    """inf data (running statistics turn NaN / inf, as they must) and a variance beyond a float32 buffer's range."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    x[0, 1, 2] = np.inf
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    normkit.get("bn")(x, rm, rv, training=True, backend=backend)
    assert np.isnan(rm[1]) or np.isinf(rm[1])
    big = (np.random.default_rng(1).standard_normal((4, 3, 5)) * 1e37).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    normkit.get("in")(big, rm, rv, use_input_stats=True, backend=backend)
    assert np.isinf(rv).all()
    assert not [str(w.message) for w in recwarn]


@pytest.mark.parametrize("op, flag", [("bn", "training"), ("in", "use_input_stats")])
def test_the_mode_flag_must_be_a_bool(op, flag):
    """torch refuses anything but a bool there; a truthy string or None picked the mode silently."""
    op_names = {"bn": "batchnorm", "in": "instancenorm"}
    x = np.ones((4, 3, 5), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for bad in ("yes", None, 1):
        with pytest.raises(TypeError, match=f"{op_names[op]}: {flag} must be a bool, got {re.escape(repr(bad))} "):
            normkit.get(op)(x, rm, rv, **{flag: bad})
    normkit.get(op)(x, rm, rv, **{flag: np.bool_(True)})  # NumPy's bool, in the NumPy frontend


def test_moments_beyond_float32_range_is_inf_without_warnings(recwarn):
    x = np.array([[3e38, -3e38, 1e38]], np.float32)
    mean, var = normkit.moments(x, axes=[1])
    assert np.isinf(var).all() and np.isfinite(mean).all()
    assert not [str(w.message) for w in recwarn]
