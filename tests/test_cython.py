"""Cython-specific behaviour: the build (OpenMP or not, the x86-64 copies), what INFO reports, and shapes at the
kernels' schedule boundaries. Numerics and thread independence are covered for every backend in test_backends.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import assert_close, copy_args, op_args

import normkit
import numpy as np
from normkit import registry, testing
from normkit.contract import storage_dtype

kernels = pytest.importorskip("normkit_kernels.cython.kernels")

REPO = Path(__file__).resolve().parents[1]
NO_FAST_MATH = ("-ffast-math", "-ffinite-math-only", "-Ofast", "-fno-honor-nans", "-fno-honor-infinities")


def test_info_reports_openmp_and_flags():
    info = kernels.INFO
    assert set(info) == {"openmp", "compile flags", "modules", "float16 conversion", "non-temporal stores",
                         "one thread", "row pairs"}
    assert info["float16 conversion"] in ("F16C", "portable")
    assert info["non-temporal stores"].startswith("outputs of ")
    assert info["openmp"] == "yes" or info["openmp"].startswith("no ("), info["openmp"]
    flags = info["compile flags"].split()
    assert not set(flags) & set(NO_FAST_MATH), f"flags that break NaN/inf handling: {flags}"
    if info["openmp"] == "yes":
        assert "-fopenmp" in flags or "/openmp" in flags
    row = next(b for b in normkit.list_backends() if b.name == "cython")
    assert row.status == "ok" and row.info == info


def _compare(op, shape, dtype, rng, **extra):
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    nk = normkit.get(op)
    for affine in ("both", "none", "weight"):
        for training in (True, False) if op == "batchnorm" else (True,):
            kw = op_args(op, x, rng, affine=affine, training=training, **extra)
            got, want = {}, {}
            for backend, out in (("cython", got), ("reference", want)):
                y, saved = nk.forward(x, **copy_args(kw), backend=backend)
                out["y"] = y
                out["dx"], out["dweight"], out["dbias"] = nk.backward(dy, x, saved, **copy_args(kw), backend=backend)
            for name, expected in want.items():
                if expected is None:
                    assert got[name] is None
                    continue
                direction = "forward" if name == "y" else "backward"
                assert_close(got[name], expected, dtype, direction, what=f"{op} {shape} {affine} {training} {name}")


# Each side of every schedule switch in the kernels: BatchNorm's short rows (S < 32, with row counts that are not a
# multiple of the 4-row sweep), many channels (C >= 32) and the plain kernels' columns for S < 64 in a batch of
# S / 2 or more samples ((20, 32, 40) and (64, 3, 63) columns, (19, 32, 40) and (64, 32, 64) channels); LayerNorm's
# backward of rows over 4096 values (groups of rows below 128 rows, two of them at (40, 20000); row blocks again
# from 128 rows) and its row blocks of shorter rows; RMSNorm's long rows in fewer than four row blocks (few rows, or
# partial sums beyond the budget: (5, 270001)) or up to 16 rows over 16384 values, which the threads share by tiles;
# GroupNorm's and InstanceNorm's single set of 65536 values or more, cut into pieces; LayerNorm's forward of a
# single long row, by tiles. BatchNorm's columns schedule on rows of at most 8 values sums them k at a time, 16
# values' worth (rows of 2 values: k = 8, from 4096 rows, 4101 leave 5 over; of 1: k = 16, 8199 rows leave 7; of
# 3, one channel of 3 values: k = 6, 3077 rows leave 5; of 5: k = 4, 2051 leave 3; of 8: k = 2, from 1024 rows);
# its float32 column sums in steps of registers, the last with the columns left over (rows of 127, 128 and 100
# values: 7 registers of 16 and 15 columns, 8, 6 and 4; in the x86-64-v3 copy steps of 4 registers of 8).
SCHEDULE_CASES = [
    ("batchnorm", (4095, 2), {}),
    ("batchnorm", (4096, 2), {}),
    ("batchnorm", (4101, 2), {}),
    ("batchnorm", (8199, 1), {}),
    ("batchnorm", (3077, 1, 3), {}),
    ("batchnorm", (2051, 5), {}),
    ("batchnorm", (1023, 8), {}),
    ("batchnorm", (1025, 8), {}),
    ("batchnorm", (70, 127), {}),
    ("batchnorm", (70, 128), {}),
    ("batchnorm", (70, 100), {}),
    ("batchnorm", (7, 33, 31), {}),
    ("batchnorm", (9, 31, 32), {}),
    ("batchnorm", (5, 32, 32), {}),
    ("batchnorm", (6, 40, 3), {}),
    ("batchnorm", (1025, 3), {}),
    ("batchnorm", (20, 32, 40), {}),
    ("batchnorm", (19, 32, 40), {}),
    ("batchnorm", (64, 3, 63), {}),
    ("batchnorm", (64, 32, 64), {}),
    ("layernorm", (3, 4096), {}),
    ("layernorm", (3, 4097), {}),
    ("layernorm", (127, 4097), {}),
    ("layernorm", (128, 4097), {}),
    ("layernorm", (40, 20000), {}),
    ("layernorm", (1, 65536), {}),
    ("layernorm", (1, 70001), {}),
    ("layernorm", (2, 5, 20000), {"ln_dims": 2}),
    ("layernorm", (130, 33), {}),
    ("groupnorm", (3, 6, 1), {"groups": 3}),
    ("groupnorm", (1, 4, 128, 130), {"groups": 1}),
    ("instancenorm", (1, 1, 300, 301), {}),
    ("rmsnorm", (3, 65536), {}),
    ("rmsnorm", (3, 65537), {}),
    ("rmsnorm", (16, 16385), {}),
    ("rmsnorm", (17, 16385), {}),
    ("rmsnorm", (5, 270001), {}),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op,shape,extra", SCHEDULE_CASES, ids=str)
def test_schedule_boundaries(op, shape, extra, dtype, rng):
    _compare(op, shape, dtype, rng, **extra)


# BatchNorm's columns schedule (channels-last data, short rows) runs its elementwise pass in blocks of 64 values in
# inference and, on inputs of 8 MiB or more, in training (ROW_BLOCK_MEMORY in _batchnorm.pyx; 256 otherwise): on
# such an input, inference gives the bits of two calls on its halves (the blocks cut elsewhere) and the reference's
# values; the training forward, whose pass it is too, the reference's values.
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("c", [3, 16, 40])
def test_batchnorm_columns_pass_from_memory(c, dtype, rng):
    n = (8 << 20) // (c * np.dtype(dtype).itemsize) + 5
    x = (rng.standard_normal((n, c)) * 2 + 3).astype(dtype)
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    bn = normkit.get("batchnorm")
    kw = dict(weight=w, bias=b, training=False)
    whole = bn(x, rm, rv, **kw, backend="cython")
    halves = [bn(part, rm, rv, **kw, backend="cython") for part in (x[: n // 2], x[n // 2:])]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    assert_close(whole, bn(x, rm, rv, **kw, backend="reference"), dtype, "forward", what="inference")
    y, _ = bn.forward(x, weight=w, bias=b, training=True, backend="cython")
    want, _ = bn.forward(x, weight=w, bias=b, training=True, backend="reference")
    assert_close(y, want, dtype, "forward", what="training forward")


# LayerNorm's backward of rows of 2048 to 4096 values and RMSNorm's of 2048 to 65536 take them two at a time while
# dy, x and dx fit in the last-level cache, in three loops per row otherwise: both, forced, against the reference
# (odd row counts leave a row without a pair; (130, 2049) spans four row blocks of 33 rows; (8, 2, 5000) is four
# blocks of two 10000-value rows, LayerNorm's long-row groups; rows of 33 values never pair).
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,extra", [((130, 33), {}), ((7, 2051), {}), ((130, 2049), {}),
                                         ((8, 2, 5000), {"ln_dims": 2})], ids=str)
@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("pairs", [True, False], ids=["row pairs", "three loops"])
def test_row_op_backward_row_pairs_and_three_loops(pairs, op, shape, extra, dtype, rng):
    kernels.set_pairs_max_bytes(1 << 62 if pairs else 0)
    try:
        _compare(op, shape, dtype, rng, **extra)
    finally:
        kernels.set_pairs_max_bytes(None)


@pytest.mark.parametrize("op", ["layernorm", "rmsnorm"])
def test_row_pairs_only_for_long_rows(op, rng):
    """Pairs change the parameter gradients' roundings: forced on, they show at 2048 values a row, not at 2047."""
    front = normkit.get(op)

    def grads(k, pairs):
        x, dy = rng.standard_normal((2, 9, k), dtype=np.float32)
        kw = dict(normalized_shape=(k,), weight=np.ones(k, np.float32), backend="cython")
        kernels.set_pairs_max_bytes(1 << 62 if pairs else 0)
        try:
            return front.backward(dy, x, front.forward(x, **kw)[1], **kw)[:2]
        finally:
            kernels.set_pairs_max_bytes(None)

    for k, differ in ((2047, False), (2048, True)):
        state = rng.bit_generator.state
        on = grads(k, True)
        rng.bit_generator.state = state
        off = grads(k, False)
        assert (not np.array_equal(on[1], off[1])) == differ, k


# The long-row backward of LayerNorm and of the row ops (_rownorm's tiles) clears its sums in the module's scratch,
# kept per thread from call to call, tile by tile: a call after the scratch was filled with NaN gives the same bits.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op,direction,module,shape", [("layernorm", "backward", "_layernorm", (2, 70000)),
                                                       ("rmsnorm", "backward", "_rownorm", (3, 70000)),
                                                       ("layernorm", "add_backward", "_rownorm", (2, 70000))])
def test_long_row_backward_does_not_read_old_scratch(op, direction, module, shape, dtype):
    case = testing.Case(op, direction, dtype, shape, None, "weight" if op == "rmsnorm" else "weight+bias", "normal",
                        1e-5)
    kernel = registry.lookup(op, direction, dtype, "cython")[1]
    inputs = testing._inputs(case)
    shapes = testing._output_shapes(case, inputs)

    def outputs():
        outs = {k: np.zeros(s, storage_dtype(direction, k, dtype)) for k, s in shapes.items() if s is not None}
        kernel(*testing._args(case, {**inputs, **dict.fromkeys(shapes), **outs}))
        return {k: v.tobytes() for k, v in outs.items()}

    clean = outputs()
    getattr(kernels, module)._local.buf.fill(np.nan)
    assert outputs() == clean


def _run(cmd, env=None, cwd=REPO, timeout=600):
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _suite(python, env):
    """The shared backend suite, cython only, with ``python`` and ``env``."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # import normkit as installed, not from the cwd
    return _run([python, *safe_path, "-m", "pytest", "tests/test_backends.py", "-k", "cython", "-q", "-x"], env=env)


def _modules(env) -> str:
    return _run([sys.executable, "-c", "import normkit_kernels.cython.kernels as k; print(k.INFO['modules'])"],
                env).strip()


_EMPTY_CALLS = r"""
import numpy as np
from normkit import registry
from normkit.contract import SPECS, storage_dtype
spec = SPECS["batchnorm"]
for d in spec.directions:
    for dt in ("float32", "bfloat16"):
        for shape in ((5, 0, 1), (5, 4, 0), (0, 4, 1), (5, 0, 40), (0, 40, 40)):
            c = shape[1]
            values = {"eps": 1e-5, "activation": 0, "slope": 0.01}
            for name in spec.args(d):
                if name not in values:
                    size = shape if name in ("x", "y", "dy", "dx") else (c,)
                    values[name] = np.ones(size, storage_dtype(d, name, dt))
            registry.lookup("batchnorm", d, dt, "cython")[1](*spec.kernel_args(d, values))
print("survived")
"""


def test_batchnorm_kernels_survive_data_without_values():
    """Called directly with C = 0, S = 0 or N = 0 (the frontends never pass such data), every BatchNorm kernel
    returns: its schedules' task arithmetic divided by S and by the task count, which killed the process with
    SIGFPE. In a child process, so that a crash fails this test instead of ending the run."""
    run = subprocess.run([sys.executable, "-c", _EMPTY_CALLS], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "survived", (run.returncode, run.stderr[-500:])


_EMPTY_CHANNELS_LAST_CALLS = r"""
import numpy as np
from normkit import registry
from normkit.contract import SPECS, storage_dtype
for op in ("groupnorm", "instancenorm"):
    spec = SPECS[op]
    for d in ("forward", "backward", "act_forward", "act_backward"):
        for dt in ("float32", "bfloat16"):
            found = registry.lookup(op, d, dt, "cython", "nhwc")
            for n, c, s in ((5, 4, 0), (0, 4, 3), (5, 0, 3), (0, 4, 0)):
                values = {"eps": 1e-5, "activation": 0, "slope": 0.01, "num_groups": 2 if c else 1}
                for name in spec.args(d):
                    if name not in values:
                        size = {"x": (n, s, c), "y": (n, s, c), "dy": (n, s, c), "dx": (n, s, c),
                                "mean": (n, values["num_groups"] if op == "groupnorm" else c)}.get(name, (c,))
                        values[name] = np.ones(size if name != "rstd" else values["mean"].shape,
                                               storage_dtype(d, name, dt))
                found[1](*spec.kernel_args(d, values))
print("survived")
"""


def test_channels_last_kernels_survive_data_without_values():
    """As test_batchnorm_kernels_survive_data_without_values, the channels-last GroupNorm / InstanceNorm kernels:
    N = 0 divided the task count (SIGFPE), InstanceNorm's C = 0 (no groups) the channels per group, and S = 0
    read a pivot from a first row that is not there."""
    run = subprocess.run([sys.executable, "-c", _EMPTY_CHANNELS_LAST_CALLS], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "survived", (run.returncode, run.stderr[-500:])


_WHOLE_ROWS = r"""
import numpy as np
import normkit
import normkit_kernels.cython.kernels as kernels
rng = np.random.default_rng(0)
bn, gn = normkit.get("batchnorm"), normkit.get("groupnorm")


def calls(front, x, dy, **kw):
    y, saved = front.forward(x, **kw)
    return [y, saved.mean, saved.rstd, *front.backward(dy, x, saved, **kw)]


def both(front, shape, dtype, nhwc=False, **kw):
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    kw.update(weight=rng.standard_normal(shape[1]).astype(np.float32),
              bias=rng.standard_normal(shape[1]).astype(np.float32), backend="cython")
    if nhwc:  # (N, C, H, W) views of (N, H, W, C) memory
        x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for a in (x, dy))
    runs = []
    for threshold in (1 << 62, 0):  # steps, whole rows
        kernels.set_from_memory_bytes(threshold)
        try:
            runs.append(calls(front, x, dy, **kw))
        finally:
            kernels.set_from_memory_bytes(None)
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes(), (front, shape, dtype)


try:
    from ml_dtypes import bfloat16
except ImportError:
    bfloat16 = np.float16
for dtype in (np.float32, np.float16, bfloat16):
    for c in (33, 129, 200):  # past one step of registers: 4 of 8 floats (x86-64-v3), 8 of 16 (v4); a partial one
        both(bn, (65, c), dtype, training=True)  # 65 rows: the last group of 8 rows is one row
        both(bn, (11, c, 3), dtype, training=True)  # 3 columns a channel
        both(gn, (3, c, 5, 7), dtype, nhwc=True, num_groups=1)
    both(bn, (2100 if dtype == np.float32 else 4200, 1000), dtype, training=True)  # 8 MiB and more: a task of 1000
print("same")
"""


_SMALL_STACK = r"""
import threading
import numpy as np
import normkit
rng = np.random.default_rng(0)
bn = normkit.get("batchnorm")
normkit.set_num_threads(1)  # the kernels run on the calling thread


def run():
    for shape, dtype, kw in (((200, 1000), np.float64, {"activation": "relu"}),  # tasks of 256 columns
                             ((1100, 1000), np.float64, {"activation": "relu"}),  # of 1000 (8.8 MB)
                             ((2100, 1000), np.float16, {}), ((5000, 1000), np.float16, {}),
                             ((1100, 1000), np.float32, {}),
                             ((100, 3500, 3), np.float16, {})):  # whole-column tasks of 1023 columns
        pdtype = np.float64 if dtype == np.float64 else np.float32
        x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        p = dict(weight=np.ones(shape[1], pdtype), bias=np.zeros(shape[1], pdtype), training=True, backend="cython",
                 **kw)
        y, saved = bn.forward(x, **p)
        bn.backward(dy, x, saved, **p)
    print("survived", flush=True)


threading.stack_size(128 * 1024)
thread = threading.Thread(target=run)
thread.start()
thread.join()
"""


def test_batchnorm_columns_run_on_a_small_thread_stack():
    """BatchNorm's columns schedule on a thread of 128 KB of stack (musl's default; OMP_STACKSIZE can set one as
    small): the sums-only tasks of 1024 columns (data from memory) and the whole-column tasks (256 columns) keep
    their stack buffers to what tasks of 256 columns had (stack buffers sized for 1024 columns had made float64
    with a fused activation take 148 KB and float16 whole-column tasks ~130 KB, and crashed the thread); 16-bit
    whole-column tasks of up to 1024 columns (from 2 MiB) run here too. In a child process, so that a crash fails
    this test instead of ending the run."""
    run = subprocess.run([sys.executable, "-c", _SMALL_STACK], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "survived", (run.returncode, run.stderr[-500:])


@pytest.mark.parametrize("copy", ["default", "x86_64_v3"])
def test_column_sums_from_memory_give_the_same_bits(copy):
    """Data from memory (8 MiB and more: set_from_memory_bytes) take the column sums' whole-rows path (rows wider
    than a step of registers read once per group of rows, the sums of the group's rows in L1): the same additions in
    the same order as the steps of registers, so the same bits, each forced here, for BatchNorm's columns schedule
    (float32, float16, bfloat16 with ml_dtypes: rows of (N, C) and of (N, C, S) with S < 32, and 8 MiB of rows of
    1000 values: a task of 1000 columns) and the channels-last GroupNorm; in the x86-64-v3 copy too, whose steps
    are 32 floats (in a child process, which picks the copy at import)."""
    env = dict(os.environ, NORMKIT_CYTHON_NO_AVX512="1") if copy == "x86_64_v3" else None
    if copy == "x86_64_v3" and not kernels.INFO["modules"].endswith("x86_64_v4"):
        pytest.skip("no x86-64-v4 copy in use: the default one is tested")
    run = subprocess.run([sys.executable, "-c", _WHOLE_ROWS], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "same", (run.returncode, run.stderr[-800:])


def test_batchnorm_column_sums_from_memory(rng):
    """BatchNorm of (N, C) float32 data of 8 MiB and more (rows of 200 values, in 8 row blocks with a last group
    of fewer than 8 rows): the whole-rows path against the reference (16-bit: test_cython16's schedule cases)."""
    _compare("batchnorm", ((8 << 20) // 800 + 1, 200), "float32", rng)


@pytest.mark.slow
@pytest.mark.skipif(kernels.INFO["modules"] == "normkit_kernels.cython", reason="this build has only one copy")
def test_baseline_copy_passes_backend_suite():
    """On x86-64 the tests above ran the highest x86-64 copy the CPU runs; the baseline copy (any x86-64 CPU)
    must pass too."""
    env = dict(os.environ, NORMKIT_CYTHON_BASELINE="1")
    assert _modules(env) == "normkit_kernels.cython"
    _suite(sys.executable, env)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump")
def test_each_copy_holds_its_own_instruction_set():
    """The x86-64 copies compile the same C with other flags: a copy holding another's code (the parallel build
    once wrote their objects to one path) would run AVX-512 on a CPU without it. AVX-512 registers (zmm) appear
    in the x86-64-v4 copy only."""
    root = Path(kernels.__file__).parent
    found = {}
    for package in ("", "x86_64_v3", "x86_64_v4"):
        for so in sorted((root / package).glob("_*.so")):
            code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                                  check=True).stdout
            found[f"{package or 'baseline'}/{so.name.split('.')[0]}"] = "zmm" in code
    if not any(name.startswith("x86_64_v4") for name in found):
        pytest.skip("no x86-64-v4 copy was built")
    assert found and all(has == name.startswith("x86_64_v4") for name, has in found.items()), found


@pytest.mark.slow
@pytest.mark.skipif(not kernels.INFO["modules"].endswith("x86_64_v4"), reason="no AVX-512 copy in use")
def test_x86_64_v3_copy_passes_backend_suite():
    """Where the tests above ran the x86-64-v4 (AVX-512) copy, the x86-64-v3 one (AVX2 CPUs) must pass too."""
    env = dict(os.environ, NORMKIT_CYTHON_NO_AVX512="1")
    assert _modules(env) == "normkit_kernels.cython.x86_64_v3"
    _suite(sys.executable, env)


@pytest.mark.slow
def test_fresh_venv_build_without_openmp(tmp_path):
    """``pip install .`` of a clean copy of the source (no generated C, no binaries) into a new venv, with
    NORMKIT_NO_OPENMP=1: the install succeeds, ``normkit list`` says the kernels are serial, and the build passes
    the backend suite (both the baseline and the highest x86-64 copy, where there is one). A second install of the
    same tree with the same flags rebuilds nothing.

    The venv sees the dev environment's packages through a .pth file, so the build runs offline with
    --no-build-isolation; normkit itself comes only from the fresh install.
    """
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "*.c", "__pycache__", ".hypothesis", "venv*", ".ci-venv"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    Path(site, "dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NORMKIT_", "PYTHON"))}
    env["NORMKIT_NO_OPENMP"] = "1"
    # --ignore-installed: never touch the dev environment's normkit, which pip can see through the .pth file
    install = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--ignore-installed",
               "-q", str(src)]
    _run(install, env=env, cwd=tmp_path)
    # a second install of the same tree with the same flags generates no C and compiles nothing (setup.py)
    built = sorted(src.glob("src/normkit_kernels/cython/*.c")) + sorted(src.glob("build/**/*.so"))
    assert len(built) > 5, built
    before = [p.stat().st_mtime_ns for p in built]
    _run(install, env=env, cwd=tmp_path)
    assert [p.stat().st_mtime_ns for p in built] == before, "the second install built the extensions again"
    env.pop("NORMKIT_NO_OPENMP")

    where = _run([python, "-c", "import normkit_kernels.cython.kernels as k; print(k.__file__)"], env, tmp_path)
    assert where.startswith(site), f"normkit was not imported from the fresh install: {where}"
    listing = _run([str(venv / "bin" / "normkit"), "list"], env, tmp_path)
    assert "openmp: no (disabled by NORMKIT_NO_OPENMP at build time)" in listing, listing
    assert "-fopenmp" not in listing

    _suite(python, env)
    if "x86_64_v" in listing:
        _suite(python, dict(env, NORMKIT_CYTHON_BASELINE="1"))
