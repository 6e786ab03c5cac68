"""16-bit kernels whose per-set coefficients leave float32's range while the results do not: bfloat16 data of std
0.01 (rstd ~100) with weights of 1e38, so rstd * weight (a factor of y and dx) is ~1e40. The compiled backends
compute 16-bit data in float32; each must still give the float64 reference rounded once (1 ulp for y, 2 for dx,
the same non-finite values), in every direction that takes a weight: Cython redoes such runs in double, Numba
the whole call through its float64 kernel (src/normkit_kernels/numba/kernels.py, COEF_LIMIT)."""

from __future__ import annotations

import numpy as np
import pytest

from normkit import half, reference
from normkit.contract import ACT_PREFIX, CHANNEL_OPS, DATA_ARGS, NHWC, OUTPUTS, SPECS

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
SHAPES = {"batchnorm": (4, 5, 33), "instancenorm": (2, 3, 65), "groupnorm": (2, 6, 35), "layernorm": (4, 129),
          "rmsnorm": (4, 129)}
# Cython's BatchNorm on short rows in whole-column tasks (S < 32, four or more tasks of 256 // S channels): the
# tasks past the first index their channels' double coefficients from an offset
WHOLE_COLUMNS = (6, 300, 3)
GROUPS = 3
CASES = [(op, d) for op in SHAPES for d in SPECS[op].directions if "weight" in SPECS[op].args(d)]


@pytest.fixture(params=["numba", "cython"])
def kernels(request):
    return pytest.importorskip(f"normkit_kernels.{request.param}.kernels")


def _inputs(op, direction, rng, shape):
    spec = SPECS[op]
    pshape = spec.param_shape(shape)
    data = {name: (rng.standard_normal(shape) * std).astype(BF16)
            for name, std in (("x", 0.01), ("residual", 0.001), ("dy", 1e-6), ("dh", 1e-6))}
    data["h"] = data["x"]
    v = {**data, "weight": (1e38 * (1 + 0.5 * np.abs(rng.standard_normal(pshape)))).astype(np.float32),
         "bias": (rng.standard_normal(pshape)).astype(np.float32), "eps": 1e-5, "num_groups": GROUPS,
         "activation": 2, "slope": 0.01,  # silu: neither zero nor the identity on either side
         "running_mean": (0.001 * rng.standard_normal(pshape)).astype(np.float32),
         "running_var": np.full(pshape, 1e-4, np.float32)}
    if "rstd" in spec.args(direction) and "rstd" not in OUTPUTS[direction]:
        # the statistics a forward pass gives (the running ones, as rstd, for the inference backward)
        if direction.endswith("_infer"):
            v["mean"] = v["running_mean"]
            v["rstd"] = (1 / np.sqrt(v["running_var"].astype(np.float64) + 1e-5)).astype(np.float32)
        else:
            names = spec.args("forward")
            stat = spec.stat_shape(shape, GROUPS)
            out = {"y": np.zeros(shape), "mean": np.zeros(stat), "rstd": np.zeros(stat)}
            wide = {k: a.astype(np.float64) if isinstance(a, np.ndarray) else a for k, a in v.items()}
            reference.KERNELS[(op, "forward", "float64")](*(out.get(n, wide.get(n)) for n in names))
            v["mean"], v["rstd"] = out["mean"].astype(np.float32), out["rstd"].astype(np.float32)
    return v


def _run(kernel, op, direction, v, dtype, shape):
    """Call ``kernel`` with ``v`` (16-bit data as bit patterns for dtype "bfloat16", every array widened to float64
    for "float64"); the outputs, as float64."""
    spec = SPECS[op]
    stat = spec.stat_shape(shape, GROUPS)
    args, outs = [], {}
    for name in spec.args(direction):
        a = v.get(name)
        if name in OUTPUTS[direction]:
            shp = shape if name in DATA_ARGS else stat if name in ("mean", "rstd") else spec.param_shape(shape)
            a = np.zeros(shp, np.float64 if dtype == "float64" else np.uint16 if name in DATA_ARGS else np.float32)
            outs[name] = a
        elif isinstance(a, np.ndarray):
            a = a.astype(np.float64) if dtype == "float64" else a.view(np.uint16) if a.dtype == BF16 else a
        args.append(a)
    with np.errstate(all="ignore"):
        kernel(*args)
    return {k: a.view(BF16).astype(np.float64) if a.dtype == np.uint16 else a.astype(np.float64)
            for k, a in outs.items()}


@pytest.mark.parametrize("op,direction", CASES, ids="-".join)
def test_bfloat16_results_whose_coefficients_overflow_float32(kernels, op, direction):
    _check(kernels.KERNELS[(op, direction, "bfloat16")], op, direction)


@pytest.mark.parametrize("direction", [d for op, d in CASES if op == "batchnorm"])
def test_bfloat16_batchnorm_whole_column_tasks_whose_coefficients_overflow_float32(kernels, direction):
    _check(kernels.KERNELS[("batchnorm", direction, "bfloat16")], "batchnorm", direction, WHOLE_COLUMNS)


@pytest.mark.parametrize("op,direction", [(op, d) for op, d in CASES if op in CHANNEL_OPS and not
                                          d.startswith(ACT_PREFIX)], ids="-".join)
def test_bfloat16_channels_last_results_whose_coefficients_overflow_float32(op, direction):
    """The same for Cython's 16-bit channels-last kernels (no other backend has them), given (N, S, C) copies of the
    data."""
    kernel = pytest.importorskip("normkit_kernels.cython.kernels").KERNELS[(op, direction, "bfloat16", NHWC)]
    names, outputs = SPECS[op].args(direction), OUTPUTS[direction]

    def nchw(*args):
        nsc = [np.ascontiguousarray(a.transpose(0, 2, 1)) if n in DATA_ARGS and a is not None else a
               for n, a in zip(names, args)]
        kernel(*nsc)
        for n, a, t in zip(names, args, nsc):
            if n in outputs and n in DATA_ARGS:
                a[...] = t.transpose(0, 2, 1)

    _check(nchw, op, direction)


def _check(kernel, op, direction, shape=None):
    shape = shape or SHAPES[op]
    v = _inputs(op, direction, np.random.default_rng(0), shape)
    if "rstd" in v:
        assert float(np.max(v["rstd"])) * float(np.min(np.abs(v["weight"]))) > float(np.finfo(np.float32).max)
    got = _run(kernel, op, direction, v, "bfloat16", shape)
    if direction == "add_forward":  # the kernel normalizes h = x + residual rounded to bfloat16 (the contract)
        h = half.rounded_sum(v["x"].astype(np.float64), v["residual"].astype(np.float64), "bfloat16")
        v = {**v, "x": h.astype(BF16), "residual": np.zeros(shape, BF16)}
    want = _run(reference.KERNELS[(op, direction, "float64")], op, direction, v, "float64", shape)
    for name in got.keys() & {"y", "dx", "h"}:
        with np.errstate(over="ignore"):
            rounded = want[name].astype(np.float32).astype(BF16).astype(np.float64)
        what = f"{op} {direction} {name}"
        finite = np.isfinite(rounded)
        np.testing.assert_array_equal(got[name][~finite], rounded[~finite], err_msg=f"{what}: non-finite values")
        assert np.isfinite(got[name][finite]).all(), f"{what}: inf or NaN where the rounded result is finite"
        ulps = 2 if name == "dx" else 1
        err = np.abs(got[name] - want[name])[finite]
        assert np.all(err <= ulps * half.ulp(want[name][finite], "bfloat16")), f"{what}: beyond {ulps} ulp"
