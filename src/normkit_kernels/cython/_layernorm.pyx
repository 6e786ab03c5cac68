# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""LayerNorm over the rows of an (M, K) array, with an elementwise (K,) weight and bias.

Rows are independent tasks. The parameter gradients sum over rows; to stay independent of the thread count they
are summed per fixed block of rows (blocks depend on the shape only) and the blocks merged in order. Rows too long
for per-block partial sums (K > GROUPED_ROW, with fewer than GROUPED_MAX_ROWS rows or K > LONG_ROW) are instead
processed in groups of rows that stay in the last-level cache between two parallel passes: one for the rows' sums,
by (row, tile of columns) items merged in tile order; one for dx and the parameter gradients, by blocks of columns,
each adding the group's rows in row order (two rows per loop where no activation is fused, so that the
accumulators are loaded once per pair). (Float32 (32, 200704) on two threads: 5.2-5.9 -> 4.6-5.7 ms, the same as
the Numba kernel, which has this schedule; the earlier one row at a time, its tiles in parallel, was 15% slower.)

Fused activation (the act_ directions): the activation is applied to each chunk of y as it is written; backward
recomputes z = xhat * w + b chunk by chunk in each of its passes over a row and uses g = dy * act'(z) for dy.
"""

import os
import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint16_t
from libc.string cimport memset

from _common cimport (
    ACT_CHUNK, NO_ACT, PAIRS_MIN_ROW, ROW_GROUP_BYTES, SERIAL_MAX_VALUES, TILE16, TILED_ROW, TILED_ROWS, act_apply,
    act_grad, clear_sums, finish_moments, grad_sums, group_coefficients, max_offset, moments, moments16, narrow64,
    normkit_half_init, normkit_narrow, normkit_row_dx16, normkit_row_sums16, normkit_row_y16, normkit_row_y_act_f,
    normkit_row_y_act_grad_f, normkit_sfence, normkit_widen, pivot16, pivot_of, store_grads, stream_store,
    threads_for, to_double,
)

# float16 converts with F16C where the CPU has it, unless NORMKIT_CYTHON_NO_F16C=1 asks for the portable code (to
# test or compare it); each module holds its own choice.
F16C = bool(normkit_half_init(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") in ("", "0")))

# Per-block partial parameter gradients of all blocks together stay under this many doubles (8 MB).
cdef Py_ssize_t PARTIAL_BUDGET = 1 << 20
cdef Py_ssize_t MAX_BLOCKS = 64
# Rows per block, at least, once there are more than a few blocks: each block clears, fills and merges 2k partial
# sums, which for blocks of one row cost more than the rows themselves ((64, 1024): 46 us against 16 us), and for
# blocks of 16 rows still a tenth of the backward of short rows (in-process A/B, 64 rows against 16, two threads:
# (2048, 256) 0.90x, (512, 768) 0.86x, (128, 768) 0.92x; right after a Linear, as in a model, 0.96x and 0.92x;
# (8192, 1024) and (4096, 512) equal). 64 rows still make 32 blocks of (2048, 256), rows of a transformer layer.
cdef Py_ssize_t BLOCK_ROWS = 64
cdef Py_ssize_t FEW_BLOCKS = 4
cdef Py_ssize_t LONG_ROW = 1 << 16
# The backward of rows longer than this takes the groups-of-rows schedule (below): per-block partial sums of 2k
# values per block cost as much as the rows themselves when rows are few ((8, 65536): 4 blocks of 2 rows, 0.89 ->
# 0.41 ms on two threads) and a fifth of them at (1024, 8192) (6.1 -> 5.2 ms). In-process A/B, float32, 0.45-0.95x
# on one and two threads from k = 5000 to 65536 and m = 1 to 2048; its dx pass splits rows into COLUMNS-wide
# blocks, two of them at k = 4096, too few to go lower.
cdef Py_ssize_t GROUPED_ROW = 4096
# ...but with this many rows or more, up to LONG_ROW values each, the blocks of rows win again (their partial sums
# are then a small part of the work): blocks against groups, in-process A/B, float32, 2 threads, two runs, 128 to
# 1024 rows of 8192 to 65536 values 0.76-0.94x (one cell 1.05 in one run); 64 rows 0.95-1.08x; 8 to 32 rows up to
# 2.3x (the groups' case). Longer rows with many rows (100 MB and more) were not measured and keep the groups.
cdef Py_ssize_t GROUPED_MAX_ROWS = 128
# The 16-bit backward has no such schedule: rows over LONG_ROW, and up to TILED_ROWS rows over TILED_ROW values,
# go in groups of rows, the threads sharing their tiles (ROW_GROUP_BYTES, _common.pxd).
cdef Py_ssize_t TILE = 4096
# Long rows go in groups of rows whose dy and x fit this many bytes (in the last-level cache between the two passes
# over them), and their dx pass by blocks of COLUMNS columns (whose parameter-gradient accumulators stay in L1).
cdef Py_ssize_t GROUP_BYTES = 4 << 20
cdef Py_ssize_t COLUMNS = 2048
# Parameter-gradient terms summed in the data's precision before they are added to the double sums.
cdef Py_ssize_t FLUSH = 16

cdef int _nthreads = 1
cdef Py_ssize_t _serial_max = SERIAL_MAX_VALUES
# Outputs of this many bytes or more are written with non-temporal stores (set_stream_min_bytes).
cdef Py_ssize_t _stream_min = 1 << 62
cdef Py_ssize_t _pairs_max = 0
_local = threading.local()


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


def set_serial_max_values(Py_ssize_t n):
    global _serial_max
    _serial_max = n


def set_stream_min_bytes(Py_ssize_t n):
    global _stream_min
    _stream_min = n


def set_pairs_max_bytes(Py_ssize_t n):
    """The backward's blocks of rows (_backward_block) take them two at a time when dy, x and dx together are at
    most n bytes."""
    global _pairs_max
    _pairs_max = n


cdef double[::1] _scratch(Py_ssize_t n):
    """A work buffer of n doubles kept per calling thread: a fresh allocation on every call costs page faults
    that took as long as the kernel itself."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.buf = np.empty(n)
    return buf


cdef void _forward_row(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                       double eps, int act, double slope, bint stream, floating* mean_out,
                       floating* rstd_out) noexcept nogil:
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    moments(x, k, pivot, &s1, &s2)
    finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    _row_out(x, y, k, w, b, mean, rstd, act, slope, stream)


cdef void _forward_row_tiles(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                             double eps, int act, double slope, bint stream, int nt, double* part,
                             floating* mean_out, floating* rstd_out) noexcept nogil:
    """_forward_row of a single long row, the threads sharing its TILE-value tiles: the tiles' moments about the
    row's pivot (into part, 2 per tile), added in tile order, then the tiles' output. As one row it ran on one
    thread."""
    cdef Py_ssize_t t, tiles = (k + TILE - 1) // TILE
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    for t in prange(tiles, schedule="static", num_threads=nt):
        part[2 * t] = 0.0
        part[2 * t + 1] = 0.0
        moments(x + t * TILE, min(TILE, k - t * TILE), pivot, &part[2 * t], &part[2 * t + 1])
    for t in range(tiles):
        s1 = s1 + part[2 * t]
        s2 = s2 + part[2 * t + 1]
    finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    for t in prange(tiles, schedule="static", num_threads=nt):
        _row_out(x + t * TILE, y + t * TILE, min(TILE, k - t * TILE), w + t * TILE, b + t * TILE, mean, rstd, act,
                 slope, stream)


cdef void _row_out(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b, double mean,
                   double rstd, int act, double slope, bint stream) noexcept nogil:
    """y of a row (or of a run of it) from its statistics."""
    cdef Py_ssize_t q, j, n
    cdef floating buf[ACT_CHUNK]
    # In the data's precision (twice the vector lanes of double for float32): xhat = (x - m) * r + c0 with m the
    # mean rounded to that precision and c0 = (m - mean) * rstd the rounding's correction, so that a large offset
    # loses nothing; a constant row gives xhat = 0 exactly and so exactly the bias.
    cdef float m, r, c0
    if act == NO_ACT and not stream:
        _row_y(x, y, k, w, b, mean, rstd)
        return
    if floating is float and not stream:
        _row_consts(mean, rstd, &m, &r, &c0)
        normkit_row_y_act_f(x, y, k, w, b, m, r, c0, act, <float>slope)
        return
    for q in range((k + ACT_CHUNK - 1) // ACT_CHUNK):
        j = q * ACT_CHUNK
        n = min(<Py_ssize_t>ACT_CHUNK, k - j)
        if stream:  # the chunk on the stack, then out with non-temporal stores
            _row_y(x + j, buf, n, w + j, b + j, mean, rstd)
            if act != NO_ACT:
                act_apply(buf, n, act, slope)
            stream_store(y + j, buf, n)
        else:
            _row_y(x + j, y + j, n, w + j, b + j, mean, rstd)
            act_apply(y + j, n, act, slope)
    if stream:
        normkit_sfence()


cdef inline void _row_consts(double mean, double rstd, float* m, float* r, float* c0) noexcept nogil:
    """_row_y's float32 constants, for the C loops that compute its value."""
    m[0] = <float>mean
    r[0] = <float>rstd
    c0[0] = <float>((<double>m[0] - mean) * rstd)


cdef inline void _row_y(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                        double mean, double rstd) noexcept nogil:
    cdef floating m = <floating>mean, r = <floating>rstd, c0 = <floating>((<double>m - mean) * rstd)
    cdef Py_ssize_t j
    for j in range(k):
        y[j] = ((x[j] - m) * r + c0) * w[j] + b[j]


cdef void _row_dx(const floating* dy, const floating* x, floating* dx, Py_ssize_t k, const floating* w,
                  double mean, double rstd, double cb, double cc) noexcept nogil:
    """dx = rstd * w * dy + cb * (x - mean) + cc, i.e. rstd * (g - mean(g) - xhat * mean(g * xhat)), in the data's
    precision (twice the vector lanes of double for float32; mean is the saved statistic, of that precision)."""
    cdef floating m = <floating>mean, r = <floating>rstd, b = <floating>cb, c = <floating>cc
    cdef Py_ssize_t j
    for j in range(k):
        dx[j] = r * w[j] * dy[j] + b * (x[j] - m) + c


cdef void _row_dx_inplace(floating* g, const floating* x, Py_ssize_t k, const floating* w, double mean,
                          double rstd, double cb, double cc) noexcept nogil:
    """_row_dx with dy read from, and dx written to, the same memory g (one pointer: two would be an overlap the
    compiler's run-time check sends to its scalar loop)."""
    cdef floating m = <floating>mean, r = <floating>rstd, b = <floating>cb, c = <floating>cc
    cdef Py_ssize_t j
    for j in range(k):
        g[j] = r * w[j] * g[j] + b * (x[j] - m) + c


cdef void _row_dx_stream(const floating* dy, const floating* x, floating* dx, Py_ssize_t k, const floating* w,
                         double mean, double rstd, double cb, double cc) noexcept nogil:
    """_row_dx with dx written by non-temporal stores, chunk by chunk from the stack (the caller fences)."""
    cdef floating buf[ACT_CHUNK]
    cdef Py_ssize_t q, j, n
    for q in range((k + ACT_CHUNK - 1) // ACT_CHUNK):
        j = q * ACT_CHUNK
        n = min(<Py_ssize_t>ACT_CHUNK, k - j)
        _row_dx(dy + j, x + j, buf, n, w + j, mean, rstd, cb, cc)
        stream_store(dx + j, buf, n)


cdef void _add_param_grads(const floating* dy, const floating* x, Py_ssize_t k, double mean, double rstd,
                           floating* accw, floating* accb) noexcept nogil:
    """accw += dy * xhat, accb += dy, in the data's precision; callers flush the sums into double every FLUSH
    rows, so no more than FLUSH terms are ever added in float32."""
    cdef floating m = <floating>mean, r = <floating>rstd, g
    cdef Py_ssize_t j
    for j in range(k):
        g = dy[j]
        accw[j] += g * ((x[j] - m) * r)
        accb[j] += g


cdef extern from *:
    # _row_dx and _add_param_grads in one loop, which loads dy and x once. Written in C for ``restrict``: without
    # it, gcc's run-time overlap checks for six pointers exceed its limit and the loop stays scalar (2x slower).
    """
    #define NORMKIT_LN_DX_GRADS(NAME, T)                                                                   \
        static inline void NAME(const T* restrict dy, const T* restrict x, T* restrict dx, Py_ssize_t k,   \
                                const T* restrict w, T m, T r, T b, T c, T* restrict accw,                 \
                                T* restrict accb) {                                                        \
            for (Py_ssize_t j = 0; j < k; j++) {                                                           \
                T g = dy[j], xm = x[j] - m;                                                                \
                dx[j] = r * w[j] * g + b * xm + c;                                                         \
                accw[j] += g * (xm * r);                                                                   \
                accb[j] += g;                                                                              \
            }                                                                                              \
        }
    #define NORMKIT_LN_DX_GRADS2(NAME, T)                                                                  \
        static inline void NAME(const T* restrict dy, const T* restrict x, T* restrict dx, Py_ssize_t k,   \
                                const T* restrict w, T m, T r, T b, T c, const T* restrict dy2,             \
                                const T* restrict x2, T* restrict dx2, T m2, T r2, T b2, T c2,              \
                                T* restrict accw, T* restrict accb) {                                      \
            for (Py_ssize_t j = 0; j < k; j++) {                                                           \
                T g = dy[j], xm = x[j] - m, g2 = dy2[j], xm2 = x2[j] - m2, wj = w[j];                     \
                dx[j] = r * wj * g + b * xm + c;                                                           \
                dx2[j] = r2 * wj * g2 + b2 * xm2 + c2;                                                     \
                accw[j] += g * (xm * r) + g2 * (xm2 * r2);                                                 \
                accb[j] += g + g2;                                                                         \
            }                                                                                              \
        }
    NORMKIT_LN_DX_GRADS(normkit_ln_dx_grads_f, float)
    NORMKIT_LN_DX_GRADS(normkit_ln_dx_grads_d, double)
    NORMKIT_LN_DX_GRADS2(normkit_ln_dx_grads2_f, float)
    NORMKIT_LN_DX_GRADS2(normkit_ln_dx_grads2_d, double)
    """
    void normkit_ln_dx_grads_f(const float* dy, const float* x, float* dx, Py_ssize_t k, const float* w, float m,
                               float r, float b, float c, float* accw, float* accb) noexcept nogil
    void normkit_ln_dx_grads_d(const double* dy, const double* x, double* dx, Py_ssize_t k, const double* w,
                               double m, double r, double b, double c, double* accw, double* accb) noexcept nogil
    void normkit_ln_dx_grads2_f(const float* dy, const float* x, float* dx, Py_ssize_t k, const float* w, float m,
                                float r, float b, float c, const float* dy2, const float* x2, float* dx2, float m2,
                                float r2, float b2, float c2, float* accw, float* accb) noexcept nogil
    void normkit_ln_dx_grads2_d(const double* dy, const double* x, double* dx, Py_ssize_t k, const double* w,
                                double m, double r, double b, double c, const double* dy2, const double* x2,
                                double* dx2, double m2, double r2, double b2, double c2, double* accw,
                                double* accb) noexcept nogil


cdef inline void _row_dx_grads(const floating* dy, const floating* x, floating* dx, Py_ssize_t k,
                               const floating* w, double mean, double rstd, double cb, double cc, floating* accw,
                               floating* accb) noexcept nogil:
    """_row_dx, then _add_param_grads, fused (dx must not overlap the other arrays)."""
    if floating is float:
        normkit_ln_dx_grads_f(dy, x, dx, k, w, <float>mean, <float>rstd, <float>cb, <float>cc, accw, accb)
    else:
        normkit_ln_dx_grads_d(dy, x, dx, k, w, mean, rstd, cb, cc, accw, accb)


cdef void _rows_dx_grads(const floating* dy, const floating* x, floating* dx, Py_ssize_t k, Py_ssize_t ld,
                         const floating* w, const floating* mean, const floating* rstd, const double* coef,
                         Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t base, Py_ssize_t m, floating* accw, floating* accb,
                         double* gw, double* gb) noexcept nogil:
    """dx and the parameter-gradient terms of rows i0..i1-1 (i0 - base even) over one run of k columns (rows ld
    apart; coef: each row's cb, cc from i0 on), two rows per loop: the accumulators are loaded once per pair. They
    flush into gw, gb after every FLUSH rows counted from row base, and after row m - 1 (FLUSH is even, so a pair
    never straddles a flush)."""
    cdef Py_ssize_t i, o, last
    cdef const double* c
    for i in range(i0, i1, 2):
        o = i * ld
        c = coef + 2 * (i - i0)
        if i + 1 < i1:
            if floating is float:
                normkit_ln_dx_grads2_f(dy + o, x + o, dx + o, k, w, mean[i], rstd[i], <float>c[0], <float>c[1],
                                       dy + o + ld, x + o + ld, dx + o + ld, mean[i + 1], rstd[i + 1],
                                       <float>c[2], <float>c[3], accw, accb)
            else:
                normkit_ln_dx_grads2_d(dy + o, x + o, dx + o, k, w, mean[i], rstd[i], c[0], c[1], dy + o + ld,
                                       x + o + ld, dx + o + ld, mean[i + 1], rstd[i + 1], c[2], c[3], accw, accb)
        else:
            _row_dx_grads(dy + o, x + o, dx + o, k, w, mean[i], rstd[i], c[0], c[1], accw, accb)
        last = min(i + 1, i1 - 1)
        if (last + 1 - base) % FLUSH == 0 or last == m - 1:
            _flush(accw, gw, k)
            _flush(accb, gb, k)


cdef void _flush(floating* acc, double* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] += acc[j]
        acc[j] = 0


cdef inline void _row_run(const floating* g, const floating* x, floating* dx, Py_ssize_t n, const floating* w,
                          double mean, double rstd, double* sg, double* sgx, floating* accw, floating* accb,
                          double cb, double cc, bint stream) noexcept nogil:
    """The steps of one backward pass over a run of a row, with g for dy: g's parameter-gradient terms into accw,
    accb (unless NULL, _add_param_grads), g * w's sums into sg, sgx (unless NULL, grad_sums), then dx (unless
    NULL, _row_dx with cb, cc; with stream, by non-temporal stores). The parameter gradients and dx without the
    sums or streaming: _row_dx_grads, one loop."""
    if accw != NULL and dx != NULL and sg == NULL and not stream:
        _row_dx_grads(g, x, dx, n, w, mean, rstd, cb, cc, accw, accb)
        return
    if accw != NULL:
        _add_param_grads(g, x, n, mean, rstd, accw, accb)
    if sg != NULL:
        grad_sums(g, x, w, n, mean, sg, sgx)
    if dx != NULL:
        if stream:
            _row_dx_stream(g, x, dx, n, w, mean, rstd, cb, cc)
        else:
            _row_dx(g, x, dx, n, w, mean, rstd, cb, cc)


cdef void _row_pass(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, const floating* w,
                    const floating* b, double mean, double rstd, int act, double slope, double* sg, double* sgx,
                    floating* accw, floating* accb, double cb, double cc, bint stream,
                    floating* keep=NULL) noexcept nogil:
    """_row_run of dy (NO_ACT), or of g = dy * act'(z) with z recomputed as _row_y computes it, chunk by chunk on
    the stack, or into ``keep`` (the row's dx, for _row_dx_inplace to read back); b is read only then (NULL
    without an activation)."""
    cdef floating stack[ACT_CHUNK]
    cdef floating* g
    cdef Py_ssize_t q, j, m
    cdef float fm, fr, c0
    if act == NO_ACT:
        _row_run(dy, x, dx, n, w, mean, rstd, sg, sgx, accw, accb, cb, cc, stream)
        return
    _row_consts(mean, rstd, &fm, &fr, &c0)
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        j = q * ACT_CHUNK
        m = min(<Py_ssize_t>ACT_CHUNK, n - j)
        g = keep + j if keep != NULL else stack
        if floating is float:  # g = dy * act'(z) in one loop
            normkit_row_y_act_grad_f(dy + j, x + j, g, m, w + j, b + j, fm, fr, c0, act, <float>slope)
        else:
            _row_y(x + j, g, m, w + j, b + j, mean, rstd)
            act_grad(dy + j, g, m, act, slope)
        _row_run(g, x + j, dx + j if dx != NULL else NULL, m, w + j, mean, rstd, sg, sgx,
                 accw + j if accw != NULL else NULL, accb + j if accb != NULL else NULL, cb, cc, stream)


cdef inline void _coefficients(double sg, double sgx, Py_ssize_t k, double rstd, double* cb,
                               double* cc) noexcept nogil:
    cb[0] = -rstd * rstd * rstd * sgx / k
    cc[0] = -rstd * sg / k


cdef void _backward_block(const floating* dy, const floating* x, floating* dx, Py_ssize_t m0, Py_ssize_t m1,
                          Py_ssize_t k, const floating* w, const floating* b, int act, double slope,
                          const floating* mean, const floating* rstd, double* partial, floating* acc,
                          bint stream, bint pairs) noexcept nogil:
    """Rows m0..m1-1. Unless partial is NULL, their parameter gradients go to partial[0:k] (weight) and
    partial[k:2k] (bias), through the accumulators acc[0:2k] in the data's precision, flushed every FLUSH rows.

    A row takes three loops, in PyTorch's order: the parameter gradients first, so that the loop that reads dy
    and x from memory is the lightest one, then the row's sums and dx from L1. With pairs (and parameter
    gradients, no activation, no streaming) two rows at a time instead: each row's sums, then both rows' dx and
    parameter-gradient terms in one loop (_rows_dx_grads), which loads and stores the accumulators once per pair
    and makes two passes over the data instead of three. Measured (in-process A/B, 2 threads, float32) against
    the three loops: 0.77-0.86x on data well inside the last-level cache and hot ((128, 768), (256, 256), (2048,
    256), (512, 1024), (128, 4096)), 0.90-1.0x at (2048, 1024) (24 MB), but 1.02-1.07x on data that does not fit
    ((8192, 1024), (16384, 768)), likely because the loop that reads from memory is then the heavier sums loop;
    so pairs go up to the cache's size (set_pairs_max_bytes). Data that fits but comes from memory, as in a model,
    loses the same way on rows shorter than PAIRS_MIN_ROW (_common.pxd), so the caller pairs only longer rows."""
    cdef Py_ssize_t i, o, q
    cdef double sg, sgx, cb, cc
    cdef double coef[4]
    # a fused activation's g = dy * act'(z), made for the sums, left in dx (the row is in cache) for the second
    # pass to read rather than make again (not with streaming stores, where dx is not to be read back). Float32,
    # 2 threads, GELU, against making it again: (8192, 1024) 0.66x, (512, 1024) 0.62x, (128, 768) 0.64x (the
    # same bits)
    cdef bint kept = act != NO_ACT and not stream
    if partial != NULL:
        memset(partial, 0, 2 * k * sizeof(double))
        memset(acc, 0, 2 * k * sizeof(floating))
    if pairs and partial != NULL and act == NO_ACT and not stream:
        for i in range(m0, m1, 2):
            for q in range(min(2, m1 - i)):
                o = (i + q) * k
                sg = 0.0
                sgx = 0.0
                grad_sums(dy + o, x + o, w, k, mean[i + q], &sg, &sgx)
                _coefficients(sg, sgx, k, rstd[i + q], &coef[2 * q], &coef[2 * q + 1])
            _rows_dx_grads(dy, x, dx, k, k, w, mean, rstd, coef, i, min(i + 2, m1), m0, m1, acc, acc + k, partial,
                           partial + k)
        return
    for i in range(m0, m1):
        o = i * k
        sg = 0.0
        sgx = 0.0
        _row_pass(dy + o, x + o, NULL, k, w, b, mean[i], rstd[i], act, slope, &sg, &sgx,
                  acc if partial != NULL else NULL, acc + k if partial != NULL else NULL, 0.0, 0.0, False,
                  dx + o if kept else NULL)
        _coefficients(sg, sgx, k, rstd[i], &cb, &cc)
        if kept:
            _row_dx_inplace(dx + o, x + o, k, w, mean[i], rstd[i], cb, cc)
        else:
            _row_pass(dy + o, x + o, dx + o, k, w, b, mean[i], rstd[i], act, slope, NULL, NULL, NULL, NULL, cb, cc,
                      stream)
        if partial != NULL and ((i + 1 - m0) % FLUSH == 0 or i + 1 == m1):
            _flush(acc, partial, 2 * k)
    if stream:
        normkit_sfence()


cdef void _merge_blocks(const double* partial, Py_ssize_t blocks, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t j1,
                        double* out) noexcept nogil:
    """out[j] = sum over blocks, in block order, of partial[block, j] for j0 <= j < j1 (rows of length k)."""
    cdef Py_ssize_t t, j
    for j in range(j0, j1):
        out[j] = 0.0
    for t in range(blocks):
        for j in range(j0, j1):
            out[j] += partial[t * k + j]


cdef void _forward(const floating[:, ::1] x, const floating[::1] weight, const floating[::1] bias, double eps,
                   int act, double slope, floating[:, ::1] y, floating[::1] mean, floating[::1] rstd):
    _forward_rows(&x[0, 0], x.shape[0], x.shape[1], NULL if weight is None else &weight[0],
                  NULL if bias is None else &bias[0], eps, act, slope, &y[0, 0], &mean[0], &rstd[0])


cdef const floating* _or_filled(const floating* p, Py_ssize_t k, double value, list keep):
    """p, or when it is NULL a row of k ``value``s (kept alive in ``keep``): missing parameters become ones and
    zeros, so that one loop serves every combination."""
    cdef floating[::1] row
    if p != NULL:
        return p
    row = np.full(k, value, np.float32 if floating is float else np.float64)
    keep.append(row)
    return &row[0]


cdef void _forward_rows(const floating* xp, Py_ssize_t m, Py_ssize_t k, const floating* w, const floating* b,
                        double eps, int act, double slope, floating* yp, floating* mp, floating* rp):
    cdef Py_ssize_t i
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    keep = []
    w = _or_filled(w, k, 1.0, keep)
    b = _or_filled(b, k, 0.0, keep)
    cdef bint stream = m * k * <Py_ssize_t>sizeof(floating) >= _stream_min
    cdef double[::1] part
    if m == 1 and k > LONG_ROW:
        part = _scratch(2 * ((k + TILE - 1) // TILE))
        with nogil:
            _forward_row_tiles(xp, yp, k, w, b, eps, act, slope, stream, nt, &part[0], mp, rp)
        return
    for i in prange(m, nogil=True, schedule="static", num_threads=nt):
        _forward_row(xp + i * k, yp + i * k, k, w, b, eps, act, slope, stream, mp + i, rp + i)


def layernorm_forward(const floating[:, ::1] x, const floating[::1] weight, const floating[::1] bias, double eps,
                      floating[:, ::1] y, floating[::1] mean, floating[::1] rstd):
    _forward(x, weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def layernorm_act_forward(const floating[:, ::1] x, const floating[::1] weight, const floating[::1] bias,
                          double eps, int activation, double slope, floating[:, ::1] y, floating[::1] mean,
                          floating[::1] rstd):
    _forward(x, weight, bias, eps, activation, slope, y, mean, rstd)


cdef void _backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] mean,
                    const floating[::1] rstd, const floating[::1] weight, const floating[::1] bias, int act,
                    double slope, floating[:, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    _backward_rows(&dy[0, 0], &x[0, 0], x.shape[0], x.shape[1], &mean[0], &rstd[0],
                   NULL if weight is None else &weight[0], NULL if bias is None else &bias[0], act, slope, &dx[0, 0],
                   NULL if dweight is None else &dweight[0], NULL if dbias is None else &dbias[0])


cdef void _backward_rows(const floating* dyp, const floating* xp, Py_ssize_t m, Py_ssize_t k, const floating* mp,
                         const floating* rp, const floating* w, const floating* b, int act, double slope,
                         floating* dxp, floating* dweight, floating* dbias):
    cdef Py_ssize_t i, j, t, per_block, blocks, tiles, n, cols, group, q, g0, rows, r
    cdef bint params = dweight != NULL or dbias != NULL
    cdef floating* acc  # float accumulators of the parameter gradients, weight then bias
    cdef double[::1] buf
    cdef double* grads  # weight gradients, then bias gradients: 2k doubles
    cdef double* work
    cdef double* coef
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    # with an activation, ordinary stores (g kept in dx between the passes), as BatchNorm's backward: streaming
    # never changes which path runs, nor so the gradients' bits
    cdef bint stream = act == NO_ACT and m * k * <Py_ssize_t>sizeof(floating) >= _stream_min
    keep = []
    w = _or_filled(w, k, 1.0, keep)
    if act != NO_ACT:  # b is read only to recompute an activation's input (a row of zeros cost ~2 us a call)
        b = _or_filled(b, k, 0.0, keep)
    if not params:
        blocks = min(m, MAX_BLOCKS)
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, b, act, slope, mp, rp,
                            NULL, NULL, stream, False)
        return
    if k > GROUPED_ROW and (m < GROUPED_MAX_ROWS or k > LONG_ROW):
        tiles = (k + TILE - 1) // TILE
        cols = (k + COLUMNS - 1) // COLUMNS
        group = min(m, max(2, GROUP_BYTES // (2 * k * <Py_ssize_t>sizeof(floating)) // 2 * 2))  # even
        # 2k doubles of gradients, 2 per (row, tile) of a group's row sums, 2 coefficients per row of a group,
        # then 2k accumulators (in doubles' room); the first group's column blocks clear their columns of both
        buf = _scratch(2 * k + 2 * group * tiles + 2 * group + (2 * k * sizeof(floating) + 7) // 8)
        grads = &buf[0]
        work = grads + 2 * k
        coef = work + 2 * group * tiles
        acc = <floating*>(coef + 2 * group)
        with nogil:
            for q in range((m + group - 1) // group):
                g0 = q * group
                rows = min(group, m - g0)
                # the group's row sums, item t being row t % rows, tile t // rows
                for t in prange(rows * tiles, schedule="static", num_threads=nt):
                    i = g0 + t % rows
                    j = (t // rows) * TILE
                    work[2 * t] = 0.0
                    work[2 * t + 1] = 0.0
                    _row_pass(dyp + i * k + j, xp + i * k + j, NULL, min(TILE, k - j), w + j,
                              b + j if b != NULL else NULL, mp[i], rp[i], act, slope, &work[2 * t], &work[2 * t + 1],
                              NULL, NULL, 0.0, 0.0, False)
                group_coefficients(work, tiles, rows, k, rp + g0, True, coef)
                # dx and the parameter gradients by blocks of columns, each adding the group's rows in row order
                for t in prange(cols, schedule="static", num_threads=nt):
                    j = t * COLUMNS
                    n = min(COLUMNS, k - j)
                    if q == 0:
                        clear_sums(grads + j, acc + j, n)
                        clear_sums(grads + k + j, acc + k + j, n)
                    if act == NO_ACT and not stream:
                        _rows_dx_grads(dyp + j, xp + j, dxp + j, n, k, w + j, mp, rp, coef, g0, g0 + rows, 0, m,
                                       acc + j, acc + k + j, grads + j, grads + k + j)
                        continue
                    for r in range(rows):
                        i = g0 + r
                        _row_pass(dyp + i * k + j, xp + i * k + j, dxp + i * k + j, n, w + j,
                                  b + j if b != NULL else NULL, mp[i], rp[i], act, slope, NULL, NULL, acc + j,
                                  acc + k + j, coef[2 * r], coef[2 * r + 1], stream)
                        if i % FLUSH == FLUSH - 1 or i == m - 1:
                            _flush(acc + j, grads + j, n)
                            _flush(acc + k + j, grads + k + j, n)
                    if stream:
                        normkit_sfence()
    else:
        blocks = min(m, MAX_BLOCKS, max(1, PARTIAL_BUDGET // (2 * k)), max(FEW_BLOCKS, m // BLOCK_ROWS))
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        # 2k doubles of gradients, 2k per block of partial sums, then 2k accumulators per block (in doubles' room)
        buf = _scratch(2 * k + blocks * 2 * k + (blocks * 2 * k * sizeof(floating) + 7) // 8)
        grads = &buf[0]
        work = grads + 2 * k
        acc = <floating*>(work + blocks * 2 * k)
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, b, act, slope, mp, rp,
                            work + t * 2 * k, acc + t * 2 * k, stream,
                            k >= PAIRS_MIN_ROW and 3 * m * k * <Py_ssize_t>sizeof(floating) <= _pairs_max)
        # the partials are laid out as rows of 2k (weight then bias), so one merge does both
        tiles = (2 * k + TILE - 1) // TILE
        for t in prange(tiles, nogil=True, schedule="static", num_threads=nt):
            _merge_blocks(work, blocks, 2 * k, t * TILE, min(2 * k, (t + 1) * TILE), grads)
    store_grads(grads, k, dweight, dbias, TILE, nt)


def layernorm_backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] mean,
                       const floating[::1] rstd, const floating[::1] weight, floating[:, ::1] dx,
                       floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _backward(dy, x, mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


def layernorm_act_backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] mean,
                           const floating[::1] rstd, const floating[::1] weight, const floating[::1] bias,
                           int activation, double slope, floating[:, ::1] dx, floating[::1] dweight,
                           floating[::1] dbias):
    _backward(dy, x, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


# --- address kernels (normkit.contract): the plain kernels on memory given by address ----------------------------

cdef int _check(Py_ssize_t m, Py_ssize_t k, size_t x, size_t out, Py_ssize_t mean_rows,
                Py_ssize_t rstd_rows) except -1:
    # what can be checked without the arrays: the shapes against each other, data addresses not NULL
    if m < 1 or k < 1 or x == 0 or out == 0:
        raise ValueError(f"address kernel: bad shape ({m}, {k}) or a NULL data address")
    if mean_rows != m or rstd_rows != m:
        raise ValueError(f"address kernel: mean and rstd must be ({m},), got ({mean_rows},) and ({rstd_rows},)")
    return 0


def layernorm_forward_addr(Py_ssize_t m, Py_ssize_t k, size_t x, size_t weight, size_t bias, double eps, size_t y,
                           floating[::1] mean, floating[::1] rstd):
    _check(m, k, x, y, mean.shape[0], rstd.shape[0])
    _forward_rows(<const floating*>x, m, k, <const floating*>weight, <const floating*>bias, eps, NO_ACT, 0.0,
                  <floating*>y, &mean[0], &rstd[0])
    return max_offset(&mean[0], &rstd[0], m)


def layernorm_backward_addr(Py_ssize_t m, Py_ssize_t k, size_t dy, size_t x, const floating[::1] mean,
                            const floating[::1] rstd, size_t weight, size_t dx, size_t dweight, size_t dbias):
    _check(m, k, dy if x else 0, dx, mean.shape[0], rstd.shape[0])
    _backward_rows(<const floating*>dy, <const floating*>x, m, k, &mean[0], &rstd[0], <const floating*>weight, NULL,
                   NO_ACT, 0.0, <floating*>dx, <floating*>dweight, <floating*>dbias)


# --- 16-bit data (normkit.contract): uint16 patterns, fmt 0 bfloat16 / 1 float16; float32 parameters and stats ----
# The passes run on the 16-bit data in registers where the build allows (_common.pxd's normkit_row_* passes, shared
# with _rownorm.pyx); elsewhere each row goes tile by tile (TILE16 values widened to float32 on the stack) through
# the float32 loops above.

cdef void _forward_row16(const uint16_t* x, uint16_t* y, Py_ssize_t k, const float* w, const float* b, double eps,
                         int fmt, float* mean_out, float* rstd_out) noexcept nogil:
    cdef float t[TILE16]
    cdef double d[3][TILE16]
    cdef Py_ssize_t tile, j, n
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot16(x, fmt)
    cdef float m
    cdef int done
    moments16(x, k, fmt, pivot, &s1, &s2)
    finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
    mean_out[0] = <float>mean
    rstd_out[0] = <float>rstd
    m = <float>mean  # as _row_y
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        done = normkit_row_y16(x + j, y + j, n, fmt, w + j, b + j, True, m, <float>rstd,
                               <float>((<double>m - mean) * rstd))
        if done < 0:
            normkit_widen(x + j, t, n, fmt)
            _row_y(t, t, n, w + j, b + j, mean, rstd)
            done = normkit_narrow(t, y + j, n, fmt)
        if not done:  # again in double (see _common.affine16)
            normkit_widen(x + j, t, n, fmt)
            to_double(t, d[0], n)
            to_double(w + j, d[1], n)
            to_double(b + j, d[2], n)
            _row_y(d[0], d[0], n, d[1], d[2], mean, rstd)
            narrow64(d[0], y + j, n, fmt)


cdef void _row_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t k, const float* w, double mean, double rstd,
                      int fmt, float* accw, float* accb, double* sg, double* sgx) noexcept nogil:
    """grad_sums() of a run of a row into sg, sgx and, unless accw is NULL, _add_param_grads() into accw, accb."""
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef Py_ssize_t tile, j, n
    if normkit_row_sums16(dy, x, k, fmt, w, mean, rstd, accw, accb, sg, sgx) == 0:
        return
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        normkit_widen(dy + j, tdy, n, fmt)
        normkit_widen(x + j, tx, n, fmt)
        if accw != NULL:
            _add_param_grads(tdy, tx, n, mean, rstd, accw + j, accb + j)
        grad_sums(tdy, tx, w + j, n, mean, sg, sgx)


cdef void _row_dx16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t k, const float* w, double mean,
                    double rstd, double cb, double cc, int fmt) noexcept nogil:
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef double d[3][TILE16]
    cdef Py_ssize_t tile, j, n
    cdef int done
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        done = normkit_row_dx16(dy + j, NULL, x + j, dx + j, n, fmt, w + j, <float>mean, <float>rstd, <float>cb,
                                <float>cc)
        if done < 0:
            normkit_widen(dy + j, tdy, n, fmt)
            normkit_widen(x + j, tx, n, fmt)
            _row_dx(tdy, tx, tdy, n, w + j, mean, rstd, cb, cc)
            done = normkit_narrow(tdy, dx + j, n, fmt)
        if not done:  # again in double (see _common.affine16)
            normkit_widen(dy + j, tdy, n, fmt)
            normkit_widen(x + j, tx, n, fmt)
            to_double(tdy, d[0], n)
            to_double(tx, d[1], n)
            to_double(w + j, d[2], n)
            _row_dx(d[0], d[1], d[0], n, d[2], mean, rstd, cb, cc)
            narrow64(d[0], dx + j, n, fmt)


cdef void _backward_block16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t m0, Py_ssize_t m1,
                            Py_ssize_t k, const float* w, const float* mean, const float* rstd, int fmt,
                            double* partial, float* acc) noexcept nogil:
    """As _backward_block, with the parameter gradients and the row's sums taken in one visit of each tile."""
    cdef Py_ssize_t i, o
    cdef double sg, sgx, cb, cc
    if partial != NULL:
        memset(partial, 0, 2 * k * sizeof(double))
        memset(acc, 0, 2 * k * sizeof(float))
    for i in range(m0, m1):
        o = i * k
        sg = 0.0
        sgx = 0.0
        _row_sums16(dy + o, x + o, k, w, mean[i], rstd[i], fmt, acc if partial != NULL else NULL, acc + k, &sg, &sgx)
        _coefficients(sg, sgx, k, rstd[i], &cb, &cc)
        _row_dx16(dy + o, x + o, dx + o, k, w, mean[i], rstd[i], cb, cc, fmt)
        if partial != NULL and ((i + 1 - m0) % FLUSH == 0 or i + 1 == m1):
            _flush(acc, partial, 2 * k)


cdef void _forward16(int fmt, const uint16_t* xp, Py_ssize_t m, Py_ssize_t k, const float* w, const float* b,
                     double eps, uint16_t* yp, float* mp, float* rp):
    """The 16-bit forward of m rows of k values; w, b: NULL when absent."""
    cdef Py_ssize_t i
    cdef const float[::1] wv, bv
    if w == NULL:
        wv = np.ones(k, np.float32)
        w = &wv[0]
    if b == NULL:
        bv = np.zeros(k, np.float32)
        b = &bv[0]
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    for i in prange(m, nogil=True, schedule="static", num_threads=nt):
        _forward_row16(xp + i * k, yp + i * k, k, w, b, eps, fmt, mp + i, rp + i)


def layernorm_forward16(int fmt, const uint16_t[:, ::1] x, const float[::1] weight, const float[::1] bias,
                        double eps, uint16_t[:, ::1] y, float[::1] mean, float[::1] rstd):
    _forward16(fmt, &x[0, 0], x.shape[0], x.shape[1], NULL if weight is None else &weight[0],
               NULL if bias is None else &bias[0], eps, &y[0, 0], &mean[0], &rstd[0])


def layernorm_backward16(int fmt, const uint16_t[:, ::1] dy, const uint16_t[:, ::1] x, const float[::1] mean,
                         const float[::1] rstd, const float[::1] weight, uint16_t[:, ::1] dx, float[::1] dweight,
                         float[::1] dbias):
    _backward16(fmt, &dy[0, 0], &x[0, 0], x.shape[0], x.shape[1], &mean[0], &rstd[0],
                NULL if weight is None else &weight[0], &dx[0, 0], NULL if dweight is None else &dweight[0],
                NULL if dbias is None else &dbias[0])


cdef void _backward16(int fmt, const uint16_t* dyp, const uint16_t* xp, Py_ssize_t m, Py_ssize_t k, const float* mp,
                      const float* rp, const float* w, uint16_t* dxp, float* dwp, float* dbp):
    """layernorm_backward's schedules (see there), on 16-bit data (m, k); w, dwp, dbp: NULL when absent."""
    cdef Py_ssize_t i, j, t, per_block, blocks, tiles, n, group, q, g0, rows, r
    cdef bint params = dwp != NULL or dbp != NULL
    cdef const float[::1] wv
    if w == NULL:
        wv = np.ones(k, np.float32)
        w = &wv[0]
    cdef float* acc
    cdef double[::1] buf
    cdef double* grads
    cdef double* work
    cdef double* coef
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    if not params:
        blocks = min(m, MAX_BLOCKS)
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block16(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, mp, rp, fmt, NULL,
                              NULL)
        return
    if k > LONG_ROW or (k > TILED_ROW and m <= TILED_ROWS):
        # Groups of rows (each thread's share of their dy and x within ROW_GROUP_BYTES, in L2 between the group's
        # parallel passes), the threads sharing the tiles: each tile adds the group's rows in row order, the same
        # sums as one row at a time gave, with two parallel regions a group instead of two a row.
        tiles = (k + TILE - 1) // TILE
        group = min(m, max(1, ROW_GROUP_BYTES * nt // (2 * k * <Py_ssize_t>sizeof(uint16_t))))
        buf = _scratch(2 * k + 2 * tiles * group + 2 * group + (2 * k * sizeof(float) + 7) // 8)
        grads = &buf[0]
        work = grads + 2 * k
        coef = work + 2 * tiles * group
        acc = <float*>(coef + 2 * group)
        with nogil:
            for q in range((m + group - 1) // group):
                g0 = q * group
                rows = min(group, m - g0)
                for t in prange(tiles, schedule="static", num_threads=nt):
                    n = min(TILE, k - t * TILE)
                    if q == 0:
                        clear_sums(grads + t * TILE, acc + t * TILE, n)
                        clear_sums(grads + k + t * TILE, acc + k + t * TILE, n)
                    for r in range(rows):
                        i = g0 + r
                        work[2 * (t * rows + r)] = 0.0
                        work[2 * (t * rows + r) + 1] = 0.0
                        _row_sums16(dyp + i * k + t * TILE, xp + i * k + t * TILE, n, w + t * TILE, mp[i], rp[i],
                                    fmt, acc + t * TILE, acc + k + t * TILE, &work[2 * (t * rows + r)],
                                    &work[2 * (t * rows + r) + 1])
                        if i % FLUSH == FLUSH - 1 or i == m - 1:
                            _flush(acc + t * TILE, grads + t * TILE, n)
                            _flush(acc + k + t * TILE, grads + k + t * TILE, n)
                group_coefficients(work, tiles, rows, k, rp + g0, True, coef)
                for t in prange(tiles, schedule="static", num_threads=nt):
                    for r in range(rows):
                        i = g0 + r
                        _row_dx16(dyp + i * k + t * TILE, xp + i * k + t * TILE, dxp + i * k + t * TILE,
                                  min(TILE, k - t * TILE), w + t * TILE, mp[i], rp[i], coef[2 * r], coef[2 * r + 1],
                                  fmt)
    else:
        blocks = min(m, MAX_BLOCKS, max(1, PARTIAL_BUDGET // (2 * k)), max(FEW_BLOCKS, m // BLOCK_ROWS))
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        buf = _scratch(2 * k + blocks * 2 * k + (blocks * 2 * k * sizeof(float) + 7) // 8)
        grads = &buf[0]
        work = grads + 2 * k
        acc = <float*>(work + blocks * 2 * k)
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block16(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, mp, rp, fmt,
                              work + t * 2 * k, acc + t * 2 * k)
        tiles = (2 * k + TILE - 1) // TILE
        for t in prange(tiles, nogil=True, schedule="static", num_threads=nt):
            _merge_blocks(work, blocks, 2 * k, t * TILE, min(2 * k, (t + 1) * TILE), grads)
    store_grads(grads, k, dwp, dbp, TILE, nt)


# 16-bit address kernels: as the float ones, fmt first (as the array kernels); the data's addresses hold uint16
# patterns, weight, bias and the gradients float32

def layernorm_forward16_addr(int fmt, Py_ssize_t m, Py_ssize_t k, size_t x, size_t weight, size_t bias, double eps,
                             size_t y, float[::1] mean, float[::1] rstd):
    _check(m, k, x, y, mean.shape[0], rstd.shape[0])
    _forward16(fmt, <const uint16_t*>x, m, k, <const float*>weight, <const float*>bias, eps, <uint16_t*>y, &mean[0],
               &rstd[0])


def layernorm_backward16_addr(int fmt, Py_ssize_t m, Py_ssize_t k, size_t dy, size_t x, const float[::1] mean,
                              const float[::1] rstd, size_t weight, size_t dx, size_t dweight, size_t dbias):
    _check(m, k, dy if x else 0, dx, mean.shape[0], rstd.shape[0])
    _backward16(fmt, <const uint16_t*>dy, <const uint16_t*>x, m, k, &mean[0], &rstd[0], <const float*>weight,
                <uint16_t*>dx, <float*>dweight, <float*>dbias)
