"""normkit never changes PyTorch's or OpenMP's thread settings, and its own thread count is what its kernels use.

numba's OpenMP threading layer sets OpenMP's thread count when it starts, in whichever libgomp its symbols bind to
(PyTorch's own when torch was imported first), which made torch.get_num_threads() jump from the user's 1 to all
CPUs after one normkit call (see src/normkit_kernels/numba/_common.py). Each case runs in a fresh interpreter,
since thread pools start once per process: the user sets PyTorch (and, through OMP_NUM_THREADS, every OpenMP
runtime) to one thread, calls a backend through the NumPy frontend, and the settings must be as they were; then with
normkit.set_num_threads(2) the kernels still give the right results and PyTorch still says 1.

NUMBA_NUM_THREADS=2 makes numba's start-up want two threads even on a one-CPU machine, so that a change shows. The
kernels are few (layernorm forward and backward, batchnorm inference forward; float32, one small shape each) so
that an interpreter without numba's disk cache compiles little: about 8 s of CPU here. batchnorm's training forward
would add about 2 s: the schedule its shape takes (each schedule is a jitted function of its own, picked in Python
from the shape; src/normkit_kernels/numba/batchnorm.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import TOL, copy_args, op_args

import normkit
from normkit import contract, registry

BACKENDS = tuple(sorted(b.name for b in registry.list_backends(load=False) if b.builtin))
HAVE_TORCH = importlib.util.find_spec("torch") is not None

SCRIPT = r"""
import ctypes, json, os, sys

backend, torch_first, nk_threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])


def openmp():
    # omp_get_max_threads() of every OpenMP runtime loaded in this process, by path; None where that cannot be read
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5].strip() if len(fields) == 6 else ""
        if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp")) and path not in found:
            found[path] = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_get_max_threads()
    return found


torch = None
if torch_first:
    import normkit.torch
try:
    import torch
except ImportError:
    pass
if torch is not None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # PyTorch applies its setting to OpenMP lazily, per thread: make it take effect now


def settings():
    return {"torch": None if torch is None else [torch.get_num_threads(), torch.get_num_interop_threads()],
            "openmp": openmp()}


before = settings()
import numpy as np
import normkit

rng = np.random.default_rng(0)
x = rng.standard_normal((6, 40)).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
w, b = rng.standard_normal((2, 40)).astype(np.float32)
xb = rng.standard_normal((5, 3, 20)).astype(np.float32)
wb, bb, rm = rng.standard_normal((3, 3)).astype(np.float32)
rv = rng.uniform(0.5, 2.0, 3).astype(np.float32)


def run(name):
    ln, bn = normkit.get("layernorm"), normkit.get("batchnorm")
    y, saved = ln.forward(x, (40,), w, b, backend=name)
    dx, dw, db = ln.backward(dy, x, saved, (40,), w, b, backend=name)
    yb, _ = bn.forward(xb, rm, rv, wb, bb, training=False, backend=name)
    return {("forward", "layernorm y"): y, ("backward", "layernorm dx"): dx, ("backward", "layernorm dweight"): dw,
            ("backward", "layernorm dbias"): db, ("forward", "batchnorm y"): yb}


def errors(got, want):
    return [[d, what, float(np.abs(got[d, what] - want[d, what]).max() / max(1.0, np.abs(want[d, what]).max()))]
            for d, what in want]


got = run(backend)
after = settings()
normkit.set_num_threads(nk_threads)
got_nk = run(backend)
after_nk = settings()
want = run("reference")
numba_threads = None
if backend == "numba":
    import numba
    numba_threads = numba.get_num_threads()
print(json.dumps({"before": before, "after": after, "after_set_num_threads": after_nk,
                  "errors": errors(got, want) + errors(got_nk, want), "numba_threads": numba_threads}))
"""


def _run(backend: str, torch_first: bool, nk_threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", SCRIPT, backend, str(int(torch_first)), str(nk_threads)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("torch_first", [False, True], ids=["numpy", "after-import-normkit.torch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_settings_unchanged(backend, torch_first):
    if torch_first and not HAVE_TORCH:
        pytest.skip("torch is not installed")
    nk_threads = min(2, os.cpu_count() or 1)
    r = _run(backend, torch_first, nk_threads)
    before = r["before"]
    if before["torch"] is not None:
        assert before["torch"][0] == 1
        for when in ("after", "after_set_num_threads"):
            assert r[when]["torch"] == before["torch"], (
                f"{backend}: torch's (intra-op, inter-op) threads went from {before['torch']} to {r[when]['torch']}"
                f" ({when.replace('_', ' ')})")
    if before["openmp"] is not None:
        # every runtime, loaded before the calls or by them, must still have the user's OMP_NUM_THREADS=1
        assert set(before["openmp"].values()) <= {1}
        for when in ("after", "after_set_num_threads"):
            changed = {path: n for path, n in r[when]["openmp"].items() if n != 1}
            assert not changed, f"{backend}: OpenMP max threads changed from 1 ({when.replace('_', ' ')}): {changed}"
    for direction, what, err in r["errors"]:
        assert err <= TOL[("float32", direction)], f"{backend}: {what} off by {err:.3g}"
    if backend == "numba":  # the process's default (NUMBA_NUM_THREADS above); tested further below
        assert r["numba_threads"] == 2, "normkit changed numba's thread count"


def _serial_limit_setter(backend):
    """The backend's set_serial_max_values (the one-thread rule for small inputs)."""
    return pytest.importorskip(f"normkit_kernels.{backend}." + ("kernels" if backend == "cython" else "_common")
                               ).set_serial_max_values


@pytest.mark.parametrize("raw,want", [(None, 32768), ("0", 0), ("100000", 100000), ("abc", None), ("-1", None)])
def test_serial_limit_from_the_environment(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("NORMKIT_SERIAL_MAX_VALUES", raising=False)
    else:
        monkeypatch.setenv("NORMKIT_SERIAL_MAX_VALUES", raw)
    if want is None:
        with pytest.raises(ValueError, match=f"NORMKIT_SERIAL_MAX_VALUES must be an integer >= 0, got '{raw}'"):
            contract.serial_max_values()
    else:
        assert contract.serial_max_values() == want


# (op, shape, groups): each op at a size of the per-call overhead benchmarks, all at most 32768 values
SMALL_CASES = [("batchnorm", (8, 64, 8, 8), 1), ("batchnorm", (300, 40), 1), ("groupnorm", (1, 32, 16, 16), 8),
               ("instancenorm", (4, 16, 16, 16), 1), ("layernorm", (2, 4096), 1), ("rmsnorm", (5, 1000), 1)]


@pytest.mark.parametrize("op,shape,groups", SMALL_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_small_inputs_on_one_thread_give_what_every_thread_gives(backend, op, shape, groups, rng):
    """By default a kernel given at most 32768 values runs on one thread; the test suite runs every input on every
    thread (conftest sets NORMKIT_SERIAL_MAX_VALUES=0). Both give the same bits."""
    set_limit = _serial_limit_setter(backend)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    kw = op_args(op, x, rng, groups=groups, affine="both")
    nk = normkit.get(op)
    threads = normkit.get_num_threads()
    runs = []
    try:
        normkit.set_num_threads(2)
        for limit in (32768, 0):
            set_limit(limit)
            y, saved = nk.forward(x, **copy_args(kw), backend=backend)
            runs.append((y, saved.mean, saved.rstd, *nk.backward(dy, x, saved, **copy_args(kw), backend=backend)))
    finally:
        set_limit(None)
        normkit.set_num_threads(threads)
    for serial, parallel in zip(*runs):
        if serial is not None:
            np.testing.assert_array_equal(serial, parallel)


FOLLOW = r"""
import json, sys
import torch
import normkit, normkit.torch as nkt
import normkit_kernels.cython.kernels as K

given = []  # what the Cython backend is told (the registry keeps the hook it finds when it loads the backend)
real = K.set_num_threads
K.set_num_threads = lambda n: (given.append(n), real(n))[1]
n = int(sys.argv[1])
x = torch.randn(64, 1024)
seen = {}
for step, threads in (("one", 1), ("n", n)):
    torch.set_num_threads(threads)
    seen[step + " before a call"] = normkit.get_num_threads()  # followed without a kernel call in between
    nkt.layer_norm(x, (1024,), backend="cython")
    seen[step] = [normkit.get_num_threads(), given[-1]]
normkit.set_num_threads(1)  # the user's choice holds whatever torch does next
torch.set_num_threads(n)
nkt.layer_norm(x, (1024,), backend="cython")
seen["explicit"] = [normkit.get_num_threads(), given[-1]]
print(json.dumps(seen))
"""


def test_normkit_torch_follows_torchs_thread_count_until_set_num_threads():
    """A process that runs torch on one thread (a DataLoader worker, one of several training processes) runs
    normkit's kernels on one thread too, unless normkit.set_num_threads says otherwise."""
    if not HAVE_TORCH or "cython" not in BACKENDS:
        pytest.skip("needs torch and the Cython backend")
    n = min(2, len(os.sched_getaffinity(0)))
    out = subprocess.run([sys.executable, "-c", FOLLOW, str(n)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"one before a call": 1, "one": [1, 1], "n before a call": n, "n": [n, n], "explicit": [1, 1]}


NUMBA_COUNT = r"""
import numba, numpy as np, normkit
from normkit_kernels.numba import _common

used = []
set_for_loops = _common.use_threads
_common.use_threads = lambda n: (used.append(n), set_for_loops(n))  # what the kernels' loops run on
gn = normkit.get("gn")
small, large = np.ones((2, 8, 4, 4), np.float32), np.ones((8, 64, 32, 32), np.float32)
seen = []
for user, nk in ((1, 2), (2, 1)):
    numba.set_num_threads(user)
    normkit.set_num_threads(nk)
    for x in (large, small):
        used.clear()
        gn(x, num_groups=4, backend="numba")
        seen.append((used[-1], numba.get_num_threads()))
print(seen)
"""


def test_numba_thread_count_stays_the_callers():
    """numba's thread count is per calling thread, and the user's: the numba backend's kernels run their loops on
    normkit's count (one thread for small inputs) and give the caller's count back; normkit.set_num_threads
    reaches the kernels, whatever numba's count is."""
    if "numba" not in BACKENDS or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs the Numba backend and two CPUs")
    env = dict(os.environ, NUMBA_NUM_THREADS="2", NORMKIT_SERIAL_MAX_VALUES="32768")  # (conftest's is 0)
    out = subprocess.run([sys.executable, "-c", NUMBA_COUNT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[(2, 1), (1, 1), (1, 2), (1, 2)]"


FORK = r"""
import multiprocessing as mp, sys
import numpy as np
import normkit

x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
ln = normkit.get("ln")
want = ln(x, (4096,), backend=sys.argv[1])  # the parent's OpenMP threads are running from here on


def child(q):
    normkit.set_num_threads(2)  # asked for, but a team of threads cannot start here
    q.put((normkit.get_num_threads(), ln(x, (4096,), backend=sys.argv[1]).tobytes() == want.tobytes()))


ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(60)
if p.is_alive():
    p.kill()
    print("hang")
else:
    print(p.exitcode, *(q.get() if p.exitcode == 0 else ()))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_child_runs_the_kernels_on_one_thread(backend):
    """GNU OpenMP deadlocks a team of threads started in a process forked from one whose OpenMP threads ran
    (multiprocessing's default start method on Linux before Python 3.14): the child gets one thread. numba's
    OpenMP layer would end the child at its first parallel loop (SIGTERM, exit code -15): the Numba backend
    takes the layer over in the child."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    out = subprocess.run([sys.executable, "-c", FORK, backend], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "True"], out.stdout


# the user's own parallel numba code, in both scripts below
USER_NUMBA = r"""
import numba
import numpy as np


@numba.njit(parallel=True)
def user_sum(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s
"""

NUMBA_LAYER_FORK = USER_NUMBA + r"""
import hashlib, multiprocessing as mp, sys
import normkit


x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)


def digest(a):
    return hashlib.sha256(a.tobytes()).hexdigest()  # (not the bytes: a large put would outlast the child's join)


def normkit_child(q):
    q.put(digest(normkit.get("ln")(x, (4096,), backend="numba")))


def user_child(q):
    q.put(user_sum(np.ones(1_000_000)))


def run(target):
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        return "hang", None
    return p.exitcode, q.get() if p.exitcode == 0 else None


ctx = mp.get_context("fork")
user_sum(np.ones(1_000_000))  # the user's numba code starts numba's OpenMP layer, before normkit's backend loads
code, got = run(normkit_child)
print(code, got == digest(normkit.get("ln")(x, (4096,), backend="numba")))
print(*run(user_child))  # the parent has run normkit's kernels now: a child that runs none keeps numba's guard
"""


# The parent runs the user's numba code without normkit, whose registry then cannot know that the child it forks
# must run one thread: normkit, imported in the child, leaves numba's guard to end the child (a team would hang).
NUMBA_LAYER_FORK_BEFORE_NORMKIT = USER_NUMBA + r"""
import multiprocessing as mp


def child():
    import normkit
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    normkit.get("ln")(x, (4096,), backend="numba")


user_sum(np.ones(1_000_000))
p = mp.get_context("fork").Process(target=child)
p.start()
p.join(60)
print("hang" if p.is_alive() else p.exitcode)
p.kill()
"""


def test_numba_backend_in_a_child_forked_after_any_numba_code():
    """numba's OpenMP layer ends (SIGTERM) a forked child at its first parallel loop when the parent started the
    layer. The Numba backend takes the layer over in the process that loads it, even when the user's own numba code
    had started it, and in a child at its first kernel, so that a child that runs no normkit kernel keeps numba's
    guard: its other numba code would start a team of threads there and wait forever."""
    from normkit_kernels.numba import _common

    if "numba" not in BACKENDS or _common._relaunch is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs the Numba backend on GNU OpenMP and two CPUs")
    out = subprocess.run([sys.executable, "-c", NUMBA_LAYER_FORK], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True", "-15", "None"], out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", NUMBA_LAYER_FORK_BEFORE_NORMKIT], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-15"], out.stdout + out.stderr  # numba's message, not a hang
