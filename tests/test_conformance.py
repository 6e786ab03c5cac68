"""The conformance kit (normkit.testing, `normkit check`): it passes correct backends and fails broken ones, each
with a message naming the check and the size of the miss.

Every broken backend here is the reference with exactly one thing broken, registered at run time.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import normkit
from normkit import Backend, UnknownBackendError, activation, reference, registry, testing
from normkit.cli import main
from normkit.contract import ACT_PREFIX, DEFAULT_DTYPES, DIRECTIONS, DTYPES, OPS, SPECS, plain_direction
from normkit.registry import runtime_module


@pytest.fixture
def register():
    """register(name, {(op, direction): kernel}) -> name: the reference with those kernels replaced."""
    names = []

    def _register(name, replaced, kernels=DIRECTIONS, dtypes=DEFAULT_DTYPES):
        table = dict(reference.KERNELS)
        for (op, direction), fn in replaced.items():
            for dtype in dtypes:
                table[(op, direction, dtype)] = fn
        normkit.register_backend(Backend(name, runtime_module(table), kernels=kernels, dtypes=dtypes), replace=True)
        names.append(name)
        return name

    yield _register
    for name in names:
        normkit.unregister_backend(name)


def _affine(xhat, weight, bias, shape):
    if weight is not None:
        xhat = xhat * weight.reshape(shape)
    if bias is not None:
        xhat = xhat + bias.reshape(shape)
    return xhat


# --- the broken kernels ----------------------------------------------------------------------------------------

def layernorm_naive_variance(x, weight, bias, eps, y, mean, rstd):
    """E[x^2] - E[x]^2 in working precision (numpy sums float32 in float32)."""
    mu = x.mean(axis=1)
    var = (x * x).mean(axis=1) - mu * mu
    r = 1 / np.sqrt(var + x.dtype.type(eps))
    y[...] = _affine((x - mu[:, None]) * r[:, None], weight, bias, (1, -1))
    mean[...], rstd[...] = mu, r


def groupnorm_eps_outside_sqrt(x, num_groups, weight, bias, eps, y, mean, rstd):
    n, c, s = x.shape
    sets = x.astype(np.float64).reshape(n, num_groups, -1)
    mu = sets.mean(axis=-1)
    r = 1 / (np.sqrt(np.square(sets - mu[..., None]).mean(axis=-1)) + eps)
    y[...] = _affine(((sets - mu[..., None]) * r[..., None]).reshape(n, c, s), weight, bias, (1, -1, 1))
    mean[...], rstd[...] = mu, r


def batchnorm_unbiased_variance(x, weight, bias, eps, y, mean, rstd):
    sets = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    mu, var = sets.mean(axis=1), sets.var(axis=1, ddof=1)
    r = 1 / np.sqrt(var + eps)
    y[...] = _affine((x - mu[None, :, None]) * r[None, :, None], weight, bias, (1, -1, 1))
    mean[...], rstd[...] = mu, r


def instancenorm_backward_without_affine(dy, x, mean, rstd, weight, dx, dweight, dbias):
    reference.instancenorm_backward(dy, x, mean, rstd, None, dx, dweight, dbias)


def layernorm_centres_input_in_place(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)
    x -= mean[:, None]


def layernorm_leaves_output_unwritten(x, weight, bias, eps, y, mean, rstd):
    flat = y.reshape(-1)
    saved = flat[-1:].copy()  # keep the last element as it was handed in
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)
    flat[-1:] = saved


def layernorm_writes_past_the_end(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)
    flat = y.reshape(-1)
    past = np.lib.stride_tricks.as_strided(flat, shape=(flat.size + 1,), strides=flat.strides)
    past[-1] = 0.0  # an off-by-one store: safe only because the kit surrounds every array with guard zones


def layernorm_swallows_nan(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(np.nan_to_num(x), weight, bias, eps, y, mean, rstd)


def layernorm_raises(x, weight, bias, eps, y, mean, rstd):
    raise RuntimeError("kernel exploded")


_calls = [0]


def layernorm_not_deterministic(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)
    _calls[0] += 1
    if _calls[0] % 2 == 0:
        y.reshape(-1)[0] = np.nextafter(y.reshape(-1)[0], np.inf)


def layernorm_working_precision(x, weight, bias, eps, y, mean, rstd):
    """A legitimate float32 kernel: two-pass statistics and a fused scale/shift, all in the working dtype."""
    dt = x.dtype.type
    mu = x.mean(axis=1)
    r = dt(1) / np.sqrt(np.square(x - mu[:, None]).mean(axis=1) + dt(eps))
    scale = r[:, None] * (weight if weight is not None else dt(1))
    shift = (bias if bias is not None else dt(0)) - mu[:, None] * scale
    y[...] = x * scale + shift
    mean[...], rstd[...] = mu, r


def groupnorm_working_precision_backward(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias):
    """A legitimate float32 backward in the style of PyTorch's: per-set coefficients, dx = a*dy + b*x + c."""
    n, c, s = x.shape
    dt = x.dtype.type
    w = weight if weight is not None else np.ones(c, x.dtype)
    g = (dy * w[None, :, None]).reshape(n, num_groups, -1)
    xs = x.reshape(n, num_groups, -1)
    m = g.shape[-1]
    r = rstd[..., None]
    mu = mean[..., None]
    sum_g, sum_gx = g.sum(axis=-1, keepdims=True), (g * xs).sum(axis=-1, keepdims=True)
    b = (sum_g * mu - sum_gx) * r * r * r / dt(m)
    cc = -b * mu - sum_g * r / dt(m)
    dx[...] = (g * r + b * xs + cc).reshape(n, c, s)
    xhat = ((xs - mu) * r).reshape(n, c, s)
    if dweight is not None:
        dweight[...] = (dy * xhat).sum(axis=(0, 2))
    if dbias is not None:
        dbias[...] = dy.sum(axis=(0, 2))


def batchnorm_naive_stats(x, mean, m2):
    """E[x^2] - E[x]^2 (times the count) in the data's precision."""
    sets = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    mu = sets.mean(axis=1)
    mean[...] = mu
    m2[...] = (sets * sets).sum(axis=1) - sets.shape[1] * mu * mu


def batchnorm_stats_variance_not_m2(x, mean, m2):
    reference.batchnorm_stats(x, mean, m2)
    m2 /= x.shape[0] * x.shape[2]


def batchnorm_apply_working_precision(x, scale, shift, y):
    y[...] = x * scale[None, :, None] + shift[None, :, None]


def batchnorm_backward_reduce_working_precision(dy, x, mean, rstd, sum_dy, sum_dy_xhat):
    """A legitimate float32 reduction: mean and rstd rounded to the data's dtype, sums in it."""
    xhat = (x - mean.astype(x.dtype)[None, :, None]) * rstd.astype(x.dtype)[None, :, None]
    sum_dy[...] = dy.sum(axis=(0, 2))
    sum_dy_xhat[...] = (dy * xhat).sum(axis=(0, 2))


def batchnorm_backward_apply_working_precision(dy, x, a, b, d, dx):
    dx[...] = a[None, :, None] * dy + b[None, :, None] * x + d[None, :, None]


def batchnorm_backward_apply_swapped(dy, x, a, b, d, dx):
    dx[...] = b[None, :, None] * dy + a[None, :, None] * x + d[None, :, None]


# --- correct backends pass -------------------------------------------------------------------------------------

def layernorm_ignores_a_lone_bias(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(x, weight, bias if weight is not None else None, eps, y, mean, rstd)


def layernorm_off_past_the_serial_limit(x, weight, bias, eps, y, mean, rstd):
    """Right on small inputs; 1e-3 off on large ones (a threaded or blocked path's bug)."""
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)
    if x.size > 32768:
        y *= 1.001


def layernorm_sums_sequentially(x, weight, bias, eps, y, mean, rstd):
    """Two-pass statistics, each sum taken one term after another in x's dtype (np.cumsum's order): wrong in
    float32 on long sets, what PyTorch does in float64."""
    m = np.cumsum(x, axis=1)[:, -1] / x.dtype.type(x.shape[1])
    d = x - m[:, None]
    var = np.cumsum(d * d, axis=1)[:, -1] / x.dtype.type(x.shape[1])
    m, r = m.astype(np.float64), 1 / np.sqrt(var.astype(np.float64) + eps)
    y[...] = _affine((x - m[:, None]) * r[:, None], weight, bias, (1, -1))
    mean[...], rstd[...] = m, r


def layernorm_clamps_inf(x, weight, bias, eps, y, mean, rstd):
    big = np.finfo(x.dtype).max
    reference.layernorm_forward(np.clip(x, -big, big), weight, bias, eps, y, mean, rstd)


def layernorm_abs_eps(x, weight, bias, eps, y, mean, rstd):
    reference.layernorm_forward(x, weight, bias, abs(eps), y, mean, rstd)


def _narrow_towards_zero(values, dtype):
    """float64 values rounded towards zero to the 16-bit format (the wrong rounding)."""
    bits = normkit.half.narrow(values, dtype)
    got = normkit.half.widen(bits, dtype)
    away = np.isfinite(got) & (np.abs(got) > np.abs(values))
    bits[away] -= 1  # the next pattern towards zero (a sign-magnitude format)
    return bits


def _layernorm16(narrow):
    """A 16-bit LayerNorm forward from the float64 reference, rounded by ``narrow``."""
    def kernel(x, weight, bias, eps, y, mean, rstd):
        dtype = "bfloat16" if kernel.dtype == "bfloat16" else "float16"
        y64 = np.empty(x.shape)
        w, b = (None if a is None else a.astype(np.float64) for a in (weight, bias))
        reference.layernorm_forward(normkit.half.widen(x, dtype), w, b, eps, y64, mean, rstd)
        y[...] = narrow(y64, dtype)
    return kernel


def test_reference_conforms():
    report = testing.check_backend("reference")
    assert report == [], report.format()
    assert report.cases_run > 500
    assert "conforms" in report.summary()


def test_working_precision_float32_kernels_pass(register):
    """The tolerances are not tighter than float32 allows: kernels computing in float32 throughout, with the
    usual two-pass / fused-coefficient formulas, pass every case, large offsets included."""
    name = register("wp", {("layernorm", "forward"): layernorm_working_precision,
                           ("groupnorm", "backward"): groupnorm_working_precision_backward})
    report = testing.check_backend(name, ops=["layernorm", "groupnorm"])
    assert report == [], report.format()


def test_working_precision_split_kernels_pass(register):
    """The split directions' tolerances allow kernels that compute the elementwise passes and the gradient sums in
    the data's dtype."""
    name = register("wp_split", {("batchnorm", "apply"): batchnorm_apply_working_precision,
                                 ("batchnorm", "backward_reduce"): batchnorm_backward_reduce_working_precision,
                                 ("batchnorm", "backward_apply"): batchnorm_backward_apply_working_precision})
    report = testing.check_backend(name, ops=["batchnorm"])
    assert report == [], report.format()


def test_every_declared_split_direction_is_checked():
    report = testing.check_backend("reference", ops=["batchnorm"], dtypes=["float32"])
    assert report == []
    assert report.cases_run == sum(len(testing.cases("batchnorm", d, "float32")) for d in DIRECTIONS["batchnorm"])
    assert {"stats", "apply", "backward_reduce", "backward_apply"} <= set(DIRECTIONS["batchnorm"])


def test_plugin_readme_minimal_backend_conforms():
    """The ~30-line backend in plugins/README.md passes the kit, as the README says."""
    readme = (Path(__file__).parents[1] / "plugins" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    kernels_src = next(b for b in blocks if b.startswith("# mynorm/kernels.py"))
    declaration_src = next(b for b in blocks if b.startswith("# mynorm/__init__.py"))
    module = types.ModuleType("mynorm_kernels")
    exec(kernels_src, module.__dict__)
    declared = {}
    exec(declaration_src, declared)
    spec = dataclasses.replace(declared["backend"], module=module)
    normkit.register_backend(spec)
    try:
        report = testing.check_backend("mynorm")
        assert report == [] and report.cases_run > 50, report.format()
    finally:
        normkit.unregister_backend("mynorm")


# --- broken backends fail, saying which check and by how much -------------------------------------------------

MESSAGE = re.compile(r"error (\S+) \(relative \S+\) at \w+\[.*\]: got \S+, expected \S+; tolerance there (\S+), "
                     r"exceeded (\S+)x; \d+ of \d+ elements out of tolerance")


def measured(failure):
    """(error, tolerance, ratio) parsed from a value failure's message."""
    m = MESSAGE.search(failure.message)
    assert m, failure.message
    return tuple(float(v) for v in m.groups())


def test_naive_variance_in_float32_fails(register):
    name = register("naive_var", {("layernorm", "forward"): layernorm_naive_variance})
    report = testing.check_backend(name, ops=["layernorm"])
    f32 = [f for f in report if "float32" in f.case]
    assert {f.check for f in f32} >= {"y", "rstd"}
    assert {re.search(r"data=(\w+)", f.case).group(1) for f in f32} >= {"offset1e4", "offset1e6", "offset1e8"}
    # in float64 the same formula survives mean 1e4 but not 1e8
    f64 = {re.search(r"data=(\w+)", f.case).group(1) for f in report if "float64" in f.case}
    assert "offset1e8" in f64 and "normal" not in f64
    worst = max(measured(f)[2] for f in f32 if "offset1e4" in f.case and f.check == "rstd"
                and "error" in f.message)
    assert worst > 100
    assert "FAILS" in report.summary() and "rstd" in report.summary()


def test_eps_outside_the_square_root_fails(register):
    name = register("eps_out", {("groupnorm", "forward"): groupnorm_eps_outside_sqrt})
    report = testing.check_backend(name, ops=["groupnorm"])
    constant = [f for f in report if "data=constant" in f.case and f.check == "rstd"]
    assert constant, report.format()
    # a constant set has rstd = 1/sqrt(eps) = 316.2; this kernel gives 1/eps
    assert "got 100000, expected 316.227766" in constant[0].message
    assert any("data=small_var" in f.case and f.check == "y" for f in report)
    # (and with a negative eps, finite where var + eps < 0 makes the reference NaN)
    assert all(f.check in ("y", "rstd") or "data=negative_eps" in f.case for f in report)


def test_unbiased_variance_fails(register):
    name = register("unbiased", {("batchnorm", "forward"): batchnorm_unbiased_variance})
    report = testing.check_backend(name, ops=["batchnorm"])
    assert any(f.check == "rstd" and "float64" in f.case and "data=normal" in f.case for f in report)
    # on 4 * 5 = 20 values per channel, rstd is off by sqrt(20/19): 2.5 % relative
    small = [f for f in report if "shape=(4, 3, 5)" in f.case and f.check == "rstd"]
    assert small and all(re.search(r"relative 0\.025", f.message) for f in small), small
    assert not any("forward_infer" in f.case or "backward" in f.case for f in report)


def test_backward_that_forgets_the_affine_fails(register):
    name = register("no_affine_bwd", {("instancenorm", "backward"): instancenorm_backward_without_affine})
    report = testing.check_backend(name, ops=["instancenorm"])
    assert report
    assert {f.check for f in report} == {"dx"}
    assert all("instancenorm backward " in f.case and "affine=none" not in f.case for f in report)
    assert min(measured(f)[2] for f in report) > 1  # every reported miss exceeds its tolerance


def test_naive_split_statistics_fail(register):
    name = register("naive_stats", {("batchnorm", "stats"): batchnorm_naive_stats})
    report = testing.check_backend(name, ops=["batchnorm"])
    assert report and {f.check for f in report} == {"m2"}
    data = {(re.search(r"data=(\w+)", f.case).group(1), f.case.split()[2]) for f in report}
    # in float32 from mean 1e4 on; in float64 (where the sums are float64 too) still at mean 1e4
    assert {("offset1e4", "float32"), ("offset1e4", "float64"), ("offset1e8", "float64")} <= data
    assert not any("data=normal" in f.case for f in report)
    assert min(measured(f)[2] for f in report if "offset1e4" in f.case) > 50


def test_variance_instead_of_m2_and_swapped_coefficients_fail(register):
    name = register("var_m2", {("batchnorm", "stats"): batchnorm_stats_variance_not_m2,
                               ("batchnorm", "backward_apply"): batchnorm_backward_apply_swapped})
    report = testing.check_backend(name, ops=["batchnorm"], quick=True)
    assert {f.check for f in report} == {"m2", "dx"}
    assert all(" stats " in f.case for f in report if f.check == "m2")
    assert all(" backward_apply " in f.case for f in report if f.check == "dx")


def test_input_mutation_is_caught(register):
    name = register("mutator", {("layernorm", "forward"): layernorm_centres_input_in_place})
    report = testing.check_backend(name, ops=["layernorm"], quick=True)
    mutations = [f for f in report if f.check == "input mutation"]
    assert mutations and all("input x was modified" in f.message for f in mutations)
    assert not any(f.check == "input mutation" for f in report if "layernorm backward" in f.case)


def test_unwritten_output_is_caught(register):
    name = register("lazy", {("layernorm", "forward"): layernorm_leaves_output_unwritten})
    report = testing.check_backend(name, ops=["layernorm"], quick=True, dtypes=["float32"])
    unwritten = [f for f in report if f.check == "unwritten output"]
    assert len(unwritten) == len({f.case for f in report if "layernorm forward" in f.case})
    assert unwritten[0].message == "1 of 35 elements of y were never written, first at y[4, 6]"


def layernorm_reads_one_past_x(x, weight, bias, eps, y, mean, rstd):
    flat = x.reshape(-1)
    beyond = np.lib.stride_tricks.as_strided(flat, (flat.size + 1,), flat.strides)  # one element too many
    reference.layernorm_forward(beyond[1:].reshape(x.shape), weight, bias, eps, y, mean, rstd)


def test_read_past_an_input_is_named(register):
    """A kernel reading one element past x met the guard's NaN there, which the kit took for its output sentinel:
    "output read before written" (float32) or "unwritten output" (float64, the NaN copied bit for bit). The
    inputs' guard zones hold NaNs of their own, and the kit names the input."""
    name = register("overreader", {("layernorm", "forward"): layernorm_reads_one_past_x})
    report = testing.check_backend(name, ops=["layernorm"], quick=True, dtypes=["float32", "float64"])
    forward = [f for f in report if "layernorm forward" in f.case]
    assert forward and {f.check for f in forward} == {"read outside inputs"}
    assert {f.message for f in forward} >= {"y holds the NaN of the guard zone around x: the kernel read before or "
                                            "past the end of that input"}


def layernorm_needs_16_byte_alignment(x, weight, bias, eps, y, mean, rstd):
    if any(a.ctypes.data % 16 for a in (x, weight, bias, y, mean, rstd) if a is not None):
        raise RuntimeError("an aligned SIMD load would crash here")
    reference.layernorm_forward(x, weight, bias, eps, y, mean, rstd)


def test_arrays_start_at_any_element(register):
    """The kit handed kernels 16-byte-aligned arrays only, while the frontends hand them views that start on any
    element: a kernel assuming alignment conformed, then crashed in use. Each case now has arrays one element past
    a 64-byte boundary."""
    name = register("aligned_only", {("layernorm", "forward"): layernorm_needs_16_byte_alignment},
                    kernels={"layernorm": ("forward",)})
    report = testing.check_backend(name, quick=True, dtypes=["float32", "float64"])
    assert {f.check for f in report} == {"raised"} and len({f.case for f in report}) == report.cases_run


def layernorm_adds_into_its_output(x, weight, bias, eps, y, mean, rstd):
    out = np.empty_like(y)
    reference.layernorm_forward(x, weight, bias, eps, out, mean, rstd)
    y += out  # reads the output's old contents: right only where the caller zeroed it


def test_output_read_before_written_is_named(register):
    """A kernel that adds into its output meets the kit's NaN sentinel there: named as such, not as "non-finite
    values where the reference is finite"."""
    name = register("adder", {("layernorm", "forward"): layernorm_adds_into_its_output})
    report = testing.check_backend(name, ops=["layernorm"], quick=True, dtypes=["float32", "float64"])
    assert report and {f.check for f in report} == {"output read before written"}
    assert report[0].message.startswith("35 of 35 elements of y hold the kit's NaN sentinel made quiet, first at "
                                        "y[0, 0]: the kernel computed with the output's old contents")


def test_report_counts_repeated_messages_once(register):
    """A kernel raising the same error on every case: one line with the count, not one per case."""
    name = register("raiser", {("layernorm", "forward"): layernorm_raises})
    report = testing.check_backend(name, ops=["layernorm"], dtypes=["float32"])
    raised = [f for f in report if f.check == "raised"]
    assert len(raised) > 10
    text = report.format()
    assert text.count("RuntimeError: kernel exploded") == 1
    assert f"(and {len(raised) - 1} more cases with this message)" in text


def test_write_past_an_output_is_caught(register):
    name = register("overrun", {("layernorm", "forward"): layernorm_writes_past_the_end})
    report = testing.check_backend(name, ops=["layernorm"], quick=True)
    outside = [f for f in report if f.check == "write outside buffers"]
    assert outside and all(f.message == "wrote 1 element(s) just after the y array" for f in outside)


def test_swallowed_nan_is_caught(register):
    name = register("nan_eater", {("layernorm", "forward"): layernorm_swallows_nan})
    report = testing.check_backend(name, ops=["layernorm"], quick=True)
    assert {f.check for f in report} == {"NaN propagation (y)", "NaN propagation (mean)", "NaN propagation (rstd)"}
    assert all("data=nan" in f.case for f in report)
    y = next(f for f in report if f.check == "NaN propagation (y)")
    assert "129 of 129 elements that must be NaN (their set holds a NaN) are not" in y.message


def test_lone_bias_large_input_inf_negative_eps_and_long_set_cases_catch_their_bugs(register):
    """Bugs that only a bias without a weight, an input past the built-ins' serial limit, an inf in the data, a
    negative eps (torch takes all four) or a long set of repeated values (float32 sums taken in order drift there)
    reveal, each caught by those cases alone."""
    long_set = "shape=(1, 131072)"  # (past the serial limit too)
    for kernel, cases, check in [(layernorm_ignores_a_lone_bias, ["affine=bias "], "y"),
                                 (layernorm_off_past_the_serial_limit, ["shape=(9, 4100)", long_set], "y"),
                                 (layernorm_clamps_inf, ["data=inf"], "inf propagation (y)"),
                                 (layernorm_abs_eps, ["data=negative_eps"], "NaN propagation (y)"),
                                 (layernorm_sums_sequentially, [long_set], "rstd")]:
        report = testing.check_backend(register(kernel.__name__, {("layernorm", "forward"): kernel}),
                                       ops=["layernorm"])
        assert report and all(any(c in f.case for c in cases) for f in report), (kernel.__name__, report.format())
        assert check in {f.check for f in report}, kernel.__name__


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_rounding_towards_zero_or_flushing_subnormals_fails(register, dtype):
    """Rounded towards zero, every y is within the contract's ulp of the reference, but on average half an ulp
    small: the rounding check catches it (and nothing else fails); float16 subnormals flushed to zero fail the
    tiny data kind."""
    kernel = _layernorm16(_narrow_towards_zero)
    kernel.dtype = dtype
    report = testing.check_backend(register("trunc16", {("layernorm", "forward"): kernel}, dtypes=(dtype,)),
                                   ops=["layernorm"])
    assert "rounding (y)" in {f.check for f in report} and all(f.check.startswith("rounding (y") for f in report)
    assert "ulp smaller in magnitude than the reference rounded to nearest even on average" in report[0].message
    exact = _layernorm16(normkit.half.narrow)
    exact.dtype = dtype
    assert not testing.check_backend(register("rne16", {("layernorm", "forward"): exact}, dtypes=(dtype,)),
                                     ops=["layernorm"])
    if dtype == "float16":
        def flush(values, dtype):
            return normkit.half.narrow(np.where(np.abs(values) < 2.0 ** -14, 0.0, values), dtype)
        ftz = _layernorm16(flush)
        ftz.dtype = dtype
        report = testing.check_backend(register("ftz16", {("layernorm", "forward"): ftz}, dtypes=(dtype,)),
                                       ops=["layernorm"])
        assert any("data=tiny" in f.case for f in report)
        assert all(f.check == "y" and "got 0, expected" in f.message for f in report)  # (a large case has one too)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_check_counts_a_repeated_value_once(dtype):
    """4096 distinct values rounded to nearest even, and one value 10,000 times over whose rounding errs by 0.45
    ulp: an unbiased rounding, which the check passes (one value per reference value; over every element the mean
    would read 0.32 ulp), while rounding towards zero fails it."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(1.0, 2.0, 4096), np.full(10_000, 1.0 + 0.45 * 2.0 ** -7 * (dtype == "bfloat16")
                                                              + 0.45 * 2.0 ** -10 * (dtype == "float16"))])
    u = normkit.half.ulp(ref, dtype)
    case = testing.cases("layernorm", "forward", dtype)[0]
    for narrow, fails in [(normkit.half.narrow, False), (_narrow_towards_zero, True)]:
        got = normkit.half.widen(narrow(ref, dtype), dtype)
        assert np.all(np.abs(got - ref) <= u)
        report = testing._rounding_bias(str(case), "y", testing._rounding_errors("y", got, ref, u, dtype))
        assert bool(report) == fails, report


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_check_passes_correct_rounding_that_errs_one_way(dtype):
    """16-bit values times a scale just above a power of two (dx = dy * weight * rstd of a BatchNorm backward_infer
    with weight * rstd = 256.05): rounded to nearest even, every product rounds down, 0.28 ulp on average, which the
    check once took for rounding towards zero (float16 (8223, 1, 1) offset1e4). It judges an output against the
    reference rounded to nearest even."""
    rng = np.random.default_rng(0)
    spread = 2.0 ** rng.integers(-30, 30, 20_000) if dtype == "bfloat16" else 1.0  # (128 values a binade)
    dy = normkit.half.widen(normkit.half.narrow(spread * rng.standard_normal(20_000), dtype), dtype)
    ref = dy * 256.0 * (1.0 + 0.4 * 2.0 ** -(8 if dtype == "bfloat16" else 11))
    u = normkit.half.ulp(ref, dtype)
    got = normkit.half.widen(normkit.half.narrow(ref, dtype), dtype)
    assert np.unique(ref).size >= 4096 and np.mean((got - ref) * np.sign(ref) / u) < -0.2  # the errors' own bias
    case = testing.cases("batchnorm", "backward_infer", dtype)[0]
    assert not testing._rounding_bias(str(case), "dx", testing._rounding_errors("dx", got, ref, u, dtype))
    ref = ref * 1.3  # a scale off the binade's edge, where rounding towards zero differs half the time
    towards_zero = normkit.half.widen(_narrow_towards_zero(ref, dtype), dtype)
    u = normkit.half.ulp(ref, dtype)
    assert testing._rounding_bias(str(case), "dx", testing._rounding_errors("dx", towards_zero, ref, u, dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_towards_zero_on_small_outputs_only_fails_the_pooled_check(register, dtype):
    """A kernel that truncates only outputs of fewer than 4096 values (a small-shape path) passed: no single case
    had enough values to judge. The small cases' errors are pooled per kernel and output."""
    def small_only(values, dtype):
        return (_narrow_towards_zero if values.size < 4096 else normkit.half.narrow)(values, dtype)

    kernel = _layernorm16(small_only)
    kernel.dtype = dtype
    report = testing.check_backend(register("smalltrunc16", {("layernorm", "forward"): kernel}, dtypes=(dtype,)),
                                   ops=["layernorm"])
    pooled = [f for f in report if f.check == "rounding (y)"]
    assert len(pooled) == 1 and all(f.check.startswith("rounding (y") for f in report), report.format()
    assert pooled[0].case.startswith(f"layernorm forward {dtype} (") and "smaller cases pooled" in pooled[0].case


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_towards_zero_in_a_scalar_tail_fails_the_run_tails_check(register, dtype):
    """A kernel whose vector loop rounds to nearest even and whose scalar tail (the last n % 8 values of each row)
    truncates: a few values in each case, invisible in any mean over all of them, caught where every case's run
    tails are pooled."""
    def tail_towards_zero(values, dtype):
        bits = normkit.half.narrow(values, dtype)
        k = values.shape[-1]
        tail = np.arange(k) >= k - k % 8
        bits[..., tail] = _narrow_towards_zero(values[..., tail], dtype)
        return bits

    kernel = _layernorm16(tail_towards_zero)
    kernel.dtype = dtype
    report = testing.check_backend(register("tail16", {("layernorm", "forward"): kernel}, dtypes=(dtype,)),
                                   ops=["layernorm"])
    assert "rounding (y at the last n % 8 of each run)" in {f.check for f in report}, report.format()
    # (rows of 4 are tails only: the case of such rows fails the check on its own)
    assert all(f.check.startswith("rounding (y at the last") and "run tails pooled" in f.case
               or f.check == "rounding (y)" and "shape=(4096, 4)" in f.case for f in report), report.format()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_towards_zero_where_runs_have_one_value_fails(register, dtype):
    """A BatchNorm kernel that truncates where S = 1 (BatchNorm1d's (N, C), and the columns view channels-last
    BatchNorm runs on) passed: the only S = 1 cases were small, pooled with the others' correctly rounded values.
    A case of 16384 values with S = 1 meets the check alone."""
    def kernel(x, weight, bias, eps, y, mean, rstd):
        x64 = normkit.half.widen(x, dtype)
        w, b = (None if a is None else a.astype(np.float64) for a in (weight, bias))
        y64 = np.empty(x.shape)
        reference.batchnorm_forward(x64, w, b, eps, y64, mean, rstd)
        y[...] = (_narrow_towards_zero if x.shape[2] == 1 else normkit.half.narrow)(y64, dtype)

    report = testing.check_backend(register("s1trunc16", {("batchnorm", "forward"): kernel}, dtypes=(dtype,)),
                                   ops=["batchnorm"])
    assert [(f.check, f.case.split(" eps")[0]) for f in report] == [
        ("rounding (y)", f"batchnorm forward {dtype} shape=(1024, 16, 1) affine=weight+bias data=normal")], \
        report.format()


def test_raising_kernel_is_reported_not_fatal(register):
    name = register("raiser", {("layernorm", "forward"): layernorm_raises})
    report = testing.check_backend(name, ops=["layernorm"], quick=True)
    assert report and {f.check for f in report} == {"raised"}
    assert report[0].message == "RuntimeError: kernel exploded"
    assert len(report) == len(testing.cases("layernorm", "forward", "float32", quick=True)) * 2


def test_non_deterministic_kernel_is_caught(register):
    name = register("flaky", {("layernorm", "forward"): layernorm_not_deterministic})
    _calls[0] = 0
    report = testing.check_backend(name, ops=["layernorm"], dtypes=["float64"])
    assert [f.check for f in report] == ["not deterministic"]
    assert "changed 1 elements of y" in report[0].message


# --- what is checked, and the API ------------------------------------------------------------------------------

def test_only_declared_kernels_are_checked(register):
    table = {("layernorm", "forward", "float64"): reference.layernorm_forward}
    normkit.register_backend(Backend("ln64", runtime_module(table), kernels={"layernorm": ("forward",)},
                                     dtypes=("float64",)))
    try:
        report = testing.check_backend("ln64")
        assert report == [] and report.cases_run == len(testing.cases("layernorm", "forward", "float64"))
        report = testing.check_backend("ln64", ops=["groupnorm"])
        assert report == [] and report.cases_run == 0 and "nothing to check" in report.summary()
    finally:
        normkit.unregister_backend("ln64")


def test_cases_cover_the_hard_shapes_and_data():
    all_cases = [c for op, ds in DIRECTIONS.items() for d in ds for t in DTYPES for c in testing.cases(op, d, t)]
    shapes = {(c.op, c.shape, c.groups) for c in all_cases}
    assert ("batchnorm", (1, 3, 7), None) in shapes  # N = 1
    assert ("groupnorm", (2, 1, 9), 1) in shapes  # C = 1
    assert ("groupnorm", (1, 6, 1), 6) in shapes  # S = 1, groups = C
    assert ("groupnorm", (3, 4, 5), 1) in shapes  # groups = 1
    assert {c.data for c in all_cases} == {"normal", "offset1e4", "offset1e6", "offset1e8", "constant",
                                           "small_var", "nan", "inf", "negative_eps", "overflow", "tiny", "offset1e3",
                                           "rectified"}
    # float16 holds no mean of 1e6; the overflow kind is the 16-bit dtypes' only, the tiny one float16's
    assert not any(c.dtype == "float16" and c.data in ("offset1e6", "offset1e8") for c in all_cases)
    assert {c.dtype for c in all_cases if c.data == "overflow"} == {"bfloat16", "float16"}
    assert {c.dtype for c in all_cases if c.data == "tiny"} == {"float16"}
    # a set of 2**17 values per kernel, but for float64 (a sum in float64 taken term by term is good enough there)
    long = {(c.op, c.direction, c.dtype) for c in all_cases if c.data == "rectified"}
    assert long == {(op, d, t) for op, ds in DIRECTIONS.items() for d in ds for t in DTYPES if t != "float64"}
    assert all(SPECS[c.op].set_size(c.shape, c.groups) == 2 ** 17 for c in all_cases if c.data == "rectified")
    assert {c.affine for c in all_cases} == {"none", "weight", "weight+bias", "bias"}
    assert not any(c.op == "rmsnorm" and c.affine == "bias" for c in all_cases)  # (RMSNorm has no bias)
    # past the built-ins' serial limit (32768 values) with sets past their tiles (8192 values, rows of 4096)
    for op in OPS:
        big = [c for c in all_cases if c.op == op and math.prod(c.shape) > 32768]
        assert big and all(SPECS[op].set_size(c.shape, c.groups) > 4096 for c in big), op
    # training statistics are never asked of a set of one value (the frontends refuse those inputs)
    assert not any(c.op == "instancenorm" and c.training and c.shape[2] == 1 for c in all_cases)
    assert any(c.op == "instancenorm" and not c.training and c.shape[2] == 1 for c in all_cases)


def test_float32_tolerance_on_standard_normal_data_is_tight():
    """The derived bound on y for float32 standard-normal data, sets of 1000: about 4e-5, 1.2e-4 at the tails
    (|xhat| ~ 3.5), the order of the 1e-4 a user would accept, and far from float64 rounding."""
    case = testing.Case("layernorm", "forward", "float32", (3, 1000), None, "none", "normal", 1e-5)
    inputs = testing._inputs(case)
    expected = testing._expected(case, inputs, testing._output_shapes(case, inputs))
    tol = testing._tolerances(case, inputs, expected)["y"]
    assert 1e-5 < tol.min() and np.median(tol) < 5e-5 and tol.max() < 1.5e-4


def test_unknown_backend_and_bad_arguments():
    with pytest.raises(UnknownBackendError, match="unknown backend 'nosuch'; installed backends: .*reference"):
        testing.check_backend("nosuch")
    with pytest.raises(ValueError, match="check_backend: unknown op\\(s\\) 'pixelnorm'; known: batchnorm"):
        testing.check_backend("reference", ops=["pixelnorm"])
    # aliases, as normkit.get and `normkit check --op` take them; each op once
    by_alias = testing.check_backend("reference", ops=["gn", "group_norm"], dtypes=["float32"], quick=True)
    assert by_alias.cases_run == testing.check_backend("reference", ops=["groupnorm"], dtypes=["float32"],
                                                       quick=True).cases_run > 0
    with pytest.raises(ValueError, match="check_backend: unknown dtype\\(s\\) 'float8'"):
        testing.check_backend("reference", dtypes="float8")


def test_backend_that_fails_to_load_gives_one_load_failure():
    normkit.register_backend(Backend("hollow", runtime_module({}), kernels={"layernorm": ("forward",)}))
    try:
        with pytest.warns(RuntimeWarning, match="hollow"):
            report = testing.check_backend("hollow")
        assert [f.check for f in report] == ["load"]
        assert "declares kernels it does not provide" in report[0].message
        assert "could not be checked" in report.summary()
    finally:
        normkit.unregister_backend("hollow")


def test_assert_backend_conforms(register):
    testing.assert_backend_conforms("reference", ops=["groupnorm"], quick=True)
    name = register("unbiased2", {("batchnorm", "forward"): batchnorm_unbiased_variance})
    with pytest.raises(AssertionError, match="backend 'unbiased2' FAILS") as info:
        testing.assert_backend_conforms(name, ops=["batchnorm"], quick=True)
    assert "batchnorm forward float64" in str(info.value) and "rstd: error" in str(info.value)


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_check_passes_a_correct_backend():
    result = CliRunner().invoke(main, ["check", "reference", "--quick", "--op", "gn", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("backend 'reference' conforms:")


def test_cli_check_takes_the_16_bit_dtypes():
    result = CliRunner().invoke(main, ["check", "reference", "--quick", "--op", "ln", "--dtype", "bfloat16",
                                       "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    n = sum(len(testing.cases("layernorm", d, t, quick=True)) for d in DIRECTIONS["layernorm"]
            for t in ("bfloat16", "float16"))
    assert result.output.startswith(f"backend 'reference' conforms: {n} cases passed")


def test_cli_check_fails_a_broken_backend(register):
    name = register("unbiased3", {("batchnorm", "forward"): batchnorm_unbiased_variance})
    result = CliRunner().invoke(main, ["check", name, "--op", "bn"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith(f"backend '{name}' FAILS:")
    assert "batchnorm forward float32 shape=(4, 3, 5) affine=none data=normal eps=1e-05: y: error" in lines[1]
    assert lines[-1].startswith("  ... and ")
    full = CliRunner().invoke(main, ["check", name, "--op", "bn", "--all-failures"])
    assert not full.output.splitlines()[-1].startswith("  ... and ")


def test_cli_check_usage_errors():
    result = CliRunner().invoke(main, ["check", "nosuch"])
    assert result.exit_code == 2 and "unknown backend 'nosuch'" in result.output
    result = CliRunner().invoke(main, ["check", "reference", "--op", "pixelnorm"])
    assert result.exit_code == 2 and "unknown op 'pixelnorm'" in result.output


def test_check_is_fast_enough_for_ci():
    """< 30 s per backend in CI; the reference (the slowest-per-call backend besides a cold JIT) needs ~1 s."""
    import time

    start = time.perf_counter()
    testing.check_backend("reference")
    assert time.perf_counter() - start < 15


def test_registry_state_untouched_by_the_kit():
    before = registry.get_backend_order()
    testing.check_backend("reference", quick=True)
    assert registry.get_backend_order() == before


# --- the fused activations -------------------------------------------------------------------------------------

_ACT_OPS = [op for op, spec in SPECS.items() if spec.activation]


def _act_table(make) -> dict:
    """{(op, act_direction): make(op, direction)} for every act_ direction."""
    return {(op, d): make(op, d) for op in _ACT_OPS for d in SPECS[op].directions if d.startswith(ACT_PREFIX)}


def _in_working_precision(op, direction):
    """A legitimate act_ kernel: the reference's plain kernel rounded to the dtype, the activation in that dtype."""
    plain = plain_direction(direction)

    def run(*args):
        dtype = args[SPECS[op].args(direction).index("x")].dtype.name
        activation.compose(reference.KERNELS[(op, plain, dtype)], op, direction)(*args)
    return run


def test_working_precision_activation_kernels_pass(register):
    name = register("wp_act", _act_table(_in_working_precision))
    report = testing.check_backend(name, ops=_ACT_OPS, quick=True)
    assert report == [], report.format()
    assert report.cases_run > 100


def _derivative_at_output(op, direction):
    """A wrong backward: act' taken at the activation's output act(z) rather than at z (for relu the same)."""
    if "forward" in direction:
        return reference.KERNELS[(op, direction, "float64")]
    plain, names = plain_direction(direction), SPECS[op].args(direction)

    def run(*args):
        v = dict(zip(names, args))
        y = activation.apply(v["activation"], activation._z(SPECS[op], plain, v, np.float64), v["slope"])
        dy = v["dy"] * activation.derivative(v["activation"], y, v["slope"])
        reference.KERNELS[(op, plain, "float64")](*SPECS[op].kernel_args(plain, dict(v, dy=dy)))
    return run


def test_activation_derivative_at_the_output_fails(register):
    name = register("act_at_y", _act_table(_derivative_at_output))
    report = testing.check_backend(name, ops=_ACT_OPS, dtypes=["float64"], quick=True)
    failing = {f.case.split(" ")[1] for f in report}
    assert failing == {"act_backward", "act_backward_infer"}, report.format()
    assert not any("relu" in f.case for f in report)


def test_activation_slope_ignored_fails(register):
    def ignore_slope(op, direction):
        names = SPECS[op].args(direction)
        kernel = reference.KERNELS[(op, direction, "float64")]
        return lambda *args: kernel(*(0.01 if n == "slope" else a for n, a in zip(names, args)))
    name = register("act_no_slope", _act_table(ignore_slope))
    report = testing.check_backend(name, ops=["groupnorm"], dtypes=["float64"])
    assert report and all("leaky_relu" in f.case for f in report), report.format()
