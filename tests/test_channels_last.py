"""Channels-last: the contract's layout axis (registry, conformance kit), the built-in channels-last kernels, and
the NumPy and PyTorch frontends on NHWC-strided data (no copy in, the output in the input's layout)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from support import BACKENDS, assert_close, ulps

import normkit
import normkit.reference
from normkit import half, registry, testing
from normkit.contract import CHANNEL_OPS, DTYPES, NHWC, SPECS
from normkit.ops import channels_last_view
from normkit.registry import Backend, runtime_module

CL_BACKENDS = tuple(b.name for b in registry.list_backends(load=False) if b.name in BACKENDS and b.channels_last)


def nhwc(a: np.ndarray) -> np.ndarray:
    """The same values as ``a`` (N, C, *spatial), in memory ordered (N, *spatial, C)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def is_nhwc(a: np.ndarray) -> bool:
    return np.moveaxis(a, 1, -1).flags.c_contiguous


# --- the contract and the registry -----------------------------------------------------------------------------

def test_builtin_backends_declare_channels_last():
    assert "cython" in CL_BACKENDS
    row = next(r for r in registry.list_backends() if r.name == "cython")
    assert {op for op, *_ in row.channels_last} == set(CHANNEL_OPS)
    assert all(layout == NHWC for *_, layout in row.channels_last)


@pytest.mark.parametrize("channels_last, match", [
    ({"layernorm": ("forward",)}, "only the channel ops"),
    ({"groupnorm": ("forward", "backward")}, "without the NCHW kernel"),
    ({"batchnorm": "forward"}, "must be a sequence"),
])
def test_bad_channels_last_declarations(channels_last, match):
    spec = Backend("bad", runtime_module({}), kernels={"batchnorm": ("forward",), "groupnorm": ("forward",)},
                   channels_last=channels_last)
    with pytest.raises(ValueError, match=match):
        spec.validate()


@pytest.mark.parametrize("dtypes, match", [("float32", "must be a sequence"), (("float32", "int8"), "unsupported"),
                                           (("bfloat16",), r"channels-last kernels for none of its dtypes: "
                                                           r"channels_last_dtypes \('bfloat16',\), dtypes \('float32', ")])
def test_bad_channels_last_dtypes(dtypes, match):
    spec = Backend("bad", runtime_module({}), kernels={"groupnorm": ("forward",)},
                   channels_last={"groupnorm": ("forward",)}, channels_last_dtypes=dtypes)
    with pytest.raises(ValueError, match=match):
        spec.validate()


def test_channels_last_dtypes_default_to_float32_and_float64():
    spec = Backend("cl", runtime_module({}), kernels={"groupnorm": ("forward",)}, dtypes=DTYPES,
                   channels_last={"groupnorm": ("forward",)})
    assert {key[2] for key in spec.declared_channels_last()} == {"float32", "float64"}
    wide = Backend("cl16", runtime_module({}), kernels={"groupnorm": ("forward",)}, dtypes=("float32", "bfloat16"),
                   channels_last={"groupnorm": ("forward",)}, channels_last_dtypes=DTYPES)
    assert {key[2] for key in wide.declared_channels_last()} == {"float32", "bfloat16"}


def test_lookup_by_layout():
    name, kernel = registry.lookup("groupnorm", "forward", "float32", "cython", layout="nhwc")
    assert name == "cython" and callable(kernel)
    assert registry.lookup("groupnorm", "forward", "float32", "reference", layout="nhwc") is None
    assert registry.lookup("batchnorm", "stats", "float64", layout="nhwc")[0] in CL_BACKENDS
    with pytest.raises(ValueError, match="no channels-last kernels"):
        registry.lookup("layernorm", "forward", "float32", layout="nhwc")
    with pytest.raises(ValueError, match="unknown layout"):
        registry.lookup("batchnorm", "forward", "float32", layout="nchwc")


def test_channels_last_kernels_come_from_the_backend_that_runs_the_op():
    """Unpinned, a channels-last look-up answers for the backend that runs the op's NCHW kernels (the first in the
    order with the plain direction), never a later one's: cython has no channels-last kernel for BatchNorm's fused
    directions, and a plugin after it that has one ran every channels-last fused call while cython ran the rest."""
    def kernel(*args):
        raise AssertionError("the later backend's kernel ran")

    directions = ("forward", "backward", "act_forward", "act_backward")
    table = {("batchnorm", d, "float32"): kernel for d in directions}
    table |= {("batchnorm", d, "float32", NHWC): kernel for d in directions}
    normkit.register_backend(Backend("zz_later", runtime_module(table), kernels={"batchnorm": directions},
                                     dtypes=("float32",), channels_last={"batchnorm": directions}))
    try:
        assert registry.get_backend_order().index("zz_later") > registry.get_backend_order().index("cython")
        assert registry.lookup("batchnorm", "act_forward", "float32", layout=NHWC) is None
        assert registry.lookup("batchnorm", "forward", "float32", layout=NHWC)[0] == "cython"
        assert registry.lookup("batchnorm", "act_forward", "float32", "zz_later", NHWC)[0] == "zz_later"
        x = nhwc(np.random.default_rng(0).standard_normal((4, 3, 2, 5)).astype(np.float32))
        y = normkit.get("bn")(x, training=True, activation="relu")  # (the later backend's kernel raises)
        assert is_nhwc(y)
        normkit.set_backend_order(["zz_later", "cython"])  # first in the order: its own kernels
        assert registry.lookup("batchnorm", "act_forward", "float32", layout=NHWC)[0] == "zz_later"
    finally:
        normkit.set_backend_order(None)
        normkit.unregister_backend("zz_later")


def test_declared_channels_last_kernel_missing_fails_to_load():
    from normkit import reference

    spec = Backend("cl_missing", runtime_module(dict(reference.KERNELS)), kernels={"batchnorm": ("forward",)},
                   channels_last={"batchnorm": ("forward",)})
    normkit.register_backend(spec)
    try:
        with pytest.warns(RuntimeWarning, match="does not provide"):
            with pytest.raises(ValueError, match="unavailable"):
                registry.lookup("batchnorm", "forward", "float32", "cl_missing")
    finally:
        normkit.unregister_backend("cl_missing")


# --- the conformance kit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CL_BACKENDS)
def test_channels_last_kernels_conform(backend):
    report = testing.check_backend(backend, layouts=["nhwc"])
    assert report == [], report.format()
    declared = next(r for r in registry.list_backends() if r.name == backend).channels_last
    assert report.cases_run >= 10 * len(declared)


def test_cli_check_and_list_show_the_layout():
    from click.testing import CliRunner

    from normkit.cli import main

    result = CliRunner().invoke(main, ["check", "cython", "--layout", "nhwc", "--op", "gn", "--quick"])
    assert result.exit_code == 0 and "conforms" in result.output, result.output
    listing = CliRunner().invoke(main, ["list"]).output
    assert "groupnorm channels-last (float32, float64): backward, forward" in listing  # numba's
    assert "groupnorm channels-last (bfloat16, float16, float32, float64): act_backward, act_forward, backward, " \
           "forward" in listing  # cython's


def _as_if_nchw(op, direction):
    """A broken channels-last kernel: the reference's NCHW kernel handed the (N, S, C) arrays as they are."""
    from normkit import reference

    nchw = reference.KERNELS[(op, direction, "float64")]

    def kernel(*args):
        nchw(*(a.reshape(a.shape[0], a.shape[2], a.shape[1]) if isinstance(a, np.ndarray) and a.ndim == 3 else a
               for a in args))

    return kernel


def test_kit_catches_a_kernel_that_ignores_the_layout():
    from normkit import reference

    table = dict(reference.KERNELS)
    for direction in ("forward", "backward"):
        for dtype in ("float32", "float64"):
            table[("groupnorm", direction, dtype, "nhwc")] = _as_if_nchw("groupnorm", direction)
    normkit.register_backend(Backend("cl_broken", runtime_module(table), kernels={"groupnorm": ("forward", "backward")},
                                     channels_last={"groupnorm": ("forward", "backward")}))
    try:
        report = testing.check_backend("cl_broken", layouts=["nhwc"], quick=True)
        assert report.cases_run and report, report.format()
        assert testing.check_backend("cl_broken", layouts=["nchw"], quick=True) == []
    finally:
        normkit.unregister_backend("cl_broken")


# --- the NumPy frontend ------------------------------------------------------------------------------------------

def test_channels_last_view_and_ambiguous_strides(rng):
    a = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)  # (N, H, W, C)
    x = a.transpose(0, 3, 1, 2)
    view = channels_last_view(x)
    assert view.shape == (2, 20, 3) and np.shares_memory(view, a)
    assert channels_last_view(np.ascontiguousarray(x)) is None
    assert channels_last_view(x[:, :, ::2]) is None  # strided: neither layout
    assert channels_last_view(nhwc(rng.standard_normal((2, 1, 4, 4)))) is None  # C = 1: C-contiguous too
    assert channels_last_view(nhwc(rng.standard_normal((2, 3, 1, 1)))) is None  # S = 1: C-contiguous too
    assert channels_last_view(x.astype(np.int32)) is None


@pytest.mark.parametrize("op", CHANNEL_OPS)
def test_misaligned_channels_last_array_keeps_the_layout(op, rng):
    """A channels-last view of a byte buffer at an odd offset (no multiple of the element size) came back
    NCHW-contiguous: the NHWC kernels got no view of it and the general path's copy is NCHW."""
    a = rng.standard_normal((2, 3, 5, 4))  # (N, H, W, C)
    raw = bytearray(a.nbytes + 1)
    misaligned = np.frombuffer(raw, np.float64, a.size, offset=1).reshape(a.shape)
    misaligned[...] = a
    x, dy = misaligned.transpose(0, 3, 1, 2), nhwc(rng.standard_normal((2, 4, 3, 5)))
    assert not x.flags.aligned and channels_last_view(x).flags.aligned
    got = _forward_backward(op, x, dy, 2, None, None, None)
    want = _forward_backward(op, np.ascontiguousarray(x), dy, 2, None, None, None)
    assert is_nhwc(got[0]) and is_nhwc(got[1])
    assert_close(got[0], want[0], "float64", "forward")
    assert_close(got[1], want[1], "float64", "backward")
    np.testing.assert_array_equal(misaligned, a)


def _shapes():
    """(N, C, *spatial, groups) with awkward sizes: N = 1, C = 1, spatial 1, groups = C, C not a multiple of 8,
    1 to 3 spatial dims."""
    @st.composite
    def draw(draw):
        n = draw(st.integers(1, 3))
        c = draw(st.sampled_from([1, 2, 3, 5, 8, 12, 17]))
        spatial = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
        groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        return (n, c, *spatial), groups

    return draw()


def _forward_backward(op, x, dy, groups, weight, bias, backend, training=True, running=None, **kw):
    fn = normkit.get(op)
    if op == "groupnorm":
        y, saved = fn.forward(x, groups, weight, bias, backend=backend, **kw)
        return (y, *fn.backward(dy, x, saved, groups, weight, bias, backend=backend, **kw))
    rm, rv = running if running is not None else (None, None)
    flag = SPECS[op].training_flag
    y, saved = fn.forward(x, rm, rv, weight, bias, backend=backend, **{flag: training}, **kw)
    return (y, *fn.backward(dy, x, saved, rm, rv, weight, bias, backend=backend, **{flag: training}, **kw))


@pytest.mark.parametrize("op", CHANNEL_OPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(shape_groups=_shapes(), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_numpy_nhwc_matches_reference(op, dtype, shape_groups, affine, seed):
    shape, groups = shape_groups
    spec = SPECS[op]
    kshape = (shape[0], shape[1], int(np.prod(shape[2:])))
    assume(spec.set_size(kshape, groups if op == "groupnorm" else None) > 1 or not spec.running)
    assume(op != "groupnorm" or spec.set_size(kshape, groups) > 1)
    rng = np.random.default_rng(seed)
    x = nhwc(rng.standard_normal(shape).astype(dtype))
    dy = nhwc(rng.standard_normal(shape).astype(dtype))
    c = shape[1]
    weight = rng.standard_normal(c).astype(dtype) if affine else None
    bias = rng.standard_normal(c).astype(dtype) if affine else None
    before = x.copy(), dy.copy()
    got = _forward_backward(op, x, dy, groups, weight, bias, None)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(dy, before[1])
    ref = _forward_backward(op, np.ascontiguousarray(x), np.ascontiguousarray(dy), groups, weight, bias, "reference")
    for name, g, r, direction in zip(("y", "dx", "dweight", "dbias"), got, ref,
                                     ("forward", "backward", "backward", "backward")):
        if r is None:
            assert g is None
            continue
        assert_close(g, r, dtype, direction, f"{op} {name} {shape} groups={groups}")
    for out in got[:2]:  # y and dx in the input's layout
        assert is_nhwc(out)


@pytest.mark.parametrize("op", ["batchnorm", "instancenorm"])
def test_numpy_nhwc_inference(op, rng):
    x = nhwc(rng.standard_normal((2, 5, 3, 4)))
    dy = nhwc(rng.standard_normal((2, 5, 3, 4)))
    running = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    got = _forward_backward(op, x, dy, None, w, b, None, training=False, running=running)
    ref = _forward_backward(op, np.ascontiguousarray(x), np.ascontiguousarray(dy), None, w, b, "reference",
                            training=False, running=running)
    for g, r, direction in zip(got, ref, ("forward", "backward", "backward", "backward")):
        assert_close(g, r, "float64", direction)
    assert is_nhwc(got[0]) and is_nhwc(got[1])


@pytest.mark.parametrize("op", ["groupnorm", "instancenorm"])
def test_numpy_nhwc_fused_activation_runs_the_channels_last_act_kernels(op, rng):
    """Cython's channels-last act_ kernels get the array's own memory (a spy backend around them) and give the
    NCHW kernels' results."""
    calls = []
    directions = ("forward", "backward", "act_forward", "act_backward")
    table = {(op, d, "float64"): registry.lookup(op, d, "float64", "cython")[1] for d in directions}
    for d in directions[2:]:
        kernel = registry.lookup(op, d, "float64", "cython", NHWC)[1]
        table[(op, d, "float64", NHWC)] = (lambda d, k: lambda *a: (calls.append((d, a)), k(*a)))(d, kernel)
    normkit.register_backend(Backend("np_act_spy", runtime_module(table), kernels={op: directions},
                                     dtypes=("float64",), channels_last={op: directions[2:]}))
    try:
        x, dy = nhwc(rng.standard_normal((3, 4, 5, 2))), nhwc(rng.standard_normal((3, 4, 5, 2)))
        w, b = rng.standard_normal(4), rng.standard_normal(4)
        got = _forward_backward(op, x, dy, 2, w, b, "np_act_spy", activation="silu")
        assert [d for d, _ in calls] == ["act_forward", "act_backward"]
        assert np.shares_memory(calls[0][1][0], x) and is_nhwc(got[0]) and is_nhwc(got[1])
        want = _forward_backward(op, np.ascontiguousarray(x), np.ascontiguousarray(dy), 2, w, b, "cython",
                                 activation="silu")
        for g, r, direction in zip(got, want, ("forward", "backward", "backward", "backward")):
            assert_close(g, r, "float64", direction)
    finally:
        normkit.unregister_backend("np_act_spy")


@pytest.mark.parametrize("op", CHANNEL_OPS)
def test_numpy_without_channels_last_kernel_copies_and_keeps_the_layout(op, rng):
    x = nhwc(rng.standard_normal((3, 4, 5, 2)))
    dy = rng.standard_normal((3, 4, 5, 2))  # NCHW while x is channels-last: dx follows x
    got = _forward_backward(op, x, dy, 2, None, None, "reference")
    ref = _forward_backward(op, np.ascontiguousarray(x), dy, 2, None, None, "cython")
    assert is_nhwc(got[0]) and is_nhwc(got[1])
    assert_close(got[0], ref[0], "float64", "forward")
    assert_close(got[1], ref[1], "float64", "backward")


@pytest.mark.parametrize("case", ["batchnorm", "batchnorm_infer", "instancenorm_infer", "batchnorm_relu"])
def test_per_channel_directions_run_on_the_columns_view_without_a_copy(case, rng, spy):
    """A backend without channels-last kernels (and any backend for an activation): BatchNorm's directions and the
    inference ones run the NCHW kernel on the (N*S, C, 1) view of the channels-last memory itself (contract.
    on_columns), with the reference's results."""
    op = case.split("_")[0]
    training = not case.endswith("_infer")
    kw = {"activation": "relu"} if case.endswith("_relu") else {}
    x, dy = nhwc(rng.standard_normal((3, 4, 5, 2))), nhwc(rng.standard_normal((3, 4, 5, 2)))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    fn, flag = normkit.get(op), SPECS[op].training_flag
    y, saved = fn.forward(x, rm.copy(), rv.copy(), w, b, backend="spy", **{flag: training}, **kw)
    dx, dw, db = fn.backward(dy, x, saved, rm, rv, w, b, backend="spy", **{flag: training}, **kw)
    assert [key[1] for key, _ in spy] == [("act_" if kw else "") + d + ("" if training else "_infer")
                                          for d in ("forward", "backward")]
    for _, args in spy:
        data = [a for a in args if isinstance(a, np.ndarray) and a.ndim == 3]
        assert all(a.shape == (30, 4, 1) for a in data)
        assert any(np.shares_memory(a, x) for a in data)  # x itself, not a copy
    assert is_nhwc(y) and is_nhwc(dx)
    ref = normkit.get(op)
    y_ref, s_ref = ref.forward(np.ascontiguousarray(x), rm.copy(), rv.copy(), w, b, backend="reference",
                               **{flag: training}, **kw)
    want = (y_ref, *ref.backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), s_ref, rm, rv, w, b,
                                 backend="reference", **{flag: training}, **kw))
    for g, r, direction in zip((y, dx, dw, db), want, ("forward", "backward", "backward", "backward")):
        assert_close(g, r, "float64", direction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", CHANNEL_OPS)
def test_numpy_16_bit_channels_last_keeps_the_layout(op, dtype, backend, rng):
    """16-bit data: y and dx come back NHWC-strided. A backend's 16-bit channels-last kernels (Cython's) run, and
    BatchNorm (per channel) runs the NCHW kernel on the (N*S, C, 1) view where there is none: the same sums in
    another order, so the contract's bound against the float64 reference rounded once (1 ulp for y, 2 for dx),
    float32's for the parameter gradients. Without a channels-last kernel (Numba's GroupNorm and InstanceNorm)
    the NCHW kernel runs on a copy: equal to the NCHW input's results."""
    dt = np.dtype(dtype) if dtype == "float16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    a = rng.standard_normal((3, 4, 5, 2)).astype(dt)
    dy = rng.standard_normal((3, 4, 5, 2)).astype(dt)
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    got = _forward_backward(op, nhwc(a), nhwc(dy), 2, w, b, backend)
    assert is_nhwc(got[0]) and is_nhwc(got[1]) and got[0].dtype == dt
    kernel16 = registry.lookup(op, "forward", dtype, backend, NHWC)
    assert (kernel16 is not None) == (backend == "cython")
    if kernel16 is None and not SPECS[op].per_channel("forward"):
        want = _forward_backward(op, a, dy, 2, w, b, backend)
        for g, r in zip(got, want):
            np.testing.assert_array_equal(g.view(np.uint16) if g.dtype == dt else g,
                                          r.view(np.uint16) if r.dtype == dt else r)
        return
    want = _forward_backward(op, a.astype(np.float64), dy.astype(np.float64), 2, w.astype(np.float64),
                             b.astype(np.float64), "reference")
    assert ulps(got[0], half.narrow(want[0], dtype)) <= 1 and ulps(got[1], half.narrow(want[1], dtype)) <= 2
    for g, r in zip(got[2:], want[2:]):
        assert_close(g, r, "float32", "backward")


# --- the kernels: numerics the conformance kit's small shapes do not reach --------------------------------------

@pytest.mark.parametrize("backend", CL_BACKENDS)
@pytest.mark.parametrize("op, shape, groups", [
    ("groupnorm", (1, 12, 300), 3),  # one sample: its rows cut into blocks
    ("instancenorm", (3, 5, 520), None),
    ("batchnorm", (2, 7, 900), None),
    ("groupnorm", (9, 8, 40), 8),  # whole samples per task
    ("groupnorm", (9, 21, 30), 7),
    ("instancenorm", (8, 40, 20), None),
    ("instancenorm", (3, 2, 1031), None),  # rows of 2 values 8 at a time (FOLDED below), 7 rows left over
    ("groupnorm", (9, 4, 301), 2),
])
@pytest.mark.parametrize("data", ["offset1e8", "nan", "constant"])
def test_channels_last_numerics_on_large_sets(backend, op, shape, groups, data):
    case = testing.Case(op, "forward", "float64", shape, groups, "weight+bias", data, 1e-5, layout="nhwc")
    failures = []
    testing._run_case(case, registry.lookup(op, "forward", "float64", backend, "nhwc")[1], failures)
    testing._run_case(testing.Case(op, "backward", "float32", shape, groups, "weight+bias", data, 1e-5,
                                   layout="nhwc"),
                      registry.lookup(op, "backward", "float32", backend, "nhwc")[1], failures)
    assert failures == [], "\n".join(map(str, failures))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op, shape, groups", [
    ("groupnorm", (1, 12, 300), 3),  # one sample: its rows cut into blocks
    ("groupnorm", (9, 8, 40), 8),  # whole samples per task
    ("groupnorm", (9, 21, 30), 7),  # rows of 21 values: the registers' loops and the tails past them
    ("instancenorm", (8, 40, 20), None),
    ("groupnorm", (2, 1100, 3), 4),  # rows longer than one tile of the elementwise pass
    ("groupnorm", (1, 3, 5400), 1),  # rows of 3 values 42 at a time (FOLD16_WIDTH), in blocks, 24 left over
    ("instancenorm", (9, 2, 4100), None),  # 64 at a time, whole samples, 4 left over
    ("groupnorm", (2, 24, 703), 6),  # 5 at a time
    ("groupnorm", (3, 4, 10), 2), ("instancenorm", (2, 3, 50), None),  # a sample is one folded row (and 8 rows)
])
@pytest.mark.parametrize("data", ["offset1e3", "nan", "constant", "overflow"])
def test_16_bit_channels_last_numerics_on_large_sets(op, shape, groups, dtype, data):
    """Cython's 16-bit channels-last kernels on the hostile data the conformance kit runs, on sets larger than its
    shapes and in both of its task schedules."""
    failures = []
    for direction in ("forward", "backward"):
        case = testing.Case(op, direction, dtype, shape, groups, "weight+bias", data, 1e-5, layout="nhwc")
        testing._run_case(case, registry.lookup(op, direction, dtype, "cython", "nhwc")[1], failures)
    assert failures == [], "\n".join(map(str, failures))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", CL_BACKENDS)
@pytest.mark.parametrize("op, shape, groups", [
    ("groupnorm", (1, 24, 1000), 6), ("groupnorm", (16, 6, 50), 2), ("instancenorm", (2, 33, 700), None),
    ("batchnorm", (4, 40, 600), None), ("groupnorm", (9, 21, 30), 7), ("instancenorm", (8, 40, 20), None),
    ("groupnorm", (2, 4, 2200), 2), ("instancenorm", (3, 2, 4203), None),  # folded rows (FOLDED below)
])
def test_channels_last_results_do_not_depend_on_the_thread_count(backend, op, shape, groups, dtype, rng):
    dt = np.float32 if dtype == "float32" else pytest.importorskip("ml_dtypes").bfloat16
    x = nhwc((rng.standard_normal(shape) + 3).astype(dt))
    dy = nhwc(rng.standard_normal(shape).astype(dt))
    w, b = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    results = []
    threads = registry.get_num_threads()
    try:
        for n in (1, 2):
            registry.set_num_threads(n)
            results.append(_forward_backward(op, x, dy, groups, w, b, backend))
    finally:
        registry.set_num_threads(threads)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# Cython's channels-last GroupNorm / InstanceNorm take a sample's rows of at most 8 values 16 values' worth at a time
# (Fold in _channels_last.pyx: k rows of C values as one row, each column a set of its own, the coefficients
# repeated), with the rows left over on their own: whole samples per task (9 samples, or too few rows to cut: (2, 1,
# 2003), and samples of one folded row and 4 rows over: (4, 1, 20)) and samples cut into blocks (1 to 3 samples),
# with rows left over and without, plain and with a fused activation. (16-bit rows of up to 32 values
# are folded into up to 128: test_16_bit_channels_last_numerics_on_large_sets.)
FOLDED = [("instancenorm", (3, 2, 1031), None), ("groupnorm", (9, 4, 301), 2), ("groupnorm", (1, 8, 1500), 4),
          ("instancenorm", (2, 1, 2003), None), ("groupnorm", (9, 3, 400), 1), ("groupnorm", (2, 6, 1000), 3),
          ("instancenorm", (4, 1, 20), None)]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op, shape, groups", FOLDED, ids=str)
def test_cython_channels_last_folded_rows_match_reference(op, shape, groups, dtype, activation, rng):
    x = nhwc((rng.standard_normal(shape) * 2 + 3).astype(dtype))
    dy = nhwc(rng.standard_normal(shape).astype(dtype))
    w, b = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    got = _forward_backward(op, x, dy, groups, w, b, "cython", activation=activation)
    want = _forward_backward(op, np.ascontiguousarray(x), np.ascontiguousarray(dy), groups, w, b, "reference",
                             activation=activation)
    assert is_nhwc(got[0]) and is_nhwc(got[1])
    for name, g, r, direction in zip(("y", "dx", "dweight", "dbias"), got, want,
                                     ("forward", "backward", "backward", "backward")):
        assert_close(g, r, dtype, direction, f"{op} {shape} {activation} {name}")
