"""Numba kernels for the four ops, following :mod:`normkit.contract`: this module assembles the backend (KERNELS,
INFO, set_num_threads) from one module per kernel family, batchnorm.py (with the per-channel inference passes),
groupnorm.py (GroupNorm and InstanceNorm), layernorm.py, rownorm.py (RMSNorm and the fused residual add of the row
ops) and channels_last.py (the channel ops on (N, S, C) data), over the pieces they share in _common.py. The
kernels are cached on disk, keyed on the sources of the whole package (_cache.py).

How the work is split is a function of the shape only, never of the thread count (each family module describes
its splits), and partial sums are merged in a fixed order, so results are identical for any number of threads and
from run to run; _common.py (above _jit) says what keeps them so from process to process and wherever the arrays
sit in memory.

Statistics are a shifted single pass accumulated in float64: each set subtracts a pivot (its first element, or
0 if that is not finite) and sums d and d*d. The shift removes the cancellation of E[x^2] - E[x]^2; float64
keeps d*d of float32 data near 1e30 finite. All pieces of a set share its pivot, so merging is plain addition.

The elementwise passes run in the data's dtype as ``(x - mean) * scale + shift``: exact ``bias`` for a constant
input; the difference between the float64 mean and the mean rounded to the dtype is folded into ``shift``.

``fastmath`` is limited to flags that let LLVM vectorize float reductions (reassoc) and fuse multiply-adds,
without assuming the absence of NaN/inf (no ``nnan``/``ninf``), so non-finite inputs propagate as in the
reference.

The 16-bit dtypes (bfloat16, float16) are the same kernels: they load and store through _dtype16.py's ``widen`` /
``narrow``, computing in float32 (the dtype of their float arguments) with float64 sums as above, and round each
output element once (through the float64 kernel where float32 coefficients would overflow: COEF_LIMIT below). The
wrappers below view the contract's uint16 bit arrays as the numba type that names the format (uint16 for
bfloat16, int16 for float16).

Threads: normkit's thread count (set_num_threads) is the numba thread count each kernel sets in the calling thread
for its own parallel loops, the caller's count put back when it returns; numba's threading layer is started when
this backend loads, and it leaves PyTorch's and OpenMP's thread settings as they were (see _common.py).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import config

from normkit import half
from normkit.contract import DATA_ARGS, OUTPUTS, PER_CHANNEL, SPECS, kernel_table, on_columns

from . import _common
from ._cache import CACHE, jit
from ._common import FASTMATH, THREADING_LAYER, in_callers_threads, set_num_threads
from .batchnorm import (batchnorm_act_backward, batchnorm_act_forward, batchnorm_apply, batchnorm_backward,
                        batchnorm_backward_apply, batchnorm_backward_reduce, batchnorm_forward, batchnorm_stats,
                        channel_act_backward_infer, channel_act_forward_infer, channel_backward_infer,
                        channel_forward_infer)
from .channels_last import NHWC
from .groupnorm import (groupnorm_act_backward, groupnorm_act_forward, groupnorm_backward, groupnorm_forward,
                        instancenorm_act_backward, instancenorm_act_forward, instancenorm_backward,
                        instancenorm_forward)
from .layernorm import layernorm_act_backward, layernorm_act_forward, layernorm_backward, layernorm_forward
from .rownorm import (layernorm_add_backward, layernorm_add_forward, rmsnorm_add_backward, rmsnorm_add_forward,
                      rmsnorm_backward, rmsnorm_forward)

__all__ = ["INFO", "KERNELS", "set_num_threads"]

INFO = {
    "numba": numba.__version__,
    "threading layer": THREADING_LAYER,
    "max threads": str(config.NUMBA_NUM_THREADS),
    "fastmath": ",".join(sorted(FASTMATH)),
    "compile cache": "on" if CACHE else "off: no writable cache directory (set NUMBA_CACHE_DIR)",
    "one thread": f"inputs of at most {_common._serial_max} values",
}

_FUNCTIONS = {
    ("batchnorm", "forward"): batchnorm_forward,
    ("batchnorm", "forward_infer"): channel_forward_infer,
    ("batchnorm", "backward"): batchnorm_backward,
    ("batchnorm", "backward_infer"): channel_backward_infer,
    ("batchnorm", "stats"): batchnorm_stats,
    ("batchnorm", "apply"): batchnorm_apply,
    ("batchnorm", "backward_reduce"): batchnorm_backward_reduce,
    ("batchnorm", "backward_apply"): batchnorm_backward_apply,
    ("instancenorm", "forward"): instancenorm_forward,
    ("instancenorm", "forward_infer"): channel_forward_infer,
    ("instancenorm", "backward"): instancenorm_backward,
    ("instancenorm", "backward_infer"): channel_backward_infer,
    ("groupnorm", "forward"): groupnorm_forward,
    ("groupnorm", "backward"): groupnorm_backward,
    ("layernorm", "forward"): layernorm_forward,
    ("layernorm", "backward"): layernorm_backward,
}
# RMSNorm and the fused residual adds (rownorm.py)
_ROWNORM = {
    ("layernorm", "add_forward"): layernorm_add_forward,
    ("layernorm", "add_backward"): layernorm_add_backward,
    ("rmsnorm", "forward"): rmsnorm_forward,
    ("rmsnorm", "backward"): rmsnorm_backward,
    ("rmsnorm", "add_forward"): rmsnorm_add_forward,
    ("rmsnorm", "add_backward"): rmsnorm_add_backward,
}
# The fused activations (float32 / float64 loops; the 16-bit ones are those on widened copies)
_ACT = {
    ("batchnorm", "act_forward"): batchnorm_act_forward,
    ("batchnorm", "act_forward_infer"): channel_act_forward_infer,
    ("batchnorm", "act_backward"): batchnorm_act_backward,
    ("batchnorm", "act_backward_infer"): channel_act_backward_infer,
    ("instancenorm", "act_forward"): instancenorm_act_forward,
    ("instancenorm", "act_forward_infer"): channel_act_forward_infer,
    ("instancenorm", "act_backward"): instancenorm_act_backward,
    ("instancenorm", "act_backward_infer"): channel_act_backward_infer,
    ("groupnorm", "act_forward"): groupnorm_act_forward,
    ("groupnorm", "act_backward"): groupnorm_act_backward,
    ("layernorm", "act_forward"): layernorm_act_forward,
    ("layernorm", "act_backward"): layernorm_act_backward,
}

# the integer type whose numba type picks each 16-bit format, for its bit arrays (see _dtype16.py)
_FORMATS = {"bfloat16": np.uint16, "float16": np.int16}


def _sixteen_bit(f, op, direction, bits):
    """The kernel f for 16-bit data: the data arrays viewed as ``bits`` (no copy), everything else as given."""
    at = tuple(i for i, name in enumerate(SPECS[op].args(direction)) if name in DATA_ARGS)

    def kernel(*args):
        args = list(args)
        for i in at:
            if args[i] is not None:  # add_backward's optional dh
                args[i] = args[i].view(bits)
        f(*args)
    kernel.__name__ = kernel.__qualname__ = f"{f.__name__}_{np.dtype(bits).name}"
    kernel.__doc__ = f.__doc__
    return kernel


# The 16-bit kernels compute in float32 with per-set coefficients: rstd * weight scales y and dx, rstd**2 * weight
# one of dx's terms. A tiny variance with a huge weight (std 0.01, weights of 1e38: the results themselves are
# finite) takes those beyond float32's range, and the float32 passes would give inf or NaN. Past COEF_LIMIT (far
# beyond any trained model's, which stay near rstd <= 1/sqrt(eps) with weights near 1; the margin of 2**64 below
# float32's top leaves room for dy and the set size) a call runs again through the float64 kernel on widened
# copies, which rounds each output once as the reference does. Detected from the statistics only: O(sets + C).
COEF_LIMIT = 2.0 ** 64


@jit(nogil=True, error_model="numpy")
def _coefficients_overflow(r, w, infer_eps):
    """Whether max(rstd) * max(1, max(rstd)) * max|weight| passes COEF_LIMIT; r is rstd, or running_var when
    infer_eps >= 0 (rstd = 1 / sqrt(running_var + eps)). NaNs are skipped (they propagate on either path)."""
    rmax = 0.0
    for v in r.flat:
        v = np.float64(v)
        if infer_eps >= 0.0:
            v = 1.0 / np.sqrt(v + infer_eps)
        if v > rmax:
            rmax = v
    wmax = 1.0
    if w is not None:
        wmax = 0.0
        for v in w.flat:
            a = abs(np.float64(v))
            if a > wmax:
                wmax = a
    return rmax * max(1.0, rmax) * wmax > COEF_LIMIT


def _guarded(kernel, op, direction, dtype, float64_kernel):
    """The 16-bit ``kernel`` with the float64 redo above: checked before the call where the statistics are
    inputs (backward directions; inference from the running variance), after it where the call computes them."""
    names = SPECS[op].args(direction)
    if "weight" not in names:
        return kernel  # the split directions: their coefficients arrive as float32 arguments
    infer = "running_var" in names
    r_at = names.index("running_var" if infer else "rstd")
    w_at, eps_at = names.index("weight"), names.index("eps") if infer else None
    after = "rstd" in OUTPUTS[direction]
    redo = half.through(_float64_params(float64_kernel, names, OUTPUTS[direction]), op, direction, dtype)

    def overflows(args):
        return _coefficients_overflow(args[r_at], args[w_at], float(args[eps_at]) if infer else -1.0)

    def run(*args):
        if after:
            kernel(*args)
            if overflows(args):
                redo(*args)
        elif overflows(args):
            redo(*args)
        else:
            kernel(*args)
    run.__name__ = run.__qualname__ = kernel.__name__
    run.__doc__ = kernel.__doc__
    return run


def _float64_params(kernel, names, outputs):
    """kernel (a float64 one) called with its float32 arguments (weights, statistics) as float64 copies, the float32
    outputs among them written back: the kernels compute in the dtype of these arguments."""
    def run(*args):
        args, back = list(args), []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray) and a.dtype == np.float32:
                args[i] = a.astype(np.float64)
                if names[i] in outputs:
                    back.append((a, args[i]))
        kernel(*args)
        for out, wide in back:
            out[...] = wide
    return run


KERNELS = kernel_table({**_FUNCTIONS, **_ROWNORM, **_ACT}, dtypes=("float32", "float64"))
KERNELS.update({(op, direction, dtype): _guarded(_sixteen_bit(f, op, direction, bits), op, direction, dtype,
                                                 KERNELS[(op, direction, "float64")])
                for (op, direction), f in {**_FUNCTIONS, **_ROWNORM}.items() for dtype, bits in _FORMATS.items()})
KERNELS.update({(op, direction, dtype): _guarded(half.through(KERNELS[(op, direction, "float32")], op, direction,
                                                              dtype, np.float32),
                                                 op, direction, dtype, KERNELS[(op, direction, "float64")])
                for op, direction in _ACT for dtype in _FORMATS})
# the channels-last kernels (normkit.contract): (op, direction, dtype, "nhwc"), arrays (N, S, C); float32 and
# float64 only (contract.LAYOUT_DTYPES): the per-channel directions' NCHW kernels on the (N*S, C, 1) view, as the
# Cython backend's, replaced by channels_last.py's where it has one
KERNELS.update({(op, direction, dtype, "nhwc"): on_columns(SPECS[op], direction, KERNELS[(op, direction, dtype)])
                for op, direction in PER_CHANNEL for dtype in ("float32", "float64")})
KERNELS.update({(op, direction, dtype, "nhwc"): f for (op, direction), f in NHWC.items()
                for dtype in ("float32", "float64")})
# numba's thread count, which the kernels set for themselves, is the caller's again after each call (_common.py)
KERNELS = {key: in_callers_threads(f) for key, f in KERNELS.items()}
