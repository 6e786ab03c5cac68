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

# Runs in a fresh interpreter: calls LayerNorm's forward kernel in each dtype given (argv[2:], default float32) and
# reports what numba compiled, loaded from the cache, or had already compiled at import time, and a digest of the
# outputs. argv[1], unless empty, stands for an edit to the package's sources: the digest the cache keys carry.
PROBE = r"""
import hashlib, json, sys, time, warnings
import numpy as np
from numba.core.registry import CPUDispatcher
from normkit_kernels.numba import _cache
if len(sys.argv) > 1 and sys.argv[1]:
    _cache.PackageCache.digest = sys.argv[1]
import normkit_kernels.numba.kernels as K
from normkit_kernels.numba import _common, batchnorm, groupnorm, layernorm

dispatchers = {f"{m.__name__}.{n}": d for m in (_common, batchnorm, groupnorm, layernorm)
               for n, d in vars(m).items() if isinstance(d, CPUDispatcher)}
compiled_at_import = sorted(n for n, d in dispatchers.items() if d.signatures)
outputs = hashlib.sha256()
t = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for dtype in sys.argv[2:] or ["float32"]:
        x = np.random.default_rng(0).standard_normal((4, 160)).astype(dtype)
        w = np.ones(160, dtype)
        out = (np.empty_like(x), np.empty(4, dtype), np.empty(4, dtype))
        K.KERNELS[("layernorm", "forward", dtype)](x, w, w, 1e-5, *out)
        for a in out:
            outputs.update(a.tobytes())
seconds = time.perf_counter() - t
d = layernorm._ln_forward
print(json.dumps({
    "compiled_at_import": compiled_at_import,
    "signatures": [str(s) for s in d.signatures],
    "hits": sum(d.stats.cache_hits.values()),
    "misses": sum(d.stats.cache_misses.values()),
    "seconds": seconds,
    "outputs": outputs.hexdigest(),
    "warnings": [str(w.message) for w in caught],
}))
"""


def _probe(cache_dir, digest="", *dtypes, prelude="") -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", prelude + PROBE, digest, *dtypes], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ln_forward_files(cache_dir, suffix: str) -> list:
    return sorted(cache_dir.rglob(f"layernorm._ln_forward-*{suffix}"))


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
    assert second["outputs"] == first["outputs"]


def test_an_edit_anywhere_in_the_package_compiles_again_and_edits_do_not_pile_up(tmp_path):
    """layernorm.py unchanged but the package's sources not (an edit to _common.py's helpers, which the kernel
    compiles in): the cached kernel must not be loaded. The entry compiled then replaces the older sources' one,
    in its data file: edit after edit, one entry and one data file (back at the first sources, it compiles again)."""
    assert _probe(tmp_path)["misses"] == 1
    for edit in ("0" * 64, "1" * 64, ""):
        edited = _probe(tmp_path, edit)
        assert edited["hits"] == 0 and edited["misses"] == 1, "a kernel of other sources was loaded from the cache"
        assert _probe(tmp_path, edit)["hits"] == 1
        assert len(_ln_forward_files(tmp_path, ".nbc")) == 1


@pytest.mark.parametrize("damage", ["empty index", "garbled index", "truncated data", "garbled data",
                                    "another entry's data", "an older numba's data"])
def test_a_damaged_cache_compiles_again(tmp_path, damage):
    """numba trusted its files: a damaged index or data file raised from every later call (a garbled object file
    crashed LLVM), and a data file that two processes compiling two signatures had both written named the other's
    code. Each counts as absent: the kernel compiles again, computes what it did, and its entry is written anew."""
    first = _probe(tmp_path, "", "float32", "float64")
    assert first["misses"] == 2
    (index,) = _ln_forward_files(tmp_path, ".nbi")
    data = _ln_forward_files(tmp_path, ".nbc")
    assert len(data) == 2
    if damage == "empty index":
        index.write_bytes(b"")
    elif damage == "garbled index":
        index.write_bytes(bytes(range(64)) + index.read_bytes()[64:])
    elif damage == "truncated data":
        data[0].write_bytes(data[0].read_bytes()[:1000])
    elif damage == "garbled data":
        raw = bytearray(data[0].read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
        data[0].write_bytes(bytes(raw))
    elif damage == "another entry's data":  # the two entries' data files swapped
        a, b = data[0].read_bytes(), data[1].read_bytes()
        data[0].write_bytes(b)
        data[1].write_bytes(a)
    else:  # left by a numba before an upgrade, where the new one's write failed: intact, of another version
        import hashlib
        import pickle

        version, key, entry = pickle.loads(data[0].read_bytes()[32:])
        payload = pickle.dumps(("0.1.0", key, entry))
        data[0].write_bytes(hashlib.sha256(payload).digest() + payload)
    again = _probe(tmp_path, "", "float32", "float64")
    assert again["outputs"] == first["outputs"]
    assert again["misses"] == (2 if "index" in damage or damage == "another entry's data" else 1)
    assert _probe(tmp_path, "", "float32", "float64")["hits"] == 2, "the entries were not written anew"


def test_a_cache_that_cannot_be_written_warns_and_the_call_still_runs(tmp_path):
    """A failed write (here: a file-size limit, as a full disk or a quota would fail it) failed the call whose kernel
    had just compiled; now that kernel stays uncached, with one warning."""
    limit = "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
    limited = _probe(tmp_path, prelude=limit)
    assert limited["misses"] == 1 and limited["outputs"] == _probe(tmp_path / "free")["outputs"]
    (message,) = limited["warnings"]
    assert message.startswith("normkit: a Numba kernel could not be written to the disk cache in ")
    assert "compile again in every process" in message
    assert _probe(tmp_path)["misses"] == 1  # nothing usable was cached


def test_source_digest_changes_with_any_module_but_hidden_files(tmp_path):
    from normkit_kernels.numba._cache import source_digest

    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "b.py").write_text("B = 2\n")
    before = source_digest(tmp_path)
    (tmp_path / "b.py").write_text("B = 3\n")
    assert source_digest(tmp_path) != before
    (tmp_path / "b.py").write_text("B = 2\n")
    assert source_digest(tmp_path) == before
    # an editor's lock file beside a file with unsaved changes: a link that points nowhere
    (tmp_path / ".#a.py").symlink_to(tmp_path / "nowhere")
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
