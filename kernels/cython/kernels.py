"""The Cython backend's kernels module: KERNELS, set_num_threads and INFO over the compiled extension modules.

The kernels are fused-type (float32/float64) Cython functions; each KERNELS entry is the specialization for its
dtype, so a call skips Cython's run-time dispatch on the argument types.

On x86-64, setup.py also builds the modules for x86-64-v3 (AVX2, FMA); they are used when this CPU supports them,
unless NORMKIT_CYTHON_BASELINE=1 asks for the baseline build (to test or compare it).
"""

from __future__ import annotations

import os

from normkit.registry import get_num_threads

from . import _batchnorm

if _batchnorm.BUILD["use_x86_64_v3"] and os.environ.get("NORMKIT_CYTHON_BASELINE", "") in ("", "0"):
    from .x86_64_v3 import _batchnorm, _groupnorm, _layernorm, _rownorm
else:
    from . import _groupnorm, _layernorm, _rownorm

_MODULES = (_batchnorm, _groupnorm, _layernorm, _rownorm)
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
}

KERNELS = {
    (op, direction, dtype): function[_CTYPE[dtype]]
    for (op, direction), function in _FUNCTIONS.items()
    for dtype in _CTYPE
}

_build = _batchnorm.BUILD
INFO = {
    "openmp": "yes" if _build["openmp"] else _build["openmp_note"],
    "compile flags": _build["flags"],
    "modules": _batchnorm.__name__.rsplit(".", 1)[0],
}


def set_num_threads(n: int) -> None:
    """Threads for every kernel's prange (ignored by a serial build)."""
    for module in _MODULES:
        module.set_num_threads(n)


set_num_threads(get_num_threads())
