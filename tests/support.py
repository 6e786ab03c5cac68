"""Test helpers shared by the test modules (tests/ is on sys.path via pytest's ``pythonpath`` setting)."""

from __future__ import annotations

import numpy as np

from normkit import registry
from normkit.contract import OPS, SPECS  # noqa: F401  (OPS is re-exported for the test modules)

# Every built-in backend except the oracle itself. Taken from the installed entry points, not from what happens
# to load: a built-in that fails to load must fail these tests, not vanish from them.
BACKENDS = tuple(b.name for b in registry.list_backends(load=False) if b.builtin and b.name != registry.REFERENCE)

# Allowed error, relative to max(1, max |expected|), of a backend against the float64 reference run on the same
# input. float32 forward: the 1e-5 on standard-normal data; backward sums over whole sets, so 1e-4.
TOL = {
    ("float32", "forward"): 1e-5,
    ("float32", "backward"): 1e-4,
    ("float64", "forward"): 1e-10,
    ("float64", "backward"): 1e-9,
}


def assert_close(actual, expected, dtype, direction, what="", scale=None):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern differs")
    finite = np.isfinite(expected)
    if scale is None:
        scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
    tol = TOL[(str(dtype), direction)] * scale
    err = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
    assert err <= tol, f"{what} ({dtype}, {direction}): max error {err:.3g} > tolerance {tol:.3g}"
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=f"{what}: non-finite values differ")


def op_args(op: str, x: np.ndarray, rng, *, groups: int = 1, affine: str = "both", ln_dims: int | None = None,
            training: bool = True, running: bool = False):
    """Keyword arguments for ``normkit.get(op).forward`` / ``backward`` on input ``x``.

    ``affine``: "none", "weight", "bias" or "both" (no bias for rmsnorm). ``ln_dims``: how many trailing dims
    the row ops normalize over (default: all but the first). ``running``: give batchnorm/instancenorm running statistics.
    """
    spec = SPECS[op]
    c = x.shape[1]
    if spec.sets == "row":
        k = x.ndim - 1 if ln_dims is None else ln_dims
        pshape = x.shape[x.ndim - k:]
        kw = {"normalized_shape": pshape}
    else:
        pshape = (c,)
        kw = {}
    if spec.grouped:
        kw["num_groups"] = groups
    if affine in ("weight", "both"):
        kw["weight"] = rng.standard_normal(pshape).astype(x.dtype)
    if affine in ("bias", "both") and spec.centered:  # an uncentered op (rmsnorm) has no bias
        kw["bias"] = rng.standard_normal(pshape).astype(x.dtype)
    if spec.running:
        kw[spec.training_flag] = training
        if running or not training:
            kw["running_mean"] = rng.standard_normal(c).astype(x.dtype)
            kw["running_var"] = rng.uniform(0.5, 2.0, c).astype(x.dtype)
    return kw


def copy_args(kw: dict) -> dict:
    """Fresh copies of array arguments (running statistics are updated in place)."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def ulps(got, want_bits) -> int:
    """The largest distance in units in the last place between 16-bit arrays (got as values, want as bits): their
    patterns as integers ordered like the values (+-0 alike)."""
    def ordered(bits):
        b = bits.astype(np.int32)
        return np.where(b & 0x8000, -(b & 0x7FFF), b & 0x7FFF)
    return int(np.abs(ordered(got.view(np.uint16)) - ordered(want_bits)).max())
