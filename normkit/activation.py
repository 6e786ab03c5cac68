"""The fused activations (:data:`normkit.contract.ACTIVATIONS`) in NumPy, and activation directions composed of a
plain kernel and these functions.

:func:`compose` is how the reference implements the ``act_`` directions (exactly, in float64), and how the
frontends run them on a backend that has the plain kernels but not the fused ones (in the kernel's dtype, at the
cost of a second pass over memory).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import checks, half, registry
from .contract import ACTIVATIONS, HALF_DTYPES, SPECS, plain_direction

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715
# NumPy has no erfc; libm's, element by element (the compiled kernels have theirs). Phi(z) = erfc(-z / sqrt(2)) / 2
# keeps the digits of a negative z's tail that 1 + erf(z / sqrt(2)) cancels (below z = -8 in float64)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def code(op: str, activation, negative_slope=0.01) -> tuple[int, float] | None:
    """``(index into ACTIVATIONS, slope)`` for an ``activation=`` argument, or None for ``activation=None``; a
    clear error for anything else."""
    if activation is None:
        return None
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        got = repr(activation) if isinstance(activation, str) else checks.describe(activation)
        raise checks.ArgumentError(f"{op}: activation must be None or one of "
                                   f"{', '.join(map(repr, ACTIVATIONS))}, got {got}")
    # x - x is 0 exactly for finite x: unlike math.isfinite, it works on the symbolic float that a module's
    # attribute becomes under torch.compile(dynamic=True)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) \
            or negative_slope - negative_slope != 0:
        got = repr(negative_slope) if isinstance(negative_slope, float) else checks.describe(negative_slope)
        raise checks.ArgumentError(f"{op}: negative_slope must be a finite number, got {got}")
    return ACTIVATIONS.index(activation), float(negative_slope)


def _sigmoid(z):
    # exp of -|z| only: no overflow for either sign
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def apply(act: int, z: np.ndarray, slope: float) -> np.ndarray:
    """act(z), computed in z's dtype."""
    name = ACTIVATIONS[act]
    if name == "relu":
        return np.maximum(z, 0)  # NaN stays NaN
    if name == "leaky_relu":
        return np.where(z > 0, z, z * z.dtype.type(slope))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "gelu":
        return (0.5 * z * _erfc(-z * _SQRT_HALF).astype(z.dtype)).astype(z.dtype)
    # 0.5 * (1 + tanh(u)) = sigmoid(2u), which keeps the digits that 1 + tanh(u) cancels for z << 0
    return (z * _sigmoid(2.0 * _TANH_C * (z + _TANH_K * z * z * z))).astype(z.dtype)


def derivative(act: int, z: np.ndarray, slope: float) -> np.ndarray:
    """act'(z), computed in z's dtype (relu: 0 where z <= 0, else 1, so 1 at a NaN z; leaky_relu: 1 where z > 0,
    else the slope; as in torch)."""
    name = ACTIVATIONS[act]
    if name == "relu":
        return (~(z <= 0)).astype(z.dtype)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, slope).astype(z.dtype)
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * _erfc(-z * _SQRT_HALF).astype(z.dtype)
        return (cdf + z * np.exp(-0.5 * z * z) * _INV_SQRT_2PI).astype(z.dtype)
    s = _sigmoid(2.0 * _TANH_C * (z + _TANH_K * z * z * z))
    return (s + z * 2.0 * s * (1.0 - s) * _TANH_C * (1.0 + 3.0 * _TANH_K * z * z)).astype(z.dtype)


def gradient(act: int, dy: np.ndarray, z: np.ndarray, slope: float) -> np.ndarray:
    """dy * act'(z) as torch's backward computes it: relu's is a select (its threshold_backward), so a unit whose
    z <= 0 passes 0 even where dy is NaN or infinite; the others multiply."""
    if ACTIVATIONS[act] == "relu":
        return np.where(z <= 0, dy.dtype.type(0.0), dy)
    return dy * derivative(act, z, slope)


def _z(spec, direction: str, v: dict, work) -> np.ndarray:
    """The plain forward's output (before the activation) recomputed from x, the statistics, weight and bias."""
    x = v["x"]
    kshape = x.shape
    mean, rstd = v["mean"].astype(work), v["rstd"].astype(work)
    if direction == "backward_infer":  # running statistics: per channel
        mean, rstd = mean[None, :, None], rstd[None, :, None]
    else:
        mean, rstd = spec.per_element(mean, kshape), spec.per_element(rstd, kshape)
    z = (x.astype(work) - mean) * rstd
    if v["weight"] is not None:
        z = z * spec.per_param(v["weight"].astype(work))
    if v["bias"] is not None:
        z = z + spec.per_param(v["bias"].astype(work))
    return z


def compose(plain_kernel, op: str, direction: str, exact: bool = False):
    """The ``direction`` (an ``act_`` one) kernel of ``op`` made of ``plain_kernel``, the plain direction's, and the
    functions above: forward applies the activation to the plain output, backward hands ``dy * act'(z)``
    (:func:`gradient`) to the plain backward. ``exact`` (the reference): everything in float64 and each output
    rounded once; otherwise in the kernel's dtype (float32 or float64)."""
    spec = SPECS[op]
    plain = plain_direction(direction)
    names, plain_names = spec.args(direction), spec.args(plain)

    if "forward" in plain:
        def run(*args):
            v = dict(zip(names, args))
            y = v["y"]
            if exact:
                v["y"] = np.empty(y.shape)
            plain_kernel(*(v[n] for n in plain_names))
            with np.errstate(over="ignore", invalid="ignore"):
                y[...] = apply(v["activation"], v["y"], v["slope"])
    else:
        def run(*args):
            v = dict(zip(names, args))
            work = np.float64 if exact else v["x"].dtype
            with np.errstate(over="ignore", invalid="ignore"):
                g = gradient(v["activation"], v["dy"].astype(work), _z(spec, plain, v, work), v["slope"])
            v["dy"] = g
            plain_kernel(*(v[n] for n in plain_names))

    return functools.wraps(plain_kernel)(run)


_composed: dict = {}


def kernel(op: str, direction: str, dtype: str, backend=None) -> tuple[str, object]:
    """``(backend, kernel)`` for an ``act_`` direction, from the backend that runs the op's plain kernels (the named
    one, or the first in the registry's order): its fused kernel where it has one, else its plain kernel composed
    with the activation (:func:`compose`), rather than another backend's fused kernel. 16-bit data compose the
    float32 plain kernel (the same backend's; for a backend with 16-bit kernels only, the registry order's)."""
    plain = plain_direction(direction)
    used, plain_kernel = registry.lookup(op, plain, dtype, backend)
    try:
        return registry.lookup(op, direction, dtype, used)
    except (ValueError, TypeError):
        pass
    key = (used, plain_kernel, op, direction, dtype)
    found = _composed.get(key)
    if found is None:
        if dtype in HALF_DTYPES:  # the plain 16-bit kernel would round z to 16 bits: compose in float32 instead
            try:
                inner = registry.lookup(op, plain, "float32", used)[1]
            except (ValueError, TypeError):
                inner = registry.lookup(op, plain, "float32")[1]
            found = half.through(compose(inner, op, direction), op, direction, dtype, np.float32)
        else:
            found = compose(plain_kernel, op, direction)
        if len(_composed) > 256:  # plain kernels of backends registered and dropped at run time
            _composed.clear()
        _composed[key] = found
    return used, found
