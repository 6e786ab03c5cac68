"""64-byte-aligned output arrays.

NumPy aligns its allocations to 16 bytes only, and a large array (served by ``mmap``) usually starts 16 bytes
past a 64-byte line, so every row of a kernel's output straddles cache lines and its vector stores split. A cache
line and an AVX-512 register are 64 bytes: normkit allocates its large outputs at that alignment.

Aligning costs about a microsecond of Python per array on top of ``np.empty`` (measured with
``benchmarks/test_overhead.py``: +3 to +5 µs per frontend call when all three outputs of a small call were aligned),
which is most of a call at small shapes, where a pass runs from cache in a few microseconds and its stores'
alignment is lost in the call's fixed costs. So :func:`empty` aligns arrays of ``ALIGN_MIN_BYTES`` or more and
leaves smaller ones to ``np.empty``.

Where an output sits relative to the inputs its kernel reads matters too: a load whose address matches that of a
store still in flight in its low 12 bits waits for the store ("4K aliasing"). A pass that stores dx[i] and then
loads x[i + 16] stalls on every vector when dx starts 64 bytes past x modulo 4 KiB. Hot, in one process, Cython
backward by dx's offset from x and dy: GroupNorm (32, 512, 7, 7) 142-148 µs at 0 and at or below it, 158 at +32,
171-184 at +64, 149-170 up to +256, 152-156 up to +512; LayerNorm (2048, 256) 193-204 µs at 0, 205-232 from +64 to
+480. The allocator decides that offset: through the NumPy frontend, with NumPy's inputs, dx landed 304 and 368
bytes past x in most calls of a loop, and those calls took 1.12-1.24x (GroupNorm) and 1.25-1.30x (LayerNorm) the
time of the others. So an output that goes with inputs (``near``) starts at the 64-byte boundary at or just below
their addresses modulo 4 KiB, which costs an allocation of 4 KiB more and 0.5-0.9 µs (alternating with the
64-byte placement alone in a plain loop of frontend calls: 0.98-1.02x, LayerNorm (8192, 1024) 0.96x, whose
outputs had been mmapped 48 bytes past NumPy's inputs).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

ALIGNMENT = 64
ALIGN_MIN_BYTES = 256 * 1024
PAGE = 4096  # the span of the address bits that 4K aliasing compares
_char_at = ctypes.c_char.from_buffer  # the address of a writable buffer in ~150 ns (ndarray.ctypes.data: ~850)


def _address(a: np.ndarray) -> int:
    try:
        return ctypes.addressof(_char_at(a))
    except (TypeError, ValueError):  # a read-only array, or a dtype that the buffer protocol cannot name (bfloat16)
        return a.ctypes.data


def page_offset(near) -> int:
    """The 64-byte-aligned offset modulo 4 KiB at or just below the addresses of the arrays ``near``: below the one
    that trails the others (an input that trails the last one so far by less than half a page takes its place), so
    that no input is read just ahead of where the output is written."""
    last = _address(near[0]) % PAGE
    for a in near[1:]:
        o = _address(a) % PAGE
        if (last - o) % PAGE < PAGE // 2:
            last = o
    return last - last % ALIGNMENT


def aligned_empty(shape, dtype, near=()) -> np.ndarray:
    """``np.empty(shape, dtype)``, C-contiguous, its data starting on a 64-byte boundary: with ``near`` (the arrays
    a kernel reads while it writes this one), the boundary at :func:`page_offset` modulo 4 KiB.

    One allocation of ``ALIGNMENT`` bytes more (``PAGE`` with ``near``), and an array placed inside it at the first
    address that qualifies. The array's ``base`` owns the memory.
    """
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if type(shape) is not tuple:
        shape = tuple(shape) if isinstance(shape, list) else (shape,)
    nbytes = math.prod(shape) * dtype.itemsize
    if near:
        raw = np.empty(nbytes + PAGE, np.uint8)
        return np.ndarray(shape, dtype, raw, (page_offset(near) - ctypes.addressof(_char_at(raw))) % PAGE)
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    return np.ndarray(shape, dtype, raw, -ctypes.addressof(_char_at(raw)) % ALIGNMENT)


def aligned_copy(a: np.ndarray, near=()) -> np.ndarray:
    """A C-contiguous copy of ``a`` on a 64-byte boundary (placed as :func:`aligned_empty` places it), as
    normkit's frontends allocate outputs and torch's allocator does tensors (``np.ascontiguousarray`` would give
    NumPy's 16-byte alignment)."""
    out = aligned_empty(a.shape, a.dtype, near)
    out[...] = a
    return out


def empty(shape, dtype, nbytes: int | None = None, near=()) -> np.ndarray:
    """An output array: :func:`aligned_empty` (with ``near``) at ``ALIGN_MIN_BYTES`` or more, else ``np.empty``.
    ``nbytes``, when the caller knows it, saves computing it."""
    if nbytes is None:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return aligned_empty(shape, dtype, near) if nbytes >= ALIGN_MIN_BYTES else np.empty(shape, dtype)


def kernel_array(a, dtype=None) -> np.ndarray:
    """``a`` as kernels are handed arrays (normkit.contract): C-contiguous and at an address that is a multiple of
    its element size. NumPy keeps a view of a byte buffer at an odd offset (``np.frombuffer(..., offset=1)``) as it
    is, and compiled kernels may not read floats there; such an array is copied."""
    a = np.ascontiguousarray(a, dtype)
    return a if a.flags.aligned else a.copy()
