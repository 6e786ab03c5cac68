"""The Cython backend's fused-activation kernels (the act_ directions) against the float64 reference, and their
independence of the thread count.

Tolerances are the conformance kit's for the plain direction (normkit/testing.py's module docstring), carried
through the activation. Forward: y = act(z) is off by at most max|act'| <= 1.2 times z's error, plus the
activation's own evaluation in float32 (exp, erf and tanh by polynomials: a few ulp of |z|, as torch's vectorized
CPU code) and y's rounding. Backward: g = dy * act'(z) is off by |dy| times (z's error times max|act''| <= 1, plus
act''s evaluation), and that perturbation of g goes through the plain gradient's linear map. The relu and
leaky_relu derivatives jump at z = 0, so dy is zero where z is within 1e-3 of 0: whichever side of 0 the kernel's z
falls on, g is 0 there.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import activation, half, reference
from normkit.contract import ACTIVATIONS, SPECS
from normkit.testing import tolerance_factor

kernels = pytest.importorskip("normkit_kernels.cython.kernels")

SLOPE = 0.2
EPS = 1e-5
SMOOTH = ("silu", "gelu", "gelu_tanh")
# (shape as the kernel sees it, num_groups): N = 1, C = 1, S = 1, groups = C, runs longer than a fused chunk (1024
# values) and not a multiple of the vector width; BatchNorm's channels, rows and columns schedules (the last with
# rows of more than 1024 columns, with row blocks, and with rows of 3 values summed 6 at a time, 5 left over);
# GroupNorm's pieces schedule (a single set of 65536 values or more) and LayerNorm's single long row (by tiles)
SHAPES = {
    "batchnorm": [((1, 3, 37), None), ((4, 1, 33), None), ((6, 5, 1), None), ((2, 40, 33), None),
                  ((2, 3, 1100), None), ((3, 300, 5), None), ((130, 3, 2), None), ((3077, 1, 3), None)],
    "instancenorm": [((1, 3, 37), None), ((2, 1, 5), None), ((2, 2, 1100), None)],
    "groupnorm": [((1, 6, 37), 3), ((2, 4, 9), 4), ((2, 1, 33), 1), ((2, 2, 1100), 1), ((1, 4, 16411), 1)],
    "layernorm": [((1, 37), None), ((3, 1100), None), ((5, 1), None), ((1, 65600), None)],
}
ACT_DIRECTIONS = [(op, d) for op in SHAPES for d in SPECS[op].directions if d.startswith("act_")]


def _work(dtype):
    return np.float32 if dtype == "bfloat16" else np.dtype(dtype).type


def _arg(values, dtype, data=False):
    """float64 values as the kernel takes them: data arrays in the dtype (16-bit: bit patterns), others in the
    working dtype; and the float64 values of what the kernel gets."""
    if data and dtype == "bfloat16":
        bits = half.narrow(values, dtype)
        return bits, half.widen(bits, dtype)
    a = np.ascontiguousarray(values, _work(dtype))
    return a, a.astype(np.float64)


class Case:
    """One act_ kernel call: its arguments (``args``) and their float64 values (``f64``)."""

    def __init__(self, op, direction, dtype, shape, groups, act, data, seed=0):
        self.op, self.direction, self.dtype, self.shape, self.groups = op, direction, dtype, shape, groups
        self.spec = SPECS[op]
        self.training = not direction.endswith("_infer")
        rng = np.random.default_rng([seed, len(op), len(direction), ACTIVATIONS.index(act), *shape])
        x = {"normal": 2.0 * rng.standard_normal(shape) + 1.0, "offset": 1e4 + rng.standard_normal(shape),
             "constant": np.full(shape, 1.1)}[data]
        k = self.spec.param_shape(shape)
        self.args, self.f64 = a, f = {}, {}
        a["x"], f["x"] = _arg(x, dtype, data=True)
        a["weight"], f["weight"] = _arg(1.0 + 0.5 * rng.standard_normal(k), dtype)
        a["bias"], f["bias"] = _arg(0.5 * rng.standard_normal(k), dtype)
        a.update(num_groups=groups, eps=EPS, activation=ACTIVATIONS.index(act), slope=SLOPE)
        xc = (f["x"].mean(axis=(0, 2)), f["x"].var(axis=(0, 2))) if not self.training else None
        if direction == "act_forward_infer":
            a["running_mean"], f["running_mean"] = _arg(xc[0] + 0.1 * rng.standard_normal(k), dtype)
            a["running_var"], f["running_var"] = _arg(xc[1] * rng.uniform(0.5, 2.0, k) + 0.1, dtype)
        elif direction == "act_backward_infer":
            a["mean"], f["mean"] = _arg(xc[0] + 0.1 * rng.standard_normal(k), dtype)
            a["rstd"], f["rstd"] = _arg(1.0 / np.sqrt(xc[1] * rng.uniform(0.5, 2.0, k) + 0.1), dtype)
        elif direction == "act_backward":  # the statistics a training forward saved, rounded to the working dtype
            stat = self.spec.stat_shape(shape, groups)
            mean, rstd = np.empty(stat), np.empty(stat)
            plain = dict(x=f["x"], num_groups=groups, weight=None, bias=None, eps=EPS, y=np.empty(shape), mean=mean,
                         rstd=rstd)
            reference.KERNELS[(op, "forward", "float64")](*(plain[n] for n in self.spec.args("forward")))
            (a["mean"], f["mean"]), (a["rstd"], f["rstd"]) = _arg(mean, dtype), _arg(rstd, dtype)
        if "dy" in self.spec.args(direction):
            dy = rng.standard_normal(shape)
            dy[np.abs(self.z()) < 1e-3] = 0.0
            a["dy"], f["dy"] = _arg(dy, dtype, data=True)

    def stat(self, s):
        return self.spec.per_element(s, self.shape) if self.training else s[None, :, None]

    def param(self, p):
        return self.spec.per_param(p)

    def z(self):
        f = self.f64
        return (f["x"] - self.stat(f["mean"])) * self.stat(f["rstd"]) * self.param(f["weight"]) \
            + self.param(f["bias"])

    def set_max(self, a):
        """max |a| over each normalized set, per element."""
        a, sets = np.broadcast_to(np.abs(a), self.shape), self.spec.sets if self.training else "channel"
        if sets == "row":
            return np.broadcast_to(a.max(axis=1, keepdims=True), a.shape)
        if sets == "channel":
            return np.broadcast_to(a.max(axis=(0, 2), keepdims=True), a.shape)
        g = self.groups or self.shape[1]
        m = a.reshape(self.shape[0], g, -1).max(axis=2)
        return np.broadcast_to(np.repeat(m, self.shape[1] // g, axis=1)[:, :, None], a.shape)

    def param_sum(self, a):
        return a.sum(axis=self.spec.param_axes())

    def outputs(self):
        shape, out = self.shape, {}
        data = np.uint16 if self.dtype == "bfloat16" else _work(self.dtype)
        names = self.spec.args(self.direction)
        for name in ("y", "dx"):
            if name in names:
                out[name] = np.full(shape, 0x7FC0 if self.dtype == "bfloat16" else np.nan, data)
        if "rstd" in names and "forward" in self.direction:
            stat = self.spec.stat_shape(shape, self.groups)
            out["mean"], out["rstd"] = np.empty(stat, _work(self.dtype)), np.empty(stat, _work(self.dtype))
        if "dweight" in names:
            k = self.spec.param_shape(shape)
            out["dweight"], out["dbias"] = np.empty(k, _work(self.dtype)), np.empty(k, _work(self.dtype))
        return out

    def call(self, kernel, f64=False):
        out = self.outputs()
        if f64:
            out = {k: np.empty(v.shape) for k, v in out.items()}
        source = {**self.args, **(self.f64 if f64 else {})}
        with np.errstate(all="ignore"):
            kernel(*(out[n] if n in out else source.get(n) for n in self.spec.args(self.direction)))
        if not f64 and self.dtype == "bfloat16":
            out = {k: half.widen(v, self.dtype) if k in ("y", "dx") else v for k, v in out.items()}
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    def tolerances(self, want, act):
        """Per-output tolerances (see the module docstring)."""
        eps = float(np.finfo(_work(self.dtype)).eps)
        f = self.f64
        w, b = np.abs(self.param(f["weight"])), np.abs(self.param(f["bias"]))
        m = self.spec.set_size(self.shape, self.groups)
        k1 = tolerance_factor(1) * eps
        smooth = act in SMOOTH
        tol = {}
        if "forward" in self.direction:
            if self.training:  # the statistics of x (exact), and the plain forward's tolerances
                mean, rstd = self.stat(want["mean"]), self.stat(want["rstd"])
                kappa, km = self.set_max(f["x"]) * rstd, tolerance_factor(m) * eps
                tol_z = km * (w * (1 + kappa) * (1 + np.abs(f["x"] - mean) * rstd) + b)
                absmax = np.abs(f["x"]).max()  # of all sets: a bound of each set's
                tol["mean"] = km * absmax
                tol["rstd"] = km * (1 + absmax * want["rstd"]) * want["rstd"]
            else:  # the running statistics
                mean = f["running_mean"][None, :, None]
                rstd = 1.0 / np.sqrt(f["running_var"] + EPS)[None, :, None]
                kappa = (np.abs(f["x"]) + np.abs(mean)) * rstd
                tol_z = k1 * (w * (1 + kappa) * (1 + np.abs(f["x"] - mean) * rstd) + b)
            z = (f["x"] - mean) * rstd * self.param(f["weight"]) + self.param(f["bias"])
            tol["y"] = 1.2 * tol_z + k1 * (np.abs(want["y"]) + (np.abs(z) if smooth else 0))
            return tol
        dy = np.abs(f["dy"])
        rstd, xhat = self.stat(f["rstd"]), np.abs(f["x"] - self.stat(f["mean"])) * self.stat(f["rstd"])
        tol_z = k1 * (w * (1 + xhat) + b)
        g = np.abs(want["g"])
        dg = dy * (tol_z + (k1 if smooth else 0))  # the perturbation of g
        if self.training:
            kappa = self.set_max(f["x"]) * rstd
            tol["dx"] = tolerance_factor(m) * eps * rstd * self.set_max(g * w) * (1 + kappa) * (1 + xhat) \
                + rstd * self.set_max(w) * self.set_max(dg) * (2 + xhat * self.set_max(xhat))
        else:
            kappa = (np.abs(f["x"]) + np.abs(self.stat(f["mean"]))) * rstd
            tol["dx"] = k1 * g * w * rstd + dg * w * rstd
        kn = tolerance_factor(self.spec.param_count(self.shape)) * eps
        tol["dweight"] = kn * self.param_sum(g * (1 + kappa) * (1 + xhat)) + self.param_sum(dg * xhat)
        tol["dbias"] = kn * self.param_sum(g) + self.param_sum(dg)
        return tol

    def expected(self):
        want = self.call(reference.KERNELS[(self.op, self.direction, "float64")], f64=True)
        if "dy" in self.f64:  # g = dy * act'(z), exactly, for the tolerances
            want["g"] = self.f64["dy"] * activation.derivative(self.args["activation"], self.z(), SLOPE)
        return want


def _check(case, act, got, want):
    tol = case.tolerances(want, act)
    if case.dtype == "bfloat16":  # y rounded once to bfloat16 (1 ulp), dx within 2 ulp (the contract's bounds)
        for name, ulps in (("y", 1), ("dx", 2)):
            if name in tol:
                tol[name] = tol[name] + ulps * half.ulp(want[name], case.dtype)
    for name, t in tol.items():
        bad = ~(np.abs(got[name] - want[name]) <= t)
        assert not bad.any(), (
            f"{case.op} {case.direction} {case.dtype} {act} {case.shape}: {name} off at {np.argwhere(bad)[:3]}: "
            f"got {got[name][bad][:3]}, want {want[name][bad][:3]}, tol {np.broadcast_to(t, bad.shape)[bad][:3]}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("op,direction", ACT_DIRECTIONS)
def test_act_kernels_match_reference(op, direction, dtype):
    kernel = kernels.KERNELS[(op, direction, dtype)]
    for shape, groups in SHAPES[op]:
        for act in ACTIVATIONS:
            case = Case(op, direction, dtype, shape, groups, act, "normal")
            _check(case, act, case.call(kernel), case.expected())


@pytest.mark.parametrize("data", ["offset", "constant"])
@pytest.mark.parametrize("op,direction", ACT_DIRECTIONS)
def test_act_kernels_hard_data(op, direction, data):
    """Mean 1e4 with unit spread, and constant input (xhat = 0, z = bias), in float32."""
    kernel = kernels.KERNELS[(op, direction, "float32")]
    shape, groups = SHAPES[op][0]
    for act in ACTIVATIONS:
        case = Case(op, direction, "float32", shape, groups, act, data)
        _check(case, act, case.call(kernel), case.expected())


# z at and past the ends of float32's exp: |z| around 88, huge, infinite and NaN
EXTREME_Z = np.array([88, -88, 88.5, -88.5, 89, -89, 100, -100, 1e30, -1e30, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan,
                      1e-40, -1e-40, 0.0, -0.0, 17, -17, 1, -1], np.float32)


@pytest.mark.parametrize("op", ["batchnorm", "groupnorm", "layernorm"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_act_forward_at_the_ends_of_the_range(op, act):
    """weight 0 makes z the bias exactly, one extreme value per channel (LayerNorm: per column): inf and NaN as the
    reference gives them (silu(-inf) and gelu_tanh(-inf) are -inf * 0 = NaN, as in torch), finite values within
    a few ulp of |z| (past |z| = 88 the sigmoid is 0 or 1 to float precision)."""
    kernel = kernels.KERNELS[(op, "act_forward", "float32")]
    c = EXTREME_Z.size
    w, b = np.zeros(c, np.float32), EXTREME_Z
    rng = np.random.default_rng(0)
    if op == "layernorm":
        x = rng.standard_normal((3, c)).astype(np.float32)
        y, stats = np.empty_like(x), [np.empty(3, np.float32) for _ in range(2)]
        kernel(x, w, b, EPS, ACTIVATIONS.index(act), SLOPE, y, *stats)
        z = np.broadcast_to(b.astype(np.float64), x.shape)
    else:  # batchnorm: the columns schedule (S = 1); groupnorm: sets of 37 values (vector loop and tail)
        x = rng.standard_normal((8, c, 1) if op == "batchnorm" else (2, c, 37)).astype(np.float32)
        y = np.empty_like(x)
        stats = [np.empty(c, np.float32) for _ in range(2)] if op == "batchnorm" else \
            [np.empty((2, c), np.float32) for _ in range(2)]
        args = (x, w, b) if op == "batchnorm" else (x, c, w, b)
        kernel(*args, EPS, ACTIVATIONS.index(act), SLOPE, y, *stats)
        z = np.broadcast_to(b.astype(np.float64)[None, :, None], x.shape)
    with np.errstate(all="ignore"):
        want = activation.apply(ACTIVATIONS.index(act), z, SLOPE)
    special = ~np.isfinite(want)
    np.testing.assert_array_equal(y[special], want[special].astype(np.float32))
    assert np.isfinite(y[~special]).all()
    err = np.abs(y[~special] - want[~special])
    magnitude = np.maximum(np.abs(want), np.where(np.isfinite(z), np.abs(z), 0.0))  # relu(-inf) = 0: of want
    scale = np.spacing(magnitude[~special].astype(np.float32)).astype(np.float64)
    assert (err <= 4 * scale).all(), (act, z[~special][err > 4 * scale], y[~special][err > 4 * scale])


@pytest.mark.parametrize("op,direction", ACT_DIRECTIONS)
def test_act_kernels_independent_of_thread_count(op, direction):
    kernel = kernels.KERNELS[(op, direction, "float32")]
    before = normkit.get_num_threads()
    try:
        for shape, groups in SHAPES[op]:
            case = Case(op, direction, "float32", shape, groups, "silu", "normal")
            results = []
            for n in (1, 2):
                normkit.set_num_threads(n)
                results.append(case.call(kernel))
            for name, value in results[0].items():
                assert np.array_equal(value, results[1][name], equal_nan=True), (op, direction, shape, name)
    finally:
        normkit.set_num_threads(before)


def test_backend_declares_the_act_directions():
    backend = next(b for b in normkit.list_backends() if b.name == "cython")
    declared = {key for key in backend.implements if key[1].startswith("act_")}
    wanted = {(op, d, dtype) for op, d in ACT_DIRECTIONS for dtype in ("float32", "float64", "bfloat16", "float16")}
    assert declared == wanted
    assert wanted <= set(kernels.KERNELS)
