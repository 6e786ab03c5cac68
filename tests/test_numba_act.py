"""The Numba backend's fused-activation kernels (normkit.contract, "Fused activation"), called directly, against the
float64 reference (the plain reference kernel composed with normkit.activation's functions) on small awkward
shapes: every act_ direction x activation x dtype (float32, float64, and bfloat16, whose act kernels are the float32
ones through normkit.half.through); plus results independent of the thread count.

Tolerances are the conformance kit's for the plain direction (normkit.testing, float32's eps for bfloat16), carried
through the activation:

- forward: ``y = act(z)`` with the kit's bound on z times act's Lipschitz constant (at most 1.2 for the five), plus
  K(1) eps (|y| + |z|) for evaluating act, plus 1 ulp of y for a 16-bit y.
- backward: the kit's bounds with ``g = dy * act'(z)`` in place of dy, plus the error of g propagated through the
  (linear in g) formulas: per element ``dg = |dy| (D2 dz + K(1) eps |act'(z)|)``, where dz = K(1) eps (|w| (1 +
  kappa)(1 + |xhat|) + |b|) bounds the recomputed z's error and D2 >= |act''| (1 for the smooth ones). relu's and
  leaky_relu's derivative jumps at 0: an element whose exact z is within dz of 0 may take either side, so its dg
  is the whole jump |dy| |1 - slope| (and the set's dx take it through the means), which keeps the test robust to
  data that lands next to a kink.

numba compiles the act_ element loops once per activation and dtype (then caches them on disk), whatever the
shape: the shapes and data kinds cost run time only.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from normkit import activation, half, reference  # noqa: E402
from normkit.contract import ACTIVATIONS, HALF_DTYPES, SPECS, plain_direction  # noqa: E402
from normkit.testing import Case, _f64, _inputs, _working_tolerances, tolerance_factor  # noqa: E402

K = pytest.importorskip("normkit_kernels.numba.kernels")

ACT_DIRECTIONS = [(op, d) for op, s in SPECS.items() for d in s.directions if d.startswith("act_")]
DTYPES = ("float32", "float64", "bfloat16")
# (N, C, S) / (M, K) and groups: N = 1, C = 1, groups = C and groups = 1, runs not a multiple of the vector width,
# S = 1 ((N, C) input); BatchNorm on (n, c) rows (N = 1) and on the flattened view (batchnorm._act_flat_view: S
# below WIDE_S, S = 17 with N >= S, and S = 19 from a batch of ACT_FLAT_N)
SHAPES = {
    "channel": [((1, 3, 37), None), ((20, 1, 17), None), ((5, 2, 19), None), ((9, 4, 1), None)],
    "instance": [((1, 3, 37), None), ((2, 1, 19), None), ((3, 2, 1), None)],
    "group": [((2, 6, 13), 3), ((1, 6, 5), 6), ((3, 1, 9), 1)],
    "row": [((1, 37), None), ((6, 19), None), ((9, 1), None)],
}
DATA = ("normal", "offset1e4", "constant")
SLOPE = 0.2
LIPSCHITZ = 1.2  # max |act'| of the five activations (gelu's is 1.13; leaky_relu's max(1, |slope|))
D2 = {"relu": 0.0, "leaky_relu": 0.0, "silu": 1.0, "gelu": 1.0, "gelu_tanh": 1.0}  # >= max |act''|


def _cases(op, direction):
    spec = SPECS[op]
    plain = plain_direction(direction)
    for i, (shape, groups) in enumerate(SHAPES[spec.sets]):
        if spec.running and plain in ("forward", "backward") and spec.set_size(shape) == 1:
            continue  # training statistics of one value: no frontend makes this call
        for data in DATA:
            affine = "weight+bias" if (i + DATA.index(data)) % 3 else "none"
            yield shape, groups, affine, data


def _run(op, direction, dtype, act, inputs, case):
    """The kernel's outputs (in float64) for the plain case's inputs."""
    spec = SPECS[op]
    outs = {}
    for name in spec.outputs(direction):
        like = {"y": case.shape, "dx": case.shape, "mean": spec.stat_shape(case.shape, case.groups),
                "rstd": spec.stat_shape(case.shape, case.groups)}.get(name, spec.param_shape(case.shape))
        wanted = name not in ("dweight", "dbias") or inputs[{"dweight": "weight", "dbias": "bias"}[name]] is not None
        store = np.uint16 if dtype in HALF_DTYPES and name in ("y", "dx") else (
            np.float32 if dtype in HALF_DTYPES else dtype)
        outs[name] = np.full(like, 0x7FC1 if store == np.uint16 else np.nan, store) if wanted else None
    values = {**inputs, **outs, "eps": case.eps, "num_groups": case.groups, "activation": ACTIVATIONS.index(act),
              "slope": SLOPE}
    K.KERNELS[(op, direction, dtype)](*spec.kernel_args(direction, values))
    return {k: _f64(case, k, v) for k, v in outs.items() if v is not None}


def _expected(op, direction, act, case, f64, like):
    """The reference's outputs (float64) of the shapes of ``like``'s."""
    spec = SPECS[op]
    outs = {name: np.empty(v.shape) for name, v in like.items()}
    values = {**f64, **outs, "eps": case.eps, "num_groups": case.groups, "activation": ACTIVATIONS.index(act),
              "slope": SLOPE}
    with np.errstate(all="ignore"):
        reference.KERNELS[(op, direction, "float64")](*spec.kernel_args(direction, values))
    return outs


def _set_mean(spec, case, a):
    """Per-element mean of a over its normalized set."""
    return spec.per_element(spec.as_sets(a, case.groups).mean(axis=-1), case.shape)


def _tolerances(op, direction, act, case, f64, expected):
    spec = SPECS[op]
    plain = plain_direction(direction)
    work = "float32" if case.dtype in HALF_DTYPES else case.dtype
    eps = float(np.finfo(work).eps)
    k1 = tolerance_factor(1) * eps
    kit = Case(op, plain, work, case.shape, case.groups, case.affine, case.data, case.eps)  # f64 values as inputs
    a = ACTIVATIONS.index(act)
    if "forward" in plain:
        plain_out = {k: np.empty(v.shape) for k, v in expected.items()}
        with np.errstate(all="ignore"):
            reference.KERNELS[(op, plain, "float64")](*spec.kernel_args(plain, {
                **f64, **plain_out, "eps": case.eps, "num_groups": case.groups}))
        z = plain_out["y"]
        tol = _working_tolerances(kit, f64, plain_out)
        tol["y"] = LIPSCHITZ * tol["y"] + k1 * (np.abs(expected["y"]) + np.abs(z))
        if case.dtype in HALF_DTYPES:
            tol["y"] = tol["y"] + half.ulp(expected["y"], case.dtype)
        return tol
    x, dy = f64["x"], f64["dy"]
    ones = np.ones(spec.param_shape(case.shape))
    w = spec.per_param(np.abs(f64["weight"]) if f64["weight"] is not None else ones)
    b = spec.per_param(np.abs(f64["bias"]) if f64["bias"] is not None else 0 * ones)
    per = (lambda s: s[None, :, None]) if plain == "backward_infer" else (lambda s: spec.per_element(s, case.shape))
    mean, rstd = per(f64["mean"]), per(f64["rstd"])
    xhat = (x - mean) * rstd
    z = xhat * (spec.per_param(f64["weight"]) if f64["weight"] is not None else 1.0) + (
        spec.per_param(f64["bias"]) if f64["bias"] is not None else 0.0)
    dz = k1 * (w * (1 + (np.abs(x) + np.abs(mean)) * rstd) * (1 + np.abs(xhat)) + b)
    d1 = activation.derivative(a, z, SLOPE)
    dg = np.abs(dy) * (D2[act] * dz + k1 * np.abs(d1))
    if act in ("relu", "leaky_relu"):
        jump = 1.0 - (SLOPE if act == "leaky_relu" else 0.0)
        dg = dg + np.where(np.abs(z) <= dz, np.abs(dy) * jump, 0.0)
    g = dy * d1
    tol = _working_tolerances(kit, {**f64, "dy": g}, expected)
    if plain == "backward":
        wdg = w * dg
        tol["dx"] = tol["dx"] + rstd * (wdg + _set_mean(spec, case, wdg) + np.abs(xhat) * _set_mean(
            spec, case, wdg * np.abs(xhat)))
    else:
        tol["dx"] = tol["dx"] + rstd * w * dg
    axes = spec.param_axes()
    tol["dweight"] = tol["dweight"] + np.sum(dg * np.abs(xhat), axis=axes)
    tol["dbias"] = tol["dbias"] + np.sum(dg, axis=axes)
    if case.dtype in HALF_DTYPES:
        tol["dx"] = tol["dx"] + 2 * half.ulp(expected["dx"], case.dtype)
    return tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("op, direction", ACT_DIRECTIONS)
def test_act_kernel_matches_reference(op, direction, act, dtype):
    plain = plain_direction(direction)
    for shape, groups, affine, data in _cases(op, direction):
        case = Case(op, plain, dtype, shape, groups, affine, data, 1e-5)
        inputs = _inputs(case)
        f64 = {k: _f64(case, k, v) for k, v in inputs.items()}
        got = _run(op, direction, dtype, act, inputs, case)
        expected = _expected(op, direction, act, case, f64, got)
        tol = _tolerances(op, direction, act, case, f64, expected)
        for name, value in got.items():
            err = np.abs(value - expected[name])
            bad = ~(err <= tol[name])
            assert not bad.any(), (f"{op} {direction} {act} {dtype} shape={shape} groups={groups} {affine} {data}: "
                                   f"{name} off by {err[bad].max():.3g} > {tol[name][bad].min():.3g} at "
                                   f"{np.argwhere(bad)[0].tolist()} ({bad.sum()} of {bad.size})")


# shapes that the kernels cut into pieces (few sets, long runs), so that two threads take different pieces
THREAD_SHAPES = {"channel": ((1, 2, 9000), None), "instance": ((1, 2, 9000), None), "group": ((1, 4, 5000), 2),
                 "row": ((2, 20000), None)}


@pytest.mark.parametrize("act", ("relu", "silu"))
@pytest.mark.parametrize("op, direction", ACT_DIRECTIONS)
def test_act_kernel_results_do_not_depend_on_thread_count(op, direction, act):
    shape, groups = THREAD_SHAPES[SPECS[op].sets]
    case = Case(op, plain_direction(direction), "float32", shape, groups, "weight+bias", "normal", 1e-5)
    inputs = _inputs(case)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            K.set_num_threads(threads)
            results.append(_run(op, direction, "float32", act, inputs, case))
    finally:
        K.set_num_threads(before)
    for name, value in results[0].items():
        assert np.array_equal(value, results[1][name], equal_nan=True), f"{op} {direction} {act}: {name}"
