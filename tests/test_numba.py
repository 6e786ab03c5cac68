"""Numba-specific behaviour: lazy compilation, the on-disk cache, thread settings. Numerics and thread
independence of the results are covered for every backend in test_backends.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import normkit  # noqa: E402
from normkit import registry  # noqa: E402

# Runs in a fresh interpreter: calls one kernel and reports what numba compiled, loaded from the cache, or
# had already compiled at import time.
PROBE = r"""
import json, sys, time
import numpy as np
from numba.core.registry import CPUDispatcher
from normkit_kernels.numba import _common
if len(sys.argv) > 1:  # stands for an edit to the package's sources
    _common._PackageCache.digest = sys.argv[1]
import normkit_kernels.numba.kernels as K
from normkit_kernels.numba import batchnorm, groupnorm, layernorm

dispatchers = {f"{m.__name__}.{n}": d for m in (_common, batchnorm, groupnorm, layernorm)
               for n, d in vars(m).items() if isinstance(d, CPUDispatcher)}
compiled_at_import = sorted(n for n, d in dispatchers.items() if d.signatures)
x = np.random.default_rng(0).standard_normal((4, 160)).astype(np.float32)
w = np.ones(160, np.float32)
t = time.perf_counter()
K.KERNELS[("layernorm", "forward", "float32")](x, w, w, 1e-5, np.empty_like(x), np.empty(4, np.float32),
                                              np.empty(4, np.float32))
seconds = time.perf_counter() - t
d = layernorm._ln_forward
print(json.dumps({
    "compiled_at_import": compiled_at_import,
    "signatures": [str(s) for s in d.signatures],
    "hits": sum(d.stats.cache_hits.values()),
    "misses": sum(d.stats.cache_misses.values()),
    "seconds": seconds,
}))
"""


def _probe(cache_dir, *digest) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", PROBE, *digest], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lazy_compile_and_second_process_loads_from_cache(tmp_path):
    first = _probe(tmp_path)
    assert first["compiled_at_import"] == [], "importing the kernels module must not compile anything"
    assert len(first["signatures"]) == 1 and "float32" in first["signatures"][0], (
        "only the dtype that was called may be compiled"
    )
    assert first["misses"] == 1 and first["hits"] == 0
    assert any(tmp_path.rglob("*.nbc")), "nothing was written to NUMBA_CACHE_DIR"

    second = _probe(tmp_path)
    assert second["hits"] == 1 and second["misses"] == 0, "the second process compiled again instead of loading"
    assert second["seconds"] < first["seconds"]

    # layernorm.py is unchanged but the package's sources are not (an edit to _common.py's helpers, which the
    # kernel compiles in): the cached kernel must not be loaded, and the one compiled then is cached beside it
    edited = _probe(tmp_path, "0" * 64)
    assert edited["hits"] == 0 and edited["misses"] == 1, "a kernel of older sources was loaded from the cache"
    assert _probe(tmp_path, "0" * 64)["hits"] == 1
    assert _probe(tmp_path)["hits"] == 1


def test_source_digest_changes_with_any_module(tmp_path):
    from normkit_kernels.numba._common import source_digest

    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "b.py").write_text("B = 2\n")
    before = source_digest(tmp_path)
    (tmp_path / "b.py").write_text("B = 3\n")
    assert source_digest(tmp_path) != before
    (tmp_path / "b.py").write_text("B = 2\n")
    assert source_digest(tmp_path) == before
    (tmp_path / "a.py").rename(tmp_path / "c.py")
    assert source_digest(tmp_path) != before, "a renamed module changes the digest"


def test_normkit_set_num_threads_reaches_the_kernels_not_numbas_setting():
    """The kernels' loops take normkit's count (tests/test_threads.py runs them); numba's own per-thread count is
    the user's and stays as it is."""
    from normkit_kernels.numba import _common

    registry.lookup("layernorm", "forward", "float32", "numba")  # loads the backend
    before, wanted = numba.get_num_threads(), _common._wanted
    try:
        normkit.set_num_threads(1)
        assert _common._wanted == 1
        assert numba.get_num_threads() == before
    finally:
        normkit.set_num_threads(wanted or before)


def test_more_threads_than_numba_has_is_clamped():
    from normkit_kernels.numba import _common, kernels as K

    wanted = _common._wanted
    try:
        K.set_num_threads(numba.config.NUMBA_NUM_THREADS + 5)
        assert _common._wanted == numba.config.NUMBA_NUM_THREADS
    finally:
        _common._wanted = wanted


def test_info_names_threading_layer():
    from normkit_kernels.numba import kernels as K

    assert set(K.INFO) >= {"numba", "threading layer"}
    assert all(isinstance(v, str) and v for v in K.INFO.values())
    assert "nnan" not in K.INFO["fastmath"] and "ninf" not in K.INFO["fastmath"]


def test_thread_count_applies_in_other_python_threads(monkeypatch):
    """numba's thread count is per calling thread; the backend's kernels run their loops on normkit's count in
    every thread and give the thread's own count back."""
    import threading

    from normkit_kernels.numba import _common, kernels as K

    x = np.ones((2, 8), np.float32)
    used, after = [], []
    set_for_loops = _common.use_threads
    monkeypatch.setattr(_common, "use_threads", lambda n: (used.append(n), set_for_loops(n)))
    monkeypatch.setattr(_common, "_serial_max", 0)  # no one-thread rule for this small input

    def work():
        K.KERNELS[("layernorm", "forward", "float32")](x, None, None, 1e-5, np.empty_like(x), np.empty(2, np.float32),
                                                      np.empty(2, np.float32))
        after.append(numba.get_num_threads())

    wanted = _common._wanted
    try:
        K.set_num_threads(1)
        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert used == [1] and after == [numba.config.NUMBA_NUM_THREADS]
    finally:
        _common._wanted = wanted
