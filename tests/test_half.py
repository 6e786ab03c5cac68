"""The 16-bit dtypes below the frontends: the conversions of normkit.half (bit for bit, every pattern), the
contract's argument dtypes, the reference's 16-bit kernels against PyTorch's CPU kernels, and the conformance kit's
16-bit cases (they pass kernels that keep the contract and fail ones that do not)."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import Backend, half, reference, testing
from normkit.contract import DATA_ARGS, DEFAULT_DTYPES, DTYPES, HALF_DTYPES, SPECS, arg_dtype, storage_dtype
from normkit.registry import runtime_module

ml_dtypes = pytest.importorskip("ml_dtypes")
NUMPY = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
ALL = np.arange(65536, dtype=np.uint16)


# --- conversions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_widen_is_exact_for_every_pattern(dtype):
    with np.errstate(invalid="ignore"):  # casting signalling NaNs
        expected = ALL.view(NUMPY[dtype]).astype(np.float64)
    np.testing.assert_array_equal(half.widen(ALL, dtype), expected)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(half.widen(ALL, dtype, np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("source", [np.float64, np.float32])
def test_narrow_rounds_to_nearest_even_for_every_pattern(dtype, source):
    values = half.widen(ALL, dtype)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(half.narrow(values[finite].astype(source), dtype), ALL[finite])
    # every midpoint between neighbours goes to the even one, and a hair off it to the nearer one
    v = np.unique(values[finite])  # sorted; -0 and 0 are one value
    lo, hi = v[:-1], v[1:]
    mid = (lo + hi) / 2  # exact in float64 and, for these formats, in float32
    even = np.where(half.narrow(lo, dtype) & 1, hi, lo)
    np.testing.assert_array_equal(half.widen(half.narrow(mid.astype(source), dtype), dtype), even)
    if source is np.float64:  # where float32 has no value between: float64 checks double rounding
        np.testing.assert_array_equal(half.widen(half.narrow(np.nextafter(mid, hi), dtype), dtype), hi)
        np.testing.assert_array_equal(half.widen(half.narrow(np.nextafter(mid, lo), dtype), dtype), lo)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_narrow_of_float32_matches_ml_dtypes_and_numpy(dtype):
    """Against the libraries' own float32 -> 16-bit casts on random float32 patterns and on every 16-bit value
    with each possible low half (the rounding bits)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    low = rng.integers(0, 2**16, ALL.size, dtype=np.uint32)
    bits = np.concatenate([bits, (ALL.astype(np.uint32) << 16) | low, (ALL.astype(np.uint32) << 16) | 0x8000])
    f = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = f.astype(NUMPY[dtype]).view(np.uint16)
    got = half.narrow(f, dtype)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(half.widen(got[nan], dtype)).all()


def test_narrow_keeps_nan_quiet_and_overflows_to_inf():
    assert half.narrow(np.array([np.nan]), "bfloat16")[0] & 0x7FC0 == 0x7FC0  # a quiet NaN
    signalling = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(half.widen(half.narrow(signalling, "bfloat16"), "bfloat16")).all()
    big = np.array([65520.0, -65520.0, 65519.99, 3.4e38, 3.3963e38, 3.3960e38])  # bfloat16's half-way: 3.39617e38
    assert list(half.widen(half.narrow(big[:3], "float16"), "float16")) == [np.inf, -np.inf, 65504.0]
    bf = half.widen(half.narrow(big[3:], "bfloat16"), "bfloat16")
    assert bf[0] == np.inf and bf[1] == np.inf and bf[2] == 3.3895313892515355e38
    assert list(half.ulp(np.array([1.0, 1.9, 0.0, 65504.0]), "float16")) == [2**-10, 2**-10, 2**-24, 32.0]
    assert list(half.ulp(np.array([1.0, 3e-39]), "bfloat16")) == [2**-7, 2**-133]


def test_numpy_dtype_names_ml_dtypes_when_it_is_missing(monkeypatch):
    import sys

    assert half.numpy_dtype("float16") == np.float16 and half.numpy_dtype("bfloat16") == NUMPY["bfloat16"]
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(ImportError, match="bfloat16 need the ml_dtypes package: pip install ml_dtypes"):
        half.numpy_dtype("bfloat16")


# --- the contract ----------------------------------------------------------------------------------------------

def test_contract_dtypes_and_argument_storage():
    assert DTYPES == ("float32", "float64", "bfloat16", "float16") and DEFAULT_DTYPES == ("float32", "float64")
    for op, spec in SPECS.items():
        for direction in spec.directions:
            for name in spec.args(direction):
                if name in ("eps", "num_groups"):
                    continue
                for dtype in HALF_DTYPES:
                    want = "uint16" if name in DATA_ARGS else (
                        "float64" if arg_dtype(direction, name, "float32") == "float64" else "float32")
                    assert storage_dtype(direction, name, dtype) == np.dtype(want), (op, direction, name)
                assert storage_dtype(direction, name, "float32") == np.dtype(arg_dtype(direction, name, "float32"))
    # a plugin naming no dtypes does not claim the new ones
    assert Backend("p", runtime_module({}), {"layernorm": ("forward",)}).declared() == {
        ("layernorm", "forward", "float32"), ("layernorm", "forward", "float64")}


def test_builtin_compiled_backends_declare_only_what_they_have():
    from normkit import registry

    for row in registry.list_backends(load=False):
        dtypes = {d for _, _, d in row.implements}
        if row.name == "reference":
            assert dtypes == set(DTYPES)
        elif row.name in ("cython", "numba") and dtypes & set(HALF_DTYPES):
            report = testing.check_backend(row.name, dtypes=HALF_DTYPES, quick=True)
            assert report == [], report.format()


# --- the reference against PyTorch's CPU kernels ---------------------------------------------------------------

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import normkit.torch as nt  # noqa: E402

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CALLS = {
    "batchnorm": lambda f, x, w, b, pdt, **k: f.batch_norm(x, None, None, w, b, True, **k),
    "batchnorm_infer": lambda f, x, w, b, pdt, **k: f.batch_norm(
        x, torch.linspace(2.5, 3.5, 6).to(pdt), torch.linspace(3, 5, 6).to(pdt), w, b, False, **k),
    "instancenorm": lambda f, x, w, b, pdt, **k: f.instance_norm(x, None, None, w, b, True, **k),
    "groupnorm": lambda f, x, w, b, pdt, **k: f.group_norm(x, 3, w, b, **k),
    "layernorm": lambda f, x, w, b, pdt, **k: f.layer_norm(x.transpose(1, -1), (6,), w, b, **k),
}


# per op: the axes of one normalized set of the (4, 6, 7, 5) input (layernorm: over the channels)
SETS = {"batchnorm": lambda x: x.transpose(0, 1).reshape(6, -1), "batchnorm_infer": lambda x: x.reshape(1, -1),
        "instancenorm": lambda x: x.reshape(24, -1), "groupnorm": lambda x: x.reshape(12, -1),
        "layernorm": lambda x: x.transpose(1, -1).reshape(-1, 6)}


def _close(a, b, dtype, ulps, slack):
    """|a - b| within ``ulps`` of the 16-bit type plus ``slack``; the measured maximum ratio for the message."""
    a, b = a.detach().double().numpy(), b.detach().double().numpy()
    tol = ulps * half.ulp(np.maximum(np.abs(a), np.abs(b)), dtype) + slack
    ratio = (np.abs(a - b) / tol).max()
    assert ratio <= 1, f"off by {ratio:.3g}x the bound"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("op", CALLS)
def test_reference_matches_torch_cpu_kernels(op, params, dtype):
    """Forward and autograd of the reference (through normkit.torch) against torch's own 16-bit CPU kernels, with
    float32 parameters (autocast's) and with 16-bit ones. Torch is not exact: parts of its arithmetic keep the
    16-bit precision of x (an error of about ``ulp(max|x|) * rstd`` in xhat, 10x an output ulp on this offset data),
    so the bound is the contract's ulps plus that slack carried into each output."""
    dt = TORCH[dtype]
    pdt = torch.float32 if params == "float32" else dt
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(4, 6, 7, 5, generator=g)).to(dt)
    w = (1 + 0.5 * torch.randn(6, generator=g)).to(pdt)
    b = (0.5 * torch.randn(6, generator=g)).to(pdt)
    dy = torch.randn(CALLS[op](F, x, w, b, pdt=pdt).shape, generator=g).to(dt)
    results = []
    for f, kw in ((F, {}), (nt, {"backend": "reference"})):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = CALLS[op](f, xx, ww, bb, pdt=pdt, **kw)
        y.backward(dy)
        results.append((y, xx.grad, ww.grad, bb.grad))
    (y0, dx0, dw0, db0), (y1, dx1, dw1, db1) = results
    assert (y1.dtype, dx1.dtype, dw1.dtype, db1.dtype) == (y0.dtype, dx0.dtype, dw0.dtype, db0.dtype)
    x64 = x.double()
    rstd = 1.0 / SETS[op](x64).std(dim=1, unbiased=False).min().item()
    xhat_error = 4 * half.ulp(x64.abs().max().item(), dtype) * rstd
    wmax, dymax = w.double().abs().max().item(), dy.double().abs().max().item()
    ulps = 1 if params == "float32" else 2
    _close(y0, y1, dtype, ulps, xhat_error * wmax)
    _close(dx0, dx1, dtype, ulps + 1, xhat_error * rstd * wmax * dymax * 4)
    # sums of 140..840 terms: torch's layer_norm accumulates dbias in 16-bit partial sums (3e-4 relative in bfloat16)
    total = dy.double().abs().sum().item()
    _close(dw0, dw1, dtype, 0 if params == "float32" else 2, xhat_error * total)
    _close(db0, db1, dtype, 0 if params == "float32" else 2, half.ulp(1.0, dtype) * total)


# --- the conformance kit's 16-bit cases -----------------------------------------------------------------------

def _float32_layernorm_forward(dtype):
    """A 16-bit kernel as the contract asks for: float64 statistics, float32 arithmetic, one rounding."""
    def kernel(x, weight, bias, eps, y, mean, rstd):
        x32 = half.widen(x, dtype, np.float32)
        x64 = x32.astype(np.float64)
        pivot = x64[:, :1]
        mu = pivot[:, 0] + (x64 - pivot).mean(axis=1)
        var = np.square(x64 - mu[:, None]).mean(axis=1)
        m32, r32 = mu.astype(np.float32), (1.0 / np.sqrt(var + eps)).astype(np.float32)
        v = (x32 - m32[:, None]) * r32[:, None]
        if weight is not None:
            v = v * weight
        if bias is not None:
            v = v + bias
        y[...] = half.narrow(v.astype(np.float32), dtype)
        mean[...], rstd[...] = m32, r32
    return kernel


def _broken(dtype, how):
    ref = reference.KERNELS[("layernorm", "forward", dtype)]

    def kernel(x, weight, bias, eps, y, mean, rstd):
        ref(x, weight, bias, eps, y, mean, rstd)
        v = half.widen(y, dtype)
        if how == "saturate":  # overflow clamped to the largest finite value instead of inf
            top = 65504.0 if dtype == "float16" else 3.3895313892515355e38
            v = np.clip(v, -top, top)
        elif how == "mean16":  # the mean rounded to 16 bits before subtracting
            x64 = half.widen(x, dtype)
            m16 = half.widen(half.narrow(mean.astype(np.float64), dtype), dtype)
            v = (x64 - m16[:, None]) * rstd[:, None]
            v = v * (1 if weight is None else weight) + (0 if bias is None else bias)
        elif how == "2ulp":
            v = v + 2 * half.ulp(v, dtype)
        elif how == "nan":
            v = np.nan_to_num(v, nan=0.0)
        y[...] = half.narrow(v, dtype)
    return kernel


def _register(name, make, dtypes=HALF_DTYPES):
    table = {("layernorm", "forward", d): make(d) for d in dtypes}
    normkit.register_backend(Backend(name, runtime_module(table), {"layernorm": ("forward",)}, dtypes=dtypes),
                             replace=True)
    return name


def test_reference_conforms_in_16_bit():
    report = testing.check_backend("reference", dtypes=HALF_DTYPES)
    assert report == [], report.format()
    assert report.cases_run > 600


def test_float32_arithmetic_16_bit_kernel_conforms():
    """The ulp bounds are not tighter than the contract's float32 arithmetic allows, offsets and overflow
    included."""
    name = _register("half_f32", _float32_layernorm_forward)
    try:
        report = testing.check_backend(name)
        assert report == [], report.format()
    finally:
        normkit.unregister_backend(name)


@pytest.mark.parametrize("how, checks", [("saturate", {"y"}), ("mean16", {"y"}), ("2ulp", {"y"}),
                                         ("nan", {"NaN propagation (y)", "inf propagation (y)"})])
def test_broken_16_bit_kernels_fail(how, checks):
    name = _register(f"half_{how}", lambda d: _broken(d, how))
    try:
        report = testing.check_backend(name)
    finally:
        normkit.unregister_backend(name)
    assert report and {f.check for f in report} == checks, report.format()
    assert {f.case.split()[2] for f in report} == set(HALF_DTYPES)
    if how == "saturate":
        assert all("data=overflow" in f.case for f in report)


def test_16_bit_cases_reach_the_range_limits():
    case = testing.Case("layernorm", "forward", "float16", (4, 129), None, "weight+bias", "overflow", 1e-5)
    inputs = testing._inputs(case)
    assert inputs["x"].dtype == np.uint16 and inputs["weight"].dtype == np.float32
    expected = testing._expected(case, inputs, testing._output_shapes(case, inputs))
    assert np.isinf(half.widen(half.narrow(expected["y"], "float16"), "float16")).any()
    # mean 1e4, std 1: float16's spacing there is 8, so the sets are constant; at 1e3 (spacing 0.5) they are not
    for data, mean, distinct in (("offset1e4", 1e4, 1), ("offset1e3", 1e3, 6)):
        offset = testing.Case("layernorm", "forward", "float16", (4, 129), None, "none", data, 1e-5)
        x = half.widen(testing._inputs(offset)["x"], "float16")
        assert abs(x.mean() - mean) < 1 and len(np.unique(x)) >= distinct


def test_backend_without_16_bit_is_unaffected():
    name = _register("f32_only", lambda d: reference.KERNELS[("layernorm", "forward", d)], dtypes=DEFAULT_DTYPES)
    try:
        report = testing.check_backend(name)
        assert report == [] and report.cases_run == sum(len(testing.cases("layernorm", "forward", d))
                                                        for d in DEFAULT_DTYPES)
    finally:
        normkit.unregister_backend(name)
