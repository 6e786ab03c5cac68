"""The numba kernels' results depend neither on where the allocator puts their arrays and temporaries nor, for
float32, on whether the process compiled a kernel or loaded it from numba's disk cache;
src/normkit_kernels/numba/_common.py (above _jit) says how either could happen, and why float64 results still can
differ between those processes.

In one process, each kernel runs again and again on the same inputs, and every call must give the bits of the
first, while what surrounds its arrays changes from call to call: each array (the inputs, copied to another
alignment each time, the outputs, and room for the arrays the kernel's Python wrapper makes) is allocated right
after a small numba block of a changing size, and the blocks are given back just before the call, so that the
small temporaries the kernel allocates (merge buffers, the zero-size placeholders of absent arguments) land next to
one of its arrays, a different one each time. A loop whose vectorized and scalar versions disagree, one or the
other chosen at run time by an overlap check between such arrays, fails here: LayerNorm's act_ backward, loaded
from the cache, did within 40 calls (its dx loop was checked against the range of a zero-size placeholder). The
cases: the schedules that merge partial sums, and absent weights and biases (the placeholders), one small float32
shape each.

In two processes: LayerNorm's backward without a weight, compiled in one and loaded from the cache in the other,
whose dx differed in about 10% of the values by an ulp.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from normkit import testing  # noqa: E402
from normkit.contract import ACTIVATIONS, SPECS, arg_dtype  # noqa: E402
from normkit_kernels.numba import kernels as K  # noqa: E402

CALLS = 40


@numba.njit
def _numba_array(n):
    """A numba-allocated array of n bytes: from the allocator the kernels' own temporaries come from."""
    return np.empty(n, np.uint8)


def _case(op, direction, shape, groups=None, affine="none", activation=None, layout="nchw"):
    return testing.Case(op, direction, "float32", shape, groups, affine, "normal", 1e-5, layout=layout,
                        activation=None if activation is None else ACTIVATIONS.index(activation))


CASES = [
    # BatchNorm's per-channel sums merged over (n, c, piece) items, and in column blocks and tiles (batchnorm.py)
    _case("batchnorm", "forward", (2, 2, 9000)),
    _case("batchnorm", "backward", (2, 2, 9000)),
    _case("batchnorm", "backward", (1024, 16, 4)),
    _case("batchnorm", "backward", (16, 300, 8), affine="weight+bias"),
    # the act_ passes' per-row sums merged over pieces, and their placeholders
    _case("batchnorm", "act_backward", (2, 2, 9000), activation="silu"),
    _case("groupnorm", "act_forward", (1, 8, 5000), groups=2, activation="relu"),
    _case("layernorm", "act_backward", (3, 1000), activation="gelu_tanh"),
    _case("layernorm", "act_backward", (3, 1000), affine="weight+bias", activation="gelu"),
    # sets and rows cut into pieces; parameter gradients merged over row blocks
    _case("groupnorm", "forward", (1, 8, 5000), groups=2),
    _case("groupnorm", "backward", (1, 8, 5000), groups=2),
    _case("layernorm", "forward", (2, 20000)),
    _case("layernorm", "backward", (64, 100)),
    _case("layernorm", "backward", (2, 20000), affine="weight+bias"),
    _case("layernorm", "add_backward", (64, 100)),
    _case("rmsnorm", "backward", (64, 100), affine="weight"),
    _case("groupnorm", "backward", (2, 16, 300), groups=4, layout="nhwc"),
]


def _key(case):
    return (case.op, case.direction, case.dtype) + (() if case.layout == "nchw" else (case.layout,))


def _call(case, inputs, shapes, i):
    """The kernel's outputs (bytes) on call i; from i = 1 on, each array comes after a numba block of 16 * (i % 8)
    bytes, given back before the call, the one before the (i mod their number)-th array last (the first the
    allocator hands out again), and the inputs start 4 * (i % 16) bytes past a 64-byte boundary."""
    blocks = []

    def array(shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if i:
            blocks.append(_numba_array(16 * (i % 8)))
        buf = np.empty(nbytes + 128, np.uint8)
        start = (-buf.ctypes.data) % 64 + 4 * (i % 16)
        return buf[start:start + nbytes].view(dtype).reshape(shape)

    args = {**inputs, **dict.fromkeys(shapes)}
    for name, v in inputs.items():
        if v is not None:
            v = np.ascontiguousarray(testing._in_layout(case, name, v))
            args[name] = array(v.shape, v.dtype)
            args[name][...] = v
    outs = {}
    for name, shape in shapes.items():
        if shape is not None:
            outs[name] = args[name] = array(testing._layout_shape(case, name, shape),
                                            arg_dtype(case.direction, name, case.dtype))
            outs[name][...] = 0
    # room, after blocks too, for the arrays the wrapper makes (ones and zeros for an absent weight and bias)
    room = [array(SPECS[case.op].param_shape(case.shape), np.float32) for _ in range(2)]
    room.clear()
    k = i % max(1, len(blocks))
    order = blocks[k + 1:] + blocks[:k + 1]
    blocks.clear()
    while order:
        order.pop(0)
    with np.errstate(all="ignore"):
        K.KERNELS[_key(case)](*testing._args(case, args))
    return {name: v.tobytes() for name, v in outs.items()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_bits_wherever_the_arrays_sit(case):
    inputs = testing._inputs(case)
    shapes = testing._output_shapes(case, inputs)
    first = _call(case, inputs, shapes, 0)
    for i in range(1, CALLS):
        outs = _call(case, inputs, shapes, i)
        for name in first:
            assert outs[name] == first[name], f"{name} changed on call {i + 1} of {CALLS}"


SCRIPT = r"""
import hashlib
import numpy as np
from normkit import testing
from normkit_kernels.numba import kernels

case = testing.Case("layernorm", "backward", "float32", (64, 100), None, "none", "normal", 1e-5)
inputs = testing._inputs(case)
shapes = testing._output_shapes(case, inputs)
outs = {k: np.zeros(s, np.float32) for k, s in shapes.items() if s is not None}
kernels.KERNELS[("layernorm", "backward", "float32")](*testing._args(case, {**inputs, **dict.fromkeys(shapes), **outs}))
print({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in outs.items()})
"""


def test_same_bits_compiled_or_loaded_from_cache(tmp_path):
    # an empty cache of its own: the first process compiles the kernel (about 5 s), the second loads it
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert any(tmp_path.rglob("*.nbi")), "nothing was cached: the second process compiled again"
    compiled, loaded = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert compiled == loaded, f"compiled: {compiled}\nloaded from the cache: {loaded}"
