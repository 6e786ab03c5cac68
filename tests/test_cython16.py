"""The Cython backend's bfloat16 and float16 kernels (issue 14), called directly through KERNELS: uint16 bit
patterns in and out, float32 parameters and statistics (float64 for the split directions' sums), against the
float64 reference run on the exactly widened input.

Bounds (COMMON.md's 16-bit contract): y within 1 ulp of the 16-bit type, dx within 2, plus a slack of a few
float32 roundings of the largest term (the condition-based slack the float32 kernels get, see test_backends'
dx_scale); float32 outputs as the float32 kernels'. The conversions are checked bit for bit on every pattern.
The module runs again in a subprocess on the baseline build with the portable float16 conversion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import TOL

import normkit
import normkit.testing
from normkit import reference
from normkit.contract import OUTPUTS, SPECS, arg_dtype

kernels = pytest.importorskip("normkit_kernels.cython.kernels")
ml_dtypes = pytest.importorskip("ml_dtypes")

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("bfloat16", "float16")
NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# significand bits (with the implicit one) and the smallest normal exponent
BITS = {"bfloat16": (8, -126), "float16": (11, -14)}
DATA = ("x", "dy", "y", "dx")
EPS32 = float(np.finfo(np.float32).eps)
# ops and their directions as KERNELS has them (the frontends' tables do not know the 16-bit dtypes yet)
_THREADS = normkit.get_num_threads()


def quantize(a, fmt):
    """a rounded to the 16-bit format, as float64 (exact); beyond the range, inf."""
    with np.errstate(over="ignore"):
        return np.asarray(a, np.float64).astype(NUMPY[fmt]).astype(np.float64)


def ulp(v, fmt):
    """One unit in the last place of the 16-bit format at |v| (subnormal spacing below the normal range)."""
    p, emin = BITS[fmt]
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(v)))
    return np.exp2(np.maximum(np.where(np.isfinite(e), e, emin), emin) - (p - 1))


def call(op, direction, fmt, values, threads=None):
    """Run the 16-bit kernel and the float64 reference on ``values`` (float64 arrays holding values exact in the
    argument's type; outputs given as arrays of their shape, or None). Returns (got, want): name -> float64."""
    spec = SPECS[op]
    args16, args64, got, want = [], [], {}, {}
    for name in spec.args(direction):
        v = values.get(name)
        if not isinstance(v, np.ndarray):
            args16.append(v)
            args64.append(v)
            continue
        out = name in OUTPUTS[direction]
        if name in DATA:
            a16 = np.zeros(v.shape, np.uint16) if out else v.astype(NUMPY[fmt]).view(np.uint16)
        else:
            a16 = np.zeros(v.shape, arg_dtype(direction, name, "float32")) if out else \
                v.astype(arg_dtype(direction, name, "float32"))
        a64 = np.zeros(v.shape) if out else v.astype(np.float64)
        args16.append(a16)
        args64.append(a64)
        if out:
            got[name], want[name] = a16, a64
    kernel = kernels.KERNELS[(op, direction, fmt)]
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args16]
    kernels.set_num_threads(threads or _THREADS)
    try:
        kernel(*args16)
    finally:
        kernels.set_num_threads(_THREADS)
    for a, b, name in zip(args16, before, spec.args(direction)):
        if name not in OUTPUTS[direction] and isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=f"{op} {direction}: input {name} was written")
    reference.KERNELS[(op, direction, "float64")](*args64)
    got = {k: (v.view(NUMPY[fmt]) if k in DATA else v).astype(np.float64) for k, v in got.items()}
    return got, want


def check16(got, want, fmt, ulps, slack, what):
    """got within ulps units of the 16-bit format of want, plus slack (per element or scalar), where want rounds
    to a finite 16-bit value; equal (NaN, or inf of the same sign) where it does not."""
    rounded = quantize(want, fmt)
    finite = np.isfinite(rounded)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(rounded), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_array_equal(got[~finite], rounded[~finite], err_msg=f"{what}: non-finite values differ")
    bound = (ulps * ulp(want, fmt) + slack)
    bound = np.broadcast_to(bound, want.shape)[finite]
    err = np.abs(got[finite] - want[finite])
    bad = np.argmax(err - bound) if err.size else 0
    assert np.all(err <= bound), (f"{what}: error {err[bad]:.3g} > bound {bound[bad]:.3g} at {want[finite][bad]!r}"
                                  f" (got {got[finite][bad]!r})")


def check32(got, want, direction, what, rel=None):
    """A float32 (or float64) output as accurate as the float32 kernels' (support.assert_close's bounds)."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern differs")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{what}: non-finite values differ")
    scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
    tol = (TOL[("float32", direction)] if rel is None else rel) * scale
    err = float(np.abs(got[finite] - want[finite]).max(initial=0.0))
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def y_slack(y, bias):
    """y = xhat * w + b is computed in float32 and rounded once: a few float32 roundings of |xhat * w| + |b|,
    which is at most |y| + 2 |b|."""
    return 8 * EPS32 * (finite_max(y) + 2 * finite_max(bias if bias is not None else [0.0]))


def finite_max(a):
    a = np.abs(np.asarray(a, np.float64))
    return float(a[np.isfinite(a)].max(initial=0.0))


# --- one op, one direction ---------------------------------------------------------------------------------------

def kshape_of(op, shape):
    return shape if SPECS[op].sets != "row" else (shape[0], int(np.prod(shape[1:])))


def params(op, kshape, rng, affine, top=None):
    """weight and bias, standard normal; the weight scaled to largest magnitude top if given."""
    if not affine:
        return None, None
    n = SPECS[op].param_shape(kshape)
    w, b = rng.standard_normal(n), rng.standard_normal(n)
    if top is not None:
        w *= top / np.abs(w).max()
    return w.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)


def run_forward(op, fmt, x, rng, affine=True, groups=1, wscale=None, threads=None):
    """The forward kernel on x (exact 16-bit values); checks y, mean, rstd; returns the kernel's outputs."""
    spec = SPECS[op]
    kshape = x.shape
    w, b = params(op, kshape, rng, affine, wscale)
    stat = spec.stat_shape(kshape, groups)
    values = {"x": x, "weight": w, "bias": b, "eps": 1e-5, "num_groups": groups, "y": np.zeros(kshape),
              "mean": np.zeros(stat), "rstd": np.zeros(stat)}
    got, want = call(op, "forward", fmt, values, threads)
    what = f"{op} forward {fmt} {kshape}"
    check16(got["y"], want["y"], fmt, 1, y_slack(want["y"], b), what + " y")
    check32(got["mean"], want["mean"], "forward", what + " mean")
    check32(got["rstd"], want["rstd"], "forward", what + " rstd", rel=1e-5 * max(1.0, 1e-2 * finite_max(want["rstd"])))
    return got, w, b


def run_backward(op, direction, fmt, dy, x, mean, rstd, w, groups=1, params_wanted=True, threads=None):
    kshape = x.shape
    pshape = SPECS[op].param_shape(kshape)
    values = {"dy": dy, "x": x, "mean": mean, "rstd": rstd, "weight": w, "num_groups": groups,
              "dx": np.zeros(kshape), "dweight": np.zeros(pshape) if params_wanted else None,
              "dbias": np.zeros(pshape) if params_wanted else None}
    got, want = call(op, direction, fmt, values, threads)
    what = f"{op} {direction} {fmt} {kshape}"
    # test_backends.dx_scale: dx is a difference of terms as large as rstd * |w * dy|
    term = finite_max(rstd) * (1.0 if w is None else finite_max(w)) * finite_max(dy)
    scale = max(1.0, finite_max(want["dx"]), 5e-3 * term)
    check16(got["dx"], want["dx"], fmt, 2, TOL[("float32", "backward")] * scale, what + " dx")
    for name in ("dweight", "dbias"):
        if params_wanted:
            check32(got[name], want[name], "backward", f"{what} {name}")
    return got


def data(kshape, fmt, rng, offset=0.0, std=1.0):
    return quantize(rng.standard_normal(kshape) * std + offset, fmt)


def roundtrip(op, fmt, kshape, rng, offset=0.0, std=1.0, groups=1, affine=True, threads=None):
    """forward and backward (and the inference directions, where the op has them) on one input."""
    x = data(kshape, fmt, rng, offset, std)
    dy = data(kshape, fmt, rng)
    fwd, w, b = run_forward(op, fmt, x, rng, affine, groups, threads=threads)
    for params_wanted in (True, False):
        run_backward(op, "backward", fmt, dy, x, fwd["mean"], fwd["rstd"], w, groups, params_wanted, threads)
    if SPECS[op].running:
        c = kshape[1]
        rm = (rng.standard_normal(c) * std + offset).astype(np.float32).astype(np.float64)
        rv = rng.uniform(0.5, 2.0, c).astype(np.float32).astype(np.float64)
        values = {"x": x, "weight": w, "bias": b, "running_mean": rm, "running_var": rv, "eps": 1e-5,
                  "y": np.zeros(kshape)}
        got, want = call(op, "forward_infer", fmt, values, threads)
        r = 1 / np.sqrt(rv + 1e-5)
        check16(got["y"], want["y"], fmt, 1, y_slack(want["y"], b), f"{op} forward_infer {fmt} {kshape} y")
        rstd = r.astype(np.float32).astype(np.float64)
        run_backward(op, "backward_infer", fmt, dy, x, rm, rstd, w, groups, True, threads)
        run_backward(op, "backward_infer", fmt, dy, x, rm, rstd, w, groups, False, threads)
    if SPECS[op].split:
        split_directions(fmt, x, dy, rng, threads)


def split_directions(fmt, x, dy, rng, threads=None):
    c = x.shape[1]
    what = f"batchnorm split {fmt} {x.shape}"
    got, stats = call("batchnorm", "stats", fmt, {"x": x, "mean": np.zeros(c), "m2": np.zeros(c)}, threads)
    check32(got["mean"], stats["mean"], "forward", what + " mean", rel=1e-12)
    check32(got["m2"], stats["m2"], "forward", what + " m2", rel=1e-12)
    sc, sh = (rng.standard_normal(c).astype(np.float32).astype(np.float64) for _ in range(2))
    got, want = call("batchnorm", "apply", fmt, {"x": x, "scale": sc, "shift": sh, "y": np.zeros(x.shape)}, threads)
    slack = 4 * EPS32 * (np.abs(x * sc[None, :, None]) + np.abs(sh[None, :, None]))
    check16(got["y"], want["y"], fmt, 1, slack, what + " apply y")
    mean, m2 = stats["mean"], stats["m2"]
    rstd = 1 / np.sqrt(m2 / (x.shape[0] * x.shape[2]) + 1e-5)
    values = {"dy": dy, "x": x, "mean": mean, "rstd": rstd, "sum_dy": np.zeros(c), "sum_dy_xhat": np.zeros(c)}
    got, want = call("batchnorm", "backward_reduce", fmt, values, threads)
    for name in ("sum_dy", "sum_dy_xhat"):
        check32(got[name], want[name], "backward", f"{what} {name}")
    a, b, d = (rng.standard_normal(c).astype(np.float32).astype(np.float64) for _ in range(3))
    values = {"dy": dy, "x": x, "a": a, "b": b, "d": d, "dx": np.zeros(x.shape)}
    got, want = call("batchnorm", "backward_apply", fmt, values, threads)
    terms = np.abs(a[None, :, None] * dy) + np.abs(b[None, :, None] * x) + np.abs(d[None, :, None])
    check16(got["dx"], want["dx"], fmt, 2, 4 * EPS32 * terms, what + " backward_apply dx")


# --- tests -------------------------------------------------------------------------------------------------------

def test_kernels_cover_every_float32_kernel():
    for op, direction, dtype, *layout in list(kernels.KERNELS):
        if dtype == "float32" and not layout:
            for fmt in FORMATS:
                assert (op, direction, fmt) in kernels.KERNELS


@pytest.mark.parametrize("fmt", FORMATS)
def test_widening_is_exact_for_every_pattern(fmt):
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = kernels._batchnorm.convert16(FORMATS.index(fmt), bits)
    want = bits.view(NUMPY[fmt]).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(want[nan]))


def _narrowing_inputs():
    """Every 16-bit value, the midpoints between neighbours (ties), and the float32 values just beside them,
    float32's extremes and subnormals, and random bit patterns."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, 65536, 1e38, 3.4028235e38, 1e-45,
                        2 ** -25, 2 ** -24, 2 ** -14, 5.9604645e-08, 2.9802322e-08, 1.1754942e-38], np.float32)
    parts = [special, -special, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32).view(np.float32)]
    for fmt in FORMATS:
        with np.errstate(invalid="ignore"):  # the NaN patterns
            v = np.arange(1 << 16, dtype=np.uint16).view(NUMPY[fmt]).astype(np.float64)
        v = np.sort(v[np.isfinite(v)])
        mid = ((v[1:] + v[:-1]) / 2).astype(np.float32)  # exact in float32 for both formats
        parts += [v.astype(np.float32), mid, np.nextafter(mid, np.float32(np.inf)),
                  np.nextafter(mid, np.float32(-np.inf))]
    return np.concatenate(parts)


@pytest.mark.parametrize("fmt", FORMATS)
def test_narrowing_rounds_to_nearest_even_for_every_kind_of_value(fmt):
    f = _narrowing_inputs()
    got = kernels._batchnorm.convert16(FORMATS.index(fmt), f)
    with np.errstate(invalid="ignore", over="ignore"):
        want = f.astype(NUMPY[fmt]).view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    back = got[nan].view(NUMPY[fmt]).astype(np.float32)
    assert np.isnan(back).all()
    np.testing.assert_array_equal(np.signbit(back), np.signbit(f[nan]))
    quiet = 0x0040 if fmt == "bfloat16" else 0x0200
    assert (got[nan] & quiet).all(), "a NaN narrows to a quiet NaN"


OPS = ("batchnorm", "instancenorm", "groupnorm", "layernorm")


@st.composite
def cases(draw, op):
    if op == "layernorm":
        kshape = (draw(st.integers(1, 9)), draw(st.sampled_from([1, 2, 7, 31, 33, 100, 1023, 1025, 2100])))
    else:
        c = draw(st.sampled_from([1, 2, 3, 8, 33]))
        kshape = (draw(st.integers(1, 6)), c, draw(st.sampled_from([1, 2, 5, 17, 31, 32, 33, 64, 1030])))
    groups = draw(st.sampled_from([d for d in range(1, kshape[1] + 1) if kshape[1] % d == 0])) \
        if op == "groupnorm" else 1
    return kshape, groups, draw(st.sampled_from([True, False]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_matches_reference(op, fmt, data):
    kshape, groups, affine = data.draw(cases(op))
    roundtrip(op, fmt, kshape, np.random.default_rng(sum(kshape)), groups=groups, affine=affine)


# each side of every schedule switch (test_cython.SCHEDULE_CASES; BatchNorm's columns from a batch of S / 2, 20 for
# S = 40, in the 16-bit forward and of S, 40, in its backward; _batchnorm.SHORT_ROW16, _layernorm's 16-bit
# TILED_ROW), in kernel shapes; (20, 70000): LayerNorm's long rows in several groups (on two threads or more), the
# parameter gradients' flush after row 16 inside one; BatchNorm's rows of at most 8 values summed k at a time (k =
# 16 for 1 value, 7 rows left over; 6 for 3, 5 left; 2 for 8, from 1024 rows); the column sums' steps of
# registers (rows of 127 and 128 values, as in test_cython.SCHEDULE_CASES), and from 8 MiB of data whole rows of
# up to 1024 values (rows of 200; (20972, 200, 1) is 8 MiB and 192 bytes); whole-column tasks of 1023 columns
# from 2 MiB where the build converts in registers ((100, 3500, 3), the last task 270 columns) and of 255 below
# ((100, 3490, 3))
SCHEDULE_CASES = [
    ("batchnorm", (8199, 1, 1), 1), ("batchnorm", (3077, 1, 3), 1), ("batchnorm", (1023, 8, 1), 1),
    ("batchnorm", (1025, 8, 1), 1), ("batchnorm", (70, 127, 1), 1), ("batchnorm", (70, 128, 1), 1),
    ("batchnorm", (7, 33, 31), 1), ("batchnorm", (9, 31, 32), 1), ("batchnorm", (5, 32, 32), 1),
    ("batchnorm", (6, 40, 3), 1), ("batchnorm", (1025, 3, 1), 1), ("batchnorm", (300, 700, 1), 1),
    ("batchnorm", (3, 40, 1100), 1), ("layernorm", (3, 65536), 1), ("layernorm", (3, 65537), 1),
    ("layernorm", (16, 16385), 1), ("layernorm", (17, 16385), 1), ("layernorm", (2, 100000), 1),
    ("layernorm", (130, 33), 1), ("groupnorm", (3, 6, 1), 3), ("groupnorm", (2, 8, 1500), 2),
    ("instancenorm", (2, 3, 2049), 1), ("batchnorm", (3, 5, 127), 1), ("batchnorm", (3, 5, 128), 1),
    ("instancenorm", (2, 40, 127), 1), ("layernorm", (20, 70000), 1), ("batchnorm", (40, 32, 40), 1),
    ("batchnorm", (39, 32, 40), 1), ("batchnorm", (20, 32, 40), 1), ("batchnorm", (19, 32, 40), 1),
    ("batchnorm", (20972, 200, 1), 1), ("batchnorm", (100, 3500, 3), 1), ("batchnorm", (100, 3490, 3), 1),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op,kshape,groups", SCHEDULE_CASES, ids=str)
def test_schedule_boundaries(op, kshape, groups, fmt, rng):
    roundtrip(op, fmt, kshape, rng, groups=groups)


@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (4, 40, 50), 1), ("batchnorm", (64, 5, 3), 1),
                                              ("instancenorm", (3, 4, 300), 1), ("groupnorm", (3, 8, 70), 4),
                                              ("layernorm", (5, 3000), 1)], ids=str)
@pytest.mark.parametrize("offset", [1e4, -3e3])
def test_large_offset_float16(op, kshape, groups, offset, rng):
    """mean 1e4, std 1 in float16 (spacing 8 there): the shifted statistics keep y and dx accurate."""
    roundtrip(op, "float16", kshape, rng, offset=offset, groups=groups)


@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (4, 40, 50), 1), ("batchnorm", (64, 5, 3), 1),
                                              ("layernorm", (5, 3000), 1)], ids=str)
def test_large_offset_bfloat16(op, kshape, groups, rng):
    roundtrip(op, "bfloat16", kshape, rng, offset=1e6, std=3e4, groups=groups)


@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (4, 40, 50), 1), ("batchnorm", (64, 5, 3), 1),
                                              ("batchnorm", (70, 37, 1), 1), ("instancenorm", (3, 4, 300), 1),
                                              ("groupnorm", (3, 8, 70), 4), ("layernorm", (5, 3000), 1)], ids=str)
def test_bfloat16_squares_beyond_float32(op, kshape, groups, rng):
    """bfloat16 data of std 1e25: (x - pivot)**2 overflows float32, so the statistics' float32 chunk sums do; those
    chunks must be summed again in double (the variance, 1e50, is a double)."""
    roundtrip(op, "bfloat16", kshape, rng, std=1e25, groups=groups)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (3, 4, 40), 1), ("batchnorm", (30, 6, 2), 1),
                                              ("groupnorm", (2, 4, 9), 2), ("layernorm", (4, 50), 1)], ids=str)
def test_constant_input_gives_bias_exactly(op, kshape, groups, fmt, rng):
    x = np.full(kshape, quantize(1234.5, fmt))
    got, _, b = run_forward(op, fmt, x, rng, True, groups)
    bias = b[None, :, None] if SPECS[op].sets != "row" else b[None, :]
    np.testing.assert_array_equal(got["y"], np.broadcast_to(quantize(bias, fmt), kshape))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (3, 40, 40), 1), ("batchnorm", (30, 6, 2), 1),
                                              ("groupnorm", (2, 4, 9), 2), ("layernorm", (4, 50), 1)], ids=str)
def test_outputs_beyond_the_range_overflow_to_inf(op, kshape, groups, fmt, rng):
    """A weight that carries y past the format's largest value gives +-inf (float16: beyond 65504; bfloat16:
    float32's range), as the reference rounded once. For float16 dx likewise, through a large weight and dy;
    bfloat16's dx cannot overflow its range without overflowing the float32 arithmetic (PyTorch's too) first."""
    top = {"float16": 1e5, "bfloat16": 3e38}[fmt]
    x = data(kshape, fmt, rng, std=4.0)  # rstd * weight (a float32 factor of y) stays in float32's range
    fwd, w, _ = run_forward(op, fmt, x, rng, True, groups, wscale=top)
    assert np.isinf(fwd["y"]).any() and np.isfinite(fwd["y"]).any()
    if fmt == "float16":
        dy = quantize(rng.standard_normal(kshape) * 3e4, fmt)
        got = run_backward(op, "backward", fmt, dy, x, fwd["mean"], fwd["rstd"], w, groups, params_wanted=False)
        assert np.isinf(got["dx"]).any()


@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (4, 3, 33), 1), ("batchnorm", (40, 6, 2), 1),
                                              ("batchnorm", (2, 40, 40), 1), ("instancenorm", (2, 3, 65), 1),
                                              ("groupnorm", (2, 6, 35), 3), ("layernorm", (4, 129), 1)], ids=str)
def test_bfloat16_results_near_the_top_of_the_range(op, kshape, groups, rng):
    """Weights of 1e38 (the conformance kit's overflow data): terms of y and dx that overflow float32 while the
    result does not must not turn it into inf or NaN (check16 compares the non-finite values exactly)."""
    x = data(kshape, "bfloat16", rng)
    w = (1e38 * (1 + 0.5 * rng.standard_normal(SPECS[op].param_shape(kshape)))).astype(np.float32).astype(float)
    stat = SPECS[op].stat_shape(kshape, groups)
    values = {"x": x, "weight": w, "bias": None, "eps": 1e-5, "num_groups": groups, "y": np.zeros(kshape),
              "mean": np.zeros(stat), "rstd": np.zeros(stat)}
    got, want = call(op, "forward", "bfloat16", values)
    check16(got["y"], want["y"], "bfloat16", 1, y_slack(want["y"], None), f"{op} forward y")
    for dy in (data(kshape, "bfloat16", rng), data(kshape, "bfloat16", rng) * 3):
        run_backward(op, "backward", "bfloat16", quantize(dy, "bfloat16"), x, got["mean"], got["rstd"], w, groups)
        if SPECS[op].running:
            run_backward(op, "backward_infer", "bfloat16", quantize(dy, "bfloat16"), x, np.zeros(kshape[1]),
                         np.ones(kshape[1]), w, groups)


@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (4, 3, 33), 1), ("batchnorm", (4, 40, 200), 1),
                                              ("batchnorm", (64, 5, 1), 1), ("batchnorm", (4, 5, 130), 1),
                                              ("instancenorm", (2, 3, 65), 1),
                                              ("groupnorm", (2, 6, 35), 3), ("layernorm", (4, 129), 1)],
                         ids=str)
def test_bfloat16_dx_whose_float32_terms_overflow(op, kshape, groups, rng):
    """rstd * weight beyond float32's range (rstd ~100, weights of 1e38) with a small dy: y and dx are finite, but
    the float32 passes give inf; those runs must be redone in double from double coefficients, not stored (BatchNorm's
    columns, per-run and channels schedules, training directions). (RMSNorm's dx pass is LayerNorm's.)"""
    x = data(kshape, "bfloat16", rng, std=0.01)
    fwd, w, _ = run_forward(op, "bfloat16", x, rng, True, groups, wscale=1e38)
    assert float(np.min(fwd["rstd"])) * float(np.max(np.abs(w))) > float(np.finfo(np.float32).max)
    dy = data(kshape, "bfloat16", rng, std=1e-6)
    got = run_backward(op, "backward", "bfloat16", dy, x, fwd["mean"], fwd["rstd"], w, groups)
    assert np.isfinite(got["dx"]).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op,kshape,groups", [("batchnorm", (3, 40, 40), 1), ("batchnorm", (30, 6, 2), 1),
                                              ("batchnorm", (3, 4, 40), 1), ("instancenorm", (2, 3, 5), 1),
                                              ("groupnorm", (2, 4, 9), 2), ("layernorm", (4, 50), 1)], ids=str)
def test_nan_inf_propagate(op, kshape, groups, bad, fmt, rng):
    x = data(kshape, fmt, rng)
    x[(0,) * x.ndim] = bad
    dy = data(kshape, fmt, rng)
    dy[(-1,) * x.ndim] = bad
    fwd, w, _ = run_forward(op, fmt, x, rng, True, groups)
    assert np.isnan(fwd["y"]).any()
    run_backward(op, "backward", fmt, dy, x, fwd["mean"], fwd["rstd"], w, groups)
    if SPECS[op].split:
        split_directions(fmt, x, dy, rng)


THREAD_CASES = [("batchnorm", (8, 40, 33), 1), ("batchnorm", (8, 5, 40), 1), ("batchnorm", (300, 70, 3), 1),
                ("batchnorm", (600, 20, 1), 1), ("batchnorm", (100, 3500, 3), 1), ("groupnorm", (4, 16, 33), 4),
                ("instancenorm", (4, 6, 100), 1), ("layernorm", (70, 300), 1), ("layernorm", (3, 70000), 1),
                ("rmsnorm", (70, 1100), 1), ("rmsnorm", (3, 70000), 1)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op,kshape,groups", THREAD_CASES, ids=str)
def test_thread_count_independent(op, kshape, groups, fmt, rng):
    x = data(kshape, fmt, rng, 3.0, 2.0).astype(NUMPY[fmt]).view(np.uint16)
    dy = data(kshape, fmt, rng).astype(NUMPY[fmt]).view(np.uint16)
    spec = SPECS[op]
    pshape = spec.param_shape(kshape)
    w, b = (rng.standard_normal(pshape).astype(np.float32) for _ in range(2))
    runs = []
    for threads in (1, 2, 3, 1):
        kernels.set_num_threads(threads)
        try:
            outs = {}
            for direction in spec.directions:
                # the act directions' 16-bit kernels are their float32 ones on widened copies
                if (op, direction) in kernels._FUNCTIONS and not direction.startswith("act_"):
                    outs.update(_run_any(op, direction, fmt, x, dy, w, b, groups))
        finally:
            kernels.set_num_threads(_THREADS)
        runs.append(outs)
    for other in runs[1:]:
        for name, value in runs[0].items():
            np.testing.assert_array_equal(other[name], value, err_msg=f"{op} {name} depends on the thread count")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s", [5, 16, 17, 49, 100])
def test_elementwise_passes_in_place(s, fmt, rng):
    """The 16-bit elementwise passes end a run of 16 or more values with a step over its last 16 values, which
    recomputes some outputs from their inputs: not when the output overlaps an input (then through buffers). The
    split directions written in place (y over x, dx over dy) give what they give out of place."""
    kshape = (3, 40, s)
    x = data(kshape, fmt, rng, 3.0, 2.0).astype(NUMPY[fmt]).view(np.uint16)
    dy = data(kshape, fmt, rng).astype(NUMPY[fmt]).view(np.uint16)
    scale, shift, d = (rng.standard_normal(40).astype(np.float32) for _ in range(3))
    y, dx = np.zeros_like(x), np.zeros_like(x)
    kernels.KERNELS[("batchnorm", "apply", fmt)](x, scale, shift, y)
    kernels.KERNELS[("batchnorm", "backward_apply", fmt)](dy, x, scale, shift, d, dx)
    inplace = x.copy()
    kernels.KERNELS[("batchnorm", "apply", fmt)](inplace, scale, shift, inplace)
    np.testing.assert_array_equal(inplace, y)
    inplace = dy.copy()
    kernels.KERNELS[("batchnorm", "backward_apply", fmt)](inplace, x, scale, shift, d, inplace)
    np.testing.assert_array_equal(inplace, dx)


def _run_any(op, direction, fmt, x, dy, w, b, groups):
    """One direction on fixed inputs; returns its outputs by '<direction> <name>'."""
    spec = SPECS[op]
    kshape = x.shape
    c = kshape[1]
    stat = spec.stat_shape(kshape, groups, training=direction in ("forward", "backward"))
    arrays = {"x": x, "dy": dy, "residual": dy, "h": x, "dh": dy, "weight": w, "bias": b, "eps": 1e-5,
              "num_groups": groups,
              "mean": np.full(stat, 3.0, np.float32), "rstd": np.full(stat, 0.5, np.float32),
              "running_mean": np.full(c, 3.0, np.float32), "running_var": np.full(c, 4.0, np.float32),
              "scale": w[:c], "shift": b[:c], "a": w[:c], "b": b[:c], "d": w[:c]}
    if direction == "stats":
        arrays["mean"] = np.zeros(c)
    if direction == "backward_reduce":
        arrays["mean"], arrays["rstd"] = np.full(c, 3.0), np.full(c, 0.5)
    outs = {}
    for name in OUTPUTS[direction]:
        if name in ("y", "dx", "h"):
            arrays[name] = np.zeros(kshape, np.uint16)
        elif name in ("dweight", "dbias"):
            arrays[name] = np.zeros(spec.param_shape(kshape), np.float32)
        else:
            arrays[name] = np.zeros(stat, arg_dtype(direction, name, "float32"))
        outs[f"{direction} {name}"] = arrays[name]
    kernels.KERNELS[(op, direction, fmt)](*(arrays.get(n) for n in spec.args(direction)))
    return outs


def test_channels_last_16_bit_kernels_conform():
    """The 16-bit channels-last kernels (GroupNorm and InstanceNorm with and without a fused activation, BatchNorm's
    on the columns view) through the conformance kit; here so that the baseline-build subprocess below runs them
    too."""
    report = normkit.testing.check_backend("cython", dtypes=["bfloat16", "float16"], layouts=["nhwc"], quick=True)
    assert report == [], report.format()
    assert report.cases_run > 100


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") not in ("", "0"), reason="already the subprocess")
def test_baseline_build_with_portable_float16_conversion():
    """This module again on the baseline build (any x86-64 CPU) with float16 converted in software, as on a CPU
    without F16C."""
    env = dict(os.environ, NORMKIT_CYTHON_BASELINE="1", NORMKIT_CYTHON_NO_F16C="1")
    check = "import normkit_kernels.cython.kernels as k; print(k.INFO['modules'], k.INFO['float16 conversion'])"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, cwd=REPO, check=False)
    assert out.stdout.split() == ["normkit_kernels.cython", "portable"], out.stderr
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    out = subprocess.run([sys.executable, *safe_path, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=1800, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
