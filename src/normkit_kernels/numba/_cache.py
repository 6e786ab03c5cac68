"""The Numba kernels' disk cache: numba's own, keyed on every module of this package and checked when it is read.

numba caches a compiled kernel next to the file that defines it (or under NUMBA_CACHE_DIR) and keys it on that file
alone (numba issue #1833), but a kernel carries the helpers and constants it took from _common.py and _dtype16.py
(channels_last.py those of groupnorm.py), compiled in. So each entry's key here ends with a digest of every module
of the package: an edit anywhere compiles the kernels again instead of running old code from the cache, and a save
drops the entries of other sources from the index (their data files are reused). numba names a kernel's files by
its line number, though: an edit that moves a kernel leaves its old files behind.

numba trusts its files. A damaged index or data file raised from every later call until someone deleted it (a
garbled object file crashed LLVM, killing the process); a failed write (a full disk) failed the call that had just
compiled its kernel; and two processes compiling two signatures of one kernel at once each pick the first data file
name their copy of the index leaves free, so one entry could name the other's code. Here each data file holds its
entry's key, numba's version and a digest of its contents: a file that does not match, or an index that does not
read, counts as absent (the kernel compiles again and its entry is written anew), and a failed write leaves the
kernel uncached, with a warning.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import warnings
from pathlib import Path

from numba import njit
from numba.core.caching import FunctionCache, IndexDataCacheFile


def _cache_probe():
    return 0


def _can_cache() -> bool:
    """numba caches next to this file, else in the user's cache directory (or NUMBA_CACHE_DIR); when none of
    them is writable, decorating with cache=True raises, and the kernels compile in every process instead."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError:
        return False
    return True


CACHE = _can_cache()


def source_digest(package: Path) -> str:
    """sha256 of the names and contents of the package's modules: its ``*.py`` files but hidden ones (such as the
    ``.#name.py`` link an editor makes beside a file with unsaved changes, which may point nowhere)."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        if not path.name.startswith("."):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


DIGEST = source_digest(Path(__file__).parent)
_CHECK = hashlib.sha256().digest_size  # the digest that starts each data file


class _CheckedFile(IndexDataCacheFile):
    """numba's index and data files, each data file holding ``sha256(payload) + payload``, the payload the pickled
    (numba's version, key, data): a load that finds anything else (damage, another entry's code, or an older
    numba's left where a write failed) loads nothing."""

    def _load_index(self):
        try:
            return super()._load_index()
        except Exception:  # damaged: as if empty, and the next save writes it anew
            return {}

    def save(self, key, data):
        # only the entries of these sources (key[-1]: the digest): other sources' data file names are free again
        index = self._load_index()
        overloads = {k: name for k, name in index.items() if k[-1] == key[-1]}
        name = overloads.get(key)
        if name is None:
            taken = set(overloads.values())
            name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            overloads[key] = name
        payload = self._dump((self._version, key, data))
        with self._open_for_write(self._data_path(name)) as f:
            f.write(hashlib.sha256(payload).digest() + payload)
        if overloads != index:
            self._save_index(overloads)

    def load(self, key):
        name = self._load_index().get(key)
        if name is None:
            return None
        try:
            with open(self._data_path(name), "rb") as f:
                raw = f.read()
        except OSError:  # removed while the index still named it
            return None
        payload = raw[_CHECK:]
        if raw[:_CHECK] != hashlib.sha256(payload).digest():
            return None
        version, saved_key, data = pickle.loads(payload)
        return data if version == self._version and saved_key == key else None


class PackageCache(FunctionCache):
    """numba's cache of one kernel with the package's digest in its keys and _CheckedFile's files; neither a load
    nor a save that fails fails the kernel's call."""

    digest = DIGEST
    _warned = False

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _CheckedFile(self._cache_path, self._impl.filename_base,
                                        self._impl.locator.get_source_stamp())

    def _index_key(self, sig, codegen):
        return (*super()._index_key(sig, codegen), self.digest)

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception:  # what the checked file passed and numba still cannot rebuild: compile it again
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as exc:  # the kernel compiled: only its cache entry is lost
            if not PackageCache._warned:
                PackageCache._warned = True
                warnings.warn(f"normkit: a Numba kernel could not be written to the disk cache in "
                              f"{self._cache_path} ({type(exc).__name__}: {exc}); kernels that are not cached "
                              f"compile again in every process", RuntimeWarning, stacklevel=2)


def jit(**options):
    """numba's njit with ``options``, cached on disk under PackageCache when a cache directory is writable."""
    compile_ = njit(**options)

    def decorate(func):
        dispatcher = compile_(func)
        if CACHE:
            dispatcher._cache = PackageCache(dispatcher.py_func)
        return dispatcher

    return decorate
