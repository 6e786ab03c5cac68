# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""BatchNorm, and the per-channel inference kernels that BatchNorm and InstanceNorm share.

Channel c's values are the N rows x[i, c, :] of S contiguous values. Three schedules, chosen from the shape
alone, so that the summation order (and so every result) never depends on the thread count:

- channels (S >= SHORT_ROW, C >= MANY_CHANNELS): one task per channel sums its rows, then runs the elementwise
  pass over them while they are still in cache;
- rows (S >= SHORT_ROW, few channels): one task per row (i, c) for the sums, merged per channel in row order,
  then one task per row for the elementwise pass;
- columns (S < SHORT_ROW, e.g. (N, C) input; in the plain training kernels also S < COLUMNS_S with N >= S): on
  the (N, C*S) view, a task takes the whole channels in NARROW_CHUNK columns (CHUNK for larger data:
  _chunk_channels) and sums down its columns in row order (vectorized across columns); the S columns of a channel are
  merged in order. With enough such tasks, each one then finishes its channels and runs their elementwise pass
  with per-column coefficients, all in one parallel region. With few (narrow inputs such as (256, 16)) and enough
  rows, the rows are cut into blocks too, so that every core sums, the blocks' sums are merged per channel in
  block order, and the elementwise pass runs row by row.

Fused activation (the act_ directions): the channels schedule where it applies, otherwise the rows or columns
schedule with separate passes (never the whole-columns tasks): statistics (forward) or gradient sums (backward),
then the elementwise pass, with the activation, or dy * act'(z) on z recomputed from x, computed on the fly in
each pass that reads dy.
"""

import os
import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport isfinite, sqrt
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from libc.stdint cimport uint16_t

from _common cimport (
    ACT_CHUNK, FROM_MEMORY_BYTES, NORMKIT_BUILD_FLAGS, NORMKIT_HAVE_OPENMP, NORMKIT_OPENMP_NOTE, NO_ACT,
    SERIAL_MAX_VALUES, STREAM_AFFINE, STREAM_GRAD, STREAM_SCALE, TILE16, act_grad, act_grad_apply,
    act_grad_apply_stream, act_grad_sums, act_grad_sums_kept, affine, affine16, affine16_runs, affine_act,
    affine_act_stream, affine_columns, affine_columns_act, all_finite, column_grad_sums, column_moments, columns_stream,
    finish_moments, fold_rows, grad_apply, grad_apply16, grad_apply16_runs, grad_apply_columns, grad_apply_inplace,
    grad_sums, grad_sums16, grad_sums_scale, max_offset, moments, moments16, narrow64, normkit_col_sums16,
    normkit_cols16, normkit_cols_act_grad_f, normkit_half_init, normkit_narrow, normkit_regs16, normkit_sfence,
    normkit_sums16_runs, normkit_widen, normkit_x86_64_copies, pivot16, pivot_of, prefetch_run, rounded_shift,
    scale_columns, scale_copy, scale_copy16, threads_for, to_double,
)

# How this module was built (setup.py); the backend reads it for its INFO and to pick an x86-64 copy: the
# subpackages of the copies built that this CPU runs, lowest level first.
BUILD = {
    "openmp": bool(NORMKIT_HAVE_OPENMP),
    "openmp_note": NORMKIT_OPENMP_NOTE.decode(),
    "flags": NORMKIT_BUILD_FLAGS.decode(),
    "x86_64_copies": tuple(name for bit, name in ((1, "x86_64_v3"), (2, "x86_64_v4"))
                           if normkit_x86_64_copies() & bit),
}

# float16 converts with F16C where the CPU has it, unless NORMKIT_CYTHON_NO_F16C=1 asks for the portable code (to
# test or compare it); each module holds its own choice.
F16C = bool(normkit_half_init(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") in ("", "0")))

# the wide whole-column tasks' scratch, per calling thread (_column_scratch)
_local = threading.local()

cdef Py_ssize_t SHORT_ROW = 32
cdef Py_ssize_t MANY_CHANNELS = 32
# The plain kernels (no fused activation) take the columns schedule also for runs shorter than COLUMNS_S where the
# batch holds at least S samples (_columns): the channels schedule then reads N runs of under 64 values a channel.
# In-process, 2 threads, float32, against the channels schedule, forward / backward: (256, 64, 32) 0.41 / 0.56,
# (64, 512, 63) 0.67 / 0.74, (128, 256, 7x7) 0.77 / 0.78, (64, 512, 7x7) 0.87 / 0.82, (48, 128, 6x6) 0.67 / 0.82,
# (64, 64, 60) 0.61 / 0.81; smaller batches lose ((32, 512, 7x7) backward 1.03, (8, 256, 6x6) 1.43), and so do
# the fused activations' backward (1.03-1.46 at those shapes).
# Since then the columns start at a batch of S / 2, for ResNet's last stage at batch 32 ((32, C, 7x7)): in-process
# against the channels schedule, 2 threads, float32, forward in cache / with the data from memory (32 MiB written
# between calls, as a model leaves them): (32, 128, 7x7) 0.78 / 0.87, (32, 512, 7x7) 0.85 / 0.92, (32, 2048, 7x7)
# 0.82 / 0.87, (48, 128, 7x7) 0.76 / 0.85, (28, 256, 7x7) 0.87 / 0.96, (20, 256, 6x6) 0.73 / 0.83, (18, 512, 6x6)
# 0.71 / 0.76, (13, 256, 5x5) 1.00 / 0.96 (below S / 2 they lose from memory: (20, 256, 7x7) 1.04). The backward
# loses in cache ((32, 128, 7x7) 1.25, (32, 512, 7x7) 1.25, (20, 256, 6x6) 1.06) but wins from memory (0.91 /
# 0.93 / 0.77) and with dy in cache and x from memory (0.90 / 0.91 / 0.81), its state in a model: inside the
# ResNet of the model benchmark its (32, 128, 7, 7) backward kernels took 0.83-0.93x their time on the channels
# schedule, the forward ones 0.88-0.96x. bfloat16: the forward wins everywhere (0.83-0.94), the backward loses
# (0.95-1.21), so the 16-bit backward keeps a batch of S (_columns' half_batch).
cdef Py_ssize_t COLUMNS_S = 64
# _apply_channels16 (the 16-bit forward's affine pass on its own: inference, the split apply, training with few
# channels) walks whole rows of the (N, C*S) view with per-column coefficients below this S, run by run above it:
# (32, 128, 7, 7) bfloat16 inference 25 -> 21 us that way (torch 18), but (32, 64, 14, 14) 34 -> 38 us. (The
# backward's pass keeps SHORT_ROW.)
cdef Py_ssize_t SHORT_ROW16 = 128

cdef enum:
    # columns schedule: a task takes the whole channels that fit in NARROW_CHUNK columns of the (N, C*S) view, or
    # CHUNK columns: a sums-only task of data from memory, or a 16-bit whole-column task (_chunk_channels,
    # _whole_column_channels: from WIDE_CHUNK_BYTES of data with runs, S > 1, converted in registers)
    NARROW_CHUNK = 256
    CHUNK = 1024
    WIDE_CHUNK_BYTES = 2 << 20
    # doubles of scratch per 16-bit whole-column task of up to CHUNK columns: two rows of double sums, then three or
    # four rows of float32 per-column values; on the heap for wide tasks (_column_scratch), so that every task's
    # frame stays as small as a narrow one's (10-23 KB; 41-54 KB with these buffers on the stack: threads may have
    # 128 KB, musl's default)
    COLUMN_SCRATCH = 5 * CHUNK
    # with at least WIDE_TASKS such tasks, each one also runs the elementwise pass over its columns (one parallel
    # region, the columns still in cache); with fewer, the rows are cut into blocks as well (if there are enough),
    # for ROW_TASKS tasks of at least BLOCK_ROWS rows, whose partial sums are merged per channel in block order
    WIDE_TASKS = 4
    ROW_TASKS = 8
    BLOCK_ROWS = 64
    # rows of a column task whose dy * act'(z) is made at a time (fused activation's gradient sums)
    ACT_ROWS = 8
    # the columns schedule's separate elementwise pass takes whole rows of the (N, C*S) view, at least one and as
    # many as fit in this many values, with the per-column coefficients repeated for them: one call per block of
    # short rows rather than per row (channels-last (N*S, C, 1) with C = 64: a row is 64 values). Small enough
    # that the coefficients (3 arrays forward, 6 backward) stay in L1 beside the data: at 4096 (48 KB of float32
    # coefficients forward) the channels-last BatchNorm (32, 128, 7, 7) ran at 1.02x / 1.42x torch forward /
    # backward, at 1024 0.68x / 0.90x, and its inference pass 33 -> 18 us. Float32 at 256 rather than 1024
    # (in-process A/B, 2 threads, channels-last (N*S, C, 1) view, both orders): backward (64, 256, 14, 14)
    # 0.83x, (8, 64, 28, 28) 0.81x, (32, 128, 7, 7) 0.86x; forward (32, 512, 7, 7) 0.76-0.79x; (32, 64, 56, 56)
    # unchanged (the same bits). The 16-bit passes keep 1024 (ROW_BLOCK16): at 256, (64, 256, 14, 14) bfloat16
    # ran 5-11% slower in all three directions
    ROW_BLOCK = 256
    ROW_BLOCK16 = 1024
    # ...but where the data come from memory (x of AHEAD_MIN_BYTES or more), blocks of ROW_BLOCK_MEMORY values: the
    # same loop over x and y streaming from memory ran 17-37% slower beside coefficients of 256 values than of 64
    # (C model of the pass, channels-last C = 16 and 64, 6 to 26 MB, 1 and 2 threads; the cause not pinned down:
    # the prefetchers, or the coefficients' loads against the stores' addresses), where in cache the 256 win (64:
    # 1.15-1.3x their time). float32 channels-last inference (32, 64, 56, 56) and (32, 16, 112, 112) had run at
    # 1.03-1.5x torch's kernel, which keeps its per-channel coefficients in one row of C values. The backward's
    # pass (in-process A/B 0.88-1.12x) and the 16-bit ones (bfloat16 forward 1.0-1.19x) keep their blocks.
    # The inference forward takes ROW_BLOCK_MEMORY at any size: its input comes from the layer before, not from
    # the cache of a pass of its own (right after a channels-last convolution, in-process, at the ResNet model's
    # shapes (32, 16, 56, 56) to (32, 128, 7, 7): 0.77-0.97x the time of 256-value blocks in 15 runs of 15; the
    # model's channels-last inference step 1.01-1.03x torch against 1.03-1.06x), where the training forward's
    # pass reads x again right after its statistics pass (with 64-value blocks below 8 MiB too, that model's
    # channels-last training step went from 1.01-1.03x torch to 1.05-1.06x).
    ROW_BLOCK_MEMORY = 64
    # The channel schedule reads a channel's rows, runs of S values C * S apart, and asks for a run ahead of the
    # one it works on (prefetch_run). A run of S = 196 float32 is ~30 ns of memory traffic, short of memory's
    # latency: where x has AHEAD_MIN_BYTES or more (a quarter of the 32 MiB L3 of the machines measured; beyond
    # it the data come from memory) the run asked for is AHEAD_BYTES ahead (10 runs of 196 float32 forward, 5 of
    # dy and x backward), else the next one. In-process, 2 threads, against the next one: (64, 256, 14, 14)
    # forward 0.78-0.86x, backward 0.87-0.92x; (128, 256, 14, 14) 0.83x / 0.92x; (48, 256, 14, 14) 0.99x / 0.95x;
    # on data in cache it cost 7-10% ((32, 512, 7, 7), (8, 512, 14, 14): 3.2 MB), 3-4% at 6.4 MB
    AHEAD_BYTES = 8192
    AHEAD_MIN_BYTES = 8 << 20
    # The columns schedule's statistics and gradient sums take rows of at most FOLD_MAX_ROW values k at a time
    # (fold_rows in _common.pxd) where there are at least FOLD_MIN_ROWS such wide rows (the schedule's row blocks).
    FOLD_MIN_ROWS = 512

cdef int _nthreads = 1
cdef Py_ssize_t _serial_max = SERIAL_MAX_VALUES
# Outputs of this many bytes or more are written with non-temporal stores (set_stream_min_bytes).
cdef Py_ssize_t _stream_min = 1 << 62
# Column sums of data of this many bytes or more read whole rows (set_from_memory_bytes; FROM_MEMORY_BYTES).
cdef Py_ssize_t _from_memory = FROM_MEMORY_BYTES


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


def set_serial_max_values(Py_ssize_t n):
    global _serial_max
    _serial_max = n


def set_stream_min_bytes(Py_ssize_t n):
    global _stream_min
    _stream_min = n


DEFAULT_FROM_MEMORY_BYTES = FROM_MEMORY_BYTES  # for kernels.set_from_memory_bytes(None)


def set_from_memory_bytes(Py_ssize_t n):
    global _from_memory
    _from_memory = n


cdef inline const floating* _ptr(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef inline floating* _out(floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _chunk_channels(Py_ssize_t s, bint wide) noexcept nogil:
    """Whole channels in a column task of the (N, C*S) view: NARROW_CHUNK columns, or with ``wide`` CHUNK (S <
    COLUMNS_S <= NARROW_CHUNK; S = 0, no values, as 1: the schedule's loops then run empty instead of dividing by
    zero). Wide are the sums-only tasks of data from memory (_column_split) and the whole-column tasks of 16-bit
    data with runs from WIDE_CHUNK_BYTES (_whole_column_channels). "From memory" is FROM_MEMORY_BYTES in two places:
    the task widths here follow the compiled constant, the column sums' whole-rows path follows the module's
    settable _from_memory, so that a test can force one path on the same schedule.
    From memory, rows wider than a task of NARROW_CHUNK columns are read once per group of rows only if a task
    takes them whole (the column sums' whole-rows path, NORMKIT_COL_SUMS in _common.pxd; a narrow task reads a
    strip of each row). BatchNorm of (R, C, 1) (channels-last data), in-process, 2 threads, ms, 256-column tasks
    with steps against 1024-column ones with whole rows: float32, 100 MB, C = 512 forward 10.7 -> 8.9, backward
    17.1 -> 10.5; C = 1024 17.9 -> 9.5, 28.0 -> 15.1; C = 2048 21.7 -> 15.5, 37.8 -> 22.1; bfloat16 C = 1024 15.2
    -> 5.5, 21.6 -> 9.4; with a fused ReLU, C = 1024 12.4 -> 9.8, 37.4 -> 25.8. Wide sums-only tasks in cache lost
    where one wide task is cut into row blocks ((1024, 512, 1) .. (2048, 512, 1) 1.05-1.22x)."""
    return (CHUNK if wide else NARROW_CHUNK) // max(1, s)


cdef inline Py_ssize_t _column_tasks(Py_ssize_t nc, Py_ssize_t s, bint wide) noexcept nogil:
    """Column tasks of the columns schedule: _chunk_channels(s, wide) whole channels each."""
    return _cdiv(nc, _chunk_channels(s, wide))


cdef inline Py_ssize_t _row_blocks(Py_ssize_t n, Py_ssize_t tasks) noexcept nogil:
    return max(1, min(_cdiv(ROW_TASKS, max(1, tasks)), n // BLOCK_ROWS))


cdef inline Py_ssize_t _column_split(Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, Py_ssize_t nbytes,
                                     Py_ssize_t* width, Py_ssize_t* tasks, Py_ssize_t* rows) noexcept nogil:
    """The columns schedule with row blocks: sets the width (in columns) of a column task, the number of column
    tasks and the rows per block; returns the number of row blocks."""
    width[0] = _chunk_channels(s, nbytes >= FROM_MEMORY_BYTES) * s
    tasks[0] = _column_tasks(nc, s, nbytes >= FROM_MEMORY_BYTES)
    cdef Py_ssize_t blocks = _row_blocks(n, tasks[0])
    rows[0] = _cdiv(n, blocks)
    return blocks


cdef struct ColumnSplit:
    # The columns schedule's sums over (n, nc * s) data: k rows taken as one row of `length` = k * nc * s columns
    # (fold_rows), n // k such rows cut into `blocks` blocks of `rows` rows and `tasks` column tasks of `width`
    # columns (_column_split); the n % k rows left over (`tail`) summed on their own after them. Block b's column
    # sums land at b * length of the sums' buffer, the tail's at blocks * length: groups of nc * s columns in row
    # order, which _merge_groups adds up per channel.
    Py_ssize_t k, n, length, width, tasks, rows, blocks, tail


cdef inline ColumnSplit _split_columns(Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, Py_ssize_t itemsize) noexcept nogil:
    cdef ColumnSplit sp
    sp.k = fold_rows(n, nc * s, FOLD_MIN_ROWS)
    sp.n = n // sp.k
    sp.length = sp.k * nc * s
    sp.tail = n % sp.k
    sp.blocks = _column_split(sp.n, sp.k * nc, s, n * nc * s * itemsize, &sp.width, &sp.tasks, &sp.rows)
    return sp


cdef inline Py_ssize_t _task_rows(const ColumnSplit* sp, Py_ssize_t t) noexcept nogil:
    """Rows of task t's block (the last block may have fewer, or none)."""
    return max(0, min(sp.rows, sp.n - t // sp.tasks * sp.rows))


cdef inline Py_ssize_t _task_column(const ColumnSplit* sp, Py_ssize_t t) noexcept nogil:
    """Task t's first column."""
    return t % sp.tasks * sp.width


cdef inline Py_ssize_t _task_end(const ColumnSplit* sp, Py_ssize_t t) noexcept nogil:
    """Task t's column past its last."""
    return min(sp.length, (t % sp.tasks + 1) * sp.width)


cdef inline Py_ssize_t _groups(const ColumnSplit* sp) noexcept nogil:
    """Groups of nc * s column sums in the sums' buffer (the tail's included)."""
    return sp.blocks * sp.k + (1 if sp.tail else 0)


cdef inline Py_ssize_t _runs_ahead(Py_ssize_t run_bytes, Py_ssize_t data_bytes) noexcept nogil:
    """How many runs ahead the channel schedule asks for the run it will read (see AHEAD_BYTES)."""
    return 1 if data_bytes < AHEAD_MIN_BYTES else max(1, AHEAD_BYTES // max(1, run_bytes))


cdef inline Py_ssize_t _block_rows(Py_ssize_t n, Py_ssize_t length,
                                   Py_ssize_t block=ROW_BLOCK) noexcept nogil:
    """Rows of the (N, C*S) view per call of the columns schedule's separate elementwise pass (``block`` values:
    ROW_BLOCK, ROW_BLOCK16 for 16-bit data; at most the n there are; rows without values, C*S = 0, one per
    call)."""
    return max(1, min(n, block // max(1, length)))


cdef inline Py_ssize_t _pass_rows(Py_ssize_t n, Py_ssize_t length, Py_ssize_t itemsize,
                                  Py_ssize_t block) noexcept nogil:
    """Rows per call of the columns schedule's separate elementwise pass over (n, length) data of ``itemsize``
    bytes a value (float32, float64): _block_rows of ``block`` (ROW_BLOCK, or ROW_BLOCK_MEMORY for an input that
    comes from the layer before), or of ROW_BLOCK_MEMORY for data from memory."""
    return _block_rows(n, length, block if n * length * itemsize < AHEAD_MIN_BYTES else ROW_BLOCK_MEMORY)


cdef inline bint _columns(Py_ssize_t n, Py_ssize_t s, int act, bint half_batch=True) noexcept nogil:
    """Whether BatchNorm's forward and backward (training, and the inference backward) of (n, nc, s) data take the
    columns schedule rather than the channels or rows one: runs shorter than SHORT_ROW, and for the plain kernels
    runs shorter than COLUMNS_S in a batch of s / 2 samples or more (without ``half_batch``, the 16-bit backward's:
    of s or more). (The inference forward and the split directions keep SHORT_ROW.)"""
    return s < SHORT_ROW or (act == NO_ACT and s < COLUMNS_S and (2 * n >= s if half_batch else n >= s))


cdef inline Py_ssize_t _whole_column_channels(Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, Py_ssize_t itemsize,
                                              bint half_batch=True, bint regs16=False) noexcept nogil:
    """Channels per task where the columns schedule of a plain kernel runs tasks of whole channels (sums,
    statistics and the elementwise pass in one parallel region), else 0. They do with enough tasks, or when cutting
    the rows into blocks would not add any; not channels-last rows of more than NARROW_CHUNK values from memory (s
    = 1), whose sums read whole rows in the sums-only tasks (_chunk_channels). (The tasks are counted only then:
    NARROW_CHUNK // s is 0 for longer runs.) Whole-column tasks sum in steps of registers: from memory they only
    come with s > 1, as strips of rows (the whole-rows path was measured on whole rows only).
    16-bit data (``regs16``: whose format the build converts in registers, normkit_regs16) with runs (s > 1), from
    WIDE_CHUNK_BYTES, take CHUNK columns a task where that leaves WIDE_TASKS: the tasks make their per-row calls a
    quarter as often. In-process, 2 threads, bfloat16, narrow -> wide tasks' time, forward / backward: (32, 1024,
    7x7) 0.74-0.83 / 0.95-1.01, (64, 2048, 7x7) 0.65-0.82 / 0.77-0.82, (128, 512, 7x7) 0.82-0.85 / 0.76-0.82, (64,
    512, 6x6) 0.72-0.88 / 0.80-0.97, (128, 1024, 3x3) 0.85-0.91 / 0.86-0.99, (256, 2048, 2x2) 1.00-1.07 /
    0.93-1.03; float16 alike; the x86-64-v3 copy (8 lanes) 0.63-0.85 / 0.68-1.02. Without the register path (the
    baseline build; float16 with NORMKIT_CYTHON_NO_F16C) they ran 0.91-1.21x. Float32 tasks of CHUNK columns gained
    only forward at 7x7 (0.81-0.95, one run 1.01; (32, 1024, 4x4) 1.13-1.16, (128, 1024, 3x3) 0.96-1.17) and lost
    backward (1.03-1.32, but 0.92-1.00 at (32, 512..2048, 7x7)): float tasks stay narrow."""
    cdef Py_ssize_t tasks, nbytes = n * nc * s * itemsize
    if not _columns(n, s, NO_ACT, half_batch) or (s == 1 and nc > NARROW_CHUNK and nbytes >= FROM_MEMORY_BYTES):
        return 0
    if regs16 and s > 1 and nbytes >= WIDE_CHUNK_BYTES and _column_tasks(nc, s, True) >= WIDE_TASKS:
        return _chunk_channels(s, True)
    tasks = _column_tasks(nc, s, False)
    return _chunk_channels(s, False) if tasks >= WIDE_TASKS or _row_blocks(n, tasks) == 1 else 0


cdef double* _column_scratch(Py_ssize_t k, Py_ssize_t s, int nt):
    """The scratch of 16-bit whole-column tasks of k channels of s columns: NULL for narrow ones (their buffers on
    the stack), else COLUMN_SCRATCH doubles for each of nt threads (at threadid() * COLUMN_SCRATCH), kept per
    calling thread rather than allocated per call (a draft that gave every task, narrow ones too, a slice of a
    malloc per call ran bfloat16 (32, 1024, 4x4) at 1.05-1.13x the time; the cause was not found: a malloc and
    free of that size does not page-fault here)."""
    if k * s <= NARROW_CHUNK:
        return NULL
    buf = getattr(_local, "columns", None)
    if buf is None or buf.shape[0] < nt * COLUMN_SCRATCH:
        buf = _local.columns = np.empty(nt * COLUMN_SCRATCH)
    cdef double[::1] v = buf
    return &v[0]


cdef inline double* _task_scratch(double* scratch) noexcept nogil:
    """The calling thread's part of _column_scratch's buffer (NULL for NULL)."""
    return NULL if scratch == NULL else scratch + threadid() * COLUMN_SCRATCH


# --- per-task loops --------------------------------------------------------------------------------------------

cdef void _forward_channel(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                           Py_ssize_t c, double eps, const floating* w, const floating* b, int act, double slope,
                           bint stream, double* mean, double* rstd) noexcept nogil:
    cdef Py_ssize_t i, d = _runs_ahead(s * sizeof(floating), n * nc * s * sizeof(floating))
    cdef double s1 = 0.0, s2 = 0.0, pivot = pivot_of(x[c * s]), scale
    for i in range(1, min(d, n)):
        prefetch_run(x + (i * nc + c) * s, s * sizeof(floating))
    for i in range(n):
        if i + d < n:
            prefetch_run(x + ((i + d) * nc + c) * s, s * sizeof(floating))
        moments(x + (i * nc + c) * s, s, pivot, &s1, &s2)
    finish_moments(s1, s2, n * s, pivot, eps, mean, rstd)
    scale = rstd[0] * w[c] if w != NULL else rstd[0]
    for i in range(n):
        if stream:
            affine_act_stream(x + (i * nc + c) * s, y + (i * nc + c) * s, s, mean[0], scale,
                              b[c] if b != NULL else 0.0, act, slope)
        else:
            affine_act(x + (i * nc + c) * s, y + (i * nc + c) * s, s, mean[0], scale, b[c] if b != NULL else 0.0,
                       act, slope)
    if stream:
        normkit_sfence()


cdef inline void _coefficients(bint training, double sdy, double sdyx, double m, double rstd, double w,
                               double* ca, double* cb, double* cc) noexcept nogil:
    # dx = ca * dy + cb * (x - mean) + cc; training: the batch statistics depend on x, so
    # dx = rstd * w * (dy - mean(dy) - xhat * mean(dy * xhat)).
    ca[0] = rstd * w
    if training:
        cb[0] = -rstd * rstd * rstd * w * sdyx / m
        cc[0] = -rstd * w * sdy / m
    else:
        cb[0] = 0.0
        cc[0] = 0.0


cdef void _backward_channel(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, Py_ssize_t nc,
                            Py_ssize_t s, Py_ssize_t c, bint training, bint sums, double mean, double rstd,
                            double w, double bias, int act, double slope, bint stream, double* sdy,
                            double* sdyx) noexcept nogil:
    cdef Py_ssize_t i, off
    cdef double a = 0.0, b = 0.0, ca, cb, cc
    # inference with parameter gradients: dx = dy * rstd * w in the pass of the sums, with ordinary stores also
    # where dx would stream (one pass, rather than the sums' pass and a streamed one, whose sums the compiler may
    # group otherwise: dweight and dbias would then depend on the output's size and the cache's)
    cdef bint scaled = sums and not training and act == NO_ACT
    # a fused activation's g = dy * act'(z), made for the sums, left in dx (the channel's rows stay in cache) for
    # the second pass to read rather than make again (not with streaming stores, where dx is not to be read back):
    # float32, 2 threads, against making it again: (64, 256, 14, 14) ReLU 0.61x, SiLU 0.61x; (16, 128, 28, 28)
    # 0.89x / 0.63x; (32, 512, 7, 7) 0.78x / 0.61x (the same bits)
    cdef bint kept = sums and act != NO_ACT and not stream
    cdef Py_ssize_t d = _runs_ahead(2 * s * sizeof(floating), n * nc * s * sizeof(floating))
    if sums:
        for i in range(1, min(d, n)):
            prefetch_run(dy + (i * nc + c) * s, s * sizeof(floating))
            prefetch_run(x + (i * nc + c) * s, s * sizeof(floating))
        for i in range(n):
            off = (i * nc + c) * s
            if i + d < n:
                prefetch_run(dy + off + d * nc * s, s * sizeof(floating))
                prefetch_run(x + off + d * nc * s, s * sizeof(floating))
            if scaled:
                grad_sums_scale(dy + off, x + off, dx + off, s, mean, rstd * w, &a, &b)
            elif act == NO_ACT:  # grad_sums inlined here: through act_grad_sums, a call per row (short rows)
                grad_sums(dy + off, x + off, NULL, s, mean, &a, &b)
            else:
                act_grad_sums_kept(dy + off, x + off, dx + off, s, mean, rstd * w, bias, act, slope, &a, &b)
    sdy[0] = a
    sdyx[0] = b
    if scaled:
        return
    _coefficients(training, a, b, <double>(n * s), rstd, w, &ca, &cb, &cc)
    for i in range(n):
        off = (i * nc + c) * s
        if stream:
            act_grad_apply_stream(dy + off, x + off, dx + off, s, mean, rstd * w, bias, act, slope, training, ca, cb,
                                  cc)
        elif act == NO_ACT and training:  # as grad_sums above
            grad_apply(dy + off, x + off, dx + off, s, mean, ca, cb, cc)
        elif act == NO_ACT:
            scale_copy(dy + off, dx + off, s, ca)
        elif kept and training:
            grad_apply_inplace(dx + off, x + off, s, mean, ca, cb, cc)
        elif kept:
            scale_copy(dx + off, dx + off, s, ca)
        else:
            act_grad_apply(dy + off, x + off, dx + off, s, mean, rstd * w, bias, act, slope, training, ca, cb, cc)
    if stream:
        normkit_sfence()


cdef inline void _columns_act_grad(const floating* dy, const floating* x, floating* g, Py_ssize_t length,
                                   const floating* mean, const floating* zscale, const floating* zshift, int act,
                                   double slope) noexcept nogil:
    """g = dy * act'(z), z = affine_columns(x, zscale, zshift): float32 in one loop, double through g."""
    if floating is float:
        normkit_cols_act_grad_f(dy, x, g, length, mean, zscale, zshift, act, <float>slope)
    else:
        affine_columns(x, g, length, mean, zscale, zshift)
        act_grad(dy, g, length, act, slope)


cdef void _grad_apply_columns_act(const floating* dy, const floating* x, floating* dx, Py_ssize_t length,
                                  bint training, const floating* mean, const floating* zscale,
                                  const floating* zshift, int act, double slope, const floating* ca,
                                  const floating* cb, const floating* cc) noexcept nogil:
    """grad_apply_columns (training) or scale_columns of g = dy * act'(z), with z = affine_columns(x, zscale,
    zshift) recomputed chunk by chunk on the stack (of dy for NO_ACT)."""
    cdef floating g[ACT_CHUNK]
    cdef Py_ssize_t q, l, k
    if act == NO_ACT:
        if training:
            grad_apply_columns(dy, x, dx, length, mean, ca, cb, cc)
        else:
            scale_columns(dy, dx, length, ca)
        return
    for q in range((length + ACT_CHUNK - 1) // ACT_CHUNK):
        l = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, length - l)
        _columns_act_grad(dy + l, x + l, g, k, mean + l, zscale + l, zshift + l, act, slope)
        if training:
            grad_apply_columns(g, x + l, dx + l, k, mean + l, ca + l, cb + l, cc + l)
        else:
            scale_columns(g, dx + l, k, ca + l)


cdef void _column_act_grad_sums(const floating* dy, const floating* x, Py_ssize_t n, Py_ssize_t length,
                                Py_ssize_t l0, Py_ssize_t l1, const floating* mean, const floating* zscale,
                                const floating* zshift, int act, double slope, floating* tiles, double* sdy,
                                double* sdyx) noexcept nogil:
    """column_grad_sums() of g = dy * act'(z) over columns l0..l1 (at most CHUNK), ACT_ROWS rows at a time: their g
    (z as in _grad_apply_columns_act) and x copied as rows of the task's width into ``tiles`` (2 * ACT_ROWS * (l1 -
    l0) values, for tasks wider than NARROW_CHUNK: on the stack, tiles for tasks of CHUNK columns made a float64
    frame of 148 KB, which crashed a thread of 128 KB, musl's default), or where it is NULL on the stack."""
    cdef floating stack_tiles[2 * ACT_ROWS * NARROW_CHUNK]
    cdef floating* tg = tiles if tiles != NULL else stack_tiles
    cdef floating* tx = tg + ACT_ROWS * (l1 - l0)
    cdef double a[CHUNK]
    cdef double b[CHUNK]
    cdef Py_ssize_t width = l1 - l0, q, i, j, l, r, o
    for l in range(l0, l1):
        sdy[l] = 0.0
        sdyx[l] = 0.0
    for q in range(_cdiv(n, ACT_ROWS)):
        i = q * ACT_ROWS
        r = min(<Py_ssize_t>ACT_ROWS, n - i)
        for j in range(r):
            o = (i + j) * length + l0
            memcpy(tx + j * width, x + o, width * sizeof(floating))
            _columns_act_grad(dy + o, x + o, tg + j * width, width, mean + l0, zscale + l0, zshift + l0, act, slope)
        column_grad_sums(tg, tx, r, width, 0, width, mean + l0, a, b)
        for l in range(width):
            sdy[l0 + l] += a[l]
            sdyx[l0 + l] += b[l]


cdef inline void _column_grad_sums(const floating* dy, const floating* x, Py_ssize_t n, Py_ssize_t length,
                                   Py_ssize_t l0, Py_ssize_t l1, const floating* mean, const floating* zscale,
                                   const floating* zshift, int act, double slope, bint from_memory,
                                   floating* tiles, double* sdy, double* sdyx) noexcept nogil:
    """column_grad_sums(), or with a fused activation _column_act_grad_sums() (``tiles``: its buffer)."""
    if act == NO_ACT:
        column_grad_sums(dy, x, n, length, l0, l1, mean, sdy, sdyx, from_memory)
    else:
        _column_act_grad_sums(dy, x, n, length, l0, l1, mean, zscale, zshift, act, slope, tiles, sdy, sdyx)


cdef inline void _merge_columns(const double* a, const double* b, Py_ssize_t s, double* s1,
                                double* s2) noexcept nogil:
    """Add the s column sums of one channel to its sums, in column order."""
    cdef Py_ssize_t i
    for i in range(s):
        s1[0] += a[i]
        s2[0] += b[i]


cdef void _merge_groups(const double* a, const double* b, Py_ssize_t groups, Py_ssize_t nc, Py_ssize_t s,
                        double* s1, double* s2) noexcept nogil:
    """Per-channel sums of `groups` groups of nc * s column sums (a row's nc * s columns each), group by group."""
    cdef Py_ssize_t c, g
    for c in range(nc):
        s1[c] = 0.0
        s2[c] = 0.0
        for g in range(groups):
            _merge_columns(&a[(g * nc + c) * s], &b[(g * nc + c) * s], s, &s1[c], &s2[c])


cdef void _forward_columns(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                           Py_ssize_t c0, Py_ssize_t c1, double eps, const floating* w, const floating* b,
                           double* mean, double* rstd) noexcept nogil:
    """Channels c0..c1 of the columns schedule, whole: their column sums, statistics and elementwise pass."""
    cdef Py_ssize_t length = nc * s, l0 = c0 * s, width = (c1 - c0) * s, c, i
    cdef floating piv[NARROW_CHUNK]
    cdef floating cm[NARROW_CHUNK]
    cdef floating scale[NARROW_CHUNK]
    cdef floating shift[NARROW_CHUNK]
    cdef double s1[NARROW_CHUNK]
    cdef double s2[NARROW_CHUNK]
    for c in range(c0, c1):
        for i in range(s):
            piv[(c - c0) * s + i] = <floating>pivot_of(x[c * s])
    column_moments(x + l0, n, length, 0, width, piv, s1, s2)
    _finish_columns(s1, s2, n, s, c0, c1, piv, eps, w, b, mean, rstd, cm, scale, shift, NULL, NULL)
    for i in range(n):
        affine_columns(x + i * length + l0, y + i * length + l0, width, cm, scale, shift)


cdef void _finish_columns(const double* s1, const double* s2, Py_ssize_t n, Py_ssize_t s, Py_ssize_t c0,
                          Py_ssize_t c1, const floating* piv, double eps, const floating* w, const floating* b,
                          double* mean, double* rstd, floating* cm, floating* scale, floating* shift,
                          double* scale64, double* shift64) noexcept nogil:
    """The whole-columns tasks' statistics of channels c0..c1 from their column sums (s1, s2 and the pivots piv
    per column of the task), and their elementwise pass's per-column coefficients in the data's precision: cm,
    scale, and a shift that takes the mean's rounding to that precision (as affine() does). scale64, shift64 (or
    NULL): the channels' scale and shift in double."""
    cdef Py_ssize_t c, i, j
    cdef double t1, t2, sc, sh
    for c in range(c0, c1):
        j = (c - c0) * s
        t1 = 0.0
        t2 = 0.0
        _merge_columns(s1 + j, s2 + j, s, &t1, &t2)
        finish_moments(t1, t2, n * s, piv[j], eps, &mean[c], &rstd[c])
        sc = rstd[c] * w[c] if w != NULL else rstd[c]
        sh = b[c] if b != NULL else 0.0
        if scale64 != NULL:
            scale64[c] = sc
            shift64[c] = sh
        sh = sh + (<double><floating>mean[c] - mean[c]) * sc
        for i in range(j, j + s):
            cm[i] = <floating>mean[c]
            scale[i] = <floating>sc
            shift[i] = <floating>sh


cdef void _backward_columns(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, Py_ssize_t nc,
                            Py_ssize_t s, Py_ssize_t c0, Py_ssize_t c1, bint training, bint sums,
                            const double* mean, const double* rstd, const floating* w, double* sdy,
                            double* sdyx) noexcept nogil:
    """Channels c0..c1 of the columns schedule, whole: their gradient sums, coefficients and input gradient."""
    cdef Py_ssize_t length = nc * s, l0 = c0 * s, width = (c1 - c0) * s, c, i, j
    cdef floating cm[NARROW_CHUNK]
    cdef floating ca[NARROW_CHUNK]
    cdef floating cb[NARROW_CHUNK]
    cdef floating cc[NARROW_CHUNK]
    cdef double a[NARROW_CHUNK]
    cdef double b[NARROW_CHUNK]
    cdef double da, db, dc
    for c in range(c0, c1):
        for i in range((c - c0) * s, (c - c0 + 1) * s):
            cm[i] = <floating>mean[c]
    if sums:
        column_grad_sums(dy + l0, x + l0, n, length, 0, width, cm, a, b)
        for c in range(c0, c1):
            _merge_columns(a + (c - c0) * s, b + (c - c0) * s, s, &sdy[c], &sdyx[c])
    for c in range(c0, c1):
        _coefficients(training, sdy[c], sdyx[c], <double>(n * s), rstd[c], w[c] if w != NULL else 1.0,
                      &da, &db, &dc)
        for i in range((c - c0) * s, (c - c0 + 1) * s):
            ca[i] = <floating>da
            cb[i] = <floating>db
            cc[i] = <floating>dc
    for i in range(n):
        j = i * length + l0
        if training:
            grad_apply_columns(dy + j, x + j, dx + j, width, cm, ca, cb, cc)
        else:
            scale_columns(dy + j, dx + j, width, ca)


# --- schedules -------------------------------------------------------------------------------------------------

cdef void _per_column(const double* per_channel, Py_ssize_t nc, Py_ssize_t s, floating* out,
                      Py_ssize_t rows=1) noexcept nogil:
    """Each channel's value repeated for its s columns of the (N, C*S) view, in the data's precision, for ``rows``
    rows of it."""
    cdef Py_ssize_t r, c, i
    for r in range(rows):
        for c in range(nc):
            for i in range(s):
                out[(r * nc + c) * s + i] = <floating>per_channel[c]


cdef void _channel_moments(const floating* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, double[::1] pivot,
                           double[::1] s1, double[::1] s2):
    """Per-channel sum(x - pivot) and sum((x - pivot)**2) with the rows or the columns schedule; x is (n, nc, s)."""
    cdef Py_ssize_t t, length = nc * s
    cdef ColumnSplit sp
    cdef double[::1] a, b
    cdef floating[::1] p
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint memory = n * length * <Py_ssize_t>sizeof(floating) >= _from_memory
    if s >= SHORT_ROW:
        a = np.zeros(n * nc)
        b = np.zeros(n * nc)
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            moments(xp + t * s, s, pivot[t % nc], &a[t], &b[t])
        _merge_groups(&a[0], &b[0], n, nc, 1, &s1[0], &s2[0])
        return
    sp = _split_columns(n, nc, s, sizeof(floating))
    a = np.empty(sp.blocks * sp.length + length)
    b = np.empty(sp.blocks * sp.length + length)
    p = np.empty(sp.length, np.float32 if floating is float else np.float64)
    _per_column(&pivot[0], nc, s, &p[0], sp.k)
    for t in prange(sp.blocks * sp.tasks, nogil=True, schedule="static", num_threads=nt):
        column_moments(xp + t // sp.tasks * sp.rows * sp.length, _task_rows(&sp, t), sp.length, _task_column(&sp, t),
                       _task_end(&sp, t), &p[0], &a[t // sp.tasks * sp.length], &b[t // sp.tasks * sp.length], memory)
    if sp.tail:
        column_moments(xp + sp.n * sp.length, sp.tail, length, 0, length, &p[0], &a[sp.blocks * sp.length],
                       &b[sp.blocks * sp.length], memory)
    _merge_groups(&a[0], &b[0], _groups(&sp), nc, s, &s1[0], &s2[0])


cdef void _apply_channels(const floating* xp, floating* yp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                          const double* mean, const double* scale, const double* shift, int act, double slope,
                          Py_ssize_t block=ROW_BLOCK):
    """y = act((x - mean) * scale + shift) with per-channel coefficients (no activation for NO_ACT); x, y are
    (n, nc, s); ``block``: the columns schedule's values per call (_pass_rows). Its buffers come from malloc: a
    NumPy allocation is a Python call, several µs right after a convolution (see normkit.torch.functional._plain)."""
    cdef Py_ssize_t t, c, rows
    cdef Py_ssize_t length = nc * s
    cdef double* exact_shift
    cdef floating* cols
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint stream = n * length * <Py_ssize_t>sizeof(floating) >= _stream_min
    if s >= SHORT_ROW:
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            c = t % nc
            if stream:
                affine_act_stream(xp + t * s, yp + t * s, s, mean[c], scale[c], shift[c], act, slope)
                normkit_sfence()
            else:
                affine_act(xp + t * s, yp + t * s, s, mean[c], scale[c], shift[c], act, slope)
    else:
        # per-column mean, scale and shift in the data's precision; as in affine(), the shift takes the mean's
        # rounding to that precision
        rows = _pass_rows(n, length, sizeof(floating), block)
        exact_shift = <double*>malloc((nc + 1) * sizeof(double) + 3 * rows * length * sizeof(floating))
        if exact_shift == NULL:
            raise MemoryError()
        cols = <floating*>(exact_shift + nc)
        for c in range(nc):
            exact_shift[c] = rounded_shift(shift[c], <floating>mean[c], mean[c], scale[c])
        _per_column(mean, nc, s, cols, rows)
        _per_column(scale, nc, s, cols + rows * length, rows)
        _per_column(exact_shift, nc, s, cols + 2 * rows * length, rows)
        if stream:  # each thread one contiguous span, fenced once; rows of the coefficients at a time
            for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
                columns_stream(STREAM_AFFINE, NULL, xp, yp, n * length * t // nt, n * length * (t + 1) // nt,
                               rows * length, cols, cols + rows * length, cols + 2 * rows * length, NULL, act, slope)
                normkit_sfence()
        else:
            for t in prange(_cdiv(n, rows), nogil=True, schedule="static", num_threads=nt):
                affine_columns_act(xp + t * rows * length, yp + t * rows * length, min(rows, n - t * rows) * length,
                                    cols, cols + rows * length, cols + 2 * rows * length, act, slope)
        free(exact_shift)


cdef void _channel_grad_sums(const floating* dyp, const floating* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                             double[::1] mean, double[::1] sdy, double[::1] sdyx, int act=NO_ACT, double slope=0.0,
                             double[::1] zscale=None, double[::1] zshift=None, floating* dxp=NULL):
    """Per-channel sum(g) and sum(g * (x - mean)) with the rows or the columns schedule: g = dy, or with a fused
    activation dy * act'(z), z = (x - mean) * zscale + zshift; dy, x are (n, nc, s). With dxp (no activation, the
    rows schedule: s >= SHORT_ROW), also dx = dy * zscale in the same pass (the inference backward's)."""
    cdef Py_ssize_t t, o, length = nc * s
    cdef ColumnSplit sp
    cdef double[::1] a, b
    cdef floating[::1] m
    cdef floating[:, ::1] zcols
    cdef floating[:, ::1] tiles = None
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint memory = n * length * <Py_ssize_t>sizeof(floating) >= _from_memory
    if zscale is None:  # unused without an activation or dxp, but act_grad_sums takes them
        zscale = zshift = np.zeros(nc)
    if s >= SHORT_ROW:
        a = np.zeros(n * nc)
        b = np.zeros(n * nc)
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            if dxp != NULL:
                grad_sums_scale(dyp + t * s, xp + t * s, dxp + t * s, s, mean[t % nc], zscale[t % nc], &a[t], &b[t])
            else:
                act_grad_sums(dyp + t * s, xp + t * s, s, mean[t % nc], zscale[t % nc], zshift[t % nc], act, slope,
                              &a[t], &b[t])
        _merge_groups(&a[0], &b[0], n, nc, 1, &sdy[0], &sdyx[0])
        return
    sp = _split_columns(n, nc, s, sizeof(floating))  # as in _channel_moments
    a = np.empty(sp.blocks * sp.length + length)
    b = np.empty(sp.blocks * sp.length + length)
    m = np.empty(sp.length, np.float32 if floating is float else np.float64)
    _per_column(&mean[0], nc, s, &m[0], sp.k)
    zcols = np.empty((2, sp.length), np.float32 if floating is float else np.float64)
    _per_column(&zscale[0], nc, s, &zcols[0, 0], sp.k)
    _per_column(&zshift[0], nc, s, &zcols[1, 0], sp.k)
    if act != NO_ACT and sp.width > NARROW_CHUNK:  # _column_act_grad_sums' tiles: a task's each, the tail's last
        tiles = np.empty((sp.blocks * sp.tasks + 1, 2 * ACT_ROWS * sp.width),
                         np.float32 if floating is float else np.float64)
    for t in prange(sp.blocks * sp.tasks, nogil=True, schedule="static", num_threads=nt):
        o = t // sp.tasks * sp.rows * sp.length
        _column_grad_sums(dyp + o, xp + o, _task_rows(&sp, t), sp.length, _task_column(&sp, t), _task_end(&sp, t),
                          &m[0], &zcols[0, 0], &zcols[1, 0], act, slope, memory,
                          &tiles[t, 0] if tiles is not None else NULL, &a[t // sp.tasks * sp.length],
                          &b[t // sp.tasks * sp.length])
    if sp.tail:
        o = sp.n * sp.length
        _column_grad_sums(dyp + o, xp + o, sp.tail, length, 0, length, &m[0], &zcols[0, 0], &zcols[1, 0], act, slope,
                          memory, &tiles[sp.blocks * sp.tasks, 0] if tiles is not None else NULL,
                          &a[sp.blocks * sp.length], &b[sp.blocks * sp.length])
    _merge_groups(&a[0], &b[0], _groups(&sp), nc, s, &sdy[0], &sdyx[0])


cdef void _grad_apply_channels(const floating* dyp, const floating* xp, floating* dxp, Py_ssize_t n, Py_ssize_t nc,
                               Py_ssize_t s, bint training, double[::1] mean, double[::1] ca, double[::1] cb,
                               double[::1] cc, int act=NO_ACT, double slope=0.0, double[::1] zscale=None,
                               double[::1] zshift=None, bint stream=False):
    """dx = ca * g + cb * (x - mean) + cc (training) or ca * g, per channel; g as in _channel_grad_sums; dy, x, dx
    are (n, nc, s); ``stream`` (no activation): dx by non-temporal stores in the columns schedule."""
    cdef Py_ssize_t t, c, rows, length = nc * s
    cdef floating[:, ::1] cols
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    if act == NO_ACT:
        zscale = zshift = np.zeros(nc)
    if s >= SHORT_ROW:
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            c = t % nc
            act_grad_apply(dyp + t * s, xp + t * s, dxp + t * s, s, mean[c], zscale[c], zshift[c], act, slope,
                           training, ca[c], cb[c], cc[c])
    else:
        # per-column coefficients in the data's precision (mean is the saved statistic, already of it)
        rows = _block_rows(n, length)
        cols = np.empty((6, rows * length), np.float32 if floating is float else np.float64)
        _per_column(&mean[0], nc, s, &cols[0, 0], rows)
        _per_column(&ca[0], nc, s, &cols[1, 0], rows)
        _per_column(&cb[0], nc, s, &cols[2, 0], rows)
        _per_column(&cc[0], nc, s, &cols[3, 0], rows)
        _per_column(&zscale[0], nc, s, &cols[4, 0], rows)
        _per_column(&zshift[0], nc, s, &cols[5, 0], rows)
        if stream:  # (no activation) each thread one contiguous span, fenced once; rows of the coefficients at a time
            for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
                columns_stream(STREAM_GRAD if training else STREAM_SCALE, dyp, xp, dxp, n * length * t // nt,
                               n * length * (t + 1) // nt, rows * length, &cols[0, 0], &cols[1, 0], &cols[2, 0],
                               &cols[3, 0], NO_ACT, 0.0)
                normkit_sfence()
        else:
            for t in prange(_cdiv(n, rows), nogil=True, schedule="static", num_threads=nt):
                _grad_apply_columns_act(dyp + t * rows * length, xp + t * rows * length, dxp + t * rows * length,
                                        min(rows, n - t * rows) * length, training, &cols[0, 0], &cols[4, 0],
                                        &cols[5, 0], act, slope, &cols[1, 0], &cols[2, 0], &cols[3, 0])


cdef void _backward(bint training, const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                    const floating[::1] mean, const floating[::1] rstd, const floating[::1] weight,
                    const floating[::1] bias, int act, double slope, floating[:, :, ::1] dx, floating[::1] dweight,
                    floating[::1] dbias):
    _backward_p(training, &dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0], &rstd[0],
                _ptr(weight), _ptr(bias), act, slope, &dx[0, 0, 0], _out(dweight), _out(dbias))


cdef void _backward_p(bint training, const floating* dyp, const floating* xp, Py_ssize_t n, Py_ssize_t nc,
                      Py_ssize_t s, const floating* mean, const floating* rstd, const floating* w,
                      const floating* bp, int act, double slope, floating* dxp, floating* dweight, floating* dbias):
    cdef Py_ssize_t c, t, k
    # inference without parameter gradients needs no sums: dx = dy * rstd * weight
    cdef bint sums = training or dweight != NULL or dbias != NULL, scaled
    # the per-channel vectors in one malloc'd block: NumPy's allocation is a Python call (see _apply_channels)
    cdef double* work = <double*>calloc(9 * nc + 1, sizeof(double))  # + 1: never malloc(0)
    cdef double* mu = work
    cdef double* r = work + nc
    cdef double* sdy = work + 2 * nc
    cdef double* sdyx = work + 3 * nc
    cdef double* zscale = work + 4 * nc
    cdef double* zshift = work + 5 * nc
    cdef double* ca = work + 6 * nc
    cdef double* cb = work + 7 * nc
    cdef double* cc = work + 8 * nc
    cdef double[::1] v  # the block as a memoryview, for the rows and columns schedules' helpers
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    # with a fused activation, ordinary stores and g kept in dx (_backward_channel) rather than non-temporal
    # stores and g made again: in-process, 2 threads, (32, 64, 56, 56) ReLU 0.81x, SiLU 0.72x; (64, 128, 28, 28)
    # 0.68x / 0.66x (without one, streaming stays: 0.85-0.91x ordinary stores' time)
    cdef bint stream = act == NO_ACT and n * nc * s * <Py_ssize_t>sizeof(floating) >= _stream_min
    k = _whole_column_channels(n, nc, s, sizeof(floating)) if act == NO_ACT else 0
    if work == NULL:
        raise MemoryError()
    try:
        for c in range(nc):
            mu[c] = mean[c]
            r[c] = rstd[c]
        if nc >= MANY_CHANNELS and not _columns(n, s, act):
            for c in prange(nc, nogil=True, schedule="static", num_threads=nt):
                _backward_channel(dyp, xp, dxp, n, nc, s, c, training, sums, mu[c], r[c],
                                  w[c] if w != NULL else 1.0, bp[c] if bp != NULL else 0.0, act, slope, stream,
                                  &sdy[c], &sdyx[c])
        elif k:
            for t in prange(_cdiv(nc, k), nogil=True, schedule="static", num_threads=nt):
                _backward_columns(dyp, xp, dxp, n, nc, s, t * k, min(nc, (t + 1) * k), training, sums, mu, r, w,
                                  sdy, sdyx)
        else:
            v = <double[:9 * nc + 1]> work
            for c in range(nc):  # z = (x - mean) * zscale + zshift, for a fused activation
                zscale[c] = r[c] * w[c] if w != NULL else r[c]
                zshift[c] = bp[c] if bp != NULL else 0.0
            # inference with parameter gradients, rows schedule: dx = dy * rstd * w in the pass of the sums
            scaled = sums and not training and act == NO_ACT and s >= SHORT_ROW
            if sums:
                _channel_grad_sums(dyp, xp, n, nc, s, v[:nc], v[2 * nc:3 * nc], v[3 * nc:4 * nc], act, slope,
                                   v[4 * nc:5 * nc], v[5 * nc:6 * nc], dxp if scaled else NULL)
            if not scaled:
                for c in range(nc):
                    _coefficients(training, sdy[c], sdyx[c], <double>(n * s), r[c], w[c] if w != NULL else 1.0,
                                  &ca[c], &cb[c], &cc[c])
                _grad_apply_channels(dyp, xp, dxp, n, nc, s, training, v[:nc], v[6 * nc:7 * nc], v[7 * nc:8 * nc],
                                     v[8 * nc:9 * nc], act, slope, v[4 * nc:5 * nc], v[5 * nc:6 * nc], stream)
        # dweight = sum(g * xhat) = rstd * sum(g * (x - mean)); dbias = sum(g); g = dy, or dy * act'(z)
        for c in range(nc):
            if dweight != NULL:
                dweight[c] = <floating>(r[c] * sdyx[c])
            if dbias != NULL:
                dbias[c] = <floating>sdy[c]
    finally:
        free(work)


# --- kernels (normkit.contract) --------------------------------------------------------------------------------

cdef void _forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias, double eps,
                   int act, double slope, floating[:, :, ::1] y, floating[::1] mean, floating[::1] rstd):
    _forward_p(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], _ptr(weight), _ptr(bias), eps, act, slope, &y[0, 0, 0],
               &mean[0], &rstd[0])


cdef void _forward_p(const floating* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, const floating* w,
                     const floating* b, double eps, int act, double slope, floating* yp, floating* mean,
                     floating* rstd):
    cdef Py_ssize_t c, t, k
    # the per-channel vectors in one malloc'd block (see _backward_p)
    cdef double* work = <double*>malloc((7 * nc + 1) * sizeof(double))
    cdef double* mu = work
    cdef double* r = work + nc
    cdef double* pivot = work + 2 * nc
    cdef double* s1 = work + 3 * nc
    cdef double* s2 = work + 4 * nc
    cdef double* scale = work + 5 * nc
    cdef double* shift = work + 6 * nc
    cdef double[::1] v
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint stream = n * nc * s * <Py_ssize_t>sizeof(floating) >= _stream_min
    k = _whole_column_channels(n, nc, s, sizeof(floating)) if act == NO_ACT else 0
    if work == NULL:
        raise MemoryError()
    try:
        if nc >= MANY_CHANNELS and not _columns(n, s, act):
            for c in prange(nc, nogil=True, schedule="static", num_threads=nt):
                _forward_channel(xp, yp, n, nc, s, c, eps, w, b, act, slope, stream, &mu[c], &r[c])
        elif k:
            for t in prange(_cdiv(nc, k), nogil=True, schedule="static", num_threads=nt):
                _forward_columns(xp, yp, n, nc, s, t * k, min(nc, (t + 1) * k), eps, w, b, mu, r)
        else:
            v = <double[:7 * nc + 1]> work
            for c in range(nc):
                pivot[c] = pivot_of(xp[c * s])
            _channel_moments(xp, n, nc, s, v[2 * nc:3 * nc], v[3 * nc:4 * nc], v[4 * nc:5 * nc])
            for c in range(nc):
                finish_moments(s1[c], s2[c], n * s, pivot[c], eps, &mu[c], &r[c])
                scale[c] = r[c] * w[c] if w != NULL else r[c]
                shift[c] = b[c] if b != NULL else 0.0
            _apply_channels(xp, yp, n, nc, s, mu, scale, shift, act, slope)
        for c in range(nc):
            mean[c] = <floating>mu[c]
            rstd[c] = <floating>r[c]
    finally:
        free(work)


cdef double* _infer_coefficients(const floating* weight, const floating* bias, const floating* running_mean,
                                 const floating* running_var, Py_ssize_t nc, double eps) except NULL:
    """The inference forward's per-channel mean, scale and shift, as the three rows of one malloc'd (nc,)
    allocation (the caller frees it; see _apply_channels); weight, bias: NULL when absent."""
    cdef Py_ssize_t c
    cdef double* coefs = <double*>malloc((3 * nc + 1) * sizeof(double))
    cdef double r
    if coefs == NULL:
        raise MemoryError()
    for c in range(nc):
        r = 1.0 / sqrt(<double>running_var[c] + eps)
        coefs[c] = running_mean[c]
        coefs[nc + c] = r * weight[c] if weight != NULL else r
        coefs[2 * nc + c] = bias[c] if bias != NULL else 0.0
    return coefs


cdef void _forward_infer(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                         const floating[::1] running_mean, const floating[::1] running_var, double eps, int act,
                         double slope, floating[:, :, ::1] y):
    _forward_infer_p(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], _ptr(weight), _ptr(bias), &running_mean[0],
                     &running_var[0], eps, act, slope, &y[0, 0, 0])


cdef void _forward_infer_p(const floating* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, const floating* weight,
                           const floating* bias, const floating* running_mean, const floating* running_var,
                           double eps, int act, double slope, floating* yp):
    cdef double* coefs = _infer_coefficients(weight, bias, running_mean, running_var, nc, eps)
    try:
        _apply_channels(xp, yp, n, nc, s, coefs, coefs + nc, coefs + 2 * nc, act, slope, ROW_BLOCK_MEMORY)
    finally:
        free(coefs)


def batchnorm_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                      double eps, floating[:, :, ::1] y, floating[::1] mean, floating[::1] rstd):
    _forward(x, weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def channel_forward_infer(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                          const floating[::1] running_mean, const floating[::1] running_var, double eps,
                          floating[:, :, ::1] y):
    _forward_infer(x, weight, bias, running_mean, running_var, eps, NO_ACT, 0.0, y)


def batchnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const floating[::1] mean,
                       const floating[::1] rstd, const floating[::1] weight, floating[:, :, ::1] dx,
                       floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _backward(True, dy, x, mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


def channel_backward_infer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const floating[::1] mean,
                           const floating[::1] rstd, const floating[::1] weight, floating[:, :, ::1] dx,
                           floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _backward(False, dy, x, mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


# --- fused activation (normkit.contract): the kernels above with act'(z) or act applied in their passes -----------

def batchnorm_act_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                          double eps, int activation, double slope, floating[:, :, ::1] y, floating[::1] mean,
                          floating[::1] rstd):
    _forward(x, weight, bias, eps, activation, slope, y, mean, rstd)


def channel_act_forward_infer(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                              const floating[::1] running_mean, const floating[::1] running_var, double eps,
                              int activation, double slope, floating[:, :, ::1] y):
    _forward_infer(x, weight, bias, running_mean, running_var, eps, activation, slope, y)


def batchnorm_act_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const floating[::1] mean,
                           const floating[::1] rstd, const floating[::1] weight, const floating[::1] bias,
                           int activation, double slope, floating[:, :, ::1] dx, floating[::1] dweight,
                           floating[::1] dbias):
    _backward(True, dy, x, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


def channel_act_backward_infer(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                               const floating[::1] mean, const floating[::1] rstd, const floating[::1] weight,
                               const floating[::1] bias, int activation, double slope, floating[:, :, ::1] dx,
                               floating[::1] dweight, floating[::1] dbias):
    _backward(False, dy, x, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


# --- the split directions (normkit.contract): the reductions and elementwise passes above, on their own ------------

cdef void _column_moments64(const floating* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0, Py_ssize_t l1,
                            const double* pivot, double* s1, double* s2) noexcept nogil:
    """As column_moments(), all in double (the statistics of ``stats`` are float64 whatever the data's dtype)."""
    cdef Py_ssize_t i, l
    cdef const floating* r
    cdef double d0, d1, d2, d3
    for l in range(l0, l1):
        s1[l] = 0.0
        s2[l] = 0.0
    for i in range(0, n - 3, 4):
        r = x + i * length
        for l in range(l0, l1):
            d0 = r[l] - pivot[l]
            d1 = r[length + l] - pivot[l]
            d2 = r[2 * length + l] - pivot[l]
            d3 = r[3 * length + l] - pivot[l]
            s1[l] += (d0 + d1) + (d2 + d3)
            s2[l] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for i in range(n - n % 4, n):
        for l in range(l0, l1):
            d0 = x[i * length + l] - pivot[l]
            s1[l] += d0
            s2[l] += d0 * d0


cdef void _stats_moments(const floating[:, :, ::1] x, double[::1] pivot, double[::1] s1, double[::1] s2):
    """Per-channel sum(x - pivot) and sum((x - pivot)**2), in double: _channel_moments' rows schedule (moments()
    is double throughout), and its columns schedule with double column sums."""
    cdef Py_ssize_t n = x.shape[0], nc = x.shape[1], s = x.shape[2], t, length = nc * s
    cdef const floating* xp = &x[0, 0, 0]
    cdef ColumnSplit sp
    cdef double[::1] a, b, p
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    if s >= SHORT_ROW:
        _channel_moments(xp, n, nc, s, pivot, s1, s2)
        return
    sp = _split_columns(n, nc, s, sizeof(floating))
    a = np.empty(sp.blocks * sp.length + length)
    b = np.empty(sp.blocks * sp.length + length)
    p = np.empty(sp.length)
    _per_column(&pivot[0], nc, s, &p[0], sp.k)
    for t in prange(sp.blocks * sp.tasks, nogil=True, schedule="static", num_threads=nt):
        _column_moments64(xp + t // sp.tasks * sp.rows * sp.length, _task_rows(&sp, t), sp.length,
                          _task_column(&sp, t), _task_end(&sp, t), &p[0], &a[t // sp.tasks * sp.length],
                          &b[t // sp.tasks * sp.length])
    if sp.tail:
        _column_moments64(xp + sp.n * sp.length, sp.tail, length, 0, length, &p[0], &a[sp.blocks * sp.length],
                          &b[sp.blocks * sp.length])
    _merge_groups(&a[0], &b[0], _groups(&sp), nc, s, &s1[0], &s2[0])


def batchnorm_stats(const floating[:, :, ::1] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t nc = x.shape[1], c
    cdef double cnt = <double>(x.shape[0] * x.shape[2]), d, v
    cdef double[::1] pivot = np.empty(nc), s1 = np.empty(nc), s2 = np.empty(nc)
    for c in range(nc):
        pivot[c] = pivot_of(x[0, c, 0])
    _stats_moments(x, pivot, s1, s2)
    for c in range(nc):
        d = s1[c] / cnt
        v = s2[c] - s1[c] * d
        if v < 0.0:  # rounding; a NaN stays NaN
            v = 0.0
        mean[c] = pivot[c] + d
        m2[c] = v


def batchnorm_apply(const floating[:, :, ::1] x, const floating[::1] scale, const floating[::1] shift,
                    floating[:, :, ::1] y):
    # y = (x - 0) * scale + shift: the per-channel affine pass, with no mean to subtract
    cdef double[::1] zero = np.zeros(x.shape[1])
    cdef double[::1] sc = np.asarray(scale, dtype=np.float64), sh = np.asarray(shift, dtype=np.float64)
    _apply_channels(&x[0, 0, 0], &y[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &zero[0], &sc[0], &sh[0], NO_ACT,
                    0.0)


def batchnorm_backward_reduce(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const double[::1] mean,
                              const double[::1] rstd, double[::1] sum_dy, double[::1] sum_dy_xhat):
    cdef Py_ssize_t nc = x.shape[1], c
    cdef double[::1] mu = np.array(mean), sdyx = np.empty(nc)
    cdef double m
    _channel_grad_sums(&dy[0, 0, 0], &x[0, 0, 0], x.shape[0], nc, x.shape[2], mu, sum_dy, sdyx)
    for c in range(nc):
        # the sums are about m, the mean rounded to the data's precision: sum(dy * (x - mean)) = sum(dy * (x - m)) +
        # (m - mean) * sum(dy), where a float64 mean at a large offset is not m (1e4: 0.2% of the sum, 1e6: 18%); an
        # infinite sum(dy) keeps the sum's own sign (the term would be inf of either sign, NaN where it differs)
        m = <floating>mean[c]
        if m != mean[c] and isfinite(sum_dy[c]):
            sdyx[c] += (m - mean[c]) * sum_dy[c]
        sum_dy_xhat[c] = rstd[c] * sdyx[c]


def batchnorm_backward_apply(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const floating[::1] a,
                             const floating[::1] b, const floating[::1] d, floating[:, :, ::1] dx):
    # dx = a * dy + b * (x - 0) + d: the backward's elementwise pass
    cdef double[::1] zero = np.zeros(x.shape[1])
    cdef double[::1] ca = np.asarray(a, dtype=np.float64), cb = np.asarray(b, dtype=np.float64)
    cdef double[::1] cc = np.asarray(d, dtype=np.float64)
    _grad_apply_channels(&dy[0, 0, 0], &x[0, 0, 0], &dx[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], True, zero, ca,
                         cb, cc)


# --- address kernels (normkit.contract): the plain kernels on memory given by address ----------------------------

cdef int _check(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t out, Py_ssize_t stat_a,
                Py_ssize_t stat_b) except -1:
    # what can be checked without the arrays: the shapes against each other, data addresses not NULL
    if n < 1 or c < 1 or s < 1 or x == 0 or out == 0:
        raise ValueError(f"address kernel: bad shape ({n}, {c}, {s}) or a NULL data address")
    if stat_a != c or stat_b != c:
        raise ValueError(f"address kernel: the statistics must be ({c},), got ({stat_a},) and ({stat_b},)")
    return 0


def batchnorm_forward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight, size_t bias,
                           double eps, size_t y, floating[::1] mean, floating[::1] rstd):
    _check(n, c, s, x, y, mean.shape[0], rstd.shape[0])
    _forward_p(<const floating*>x, n, c, s, <const floating*>weight, <const floating*>bias, eps, NO_ACT, 0.0,
               <floating*>y, &mean[0], &rstd[0])
    return max_offset(&mean[0], &rstd[0], c)


# (no argument of this one has the data's type, so it comes as two functions, not a fused one)
def channel_forward_infer_addr_float(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight, size_t bias,
                                     size_t running_mean, size_t running_var, double eps, size_t y):
    _check(n, c, s, x if running_mean and running_var else 0, y, c, c)
    _forward_infer_p[float](<const float*>x, n, c, s, <const float*>weight, <const float*>bias,
                            <const float*>running_mean, <const float*>running_var, eps, NO_ACT, 0.0, <float*>y)


def channel_forward_infer_addr_double(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight, size_t bias,
                                      size_t running_mean, size_t running_var, double eps, size_t y):
    _check(n, c, s, x if running_mean and running_var else 0, y, c, c)
    _forward_infer_p[double](<const double*>x, n, c, s, <const double*>weight, <const double*>bias,
                             <const double*>running_mean, <const double*>running_var, eps, NO_ACT, 0.0, <double*>y)


def batchnorm_backward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x, const floating[::1] mean,
                            const floating[::1] rstd, size_t weight, size_t dx, size_t dweight, size_t dbias):
    _check(n, c, s, dy if x else 0, dx, mean.shape[0], rstd.shape[0])
    _backward_p(True, <const floating*>dy, <const floating*>x, n, c, s, &mean[0], &rstd[0], <const floating*>weight,
                NULL, NO_ACT, 0.0, <floating*>dx, <floating*>dweight, <floating*>dbias)


# --- 16-bit data (normkit.contract): uint16 patterns, fmt 0 bfloat16 / 1 float16; float32 parameters and stats ----
# The same schedules (the whole-columns tasks too), each run of data widened to float32 in registers where the
# build allows, else tile by tile (TILE16 values, or ROWS16 rows of NARROW_CHUNK columns of a task) and handed to the
# float32 loops above.

cdef enum:
    ROWS16 = 8


def convert16(int fmt, a):
    """The 16-bit conversions on a whole array, for tests: uint16 patterns -> float32, float32 -> uint16 (RNE)."""
    cdef const uint16_t[::1] h
    cdef const float[::1] f
    cdef uint16_t[::1] ho
    cdef float[::1] fo
    a = np.ascontiguousarray(a).ravel()
    if a.dtype == np.uint16:
        h = a
        out = np.empty(a.shape[0], np.float32)
        fo = out
        if a.shape[0]:
            normkit_widen(&h[0], &fo[0], a.shape[0], fmt)
        return out
    f = a.astype(np.float32, copy=False)
    out = np.empty(a.shape[0], np.uint16)
    ho = out
    if a.shape[0]:
        normkit_narrow(&f[0], &ho[0], a.shape[0], fmt)
    return out


cdef void _widen_block(const uint16_t* x, Py_ssize_t rows, Py_ssize_t length, Py_ssize_t width, int fmt,
                       float* out) noexcept nogil:
    """rows x width values of the (., length) view starting at x, into out as rows of width."""
    cdef Py_ssize_t i
    if width == length:  # whole rows: one run (folded rows of 16 values had taken a call each)
        normkit_widen(x, out, rows * width, fmt)
        return
    for i in range(rows):
        normkit_widen(x + i * length, out + i * width, width, fmt)


cdef void _forward_channel16(const uint16_t* x, uint16_t* y, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                             Py_ssize_t c, double eps, const float* w, const float* b, int fmt, double* mean,
                             double* rstd) noexcept nogil:
    cdef Py_ssize_t i
    cdef double s1 = 0.0, s2 = 0.0, pivot = pivot16(x + c * s, fmt), scale
    if not normkit_sums16_runs(NULL, x + c * s, n, s, nc * s, fmt, pivot, &s1, &s2):
        for i in range(n):
            if i + 1 < n:
                prefetch_run(x + ((i + 1) * nc + c) * s, s * sizeof(uint16_t))
            moments16(x + (i * nc + c) * s, s, fmt, pivot, &s1, &s2)
    finish_moments(s1, s2, n * s, pivot, eps, mean, rstd)
    scale = rstd[0] * w[c] if w != NULL else rstd[0]
    affine16_runs(x + c * s, y + c * s, n, s, nc * s, fmt, mean[0], scale, b[c] if b != NULL else 0.0)


cdef void _backward_channel16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t n, Py_ssize_t nc,
                              Py_ssize_t s, Py_ssize_t c, bint training, bint sums, double mean, double rstd,
                              double w, int fmt, double* sdy, double* sdyx) noexcept nogil:
    cdef Py_ssize_t i, off
    cdef double a = 0.0, b = 0.0, ca, cb, cc
    if sums and not normkit_sums16_runs(dy + c * s, x + c * s, n, s, nc * s, fmt, mean, &a, &b):
        for i in range(n):
            if i + 1 < n:
                prefetch_run(dy + ((i + 1) * nc + c) * s, s * sizeof(uint16_t))
                prefetch_run(x + ((i + 1) * nc + c) * s, s * sizeof(uint16_t))
            grad_sums16(dy + (i * nc + c) * s, x + (i * nc + c) * s, NULL, s, fmt, mean, &a, &b)
    sdy[0] = a
    sdyx[0] = b
    _coefficients(training, a, b, <double>(n * s), rstd, w, &ca, &cb, &cc)
    if training:
        grad_apply16_runs(dy + c * s, x + c * s, dx + c * s, n, s, nc * s, fmt, mean, ca, cb, cc)
        return
    for i in range(n):
        off = (i * nc + c) * s
        scale_copy16(dy + off, dx + off, s, fmt, ca)


cdef void _column_moments16(const uint16_t* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0, Py_ssize_t l1,
                            const float* pivot, bint wide, int fmt, bint from_memory, double* s1,
                            double* s2) noexcept nogil:
    """column_moments() (_column_moments64 if wide) of columns l0..l1 (at most CHUNK): in registers where the build
    allows (normkit_col_sums16), else in strips of at most NARROW_CHUNK columns, ROWS16 rows at a time through the
    float32 loop (its buffers sized for a strip: a thread may have 128 KB of stack, musl's default)."""
    cdef float t[ROWS16 * NARROW_CHUNK]
    cdef double p[NARROW_CHUNK]
    cdef double a[NARROW_CHUNK]
    cdef double b[NARROW_CHUNK]
    cdef Py_ssize_t k, c0, w, q, i, l, r
    if not wide and normkit_col_sums16(NULL, x, n, length, l0, l1, pivot, s1, s2, fmt, from_memory) and \
            all_finite(s1, s2, l0, l1):
        return
    for k in range(_cdiv(l1 - l0, NARROW_CHUNK)):
        c0 = l0 + k * NARROW_CHUNK
        w = min(<Py_ssize_t>NARROW_CHUNK, l1 - c0)
        for l in range(w):
            p[l] = pivot[c0 + l]
            s1[c0 + l] = 0.0
            s2[c0 + l] = 0.0
        for q in range(_cdiv(n, ROWS16)):
            i = q * ROWS16
            r = min(<Py_ssize_t>ROWS16, n - i)
            _widen_block(x + i * length + c0, r, length, w, fmt, t)
            if wide:
                _column_moments64(t, r, w, 0, w, p, a, b)
            else:
                column_moments(t, r, w, 0, w, pivot + c0, a, b)
            for l in range(w):
                s1[c0 + l] += a[l]
                s2[c0 + l] += b[l]


cdef void _column_grad_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0,
                              Py_ssize_t l1, const float* mean, int fmt, bint from_memory, double* sdy,
                              double* sdyx) noexcept nogil:
    """column_grad_sums() of columns l0..l1 (at most CHUNK): as _column_moments16."""
    cdef float tdy[ROWS16 * NARROW_CHUNK]
    cdef float tx[ROWS16 * NARROW_CHUNK]
    cdef double a[NARROW_CHUNK]
    cdef double b[NARROW_CHUNK]
    cdef Py_ssize_t k, c0, w, q, i, l, r
    if normkit_col_sums16(dy, x, n, length, l0, l1, mean, sdy, sdyx, fmt, from_memory) and \
            all_finite(sdy, sdyx, l0, l1):
        return
    for k in range(_cdiv(l1 - l0, NARROW_CHUNK)):
        c0 = l0 + k * NARROW_CHUNK
        w = min(<Py_ssize_t>NARROW_CHUNK, l1 - c0)
        for l in range(c0, c0 + w):
            sdy[l] = 0.0
            sdyx[l] = 0.0
        for q in range(_cdiv(n, ROWS16)):
            i = q * ROWS16
            r = min(<Py_ssize_t>ROWS16, n - i)
            _widen_block(dy + i * length + c0, r, length, w, fmt, tdy)
            _widen_block(x + i * length + c0, r, length, w, fmt, tx)
            column_grad_sums(tdy, tx, r, w, 0, w, mean + c0, a, b)
            for l in range(w):
                sdy[c0 + l] += a[l]
                sdyx[c0 + l] += b[l]


cdef void _channel_moments16(const uint16_t* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, double[::1] pivot,
                             bint wide, int fmt, double[::1] s1, double[::1] s2):
    """_channel_moments (or, if wide, _stats_moments) on 16-bit data (n, nc, s)."""
    cdef Py_ssize_t t, length = nc * s
    cdef ColumnSplit sp
    cdef double[::1] a, b
    cdef float[::1] p
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint memory = n * length * 2 >= _from_memory
    if s >= SHORT_ROW:
        a = np.zeros(n * nc)
        b = np.zeros(n * nc)
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            moments16(xp + t * s, s, fmt, pivot[t % nc], &a[t], &b[t], wide)
        _merge_groups(&a[0], &b[0], n, nc, 1, &s1[0], &s2[0])
        return
    sp = _split_columns(n, nc, s, 2)
    a = np.empty(sp.blocks * sp.length + length)
    b = np.empty(sp.blocks * sp.length + length)
    p = np.empty(sp.length, np.float32)
    _per_column(&pivot[0], nc, s, &p[0], sp.k)
    for t in prange(sp.blocks * sp.tasks, nogil=True, schedule="static", num_threads=nt):
        _column_moments16(xp + t // sp.tasks * sp.rows * sp.length, _task_rows(&sp, t), sp.length,
                          _task_column(&sp, t), _task_end(&sp, t), &p[0], wide, fmt, memory,
                          &a[t // sp.tasks * sp.length], &b[t // sp.tasks * sp.length])
    if sp.tail:
        _column_moments16(xp + sp.n * sp.length, sp.tail, length, 0, length, &p[0], wide, fmt, memory,
                          &a[sp.blocks * sp.length], &b[sp.blocks * sp.length])
    _merge_groups(&a[0], &b[0], _groups(&sp), nc, s, &s1[0], &s2[0])


cdef void _apply_channels16(const uint16_t* xp, uint16_t* yp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                            const double* mean, const double* scale, const double* shift, int fmt):
    """_apply_channels on 16-bit data (n, nc, s)."""
    cdef Py_ssize_t t, c, rows, length = nc * s
    cdef double* exact_shift
    cdef float* cols
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    if s >= SHORT_ROW16:
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            c = t % nc
            affine16(xp + t * s, yp + t * s, s, fmt, mean[c], scale[c], shift[c])
        return
    rows = _block_rows(n, length, ROW_BLOCK16)
    exact_shift = <double*>malloc((nc + 1) * sizeof(double) + 3 * rows * length * sizeof(float))
    if exact_shift == NULL:
        raise MemoryError()
    cols = <float*>(exact_shift + nc)
    for c in range(nc):
        exact_shift[c] = rounded_shift(shift[c], <float>mean[c], mean[c], scale[c])
    _per_column(mean, nc, s, cols, rows)
    _per_column(scale, nc, s, cols + rows * length, rows)
    _per_column(exact_shift, nc, s, cols + 2 * rows * length, rows)
    for t in prange(_cdiv(n, rows), nogil=True, schedule="static", num_threads=nt):
        _affine_row16(xp + t * rows * length, yp + t * rows * length, min(rows, n - t * rows) * length, cols,
                      cols + rows * length, cols + 2 * rows * length, fmt, mean, scale, shift, s, nc)
    free(exact_shift)


cdef void _affine_row16(const uint16_t* x, uint16_t* y, Py_ssize_t length, const float* mean, const float* scale,
                        const float* shift, int fmt, const double* mean64, const double* scale64,
                        const double* shift64, Py_ssize_t s, Py_ssize_t nc) noexcept nogil:
    """affine_columns on whole rows of the (N, C*S) view, tile by tile (in registers where the build allows) with
    the float32 per-column coefficients; a tile whose outputs are not all finite again in double from the
    per-channel double ones (mean64, scale64, shift64; value l is channel (l // s) % nc), since a float32
    coefficient may itself have overflowed (scale = rstd * weight)."""
    cdef float t[TILE16]
    cdef double d[4][TILE16]
    cdef Py_ssize_t q, j, k, i, c
    cdef int done
    for q in range((length + TILE16 - 1) // TILE16):
        j = q * TILE16
        k = min(<Py_ssize_t>TILE16, length - j)
        done = normkit_cols16(NULL, x + j, y + j, k, fmt, mean + j, scale + j, NULL, shift + j, 0)
        if done < 0:
            normkit_widen(x + j, t, k, fmt)
            affine_columns(t, t, k, mean + j, scale + j, shift + j)
            done = normkit_narrow(t, y + j, k, fmt)
        if not done:
            normkit_widen(x + j, t, k, fmt)
            to_double(t, d[0], k)
            for i in range(k):
                c = ((j + i) // s) % nc
                d[1][i] = mean64[c]
                d[2][i] = scale64[c]
                d[3][i] = shift64[c]
            affine_columns(d[0], d[0], k, d[1], d[2], d[3])
            narrow64(d[0], y + j, k, fmt)


cdef void _channel_grad_sums16(const uint16_t* dyp, const uint16_t* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                               double[::1] mean, int fmt, double[::1] sdy, double[::1] sdyx):
    """_channel_grad_sums on 16-bit data (n, nc, s)."""
    cdef Py_ssize_t t, o, length = nc * s
    cdef ColumnSplit sp
    cdef double[::1] a, b
    cdef float[::1] m
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef bint memory = n * length * 2 >= _from_memory
    if s >= SHORT_ROW:
        a = np.zeros(n * nc)
        b = np.zeros(n * nc)
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            grad_sums16(dyp + t * s, xp + t * s, NULL, s, fmt, mean[t % nc], &a[t], &b[t])
        _merge_groups(&a[0], &b[0], n, nc, 1, &sdy[0], &sdyx[0])
        return
    sp = _split_columns(n, nc, s, 2)
    a = np.empty(sp.blocks * sp.length + length)
    b = np.empty(sp.blocks * sp.length + length)
    m = np.empty(sp.length, np.float32)
    _per_column(&mean[0], nc, s, &m[0], sp.k)
    for t in prange(sp.blocks * sp.tasks, nogil=True, schedule="static", num_threads=nt):
        o = t // sp.tasks * sp.rows * sp.length
        _column_grad_sums16(dyp + o, xp + o, _task_rows(&sp, t), sp.length, _task_column(&sp, t), _task_end(&sp, t),
                            &m[0], fmt, memory, &a[t // sp.tasks * sp.length], &b[t // sp.tasks * sp.length])
    if sp.tail:
        o = sp.n * sp.length
        _column_grad_sums16(dyp + o, xp + o, sp.tail, length, 0, length, &m[0], fmt, memory,
                            &a[sp.blocks * sp.length], &b[sp.blocks * sp.length])
    _merge_groups(&a[0], &b[0], _groups(&sp), nc, s, &sdy[0], &sdyx[0])


cdef void _grad_apply_channels16(const uint16_t* dyp, const uint16_t* xp, uint16_t* dxp, Py_ssize_t n, Py_ssize_t nc,
                                 Py_ssize_t s, bint training, double[::1] mean, double[::1] ca, double[::1] cb,
                                 double[::1] cc, int fmt):
    """_grad_apply_channels on 16-bit data (n, nc, s)."""
    cdef Py_ssize_t t, c, rows, length = nc * s
    cdef float[:, ::1] cols
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    if s >= SHORT_ROW:
        for t in prange(n * nc, nogil=True, schedule="static", num_threads=nt):
            c = t % nc
            if training:
                grad_apply16(dyp + t * s, xp + t * s, dxp + t * s, s, fmt, mean[c], ca[c], cb[c], cc[c])
            else:
                scale_copy16(dyp + t * s, dxp + t * s, s, fmt, ca[c])
        return
    rows = _block_rows(n, length, ROW_BLOCK16)
    cols = np.empty((4, rows * length), np.float32)
    _per_column(&mean[0], nc, s, &cols[0, 0], rows)
    _per_column(&ca[0], nc, s, &cols[1, 0], rows)
    _per_column(&cb[0], nc, s, &cols[2, 0], rows)
    _per_column(&cc[0], nc, s, &cols[3, 0], rows)
    for t in prange(_cdiv(n, rows), nogil=True, schedule="static", num_threads=nt):
        _grad_apply_row16(dyp + t * rows * length, xp + t * rows * length, dxp + t * rows * length,
                          min(rows, n - t * rows) * length, training, &cols[0, 0], rows * length, fmt, &mean[0],
                          &ca[0], &cb[0], &cc[0], s, nc)


cdef void _grad_apply_row16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t length, bint training,
                            const float* cols, Py_ssize_t stride, int fmt, const double* mean64, const double* ca64,
                            const double* cb64, const double* cc64, Py_ssize_t s, Py_ssize_t nc) noexcept nogil:
    """grad_apply_columns (or scale_columns) on whole rows of the (N, C*S) view, tile by tile (in registers where
    the build allows); cols holds the rows mean, ca, cb, cc (``stride`` values apart) of float32 per-column
    coefficients. A tile whose outputs are not all finite goes again in double from the per-channel double
    coefficients, as in _affine_row16."""
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef double d[6][TILE16]
    cdef Py_ssize_t q, j, k, i, c
    cdef int done
    for q in range((length + TILE16 - 1) // TILE16):
        j = q * TILE16
        k = min(<Py_ssize_t>TILE16, length - j)
        done = normkit_cols16(dy + j, x + j, dx + j, k, fmt, cols + j, cols + stride + j, cols + 2 * stride + j,
                              cols + 3 * stride + j, 1 if training else 2)
        if done < 0:
            normkit_widen(dy + j, tdy, k, fmt)
            if training:
                normkit_widen(x + j, tx, k, fmt)
                grad_apply_columns(tdy, tx, tdy, k, cols + j, cols + stride + j, cols + 2 * stride + j,
                                    cols + 3 * stride + j)
            else:
                scale_columns(tdy, tdy, k, cols + stride + j)
            done = normkit_narrow(tdy, dx + j, k, fmt)
        if done:
            continue
        normkit_widen(dy + j, tdy, k, fmt)
        to_double(tdy, d[0], k)
        for i in range(k):
            c = ((j + i) // s) % nc
            d[2][i] = mean64[c]
            d[3][i] = ca64[c]
            d[4][i] = cb64[c]
            d[5][i] = cc64[c]
        if training:
            normkit_widen(x + j, tx, k, fmt)
            to_double(tx, d[1], k)
            grad_apply_columns(d[0], d[1], d[0], k, d[2], d[3], d[4], d[5])
        else:
            scale_columns(d[0], d[0], k, d[3])
        narrow64(d[0], dx + j, k, fmt)


cdef void _forward_columns16(const uint16_t* x, uint16_t* y, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s,
                             Py_ssize_t c0, Py_ssize_t c1, double eps, const float* w, const float* b, int fmt,
                             double* mean, double* rstd, double* scale, double* shift,
                             double* scratch) noexcept nogil:
    """_forward_columns on 16-bit data: channels c0..c1 whole, their columns read a second time from cache; the
    per-column float32 coefficients and the double fallback as in _apply_channels16 (scale, shift: the channels'
    double coefficients, written for c0..c1); ``scratch``: _column_scratch's, or NULL for a task of at most
    NARROW_CHUNK columns (its buffers on the stack)."""
    cdef Py_ssize_t length = nc * s, l0 = c0 * s, width = (c1 - c0) * s, c, i
    cdef double stack[5 * NARROW_CHUNK]
    scratch = scratch if scratch != NULL else stack
    cdef double* s1 = scratch
    cdef double* s2 = scratch + width
    cdef float* piv = <float*>(scratch + 2 * width)
    cdef float* cols = <float*>(scratch + 3 * width)  # per column: mean, scale, shift (_finish_columns), width apart
    cdef double p
    for c in range(c0, c1):
        p = pivot16(x + c * s, fmt)  # a 16-bit value: exact in float32
        for i in range((c - c0) * s, (c - c0 + 1) * s):
            piv[i] = <float>p
    _column_moments16(x + l0, n, length, 0, width, piv, False, fmt, False, s1, s2)
    _finish_columns(s1, s2, n, s, c0, c1, piv, eps, w, b, mean, rstd, cols, cols + width, cols + 2 * width, scale,
                    shift)
    for i in range(n):
        _affine_row16(x + i * length + l0, y + i * length + l0, width, cols, cols + width, cols + 2 * width, fmt,
                      mean + c0, scale + c0, shift + c0, s, nc)


cdef void _backward_columns16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t n, Py_ssize_t nc,
                              Py_ssize_t s, Py_ssize_t c0, Py_ssize_t c1, bint training, bint sums,
                              const double* mean, const double* rstd, const float* w, int fmt, double* sdy,
                              double* sdyx, double* ca, double* cb, double* cc, double* scratch) noexcept nogil:
    """_backward_columns on 16-bit data: channels c0..c1 whole; the per-column float32 coefficients and the double
    fallback as in _grad_apply_channels16 (ca, cb, cc: written for c0..c1); ``scratch``: as in
    _forward_columns16."""
    cdef Py_ssize_t length = nc * s, l0 = c0 * s, width = (c1 - c0) * s, c, i, j
    cdef double stack[5 * NARROW_CHUNK]
    scratch = scratch if scratch != NULL else stack
    cdef double* a = scratch
    cdef double* b = scratch + width
    cdef float* cols = <float*>(scratch + 2 * width)  # per column: mean, ca, cb, cc (_grad_apply_row16's rows)
    for c in range(c0, c1):
        for i in range((c - c0) * s, (c - c0 + 1) * s):
            cols[i] = <float>mean[c]
    if sums:
        _column_grad_sums16(dy + l0, x + l0, n, length, 0, width, cols, fmt, False, a, b)
        for c in range(c0, c1):
            _merge_columns(a + (c - c0) * s, b + (c - c0) * s, s, &sdy[c], &sdyx[c])
    for c in range(c0, c1):
        _coefficients(training, sdy[c], sdyx[c], <double>(n * s), rstd[c], w[c] if w != NULL else 1.0,
                      &ca[c], &cb[c], &cc[c])
        for i in range((c - c0) * s, (c - c0 + 1) * s):
            cols[width + i] = <float>ca[c]
            cols[2 * width + i] = <float>cb[c]
            cols[3 * width + i] = <float>cc[c]
    for i in range(n):
        j = i * length + l0
        _grad_apply_row16(dy + j, x + j, dx + j, width, training, cols, width, fmt, mean + c0, ca + c0, cb + c0,
                          cc + c0, s, nc)


cdef void _backward16(bint training, const uint16_t* dyp, const uint16_t* xp, Py_ssize_t n, Py_ssize_t nc,
                      Py_ssize_t s, const float* mean, const float* rstd, const float* w, uint16_t* dxp,
                      float* dweight, float* dbias, int fmt):
    """_backward on 16-bit data (n, nc, s) (the channels schedule, whole-columns tasks, or sums and elementwise pass
    apart); w, dweight, dbias: NULL when absent."""
    cdef Py_ssize_t c, t, k
    cdef bint sums = training or dweight != NULL or dbias != NULL
    # the per-channel vectors in one malloc'd block, a memoryview of it only for the helpers (see _backward_p)
    cdef double* work = <double*>calloc(7 * nc + 1, sizeof(double))
    cdef double* mu = work
    cdef double* r = work + nc
    cdef double* sdy = work + 2 * nc
    cdef double* sdyx = work + 3 * nc
    cdef double* ca = work + 4 * nc
    cdef double* cb = work + 5 * nc
    cdef double* cc = work + 6 * nc
    cdef double[::1] v
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef double* scratch = NULL
    k = _whole_column_channels(n, nc, s, 2, False, normkit_regs16(fmt))
    if work == NULL:
        raise MemoryError()
    try:
        for c in range(nc):
            mu[c] = mean[c]
            r[c] = rstd[c]
        if nc >= MANY_CHANNELS and not _columns(n, s, NO_ACT, False):
            for c in prange(nc, nogil=True, schedule="static", num_threads=nt):
                _backward_channel16(dyp, xp, dxp, n, nc, s, c, training, sums, mu[c], r[c],
                                    w[c] if w != NULL else 1.0, fmt, &sdy[c], &sdyx[c])
        elif k:
            scratch = _column_scratch(k, s, nt)
            for t in prange(_cdiv(nc, k), nogil=True, schedule="static", num_threads=nt):
                _backward_columns16(dyp, xp, dxp, n, nc, s, t * k, min(nc, (t + 1) * k), training, sums, mu, r, w,
                                    fmt, sdy, sdyx, ca, cb, cc, _task_scratch(scratch))
        else:
            v = <double[:7 * nc + 1]> work
            if sums:
                _channel_grad_sums16(dyp, xp, n, nc, s, v[:nc], fmt, v[2 * nc:3 * nc], v[3 * nc:4 * nc])
            for c in range(nc):
                _coefficients(training, sdy[c], sdyx[c], <double>(n * s), r[c], w[c] if w != NULL else 1.0,
                              &ca[c], &cb[c], &cc[c])
            _grad_apply_channels16(dyp, xp, dxp, n, nc, s, training, v[:nc], v[4 * nc:5 * nc], v[5 * nc:6 * nc],
                                   v[6 * nc:7 * nc], fmt)
        for c in range(nc):
            if dweight != NULL:
                dweight[c] = <float>(r[c] * sdyx[c])
            if dbias != NULL:
                dbias[c] = <float>sdy[c]
    finally:
        free(work)


cdef void _pivots16(const uint16_t* xp, Py_ssize_t nc, Py_ssize_t s, int fmt, double[::1] pivot):
    cdef Py_ssize_t c
    for c in range(nc):
        pivot[c] = pivot16(xp + c * s, fmt)


cdef void _forward16(int fmt, const uint16_t* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, const float* w,
                     const float* b, double eps, uint16_t* yp, float* mean, float* rstd):
    cdef Py_ssize_t c, t, k
    # the per-channel vectors in one malloc'd block, a memoryview of it only for the helpers (see _backward_p)
    cdef double* work = <double*>malloc((7 * nc + 1) * sizeof(double))
    cdef double* mu = work
    cdef double* r = work + nc
    cdef double* pivot = work + 2 * nc
    cdef double* s1 = work + 3 * nc
    cdef double* s2 = work + 4 * nc
    cdef double* scale = work + 5 * nc
    cdef double* shift = work + 6 * nc
    cdef double[::1] v
    cdef int nt = threads_for(n * nc * s, _nthreads, _serial_max)
    cdef double* scratch = NULL
    k = _whole_column_channels(n, nc, s, 2, True, normkit_regs16(fmt))
    if work == NULL:
        raise MemoryError()
    try:
        if nc >= MANY_CHANNELS and not _columns(n, s, NO_ACT):
            for c in prange(nc, nogil=True, schedule="static", num_threads=nt):
                _forward_channel16(xp, yp, n, nc, s, c, eps, w, b, fmt, &mu[c], &r[c])
        elif k:
            scratch = _column_scratch(k, s, nt)
            for t in prange(_cdiv(nc, k), nogil=True, schedule="static", num_threads=nt):
                _forward_columns16(xp, yp, n, nc, s, t * k, min(nc, (t + 1) * k), eps, w, b, fmt, mu, r, scale,
                                   shift, _task_scratch(scratch))
        else:
            v = <double[:7 * nc + 1]> work
            _pivots16(xp, nc, s, fmt, v[2 * nc:3 * nc])
            _channel_moments16(xp, n, nc, s, v[2 * nc:3 * nc], False, fmt, v[3 * nc:4 * nc], v[4 * nc:5 * nc])
            for c in range(nc):
                finish_moments(s1[c], s2[c], n * s, pivot[c], eps, &mu[c], &r[c])
                scale[c] = r[c] * w[c] if w != NULL else r[c]
                shift[c] = b[c] if b != NULL else 0.0
            _apply_channels16(xp, yp, n, nc, s, mu, scale, shift, fmt)
        for c in range(nc):
            mean[c] = <float>mu[c]
            rstd[c] = <float>r[c]
    finally:
        free(work)


cdef void _forward_infer16(int fmt, const uint16_t* xp, Py_ssize_t n, Py_ssize_t nc, Py_ssize_t s, const float* w,
                           const float* b, const float* running_mean, const float* running_var, double eps,
                           uint16_t* yp):
    cdef double* coefs = _infer_coefficients(w, b, running_mean, running_var, nc, eps)
    try:
        _apply_channels16(xp, yp, n, nc, s, coefs, coefs + nc, coefs + 2 * nc, fmt)
    finally:
        free(coefs)


def batchnorm_forward16(int fmt, const uint16_t[:, :, ::1] x, const float[::1] weight, const float[::1] bias,
                        double eps, uint16_t[:, :, ::1] y, float[::1] mean, float[::1] rstd):
    _forward16(fmt, &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], _ptr(weight), _ptr(bias), eps, &y[0, 0, 0],
               &mean[0], &rstd[0])


def channel_forward_infer16(int fmt, const uint16_t[:, :, ::1] x, const float[::1] weight, const float[::1] bias,
                            const float[::1] running_mean, const float[::1] running_var, double eps,
                            uint16_t[:, :, ::1] y):
    _forward_infer16(fmt, &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], _ptr(weight), _ptr(bias),
                     &running_mean[0], &running_var[0], eps, &y[0, 0, 0])


def batchnorm_backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x, const float[::1] mean,
                         const float[::1] rstd, const float[::1] weight, uint16_t[:, :, ::1] dx, float[::1] dweight,
                         float[::1] dbias):
    _backward16(True, &dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0], &rstd[0],
                _ptr(weight), &dx[0, 0, 0], _out(dweight), _out(dbias), fmt)


def channel_backward_infer16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x,
                             const float[::1] mean, const float[::1] rstd, const float[::1] weight,
                             uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    _backward16(False, &dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0], &rstd[0],
                _ptr(weight), &dx[0, 0, 0], _out(dweight), _out(dbias), fmt)


def batchnorm_stats16(int fmt, const uint16_t[:, :, ::1] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t nc = x.shape[1], c
    cdef double cnt = <double>(x.shape[0] * x.shape[2]), d, v
    cdef double[::1] pivot = np.empty(nc), s1 = np.empty(nc), s2 = np.empty(nc)
    _pivots16(&x[0, 0, 0], nc, x.shape[2], fmt, pivot)
    _channel_moments16(&x[0, 0, 0], x.shape[0], nc, x.shape[2], pivot, True, fmt, s1, s2)
    for c in range(nc):
        d = s1[c] / cnt
        v = s2[c] - s1[c] * d
        if v < 0.0:  # rounding; a NaN stays NaN
            v = 0.0
        mean[c] = pivot[c] + d
        m2[c] = v


def batchnorm_apply16(int fmt, const uint16_t[:, :, ::1] x, const float[::1] scale, const float[::1] shift,
                      uint16_t[:, :, ::1] y):
    cdef double[::1] zero = np.zeros(x.shape[1])
    cdef double[::1] sc = np.asarray(scale, dtype=np.float64), sh = np.asarray(shift, dtype=np.float64)
    _apply_channels16(&x[0, 0, 0], &y[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &zero[0], &sc[0], &sh[0], fmt)


def batchnorm_backward_reduce16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x,
                                const double[::1] mean, const double[::1] rstd, double[::1] sum_dy,
                                double[::1] sum_dy_xhat):
    cdef Py_ssize_t nc = x.shape[1], c
    cdef double[::1] mu = np.array(mean), sdyx = np.empty(nc)
    cdef float m
    _channel_grad_sums16(&dy[0, 0, 0], &x[0, 0, 0], x.shape[0], nc, x.shape[2], mu, fmt, sum_dy, sdyx)
    for c in range(nc):
        m = <float>mean[c]  # the sums are about m, as in batchnorm_backward_reduce
        if m != mean[c] and isfinite(sum_dy[c]):
            sdyx[c] += (m - mean[c]) * sum_dy[c]
        sum_dy_xhat[c] = rstd[c] * sdyx[c]


def batchnorm_backward_apply16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x,
                               const float[::1] a, const float[::1] b, const float[::1] d, uint16_t[:, :, ::1] dx):
    cdef double[::1] zero = np.zeros(x.shape[1])
    cdef double[::1] ca = np.asarray(a, dtype=np.float64), cb = np.asarray(b, dtype=np.float64)
    cdef double[::1] cc = np.asarray(d, dtype=np.float64)
    _grad_apply_channels16(&dy[0, 0, 0], &x[0, 0, 0], &dx[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], True, zero,
                           ca, cb, cc, fmt)


# 16-bit address kernels: as the float ones, fmt first (as the array kernels); the data's addresses hold uint16
# patterns, weight, bias, the running statistics and the gradients float32

def batchnorm_forward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight, size_t bias,
                             double eps, size_t y, float[::1] mean, float[::1] rstd):
    _check(n, c, s, x, y, mean.shape[0], rstd.shape[0])
    _forward16(fmt, <const uint16_t*>x, n, c, s, <const float*>weight, <const float*>bias, eps, <uint16_t*>y,
               &mean[0], &rstd[0])


def channel_forward_infer16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight,
                                 size_t bias, size_t running_mean, size_t running_var, double eps, size_t y):
    _check(n, c, s, x if running_mean and running_var else 0, y, c, c)
    _forward_infer16(fmt, <const uint16_t*>x, n, c, s, <const float*>weight, <const float*>bias,
                     <const float*>running_mean, <const float*>running_var, eps, <uint16_t*>y)


def batchnorm_backward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x,
                              const float[::1] mean, const float[::1] rstd, size_t weight, size_t dx, size_t dweight,
                              size_t dbias):
    _check(n, c, s, dy if x else 0, dx, mean.shape[0], rstd.shape[0])
    _backward16(True, <const uint16_t*>dy, <const uint16_t*>x, n, c, s, &mean[0], &rstd[0], <const float*>weight,
                <uint16_t*>dx, <float*>dweight, <float*>dbias, fmt)
