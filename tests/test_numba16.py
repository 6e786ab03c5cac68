"""The Numba backend's bfloat16 and float16 kernels (normkit.contract's 16-bit contract), called directly: uint16
bit arrays for the data, float32 parameters and statistics. Each result is compared with the float64 reference
computed from the exactly widened inputs: 16-bit outputs within 1 ulp of the 16-bit type (2 for dx), plus the
condition-based slack that float32 arithmetic earns (normkit.testing's bounds with float32's epsilon); float32 and
float64 outputs within those bounds alone. Also: the conversions on every bit pattern, overflow to inf, NaN
propagation, and results independent of the thread count.

numba compiles each kernel once per dtype whatever the shape (and caches it on disk), so the many shapes here cost
run time only."""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from normkit import reference  # noqa: E402
from normkit.contract import OUTPUTS, SPECS, arg_dtype  # noqa: E402
from normkit.testing import tolerance_factor  # noqa: E402

K = pytest.importorskip("normkit_kernels.numba.kernels")
from normkit_kernels.numba import _dtype16  # noqa: E402

FORMATS = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# mantissa bits, smallest normal exponent, largest finite value
LIMITS = {"bfloat16": (7, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)), "float16": (10, -14, 65504.0)}
E32 = float(np.finfo(np.float32).eps)
DATA = ("x", "y", "dy", "dx")


def to16(a, dtype):
    """float values -> bit patterns, rounded once (from float32: the tests' inputs are float32)."""
    return np.ascontiguousarray(np.asarray(a, np.float32).astype(FORMATS[dtype]).view(np.uint16))


def wide(bits, dtype):
    return bits.view(FORMATS[dtype]).astype(np.float64)


def ulp(v, dtype):
    """The spacing of the 16-bit type at |v| (its subnormal spacing below the normal range)."""
    mant, emin, _ = LIMITS[dtype]
    with np.errstate(all="ignore"):
        e = np.floor(np.log2(np.abs(v)))
    e = np.where(np.isfinite(e), np.maximum(e, emin), emin)
    return 2.0 ** (e - mant)


# --- the conversions, on every pattern -----------------------------------------------------------------------

@numba.njit
def _widen_all(a, out):
    for i in range(a.shape[0]):
        out[i] = _dtype16.widen(a[i])


@numba.njit
def _narrow_all(f, out):
    for i in range(f.shape[0]):
        out[i] = _dtype16.narrow(out, f[i])


def _f32_probe():
    """float32 values around every 16-bit value: each value, the halfway points to both neighbours and just off
    them (rounding), the subnormal and overflow ranges, NaN and inf, plus random patterns."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    f16 = np.arange(1 << 15, dtype=np.uint32)
    f16 = f16[(f16 & 0x7C00) != 0x7C00].astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    steps = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x7FFF, 0x8000, 0x8001], np.uint32)
    sign = np.array([0, 0x80000000], np.uint32)
    rnd = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    u = np.concatenate([(hi[:, None] + steps).ravel(), ((f16[:, None] + steps).ravel()[:, None] | sign).ravel(), rnd])
    return u.view(np.float32)


def test_widening_is_exact_on_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype, view in (("bfloat16", np.uint16), ("float16", np.int16)):
        out = np.empty(bits.shape, np.float32)
        _widen_all(bits.view(view), out)
        want = bits.view(FORMATS[dtype]).astype(np.float32)
        nan = np.isnan(want)
        assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32)), dtype
        assert np.isnan(out[nan]).all() and np.array_equal(np.signbit(out[nan]), np.signbit(want[nan])), dtype


def test_narrowing_rounds_to_nearest_even():
    f = _f32_probe()
    nan = np.isnan(f)
    for dtype, view in (("bfloat16", np.uint16), ("float16", np.int16)):
        out = np.empty(f.shape, view)
        _narrow_all(f, out)
        with np.errstate(all="ignore"):
            want = f.astype(FORMATS[dtype]).view(view)
        assert np.array_equal(out[~nan], want[~nan]), dtype
        got = out.view(FORMATS[dtype]).astype(np.float32)
        assert np.isnan(got[nan]).all() and np.array_equal(np.signbit(got[nan]), np.signbit(f[nan])), dtype


@numba.njit
def _f16_both_ways(bits, f, soft_w, hard_w, soft_n, hard_n):
    for i in range(bits.shape[0]):
        soft_w[i] = _dtype16.f16_to_f32_soft(bits[i])
        hard_w[i] = _dtype16.f16_to_f32_f16c(bits[i])
    for i in range(f.shape[0]):
        soft_n[i] = _dtype16.f32_to_f16_soft(f[i])
        hard_n[i] = _dtype16.f32_to_f16_f16c(f[i])


@pytest.mark.skipif(not _dtype16.F16C, reason="the compile target has no F16C")
def test_float16_software_conversion_matches_f16c_bit_for_bit():
    """The portable float16 conversion (used where the CPU has no F16C) gives F16C's bits, NaN payloads too."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    f = _f32_probe()
    sw, hw = np.empty(bits.shape, np.float32), np.empty(bits.shape, np.float32)
    sn, hn = np.empty(f.shape, np.int16), np.empty(f.shape, np.int16)
    _f16_both_ways(bits, f, sw, hw, sn, hn)
    assert np.array_equal(sw.view(np.uint32), hw.view(np.uint32))
    assert np.array_equal(sn, hn)


# --- the kernels against the float64 reference ---------------------------------------------------------------

def _sets_max(spec, a, groups):
    return np.abs(spec.as_sets(a, groups)).max(axis=-1)


def _make(op, direction, dtype, shape, groups, kind, affine, seed):
    """The kernel's arguments (16-bit data as bit arrays) and their exact float64 values, by name."""
    spec = SPECS[op]
    rng = np.random.default_rng(seed)
    C = spec.param_shape(shape)[0]
    x = rng.standard_normal(shape)
    if kind == "offset":
        x = x + 1e4
    if kind == "offset_fine":  # where the 16-bit spacing is 0.5: sets of condition number ~1e3
        x = x + {"bfloat16": 1e2, "float16": 1e3}[dtype]
    if kind == "nan":
        x.flat[rng.integers(x.size)] = np.nan
    dy = rng.standard_normal(shape)
    big = {"bfloat16": 1e38, "float16": 1e5}[dtype] if kind == "overflow" else 1.0
    v = {"x": to16(x, dtype), "dy": to16(dy, dtype), "eps": 1e-5, "num_groups": groups}
    v["weight"] = (rng.uniform(0.5, 2.0, C) * big).astype(np.float32) if affine else None
    v["bias"] = rng.standard_normal(C).astype(np.float32) if affine == 2 else None
    v["running_mean"] = rng.standard_normal(C).astype(np.float32)
    v["running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x64 = wide(v["x"], dtype)
    with np.errstate(all="ignore"):
        sets = spec.as_sets(x64, groups)
        mean = np.mean(sets, axis=-1)
        rstd = 1.0 / np.sqrt(np.var(sets, axis=-1) + 1e-5)
    if direction == "backward_infer":
        mean, rstd = v["running_mean"].astype(np.float64), 1.0 / np.sqrt(v["running_var"] + 1e-5)
    f64 = direction == "backward_reduce"
    v["mean"] = mean if f64 else mean.astype(np.float32)
    v["rstd"] = rstd if f64 else rstd.astype(np.float32)
    if direction in ("apply", "backward_apply"):
        w = v["weight"].astype(np.float64) if affine else np.ones(C)
        v["scale"] = (w * rstd).astype(np.float32)
        v["shift"] = (rng.standard_normal(C) - mean * w * rstd).astype(np.float32)
        v["a"] = (w * rstd).astype(np.float32)
        v["b"] = (-w * rstd ** 2 * rng.uniform(-1, 1, C)).astype(np.float32)
        v["d"] = (-v["b"] * mean + rng.uniform(-1, 1, C)).astype(np.float32)
    exact = {k: (wide(a, dtype) if k in DATA else a.astype(np.float64)) if isinstance(a, np.ndarray) else a
             for k, a in v.items()}
    return v, exact


def _run(op, direction, dtype, shape, groups, kind="normal", affine=2, seed=0, threads=None):
    """Call the 16-bit kernel and the float64 reference on the same exact values; (outputs, expected, exact
    inputs)."""
    spec = SPECS[op]
    v, exact = _make(op, direction, dtype, shape, groups, kind, affine, seed)
    stat = spec.stat_shape(shape, groups, training=not direction.endswith("_infer"))
    per_param = spec.param_shape(shape)
    want_grads = {"dweight": affine >= 1, "dbias": affine == 2}
    outs, ref = {}, {}
    for name in OUTPUTS[direction]:
        if not want_grads.get(name, True):
            continue
        shp = shape if name in DATA else stat if name in ("mean", "rstd") else per_param
        dt = np.uint16 if name in DATA else np.dtype(arg_dtype(direction, name, "float32"))
        outs[name] = np.full(shp, 0xFFFF if name in DATA else np.nan, dt)
        ref[name] = np.empty(shp)
    if threads is not None:
        K.set_num_threads(threads)
    K.KERNELS[(op, direction, dtype)](*spec.kernel_args(direction, {**v, **outs}))
    with np.errstate(all="ignore"):
        reference.KERNELS[(op, direction, "float64")](*spec.kernel_args(direction, {**exact, **ref}))
    got = {k: wide(a, dtype) if k in DATA else a.astype(np.float64) for k, a in outs.items()}
    return got, ref, exact, outs


def _tolerances(op, direction, dtype, shape, groups, ref, e):
    """normkit.testing's bounds with float32's epsilon (the kernels' arithmetic), plus 1 ulp of the 16-bit type
    for y and 2 for dx."""
    spec = SPECS[op]
    m = spec.set_size(shape, groups)
    n = spec.param_count(shape)
    C = spec.param_shape(shape)[0]
    per_c = spec.per_param
    w = np.abs(e["weight"]) if e["weight"] is not None else np.ones(C)
    b = np.abs(e["bias"]) if e["bias"] is not None else np.zeros(C)
    x = e["x"]
    tol = {}
    with np.errstate(all="ignore"):
        if direction in ("forward", "backward", "stats", "backward_reduce"):
            mean = ref["mean"] if direction == "forward" else e.get("mean")
            absmax = _sets_max(spec, x, groups)
            k = tolerance_factor(m) * E32
        if direction == "forward":
            rstd = ref["rstd"]
            kappa = spec.per_element(absmax * rstd, shape)
            xhat = np.abs((x - spec.per_element(mean, shape)) * spec.per_element(rstd, shape))
            tol["y"] = k * (per_c(w) * (1 + kappa) * (1 + xhat) + per_c(b))
            tol["mean"] = k * absmax
            tol["rstd"] = k * (1 + absmax * rstd) * rstd
        elif direction == "forward_infer":
            rm, r = per_c(e["running_mean"]), per_c(1.0 / np.sqrt(e["running_var"] + 1e-5))
            tol["y"] = tolerance_factor(1) * E32 * (per_c(w) * (1 + (np.abs(x) + np.abs(rm)) * r)
                                                    * (1 + np.abs((x - rm) * r)) + per_c(b))
        elif direction in ("backward", "backward_infer"):
            dy = np.abs(e["dy"])
            training = direction == "backward"
            expand = (lambda s: spec.per_element(s, shape)) if training else per_c
            mean, rstd = expand(e["mean"]), expand(e["rstd"])
            xhat = np.abs((x - mean) * rstd)
            if training:
                kappa = spec.per_element(absmax * e["rstd"], shape)
                g = spec.per_element(_sets_max(spec, dy * per_c(w), groups), shape)
                tol["dx"] = k * rstd * g * (1 + kappa) * (1 + xhat)
            else:
                kappa = (np.abs(x) + np.abs(mean)) * rstd
                tol["dx"] = tolerance_factor(1) * E32 * dy * per_c(w) * rstd
            kn = tolerance_factor(n) * E32
            tol["dweight"] = kn * np.sum(dy * (1 + kappa) * (1 + xhat), axis=spec.param_axes())
            tol["dbias"] = kn * np.sum(dy, axis=spec.param_axes())
        elif direction == "stats":
            m2 = ref["m2"]
            tol["mean"] = k * absmax
            tol["m2"] = k * (m2 + 2 * absmax * np.sqrt(m * m2)) + m * (k * absmax) ** 2
        elif direction == "backward_reduce":
            dy = np.abs(e["dy"])
            r = per_c(e["rstd"])
            xhat = np.abs((x - per_c(mean)) * r)
            kappa = per_c(absmax) * r
            kn = tolerance_factor(n) * E32
            tol["sum_dy_xhat"] = kn * np.sum(dy * (1 + kappa) * (1 + xhat), axis=(0, 2))
            tol["sum_dy"] = kn * np.sum(dy, axis=(0, 2))
        elif direction == "apply":
            tol["y"] = tolerance_factor(1) * E32 * (np.abs(x * per_c(e["scale"])) + np.abs(per_c(e["shift"])))
        elif direction == "backward_apply":
            tol["dx"] = tolerance_factor(1) * E32 * (np.abs(per_c(e["a"]) * e["dy"]) + np.abs(per_c(e["b"]) * x)
                                                     + np.abs(per_c(e["d"])))
    for name, ulps in (("y", 1), ("dx", 2)):
        if name in tol:
            tol[name] = tol[name] + ulps * ulp(ref[name], dtype)
    return tol


def _check(op, direction, dtype, shape, groups=None, kind="normal", affine=2, seed=0):
    got, ref, e, _ = _run(op, direction, dtype, shape, groups, kind, affine, seed)
    tol = _tolerances(op, direction, dtype, shape, groups, ref, e)
    top = LIMITS[dtype][2]
    for name, g in got.items():
        r = ref[name]
        what = f"{op} {direction} {dtype} {shape} groups={groups} {kind} affine={affine}: {name}"
        assert np.array_equal(np.isnan(g), np.isnan(r)), f"{what}: NaN where the reference has none, or not NaN"
        if name in ("y", "dx"):
            # beyond the 16-bit range (past rounding to its largest value) the output must be that inf; in
            # the rounding gap just above the largest finite value, either
            over = np.abs(r) > top * (1 + 2.0 ** -(LIMITS[dtype][0] + 1)) * (1 + 1e-6)
            assert np.array_equal(g[over], np.where(r[over] > 0, np.inf, -np.inf)), f"{what}: overflow is not inf"
            fin = np.isfinite(r) & (np.abs(r) <= top)
        else:
            fin = np.isfinite(r)
            assert np.array_equal(g[~fin & ~np.isnan(r)], r[~fin & ~np.isnan(r)]), f"{what}: inf"
        err = np.abs(g - r)[fin]
        bound = np.broadcast_to(tol[name], r.shape)[fin]
        assert np.all(err <= bound), (f"{what}: max error {np.max(err - bound) if err.size else 0:.3g} over the "
                                      f"bound; worst ratio {np.nanmax(err / bound):.3g}")


DTYPE_NAMES = ("bfloat16", "float16")
# (op, direction, kernel shape, groups): shapes that take each of the families' work splits (batchnorm: one channel
# per item, (n, c) rows, rows cut in pieces, column tasks, a small flattened view, a tiled flattened view;
# groupnorm / instancenorm: one item per set, sets cut in pieces; layernorm: short and long rows, few rows)
PATHS = {
    "channel": [((2, 9, 20), None), ((3, 2, 50), None), ((1, 1, 9000), None), ((3, 260, 4), None),
                ((5, 7, 3), None), ((3000, 10, 3), None), ((1, 1, 1), None)],
    "instance": [((2, 5, 30), None), ((1, 2, 9000), None), ((3, 1, 1), None)],
    "group": [((2, 6, 20), 3), ((1, 2, 9000), 1), ((4, 6, 1), 6), ((3, 4, 7), 1)],
    "row": [((9, 40), None), ((2, 9000), None), ((3, 1), None), ((20, 9000), None)],
}
# the kernels whose inputs and bounds _make and _tolerances know; RMSNorm's and the fused adds' 16-bit loops
# (K._ROWNORM) are covered by the conformance kit and test_half_frontends.py
NATIVE = [(op, d) for op, spec in SPECS.items() for d in spec.directions if (op, d) in K._FUNCTIONS]
CASES = [(op, d, shape, g) for op, d in NATIVE for shape, g in PATHS[SPECS[op].sets]]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("op,direction,shape,groups", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_kernel_matches_reference(op, direction, shape, groups, dtype):
    _check(op, direction, dtype, shape, groups)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("op,direction", NATIVE)
def test_offset_nan_overflow_and_no_affine(op, direction, dtype):
    """mean 1e4 std 1 (float16's spacing there is 8, bfloat16's 64: nearly constant sets) and a mean where the
    spacing is 0.5, one NaN, outputs beyond the type's range, weight only and no affine. (bfloat16's range is
    float32's: its gradients would overflow in float32 arithmetic before they do in bfloat16, as in the float32
    kernels, so only its forward outputs are driven past it.)"""
    spec = SPECS[op]
    shape, groups = PATHS[spec.sets][0]
    overflow = direction in ("forward", "forward_infer", "apply") or dtype == "float16" and direction not in (
        "stats", "backward_reduce")
    for kind, affine in (("offset", 2), ("offset_fine", 2), ("nan", 2), ("overflow", 1), ("normal", 1),
                         ("normal", 0)):
        if kind == "overflow" and not overflow:
            continue
        _check(op, direction, dtype, shape, groups, kind, affine)


@st.composite
def _shapes(draw, op):
    spec = SPECS[op]
    if spec.sets == "row":
        return (draw(st.integers(1, 20)), draw(st.integers(1, 300))), None
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 70)))
    if not spec.grouped:
        return shape, None
    divisors = [g for g in range(1, shape[1] + 1) if shape[1] % g == 0]
    return shape, draw(st.sampled_from(divisors))


@pytest.mark.parametrize("op", sorted({op for op, _ in NATIVE}))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_awkward_shapes(op, data):
    shape, groups = data.draw(_shapes(op))
    direction = data.draw(st.sampled_from([d for o, d in NATIVE if o == op]))
    dtype = data.draw(st.sampled_from(DTYPE_NAMES))
    _check(op, direction, dtype, shape, groups, data.draw(st.sampled_from(("normal", "offset", "offset_fine"))),
           data.draw(st.integers(0, 2)), seed=data.draw(st.integers(0, 99)))


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("op,direction,shape,groups", [c for c in CASES if c[2] in (
    (2, 9, 20), (3000, 10, 3), (1, 1, 9000), (3, 260, 4), (1, 2, 9000), (2, 9000), (20, 9000))])
def test_results_independent_of_thread_count(op, direction, shape, groups, dtype):
    before = numba.get_num_threads()
    try:
        one = _run(op, direction, dtype, shape, groups, threads=1)[3]
        two = _run(op, direction, dtype, shape, groups, threads=min(2, numba.config.NUMBA_NUM_THREADS))[3]
    finally:
        K.set_num_threads(before)
    for name in one:
        assert np.array_equal(one[name].view(np.uint8), two[name].view(np.uint8)), name


def test_inputs_are_not_modified_and_bits_are_viewed_not_copied():
    x = to16(np.random.default_rng(1).standard_normal((3, 4, 25)), "float16")
    keep = x.copy()
    y = np.zeros_like(x)
    mean, rstd = np.empty(4, np.float32), np.empty(4, np.float32)
    K.KERNELS[("batchnorm", "forward", "float16")](x, None, None, 1e-5, y, mean, rstd)
    assert np.array_equal(x, keep)
    assert y.any(), "the output was written to a copy"
