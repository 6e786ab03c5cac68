"""The memory ceiling of ``normkit bench``: a copy and a pure read of a given number of bytes, split over the
same number of threads as the kernels they are compared with.

A normalization pass is memory-bound, so what the machine can move in the same time is its ceiling. A one-thread
``np.copyto`` is not that ceiling on a machine whose single core cannot saturate the memory bus: 2-thread kernels
passed it by up to 1.5x. These loops are numba ``prange`` loops (numba is a dependency of normkit anyway), run on
numba's thread pool, which the numba backend starts and whose thread count normkit sets for the calling thread.

- :func:`copy`: read ``src``, write ``dst``: the traffic of a pass that reads as much as it writes (forward).
- :func:`read`: a sum over the words of ``src``: the traffic of reading the same bytes with nothing stored, the
  bound that no kernel which also writes can reach (a store to a line not in cache reads it first).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from normkit_kernels.numba._cache import CACHE
# imported for its side effect: it starts numba's threading layer without changing OpenMP's (PyTorch's) thread
# counts, which a parallel loop compiled here would otherwise do on its first call
from normkit_kernels.numba._common import use_threads

from .alloc import aligned_empty

WORD = np.uint64


@numba.njit(parallel=True, nogil=True, cache=CACHE)
def _copy(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


@numba.njit(parallel=True, nogil=True, cache=CACHE)
def _read(src):
    total = WORD(0)
    for i in prange(src.size):
        total += src[i]
    return total


def words(nbytes: int) -> np.ndarray:
    """A 64-byte-aligned array of ``nbytes // 8`` 8-byte words, filled (so its pages are mapped)."""
    a = aligned_empty((nbytes // 8,), WORD)
    a.fill(1)
    return a


_threads = numba.config.NUMBA_NUM_THREADS


def set_threads(n: int) -> None:
    """Run the loops on ``n`` threads (at most numba's pool size)."""
    global _threads
    _threads = max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def _check_words(name: str, what: str, a) -> None:
    # the loops index without bounds checks: anything but a 1-D array of words would read or write past it
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != WORD:
        got = f"{a.ndim}-D {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"ceiling.{name}: {what} must be a 1-D array of {np.dtype(WORD)} words (words()), got {got}")


# numba's thread count is per calling thread and shared with the numba backend, whose kernels set it to 1 for
# small inputs: each loop sets its own (the bench's tool: the count is left so, where the backend puts it back)
def copy(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[:] = src, for 1-D word arrays of the same size (:func:`words`)."""
    _check_words("copy", "src", src)
    _check_words("copy", "dst", dst)
    if dst.size != src.size:
        raise ValueError(f"ceiling.copy: dst must have src's {src.size} words, got {dst.size}")
    use_threads(_threads)
    _copy(src, dst)


def read(src: np.ndarray) -> int:
    """The sum of a 1-D word array's words (:func:`words`), wrapping around."""
    _check_words("read", "src", src)
    use_threads(_threads)
    return int(_read(src))
