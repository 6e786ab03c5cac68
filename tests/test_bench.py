"""normkit bench: the case table, the arithmetic, the measurement loop, the PyTorch baseline and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import normkit
from normkit import bench, cases, registry
from normkit.cases import Case
from normkit.cli import main

TINY = ["--shape", "2,8,4,4", "--repeat", "3"]
HAS_TORCH = bench.bench_torch.available()
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def run(*args):
    return CliRunner().invoke(main, ["bench", *args])


# --- the case table --------------------------------------------------------------------------------------------

def test_reference_cases_are_the_readme_table():
    got = {(c.op, c.shape, c.groups, c.normalized_shape, c.dtype) for c in cases.case_set("reference")}
    assert got == {
        ("batchnorm", (32, 64, 56, 56), None, None, "float32"),
        ("batchnorm", (64, 256, 14, 14), None, None, "float32"),
        ("batchnorm", (256, 1024), None, None, "float32"),
        ("groupnorm", (8, 256, 56, 56), 32, None, "float32"),
        ("groupnorm", (32, 64, 56, 56), 16, None, "float32"),
        ("layernorm", (32, 64, 56, 56), None, (64, 56, 56), "float32"),
        ("layernorm", (8192, 1024), None, (1024,), "float32"),
        ("instancenorm", (32, 64, 56, 56), None, None, "float32"),
    }
    assert len({c.id for c in cases.case_set("reference")}) == 8


@pytest.mark.parametrize("case, kernel_shape, stat_shape, param_shape", [
    (Case("bn", (32, 64, 56, 56)), (32, 64, 3136), (64,), (64,)),
    (Case("bn", (256, 1024)), (256, 1024, 1), (1024,), (1024,)),
    (Case("in", (2, 3, 4, 5)), (2, 3, 20), (2, 3), (3,)),
    (Case("gn", (8, 256, 56, 56), groups=16), (8, 256, 3136), (8, 16), (256,)),
    (Case("ln", (32, 64, 56, 56)), (32, 200704), (32,), (200704,)),
    (Case("ln", (4, 6, 5), ln_dims=1), (24, 5), (24,), (5,)),
])
def test_kernel_view_of_a_case(case, kernel_shape, stat_shape, param_shape):
    assert (case.kernel_shape, case.stat_shape, case.param_shape) == (kernel_shape, stat_shape, param_shape)


def test_bytes_moved_counts_only_the_big_arrays():
    gn = Case("gn", (8, 256, 56, 56), groups=16)
    one = 8 * 256 * 56 * 56 * 4
    assert gn.nbytes == one
    assert gn.bytes_moved("forward") == 2 * one   # read x, write y
    assert gn.bytes_moved("backward") == 3 * one  # read x and dy, write dx
    assert gn.with_dtype("float64").bytes_moved("backward") == 6 * one
    assert Case("ln", (8192, 1024)).bytes_moved("forward") == 2 * 8192 * 1024 * 4


def test_gb_per_s():
    assert bench.gb_per_s(2_000_000_000, 0.5) == pytest.approx(4.0)


def test_case_arguments_follow_the_contract():
    case = Case("gn", (2, 8, 3), groups=4)
    inputs, out = case.make_inputs(), case.empty_outputs("forward")
    args = case.forward_args(inputs, out)
    assert args[0] is inputs["x"] and args[1] == 4 and args[5] is out["y"]
    stats = {"mean": out["mean"], "rstd": out["rstd"]}
    grads = case.empty_outputs("backward")
    args = case.backward_args(inputs, stats, grads)
    assert args[:3] == (inputs["dy"], inputs["x"], 4) and args[6] is grads["dx"]
    assert len(Case("bn", (2, 8, 3)).backward_args(inputs, stats, grads)) == 8


# the fused activations on tiny cases of each op
SMALL_FUSED = (Case("batchnorm", (4, 8, 5, 5), activation="relu"),
               Case("groupnorm", (2, 8, 4, 4), groups=4, activation="silu"),
               Case("layernorm", (3, 8, 5), ln_dims=2, activation="gelu"),
               Case("instancenorm", (2, 4, 3, 3), activation="leaky_relu"))


@pytest.mark.parametrize("case", cases.case_set("small") + SMALL_FUSED, ids=lambda c: c.id)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_small_cases_run_on_the_reference_and_agree_with_the_frontend(case, direction):
    """The table's argument layout computes what normkit's own frontend computes."""
    inputs = case.make_inputs(seed=3)
    got = bench.prepare(case, direction, "reference", inputs).output()
    op = normkit.get(case.op)
    x = inputs["x"].reshape(case.shape)
    kw = {"weight": inputs["weight"], "bias": inputs["bias"]}
    if case.op == "groupnorm":
        kw["num_groups"] = case.groups
    if case.op == "layernorm":
        kw = {"normalized_shape": case.normalized_shape, **{k: v.reshape(case.normalized_shape) for k, v in kw.items()}}
    if case.op == "batchnorm":
        kw["training"] = True
    if case.activation:
        kw.update(activation=case.activation, negative_slope=cases.NEGATIVE_SLOPE)
    y, saved = op.forward(x, backend="reference", **kw)
    if direction == "forward":
        assert set(got) == {"y"}
        np.testing.assert_array_equal(got["y"], y.reshape(case.kernel_shape))
        return
    dx, dweight, dbias = op.backward(inputs["dy"].reshape(case.shape), x, saved, backend="reference", **kw)
    assert set(got) == {"dx", "dweight", "dbias"}
    np.testing.assert_array_equal(got["dx"], dx.reshape(case.kernel_shape))
    np.testing.assert_array_equal(got["dweight"], dweight.reshape(-1))
    np.testing.assert_array_equal(got["dbias"], dbias.reshape(-1))


@needs_torch
@pytest.mark.parametrize("case", cases.case_set("small") + SMALL_FUSED, ids=lambda c: c.id)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_torch_baseline_computes_the_same_pass(case, direction):
    """The baseline is PyTorch's kernel for the same training pass (instance norm included)."""
    case = case.with_dtype("float64")
    inputs = case.make_inputs(seed=4)
    expected = bench.prepare(case, direction, "reference", inputs).output()
    got = bench.prepare(case, direction, "pytorch", inputs).output()
    assert set(got) == set(expected)  # (the parameters' gradients too, which the bench's check compares)
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-9, err_msg=name)


# --- selecting cases -------------------------------------------------------------------------------------------

def test_fused_case_errors():
    with pytest.raises(ValueError, match="rmsnorm: has no fused activation"):
        Case("rmsnorm", (4, 8), activation="relu")
    with pytest.raises(ValueError, match="activation must be one of .*got 'tanh'"):
        Case("groupnorm", (2, 8, 4), activation="tanh")
    assert Case("bn", (4, 8, 3), activation="relu").label == "batchnorm+relu 4x8x3 float32"


def test_select_cases_defaults():
    chosen = cases.select_cases()
    assert [c.op for c in chosen] == ["batchnorm", "layernorm", "instancenorm", "groupnorm", "rmsnorm"]
    assert {c.shape for c in chosen} == {(8, 256, 56, 56)}
    assert chosen[3].groups == 32 and chosen[1].normalized_shape == (256, 56, 56)
    assert cases.select_cases("gn", shape=(2, 24, 5))[0].groups == 24  # largest divisor of 24 below 32
    assert cases.select_cases("gn", shape=(2, 48, 5))[0].groups == 24
    assert [c.id for c in cases.select_cases("gn", cases="reference")] == [
        "groupnorm-8x256x56x56-g32-float32", "groupnorm-32x64x56x56-g16-float32"]
    assert {c.dtype for c in cases.select_cases(cases="small", dtype="float64")} == {"float64"}


@pytest.mark.parametrize("kwargs, message", [
    ({"op": "gn", "groups": 7}, "groups=7 must divide the C=256 channels; valid groups: 1, 2, 4, 8, 16, 32, 64, 128, "
                                "256"),
    ({"op": "bn", "groups": 4}, "groups applies to groupnorm only"),
    ({"op": "gn", "cases": "reference", "shape": (2, 4)}, "do not combine it with shape or groups"),
    ({"op": "bn", "cases": [Case("gn", (2, 4, 3), groups=2)]}, "the case set has no case for bn"),
    ({"cases": "huge"}, "unknown case set 'huge'; known: reference, small"),
    ({"op": "in", "shape": (4, 3)}, "instancenorm: training needs more than 1 value per normalized set"),
    ({"op": "bn", "shape": (1, 3)}, "batchnorm: training needs more than 1 value per normalized set"),
])
def test_select_cases_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cases.select_cases(**kwargs)


@pytest.mark.parametrize("text", ["8,256,56,56", "8x256x56x56", "(8, 256, 56, 56)", " 8 256 56 56 ", "[8,256,56,56]"])
def test_parse_shape(text):
    assert cases.parse_shape(text) == (8, 256, 56, 56)


@pytest.mark.parametrize("text", ["8", "8,a", "8,0,3", "", "8,-1", "2,,4", "2,8,", "2_0,8", "8,4.5"])
def test_parse_shape_rejects(text):
    with pytest.raises(ValueError, match="shape"):
        cases.parse_shape(text)


# --- statistics and the loop -----------------------------------------------------------------------------------

def test_ratio_is_taken_per_round_then_the_median():
    a, b = [1.0, 4.0, 9.0], [2.0, 2.0, 10.0]
    assert bench.paired_ratio(a, b)[1] == pytest.approx(0.9)  # ratios 0.5, 2, 0.9
    assert np.median(a) / np.median(b) == pytest.approx(2.0)  # what a ratio of medians would have said


def test_paired_ratio_cancels_drift():
    drift = np.array([1.0, 5.0, 1.5, 9.0, 2.0, 1.0, 7.0])  # the machine slows down and recovers
    torch_t, ours = 2e-3 * drift, 1e-3 * drift
    p10, med, p90 = bench.paired_ratio(ours, torch_t)
    assert (p10, med, p90) == pytest.approx((0.5, 0.5, 0.5))
    p10, med, p90 = bench.spread(ours)
    assert p10 < med < p90


def test_measure_interleaves_in_shuffled_rounds():
    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    times = bench._measure(calls, repeat=60, min_time=0, tick=lambda f: None)
    assert times.shape == (3, 60) and (times > 0).all()
    rounds = [tuple(log[i:i + 3]) for i in range(0, len(log), 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)  # each contender once per round
    assert len(set(rounds)) == 6  # every order occurs: no fixed neighbours
    followers = {(a, b) for r in rounds for a, b in zip(r, r[1:])}
    assert len(followers) == 6


def test_measure_min_time_bounds_the_rounds():
    times = bench._measure([lambda: None], repeat=None, min_time=0, tick=lambda f: None)
    assert times.shape == (1, bench.MIN_ROUNDS)
    times = bench._measure([lambda: None], repeat=None, min_time=1e9, tick=lambda f: None)
    assert times.shape == (1, bench.MAX_ROUNDS)


def test_recycled_memory_does_not_fault_again():
    if bench.recycle_freed_memory() is None:
        pytest.skip("not glibc")
    size = 48 * 2**20  # above glibc's largest dynamic mmap threshold (32 MB)
    np.ones(size, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.ones(size, np.uint8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000, f"{faults} page faults for 5 reallocations of {size >> 20} MB"


def test_bench_gives_freed_memory_back_after_its_run():
    """bench() recycled freed memory (recycle_freed_memory) for the rest of the process: afterwards a freed large
    array stayed resident, so a program that benchmarked once kept every peak. It now does so for its run only,
    and leaves recycling on where the caller had turned it on. In a child: the setting is process-wide."""
    script = r"""
import sys, numpy as np
import normkit.bench as bench
def held():  # MiB still resident after a 256 MiB array is freed
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1])
    a = np.ones(256 << 20, np.uint8)
    del a
    with open("/proc/self/statm") as f:
        return (int(f.read().split()[1]) - before) * 4096 >> 20
def run():
    bench.bench("layernorm", shape=(4, 64), backends=["reference"], baseline=False, repeat=5, min_time=0.0)
print(held(), end=" ")
run()
print(held(), end=" ")
if bench.recycle_freed_memory() is None:
    sys.exit(3)
run()
print(held())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if out.returncode == 3:
        pytest.skip("not glibc")
    assert out.returncode == 0, out.stderr
    before, after, recycling = map(int, out.stdout.split())
    assert before < 64 and after < 64, out.stdout
    assert recycling > 192, "bench() turned off the recycling its caller had turned on"


# --- the library function --------------------------------------------------------------------------------------

def test_default_backends_leave_out_the_reference():
    assert bench.default_backends() == [n for n in registry.get_backend_order() if n != "reference"]


def test_bench_rows_and_ratios():
    result = bench.bench("gn", shape=(2, 8, 4, 4), groups=2, backends=["reference"], repeat=4)
    kinds = [(r.direction, r.name, r.kind) for r in result.rows]
    want = [("forward", "reference", "backend")] + ([("forward", "pytorch", "baseline")] if HAS_TORCH else [])
    want = want + [("forward", "copy", "copy"), ("forward", "read", "read")]
    assert kinds == want + [(("backward",) + k[1:]) for k in want]
    for r in result.rows:
        assert r.rounds == 4 and r.p10_s <= r.median_s <= r.p90_s
        assert r.gb_per_s == pytest.approx(r.bytes / r.median_s / 1e9)
        assert r.bytes == (2 if r.direction == "forward" else 3) * 2 * 8 * 16 * 4
    copy = [r for r in result.rows if r.kind == "copy"]
    assert all(r.pct_of_copy == pytest.approx(100.0) for r in copy)
    read = [r for r in result.rows if r.kind == "read"]
    assert all(r.pct_of_read == pytest.approx(100.0) for r in read)
    assert all(r.ratio_to_best is None for r in result.rows)  # no torch.compile peer asked for
    if HAS_TORCH:
        base = [r for r in result.rows if r.kind == "baseline"]
        assert all(r.ratio_to_torch == pytest.approx(1.0) for r in base)
        assert all(r.check == "ok" for r in result.rows if r.kind == "backend")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_16_bit(dtype):
    """16-bit data (half the bytes of float32), float32 parameters; PyTorch's kernels on the same memory agree."""
    result = bench.bench("all", shape=(2, 8, 4, 4), groups=2, dtype=dtype, backends=["reference"], repeat=2)
    for r in result.rows:
        assert r.bytes == (2 if r.direction == "forward" else 3) * 2 * 8 * 16 * 2
    if HAS_TORCH:
        assert all(r.check == "ok" for r in result.rows if r.kind == "backend")
        assert {r.op for r in result.rows if r.kind == "baseline"} == {"batchnorm", "groupnorm", "layernorm",
                                                                       "instancenorm", "rmsnorm"}


@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_16_bit_fused_add(dtype):
    """The fused residual add's baseline sees the 16-bit residual and h-gradient as torch's 16-bit dtype, as x."""
    add = [Case(op, (4, 16), add=True) for op in ("layernorm", "rmsnorm")]
    result = bench.bench("all", cases=add, dtype=dtype, backends=["reference"], repeat=2)
    assert {(r.op, r.direction) for r in result.rows if r.kind == "baseline"} == {
        (op, d) for op in ("layernorm", "rmsnorm") for d in ("forward", "backward")}
    assert all(r.check == "ok" for r in result.rows if r.kind == "backend")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["bn", "gn", "in"])
def test_bench_channels_last_times_both_layouts_against_torch_channels_last(op, dtype):
    result = bench.bench(op, shape=(2, 8, 4, 3), dtype=dtype, backends=["cython", "reference"], repeat=3,
                         layout="nhwc")
    rows = [(r.direction, r.name, r.layout) for r in result.rows if r.kind == "backend"]
    assert rows == [(d, n, lay) for d in ("forward", "backward") for n, lay in
                    (("cython", "nhwc"), ("cython", "nchw"), ("reference", "nchw"))]
    assert any("reference" in n and "no channels-last" in n for n in result.notes)
    assert sum("channels-last / NCHW time" in n for n in result.notes) == 2
    if HAS_TORCH:  # PyTorch on channels-last tensors computes the same values
        assert all(r.check == "ok" for r in result.rows if r.kind == "backend")
    assert "channels-last" in result.format() and "cython nhwc" in result.format()


def test_bench_channels_last_times_the_fused_activation_kernels():
    case = Case("groupnorm", (2, 8, 4, 3), groups=2, activation="silu")
    result = bench.bench("gn", cases=[case], backends=["cython"], repeat=2, layout="nhwc")
    assert [(r.direction, r.layout) for r in result.rows if r.kind == "backend"] == [
        (d, lay) for d in ("forward", "backward") for lay in ("nhwc", "nchw")]
    if HAS_TORCH:
        assert all(r.check == "ok" for r in result.rows if r.kind == "backend")


def test_bench_channels_last_needs_a_channel_op_with_spatial_dims():
    with pytest.raises(ValueError, match="nhwc"):
        bench.bench("ln", shape=(2, 8, 4), backends=["cython"], repeat=1, layout="nhwc")
    result = run("--op", "ln", "--layout", "nhwc", *TINY)
    assert result.exit_code == 2 and "nhwc" in result.output
    result = run("--channels-last", *TINY)  # a --model option
    assert result.exit_code == 2 and "--model only" in result.output


def test_bench_without_baseline():
    result = bench.bench("ln", shape=(4, 8), backends=["reference"], direction="forward", repeat=2, baseline=False)
    assert [r.name for r in result.rows] == ["reference", "copy", "read"]
    assert result.rows[0].ratio_to_torch is None and result.rows[0].check == "-"


def _register(name, kernels, ops=("groupnorm",)):
    spec = normkit.Backend(name=name, module=registry.runtime_module(kernels),
                           kernels={op: ("forward", "backward") for op in ops})
    registry.register_backend(spec, replace=True)


@pytest.fixture
def broken_backend():
    spec = normkit.Backend(name="broken", module=registry.runtime_module({}), kernels={"groupnorm": ("forward",
                                                                                                    "backward")})
    registry.register_backend(spec, replace=True)
    yield "broken"
    registry.unregister_backend("broken")


def test_a_backend_that_fails_to_load_is_skipped_with_a_note(broken_backend):
    result = bench.bench("all", shape=(2, 4, 3), backends=["broken", "reference"], direction="forward", repeat=2,
                         baseline=False)
    assert {r.name for r in result.rows} == {"reference", "copy", "read"}
    assert len({r.case for r in result.rows}) == 5  # every op still ran
    assert [n for n in result.notes if "broken" in n] == [
        "backend 'broken' failed to load and was skipped: kernels: LookupError: declares kernels it does not "
        "provide: groupnorm:backward:float32, groupnorm:backward:float64, groupnorm:forward:float32, "
        "groupnorm:forward:float64"]


def test_a_backend_without_the_op_is_skipped_for_that_op_only():
    kernels = {("groupnorm", d, t): registry.lookup("groupnorm", d, t, "reference")[1]
               for d in ("forward", "backward") for t in ("float32", "float64")}
    _register("gnonly", kernels)
    try:
        result = bench.bench("all", shape=(2, 4, 3), backends=["gnonly"], direction="forward", repeat=2,
                             baseline=False)
    finally:
        registry.unregister_backend("gnonly")
    assert [r.case for r in result.rows if r.name == "gnonly"] == ["groupnorm-2x4x3-g4-float32"]
    assert "backend 'gnonly' skipped for batchnorm 2x4x3 float32 forward: batchnorm: backend 'gnonly' does not " \
           "implement forward" in result.notes


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_kernel_that_raises_is_skipped_with_a_note(direction):
    """A plugin's kernel raising at run time (in a backward's preparing forward too): a note, not a traceback."""
    def raises(*args):
        raise RuntimeError("kernel exploded")

    kernels = {("groupnorm", d, t): raises for d in ("forward", "backward") for t in ("float32", "float64")}
    _register("raiser", kernels)
    try:
        result = bench.bench("gn", shape=(2, 4, 3), groups=2, backends=["raiser", "reference"], direction=direction,
                             repeat=2, baseline=False)
    finally:
        registry.unregister_backend("raiser")
    assert [r.name for r in result.rows] == ["reference", "copy", "read"]
    assert f"backend 'raiser' skipped for groupnorm 2x4x3 G=2 float32 {direction}: RuntimeError: kernel exploded" \
        in result.notes


def test_header_says_when_there_is_no_torch_column():
    text = bench.bench("ln", shape=(4, 8), backends=["reference"], direction="forward", repeat=2,
                       baseline=False).format()
    assert "time/torch: - (no PyTorch baseline in this run)" in text and "per-round ratio" not in text


def test_nothing_to_run_is_an_error(broken_backend):
    with pytest.raises(bench.BenchError, match="no selected backend could run: backend 'broken' failed to load"):
        bench.bench("gn", shape=(2, 4, 3), backends=["broken"], repeat=1, baseline=False)


@needs_torch
def test_a_wrong_kernel_is_flagged():
    def zeros_forward(x, groups, weight, bias, eps, y, mean, rstd):
        y[...] = 0
        mean[...] = 0
        rstd[...] = 1

    kernels = {("groupnorm", "forward", t): zeros_forward for t in ("float32", "float64")}
    kernels |= {("groupnorm", "backward", t): registry.lookup("groupnorm", "backward", t, "reference")[1]
                for t in ("float32", "float64")}
    _register("wrong", kernels)
    try:
        result = bench.bench("gn", shape=(2, 4, 3), groups=2, backends=["wrong"], direction="forward", repeat=2)
    finally:
        registry.unregister_backend("wrong")
    assert result.rows[0].check.startswith("MISMATCH")
    assert any(n.startswith("wrong: groupnorm 2x4x3 G=2 float32 forward differs from PyTorch") for n in result.notes)


@needs_torch
def test_a_backward_that_skips_the_parameter_gradients_is_flagged():
    """The check compared y or dx only, so a backward leaving dweight and dbias unwritten (less work, a faster
    time) read "ok"."""
    def without_param_grads(dy, x, groups, mean, rstd, weight, dx, dweight, dbias):
        registry.lookup("groupnorm", "backward", str(x.dtype), "reference")[1](dy, x, groups, mean, rstd, weight,
                                                                               dx, np.zeros_like(dweight),
                                                                               np.zeros_like(dbias))

    kernels = {("groupnorm", d, t): registry.lookup("groupnorm", d, t, "reference")[1]
               for d in ("forward", "backward") for t in ("float32", "float64")}
    kernels |= {("groupnorm", "backward", t): without_param_grads for t in ("float32", "float64")}
    _register("lazy_grads", kernels)
    try:
        result = bench.bench("gn", shape=(2, 4, 3), groups=2, backends=["lazy_grads"], direction="backward",
                             repeat=2)
    finally:
        registry.unregister_backend("lazy_grads")
    assert result.rows[0].check == "MISMATCH 1.0e+00 (dweight)"
    assert any("in dweight" in n and "in dbias" in n for n in result.notes)


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    result = run("--op", "gn", "--groups", "4", "--backend", "reference", "--json", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert "benchmarking" in result.stderr and "benchmarking" not in result.stdout  # the progress bar
    lines = result.stdout.splitlines()
    assert lines[0].startswith("normkit bench | ") and "threads" in lines[0] and "numpy " in lines[0]
    assert "groupnorm 2x8x4x4 G=4 float32, forward: 0.0 MB moved, 3 rounds" in result.output
    assert "groupnorm 2x8x4x4 G=4 float32, backward" in result.output
    assert any(line.lstrip().startswith("reference ") for line in lines)
    assert any(line.lstrip().startswith("copy ") for line in lines)
    assert any(line.lstrip().startswith("read ") for line in lines)
    assert "% copy  % read" in result.output and "time/best" not in result.output
    assert f"wrote {out}" in result.output

    data = json.loads(out.read_text())
    assert data["schema"] == "normkit.bench/2"
    assert set(data) == {"schema", "machine", "settings", "notes", "rows"}
    assert set(data["machine"]) == {"cpu", "cpus", "threads", "load_average", "platform", "python", "versions",
                                    "allocator"}
    assert data["machine"]["versions"]["numpy"] == np.__version__
    assert data["settings"]["repeat"] == 3 and data["settings"]["backends"] == ["reference"]
    row_keys = {f.name for f in bench.Row.__dataclass_fields__.values()}
    assert all(set(r) == row_keys for r in data["rows"])
    names = ["reference"] + (["pytorch"] if HAS_TORCH else []) + ["copy", "read"]
    assert [(r["direction"], r["name"]) for r in data["rows"]] == [(d, n) for d in ("forward", "backward")
                                                                  for n in names]
    row = data["rows"][0]
    assert row["case"] == "groupnorm-2x8x4x4-g4-float32" and row["shape"] == [2, 8, 4, 4] and row["groups"] == 4
    assert row["bytes"] == 2 * 2 * 8 * 16 * 4 and row["rounds"] == 3
    assert row["p10_s"] <= row["median_s"] <= row["p90_s"]


def test_cli_case_set_and_direction():
    result = run("--cases", "small", "--op", "ln", "--backend", "reference", "--direction", "backward",
                 "--repeat", "2", "--no-torch")
    assert result.exit_code == 0, result.output
    assert "layernorm 3x8x5 over 8x5 float32, backward" in result.output
    assert "layernorm 6x16 over 16 float32, backward" in result.output
    assert ", forward:" not in result.output and "pytorch" not in result.output


def test_cli_threads(monkeypatch):
    before = registry.get_num_threads()
    monkeypatch.setattr(registry, "_num_threads", registry._num_threads)  # restored after the test
    try:
        result = run("--op", "bn", "--backend", "reference", "--threads", "1", "--direction", "forward", *TINY)
    finally:
        registry.set_num_threads(before)  # the loaded backends' own thread counts
    assert result.exit_code == 0, result.output
    assert ", 1 thread (" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--op", "gn", "--groups", "7"], "Invalid value for '--groups': groupnorm: groups=7 must divide the C=256 "
                                      "channels; valid groups: 1, 2, 4, 8, 16, 32, 64, 128, 256"),
    (["--op", "frob"], "Invalid value for '--op': 'frob' is not one of 'all', 'batchnorm', 'bn'"),
    (["--backend", "nope"], "Invalid value for '--backend': unknown backend(s) 'nope'; installed backends: "),
    (["--backend", "pytorch"], "PyTorch's kernels are the baseline and run unless turned off"),
    (["--shape", "8,a"], "Invalid value for '--shape': shape must be integers separated by commas"),
    (["--op", "bn", "--groups", "4"], "Invalid value for '--groups': groups applies to groupnorm only"),
    (["--cases", "reference", "--shape", "2,4"], "--cases fixes the shapes and groups"),
    (["--cases", "nope"], "Invalid value for '--cases': 'nope' is not one of 'reference', 'small'"),
    (["--direction", "sideways"], "Invalid value for '--direction'"),
    (["--threads", "100000"], "Invalid value for '--threads': set_num_threads: 100000 threads requested"),
    (["--repeat", "0"], "Invalid value for '--repeat'"),
    (["--shape", "2,,4"], "Invalid value for '--shape': shape must be integers separated by commas"),
    (["--json", "/nonexistent-normkit-dir/out.json"],
     "Invalid value for '--json': directory '/nonexistent-normkit-dir' does not exist"),
    (["--dtype", "float8"],
     "Invalid value for '--dtype': 'float8' is not one of 'float32', 'float64', 'bfloat16', 'float16'"),
])
def test_cli_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_cli_shape_beyond_memory_is_a_clear_error():
    result = run("--op", "ln", "--shape", "99999999,99999,9999", "--repeat", "3", "--no-torch")
    assert result.exit_code == 1, result.output
    assert "do not fit in this machine's memory" in result.output and "Traceback" not in result.output


def test_cli_lists_installed_backends_for_an_unknown_one():
    result = run("--backend", "nope")
    for name in registry.get_backend_order():
        assert name in result.output


def test_cli_nothing_to_run(broken_backend):
    result = run("--op", "gn", "--backend", "broken", *TINY)
    assert result.exit_code == 1
    assert "no selected backend could run" in result.output and "try --backend reference" in result.output


def test_cli_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run("--op", "gn", "--backend", "reference", "--plot", str(tmp_path / "p.png"), *TINY)
    assert result.exit_code == 2
    assert "--plot needs matplotlib, which is not installed; install it with: pip install 'normkit[plot]'" in \
        result.output
    assert not (tmp_path / "p.png").exists()


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    result = run("--op", "all", "--shape", "2,4,3", "--backend", "reference", "--plot", str(path), "--repeat", "2")
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_backends_two_layouts_apart(monkeypatch, tmp_path):
    """With --layout nhwc each backend has a channels-last and an NCHW row; the plot keyed its bars by backend
    name, so the NCHW row's bar replaced the channels-last one. It draws both, named as in the table."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from normkit import bench_plot

    drawn = {}
    barh = Axes.barh
    monkeypatch.setattr(Axes, "barh", lambda self, ys, xs, **kw: drawn.update({kw["label"]: list(xs)}) or
                        barh(self, ys, xs, **kw))
    result = bench.bench("bn", shape=(2, 4, 3, 3), backends=["cython"], layout="nhwc", repeat=2, baseline=False)
    bench_plot.plot(result, tmp_path / "p.png")
    rows = {}
    for r in result.rows:  # (forward's table, then backward's)
        if r.kind == "backend":
            rows.setdefault(bench.shown_name(r, True), []).append(r.gb_per_s)
    assert set(rows) == {"cython nhwc", "cython nchw"}
    assert {name: drawn[name] for name in rows} == rows


@needs_torch
def test_every_builtin_backend_agrees_with_torch_on_the_reference_cases():
    """The reference table as a correctness test at full size: every built-in backend's output, through the same
    calls the benchmark times, matches PyTorch's (a built-in that fails to load fails here)."""
    builtins = [b.name for b in registry.list_backends(load=False) if b.builtin and b.name != "reference"]
    result = bench.bench(cases="reference", backends=builtins, repeat=1, min_time=0)
    ran = {(r.case, r.direction, r.name): r.check for r in result.rows if r.kind == "backend"}
    want = {(c.id, d, b) for c in cases.case_set("reference") for d in bench.DIRECTIONS for b in builtins}
    assert set(ran) == want, result.notes
    assert all(check == "ok" for check in ran.values()), {k: v for k, v in ran.items() if v != "ok"}


# --- the ceiling, the torch.compile peer, aligned buffers ------------------------------------------------------

def test_ceiling_loops_move_the_bytes():
    from normkit import ceiling

    src, dst = ceiling.words(8 * 1000 + 5), ceiling.words(8 * 1000)
    assert src.size == 1000 and src.ctypes.data % 64 == 0
    src[:] = np.arange(1000, dtype=np.uint64)
    dst[:] = 0
    ceiling.copy(src, dst)
    np.testing.assert_array_equal(dst, src)
    assert ceiling.read(src) == 999 * 1000 // 2


def test_ceiling_loops_refuse_what_they_would_overrun():
    """The loops do not check bounds: a 3-D array (whose src[i] is a plane) or a shorter dst would have been read
    or written past its end (a segfault); they get a ValueError instead."""
    from normkit import ceiling

    words = ceiling.words(8 * 64)
    with pytest.raises(ValueError, match=r"ceiling.copy: src must be a 1-D array of uint64 words .*got 3-D float32"):
        ceiling.copy(np.zeros((4, 4, 4), np.float32), words)
    with pytest.raises(ValueError, match="ceiling.copy: dst must have src's 64 words, got 63"):
        ceiling.copy(words, words[:63].copy())
    with pytest.raises(ValueError, match="ceiling.read: src must be a 1-D array of uint64 words .*got list"):
        ceiling.read([1, 2, 3])


@pytest.mark.parametrize("threads", [1, 2])
def test_ceilings_run_on_the_bench_threads(threads, monkeypatch):
    import numba

    from normkit import ceiling

    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has fewer threads")
    seen = []
    monkeypatch.setattr(ceiling, "set_threads", seen.append)
    monkeypatch.setattr(registry, "get_num_threads", lambda: threads)
    case = Case("gn", (2, 8, 4, 4), groups=2)
    for name in ("copy", "read"):
        bench.prepare(case, "forward", name).call()
    assert seen == [threads, threads]


def test_bench_buffers_are_64_byte_aligned():
    case = Case("gn", (3, 6, 5), groups=3)
    arrays = [*case.make_inputs().values(), *case.empty_outputs("forward").values(),
              *case.empty_outputs("backward").values()]
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in arrays)


def test_no_compile_column_without_a_cpp_compiler():
    """--compile where inductor finds no C++ compiler: a clear note, the other rows as usual, exit code 0."""
    if not HAS_TORCH:
        result = run("--op", "ln", "--shape", "4,8", "--backend", "reference", "--compile", "--repeat", "2")
        assert result.exit_code == 0 and "no torch.compile column" in result.output
        return
    from torch._inductor import config

    with config.patch({"cpp.cxx": ("/nonexistent/normkit-test-c++",)}):
        result = run("--op", "ln", "--shape", "4,8", "--backend", "reference", "--compile", "--repeat", "2",
                     "--direction", "forward")
    assert result.exit_code == 0, result.output
    assert "no torch.compile column: torch.compile needs a C++ compiler at run time and found none" in \
        " ".join(result.output.split())
    assert "torch.compile " not in result.output.split("notes:")[0] and "time/best" not in result.output
    assert any(line.lstrip().startswith("pytorch ") for line in result.output.splitlines())


def test_a_failed_compilation_drops_the_row_with_a_note(monkeypatch):
    def fail(case, direction, inputs, layout):
        raise bench.bench_torch.CompileUnavailable(f"torch.compile failed for {case.label} {direction}: boom")

    monkeypatch.setattr(bench.bench_torch, "check_compiler", lambda: None)
    monkeypatch.setattr(bench.bench_torch, "prepare_compiled", fail)
    monkeypatch.setattr(bench.bench_torch, "available", lambda: True)
    result = bench.bench("ln", shape=(4, 8), backends=["reference"], direction="forward", repeat=2, baseline=False,
                         compile=True)
    assert [r.name for r in result.rows] == ["reference", "copy", "read"]
    assert "no torch.compile row for layernorm 4x8 over 8 float32 forward: torch.compile failed for layernorm 4x8 " \
           "over 8 float32 forward: boom" in result.notes


@needs_torch
@pytest.mark.skipif(not shutil.which("g++") and not os.environ.get("CXX"), reason="no C++ compiler for inductor")
def test_cli_compile_peer(tmp_path):
    """--compile: a torch.compile row checked against PyTorch, and every row's ratio to the faster peer."""
    out = tmp_path / "r.json"
    result = run("--op", "gn", "--shape", "2,8,4,4", "--groups", "2", "--backend", "reference", "--compile",
                 "--repeat", "3", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "time/best" in result.output and "torch.compile: " in result.output, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["direction"], r["name"]) for r in rows] == [
        (d, n) for d in ("forward", "backward") for n in ("reference", "pytorch", "torch.compile", "copy", "read")]
    for r in rows:
        if r["kind"] in ("backend", "peer"):
            assert r["check"] == "ok" and r["ratio_to_best"] > 0
        if r["kind"] == "peer":
            assert r["load_s"] > 0  # the compilation, kept out of the timings


def test_cli_output_paths_and_case_set_errors_before_the_run(tmp_path):
    """Found by a campaign on the CLI: ``--json ''`` ran and wrote nothing, ``--plot`` of a type matplotlib cannot
    write failed after the whole run with its traceback, ``--cases small --op rmsnorm`` blamed --shape."""
    result = run("--op", "gn", "--backend", "reference", "--json", "", *TINY)
    assert result.exit_code == 2 and "Invalid value for '--json': an empty path" in result.output
    result = run("--cases", "small", "--op", "rmsnorm", "--backend", "reference")
    assert result.exit_code == 2 and "Invalid value for '--cases': the case set has no case for rmsnorm" in \
        result.output
    if importlib.util.find_spec("matplotlib"):
        result = run("--op", "gn", "--backend", "reference", "--plot", str(tmp_path / "p.txt"), *TINY)
        assert result.exit_code == 2 and "Invalid value for '--plot'" in result.output
        assert "matplotlib writes" in result.output and ".png" in result.output and "not .txt" in result.output


@needs_torch
def test_nhwc_groupnorm_needs_a_torch_channels_last_format_and_compile_runs_on_channels_last(monkeypatch):
    """torch's group_norm takes no channels-last 3-D input (it raised from the baseline); and --compile's row ran
    on NCHW tensors under the channels-last heading."""
    result = run("--op", "gn", "--layout", "nhwc", "--shape", "4,8,3", "--backend", "reference", "--repeat", "1")
    assert result.exit_code == 2 and "to groupnorm on inputs with 2 or 3" in result.output
    import torch

    from normkit import bench_torch

    seen = []
    monkeypatch.setattr(bench_torch, "check_compiler", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda x, *a: seen.append(x.stride()) or fn(x, *a))
    case = Case("batchnorm", (4, 8, 3, 3))
    call, output, _ = bench_torch.prepare_compiled(case, "forward", case.make_inputs(), "nhwc")
    want, _ = bench_torch.prepare(case, "forward", case.make_inputs())
    assert seen and all(s == (72, 1, 24, 8) for s in seen)  # channels-last strides of (4, 8, 3, 3)
    np.testing.assert_allclose(output()["y"], bench_torch._stored(case, want()[0]), rtol=1e-6, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("case", [Case("layernorm", (8, 16), add=True), Case("rmsnorm", (8, 16)),
                                  Case("rmsnorm", (8, 16), add=True)], ids=lambda c: c.id)
def test_the_compiled_peer_computes_the_baselines_pass(monkeypatch, case):
    """torch.compile's peer for the fused add ran the norm without the add (and was timed and ranked that way), and
    for RMSNorm raised an error that ended the whole run. It compiles what the eager baseline runs, outputs and
    gradients alike (torch.compile stands in as the identity here)."""
    import torch

    from normkit import bench_torch

    monkeypatch.setattr(bench_torch, "check_compiler", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    inputs = case.make_inputs()
    for direction in ("forward", "backward"):
        _, output, _ = bench_torch.prepare_compiled(case, direction, inputs)
        got, want = output(), bench_torch.prepare(case, direction, inputs)[1]()
        if direction == "forward":
            names = {"y", "h"} if case.add else {"y"}
        else:
            names = {"dx", "dweight", "dbias"} if case.op == "layernorm" else {"dx", "dweight"}
        assert set(got) == set(want) == names
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{direction} {name}")
