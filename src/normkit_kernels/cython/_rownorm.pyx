# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""RMSNorm over the rows of an (M, K) array, and the fused residual add of both row ops: h = x + residual, then
LayerNorm or RMSNorm of h, in one pass over memory.

One row kernel serves the four forward kernels and one block kernel the four backward ones; ``centered`` says
whether a row's mean is subtracted and a bias added (LayerNorm) or not (RMSNorm). The fused forward writes a row
of h and reads it back from L1 for its statistics and y; the fused backward adds dh (the gradient flowing into h
from its other uses) where it writes dx. Rows are independent tasks. The parameter gradients are summed per fixed
block of rows (blocks depend on the shape only) and the blocks merged in order, as in _layernorm.pyx, so results
do not depend on the thread count. Rows longer than LONG_ROW that would make fewer than FEW_BLOCKS blocks (few
rows, or partial sums beyond PARTIAL_BUDGET), and up to TILED_ROWS rows longer than TILED_ROW with parameter
gradients, go in groups of rows instead, the threads sharing each group by tiles (_backward_tiles).
"""

import os
import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdint cimport uint16_t
from libc.string cimport memset

from _common cimport (
    PAIRS_MIN_ROW, ROW_GROUP_BYTES, SERIAL_MAX_VALUES, TILE16, TILED_ROW, TILED_ROWS, clear_sums, finish_moments,
    grad_sums, group_coefficients, moments, moments16, narrow64, normkit_half_init, normkit_narrow, normkit_row_dx16,
    normkit_row_sums16, normkit_row_y16, normkit_widen, pivot16, pivot_of, store_grads, threads_for, to_double,
)

# float16 converts with F16C where the CPU has it, unless NORMKIT_CYTHON_NO_F16C=1 (see _layernorm.pyx).
cdef int _f16c = normkit_half_init(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") in ("", "0"))
F16C = bool(_f16c)

# Per-block partial parameter gradients of all blocks together stay under this many doubles (8 MB).
cdef Py_ssize_t PARTIAL_BUDGET = 1 << 20
cdef Py_ssize_t MAX_BLOCKS = 64
# Rows per block, at least, once there are more than a few blocks (see _layernorm.pyx).
cdef Py_ssize_t BLOCK_ROWS = 64
cdef Py_ssize_t FEW_BLOCKS = 4
cdef Py_ssize_t TILE = 4096
# Rows longer than this that make fewer than FEW_BLOCKS blocks are shared by the threads tile by tile instead
# (_backward_tiles): as blocks of rows they ran on one thread each, and the whole kernel on one thread from rows of
# 2**20 values (RMSNorm with a weight gradient).
cdef Py_ssize_t LONG_ROW = 1 << 16
# So are up to TILED_ROWS rows over TILED_ROW values (_common.pxd) with parameter gradients.
# Parameter-gradient terms summed in the data's precision before they are added to the double sums.
cdef Py_ssize_t FLUSH = 16

cdef int _nthreads = 1
cdef Py_ssize_t _serial_max = SERIAL_MAX_VALUES
cdef Py_ssize_t _pairs_max = 0
_local = threading.local()


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


def set_serial_max_values(Py_ssize_t n):
    global _serial_max
    _serial_max = n


def set_pairs_max_bytes(Py_ssize_t n):
    """RMSNorm's backward takes rows two at a time (_backward_block) when dy, x and dx together are at most n
    bytes, as _layernorm's."""
    global _pairs_max
    _pairs_max = n


cdef extern from *:
    # sum(x**2) in double: RMSNorm's statistic, where there is nothing to cancel, so no pivot. With AVX four
    # registers of partial sums, as _common.pxd's moments(); the order of the additions is fixed by the code.
    """
    #if defined(__AVX__)
    #include <immintrin.h>
    #define NK_SQ_LOAD_F(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define NK_SQ_LOAD_D(p) _mm256_loadu_pd(p)
    #define NK_SUMSQ_BLOCKS(LOAD)                                                                     \
        __m256d z = _mm256_setzero_pd(), d0, d1, d2, d3, b0 = z, b1 = z, b2 = z, b3 = z;            \
        for (; i + 16 <= n; i += 16) {                                                              \
            d0 = LOAD(x + i); d1 = LOAD(x + i + 4); d2 = LOAD(x + i + 8); d3 = LOAD(x + i + 12);    \
            b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;                             \
        }                                                                                           \
        b0 = (b0 + b1) + (b2 + b3);                                                                 \
        t = (b0[0] + b0[1]) + (b0[2] + b0[3]);
    #else
    #define NK_SUMSQ_BLOCKS(LOAD)
    #endif
    #define NK_SUMSQ(NAME, T, LOAD, SCALAR)                                                           \
        static inline double NAME(const T* x, Py_ssize_t n) {                                       \
            double t = 0.0, d;                                                                      \
            Py_ssize_t i = 0;                                                                       \
            NK_SUMSQ_BLOCKS(LOAD)                                                                   \
            for (; i < n; i++) { d = SCALAR(x[i]); t += d * d; }                                    \
            return t;                                                                               \
        }
    #define NK_SQ_SAME(v) (v)
    NK_SUMSQ(normkit_sumsq_f, float, NK_SQ_LOAD_F, NK_SQ_SAME)
    NK_SUMSQ(normkit_sumsq_d, double, NK_SQ_LOAD_D, NK_SQ_SAME)

    /* sum(x**2) of 16-bit rows (fmt 0 bfloat16, 1 float16) straight from their bits where the build has AVX2, F16C
       and FMA (the x86-64-v3 one), widened in registers as _common.pxd's moments16: runs of 256 values summed in
       float32 (the square of a 16-bit value is exact there; 8 lanes rather than 4 doubles, four registers), each
       run then added in double, and a run whose float32 sum is not finite (squares beyond float32's range) summed
       again in double. Returns 0 where it does not apply (then the caller widens tile by tile). */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    #include <stdint.h>
    #include <string.h>
    #define NK_SQ_LOAD8_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(                                \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
    #define NK_SQ_LOAD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
    static inline float nk_sq_bf16(uint16_t h) {
        uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
    }
    #define NK_SQ8(LOAD8, A, j) v = LOAD8(x + (j)); A = _mm256_fmadd_ps(v, v, A);
    #define NK_SUMSQ16(NAME, LOAD8, SCALAR)                                                           \
        static inline double NAME(const uint16_t* x, Py_ssize_t n) {                                \
            double t = 0.0, d;                                                                      \
            float f, e;                                                                             \
            Py_ssize_t i0, i, end;                                                                  \
            __m256 z = _mm256_setzero_ps(), a0, a1, a2, a3, v;                                      \
            __m128 q;                                                                               \
            for (i0 = 0; i0 < n; i0 += 256) {                                                       \
                end = i0 + 256 < n ? i0 + 256 : n;                                                  \
                a0 = a1 = a2 = a3 = z;                                                              \
                for (i = i0; i + 32 <= end; i += 32) {                                              \
                    NK_SQ8(LOAD8, a0, i) NK_SQ8(LOAD8, a1, i + 8)                                   \
                    NK_SQ8(LOAD8, a2, i + 16) NK_SQ8(LOAD8, a3, i + 24)                             \
                }                                                                                   \
                for (; i + 8 <= end; i += 8) { NK_SQ8(LOAD8, a0, i) }                               \
                a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));                   \
                q = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));           \
                q = _mm_add_ps(q, _mm_movehl_ps(q, q));                                             \
                f = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));                               \
                for (; i < end; i++) { e = SCALAR(x[i]); f += e * e; }                              \
                if (__builtin_isfinite(f)) { t += f; continue; }                                    \
                for (i = i0; i < end; i++) { d = SCALAR(x[i]); t += d * d; }                        \
            }                                                                                       \
            return t;                                                                               \
        }
    NK_SUMSQ16(normkit_sumsq_bf16, NK_SQ_LOAD8_BF16, nk_sq_bf16)
    NK_SUMSQ16(normkit_sumsq_f16, NK_SQ_LOAD8_F16, _cvtsh_ss)
    #endif

    /* RMSNorm's dx of two rows (r * w * g + b * x: _row_dx with mean 0 and no constant term) and their weight
       terms g * (x * r) added into accw, in one loop; restrict, as _layernorm.pyx's NORMKIT_LN_DX_GRADS2, so that
       gcc vectorizes it without run-time overlap checks. The terms go through fma: written as products, gcc's
       -fassociative-math makes (g * x) * r of them, which overflows float32 for data near 1e20 (measured: NaN
       weight gradients); it does not reassociate into an fma. Where the build has no FMA instructions fma would be
       a library call, so there the rows go one at a time (NORMKIT_RMS_PAIRS 0). */
    #if defined(__FMA__)
    #define NORMKIT_RMS_PAIRS 1
    #define NORMKIT_RMS_DX_GRADS2(NAME, T, FMA)                                                         \
        static inline void NAME(const T* restrict dy, const T* restrict x, T* restrict dx, Py_ssize_t k, \
                                const T* restrict w, T r, T b, const T* restrict dy2,                   \
                                const T* restrict x2, T* restrict dx2, T r2, T b2, T* restrict accw) {  \
            for (Py_ssize_t j = 0; j < k; j++) {                                                        \
                T g = dy[j], xj = x[j], g2 = dy2[j], xj2 = x2[j], wj = w[j];                            \
                dx[j] = r * wj * g + b * xj;                                                            \
                dx2[j] = r2 * wj * g2 + b2 * xj2;                                                       \
                accw[j] = FMA(g2, xj2 * r2, FMA(g, xj * r, accw[j]));                                   \
            }                                                                                           \
        }
    NORMKIT_RMS_DX_GRADS2(normkit_rms_dx_grads2_f, float, __builtin_fmaf)
    NORMKIT_RMS_DX_GRADS2(normkit_rms_dx_grads2_d, double, __builtin_fma)
    #else
    #define NORMKIT_RMS_PAIRS 0
    static inline void normkit_rms_dx_grads2_f(const float* dy, const float* x, float* dx, Py_ssize_t k,
            const float* w, float r, float b, const float* dy2, const float* x2, float* dx2, float r2, float b2,
            float* accw) {}
    static inline void normkit_rms_dx_grads2_d(const double* dy, const double* x, double* dx, Py_ssize_t k,
            const double* w, double r, double b, const double* dy2, const double* x2, double* dx2, double r2,
            double b2, double* accw) {}
    #endif
    static int normkit_sumsq16(const uint16_t* x, Py_ssize_t n, int fmt, int f16c, double* out) {
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (fmt == 0) { *out = normkit_sumsq_bf16(x, n); return 1; }
        if (f16c) { *out = normkit_sumsq_f16(x, n); return 1; }
    #endif
        return 0;
    }

    /* The fused add's first pass over a 16-bit row straight from and to its bits where the build has AVX2 and
       F16C (as _common.pxd's normkit_row_y16 and the other row passes): h = x + r, the float32 sum rounded once.
       NORMKIT_STORE16's flags are not needed here: a float32 sum of two 16-bit values is finite, inf, or a NaN
       whose low 16 bits are zero, which bfloat16's integer rounding rounds exactly (F16C rounds float16). Returns
       -1 where it does not apply (float16 without F16C, or the baseline build); then the caller goes tile by tile. */
    #if defined(__AVX2__) && defined(__F16C__)
    static inline __attribute__((always_inline)) void nk_add16_loop(
            const uint16_t* x, const uint16_t* r, uint16_t* out, Py_ssize_t n, int fmt) {
        NORMKIT_STORE16_VARS
        __m256 v0, v1;
        uint16_t tx[16] = {0}, tr[16] = {0}, th[16];
        Py_ssize_t i = 0;
        #define NK_ADD16(X, R)                                                                            \
            v0 = _mm256_add_ps(normkit_load8(X, fmt), normkit_load8(R, fmt));                             \
            v1 = _mm256_add_ps(normkit_load8((X) + 8, fmt), normkit_load8((R) + 8, fmt));
        for (; i + 16 <= n; i += 16) {
            NK_ADD16(x + i, r + i)
            NORMKIT_STORE16(out + i)
        }
        if (i < n) {  /* through zero-padded buffers (0 + 0 is never flagged) */
            memcpy(tx, x + i, (size_t)(n - i) * 2);
            memcpy(tr, r + i, (size_t)(n - i) * 2);
            NK_ADD16(tx, tr)
            NORMKIT_STORE16(th)
            memcpy(out + i, th, (size_t)(n - i) * 2);
        }
        #undef NK_ADD16
    }

    static int nk_add16(const uint16_t* x, const uint16_t* r, uint16_t* h, Py_ssize_t n, int fmt) {
        if (fmt == 1 && !normkit_f16c) return -1;
        if (fmt) nk_add16_loop(x, r, h, n, 1); else nk_add16_loop(x, r, h, n, 0);
        return 0;
    }

    #else
    static int nk_add16(const uint16_t* x, const uint16_t* r, uint16_t* h, Py_ssize_t n, int fmt) { return -1; }
    #endif
    """
    double normkit_sumsq_f(const float* x, Py_ssize_t n) noexcept nogil
    double normkit_sumsq_d(const double* x, Py_ssize_t n) noexcept nogil
    bint normkit_sumsq16(const uint16_t* x, Py_ssize_t n, int fmt, int f16c, double* out) noexcept nogil
    bint NORMKIT_RMS_PAIRS
    void normkit_rms_dx_grads2_f(const float* dy, const float* x, float* dx, Py_ssize_t k, const float* w, float r,
                                 float b, const float* dy2, const float* x2, float* dx2, float r2, float b2,
                                 float* accw) noexcept nogil
    void normkit_rms_dx_grads2_d(const double* dy, const double* x, double* dx, Py_ssize_t k, const double* w,
                                 double r, double b, const double* dy2, const double* x2, double* dx2, double r2,
                                 double b2, double* accw) noexcept nogil
    int nk_add16(const uint16_t* x, const uint16_t* r, uint16_t* h, Py_ssize_t n, int fmt) noexcept nogil


cdef inline double _sumsq(const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return normkit_sumsq_f(x, n)
    else:
        return normkit_sumsq_d(x, n)


cdef double[::1] _scratch(Py_ssize_t n):
    """A work buffer of n doubles kept per calling thread (see _layernorm.pyx)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.buf = np.empty(n)
    return buf


# --- forward -----------------------------------------------------------------------------------------------------

cdef void _row_forward(const floating* x, const floating* res, floating* h, floating* y, Py_ssize_t k,
                       const floating* w, const floating* b, double eps, bint centered, floating* mean_out,
                       floating* rstd_out) noexcept nogil:
    """One row: h = x + res first when res is not NULL (then the rest reads h, from L1), the statistics in
    double, then y in the data's precision."""
    cdef Py_ssize_t j
    cdef const floating* src = x
    cdef double s1 = 0.0, s2 = 0.0, mean = 0.0, rstd, pivot
    if res != NULL:
        for j in range(k):
            h[j] = x[j] + res[j]
        src = h
    if centered:
        pivot = pivot_of(src[0])
        moments(src, k, pivot, &s1, &s2)
        finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
        mean_out[0] = <floating>mean
    else:
        rstd = 1.0 / sqrt(_sumsq(src, k) / k + eps)
    rstd_out[0] = <floating>rstd
    _row_y(src, y, k, w, b, mean, rstd, centered)


cdef inline void _row_y(const floating* src, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                        double mean, double rstd, bint centered) noexcept nogil:
    """y of a row (or a run of one) from its statistics, in the data's precision."""
    cdef Py_ssize_t j
    cdef floating m, c0, r = <floating>rstd
    if centered:
        # as _layernorm.pyx: the mean rounded to the data's precision, its rounding folded into c0
        m = <floating>mean
        c0 = <floating>((<double>m - mean) * rstd)
        for j in range(k):
            y[j] = ((src[j] - m) * r + c0) * w[j] + b[j]
    else:
        for j in range(k):
            y[j] = (src[j] * r) * w[j]


cdef void _forward(const floating* x, const floating* res, floating* h, floating* y, Py_ssize_t m, Py_ssize_t k,
                   const floating* w, const floating* b, double eps, bint centered, floating* mean,
                   floating* rstd) noexcept nogil:
    cdef Py_ssize_t i
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    for i in prange(m, schedule="static", num_threads=nt):
        _row_forward(x + i * k, res + i * k if res != NULL else NULL, h + i * k if h != NULL else NULL, y + i * k,
                     k, w, b, eps, centered, mean + i if mean != NULL else NULL, rstd + i)


# --- backward ----------------------------------------------------------------------------------------------------

cdef void _row_dx(const floating* dy, const floating* dh, const floating* x, floating* dx, Py_ssize_t k,
                  const floating* w, double mean, double rstd, double cb, double cc) noexcept nogil:
    """dx = rstd * w * dy + cb * (x - mean) + cc (+ dh), in the data's precision."""
    cdef floating m = <floating>mean, r = <floating>rstd, b = <floating>cb, c = <floating>cc
    cdef Py_ssize_t j
    if dh == NULL:
        for j in range(k):
            dx[j] = r * w[j] * dy[j] + b * (x[j] - m) + c
    else:
        for j in range(k):
            dx[j] = r * w[j] * dy[j] + b * (x[j] - m) + c + dh[j]


cdef void _add_param_grads(const floating* dy, const floating* x, Py_ssize_t k, double mean, double rstd,
                           floating* accw, floating* accb) noexcept nogil:
    """accw += dy * xhat and accb += dy, in the data's precision (flushed into double every FLUSH rows by the
    caller)."""
    cdef floating m = <floating>mean, r = <floating>rstd, g
    cdef Py_ssize_t j
    for j in range(k):
        g = dy[j]
        accw[j] += g * ((x[j] - m) * r)
        accb[j] += g


cdef void _add_weight_grads(const floating* dy, const floating* x, Py_ssize_t k, double rstd,
                            double* out) noexcept nogil:
    """out += dy * x * rstd in double, for an uncentered row: -fassociative-math may multiply dy * x first, which
    overflows float32 for values near 1e20 but never double (a centered row's x - mean keeps that order)."""
    cdef Py_ssize_t j
    for j in range(k):
        out[j] += <double>dy[j] * (<double>x[j] * rstd)


cdef void _flush(floating* acc, double* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] += acc[j]
        acc[j] = 0


cdef void _backward_block(const floating* dy, const floating* dh, const floating* x, floating* dx, Py_ssize_t m0,
                          Py_ssize_t m1, Py_ssize_t k, const floating* w, const floating* mean,
                          const floating* rstd, bint centered, double* partial, floating* acc,
                          bint pairs) noexcept nogil:
    """Rows m0..m1-1. Unless partial is NULL, their parameter gradients go to partial[0:k] (weight) and, when
    centered, partial[k:2k] (bias): through the accumulators acc in the data's precision when centered, directly
    in double when not (see _add_weight_grads). The loops of a row in
    _layernorm.pyx's order: parameter gradients (the one that reads dy and x from memory), the row's sums, dx.
    With pairs, an uncentered block with parameter gradients and no dh (RMSNorm's backward) goes two rows at a
    time as _layernorm's: each row's sums, then both rows' dx and weight terms in one loop
    (normkit_rms_dx_grads2, where the build has FMA), through acc, flushed every FLUSH rows."""
    cdef Py_ssize_t i, o, q, n = 2 * k if centered else k
    cdef double sg, sgx, mi, r
    cdef double cb[2]
    if partial != NULL:
        memset(partial, 0, n * sizeof(double))
        memset(acc, 0, n * sizeof(floating))
    if NORMKIT_RMS_PAIRS and pairs and partial != NULL and not centered and dh == NULL:
        for i in range(m0, m1 - 1, 2):
            for q in range(2):
                o = (i + q) * k
                sg = 0.0
                sgx = 0.0
                grad_sums(dy + o, x + o, w, k, 0.0, &sg, &sgx)
                r = rstd[i + q]  # in double: rstd**3 underflows float32 for data near 1e20
                cb[q] = -r * r * r * sgx / k
            o = i * k
            if floating is float:
                normkit_rms_dx_grads2_f(dy + o, x + o, dx + o, k, w, rstd[i], <float>cb[0], dy + o + k, x + o + k,
                                        dx + o + k, rstd[i + 1], <float>cb[1], acc)
            else:
                normkit_rms_dx_grads2_d(dy + o, x + o, dx + o, k, w, rstd[i], cb[0], dy + o + k, x + o + k,
                                        dx + o + k, rstd[i + 1], cb[1], acc)
            if (i + 2 - m0) % FLUSH == 0 or i + 2 >= m1 - 1:
                _flush(acc, partial, k)
        if (m1 - m0) % 2 == 0:
            return
        m0 = m1 - 1  # the row without a pair: the loops below
    for i in range(m0, m1):
        o = i * k
        mi = mean[i] if centered else 0.0
        r = rstd[i]
        if partial != NULL and centered:
            _add_param_grads(dy + o, x + o, k, mi, r, acc, acc + k)
        elif partial != NULL:
            _add_weight_grads(dy + o, x + o, k, r, partial)
        sg = 0.0
        sgx = 0.0
        grad_sums(dy + o, x + o, w, k, mi, &sg, &sgx)
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); an uncentered row has no mean(g) term
        _row_dx(dy + o, dh + o if dh != NULL else NULL, x + o, dx + o, k, w, mi, r, -r * r * r * sgx / k,
                -r * sg / k if centered else 0.0)
        if partial != NULL and centered and ((i + 1 - m0) % FLUSH == 0 or i + 1 == m1):
            _flush(acc, partial, n)


cdef void _merge_blocks(const double* partial, Py_ssize_t blocks, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1,
                        double* out) noexcept nogil:
    """out[j] = sum over blocks, in block order, of partial[block, j] for j0 <= j < j1 (rows of length n)."""
    cdef Py_ssize_t t, j
    for j in range(j0, j1):
        out[j] = 0.0
    for t in range(blocks):
        for j in range(j0, j1):
            out[j] += partial[t * n + j]


cdef Py_ssize_t _plan(Py_ssize_t m, Py_ssize_t k, bint centered, bint params, size_t item, size_t acc_item,
                      int nt, Py_ssize_t* per_block, double** grads, double** work, char** acc):
    """The backward's schedule, chosen from the shape alone (so that results do not depend on the thread count), and
    its scratch, for both data types (item: the data's bytes per value). Returns how many blocks of rows of
    per_block rows each, or 0 for rows shared by tiles (_backward_tiles, in groups of per_block rows: a group's
    size, which follows the thread count, changes no result; see LONG_ROW and TILED_ROW). The calling thread's
    scratch (_scratch, alive until its next use) holds n doubles of gradients (weight, then bias when centered),
    the work area (n partial sums per block, or 2 sums per tile and row of a group, then 2 coefficients per row of a
    group), then n accumulators of acc_item bytes per block (one set for the tiles, which clear it and the
    gradients in the first group). Blocks without parameter gradients need no scratch."""
    cdef Py_ssize_t n = 2 * k if centered else k, blocks, work_n, sets
    cdef double[::1] buf
    if not params:
        blocks = min(m, MAX_BLOCKS)
    else:
        blocks = min(m, MAX_BLOCKS, max(1, PARTIAL_BUDGET // n), max(FEW_BLOCKS, m // BLOCK_ROWS))
    if (k > LONG_ROW and blocks < FEW_BLOCKS) or (params and k > TILED_ROW and m <= TILED_ROWS):
        per_block[0] = min(m, max(1, ROW_GROUP_BYTES * nt // (2 * k * <Py_ssize_t>item)))
        blocks, work_n, sets = 0, 2 * per_block[0] * ((k + TILE - 1) // TILE + 1), 1
    else:
        per_block[0] = (m + blocks - 1) // blocks
        blocks = (m + per_block[0] - 1) // per_block[0]
        if not params:
            return blocks
        work_n, sets = blocks * n, blocks
    buf = _scratch(n + work_n + (sets * n * acc_item + 7) // 8)
    grads[0] = &buf[0]
    work[0] = grads[0] + n
    acc[0] = <char*>(work[0] + work_n)
    return blocks


cdef void _backward_tiles(const floating* dy, const floating* dh, const floating* x, floating* dx, Py_ssize_t m,
                          Py_ssize_t k, const floating* w, const floating* mean, const floating* rstd, bint centered,
                          Py_ssize_t group, double* grads, floating* acc, double* work, int nt) noexcept nogil:
    """The backward of long rows in groups of ``group`` rows, the threads sharing each group by tiles of TILE
    columns, two parallel regions a group: each tile's parameter-gradient terms of the group's rows in row order
    (as _backward_block's, into grads unless it is NULL, through acc when centered) and their sums (into work, 2
    per tile and row); then each row's sums added in tile order; then each tile's dx of the group's rows. The
    group's dy and x stay in cache between the two regions (ROW_GROUP_BYTES)."""
    cdef Py_ssize_t i, t, j, n, q, g0, rows, tiles = (k + TILE - 1) // TILE
    cdef double* coef = work + 2 * group * tiles
    for q in range((m + group - 1) // group):
        g0 = q * group
        rows = min(group, m - g0)
        for t in prange(tiles, schedule="static", num_threads=nt):
            j = t * TILE
            n = min(TILE, k - j)
            if grads != NULL and q == 0:
                clear_sums(grads + j, acc + j, n)
                if centered:
                    clear_sums(grads + k + j, acc + k + j, n)
            for i in range(g0, g0 + rows):
                if grads != NULL and centered:
                    _add_param_grads(dy + i * k + j, x + i * k + j, n, mean[i], rstd[i], acc + j, acc + k + j)
                    if (i + 1) % FLUSH == 0 or i + 1 == m:
                        _flush(acc + j, grads + j, n)
                        _flush(acc + k + j, grads + k + j, n)
                elif grads != NULL:
                    _add_weight_grads(dy + i * k + j, x + i * k + j, n, rstd[i], grads + j)
                work[2 * (t * rows + i - g0)] = 0.0
                work[2 * (t * rows + i - g0) + 1] = 0.0
                grad_sums(dy + i * k + j, x + i * k + j, w + j, n, mean[i] if centered else 0.0,
                          &work[2 * (t * rows + i - g0)], &work[2 * (t * rows + i - g0) + 1])
        group_coefficients(work, tiles, rows, k, rstd + g0, centered, coef)
        for t in prange(tiles, schedule="static", num_threads=nt):
            j = t * TILE
            for i in range(g0, g0 + rows):
                _row_dx(dy + i * k + j, dh + i * k + j if dh != NULL else NULL, x + i * k + j, dx + i * k + j,
                        min(TILE, k - j), w + j, mean[i] if centered else 0.0, rstd[i], coef[2 * (i - g0)],
                        coef[2 * (i - g0) + 1])


cdef void _backward(const floating* dy, const floating* dh, const floating* x, floating* dx, Py_ssize_t m,
                    Py_ssize_t k, const floating* w, const floating* mean, const floating* rstd, bint centered,
                    floating* dweight, floating* dbias):
    """dweight / dbias: NULL when not wanted."""
    cdef Py_ssize_t j, t, per_block, tiles, n = 2 * k if centered else k
    cdef bint params = dweight != NULL or dbias != NULL
    cdef double* grads = NULL
    cdef double* work = NULL
    cdef char* acc = NULL
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    cdef Py_ssize_t blocks = _plan(m, k, centered, params, sizeof(floating), sizeof(floating), nt, &per_block,
                                   &grads, &work, &acc)
    if blocks == 0:
        with nogil:
            _backward_tiles(dy, dh, x, dx, m, k, w, mean, rstd, centered, per_block, grads if params else NULL,
                            <floating*>acc, work, nt)
    elif not params:
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dy, dh, x, dx, t * per_block, min(m, (t + 1) * per_block), k, w, mean, rstd, centered,
                            NULL, NULL, False)
    else:
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dy, dh, x, dx, t * per_block, min(m, (t + 1) * per_block), k, w, mean, rstd, centered,
                            work + t * n, <floating*>acc + t * n,
                            k >= PAIRS_MIN_ROW and 3 * m * k * <Py_ssize_t>sizeof(floating) <= _pairs_max)
        tiles = (n + TILE - 1) // TILE
        for t in prange(tiles, nogil=True, schedule="static", num_threads=nt):
            _merge_blocks(work, blocks, n, t * TILE, min(n, (t + 1) * TILE), grads)
    if not params:
        return
    store_grads(grads, k, dweight, dbias, TILE, nt)


# --- the contract's kernels --------------------------------------------------------------------------------------

cdef const floating* _ones(const floating[::1] weight, Py_ssize_t k, list keep):
    """weight's data, or a row of ones (kept alive in ``keep``) when there is none: one loop serves both."""
    cdef const floating[::1] wv = weight
    if wv is None:
        wv = np.ones(k, np.float32 if floating is float else np.float64)
        keep.append(wv)
    return &wv[0]


cdef const floating* _zeros(const floating[::1] bias, Py_ssize_t k, list keep):
    cdef const floating[::1] bv = bias
    if bv is None:
        bv = np.zeros(k, np.float32 if floating is float else np.float64)
        keep.append(bv)
    return &bv[0]


def rmsnorm_forward(const floating[:, ::1] x, const floating[::1] weight, double eps, floating[:, ::1] y,
                    floating[::1] rstd):
    keep = []
    cdef const floating* w = _ones(weight, x.shape[1], keep)
    with nogil:
        _forward(&x[0, 0], NULL, NULL, &y[0, 0], x.shape[0], x.shape[1], w, NULL, eps, False, NULL, &rstd[0])


def rmsnorm_add_forward(const floating[:, ::1] x, const floating[:, ::1] residual, const floating[::1] weight,
                        double eps, floating[:, ::1] y, floating[:, ::1] h, floating[::1] rstd):
    keep = []
    cdef const floating* w = _ones(weight, x.shape[1], keep)
    with nogil:
        _forward(&x[0, 0], &residual[0, 0], &h[0, 0], &y[0, 0], x.shape[0], x.shape[1], w, NULL, eps, False, NULL,
                 &rstd[0])


def layernorm_add_forward(const floating[:, ::1] x, const floating[:, ::1] residual, const floating[::1] weight,
                          const floating[::1] bias, double eps, floating[:, ::1] y, floating[:, ::1] h,
                          floating[::1] mean, floating[::1] rstd):
    keep = []
    cdef const floating* w = _ones(weight, x.shape[1], keep)
    cdef const floating* b = _zeros(bias, x.shape[1], keep)
    with nogil:
        _forward(&x[0, 0], &residual[0, 0], &h[0, 0], &y[0, 0], x.shape[0], x.shape[1], w, b, eps, True, &mean[0],
                 &rstd[0])


cdef floating* _out(floating[::1] a):
    """An optional output's data, or NULL."""
    return &a[0] if a is not None else NULL


def rmsnorm_backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] rstd,
                     const floating[::1] weight, floating[:, ::1] dx, floating[::1] dweight):
    keep = []
    _backward(&dy[0, 0], NULL, &x[0, 0], &dx[0, 0], x.shape[0], x.shape[1], _ones(weight, x.shape[1], keep), NULL,
              &rstd[0], False, _out(dweight), NULL)


def rmsnorm_add_backward(const floating[:, ::1] dy, const floating[:, ::1] dh, const floating[:, ::1] h,
                         const floating[::1] rstd, const floating[::1] weight, floating[:, ::1] dx,
                         floating[::1] dweight):
    keep = []
    _backward(&dy[0, 0], &dh[0, 0] if dh is not None else NULL, &h[0, 0], &dx[0, 0], h.shape[0], h.shape[1],
              _ones(weight, h.shape[1], keep), NULL, &rstd[0], False, _out(dweight), NULL)


def layernorm_add_backward(const floating[:, ::1] dy, const floating[:, ::1] dh, const floating[:, ::1] h,
                           const floating[::1] mean, const floating[::1] rstd, const floating[::1] weight,
                           floating[:, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    keep = []
    _backward(&dy[0, 0], &dh[0, 0] if dh is not None else NULL, &h[0, 0], &dx[0, 0], h.shape[0], h.shape[1],
              _ones(weight, h.shape[1], keep), &mean[0], &rstd[0], True, _out(dweight), _out(dbias))


# --- address kernels (normkit.contract): the plain kernels on memory given by address ----------------------------

cdef int _check(Py_ssize_t m, Py_ssize_t k, size_t x, size_t out, Py_ssize_t rstd_rows) except -1:
    # what can be checked without the arrays: the shapes against each other, data addresses not NULL
    if m < 1 or k < 1 or x == 0 or out == 0:
        raise ValueError(f"address kernel: bad shape ({m}, {k}) or a NULL data address")
    if rstd_rows != m:
        raise ValueError(f"address kernel: rstd must be ({m},), got ({rstd_rows},)")
    return 0


def rmsnorm_forward_addr(Py_ssize_t m, Py_ssize_t k, size_t x, size_t weight, double eps, size_t y,
                         floating[::1] rstd):
    _check(m, k, x, y, rstd.shape[0])
    cdef const floating[::1] no_weight = None
    keep = []
    cdef const floating* w = <const floating*>weight if weight else _ones(no_weight, k, keep)
    with nogil:
        _forward(<const floating*>x, NULL, NULL, <floating*>y, m, k, w, NULL, eps, False, NULL, &rstd[0])


def rmsnorm_backward_addr(Py_ssize_t m, Py_ssize_t k, size_t dy, size_t x, const floating[::1] rstd, size_t weight,
                          size_t dx, size_t dweight):
    _check(m, k, dy if x else 0, dx, rstd.shape[0])
    cdef const floating[::1] no_weight = None
    keep = []
    cdef const floating* w = <const floating*>weight if weight else _ones(no_weight, k, keep)
    _backward(<const floating*>dy, NULL, <const floating*>x, <floating*>dx, m, k, w, NULL, &rstd[0], False,
              <floating*>dweight, NULL)


# --- 16-bit data (normkit.contract): uint16 patterns, fmt 0 bfloat16 / 1 float16; float32 parameters and stats ----
# As _layernorm.pyx's: each row goes tile by tile (TILE16 values widened to float32 on the stack) through the float32
# loops above, each 16-bit output rounded once; a tile whose float32 result is not finite is computed again in
# double (see _common.affine16).

cdef double _sumsq16(const uint16_t* x, Py_ssize_t n, int fmt) noexcept nogil:
    cdef float t[TILE16]
    cdef double s = 0.0
    cdef Py_ssize_t tile, i, k
    if normkit_sumsq16(x, n, fmt, _f16c, &s):
        return s
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        normkit_widen(x + i, t, k, fmt)
        s += normkit_sumsq_f(t, k)
    return s


cdef void _add16(const uint16_t* x, const uint16_t* res, uint16_t* h, Py_ssize_t k, int fmt) noexcept nogil:
    """h = x + res, the float32 sum rounded once."""
    cdef float t[TILE16]
    cdef float u[TILE16]
    cdef Py_ssize_t tile, i, j, n
    if nk_add16(x, res, h, k, fmt) == 0:
        return
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        normkit_widen(x + j, t, n, fmt)
        normkit_widen(res + j, u, n, fmt)
        for i in range(n):
            t[i] = t[i] + u[i]
        normkit_narrow(t, h + j, n, fmt)  # float32 overflows only where the 16-bit sum is inf too


cdef void _row_forward16(const uint16_t* x, const uint16_t* res, uint16_t* h, uint16_t* y, Py_ssize_t k,
                         const float* w, const float* b, double eps, bint centered, int fmt, float* mean_out,
                         float* rstd_out) noexcept nogil:
    """_row_forward on 16-bit data. With res, h = x + res rounded to 16 bits is written first and then normalized,
    as the contract asks (what a 16-bit add then the norm computes, and what backward, which reads h, assumes);
    the row is then in L1 or L2 for the statistics and y passes."""
    cdef float t[TILE16]
    cdef double d[3][TILE16]
    cdef double s1 = 0.0, s2 = 0.0, mean = 0.0, rstd, pivot
    cdef float m = 0.0, r, c0 = 0.0
    cdef Py_ssize_t tile, j, n
    cdef int done
    if res != NULL:
        _add16(x, res, h, k, fmt)
        x = h
    if centered:
        pivot = pivot16(x, fmt)
        moments16(x, k, fmt, pivot, &s1, &s2)
        finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
        mean_out[0] = <float>mean
        # as _row_y
        m = <float>mean
        c0 = <float>((<double>m - mean) * rstd)
    else:
        rstd = 1.0 / sqrt(_sumsq16(x, k, fmt) / k + eps)
    rstd_out[0] = <float>rstd
    r = <float>rstd
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        done = normkit_row_y16(x + j, y + j, n, fmt, w + j, b + j if centered else NULL, centered, m, r, c0)
        if done < 0:
            normkit_widen(x + j, t, n, fmt)
            _row_y(t, t, n, w + j, b + j if centered else NULL, mean, rstd, centered)
            done = normkit_narrow(t, y + j, n, fmt)
        if not done:  # again in double (see _common.affine16)
            normkit_widen(x + j, t, n, fmt)
            to_double(t, d[0], n)
            to_double(w + j, d[1], n)
            if centered:
                to_double(b + j, d[2], n)
            _row_y(d[0], d[0], n, d[1], d[2], mean, rstd, centered)
            narrow64(d[0], y + j, n, fmt)


cdef void _forward16(const uint16_t* x, const uint16_t* res, uint16_t* h, uint16_t* y, Py_ssize_t m,
                     Py_ssize_t k, const float* w, const float* b, double eps, bint centered, int fmt, float* mean,
                     float* rstd) noexcept nogil:
    cdef Py_ssize_t i
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    for i in prange(m, schedule="static", num_threads=nt):
        _row_forward16(x + i * k, res + i * k if res != NULL else NULL, h + i * k if h != NULL else NULL,
                       y + i * k, k, w, b, eps, centered, fmt, mean + i if mean != NULL else NULL, rstd + i)


cdef void _row_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t k, const float* w, double mean,
                      double rstd, int fmt, bint centered, double* partial, float* accw, float* accb, double* sg,
                      double* sgx) noexcept nogil:
    """A run of a row: its grad_sums() into sg, sgx and, unless accw is NULL, its parameter gradients, taken in one
    visit of each tile. The native 16-bit loop adds them into the float32 accumulators accw (weight) and, for a
    centered row, accb (bias); the tile loops here add a centered row's there too, an uncentered row's weight into
    partial in double (see _add_weight_grads)."""
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef Py_ssize_t tile, j, n
    if normkit_row_sums16(dy, x, k, fmt, w, mean, rstd, accw, accb if accw != NULL and centered else NULL, sg,
                          sgx) == 0:
        return
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        normkit_widen(dy + j, tdy, n, fmt)
        normkit_widen(x + j, tx, n, fmt)
        if accw != NULL and centered:
            _add_param_grads(tdy, tx, n, mean, rstd, accw + j, accb + j)
        elif accw != NULL:
            _add_weight_grads(tdy, tx, n, rstd, partial + j)
        grad_sums(tdy, tx, w + j, n, mean, sg, sgx)


cdef void _row_dx16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t k,
                    const float* w, double mean, double rstd, double cb, double cc, int fmt) noexcept nogil:
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef float th[TILE16]
    cdef double d[4][TILE16]
    cdef Py_ssize_t tile, j, n
    cdef int done
    for tile in range((k + TILE16 - 1) // TILE16):
        j = tile * TILE16
        n = min(TILE16, k - j)
        done = normkit_row_dx16(dy + j, dh + j if dh != NULL else NULL, x + j, dx + j, n, fmt, w + j, <float>mean,
                           <float>rstd, <float>cb, <float>cc)
        if done < 0:
            normkit_widen(dy + j, tdy, n, fmt)
            normkit_widen(x + j, tx, n, fmt)
            if dh != NULL:
                normkit_widen(dh + j, th, n, fmt)
            _row_dx(tdy, th if dh != NULL else NULL, tx, tdy, n, w + j, mean, rstd, cb, cc)
            done = normkit_narrow(tdy, dx + j, n, fmt)
        if not done:  # again in double (see _common.affine16)
            normkit_widen(dy + j, tdy, n, fmt)
            normkit_widen(x + j, tx, n, fmt)
            if dh != NULL:
                normkit_widen(dh + j, th, n, fmt)
            to_double(tdy, d[0], n)
            to_double(tx, d[1], n)
            to_double(w + j, d[2], n)
            if dh != NULL:
                to_double(th, d[3], n)
            _row_dx(d[0], d[3] if dh != NULL else NULL, d[1], d[0], n, d[2], mean, rstd, cb, cc)
            narrow64(d[0], dx + j, n, fmt)


cdef void _backward_block16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t m0,
                            Py_ssize_t m1, Py_ssize_t k, const float* w, const float* mean, const float* rstd,
                            bint centered, int fmt, double* partial, float* acc) noexcept nogil:
    """_backward_block on 16-bit data: per row, _row_sums16 then _row_dx16. The parameter gradients go through the
    float32 accumulators acc for uncentered rows too (flushed into partial every FLUSH rows, as centered ones; the
    tile loops add an uncentered row's into partial directly, and acc stays zero)."""
    cdef Py_ssize_t i, o, n = 2 * k if centered else k
    cdef double sg, sgx, mi, r
    if partial != NULL:
        memset(partial, 0, n * sizeof(double))
        memset(acc, 0, n * sizeof(float))
    for i in range(m0, m1):
        o = i * k
        mi = mean[i] if centered else 0.0
        r = rstd[i]
        sg = 0.0
        sgx = 0.0
        _row_sums16(dy + o, x + o, k, w, mi, r, fmt, centered, partial, acc if partial != NULL else NULL,
                    acc + k if partial != NULL else NULL, &sg, &sgx)
        _row_dx16(dy + o, dh + o if dh != NULL else NULL, x + o, dx + o, k, w, mi, r, -r * r * r * sgx / k,
                  -r * sg / k if centered else 0.0, fmt)
        if partial != NULL and ((i + 1 - m0) % FLUSH == 0 or i + 1 == m1):
            _flush(acc, partial, n)


cdef void _backward_tiles16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t m,
                            Py_ssize_t k, const float* w, const float* mean, const float* rstd, bint centered,
                            int fmt, Py_ssize_t group, double* grads, float* acc, double* work,
                            int nt) noexcept nogil:
    """_backward_tiles on 16-bit data (the parameter gradients through acc as _backward_block16's)."""
    cdef Py_ssize_t i, t, j, n, q, g0, rows, tiles = (k + TILE - 1) // TILE
    cdef double* coef = work + 2 * group * tiles
    for q in range((m + group - 1) // group):
        g0 = q * group
        rows = min(group, m - g0)
        for t in prange(tiles, schedule="static", num_threads=nt):
            j = t * TILE
            n = min(TILE, k - j)
            if grads != NULL and q == 0:
                clear_sums(grads + j, acc + j, n)
                if centered:
                    clear_sums(grads + k + j, acc + k + j, n)
            for i in range(g0, g0 + rows):
                work[2 * (t * rows + i - g0)] = 0.0
                work[2 * (t * rows + i - g0) + 1] = 0.0
                _row_sums16(dy + i * k + j, x + i * k + j, n, w + j, mean[i] if centered else 0.0, rstd[i], fmt,
                            centered, grads + j if grads != NULL else NULL, acc + j if grads != NULL else NULL,
                            acc + k + j if grads != NULL and centered else NULL, &work[2 * (t * rows + i - g0)],
                            &work[2 * (t * rows + i - g0) + 1])
                if grads != NULL and ((i + 1) % FLUSH == 0 or i + 1 == m):
                    _flush(acc + j, grads + j, n)
                    if centered:
                        _flush(acc + k + j, grads + k + j, n)
        group_coefficients(work, tiles, rows, k, rstd + g0, centered, coef)
        for t in prange(tiles, schedule="static", num_threads=nt):
            j = t * TILE
            for i in range(g0, g0 + rows):
                _row_dx16(dy + i * k + j, dh + i * k + j if dh != NULL else NULL, x + i * k + j, dx + i * k + j,
                          min(TILE, k - j), w + j, mean[i] if centered else 0.0, rstd[i], coef[2 * (i - g0)],
                          coef[2 * (i - g0) + 1], fmt)


cdef void _backward16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t m,
                      Py_ssize_t k, const float* w, const float* mean, const float* rstd, bint centered, int fmt,
                      float* dweight, float* dbias):
    """_backward's schedules (see there) on 16-bit data."""
    cdef Py_ssize_t j, t, per_block, tiles, n = 2 * k if centered else k
    cdef bint params = dweight != NULL or dbias != NULL
    cdef double* grads = NULL
    cdef double* work = NULL
    cdef char* acc = NULL
    cdef int nt = threads_for(m * k, _nthreads, _serial_max)
    cdef Py_ssize_t blocks = _plan(m, k, centered, params, sizeof(uint16_t), sizeof(float), nt, &per_block, &grads,
                                   &work, &acc)
    if blocks == 0:
        with nogil:
            _backward_tiles16(dy, dh, x, dx, m, k, w, mean, rstd, centered, fmt, per_block, grads if params else NULL,
                              <float*>acc, work, nt)
    elif not params:
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block16(dy, dh, x, dx, t * per_block, min(m, (t + 1) * per_block), k, w, mean, rstd,
                              centered, fmt, NULL, NULL)
    else:
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block16(dy, dh, x, dx, t * per_block, min(m, (t + 1) * per_block), k, w, mean, rstd,
                              centered, fmt, work + t * n, <float*>acc + t * n)
        tiles = (n + TILE - 1) // TILE
        for t in prange(tiles, nogil=True, schedule="static", num_threads=nt):
            _merge_blocks(work, blocks, n, t * TILE, min(n, (t + 1) * TILE), grads)
    if not params:
        return
    store_grads(grads, k, dweight, dbias, TILE, nt)


def rmsnorm_forward16(int fmt, const uint16_t[:, ::1] x, const float[::1] weight, double eps, uint16_t[:, ::1] y,
                      float[::1] rstd):
    keep = []
    cdef const float* w = _ones(weight, x.shape[1], keep)
    with nogil:
        _forward16(&x[0, 0], NULL, NULL, &y[0, 0], x.shape[0], x.shape[1], w, NULL, eps, False, fmt, NULL, &rstd[0])


def rmsnorm_add_forward16(int fmt, const uint16_t[:, ::1] x, const uint16_t[:, ::1] residual,
                          const float[::1] weight, double eps, uint16_t[:, ::1] y, uint16_t[:, ::1] h,
                          float[::1] rstd):
    keep = []
    cdef const float* w = _ones(weight, x.shape[1], keep)
    with nogil:
        _forward16(&x[0, 0], &residual[0, 0], &h[0, 0], &y[0, 0], x.shape[0], x.shape[1], w, NULL, eps, False, fmt,
                   NULL, &rstd[0])


def layernorm_add_forward16(int fmt, const uint16_t[:, ::1] x, const uint16_t[:, ::1] residual,
                            const float[::1] weight, const float[::1] bias, double eps, uint16_t[:, ::1] y,
                            uint16_t[:, ::1] h, float[::1] mean, float[::1] rstd):
    keep = []
    cdef const float* w = _ones(weight, x.shape[1], keep)
    cdef const float* b = _zeros(bias, x.shape[1], keep)
    with nogil:
        _forward16(&x[0, 0], &residual[0, 0], &h[0, 0], &y[0, 0], x.shape[0], x.shape[1], w, b, eps, True, fmt,
                   &mean[0], &rstd[0])


def rmsnorm_backward16(int fmt, const uint16_t[:, ::1] dy, const uint16_t[:, ::1] x, const float[::1] rstd,
                       const float[::1] weight, uint16_t[:, ::1] dx, float[::1] dweight):
    keep = []
    _backward16(&dy[0, 0], NULL, &x[0, 0], &dx[0, 0], x.shape[0], x.shape[1], _ones(weight, x.shape[1], keep), NULL,
                &rstd[0], False, fmt, _out(dweight), NULL)


def rmsnorm_add_backward16(int fmt, const uint16_t[:, ::1] dy, const uint16_t[:, ::1] dh, const uint16_t[:, ::1] h,
                           const float[::1] rstd, const float[::1] weight, uint16_t[:, ::1] dx, float[::1] dweight):
    keep = []
    _backward16(&dy[0, 0], &dh[0, 0] if dh is not None else NULL, &h[0, 0], &dx[0, 0], h.shape[0], h.shape[1],
                _ones(weight, h.shape[1], keep), NULL, &rstd[0], False, fmt, _out(dweight), NULL)


def layernorm_add_backward16(int fmt, const uint16_t[:, ::1] dy, const uint16_t[:, ::1] dh,
                             const uint16_t[:, ::1] h, const float[::1] mean, const float[::1] rstd,
                             const float[::1] weight, uint16_t[:, ::1] dx, float[::1] dweight, float[::1] dbias):
    keep = []
    _backward16(&dy[0, 0], &dh[0, 0] if dh is not None else NULL, &h[0, 0], &dx[0, 0], h.shape[0], h.shape[1],
                _ones(weight, h.shape[1], keep), &mean[0], &rstd[0], True, fmt, _out(dweight), _out(dbias))


# 16-bit address kernels: as the float ones, fmt first (as the array kernels); the data's addresses hold uint16
# patterns, weight and its gradient float32

def rmsnorm_forward16_addr(int fmt, Py_ssize_t m, Py_ssize_t k, size_t x, size_t weight, double eps, size_t y,
                           float[::1] rstd):
    _check(m, k, x, y, rstd.shape[0])
    cdef const float[::1] no_weight = None
    keep = []
    cdef const float* w = <const float*>weight if weight else _ones(no_weight, k, keep)
    with nogil:
        _forward16(<const uint16_t*>x, NULL, NULL, <uint16_t*>y, m, k, w, NULL, eps, False, fmt, NULL, &rstd[0])


def rmsnorm_backward16_addr(int fmt, Py_ssize_t m, Py_ssize_t k, size_t dy, size_t x, const float[::1] rstd,
                            size_t weight, size_t dx, size_t dweight):
    _check(m, k, dy if x else 0, dx, rstd.shape[0])
    cdef const float[::1] no_weight = None
    keep = []
    cdef const float* w = <const float*>weight if weight else _ones(no_weight, k, keep)
    _backward16(<const uint16_t*>dy, NULL, <const uint16_t*>x, <uint16_t*>dx, m, k, w, NULL, &rstd[0], False, fmt,
                <float*>dweight, NULL)
