"""The numba channels-last kernels (the backend's ``(op, direction, dtype, "nhwc")`` kernels of both dtypes:
channels_last.NHWC's, and the per-channel NCHW kernels on the (N*S, C, 1) view), called directly on C-contiguous
(N, S, C) data, against the float64 reference kernels run on the NCHW-transposed copy of the same values.

Hypothesis draws small shapes (N=1, S=1, C=1, groups=C, C not a multiple of the vector width), large offsets,
constant sets and NaN/inf; fixed larger shapes take the parallel schedules (row blocks, tiles of whole rows, whole
channels per task, one sample per task, samples cut into pieces). Results must not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import assert_close

import normkit
from normkit import reference
from normkit.contract import OUTPUTS, SPECS, arg_dtype

pytest.importorskip("numba")
from normkit_kernels.numba.kernels import KERNELS  # noqa: E402

# the directions that have channels-last kernels (the fused activations have none)
DIRECTIONS = {op: tuple(d for d in SPECS[op].directions if (op, d, "float64", "nhwc") in KERNELS)
              for op in ("batchnorm", "instancenorm", "groupnorm")}
EPS = 1e-5


def _nchw(a):
    """(N, S, C) -> float64 (N, C, S) copy for the reference."""
    return np.ascontiguousarray(a.transpose(0, 2, 1), np.float64)


def _inputs(op, direction, x, dy, groups, affine, rng):
    """Every argument of the kernel that is an input, in the kernel's dtypes (per-set arrays from the reference
    forward, as a frontend would hand them over)."""
    dtype = x.dtype
    N, S, C = x.shape
    spec = SPECS[op]
    v = {"x": x, "dy": dy, "eps": EPS, "num_groups": groups, "weight": None, "bias": None}
    if affine in ("weight", "both"):
        v["weight"] = rng.standard_normal(C).astype(dtype)
    if affine in ("bias", "both"):
        v["bias"] = rng.standard_normal(C).astype(dtype)
    v["running_mean"] = rng.standard_normal(C).astype(dtype)
    v["running_var"] = rng.uniform(0.5, 2.0, C).astype(dtype)
    if direction == "backward":
        shape = spec.stat_shape((N, C, S), groups)
        mean, rstd = np.empty(shape), np.empty(shape)
        fwd = reference.KERNELS[(op, "forward", "float64")]
        args = {"x": _nchw(x), "y": np.empty((N, C, S)), "mean": mean, "rstd": rstd, "eps": EPS, "num_groups": groups,
                "weight": None, "bias": None}
        fwd(*spec.kernel_args("forward", args))
        v["mean"], v["rstd"] = mean.astype(dtype), rstd.astype(dtype)
    elif direction == "backward_infer":
        v["mean"] = v["running_mean"]
        v["rstd"] = (1.0 / np.sqrt(v["running_var"].astype(np.float64) + EPS)).astype(dtype)
    elif direction == "backward_reduce":
        v["mean"] = rng.standard_normal(C) * 0.1 + np.nan_to_num(x.astype(np.float64).mean(axis=(0, 1)))
        v["rstd"] = rng.uniform(0.5, 2.0, C)
    for name in ("scale", "shift", "a", "b", "d"):
        v[name] = rng.standard_normal(C).astype(dtype)
    return v


def _outputs(op, direction, shape, groups, dtype, want_params=True, nchw=False):
    """Freshly allocated outputs for (N, S, C) data (y and dx (N, C, S) if ``nchw``), NaN-filled so that an
    element a kernel forgets shows."""
    N, S, C = shape
    spec = SPECS[op]
    training = direction in ("forward", "backward")
    out = {}
    for name in OUTPUTS[direction]:
        if name in ("y", "dx"):
            out[name] = np.full((N, C, S) if nchw else shape, np.nan, dtype)
        elif name in ("dweight", "dbias") and not want_params:
            out[name] = None
        elif name in ("mean", "rstd"):
            out[name] = np.full(spec.stat_shape((N, C, S), groups, training), np.nan, arg_dtype(direction, name, dtype))
        else:
            out[name] = np.full(C, np.nan, arg_dtype(direction, name, dtype))
    return out


def run_nhwc(op, direction, values, out):
    kernel = KERNELS[(op, direction, values["x"].dtype.name, "nhwc")]
    kernel(*SPECS[op].kernel_args(direction, {**values, **out}))
    return out


def run_reference(op, direction, values, want_params=True):
    """The float64 reference kernel on NCHW copies; outputs turned back to (N, S, C)."""
    spec = SPECS[op]
    x = values["x"]
    N, S, C = x.shape
    ref = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in values.items()}
    ref["x"], ref["dy"] = _nchw(x), _nchw(values["dy"])
    out = _outputs(op, direction, x.shape, values["num_groups"], "float64", want_params, nchw=True)
    reference.KERNELS[(op, direction, "float64")](*spec.kernel_args(direction, {**ref, **out}))
    return {k: (np.ascontiguousarray(v.transpose(0, 2, 1)) if k in ("y", "dx") else v) for k, v in out.items()}


def check(op, direction, x, dy, groups=1, affine="both", seed=0, want_params=True, what=""):
    rng = np.random.default_rng(seed)
    values = _inputs(op, direction, x, dy, groups, affine, rng)
    before = {k: v.copy() for k, v in values.items() if isinstance(v, np.ndarray)}
    got = run_nhwc(op, direction, values, _outputs(op, direction, x.shape, groups, x.dtype.name, want_params))
    want = run_reference(op, direction, values, want_params)
    for name, array in before.items():
        np.testing.assert_array_equal(values[name], array, err_msg=f"{op} {direction}: input {name} was changed")
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None
            continue
        kind = "backward" if direction.startswith("backward") else "forward"
        scale = None
        if name == "dx" and direction == "backward":
            # dx is a difference of terms as large as rstd * |weight * dy| (see test_backends.dx_scale)
            w = values["weight"]
            term = (np.nanmax(np.abs(values["rstd"][np.isfinite(values["rstd"])]), initial=0.0)
                    * (1.0 if w is None else np.abs(w).max()) * np.nanmax(np.abs(dy), initial=0.0))
            finite = np.abs(expected[np.isfinite(expected)])
            scale = max(1.0, finite.max(initial=0.0), 5e-3 * term)
        assert_close(got[name], expected, x.dtype, kind, what=f"{op} {direction} {what} {name}", scale=scale)
    return got


@st.composite
def cases(draw, op):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 40))
    s = draw(st.sampled_from([1, 2, 3, 7, 16, 17, 49]))
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    direction = draw(st.sampled_from(DIRECTIONS[op]))
    return dict(
        shape=(n, s, c),
        groups=groups if op == "groupnorm" else 1,
        direction=direction,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        affine=draw(st.sampled_from(["none", "weight", "bias", "both"])),
        want_params=draw(st.booleans()),
        offset=draw(st.sampled_from([0.0, 1e4, 1e8])),
        data=draw(st.sampled_from(["normal", "normal", "constant", "nan", "inf"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_data(case):
    rng = np.random.default_rng(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    x = rng.standard_normal(shape) + case["offset"]
    if case["data"] == "constant":
        x = np.full(shape, case["offset"] + 0.3)
    elif case["data"] in ("nan", "inf"):
        x.flat[rng.integers(x.size)] = np.nan if case["data"] == "nan" else -np.inf
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("op", list(DIRECTIONS))
@given(data=st.data())
def test_matches_reference(op, data):
    case = data.draw(cases(op))
    x, dy = make_data(case)
    check(op, case["direction"], x, dy, case["groups"], case["affine"], case["seed"], case["want_params"],
          what=str(case))


# (op, (N, S, C), groups): shapes that take the parallel schedules
LARGE = [
    ("batchnorm", (32, 49, 64), 1),  # tiles of 4 rows in row blocks
    ("batchnorm", (3, 300, 37), 1),  # tiles of 6 rows, a short last tile and block
    ("batchnorm", (2, 50, 1030), 1),  # tasks of whole channels, each over every row
    ("batchnorm", (3, 7, 2500), 1),  # column blocks of the flattened view, a short last block
    ("batchnorm", (1, 64, 16), 1),  # small input: every task sums all of it
    ("groupnorm", (8, 50, 24), 4),  # one sample per task
    ("groupnorm", (9, 3, 300), 300),  # a tile of one row, groups = C
    ("groupnorm", (2, 1089, 64), 8),  # samples cut into pieces
    ("groupnorm", (3, 701, 13), 13),  # pieces, tiles of 19 rows of 13, a short last piece
    ("instancenorm", (1, 5000, 3), 1),
    ("instancenorm", (16, 33, 17), 1),
]


@pytest.mark.parametrize("op,shape,groups", LARGE, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_shapes(op, shape, groups, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for direction in DIRECTIONS[op]:
        check(op, direction, x, dy, groups, what=str(shape))


@pytest.mark.parametrize("op,shape,groups", [c for c in LARGE if c[0] != "batchnorm"] + [LARGE[0], LARGE[2]],
                         ids=str)
def test_large_offset_and_constant(op, shape, groups):
    """mean 1e8 with std 1 (float64) and constant sets keep their accuracy: no E[x^2] - E[x]^2."""
    rng = np.random.default_rng(3)
    dy = rng.standard_normal(shape)
    check(op, "forward", rng.standard_normal(shape) + 1e8, dy, groups, what="offset 1e8")
    check(op, "backward", rng.standard_normal(shape) + 1e8, dy, groups, what="offset 1e8")
    const = np.full(shape, 2.5, np.float32)
    y = check(op, "forward", const, dy.astype(np.float32), groups, affine="bias", what="constant")["y"]
    bias = np.random.default_rng(0).standard_normal(shape[2]).astype(np.float32)  # the bias check() drew
    np.testing.assert_array_equal(y, np.broadcast_to(bias, shape), err_msg="a constant set must give y == bias")


@pytest.mark.parametrize("op,shape,groups", LARGE, ids=str)
def test_thread_count_independent(op, shape, groups):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    threads = normkit.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2, 1):
            normkit.set_num_threads(min(n, threads))
            runs.append({d: check(op, d, x, dy, groups) for d in ("forward", "backward")})
    finally:
        normkit.set_num_threads(threads)
    for other in runs[1:]:
        for direction, outputs in runs[0].items():
            for name, value in outputs.items():
                np.testing.assert_array_equal(other[direction][name], value,
                                              err_msg=f"{op} {direction} {name} differs between thread counts")
