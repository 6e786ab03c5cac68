"""Every schedule of the numba kernels (NCHW), one float32 shape each: the conformance kit's check against the
reference, and identical results with one thread and two.

The kernels choose a schedule in Python from the shape (src/normkit_kernels/numba/batchnorm.py: each is compiled on
its own when a shape first needs it); the kit's own shapes take only some of them. The shapes here are small and each
asserts the schedule it is for, so that a change of the splitting constants that moves it elsewhere shows.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from normkit import registry, testing  # noqa: E402
from normkit.contract import SPECS, arg_dtype  # noqa: E402
from normkit_kernels.numba import _common, batchnorm, groupnorm  # noqa: E402
from normkit_kernels.numba import kernels as K  # noqa: E402

# (N, C, S) -> the schedule of BatchNorm training (forward and backward) and of the per-channel passes
CHANNEL = {
    (4, 16, 64): "fused channels",
    (8, 256, 4): "column tasks",
    (64, 32, 4): "small view",
    (40, 8, 36): "small view",  # S >= WIDE_S, but a batch of S or more (FLAT_S)
    (4, 4, 64): "rows",
    (2, 2, 9000): "pieces",
    (1024, 16, 4): "tiles",
    (16, 300, 8): "blocks",
}
# InstanceNorm and GroupNorm: whole sets or pieces (groups: None for InstanceNorm, one group per channel)
SETS = {((4, 16, 64), 4): "whole", ((1, 8, 5000), 2): "pieces", ((1, 2, 20000), None): "pieces"}
# LayerNorm and RMSNorm (M, K): whole rows or pieces in forward, short or long rows in LayerNorm's backward
ROWS = {(64, 100): "whole, short", (2, 20000): "pieces, long", (8, 8200): "whole, long"}


def _channel_schedule(shape) -> str:
    N, C, S = shape
    if batchnorm._fused_channels(N, C, S, 4, 1):
        return "fused channels"
    if batchnorm._column_tasks(N, C, S):
        return "column tasks"
    if batchnorm._small_view(N, C, S, 4):
        return "small view"
    return ("rows", "pieces", "tiles", "blocks")[batchnorm._channel_schedule(N, C, S)]


def test_each_shape_takes_its_schedule():
    # the training kernels try the fused, column and small-view schedules first; the per-channel passes do not
    assert {s: _channel_schedule(s) for s in CHANNEL if s != (16, 300, 8)} == {
        s: k for s, k in CHANNEL.items() if s != (16, 300, 8)}
    assert _channel_schedule((16, 300, 8)) == "column tasks"
    assert batchnorm._channel_schedule(16, 300, 8) == batchnorm._BLOCKS
    for (shape, groups), kind in SETS.items():
        assert groupnorm._whole_sets(np.empty(shape), groups or shape[1]) == (kind == "whole")
    for shape, kind in ROWS.items():
        assert ("whole" if _common.npieces(*shape) == 1 else "pieces") == kind.split(",")[0]
        assert ("short" if shape[1] <= 4 * _common.BLOCK else "long") == kind.split(", ")[1]


def _cases():
    table = [b for b in registry.list_backends(load=False) if b.name == "numba"][0].implements
    for op, direction, dtype in table:
        if dtype != "float32" or direction.startswith("act_"):  # the act_ kernels: one schedule (test_numba_act.py)
            continue
        sets = SPECS[op].sets
        if sets == "channel":
            shapes = [(s, None) for s in CHANNEL]
        elif sets in ("instance", "group"):
            shapes = [(s, g) for s, g in SETS if (g is None) == (sets == "instance")]
            if direction.endswith("_infer"):  # per-channel passes
                shapes = [(s, None) for s in CHANNEL if s[1] <= 16]
        else:
            shapes = [(s, None) for s in ROWS]
        affine = testing._SPLIT_AFFINE.get(direction, "weight+bias")
        for shape, groups in shapes:
            if testing._allowed(op, direction, shape):
                yield testing.Case(op, direction, dtype, shape, groups, affine, "normal", 1e-5)


CASES = list(_cases())


def _outputs(case: testing.Case, kernel) -> dict:
    inputs = testing._inputs(case)
    outs = {k: np.zeros(s, arg_dtype(case.direction, k, case.dtype))
            for k, s in testing._output_shapes(case, inputs).items() if s is not None}
    kernel(*testing._args(case, {**inputs, **dict.fromkeys(testing._output_shapes(case, inputs)), **outs}))
    return outs


@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_matches_reference_and_thread_count(case):
    kernel = registry.lookup(case.op, case.direction, case.dtype, "numba")[1]
    failures = []
    testing._run_case(case, kernel, failures)
    assert not failures, "\n".join(f"{f.check}: {f.message}" for f in failures)
    before = K.numba.get_num_threads()
    try:
        K.set_num_threads(1)
        one = _outputs(case, kernel)
        K.set_num_threads(2)
        two = _outputs(case, kernel)
    finally:
        K.set_num_threads(before)
    for name in one:
        assert one[name].tobytes() == two[name].tobytes(), f"{name} differs between 1 and 2 threads"


# The row ops' backward kernels sum into work memory that _common.work_arrays hands out again on the next call in
# the thread; each must clear what it uses. (M, K): short rows, LayerNorm's long rows, rows shared by pieces.
WORK_CASES = [
    testing.Case(op, direction, "float32", shape, None, "weight" if op == "rmsnorm" else "weight+bias", "normal",
                 1e-5, activation=0 if direction.startswith("act_") else None)
    for op, direction, shapes in [("layernorm", "backward", [(64, 100), (8, 8200), (2, 20000)]),
                                  ("layernorm", "act_backward", [(64, 100)]),
                                  ("rmsnorm", "backward", [(64, 100), (2, 70000)]),
                                  ("layernorm", "add_backward", [(64, 100), (2, 70000)])]
    for shape in shapes
]


@pytest.mark.parametrize("case", WORK_CASES, ids=str)
def test_row_backward_does_not_read_old_work_memory(case):
    kernel = registry.lookup(case.op, case.direction, case.dtype, "numba")[1]
    clean = _outputs(case, kernel)
    _common._work.buf.fill(0xFF)  # NaN in every float that a kernel would fail to clear
    dirty = _outputs(case, kernel)
    assert {k: v.tobytes() for k, v in dirty.items()} == {k: v.tobytes() for k, v in clean.items()}


def test_batchnorm_tiles_from_memory():
    """The tiles schedule's elementwise pass takes tiles of TILE_MEMORY values on float32 data of AHEAD_MIN_BYTES or
    more: inference on such an input gives the bits of calls on its halves (TILE-value tiles) and the reference's
    values."""
    n, c = batchnorm.AHEAD_MIN_BYTES // (4 * 16) + 3, 16
    assert batchnorm._channel_schedule(n, c, 1) == batchnorm._TILED and batchnorm.TILE_MEMORY < batchnorm.TILE
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, c, 1)) * 2 + 3).astype(np.float32)
    w, b, rm = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    rv = (rng.random(c) + 0.5).astype(np.float32)
    outs = {}
    for backend in ("numba", "reference"):
        kernel = registry.lookup("batchnorm", "forward_infer", "float32", backend)[1]
        outs[backend] = np.empty_like(x)
        kernel(x, w, b, rm, rv, 1e-5, outs[backend])
    halves = np.empty_like(x)
    for part in (slice(0, n // 2), slice(n // 2, n)):
        registry.lookup("batchnorm", "forward_infer", "float32", "numba")[1](x[part], w, b, rm, rv, 1e-5, halves[part])
    np.testing.assert_array_equal(outs["numba"], halves)
    np.testing.assert_allclose(outs["numba"], outs["reference"], rtol=1e-5, atol=1e-5)
