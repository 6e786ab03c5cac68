"""The Cython backend's kernels module: KERNELS, set_num_threads and INFO over the compiled extension modules.

The kernels are fused-type (float32/float64) Cython functions; each KERNELS entry is the specialization for its
dtype, so a call skips Cython's run-time dispatch on the argument types. The bfloat16 and float16 kernels take the
format as a first argument (0 bfloat16, 1 float16; the data are uint16 bit patterns either way), bound here.

Channels-last kernels (keys ending in "nhwc", arrays (N, S, C)), for all four dtypes: GroupNorm and InstanceNorm
training, plain and with a fused activation, are in _channels_last (16-bit twins of the plain ones; the activation
ones on 16-bit data are the float32 kernels on widened copies, as in NCHW). Every per-channel kernel (all of
BatchNorm's, and InstanceNorm's inference directions, which take running statistics) is the NCHW kernel on the
(N*S, C, 1) view: the same channels' values in the same order, which the NCHW kernels' columns schedule sums down
the columns of an (N*S, C) matrix, vectorized along C.

On x86-64, setup.py also builds the modules for x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512); the highest copy
this CPU supports is used, unless NORMKIT_CYTHON_BASELINE=1 asks for the baseline build or NORMKIT_CYTHON_NO_AVX512=1
for the x86-64-v3 copy at most (to test or compare them).
"""

from __future__ import annotations

import importlib
import os
from functools import partial

import numpy as np

from normkit import half
from normkit.contract import ACT_PREFIX, ADDRESS, OUTPUTS, PER_CHANNEL, SPECS, on_columns, serial_max_values
from normkit.registry import get_num_threads

from . import _batchnorm


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


_COPIES = [] if _env_flag("NORMKIT_CYTHON_BASELINE") else [
    c for c in _batchnorm.BUILD["x86_64_copies"] if not (c == "x86_64_v4" and _env_flag("NORMKIT_CYTHON_NO_AVX512"))]
if _COPIES:  # the highest
    _batchnorm, _channels_last, _groupnorm, _layernorm, _rownorm = (
        importlib.import_module(f"{__package__}.{_COPIES[-1]}.{m}")
        for m in ("_batchnorm", "_channels_last", "_groupnorm", "_layernorm", "_rownorm"))
else:
    from . import _channels_last, _groupnorm, _layernorm, _rownorm

_MODULES = (_batchnorm, _channels_last, _groupnorm, _layernorm, _rownorm)


def _module_of(function):
    return next(m for m in _MODULES if getattr(m, function.__name__, None) is function)


_CTYPE = {"float32": "float", "float64": "double"}

_FUNCTIONS = {
    ("batchnorm", "forward"): _batchnorm.batchnorm_forward,
    ("batchnorm", "forward_infer"): _batchnorm.channel_forward_infer,
    ("batchnorm", "backward"): _batchnorm.batchnorm_backward,
    ("batchnorm", "backward_infer"): _batchnorm.channel_backward_infer,
    ("batchnorm", "stats"): _batchnorm.batchnorm_stats,
    ("batchnorm", "apply"): _batchnorm.batchnorm_apply,
    ("batchnorm", "backward_reduce"): _batchnorm.batchnorm_backward_reduce,
    ("batchnorm", "backward_apply"): _batchnorm.batchnorm_backward_apply,
    ("instancenorm", "forward"): _groupnorm.instancenorm_forward,
    ("instancenorm", "forward_infer"): _batchnorm.channel_forward_infer,
    ("instancenorm", "backward"): _groupnorm.instancenorm_backward,
    ("instancenorm", "backward_infer"): _batchnorm.channel_backward_infer,
    ("groupnorm", "forward"): _groupnorm.groupnorm_forward,
    ("groupnorm", "backward"): _groupnorm.groupnorm_backward,
    ("layernorm", "forward"): _layernorm.layernorm_forward,
    ("layernorm", "backward"): _layernorm.layernorm_backward,
    ("layernorm", "add_forward"): _rownorm.layernorm_add_forward,
    ("layernorm", "add_backward"): _rownorm.layernorm_add_backward,
    ("rmsnorm", "forward"): _rownorm.rmsnorm_forward,
    ("rmsnorm", "backward"): _rownorm.rmsnorm_backward,
    ("rmsnorm", "add_forward"): _rownorm.rmsnorm_add_forward,
    ("rmsnorm", "add_backward"): _rownorm.rmsnorm_add_backward,
    ("batchnorm", "act_forward"): _batchnorm.batchnorm_act_forward,
    ("batchnorm", "act_forward_infer"): _batchnorm.channel_act_forward_infer,
    ("batchnorm", "act_backward"): _batchnorm.batchnorm_act_backward,
    ("batchnorm", "act_backward_infer"): _batchnorm.channel_act_backward_infer,
    ("instancenorm", "act_forward"): _groupnorm.instancenorm_act_forward,
    ("instancenorm", "act_forward_infer"): _batchnorm.channel_act_forward_infer,
    ("instancenorm", "act_backward"): _groupnorm.instancenorm_act_backward,
    ("instancenorm", "act_backward_infer"): _batchnorm.channel_act_backward_infer,
    ("groupnorm", "act_forward"): _groupnorm.groupnorm_act_forward,
    ("groupnorm", "act_backward"): _groupnorm.groupnorm_act_backward,
    ("layernorm", "act_forward"): _layernorm.layernorm_act_forward,
    ("layernorm", "act_backward"): _layernorm.layernorm_act_backward,
}

# Channels-last kernels that are the NCHW ones on (N*S, C, 1) views (see the module docstring): contract.PER_CHANNEL,
# the per-channel directions but the activation ones (NCHW only); and those of _channels_last
_CHANNELS_LAST = {
    ("instancenorm", "forward"): _channels_last.instancenorm_forward,
    ("instancenorm", "backward"): _channels_last.instancenorm_backward,
    ("groupnorm", "forward"): _channels_last.groupnorm_forward,
    ("groupnorm", "backward"): _channels_last.groupnorm_backward,
    ("instancenorm", "act_forward"): _channels_last.instancenorm_act_forward,
    ("instancenorm", "act_backward"): _channels_last.instancenorm_act_backward,
    ("groupnorm", "act_forward"): _channels_last.groupnorm_act_forward,
    ("groupnorm", "act_backward"): _channels_last.groupnorm_act_backward,
}


KERNELS = {
    (op, direction, dtype): function[_CTYPE[dtype]]
    for (op, direction), function in _FUNCTIONS.items()
    for dtype in _CTYPE
}
KERNELS.update({
    (op, direction, dtype, "nhwc"): on_columns(SPECS[op], direction, KERNELS[(op, direction, dtype)])
    for op, direction in PER_CHANNEL
    for dtype in _CTYPE
})
KERNELS.update({
    (op, direction, dtype, "nhwc"): function[_CTYPE[dtype]]
    for (op, direction), function in _CHANNELS_LAST.items()
    for dtype in _CTYPE
})

# Each fused kernel's 16-bit twin is its module's function of the same name with a 16 suffix. The fused activations
# have none (_act16); a kernel without a twin would run as its float32 kernel on widened copies.
_FORMATS = {"bfloat16": 0, "float16": 1}


def _sixteen_bit(op, direction, function, dtype):
    if direction.startswith("act_"):
        return _act16(op, direction, dtype)
    twin = getattr(_module_of(function), function.__name__ + "16", None)
    if twin is None:
        return half.through(KERNELS[(op, direction, "float32")], op, direction, dtype, np.float32)
    return partial(twin, _FORMATS[dtype])


# exponent bits that mark inf/NaN in a 16-bit pattern
_TOP = {"bfloat16": np.uint16(0x7F80), "float16": np.uint16(0x7C00)}


def _finite(a, dtype):
    if a.dtype == np.uint16:
        return not ((a & _TOP[dtype]) == _TOP[dtype]).any()
    return bool(np.isfinite(a).all())


def _with_float64_args(kernel64, op, direction):
    """kernel64 (a float64 kernel) called with float32 arguments as float64 copies, outputs copied back."""
    names, outputs = SPECS[op].args(direction), OUTPUTS[direction]

    def run(*args):
        wide = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a for a in args]
        kernel64(*wide)
        for name, a, w in zip(names, args, wide):
            if name in outputs and w is not a:
                a[...] = w

    return run


def _act16(op, direction, dtype, layout=()):
    """A fused-activation kernel on 16-bit data: the float32 kernel (of ``layout``: () NCHW, ("nhwc",)) on widened
    copies, and where that gives a non-finite output (float32 overflowing where the 16-bit result does not:
    bfloat16's range is float32's, or NaN/inf data) the float64 kernel again, as the native 16-bit loops recompute
    such a tile in double."""
    fast = half.through(KERNELS[(op, direction, "float32", *layout)], op, direction, dtype, np.float32)
    exact = half.through(_with_float64_args(KERNELS[(op, direction, "float64", *layout)], op, direction), op,
                         direction, dtype, np.float64)
    outputs = [i for i, name in enumerate(SPECS[op].args(direction)) if name in OUTPUTS[direction]]

    def act16(*args):
        fast(*args)
        if not all(args[i] is None or _finite(args[i], dtype) for i in outputs):
            exact(*args)

    return act16


KERNELS.update({
    (op, direction, dtype): _sixteen_bit(op, direction, function, dtype)
    for (op, direction), function in _FUNCTIONS.items()
    for dtype in _FORMATS
})
KERNELS.update({
    (op, direction, dtype, "nhwc"): on_columns(SPECS[op], direction, KERNELS[(op, direction, dtype)])
    for op, direction in PER_CHANNEL
    for dtype in _FORMATS
})
KERNELS.update({
    (op, direction, dtype, "nhwc"): _act16(op, direction, dtype, ("nhwc",)) if direction.startswith(ACT_PREFIX)
    else partial(getattr(_channels_last, function.__name__ + "16"), _FORMATS[dtype])
    for (op, direction), function in _CHANNELS_LAST.items()
    for dtype in _FORMATS
})

# The address kernels (normkit.contract): the kernels above taking memory by address
_ADDRESSES = {
    ("batchnorm", "forward"): _batchnorm.batchnorm_forward_addr,
    ("batchnorm", "backward"): _batchnorm.batchnorm_backward_addr,
    ("instancenorm", "forward"): _groupnorm.instancenorm_forward_addr,
    ("instancenorm", "backward"): _groupnorm.instancenorm_backward_addr,
    ("groupnorm", "forward"): _groupnorm.groupnorm_forward_addr,
    ("groupnorm", "backward"): _groupnorm.groupnorm_backward_addr,
    ("layernorm", "forward"): _layernorm.layernorm_forward_addr,
    ("layernorm", "backward"): _layernorm.layernorm_backward_addr,
    ("rmsnorm", "forward"): _rownorm.rmsnorm_forward_addr,
    ("rmsnorm", "backward"): _rownorm.rmsnorm_backward_addr,
}
KERNELS.update({
    (op, direction, dtype, ADDRESS): function[_CTYPE[dtype]]
    for (op, direction), function in _ADDRESSES.items()
    for dtype in _CTYPE
})
KERNELS.update({  # no argument of this one has the data's type: a function per type
    (op, "forward_infer", dtype, ADDRESS): getattr(_batchnorm, "channel_forward_infer_addr_" + _CTYPE[dtype])
    for op in ("batchnorm", "instancenorm")
    for dtype in _CTYPE
})
# and the 16-bit ones, the format bound as for the array kernels
KERNELS.update({
    (op, direction, dtype, ADDRESS): partial(getattr(_module_of(f), f.__name__.replace("_addr", "16_addr")),
                                             _FORMATS[dtype])
    for (op, direction), f in _ADDRESSES.items()
    for dtype in _FORMATS
})
KERNELS.update({
    (op, "forward_infer", dtype, ADDRESS): partial(_batchnorm.channel_forward_infer16_addr, _FORMATS[dtype])
    for op in ("batchnorm", "instancenorm")
    for dtype in _FORMATS
})

_build = _batchnorm.BUILD
INFO = {
    "openmp": "yes" if _build["openmp"] else _build["openmp_note"],
    "compile flags": _build["flags"],
    "modules": _batchnorm.__name__.rsplit(".", 1)[0],
    "float16 conversion": "F16C" if _batchnorm.F16C else "portable",
}


def set_num_threads(n: int) -> None:
    """Threads for every kernel's prange (ignored by a serial build)."""
    for module in _MODULES:
        module.set_num_threads(n)


def set_serial_max_values(n: int | None) -> None:
    """A kernel given at most ``n`` values runs on one thread (the results are the same on any number of threads);
    None restores the default (normkit.contract.serial_max_values; ``_common.pxd``: waking a second thread costs
    more than a pass over fewer values takes). The test suite sets 0, so that small inputs run on every thread."""
    for module in _MODULES:
        module.set_serial_max_values(SERIAL_MAX_VALUES if n is None else n)


SERIAL_MAX_VALUES = serial_max_values()


def last_level_cache_bytes() -> int | None:
    """This CPU's last-level cache in bytes (Linux sysfs), or None where it cannot be read."""
    try:
        levels = []
        base = "/sys/devices/system/cpu/cpu0/cache"
        for entry in os.listdir(base):
            if entry.startswith("index"):
                with open(os.path.join(base, entry, "level")) as f, open(os.path.join(base, entry, "size")) as g:
                    size = g.read().strip()
                    levels.append((int(f.read()), int(size[:-1]) * 1024 if size.endswith("K") else int(size)))
        return max(levels)[1] if levels else None
    except (OSError, ValueError):
        return None


# read once: the import's defaults below would otherwise scan sysfs once per module and once more for INFO
LLC_BYTES = last_level_cache_bytes()


# Outputs (forward y, backward dx) of at least STREAM_LLC_FRACTION of the last-level cache are written with
# non-temporal stores, by the modules where they win; where the cache size is unknown, from STREAM_FALLBACK_BYTES.
# Measured with benchmarks/nt_stores.py (2 threads, 32 MiB L3, idle, each kernel also followed by the next layer's
# read of its output) on two machines. One (a two-thread copy at ~45 GB/s): BatchNorm 0.85-0.89x forward and
# 0.93-0.95x backward from 25.7 MB up, LayerNorm 0.92-1.00x forward with the read, neutral backward. The other
# (~75 GB/s): BatchNorm 0.94-0.96x backward, 0.96-1.03x forward; LayerNorm (8192, 1024) forward 1.10-1.18x
# (a loss), (C,H,W) and backward neutral. So BatchNorm streams and LayerNorm does not. At half the cache they
# lose once the read is counted (it then comes from memory, not the cache), below that they lose outright.
# GroupNorm / InstanceNorm gained nothing (0.95-1.17x), so their module keeps ordinary stores. Their channels-last
# kernels (_channels_last), whose samples' rows stride across all channels, do stream: from 25.7 MB, idle, 2 threads,
# with the read, forward 0.91-0.99x and backward 0.86-0.94x (at 16.8 MB 0.93-1.04x / 0.87-0.88x; alone, channels-
# last BatchNorm 0.73-1.03x forward; `python benchmarks/nt_stores.py --layout nhwc`).
STREAM_LLC_FRACTION = 0.75
STREAM_FALLBACK_BYTES = 16 << 20
_STREAMING = (_batchnorm, _channels_last)
_NEVER = 1 << 62


def set_stream_min_bytes(n: int | None) -> None:
    """Outputs of ``n`` bytes or more are written with non-temporal stores (the results are the same, but for
    LayerNorm's backward with parameter gradients, whose dx then comes from a second loop rather than the one that
    adds up the gradients: a few elements differ in the last bit), by every module that has them (to measure or
    test them); None restores the defaults. A backward with a fused activation never streams."""
    for module in (_batchnorm, _channels_last, _groupnorm, _layernorm):
        if n is not None:
            module.set_stream_min_bytes(n)
        else:
            module.set_stream_min_bytes(default_stream_min_bytes() if module in _STREAMING else _NEVER)


def set_from_memory_bytes(n: int | None) -> None:
    """BatchNorm's columns schedule and the channels-last GroupNorm / InstanceNorm take data of ``n`` bytes or more
    as coming from memory, where their float32 and 16-bit column sums read rows wider than a step of registers whole
    (NORMKIT_COL_SUMS in _common.pxd; the same results, in another order of loads), to test or measure that path;
    None restores the default (FROM_MEMORY_BYTES)."""
    for module in (_batchnorm, _channels_last):
        module.set_from_memory_bytes(_batchnorm.DEFAULT_FROM_MEMORY_BYTES if n is None else n)


def default_stream_min_bytes() -> int:
    return int(LLC_BYTES * STREAM_LLC_FRACTION) if LLC_BYTES else STREAM_FALLBACK_BYTES


set_stream_min_bytes(None)


def set_pairs_max_bytes(n: int | None) -> None:
    """The backward of LayerNorm and RMSNorm takes rows of 2048 values or more (_common.pxd's PAIRS_MIN_ROW) two at
    a time where dy, x and dx together are at most ``n`` bytes (see _layernorm._backward_block; the results differ
    by a rounding of the parameter-gradient terms);
    None restores the default, the last-level cache's size (PAIRS_FALLBACK_BYTES where it is unknown)."""
    for module in (_layernorm, _rownorm):
        module.set_pairs_max_bytes(default_pairs_max_bytes() if n is None else n)


# where the cache size is unknown: half the 32 MiB of the machines measured, since the pairs lose 2-7% on data
# that comes from memory (see _layernorm._backward_block)
PAIRS_FALLBACK_BYTES = 16 << 20


def default_pairs_max_bytes() -> int:
    return LLC_BYTES or PAIRS_FALLBACK_BYTES


set_pairs_max_bytes(None)
INFO["row pairs"] = (f"layernorm and rmsnorm backward of rows of 2048 values and more, on "
                     f"{default_pairs_max_bytes() / 2**20:.0f} MiB and less")
INFO["non-temporal stores"] = (f"outputs of {default_stream_min_bytes() / 2**20:.0f} MiB and up (batchnorm; "
                                "channels-last groupnorm and instancenorm)")
set_num_threads(get_num_threads())
set_serial_max_values(None)
INFO["one thread"] = f"inputs of at most {SERIAL_MAX_VALUES} values"
