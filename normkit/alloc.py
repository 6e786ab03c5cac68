"""64-byte-aligned output arrays.

NumPy aligns its allocations to 16 bytes only, and a large array (served by ``mmap``) usually starts 16 bytes
past a 64-byte line, so every row of a kernel's output straddles cache lines and its vector stores split. A cache
line and an AVX-512 register are 64 bytes: normkit allocates its large outputs at that alignment.

Aligning costs about a microsecond of Python per array on top of ``np.empty`` (measured with
``benchmarks/test_overhead.py``: +3 to +5 µs per frontend call when all three outputs of a small call were aligned),
which is most of a call at small shapes, where a pass runs from cache in a few microseconds and its stores'
alignment is lost in the call's fixed costs. So :func:`empty` aligns arrays of ``ALIGN_MIN_BYTES`` or more and
leaves smaller ones to ``np.empty``.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

ALIGNMENT = 64
ALIGN_MIN_BYTES = 256 * 1024
_char_at = ctypes.c_char.from_buffer  # the address of a writable buffer in ~150 ns (ndarray.ctypes.data: ~850)


def aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, C-contiguous, its data starting on a 64-byte boundary.

    One allocation of ``ALIGNMENT`` bytes more, and an array placed inside it at the first aligned address. The
    array's ``base`` owns the memory.
    """
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if type(shape) is not tuple:
        shape = tuple(shape) if isinstance(shape, list) else (shape,)
    raw = np.empty(math.prod(shape) * dtype.itemsize + ALIGNMENT, np.uint8)
    return np.ndarray(shape, dtype, raw, -ctypes.addressof(_char_at(raw)) % ALIGNMENT)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` on a 64-byte boundary, as normkit's frontends allocate outputs and torch's
    allocator does tensors (``np.ascontiguousarray`` would give NumPy's 16-byte alignment)."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def empty(shape, dtype, nbytes: int | None = None) -> np.ndarray:
    """An output array: :func:`aligned_empty` at ``ALIGN_MIN_BYTES`` or more, else ``np.empty``. ``nbytes``, when
    the caller knows it, saves computing it."""
    if nbytes is None:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return aligned_empty(shape, dtype) if nbytes >= ALIGN_MIN_BYTES else np.empty(shape, dtype)
