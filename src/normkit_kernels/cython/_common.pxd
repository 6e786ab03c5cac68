# cython: language_level=3, cdivision=True
"""Inner loops shared by the kernel modules: one pass over a contiguous run of values, accumulating in double.

Every reduction is a plain loop over one accumulator pair; the build's -fassociative-math (without
-ffinite-math-only) lets the compiler split it into vector lanes while NaN and inf still propagate.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport fabs, isfinite, isinf, sqrt
from libc.stdint cimport uint16_t
from libc.string cimport memset


cdef inline double max_offset(const floating* mean, const floating* rstd, Py_ssize_t sets) noexcept nogil:
    """The largest |mean| * rstd over the sets, NaN ones skipped: what an address forward kernel returns
    (normkit.contract), so that the frontends need no NumPy call to know whether backward recentres."""
    cdef double top = 0.0, v
    cdef Py_ssize_t i
    for i in range(sets):
        v = fabs(<double>mean[i]) * rstd[i]
        if v > top:  # (False for NaN)
            top = v
    return top


cdef inline double pivot_of(double first) noexcept nogil:
    # Statistics are accumulated on x - pivot (a value from the set) so that a large offset cancels before
    # squaring. A non-finite pivot would turn every shifted value into NaN, so an inf set keeps its mean of inf.
    return first if isfinite(first) else 0.0


# PyTorch's grain size (at::internal::GRAIN_SIZE): by default a kernel given at most this many values runs on one
# thread. Starting the OpenMP team's second thread costs ~2.4 us here, more than such a pass takes alone
# (BatchNorm inference at (2, 8, 4, 4): 2.6 us on one thread, 4.9 on two; (32, 128, 7, 7), 200K values: 21.6 and
# 13.6). Each module keeps its own limit (set_serial_max_values), which the tests lower to run small inputs on
# every thread.
cdef enum:
    SERIAL_MAX_VALUES = 32768


cdef inline int threads_for(Py_ssize_t values, int nthreads, Py_ssize_t serial_max) noexcept nogil:
    return 1 if values <= serial_max else nthreads


cdef enum:
    # Column sums over rows of at most FOLD_MAX_ROW values (BatchNorm of an (N, C) input or of channels-last data,
    # channels-last GroupNorm / InstanceNorm, with C <= 8) take k consecutive rows as one row of at least
    # FOLD_WIDTH columns, each column a set of its own (fold_rows), where each row had taken a masked vector load
    # (the 16-bit loops without registers: a call per row) and its sums a horizontal add per 8 rows; the
    # elementwise passes take such rows too, with their coefficients repeated. BatchNorm's columns schedule,
    # in-process A/B, 2 threads, (R, C) with 6.4M values, unfolded / folded to 16 / 32 / 64 / 128 columns, ms: C =
    # 1 forward 7.54 / 2.17 / 2.70 / 2.36 / 2.45, backward 8.90 / 3.65 / 3.54 / 3.45 / 3.82, split statistics 5.72 /
    # 0.72 / 0.72 / 1.04 / 1.61, bfloat16 forward 8.52 / 1.31 / 1.31 / 1.25 / 1.25; C = 3 3.29 / 2.26 / 2.35 / 2.40
    # / 2.46, 4.35 / 3.55 / 3.43 / 3.58 / 3.88, 1.63 / 0.66 / 0.64 / 1.04 / 1.71, 2.99 / 1.38 / 1.24 / 1.16 / 1.13.
    # The split statistics' double loop (_batchnorm's _column_moments64, four rows a sweep, no registers) reads rows
    # wider than 64 values from memory at a third of the speed (a C model of it, 1 thread, 100 MB of float32: 23
    # GB/s on rows of 16 to 64 values, 7-10 on rows of 96 to 256; the register loops' steps below, likewise),
    # hence 16. (Two runs of this A/B an hour apart differed by up to 2x in milliseconds, e.g. C = 1 unfolded
    # forward 5.30 against 7.54, split statistics 2.71 against 5.72; the ratios held.) At C = 8 folding won for
    # the split statistics and 16-bit data (bfloat16 forward 1.56 -> 1.13) and lost a little for float32 (backward
    # 3.07 -> 3.21, gradient sums 1.22 -> 1.34); at C = 12 it lost (float32 backward 2.81 -> 3.16).
    FOLD_WIDTH = 16
    FOLD_MAX_ROW = 8


cdef inline Py_ssize_t fold_rows(Py_ssize_t n, Py_ssize_t length, Py_ssize_t min_rows) noexcept nogil:
    """Rows of (n, length) data that column sums take as one row (see FOLD_WIDTH), where that leaves at least
    ``min_rows`` such rows; 1: none folded."""
    cdef Py_ssize_t k
    if length == 0 or length > FOLD_MAX_ROW:
        return 1
    k = (FOLD_WIDTH + length - 1) // length
    return k if n >= min_rows * k else 1


cdef extern from *:
    # The statistics pass, in double. From a plain loop the compiler makes one vector register per sum, and the
    # loop waits on the latency of its additions; with AVX (the x86-64-v3 build) four registers per sum instead:
    # LayerNorm forward on (64, 1024) in L2, one thread, 8.3 -> 7.5 us. The x86-64-v4 build's registers hold 8
    # doubles rather than 4: in-process A/B, 2 threads, forward, BatchNorm (32, 64, 56, 56) and (8, 64, 56, 56)
    # 0.87-0.90x, GroupNorm (32, 512, 7, 7) 0.875x (the same outputs; large GroupNorm inputs, bound by memory,
    # unchanged). The order of the additions is fixed by the code, so results do not depend on the thread count;
    # the baseline build keeps the plain loop.
    """
    #if defined(__AVX512F__)
    #include <immintrin.h>
    typedef __m512d normkit_vd;
    #define NORMKIT_VW 8
    #define NORMKIT_VD_SET1 _mm512_set1_pd
    #define NORMKIT_VD_ZERO _mm512_setzero_pd
    #define NORMKIT_VD_SUM(v) _mm512_reduce_add_pd(v)
    #define NORMKIT_MLOAD_F(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
    #define NORMKIT_MLOAD_D(p) _mm512_loadu_pd(p)
    #elif defined(__AVX__)
    #include <immintrin.h>
    typedef __m256d normkit_vd;
    #define NORMKIT_VW 4
    #define NORMKIT_VD_SET1 _mm256_set1_pd
    #define NORMKIT_VD_ZERO _mm256_setzero_pd
    #define NORMKIT_VD_SUM(v) (((v)[0] + (v)[1]) + ((v)[2] + (v)[3]))
    #define NORMKIT_MLOAD_F(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define NORMKIT_MLOAD_D(p) _mm256_loadu_pd(p)
    #endif
    #ifdef NORMKIT_VW
    #define NORMKIT_MOMENTS_BLOCKS(LOAD)                                                              \
        normkit_vd p = NORMKIT_VD_SET1(pivot), z = NORMKIT_VD_ZERO(), d0, d1, d2, d3;             \
        normkit_vd a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z;                \
        for (; i + 4 * NORMKIT_VW <= n; i += 4 * NORMKIT_VW) {                                    \
            d0 = LOAD(x + i) - p; d1 = LOAD(x + i + NORMKIT_VW) - p;                              \
            d2 = LOAD(x + i + 2 * NORMKIT_VW) - p; d3 = LOAD(x + i + 3 * NORMKIT_VW) - p;         \
            a0 += d0; a1 += d1; a2 += d2; a3 += d3;                                               \
            b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;                           \
        }                                                                                         \
        for (; i + NORMKIT_VW <= n; i += NORMKIT_VW) { d0 = LOAD(x + i) - p; a0 += d0; b0 += d0 * d0; } \
        a0 = (a0 + a1) + (a2 + a3); b0 = (b0 + b1) + (b2 + b3);                                   \
        ta = NORMKIT_VD_SUM(a0); tb = NORMKIT_VD_SUM(b0);
    #else
    #define NORMKIT_MOMENTS_BLOCKS(LOAD)
    #endif
    #define NORMKIT_MOMENTS(NAME, T, LOAD)                                                            \
        static inline void NAME(const T* x, Py_ssize_t n, double pivot, double* s1, double* s2) {     \
            double ta = 0.0, tb = 0.0, d;                                                             \
            Py_ssize_t i = 0;                                                                         \
            NORMKIT_MOMENTS_BLOCKS(LOAD)                                                              \
            for (; i < n; i++) { d = x[i] - pivot; ta += d; tb += d * d; }                            \
            *s1 += ta; *s2 += tb;                                                                     \
        }
    NORMKIT_MOMENTS(normkit_moments_f, float, NORMKIT_MLOAD_F)
    NORMKIT_MOMENTS(normkit_moments_d, double, NORMKIT_MLOAD_D)
    """
    void normkit_moments_f(const float* x, Py_ssize_t n, double pivot, double* s1, double* s2) noexcept nogil
    void normkit_moments_d(const double* x, Py_ssize_t n, double pivot, double* s1, double* s2) noexcept nogil


cdef inline void moments(const floating* x, Py_ssize_t n, double pivot, double* s1, double* s2) noexcept nogil:
    """Add sum(x - pivot) to s1[0] and sum((x - pivot)**2) to s2[0] (see above)."""
    if floating is float:
        normkit_moments_f(x, n, pivot, s1, s2)
    else:
        normkit_moments_d(x, n, pivot, s1, s2)


cdef inline void finish_moments(double s1, double s2, Py_ssize_t m, double pivot, double eps,
                                double* mean, double* rstd) noexcept nogil:
    """mean and 1/sqrt(var + eps) from shifted sums; var is the biased variance, clamped at 0 (NaN stays NaN), and
    inf where finite data's squares overflow double (|x - pivot| ~1e154: inf - inf would make it NaN)."""
    cdef double dmean = s1 / m
    cdef double m2 = s2 / m
    cdef double var = m2 - dmean * dmean
    if var < 0.0:
        var = 0.0
    elif var != var and isinf(m2) and m2 > 0.0 and isfinite(dmean):
        var = m2
    mean[0] = pivot + dmean
    rstd[0] = 1.0 / sqrt(var + eps)


cdef inline double rounded_shift(double shift, double m, double mean, double scale) noexcept nogil:
    """The shift of (x - m) * scale + shift where m is the mean rounded to the data's precision: shift + (m - mean)
    * scale, with the rounding's correction. Without it where m is the mean or the scale is not finite (var + eps =
    0, where torch gives (x - mean) * inf): there the product, 0 * inf or a rounding times inf, made every y of the
    set NaN."""
    if m == mean or not isfinite(scale):
        return shift
    return shift + (m - mean) * scale


cdef inline void affine(const floating* x, floating* y, Py_ssize_t n, double mean, double scale,
                        double shift) noexcept nogil:
    """y = (x - mean) * scale + shift, computed in the data's precision: for float32 that is twice the vector
    lanes of double, and the pass then keeps up with memory. The mean's rounding to that precision goes into the
    shift, so a large offset costs nothing; subtracting first (rather than folding the mean into the shift) keeps
    a constant input's output exactly equal to the bias."""
    cdef floating m = <floating>mean
    cdef floating a = <floating>scale
    cdef floating c = <floating>rounded_shift(shift, m, mean, scale)
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = (x[i] - m) * a + c


cdef inline void affine_consts(double mean, double scale, double shift, float* m, float* a, float* c) noexcept nogil:
    """affine()'s float32 constants, for the C loops that compute its argument (m, a, c: mean, scale, shift)."""
    m[0] = <float>mean
    a[0] = <float>scale
    c[0] = <float>rounded_shift(shift, m[0], mean, scale)


cdef enum:
    # Values per chunk that grad_sums() adds in the data's precision before adding them into double.
    SUM_CHUNK = 256


cdef extern from *:
    # One float32 chunk of grad_sums(). From the plain loop gcc makes one vector register per sum, and the loop
    # waits on the latency of its additions (BatchNorm backward on (64, 256, 196), where every run of 196 values is
    # a chunk: 40% of the time in that loop); with AVX2 and FMA (the x86-64-v3 build) four registers per sum. The
    # order of the additions is fixed by the code, so results do not depend on the thread count.
    """
    #define NORMKIT_SUM_CHUNK 256  /* SUM_CHUNK, for the C loops */
    #if defined(__AVX2__) && defined(__FMA__)
    #include <immintrin.h>
    static inline float normkit_hsum8(__m256 v) {
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
    }
    #define NORMKIT_G8(j) (w ? _mm256_mul_ps(_mm256_loadu_ps(dy + (j)), _mm256_loadu_ps(w + (j))) \
                             : _mm256_loadu_ps(dy + (j)))
    #define NORMKIT_GS8(A, B, j) g = NORMKIT_G8(j); A = _mm256_add_ps(A, g);                    \
        B = _mm256_fmadd_ps(g, _mm256_sub_ps(_mm256_loadu_ps(x + (j)), vm), B);
    #endif
    static inline void normkit_grad_chunk_f(const float* dy, const float* x, const float* w, Py_ssize_t k,
                                            float m, float* pa, float* pb) {
        float a = 0.0f, b = 0.0f, gs;
        Py_ssize_t i = 0;
    #if defined(__AVX2__) && defined(__FMA__)
        const __m256 vm = _mm256_set1_ps(m), z = _mm256_setzero_ps();
        __m256 a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z, g;
        for (; i + 32 <= k; i += 32) {
            NORMKIT_GS8(a0, b0, i) NORMKIT_GS8(a1, b1, i + 8) NORMKIT_GS8(a2, b2, i + 16) NORMKIT_GS8(a3, b3, i + 24)
        }
        for (; i + 8 <= k; i += 8) { NORMKIT_GS8(a0, b0, i) }
        a = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        b = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
    #endif
        for (; i < k; i++) {
            gs = w ? dy[i] * w[i] : dy[i];
            a += gs;
            b += gs * (x[i] - m);
        }
        *pa = a;
        *pb = b;
    }
    """
    void normkit_grad_chunk_f(const float* dy, const float* x, const float* w, Py_ssize_t k, float m, float* pa,
                              float* pb) noexcept nogil


cdef inline void grad_sums(const floating* dy, const floating* x, const floating* w, Py_ssize_t n, double mean,
                           double* sdy, double* sdyx) noexcept nogil:
    """Add sum(g) to sdy[0] and sum(g * (x - mean)) to sdyx[0], with g = dy * w (LayerNorm's elementwise weight),
    or g = dy where w is NULL (the compiler makes a loop of each).

    This loop reads dy and x from memory and runs at the speed of its arithmetic, so each chunk of SUM_CHUNK
    values is summed in the data's precision (8 float32 lanes rather than 4 doubles) and then added into double;
    the sums are about m, the mean rounded to the data's precision (the saved statistic is of that precision; a
    float64 mean, the split directions', needs (m - mean) * sum(g) added: batchnorm_backward_reduce). A chunk whose
    sums are not finite (products beyond float32's range, or NaN/inf data) is summed again in double, which keeps
    what can be kept.

    The double sums stay in locals until the end: added through the pointers chunk by chunk (Python's builds
    compile with -fno-strict-aliasing, so every addition was a store), two threads summing neighbouring items of
    one array wrote to the same cache line after every chunk, and BatchNorm's backward on (1, 2, 512, 512) ran
    slower on two threads than on one."""
    cdef floating m = <floating>mean, a, b, g
    cdef double da, db, dg, ta = sdy[0], tb = sdyx[0]
    cdef Py_ssize_t c, i, i0, k
    for c in range((n + SUM_CHUNK - 1) // SUM_CHUNK):
        i0 = c * SUM_CHUNK
        k = min(SUM_CHUNK, n - i0)
        if floating is float:
            normkit_grad_chunk_f(dy + i0, x + i0, w + i0 if w != NULL else NULL, k, m, &a, &b)
        else:
            a = 0
            b = 0
            for i in range(i0, i0 + k):
                g = dy[i] * w[i] if w != NULL else dy[i]
                a = a + g
                b = b + g * (x[i] - m)
        if isfinite(a) and isfinite(b):
            ta += a
            tb += b
        else:
            da = 0.0
            db = 0.0
            for i in range(i0, i0 + k):
                dg = <double>dy[i] * w[i] if w != NULL else dy[i]
                da = da + dg
                db = db + dg * (x[i] - <double>m)  # about m, as the other chunks (exact in double)
            ta += da
            tb += db
    sdy[0] = ta
    sdyx[0] = tb


cdef inline void clear_sums(double* grads, floating* acc, Py_ssize_t n) noexcept nogil:
    """n of the row ops' double sums of parameter gradients and of their accumulators in the data's precision."""
    memset(grads, 0, n * sizeof(double))
    memset(acc, 0, n * sizeof(floating))


cdef inline void group_coefficients(const double* work, Py_ssize_t tiles, Py_ssize_t rows, Py_ssize_t k,
                                    const floating* rstd, bint centered, double* coef) noexcept nogil:
    """The row ops' dx coefficients of each row q of a group of tiled rows: cb = -rstd**3 * sum(g * (x - mean)) / k
    into coef[2q] and cc = -rstd * sum(g) / k (0 when not centered) into coef[2q + 1], from the row's sums per tile
    t, work[2 * (t * rows + q)] and the next, added in tile order; rstd from the group's first row, in double
    (rstd**3 underflows float32 for data near 1e20)."""
    cdef Py_ssize_t q, t
    cdef double sg, sgx, r
    for q in range(rows):
        sg = 0.0
        sgx = 0.0
        for t in range(tiles):
            sg = sg + work[2 * (t * rows + q)]
            sgx = sgx + work[2 * (t * rows + q) + 1]
        r = rstd[q]
        coef[2 * q] = -r * r * r * sgx / k
        coef[2 * q + 1] = -r * sg / k if centered else 0.0


cdef inline void _store_range(const double* grads, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t j1, floating* dweight,
                              floating* dbias) noexcept nogil:
    cdef Py_ssize_t j
    if dweight != NULL:
        for j in range(j0, j1):
            dweight[j] = <floating>grads[j]
    if dbias != NULL:
        for j in range(j0, j1):
            dbias[j] = <floating>grads[k + j]


cdef inline void store_grads(const double* grads, Py_ssize_t k, floating* dweight, floating* dbias, Py_ssize_t tile,
                             int nt) noexcept nogil:
    """dweight and dbias (each NULL when not wanted) from the row ops' double sums, the weight's at grads[j] and
    the bias's at grads[k + j]. Rows longer than a tile store tile by tile on nt threads (serial, this and the
    clearing of the sums took a third of LayerNorm's backward on (1, 2**20)); shorter ones in one go, where a
    parallel region would cost more than the store (2-5 us on LayerNorm (128, 768))."""
    cdef Py_ssize_t t
    if k <= tile:
        _store_range(grads, k, 0, k, dweight, dbias)
        return
    for t in prange((k + tile - 1) // tile, schedule="static", num_threads=nt):
        _store_range(grads, k, t * tile, min(k, (t + 1) * tile), dweight, dbias)


cdef enum:
    # The row ops' backward (_layernorm's 16-bit one, _rownorm's) shares long rows among the threads by tiles, for
    # up to TILED_ROWS rows of more than TILED_ROW values with parameter gradients to sum: their blocks' partial sums
    # (k or 2k per block) then cost about as much as the rows (in-process A/B, two threads, rows one at a time:
    # RMSNorm float32 (8, 65536) 0.79x, (3, 65536) 0.56x, (16, 32768) 0.71x, (1, 32768) 0.76x, LayerNorm bfloat16
    # (8, 65536) 0.52x; one thread 0.51-0.90x). Below, the tiles' two parallel regions per row cost more ((8, 9000)
    # 1.19x, (16, 8192) 1.22x).
    TILED_ROW = 16384
    TILED_ROWS = 16
    # The tiled rows go in groups: each thread's share of a group's dy and x within this many bytes (its L2, where
    # they stay between the group's two parallel regions), two regions a group instead of two a row.
    ROW_GROUP_BYTES = 524288
    # The row ops' backward takes rows two at a time (_layernorm._backward_block) only for rows of this many values
    # or more. Measured with the data cold (64 MiB written between calls, as a model leaves it: the input saved in
    # forward comes back from memory), pairs against three loops per row, float32, 2 threads: LayerNorm / RMSNorm
    # (2048, 256) 1.17-1.21x / 1.20x, (512, 768) 1.11x, (128, 768) 1.09x, (1024, 1024) 1.00x / 1.09x, but (256,
    # 2048) 0.83x / 0.85x, (512, 2048) 0.85x, (128, 4096) 0.84x / 0.81x; in the transformer model of the model
    # benchmark ((16, 128, 256)) the backward kernel took 192-222 us a call without pairs against 223-247 with them
    # (LayerNorm), 171-183 against 220-233 (RMSNorm). Hot, in a loop of calls, pairs win by 4-10% on short rows too.
    PAIRS_MIN_ROW = 2048


cdef inline void grad_apply(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, double mean,
                            double a, double b, double c) noexcept nogil:
    """dx = a * dy + b * (x - mean) + c: the input gradient of one normalized set, or of one channel within it.
    In the data's precision, as affine(); mean is the saved statistic, already of that precision."""
    cdef floating m = <floating>mean, ta = <floating>a, tb = <floating>b, tc = <floating>c
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = ta * dy[i] + tb * (x[i] - m) + tc


cdef inline void grad_apply_inplace(floating* g, const floating* x, Py_ssize_t n, double mean, double a, double b,
                                    double c) noexcept nogil:
    """grad_apply() with dy read from, and dx written to, the same memory g (one pointer: no aliasing for the
    compiler to check at run time)."""
    cdef floating m = <floating>mean, ta = <floating>a, tb = <floating>b, tc = <floating>c
    cdef Py_ssize_t i
    for i in range(n):
        g[i] = ta * g[i] + tb * (x[i] - m) + tc


cdef inline void scale_copy(const floating* dy, floating* dx, Py_ssize_t n, double a) noexcept nogil:
    cdef floating ta = <floating>a
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = ta * dy[i]


cdef inline void grad_sums_scale(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, double mean,
                                 double a, double* sdy, double* sdyx) noexcept nogil:
    """grad_sums() (without w) and scale_copy() with coefficient a in one pass, SUM_CHUNK values at a time while
    the chunk of dy is in cache: the inference backward's dx = dy * rstd * weight beside the sums of its parameter
    gradients, one read of dy instead of two. The arithmetic of the two apart (grad_sums adds chunk by chunk); as
    code inlined elsewhere the compiler may group a chunk's float32 sum otherwise (-fassociative-math), which moves
    the sum of dy (dbias) by its last bits, not dx."""
    cdef Py_ssize_t q, i0, k
    for q in range((n + SUM_CHUNK - 1) // SUM_CHUNK):
        i0 = q * SUM_CHUNK
        k = min(<Py_ssize_t>SUM_CHUNK, n - i0)
        grad_sums(dy + i0, x + i0, NULL, k, mean, sdy, sdyx)
        scale_copy(dy + i0, dx + i0, k, a)


# --- fused activations (normkit.contract "Fused activation"; act is an index into contract.ACTIVATIONS) ----------

cdef extern from *:
    # float32: one branchless loop per activation, which the compiler vectorizes (-O3). The transcendental parts
    # come from one exp (Cephes' polynomial, about 1 ulp; scaled by 2^n built in the exponent bits), so a fused
    # pass stays near memory speed rather than calling libm's expf per element. The backwards' sigmoid(v) uses
    # exp(-|v|) only, so neither sign overflows, and gives 1 - sigmoid(v) without cancellation; the forwards'
    # z * sigmoid(v) is z / (1 + exp(-v)). gelu_tanh is z * sigmoid(2u) (= 0.5 z (1 + tanh u), without the
    # cancellation of 1 + tanh u); gelu's Phi of a negative z is half of erfc(a), a = |z| / sqrt(2), without the
    # cancellation of 1 + erf, as t Q(t) exp(-a*a), t = 1 / (1 + a/2): Q is a degree-8 fit of erfc(a) exp(a*a) / t
    # for relative error on t in [0.15, 1] (a up to 11, past where exp(-a*a) leaves float32), within 5e-8 (1.6e-7
    # in float32). The form is Abramowitz & Stegun 7.1.26's (torch's vectorized CPU erf), whose fit for erf's
    # absolute error left y 3 bfloat16 ulps off below z = -4.5 and 1e7 times too large at z = -8 (Numerical
    # Recipes' erfcc, exp(-a*a + P(t)), is as exact but needs a second exp for the derivative: the Numba act_
    # loops then stopped vectorizing). The derivative shares exp(-a*a). Accuracy: a few ulp of |z| (in gelu's
    # tail, the rounding of a*a in the exponent: 1.5e-5 of y at z = -13).
    # float64: libm, as normkit.activation computes them. NaN z gives NaN y (relu keeps it too, as np.maximum).
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #define NORMKIT_LOG2E 1.44269504088896341f
    #define NORMKIT_TANH_C 0.7978845608028654f  /* sqrt(2/pi) */
    #define NORMKIT_TANH_K 0.044715f

    /* |v| clamped to the float whose bits are limit (a positive float: for positive floats the order of the bits is
       the order of the values), sign kept. An integer min rather than a float compare with a constant arm, which
       gcc's jump threading turns into a branch that stops the loop from vectorizing. A NaN of |v|'s bits above
       the limit's becomes the limit. */
    static inline float normkit_clamp_abs(float v, uint32_t limit) {
        uint32_t u, a;
        memcpy(&u, &v, 4);
        a = u & 0x7FFFFFFFu;
        a = a < limit ? a : limit;
        u = (u & 0x80000000u) | a;
        memcpy(&v, &u, 4);
        return v;
    }

    /* e^v as 2^fn e^r, v = fn ln 2 + r with fn = v / ln 2 rounded (|r| <= ln 2 / 2): Cephes' polynomial in r (ln 2
       in two parts) times 2^fn built in the exponent bits from k = fn + 127 in [0, 255] (0 gives 0, 255 inf) */
    static inline float normkit_exp_parts(float v, float fn, int k) {
        float r = (v - fn * 0.693359375f) + fn * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        uint32_t bits = (uint32_t)k << 23;
        float scale;
        memcpy(&scale, &bits, 4);
        return p * scale;
    }

    /* exp(v) for v <= 0; below -88 (also -inf) as at -88: 0 */
    static inline float normkit_exp_neg(float v) {
        v = normkit_clamp_abs(v, 0x42B00000u);  /* 88.0f */
        int n = (int)(v * NORMKIT_LOG2E - 0.5f);  /* round to nearest for v <= 0 (truncation toward 0) */
        return normkit_exp_parts(v, (float)n, n + 127);  /* n >= -127: 2^-127 becomes 0, a flush below -87.3 */
    }

    /* z * sigmoid(v) as z / (1 + exp(-v)), the forwards of silu (v = z) and gelu_tanh (v = 2u): they need neither
       1 - sigmoid nor sigmoid2's exp(-|v|) and its selects. exp's argument is clamped to +-89, past both ends of
       float's range: 2^n is 0 for n = -128 (v above 88.4: the quotient is z) and inf for n = 128 (v below -88.4:
       the quotient is -0 for finite z, as torch's z * sigmoid(v), and NaN for z = -inf). Rounding by adding
       1.5 * 2^23 would save the conversions, but -fassociative-math folds it away. GroupNorm + SiLU forward
       (8, 128, 32, 32) float32, in cache, 2 threads: 0.86-0.87x the time through sigmoid2, (8, 256, 56, 56)
       0.88-0.91x; gelu_tanh (8, 128, 32, 32) 0.88x. */
    static inline float normkit_mul_sigmoid_f(float z, float v) {
        v = normkit_clamp_abs(-v, 0x42B20000u);  /* 89.0f */
        float fn = rintf(v * NORMKIT_LOG2E);
        int k = (int)fn + 127;
        return z / (1.0f + normkit_exp_parts(v, fn, k < 0 ? 0 : k));
    }

    /* sigmoid(v) and 1 - sigmoid(v), without cancellation */
    static inline void normkit_sigmoid2(float v, float* s, float* t) {
        float e = normkit_exp_neg(-fabsf(v)), d = 1.0f / (1.0f + e);
        *s = v >= 0.0f ? d : e * d;
        *t = v >= 0.0f ? e * d : d;
    }

    /* Phi(z), the standard normal CDF, and exp(-z*z/2) */
    static inline float normkit_phi_cdf(float z, float* g) {
        float a = fabsf(z) * 0.70710678118654752f;
        float t = 1.0f / (1.0f + 0.5f * a);
        float p = -6.024568307e-02f;
        p = p * t + 2.900955132e-01f;
        p = p * t - 4.981316318e-01f;
        p = p * t + 2.899517648e-01f;
        p = p * t - 3.434922912e-02f;
        p = p * t + 2.057445845e-01f;
        p = p * t + 2.423870697e-01f;
        p = p * t + 2.824658482e-01f;
        p = p * t + 2.820817123e-01f;
        *g = normkit_exp_neg(-a * a);
        float half_erfc = 0.5f * p * t * *g;
        return z >= 0.0f ? 1.0f - half_erfc : half_erfc;
    }

    static inline float normkit_tanh_arg2(float z) {  /* 2u of gelu_tanh */
        return 2.0f * NORMKIT_TANH_C * (z + NORMKIT_TANH_K * z * z * z);
    }

    static void normkit_act_f(float* y, Py_ssize_t n, int act, float slope) {
        Py_ssize_t i;
        float g;
        switch (act) {
        case 0: for (i = 0; i < n; i++) y[i] = y[i] < 0.0f ? 0.0f : y[i]; break;
        case 1: for (i = 0; i < n; i++) y[i] = y[i] > 0.0f ? y[i] : y[i] * slope; break;
        case 2: for (i = 0; i < n; i++) y[i] = normkit_mul_sigmoid_f(y[i], y[i]); break;
        case 3: for (i = 0; i < n; i++) y[i] = y[i] * normkit_phi_cdf(y[i], &g); break;
        default: for (i = 0; i < n; i++) y[i] = normkit_mul_sigmoid_f(y[i], normkit_tanh_arg2(y[i]));
        }
    }

    /* y[i] = act(Z) for i < n, Z an expression of i (the argument as the plain loop computes it): in one loop, so
       the argument is not stored and loaded again between the two. Against chunks that wrote it, then ran
       normkit_act_f over them (in-process, two threads, the same bits): GroupNorm + SiLU forward (8, 256, 3136)
       0.82-0.85x, + ReLU 0.66-0.74x; LayerNorm (8192, 1024) 0.69-0.78x. The non-temporal stores' chunks
       (affine_act_stream) keep the two loops: there ReLU ran 1.07x in one. */
    #define NORMKIT_ACT_OF(Z)                                                                                 \
        Py_ssize_t i;                                                                                       \
        float z, g;                                                                                         \
        switch (act) {                                                                                      \
        case 0: for (i = 0; i < n; i++) { z = (Z); y[i] = z < 0.0f ? 0.0f : z; } break;                     \
        case 1: for (i = 0; i < n; i++) { z = (Z); y[i] = z > 0.0f ? z : z * slope; } break;                \
        case 2: for (i = 0; i < n; i++) { z = (Z); y[i] = normkit_mul_sigmoid_f(z, z); } break;             \
        case 3: for (i = 0; i < n; i++) { z = (Z); y[i] = z * normkit_phi_cdf(z, &g); } break;              \
        default:                                                                                            \
            for (i = 0; i < n; i++) { z = (Z); y[i] = normkit_mul_sigmoid_f(z, normkit_tanh_arg2(z)); }      \
        }

    /* y = act((x - m) * a + c): affine()'s argument. Inlined into its callers: BatchNorm's channel schedule calls
       it once per run of S values, and as a call BatchNorm + ReLU forward (64, 256, 14, 14) took 1.10x the time */
    static inline __attribute__((always_inline)) void normkit_affine_act_f(const float* x, float* y, Py_ssize_t n,
                                                                           float m, float a, float c, int act,
                                                                           float slope) {
        NORMKIT_ACT_OF((x[i] - m) * a + c)
    }

    /* y = act((x - m) * a + c) with a coefficient per element */
    static void normkit_cols_act_f(const float* x, float* y, Py_ssize_t n, const float* m, const float* a,
                                   const float* c, int act, float slope) {
        NORMKIT_ACT_OF((x[i] - m[i]) * a[i] + c[i])
    }

    /* y = act(((x - m) * r + c0) * w + b): a LayerNorm row's (_layernorm._row_y) */
    static void normkit_row_y_act_f(const float* x, float* y, Py_ssize_t n, const float* w, const float* b, float m,
                                    float r, float c0, int act, float slope) {
        NORMKIT_ACT_OF(((x[i] - m) * r + c0) * w[i] + b[i])
    }

    /* out[i] = dy[i] * act'(Z) for i < n, Z as in NORMKIT_ACT_OF, in one loop (the argument is not stored first).
       relu's is a select, as torch's backward (threshold_backward): 0 where z <= 0 whatever dy is (NaN too), and
       a NaN z passes dy (leaky_relu's multiplies, the slope at a NaN z, as torch's);
       gelu_tanh's d/dz z sigmoid(2u) = s + 2 z s (1 - s) u', and beyond |z| = 1e4 s (1 - s) is 0 and z*z would
       overflow into 0 * inf. The clamp that keeps it finite there would give a NaN z, and an infinite one from an
       infinite x, a finite derivative: they give NaN, as in torch (a z that overflowed from a finite x, the limit) */
    #define NORMKIT_ACT_GRAD_OF(Z)                                                                            \
        Py_ssize_t i;                                                                                       \
        float z, s, t, g, c, q;                                                                             \
        switch (act) {                                                                                      \
        case 0: for (i = 0; i < n; i++) { z = (Z); out[i] = z <= 0.0f ? 0.0f : dy[i]; } break;              \
        case 1: for (i = 0; i < n; i++) { z = (Z); out[i] = z > 0.0f ? dy[i] : dy[i] * slope; } break;      \
        case 2:                                                                                             \
            for (i = 0; i < n; i++) {                                                                       \
                z = (Z);                                                                                    \
                normkit_sigmoid2(z, &s, &t);                                                                \
                out[i] = dy[i] * (s * (1.0f + z * t));                                                      \
            }                                                                                               \
            break;                                                                                          \
        case 3:                                                                                             \
            for (i = 0; i < n; i++) {                                                                       \
                z = (Z);                                                                                    \
                c = normkit_phi_cdf(z, &g);                                                                 \
                out[i] = dy[i] * (c + z * g * 0.3989422804014327f);                                         \
            }                                                                                               \
            break;                                                                                          \
        default:                                                                                            \
            for (i = 0; i < n; i++) {                                                                       \
                z = (Z);                                                                                    \
                q = normkit_clamp_abs(z, 0x461C4000u);                                                      \
                normkit_sigmoid2(normkit_tanh_arg2(z), &s, &t);                                             \
                g = dy[i] * (s + 2.0f * q * s * t * NORMKIT_TANH_C * (1.0f + 3.0f * NORMKIT_TANH_K * q * q));     \
                out[i] = z - z == 0.0f || (z == z && x[i] - x[i] == 0.0f) ? g : z - z;                      \
            }                                                                                               \
        }

    static void normkit_affine_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, float m, float a,
                                          float c0, int act, float slope) {
        NORMKIT_ACT_GRAD_OF((x[i] - m) * a + c0)
    }

    static void normkit_cols_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, const float* m,
                                        const float* a, const float* c0, int act, float slope) {
        NORMKIT_ACT_GRAD_OF((x[i] - m[i]) * a[i] + c0[i])
    }

    static void normkit_row_y_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, const float* w,
                                         const float* b, float m, float r, float c0, int act, float slope) {
        NORMKIT_ACT_GRAD_OF(((x[i] - m) * r + c0) * w[i] + b[i])
    }

    static inline double normkit_sigmoid_d(double v) {
        double e = exp(-fabs(v));
        return v >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    }

    static void normkit_act_d(double* y, Py_ssize_t n, int act, double slope) {
        Py_ssize_t i;
        double z;
        for (i = 0; i < n; i++) {
            z = y[i];
            switch (act) {
            case 0: y[i] = z < 0.0 ? 0.0 : z; break;
            case 1: y[i] = z > 0.0 ? z : z * slope; break;
            case 2: y[i] = z * normkit_sigmoid_d(z); break;
            case 3: y[i] = 0.5 * z * erfc(-z * 0.70710678118654752); break;
            default: y[i] = z * normkit_sigmoid_d(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z));
            }
        }
    }

    static void normkit_act_grad_d(const double* dy, double* z, Py_ssize_t n, int act, double slope) {
        Py_ssize_t i;
        double v, s, t;
        for (i = 0; i < n; i++) {
            v = z[i];
            switch (act) {
            case 0: z[i] = v <= 0.0 ? 0.0 : dy[i]; break;
            case 1: z[i] = v > 0.0 ? dy[i] : dy[i] * slope; break;
            case 2: s = normkit_sigmoid_d(v); z[i] = dy[i] * (s * (1.0 + v * (1.0 - s))); break;
            case 3:
                z[i] = dy[i] * (0.5 * erfc(-v * 0.70710678118654752) + v * exp(-0.5 * v * v) * 0.3989422804014327);
                break;
            default:  /* with s = sigmoid(2u) = (1 + tanh u) / 2 and t = 1 - s = sigmoid(-2u), no cancellation */
                s = 2.0 * 0.7978845608028654 * (v + 0.044715 * v * v * v);
                t = normkit_sigmoid_d(-s);
                s = normkit_sigmoid_d(s);
                z[i] = dy[i] * (s + 2.0 * v * s * t * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v));
            }
        }
    }
    """
    void normkit_act_f(float* y, Py_ssize_t n, int act, float slope) noexcept nogil
    void normkit_affine_act_f(const float* x, float* y, Py_ssize_t n, float m, float a, float c, int act,
                              float slope) noexcept nogil
    void normkit_cols_act_f(const float* x, float* y, Py_ssize_t n, const float* m, const float* a, const float* c,
                            int act, float slope) noexcept nogil
    void normkit_row_y_act_f(const float* x, float* y, Py_ssize_t n, const float* w, const float* b, float m,
                             float r, float c0, int act, float slope) noexcept nogil
    void normkit_affine_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, float m, float a,
                                   float c0, int act, float slope) noexcept nogil
    void normkit_cols_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, const float* m,
                                 const float* a, const float* c0, int act, float slope) noexcept nogil
    void normkit_row_y_act_grad_f(const float* dy, const float* x, float* out, Py_ssize_t n, const float* w,
                                  const float* b, float m, float r, float c0, int act, float slope) noexcept nogil
    void normkit_act_d(double* y, Py_ssize_t n, int act, double slope) noexcept nogil
    void normkit_act_grad_d(const double* dy, double* z, Py_ssize_t n, int act, double slope) noexcept nogil


cdef enum:
    # act argument of the loops below meaning "no activation": the plain directions share the loops
    NO_ACT = -1
    # Values per chunk of a fused pass: its pre-activations (forward: y itself) stay in L1 between the affine
    # loop and the activation's. A multiple of SUM_CHUNK, so grad_sums() chunks g as it chunks dy.
    ACT_CHUNK = 1024


cdef inline void act_apply(floating* y, Py_ssize_t n, int act, double slope) noexcept nogil:
    """y = act(y) in place."""
    if floating is float:
        normkit_act_f(y, n, act, <float>slope)
    else:
        normkit_act_d(y, n, act, slope)


cdef inline void act_grad(const double* dy, double* z, Py_ssize_t n, int act, double slope) noexcept nogil:
    """z (the pre-activation on entry) = dy * act'(z), in double (float32 computes z and act'(z) in one loop: the
    *_act_grad_f loops)."""
    normkit_act_grad_d(dy, z, n, act, slope)


cdef inline void affine_act(const floating* x, floating* y, Py_ssize_t n, double mean, double scale, double shift,
                            int act, double slope) noexcept nogil:
    """y = act((x - mean) * scale + shift) as affine() computes the argument: float32 in one loop, double chunk by
    chunk while it is in L1; affine() alone for act == NO_ACT."""
    cdef Py_ssize_t q, i, k
    cdef float m, a, c
    if act == NO_ACT:
        affine(x, y, n, mean, scale, shift)
        return
    if floating is float:
        affine_consts(mean, scale, shift, &m, &a, &c)
        normkit_affine_act_f(x, y, n, m, a, c, act, <float>slope)
        return
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        affine(x + i, y + i, k, mean, scale, shift)
        act_apply(y + i, k, act, slope)


cdef extern from *:
    # Non-temporal (streaming) stores: they write whole lines to memory without reading them into the cache
    # first, as an ordinary store to a line not in cache does, so a pass whose output does not stay in cache moves
    # a third fewer bytes (read x, write y: two streams, not three). SSE2 in the baseline build, AVX in the
    # x86-64-v3 one; elsewhere a plain copy. The stores are weakly ordered: the writer ends with normkit_sfence().
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__AVX__)
    #include <immintrin.h>
    #define NORMKIT_STREAM_BODY(T, LANES, STORE, LOAD)                                                 \
        Py_ssize_t i = 0;                                                                           \
        for (; i < n && ((uintptr_t)(d + i) & 31); i++) d[i] = s[i];                                 \
        for (; i + LANES <= n; i += LANES) STORE(d + i, LOAD(s + i));                               \
        for (; i < n; i++) d[i] = s[i];
    static inline void normkit_stream_f(float* d, const float* s, Py_ssize_t n) {
        NORMKIT_STREAM_BODY(float, 8, _mm256_stream_ps, _mm256_loadu_ps)
    }
    static inline void normkit_stream_d(double* d, const double* s, Py_ssize_t n) {
        NORMKIT_STREAM_BODY(double, 4, _mm256_stream_pd, _mm256_loadu_pd)
    }
    static inline void normkit_sfence(void) { _mm_sfence(); }
    #elif defined(__SSE2__)
    #include <emmintrin.h>
    #define NORMKIT_STREAM_BODY(T, LANES, STORE, LOAD)                                                 \
        Py_ssize_t i = 0;                                                                           \
        for (; i < n && ((uintptr_t)(d + i) & 15); i++) d[i] = s[i];                                 \
        for (; i + LANES <= n; i += LANES) STORE(d + i, LOAD(s + i));                               \
        for (; i < n; i++) d[i] = s[i];
    static inline void normkit_stream_f(float* d, const float* s, Py_ssize_t n) {
        NORMKIT_STREAM_BODY(float, 4, _mm_stream_ps, _mm_loadu_ps)
    }
    static inline void normkit_stream_d(double* d, const double* s, Py_ssize_t n) {
        NORMKIT_STREAM_BODY(double, 2, _mm_stream_pd, _mm_loadu_pd)
    }
    static inline void normkit_sfence(void) { _mm_sfence(); }
    #else
    static inline void normkit_stream_f(float* d, const float* s, Py_ssize_t n) { memcpy(d, s, n * sizeof(float)); }
    static inline void normkit_stream_d(double* d, const double* s, Py_ssize_t n) { memcpy(d, s, n * sizeof(double)); }
    static inline void normkit_sfence(void) {}
    #endif
    """
    void normkit_stream_f(float* d, const float* s, Py_ssize_t n) noexcept nogil
    void normkit_stream_d(double* d, const double* s, Py_ssize_t n) noexcept nogil
    void normkit_sfence() noexcept nogil


cdef inline void stream_store(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    if floating is float:
        normkit_stream_f(dst, src, n)
    else:
        normkit_stream_d(dst, src, n)


cdef inline void affine_act_stream(const floating* x, floating* y, Py_ssize_t n, double mean, double scale,
                                   double shift, int act, double slope) noexcept nogil:
    """affine_act() with y written by non-temporal stores: each chunk computed on the stack, then streamed out.
    The caller ends its run of such calls with normkit_sfence()."""
    cdef floating buf[ACT_CHUNK]
    cdef Py_ssize_t q, i, k
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        affine(x + i, buf, k, mean, scale, shift)
        if act != NO_ACT:
            act_apply(buf, k, act, slope)
        stream_store(y + i, buf, k)


# --- per-column loops: a run of values, each with coefficients of its own (BatchNorm's columns schedule, the
# channels-last kernels' rows) ---------------------------------------------------------------------------------

cdef inline void affine_columns(const floating* x, floating* y, Py_ssize_t length, const floating* mean,
                                const floating* scale, const floating* shift) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(length):
        y[l] = (x[l] - mean[l]) * scale[l] + shift[l]


cdef inline void grad_apply_columns(const floating* dy, const floating* x, floating* dx, Py_ssize_t length,
                                    const floating* mean, const floating* ca, const floating* cb,
                                    const floating* cc) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(length):
        dx[l] = ca[l] * dy[l] + cb[l] * (x[l] - mean[l]) + cc[l]


cdef inline void scale_columns(const floating* dy, floating* dx, Py_ssize_t length,
                               const floating* ca) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(length):
        dx[l] = ca[l] * dy[l]


cdef inline void affine_columns_act(const floating* x, floating* y, Py_ssize_t length, const floating* mean,
                                    const floating* scale, const floating* shift, int act,
                                    double slope) noexcept nogil:
    """affine_columns through the activation: float32 in one loop, double chunk by chunk while it is in L1
    (affine_columns for NO_ACT)."""
    cdef Py_ssize_t q, l, k
    if act == NO_ACT:
        affine_columns(x, y, length, mean, scale, shift)
        return
    if floating is float:
        normkit_cols_act_f(x, y, length, mean, scale, shift, act, <float>slope)
        return
    for q in range((length + ACT_CHUNK - 1) // ACT_CHUNK):
        l = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, length - l)
        affine_columns(x + l, y + l, k, mean + l, scale + l, shift + l)
        act_apply(y + l, k, act, slope)


cdef enum:
    # what columns_stream() computes
    STREAM_AFFINE = 0  # y = act((x - mean) * a + b)
    STREAM_GRAD = 1  # dx = a * dy + b * (x - mean) + c
    STREAM_SCALE = 2  # dx = a * dy


cdef inline void columns_stream(int what, const floating* dy, const floating* x, floating* out, Py_ssize_t p0,
                                Py_ssize_t p1, Py_ssize_t length, const floating* mean, const floating* a,
                                const floating* b, const floating* c, int act, double slope) noexcept nogil:
    """Values p0..p1 of the (rows, length) views dy, x and out, column p % length with the coefficients mean[l],
    a[l], b[l], c[l] (``what``: the enum above; dy, c unused by STREAM_AFFINE, act by the others), out written by
    non-temporal stores, chunk by chunk through the stack. A chunk ends at a 64-byte boundary of out, so the chunks
    after the first start a line, and a line takes both ordinary stores (stream_store's head and tail) and
    non-temporal ones only at the span's two ends: a stream restarted part way into a line on every row of a
    misaligned output (16 bytes past a line, as NumPy places large arrays) ran 1.08-1.13x the time of ordinary
    stores, where aligned rows ran 0.75-0.80x (BatchNorm, channels-last (32, 64, 56, 56) and (32, 16, 112, 112)
    forward, in-process A/B, 2 threads). The caller ends its run of such calls with normkit_sfence()."""
    cdef floating buf[ACT_CHUNK]
    cdef Py_ssize_t p = p0, e, q, r, l
    cdef size_t end
    while p < p1:
        end = (<size_t>(out + p) + ACT_CHUNK * sizeof(floating)) & ~(<size_t>63)
        e = min(p1, p + <Py_ssize_t>((end - <size_t>(out + p)) // sizeof(floating)))
        q = p
        while q < e:
            l = q % length
            r = min(e, q + length - l)
            if what == STREAM_AFFINE:
                affine_columns_act(x + q, buf + (q - p), r - q, mean + l, a + l, b + l, act, slope)
            elif what == STREAM_GRAD:
                grad_apply_columns(dy + q, x + q, buf + (q - p), r - q, mean + l, a + l, b + l, c + l)
            else:
                scale_columns(dy + q, buf + (q - p), r - q, a + l)
            q = r
        stream_store(out + p, buf, e - p)
        p = e


cdef inline void affine_act_grad(const floating* dy, const floating* x, floating* g, Py_ssize_t n, double mean,
                                 double scale, double shift, int act, double slope) noexcept nogil:
    """g = dy * act'(z), z = (x - mean) * scale + shift as affine() computes it (act != NO_ACT): float32 in one loop,
    double through g."""
    cdef float m, a, c
    if floating is float:
        affine_consts(mean, scale, shift, &m, &a, &c)
        normkit_affine_act_grad_f(dy, x, g, n, m, a, c, act, <float>slope)
    else:
        affine(x, g, n, mean, scale, shift)
        act_grad(dy, g, n, act, slope)


cdef inline void act_grad_sums_kept(const floating* dy, const floating* x, floating* g, Py_ssize_t n, double mean,
                                    double scale, double shift, int act, double slope, double* sdy,
                                    double* sdyx) noexcept nogil:
    """act_grad_sums() (act != NO_ACT) with g = dy * act'(z) left in g, chunk by chunk as there (the same values):
    the input gradient's memory, whose second pass then reads g (grad_apply_inplace) rather than computing z and
    act'(z) again, the exp and division that bound a fused SiLU's backward."""
    cdef Py_ssize_t q, i, k
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        affine_act_grad(dy + i, x + i, g + i, k, mean, scale, shift, act, slope)
        grad_sums(g + i, x + i, NULL, k, mean, sdy, sdyx)


cdef inline void act_grad_sums(const floating* dy, const floating* x, Py_ssize_t n, double mean, double scale,
                               double shift, int act, double slope, double* sdy, double* sdyx) noexcept nogil:
    """grad_sums() (without w) of g = dy * act'(z), z = (x - mean) * scale + shift recomputed as affine_act()
    computes it, chunk by chunk on the stack; grad_sums() of dy for act == NO_ACT."""
    cdef floating g[ACT_CHUNK]
    cdef Py_ssize_t q, i, k
    if act == NO_ACT:
        grad_sums(dy, x, NULL, n, mean, sdy, sdyx)
        return
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        act_grad_sums_kept(dy + i, x + i, g, k, mean, scale, shift, act, slope, sdy, sdyx)


cdef inline void act_grad_apply(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, double mean,
                                double scale, double shift, int act, double slope, bint training, double a,
                                double b, double c) noexcept nogil:
    """grad_apply() (training) or scale_copy() with coefficient a (inference) of g = dy * act'(z), g as in
    act_grad_sums(); of dy for act == NO_ACT."""
    cdef floating g[ACT_CHUNK]
    cdef Py_ssize_t q, i, k
    if act == NO_ACT:
        if training:
            grad_apply(dy, x, dx, n, mean, a, b, c)
        else:
            scale_copy(dy, dx, n, a)
        return
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        affine_act_grad(dy + i, x + i, g, k, mean, scale, shift, act, slope)
        if training:
            grad_apply(g, x + i, dx + i, k, mean, a, b, c)
        else:
            scale_copy(g, dx + i, k, a)


cdef inline void act_grad_apply_stream(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                       double mean, double scale, double shift, int act, double slope, bint training,
                                       double a, double b, double c) noexcept nogil:
    """act_grad_apply() with dx written by non-temporal stores: each chunk computed on the stack, then streamed
    out. The caller ends its run of such calls with normkit_sfence()."""
    cdef floating g[ACT_CHUNK]
    cdef Py_ssize_t q, i, k
    for q in range((n + ACT_CHUNK - 1) // ACT_CHUNK):
        i = q * ACT_CHUNK
        k = min(<Py_ssize_t>ACT_CHUNK, n - i)
        if act == NO_ACT:
            if training:
                grad_apply(dy + i, x + i, g, k, mean, a, b, c)
            else:
                scale_copy(dy + i, g, k, a)
        else:
            affine_act_grad(dy + i, x + i, g, k, mean, scale, shift, act, slope)
            if training:
                grad_apply(g, x + i, g, k, mean, a, b, c)
            else:
                scale_copy(g, g, k, a)
        stream_store(dx + i, g, k)

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define normkit_prefetch(p) __builtin_prefetch((p), 0, 3)
    #else
    #define normkit_prefetch(p) ((void)(p))
    #endif
    """
    void normkit_prefetch(const void* p) noexcept nogil


# Prefetch requests per run stop here: the hardware prefetcher has caught a longer run by then.
DEF PREFETCH_BYTES = 4096


cdef inline void prefetch_run(const void* p, Py_ssize_t nbytes) noexcept nogil:
    """Ask for the first PREFETCH_BYTES of a run that is about to be read. Runs far apart (a channel's rows of
    (N, C, S) data) each start a new stream that the hardware prefetcher has to discover again."""
    cdef Py_ssize_t k
    cdef const char* c = <const char*>p
    for k in range(0, min(nbytes, PREFETCH_BYTES), 64):
        normkit_prefetch(c + k)


cdef extern from *:
    # What setup.py built this module with (see its docstring); _OPENMP is the compiler's own macro.
    """
    #ifdef _OPENMP
    #define NORMKIT_HAVE_OPENMP 1
    #else
    #define NORMKIT_HAVE_OPENMP 0
    #endif
    #ifndef NORMKIT_BUILD_FLAGS
    #define NORMKIT_BUILD_FLAGS "unknown (not built by normkit's setup.py)"
    #endif
    #ifndef NORMKIT_OPENMP_NOTE
    #define NORMKIT_OPENMP_NOTE "unknown (not built by normkit's setup.py)"
    #endif
    /* A prange on one thread (every call below the serial threshold) still enters libgomp, whose team of one ends
       in barriers that each make a futex syscall: two per region, ~0.35 us a region here (a raw GroupNorm
       (1, 32, 16, 16) forward, two regions: 2.2 us with them, 1.5 without). setup.py links with
       --wrap=GOMP_parallel where the linker has it, so the compiler's call lands here, which runs a one-thread
       region's body directly: outside any parallel region the body's static schedule (omp_get_num_threads() 1,
       omp_get_thread_num() 0) and its barriers (orphaned: no-ops) are those of a team of one. Inside an active
       region (never from Python) the runtime decides, as without the wrap. */
    #if defined(_OPENMP) && defined(NORMKIT_WRAP_GOMP_PARALLEL)
    #include <omp.h>
    void __real_GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
    __attribute__((visibility("hidden")))
    void __wrap_GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
        if (num_threads == 1 && !omp_in_parallel())
            fn(data);
        else
            __real_GOMP_parallel(fn, data, num_threads, flags);
    }
    #endif
    /* Which x86-64 copies of the modules setup.py built that this CPU can run: bit 0 x86-64-v3, bit 1 x86-64-v4. */
    static int normkit_x86_64_copies(void) {
        int copies = 0;
    #if defined(NORMKIT_HAVE_X86_64_V3_BUILD) || defined(NORMKIT_HAVE_X86_64_V4_BUILD)
        __builtin_cpu_init();
    #endif
    #ifdef NORMKIT_HAVE_X86_64_V3_BUILD
        if (__builtin_cpu_supports("x86-64-v3")) copies |= 1;
    #endif
    #ifdef NORMKIT_HAVE_X86_64_V4_BUILD
        if (__builtin_cpu_supports("x86-64-v4")) copies |= 2;
    #endif
        return copies;
    }
    """
    const int NORMKIT_HAVE_OPENMP
    const char* NORMKIT_BUILD_FLAGS
    const char* NORMKIT_OPENMP_NOTE
    int normkit_x86_64_copies() noexcept nogil


# --- 16-bit data (bfloat16, float16; normkit.contract): uint16 bit patterns, widened tile by tile ---------------

cdef extern from *:
    # fmt 0 is bfloat16, 1 is float16. bfloat16 widens by a shift and narrows by round-to-nearest-even in integers
    # (both loops vectorize). float16 uses F16C where the CPU has it (always in the x86-64-v3 build; checked at
    # run time in the baseline one), else a bit-exact integer conversion (subnormals, overflow to inf, NaN).
    # A NaN narrows to a quiet NaN of the same sign.
    """
    #include <stdint.h>
    #include <string.h>
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define NORMKIT_F16C_TARGET __attribute__((target("avx,f16c")))
    #endif

    static int normkit_f16c = 0;

    static inline float normkit_float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline uint32_t normkit_bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

    static void normkit_bf16_widen(const uint16_t* s, float* d, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = normkit_float_of((uint32_t)s[i] << 16);
    }

    /* The narrowing loops return whether every output is finite (its exponent field not all ones). */
    static int normkit_bf16_narrow(const float* s, uint16_t* d, Py_ssize_t n) {
        uint32_t bad = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t u = normkit_bits_of(s[i]);
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            r = (u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x0040u : r;
            d[i] = (uint16_t)r;
            bad |= (r & 0x7F80u) == 0x7F80u;
        }
        return !bad;
    }

    static inline uint32_t normkit_f16_to_f32_bits(uint32_t h) {
        uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, p;
        if (e == 0x1Fu) return sign | 0x7F800000u | (m << 13);
        if (e) return sign | ((e + 112u) << 23) | (m << 13);
        if (!m) return sign;
        for (p = 9; !(m >> p); p--) {}  /* a subnormal: m * 2^-24 = 2^(p-24) * 1.f */
        return sign | ((p + 103u) << 23) | ((m << (23 - p)) & 0x7FFFFFu);
    }

    static inline uint16_t normkit_f32_to_f16_bits(uint32_t u) {
        uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu, m, sh, r, rest, half;
        if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
        if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* from 65520 on, RNE gives inf */
        if (a >= 0x38800000u) {  /* normal: rebias the exponent by 127 - 15, round 13 bits away */
            a -= 0x38000000u;
            return (uint16_t)(sign | ((a + 0x0FFFu + ((a >> 13) & 1u)) >> 13));
        }
        if (a <= 0x33000000u) return (uint16_t)sign;  /* up to 2^-25, half the smallest subnormal: ties to 0 */
        m = (a & 0x7FFFFFu) | 0x800000u;
        sh = 126u - (a >> 23);  /* the value in units of 2^-24 is m >> sh */
        r = m >> sh;
        rest = m & ((1u << sh) - 1u);
        half = 1u << (sh - 1u);
        r += rest > half || (rest == half && (r & 1u));
        return (uint16_t)(sign | r);
    }

    static void normkit_f16_widen_soft(const uint16_t* s, float* d, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = normkit_float_of(normkit_f16_to_f32_bits(s[i]));
    }

    static int normkit_f16_narrow_soft(const float* s, uint16_t* d, Py_ssize_t n) {
        uint32_t bad = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            d[i] = normkit_f32_to_f16_bits(normkit_bits_of(s[i]));
            bad |= (d[i] & 0x7C00u) == 0x7C00u;
        }
        return !bad;
    }

    #ifdef NORMKIT_F16C_TARGET
    NORMKIT_F16C_TARGET static void normkit_f16_widen_hw(const uint16_t* s, float* d, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
        if (i < n) {
            uint16_t t[8] = {0};
            float f[8];
            memcpy(t, s + i, (size_t)(n - i) * 2);
            _mm256_storeu_ps(f, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)t)));
            memcpy(d + i, f, (size_t)(n - i) * 4);
        }
    }

    NORMKIT_F16C_TARGET static int normkit_f16_narrow_hw(const float* s, uint16_t* d, Py_ssize_t n) {
        const __m128i top = _mm_set1_epi16(0x7C00);
        __m128i h, bad = _mm_setzero_si128();
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)(d + i), h);
            bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, top), top));
        }
        if (i < n) {
            float f[8] = {0};
            uint16_t t[8];
            memcpy(f, s + i, (size_t)(n - i) * 4);
            h = _mm256_cvtps_ph(_mm256_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)t, h);
            memcpy(d + i, t, (size_t)(n - i) * 2);
            bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, top), top));
        }
        return _mm_movemask_epi8(bad) == 0;
    }
    #endif

    /* Whether float16 uses F16C from now on: when allowed and the CPU has it. Returns the choice. */
    static int normkit_half_init(int allow_f16c) {
        normkit_f16c = 0;
    #ifdef NORMKIT_F16C_TARGET
        __builtin_cpu_init();
        normkit_f16c = allow_f16c && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    #endif
        return normkit_f16c;
    }

    /* Whether this build's 16-bit passes (normkit_col_sums16, normkit_cols16, ...) run format fmt in registers
       rather than tile by tile through float32 buffers: AVX2, FMA and F16C in the build, and for float16 F16C in
       use (normkit_half_init). */
    static int normkit_regs16(int fmt) {
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        return fmt == 0 || normkit_f16c;
    #else
        (void)fmt;
        return 0;
    #endif
    }

    static void normkit_widen(const uint16_t* s, float* d, Py_ssize_t n, int fmt) {
        if (fmt == 0) { normkit_bf16_widen(s, d, n); return; }
    #ifdef NORMKIT_F16C_TARGET
        if (normkit_f16c) { normkit_f16_widen_hw(s, d, n); return; }
    #endif
        normkit_f16_widen_soft(s, d, n);
    }

    /* Returns whether every output is finite. */
    static int normkit_narrow(const float* s, uint16_t* d, Py_ssize_t n, int fmt) {
        if (fmt == 0) return normkit_bf16_narrow(s, d, n);
    #ifdef NORMKIT_F16C_TARGET
        if (normkit_f16c) return normkit_f16_narrow_hw(s, d, n);
    #endif
        return normkit_f16_narrow_soft(s, d, n);
    }

    /* The statistics pass straight from 16-bit data where the build has AVX2, FMA and F16C (the x86-64-v3 one),
       in float32 lanes chunk by chunk, as grad_sums() sums float32 data: d = x - pivot and d * d are exact in
       float32 for 16-bit x near the pivot (8 or 11 significant bits, squared: 16 or 22), each chunk of
       NORMKIT_SUM_CHUNK values is summed in four registers per sum and then added into double; a chunk whose sums
       are not finite (d * d beyond float32's range, or NaN/inf data) is summed again in double. With the loads
       widened to double, 4 values per step, the pass was bound by its instruction count ((32, 16, 56, 56)
       bfloat16 BatchNorm forward: ~110 of 205 us). Returns 0 where it does not apply. */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    #define NORMKIT_LOAD8_BF16(p) \
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16))
    #define NORMKIT_LOAD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
    #define NORMKIT_MOMENTS8(A, B, LOAD, j) d = _mm256_sub_ps(LOAD(x + (j)), p); A = _mm256_add_ps(A, d); \
        B = _mm256_fmadd_ps(d, d, B);
    /* one chunk's float32 sums ta, tb of x[i0..end) about pf: 8 lanes, four registers per sum, the last values
       one by one */
    #define NORMKIT_MOMENTS_CHUNK8(LOAD, SCALAR) {                                                    \
            const __m256 p = _mm256_set1_ps(pf), z = _mm256_setzero_ps();                             \
            __m256 a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z, d;                 \
            float e;                                                                                  \
            for (i = i0; i + 32 <= end; i += 32) {                                                    \
                NORMKIT_MOMENTS8(a0, b0, LOAD, i) NORMKIT_MOMENTS8(a1, b1, LOAD, i + 8)               \
                NORMKIT_MOMENTS8(a2, b2, LOAD, i + 16) NORMKIT_MOMENTS8(a3, b3, LOAD, i + 24)         \
            }                                                                                         \
            for (; i + 8 <= end; i += 8) { NORMKIT_MOMENTS8(a0, b0, LOAD, i) }                        \
            ta = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));          \
            tb = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));          \
            for (; i < end; i++) { e = SCALAR(x[i]) - pf; ta += e; tb += e * e; }                     \
        }
    /* NAME(x, n, pivot, s1, s2): each chunk's sums by CHUNK (a NORMKIT_MOMENTS_CHUNK*), added into double; a
       chunk whose sums are not finite summed again in double */
    #define NORMKIT_MOMENTS16(NAME, CHUNK, SCALAR)                                                    \
        static inline void NAME(const uint16_t* x, Py_ssize_t n, double pivot, double* s1, double* s2) { \
            const float pf = (float)pivot;                                                            \
            Py_ssize_t i0, i, end;                                                                    \
            float ta, tb;                                                                             \
            double da, db, de, t1 = *s1, t2 = *s2;  /* in locals: see grad_sums() */                  \
            for (i0 = 0; i0 < n; i0 += NORMKIT_SUM_CHUNK) {                                           \
                end = i0 + NORMKIT_SUM_CHUNK < n ? i0 + NORMKIT_SUM_CHUNK : n;                        \
                CHUNK                                                                                 \
                if (isfinite(ta) && isfinite(tb)) { t1 += ta; t2 += tb; continue; }                   \
                da = 0.0; db = 0.0;                                                                   \
                for (i = i0; i < end; i++) { de = SCALAR(x[i]) - pivot; da += de; db += de * de; }    \
                t1 += da; t2 += db;                                                                   \
            }                                                                                         \
            *s1 = t1; *s2 = t2;                                                                       \
        }
    #define NORMKIT_BF16_SCALAR(h) normkit_float_of((uint32_t)(h) << 16)
    #ifndef __AVX512F__  /* the x86-64-v4 build's 16-lane ones follow normkit_load16 */
    NORMKIT_MOMENTS16(normkit_moments_bf16, NORMKIT_MOMENTS_CHUNK8(NORMKIT_LOAD8_BF16, NORMKIT_BF16_SCALAR),
                      NORMKIT_BF16_SCALAR)
    NORMKIT_MOMENTS16(normkit_moments_f16, NORMKIT_MOMENTS_CHUNK8(NORMKIT_LOAD8_F16, _cvtsh_ss), _cvtsh_ss)
    #endif
    #endif

    /* The elementwise passes of the channel ops straight from and to 16-bit data where the build has AVX2 and
       F16C: widened and rounded in registers (bfloat16's RNE in integers, NORMKIT_STORE16), 16 values a step.
       They return whether every output is finite, or -1 where they do not apply (then the callers go tile by
       tile).
       Measured on (32, 16, 56, 56) bfloat16 BatchNorm inference, 2 threads: 8 values a step with the format
       tested inside the loop ran at 10 values/ns, half float16's speed, bound by the count of instructions. */
    #define NORMKIT_COMMA ,
    #if defined(__AVX2__) && defined(__F16C__)
    static inline __m256 normkit_load8(const uint16_t* p, int fmt) {
        __m128i h = _mm_loadu_si128((const __m128i*)p);
        return fmt == 0 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    }

    static inline float normkit_scalar16(uint16_t h, int fmt) {
        return fmt ? _cvtsh_ss(h) : normkit_float_of((uint32_t)h << 16);
    }

    /* The variables NORMKIT_STORE16 uses (declared once per loop) and what it does: 16 float32 values v0, v1 rounded to
       16 bits and stored at PO. bfloat16 rounds without per-lane NaN care (no blend): every value whose
       rounding is not a finite bfloat16 (NaN, inf, or beyond the largest finite one, |bits| > 0x7F7F7FFF) is
       flagged in big instead, and the callers redo those runs in double; float16 flags non-finite outputs in bad.
       NORMKIT_ALL_FINITE says whether nothing was flagged.
       These loops are bound by their instruction count: with two 8-lane registers bfloat16 ran at 60% of float16's
       speed ((4, 64, 4096) BatchNorm inference, one thread: 8.0 against 13.4 values/ns). The x86-64-v4 build
       rounds bfloat16 in one 16-lane register (the same bits; 10.8), and the loops that can run a whole step in
       one 16-lane register do (NORMKIT_STEP16 below; 14.6, float16 17.8). AVX512-BF16's VCVTNEPS2BF16 in 8-lane
       registers gave 8.4: it reads float32 subnormals as zero, so every value has to be tested for one, which
       costs what the instruction saves. */
    #define NORMKIT_STORE16_VARS                                                                      \
        const __m256i top = _mm256_set1_epi16(0x7C00);                                                \
        __m256i h, bad = _mm256_setzero_si256();                                                      \
        NORMKIT_BF16_VARS
    #ifdef __AVX512F__
    #define NORMKIT_BF16_VARS                                                                         \
        const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);               \
        const __m512i half = _mm512_set1_epi32(0x7FFF);                                               \
        __m512i u, big = _mm512_setzero_si512();
    #define NORMKIT_BF16_ROUND NORMKIT_BF16_ROUND512(_mm512_insertf32x8(_mm512_castps256_ps512(v0), v1, 1))
    /* h = the 16 values of V (__m512) rounded to bfloat16, flagged as NORMKIT_STORE16 does */
    #define NORMKIT_BF16_ROUND512(V)                                                                  \
            u = _mm512_castps_si512(V);                                                               \
            big = _mm512_max_epu32(big, _mm512_and_si512(u, abs));                                    \
            u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half),                         \
                                  _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);              \
            h = _mm512_cvtepi32_epi16(u);
    #define NORMKIT_BF16_FINITE (_mm512_cmpgt_epu32_mask(big, _mm512_set1_epi32(0x7F7F7FFF)) == 0)
    #else
    #define NORMKIT_BF16_VARS                                                                         \
        const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF), one = _mm256_set1_epi32(1);               \
        const __m256i half = _mm256_set1_epi32(0x7FFF);                                               \
        __m256i u0, u1, big = _mm256_setzero_si256();
    #define NORMKIT_BF16_ROUND                                                                        \
            u0 = _mm256_castps_si256(v0); u1 = _mm256_castps_si256(v1);                               \
            big = _mm256_max_epu32(big, _mm256_max_epu32(_mm256_and_si256(u0, abs), _mm256_and_si256(u1, abs))); \
            u0 = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u0, half),                        \
                                   _mm256_and_si256(_mm256_srli_epi32(u0, 16), one)), 16);             \
            u1 = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u1, half),                        \
                                   _mm256_and_si256(_mm256_srli_epi32(u1, 16), one)), 16);             \
            h = _mm256_permute4x64_epi64(_mm256_packus_epi32(u0, u1), 0xD8);
    #define NORMKIT_BF16_FINITE                                                                       \
        (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(big, _mm256_set1_epi32(0x7F7F7FFF)))) == 0)
    #endif
    #define NORMKIT_STORE16(PO)                                                                       \
        if (fmt) {                                                                                    \
            h = _mm256_set_m128i(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT),                      \
                                 _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));                     \
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, top), top));           \
        } else {                                                                                      \
            NORMKIT_BF16_ROUND                                                                        \
        }                                                                                             \
        _mm256_storeu_si256((__m256i*)(PO), h);
    #define NORMKIT_ALL_FINITE                                                                        \
        (fmt ? _mm256_testz_si256(bad, bad) : NORMKIT_BF16_FINITE)
    /* One step of NORMKIT_PASS16: 16 outputs from x (and dy) at PX (PDY) stored at PO, in one 16-lane register in
       the x86-64-v4 build (loads, arithmetic and rounding: ~13 instructions a step against ~20 in two 8-lane ones),
       else in two 8-lane ones. NORMKIT_VEC, _SET1, _SUB and _FMADD write VALUE once for both. */
    #ifdef __AVX512F__
    #define NORMKIT_VEC __m512
    #define NORMKIT_SET1 _mm512_set1_ps
    #define NORMKIT_SUB _mm512_sub_ps
    #define NORMKIT_FMADD _mm512_fmadd_ps
    static inline __m512 normkit_load16(const uint16_t* p, int fmt) {
        __m256i h = _mm256_loadu_si256((const __m256i*)p);
        return fmt == 1 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    /* the first k (< 16) values at p, the other lanes 0 (a masked load reads nothing past them) */
    static inline __m512 normkit_load16_first(const uint16_t* p, Py_ssize_t k, int fmt) {
        __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << k) - 1), p);
        return fmt == 1 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    /* NORMKIT_MOMENTS_CHUNK8 with 16 lanes a register (two per sum) and the chunk's last n % 16 values in a masked
       step rather than one by one: runs of a few hundred values (BatchNorm's rows of 7x7 to 28x28) spent as much
       in the scalar tail and the 8-lane horizontal sums as in the loop */
    #define NORMKIT_MOMENTS_CHUNK16(FMT) {                                                            \
            const __m512 p = _mm512_set1_ps(pf), z = _mm512_setzero_ps();                             \
            __m512 a0 = z, a1 = z, b0 = z, b1 = z, d;                                                 \
            for (i = i0; i + 32 <= end; i += 32) {                                                    \
                d = _mm512_sub_ps(normkit_load16(x + i, FMT), p);                                     \
                a0 = _mm512_add_ps(a0, d); b0 = _mm512_fmadd_ps(d, d, b0);                            \
                d = _mm512_sub_ps(normkit_load16(x + i + 16, FMT), p);                                \
                a1 = _mm512_add_ps(a1, d); b1 = _mm512_fmadd_ps(d, d, b1);                            \
            }                                                                                         \
            if (i + 16 <= end) {                                                                      \
                d = _mm512_sub_ps(normkit_load16(x + i, FMT), p);                                     \
                a0 = _mm512_add_ps(a0, d); b0 = _mm512_fmadd_ps(d, d, b0);                            \
                i += 16;                                                                              \
            }                                                                                         \
            if (i < end) {                                                                            \
                d = _mm512_maskz_sub_ps((__mmask16)((1u << (end - i)) - 1),                           \
                                        normkit_load16_first(x + i, end - i, FMT), p);                \
                a1 = _mm512_add_ps(a1, d); b1 = _mm512_fmadd_ps(d, d, b1);                            \
            }                                                                                         \
            ta = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                         \
            tb = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));                                         \
        }
    NORMKIT_MOMENTS16(normkit_moments_bf16, NORMKIT_MOMENTS_CHUNK16(0), NORMKIT_BF16_SCALAR)
    NORMKIT_MOMENTS16(normkit_moments_f16, NORMKIT_MOMENTS_CHUNK16(1), _cvtsh_ss)
    #define NORMKIT_LOADU _mm512_loadu_ps
    #define NORMKIT_MUL _mm512_mul_ps
    #define NORMKIT_ADD _mm512_add_ps
    #define NORMKIT_LOAD_DATA normkit_load16
    #define NORMKIT_STEP_VARS __m512 v;
    /* v (16 lanes) rounded to 16 bits, flagged as NORMKIT_STORE16 does, and stored at PO */
    #define NORMKIT_STORE_V(PO)                                                                       \
        if (fmt) {                                                                                    \
            h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);                                        \
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, top), top));           \
        } else {                                                                                      \
            NORMKIT_BF16_ROUND512(v)                                                                  \
        }                                                                                             \
        _mm256_storeu_si256((__m256i*)(PO), h);
    #define NORMKIT_STEP16(PX, PDY, PO, VALUE)                                                        \
        vx = normkit_load16(PX, fmt); vdy = (PDY) ? normkit_load16(PDY, fmt) : vx; v = VALUE;         \
        NORMKIT_STORE_V(PO)
    /* a step of 16 values of a per-value expression E(o) of the values at offset o */
    #define NORMKIT_STEP16_AT(PO, E) v = E(0); NORMKIT_STORE_V(PO)
    #else
    #define NORMKIT_VEC __m256
    #define NORMKIT_SET1 _mm256_set1_ps
    #define NORMKIT_SUB _mm256_sub_ps
    #define NORMKIT_FMADD _mm256_fmadd_ps
    #define NORMKIT_LOADU _mm256_loadu_ps
    #define NORMKIT_MUL _mm256_mul_ps
    #define NORMKIT_ADD _mm256_add_ps
    #define NORMKIT_LOAD_DATA normkit_load8
    #define NORMKIT_STEP_VARS __m256 v0, v1;
    #define NORMKIT_STEP16(PX, PDY, PO, VALUE)                                                        \
        vx = normkit_load8(PX, fmt); vdy = (PDY) ? normkit_load8(PDY, fmt) : vx; v0 = VALUE;          \
        vx = normkit_load8((PX) + 8, fmt); vdy = (PDY) ? normkit_load8((PDY) + 8, fmt) : vx; v1 = VALUE; \
        NORMKIT_STORE16(PO)
    #define NORMKIT_STEP16_AT(PO, E) v0 = E(0); v1 = E(8); NORMKIT_STORE16(PO)
    #endif
    #define NORMKIT_OVERLAP(P, Q, n) ((uintptr_t)(P) < (uintptr_t)((Q) + (n)) && (uintptr_t)(Q) < (uintptr_t)((P) + (n)))
    /* NAME(dy, x, out, n, fmt, PARAMS): out = VALUE of vx (x) and vdy (dy, or x where dy is NULL), 16 values a step.
       The loop is inlined once per format (fmt a constant: no test in the loop). The last n % 16 values: a last
       step over the final 16 values of the run, which recomputes some of the previous step's (the same values),
       when the run has 16 or more and out overlaps neither input; otherwise through zero-padded buffers (a
       padding lane may flag a non-finite value, which only costs the callers' double pass). */
    #define NORMKIT_PASS16(NAME, PARAMS, ARGS, SETUP, VALUE)                                          \
        static inline __attribute__((always_inline)) int NAME##_loop(                                 \
                const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt PARAMS) { \
            NORMKIT_STORE16_VARS                                                                      \
            NORMKIT_STEP_VARS                                                                         \
            NORMKIT_VEC vx, vdy;                                                                      \
            uint16_t tdy[16] = {0}, tx[16] = {0}, to[16];                                             \
            Py_ssize_t i = 0;                                                                         \
            SETUP                                                                                     \
            for (; i + 16 <= n; i += 16) {                                                            \
                NORMKIT_STEP16(x + i, dy ? dy + i : NULL, out + i, VALUE)                             \
            }                                                                                         \
            if (i < n && i > 0 && !NORMKIT_OVERLAP(out, x, n) && !(dy && NORMKIT_OVERLAP(out, dy, n))) { \
                i = n - 16;                                                                           \
                NORMKIT_STEP16(x + i, dy ? dy + i : NULL, out + i, VALUE)                             \
            } else if (i < n) {                                                                       \
                memcpy(tx, x + i, (size_t)(n - i) * 2);                                               \
                if (dy) memcpy(tdy, dy + i, (size_t)(n - i) * 2);                                     \
                NORMKIT_STEP16(tx, dy ? tdy : NULL, to, VALUE)                                        \
                memcpy(out + i, to, (size_t)(n - i) * 2);                                             \
            }                                                                                         \
            return NORMKIT_ALL_FINITE;                                                                \
        }                                                                                             \
        static int NAME(const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt PARAMS) { \
            if (fmt == 1 && !normkit_f16c) return -1;                                                 \
            if (dy) return fmt ? NAME##_loop(dy, x, out, n, 1 ARGS) : NAME##_loop(dy, x, out, n, 0 ARGS); \
            return fmt ? NAME##_loop(NULL, x, out, n, 1 ARGS) : NAME##_loop(NULL, x, out, n, 0 ARGS); \
        }
    /* y = (x - m) * a + c and dx = a * dy + b * (x - m) + c, as affine() and grad_apply() compute them */
    #define NORMKIT_AFFINE_PARAMS NORMKIT_COMMA float m NORMKIT_COMMA float a NORMKIT_COMMA float c
    #define NORMKIT_AFFINE_ARGS NORMKIT_COMMA m NORMKIT_COMMA a NORMKIT_COMMA c
    #define NORMKIT_GRAD_PARAMS NORMKIT_COMMA float m NORMKIT_COMMA float a NORMKIT_COMMA float b NORMKIT_COMMA float c
    #define NORMKIT_GRAD_ARGS NORMKIT_COMMA m NORMKIT_COMMA a NORMKIT_COMMA b NORMKIT_COMMA c
    NORMKIT_PASS16(normkit_affine16_v3, NORMKIT_AFFINE_PARAMS, NORMKIT_AFFINE_ARGS,
                   NORMKIT_VEC vm = NORMKIT_SET1(m); NORMKIT_VEC va = NORMKIT_SET1(a); NORMKIT_VEC vc = NORMKIT_SET1(c);,
                   NORMKIT_FMADD(NORMKIT_SUB(vx, vm), va, vc))
    NORMKIT_PASS16(normkit_grad_apply16_v3, NORMKIT_GRAD_PARAMS, NORMKIT_GRAD_ARGS,
                   NORMKIT_VEC vm = NORMKIT_SET1(m); NORMKIT_VEC va = NORMKIT_SET1(a); NORMKIT_VEC vb = NORMKIT_SET1(b);
                   NORMKIT_VEC vc = NORMKIT_SET1(c);,
                   NORMKIT_FMADD(va, vdy, NORMKIT_FMADD(vb, NORMKIT_SUB(vx, vm), vc)))

    /* The same passes with one coefficient per value rather than per run (BatchNorm's columns schedule, which walks
       (N, C*S) rows when S is small): y = (x - m) * a + c, and dx = a * dy + b * (x - m) + c (training) or a * dy,
       with m, a, b, c arrays of n floats. Flags and result as NORMKIT_PASS16's; the last n % 16 values through
       zero-padded buffers. */
    #define NORMKIT_COLS(DY, X, M, A, B, C, MODE)                                                     \
        ((MODE) == 0 ? NORMKIT_FMADD(NORMKIT_SUB(NORMKIT_LOAD_DATA(X, fmt), NORMKIT_LOADU(M)),        \
                                     NORMKIT_LOADU(A), NORMKIT_LOADU(C))                              \
         : (MODE) == 1 ? NORMKIT_FMADD(NORMKIT_LOADU(A), NORMKIT_LOAD_DATA(DY, fmt),                  \
                                       NORMKIT_FMADD(NORMKIT_LOADU(B),                                \
                                                     NORMKIT_SUB(NORMKIT_LOAD_DATA(X, fmt), NORMKIT_LOADU(M)), \
                                                     NORMKIT_LOADU(C)))                               \
         : NORMKIT_MUL(NORMKIT_LOADU(A), NORMKIT_LOAD_DATA(DY, fmt)))
    /* mode 0 affine (dy unused), 1 training gradient, 2 inference gradient (x, m, b, c unused) */
    static inline __attribute__((always_inline)) int normkit_cols16_loop(
            const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt, const float* m,
            const float* a, const float* b, const float* c, int mode) {
        NORMKIT_STORE16_VARS
        NORMKIT_STEP_VARS
        uint16_t tdy[16] = {0}, tx[16] = {0}, to[16];
        float tm[16] = {0}, ta[16] = {0}, tb[16] = {0}, tc[16] = {0};
        Py_ssize_t i = 0;
        size_t k;
        #define NORMKIT_COLS_AT(o) NORMKIT_COLS(dy + i + (o), x + i + (o), m + i + (o), a + i + (o), b + i + (o), \
                                                c + i + (o), mode)
        #define NORMKIT_COLS_TAIL(o) NORMKIT_COLS(tdy + (o), tx + (o), tm + (o), ta + (o), tb + (o), tc + (o), mode)
        for (; i + 16 <= n; i += 16) {
            NORMKIT_STEP16_AT(out + i, NORMKIT_COLS_AT)
        }
        if (i < n) {
            k = (size_t)(n - i);
            memcpy(ta, a + i, k * 4);
            if (mode != 0) memcpy(tdy, dy + i, k * 2);
            if (mode != 2) {
                memcpy(tx, x + i, k * 2);
                memcpy(tm, m + i, k * 4);
                memcpy(tc, c + i, k * 4);
            }
            if (mode == 1) memcpy(tb, b + i, k * 4);
            NORMKIT_STEP16_AT(to, NORMKIT_COLS_TAIL)
            memcpy(out + i, to, k * 2);
        }
        #undef NORMKIT_COLS_TAIL
        #undef NORMKIT_COLS_AT
        return NORMKIT_ALL_FINITE;
    }

    static int normkit_cols16_v3(const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt,
                                 const float* m, const float* a, const float* b, const float* c, int mode) {
        if (fmt == 1 && !normkit_f16c) return -1;
        #define NORMKIT_COLS16(FMT, MODE) normkit_cols16_loop(dy, x, out, n, FMT, m, a, b, c, MODE)
        if (mode == 0) return fmt ? NORMKIT_COLS16(1, 0) : NORMKIT_COLS16(0, 0);
        if (mode == 1) return fmt ? NORMKIT_COLS16(1, 1) : NORMKIT_COLS16(0, 1);
        return fmt ? NORMKIT_COLS16(1, 2) : NORMKIT_COLS16(0, 2);
        #undef NORMKIT_COLS16
    }
    #endif

    /* The column sums of BatchNorm's columns schedule (and of the channels-last GroupNorm / InstanceNorm kernels):
       for each column l in l0..l1 of n rows at stride length, s1[l] = sum(d) and s2[l] = sum(d * d)
       with d = x - p[l] (the moments, dy NULL), or s1[l] = sum(dy) and s2[l] = sum(dy * d) (p the mean). Rows go
       in groups of 8, each group across all the columns (a row is read once, straight through: channels-last data
       of 64 to 256 channels are rows of 64 to 256 values), up to NORMKIT_CREGS registers of columns a step (8 of
       16 columns in the x86-64-v4 build, 4 of 8 in the x86-64-v3 one), the last step's last register holding the
       columns left over; each group's terms summed in float32 lanes (exact for 16-bit data near p; 8 float32
       terms for float32 data, as column_moments() sums 4), then added into double. Returns 0 where it does not
       apply; the callers check the sums are finite (else they sum again in double).
       The loops of column_moments() / column_grad_sums() (four rows a sweep, the double sums loaded and stored each
       sweep) read float32 data from memory at about half a two-thread read's speed: channels-last BatchNorm (32,
       64, 56, 56)'s gradient sums, 2 threads, 1.77 -> 0.91 ms. The 16-bit loop walked each 32-column strip through
       all the rows of its task before the next strip, reading wide rows from memory once per strip.
       Each load is preceded by a prefetch of the same columns NORMKIT_PREFETCH_BYTES further on (8 rows at least):
       with the hardware's prefetchers alone, the moments read from memory at 55-65% of a plain read's speed. Against
       no prefetch (2 threads, caches flushed before each call, one process sweeping 4-32 KB; 4-16 KB alike):
       channels-last GroupNorm (8, 256, 56, 56) forward 0.88, backward 0.86; (32, 64, 56, 56) 0.98 / 0.83;
       BatchNorm's columns on (12544, 256) 0.83 / 0.88, (100352, 64) 1.0 / 0.95, (256, 1024) 0.88 / 0.89; bfloat16
       (12544, 256) 0.81 / 0.74, (100352, 64) 0.91 / 0.95.
       From memory the rows read at full speed only where one step covers a whole row: where a second step goes
       back over the group's rows, at about half of it (a C model, 1 thread, float32 from 100 MB: rows of 128
       values in one step of 8 registers 22-23 GB/s, in two of 4 11-14; rows of 256 in steps of any width 8-10,
       rows of 64 in one step 22-24; in cache all alike). Steps of 8 registers rather than 4, in-process, (R, C)
       float32 of 6.4M values, ms: 1 thread, C = 128, forward 5.24 -> 3.81, backward 7.44 -> 5.62, gradient sums
       4.18 -> 2.34; 2 threads, C = 96, 2.95 -> 2.59, 5.01 -> 4.01, 2.67 -> 1.69; C = 128, 3.07 -> 2.71, 5.01 ->
       4.27, 2.34 -> 1.82; bfloat16, 1 thread, C = 128, forward 2.14 -> 1.83, backward 4.45 -> 3.90; C = 64 and
       192 to 256 unchanged.
       Data from memory (from_memory: FROM_MEMORY_BYTES and more) with rows wider than a step and at most
       NORMKIT_WIDE_COLS values go whole rows at a time instead (NAME_whole_rows): each row of a group of 8 read
       once straight through, the group's float32 sums kept in L1 (A, B) between its rows, the last row's added
       into double: the same operations in the same order as the steps, so the same bits, with one pass over each
       row; rows from memory read at 1.3-2.7x the steps' speed (BatchNorm (R, 256, 1) float32 gradient sums, 1
       thread, 100 MB, 19.7 -> 7.2 ms; a C model of it: steps 20.6-20.9 ms, whole rows 8.6-10.1, at 512 values
       18.3-20.8 against 9.3-13.3; software prefetching, as the steps do, made whole rows slower: 10.7 -> 12.5 ms
       at 256, 1 thread). In cache the steps win (fewer loads and stores; FROM_MEMORY_BYTES). */
    #define NORMKIT_PREFETCH_BYTES 8192
    #define NORMKIT_WIDE_COLS 1024
    #if defined(__AVX2__) && defined(__FMA__)
    #ifdef __AVX512F__
    #define NORMKIT_CW 16
    #define NORMKIT_CREGS 8
    #define NORMKIT_COL_STEP_WIDE(NAME, ...) NORMKIT_COL_STEP(NAME, 5, __VA_ARGS__) \
        NORMKIT_COL_STEP(NAME, 6, __VA_ARGS__) NORMKIT_COL_STEP(NAME, 7, __VA_ARGS__) \
        NORMKIT_COL_STEP(NAME, 8, __VA_ARGS__)
    #define NORMKIT_CVEC __m512
    #define NORMKIT_CLOAD _mm512_loadu_ps
    #define NORMKIT_CLOADN(P, K) _mm512_maskz_loadu_ps((__mmask16)((1u << (K)) - 1), (P))
    #define NORMKIT_CZERO _mm512_setzero_ps
    #define NORMKIT_CSUB _mm512_sub_ps
    #define NORMKIT_CADD _mm512_add_ps
    #define NORMKIT_CFMADD _mm512_fmadd_ps
    #define NORMKIT_CMUL _mm512_mul_ps
    #define NORMKIT_CSTORE _mm512_store_ps
    static inline void normkit_add_pd_c(double* s, __m512 v) {
        _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
        _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), _mm512_cvtps_pd(
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))));
    }
    #else
    #define NORMKIT_CW 8
    #define NORMKIT_CREGS 4
    #define NORMKIT_COL_STEP_WIDE(NAME, ...)
    #define NORMKIT_CVEC __m256
    #define NORMKIT_CLOAD _mm256_loadu_ps
    #define NORMKIT_CLOADN(P, K) _mm256_maskload_ps((P), normkit_first_lanes(K))
    #define NORMKIT_CZERO _mm256_setzero_ps
    #define NORMKIT_CSUB _mm256_sub_ps
    #define NORMKIT_CADD _mm256_add_ps
    #define NORMKIT_CFMADD _mm256_fmadd_ps
    #define NORMKIT_CMUL _mm256_mul_ps
    #define NORMKIT_CSTORE _mm256_store_ps
    static inline __m256i normkit_first_lanes(int k) {  /* lanes 0..k-1 set */
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static inline void normkit_add_pd_c(double* s, __m256 v) {
        _mm256_storeu_pd(s, _mm256_add_pd(_mm256_loadu_pd(s), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
        _mm256_storeu_pd(s + 4, _mm256_add_pd(_mm256_loadu_pd(s + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
    }
    #endif

    /* the first k lanes of a and b added into the double sums s1[0..k-1], s2[0..k-1] (a partial register) */
    static inline void normkit_add_pd_first(double* s1, double* s2, NORMKIT_CVEC a, NORMKIT_CVEC b, int k) {
        double t1[NORMKIT_CW] = {0.0}, t2[NORMKIT_CW] = {0.0};
        int j;
        normkit_add_pd_c(t1, a);
        normkit_add_pd_c(t2, b);
        for (j = 0; j < k; j++) { s1[j] += t1[j]; s2[j] += t2[j]; }
    }

    /* NAME_rows: rows i0..e (at most 8) of V full registers of columns from column l and, if k > 0, one register
       of the k columns after them, summed in float32 and added into the double sums. NAME_loop: all n rows,
       columns l0..l1, each group of rows in steps of at most NORMKIT_CREGS registers. T is the data's type,
       LOAD(P) and LOADN(P, K) read a register (its first K values) of it as float32; FMT_PARAM / FMT_ARG pass the
       16-bit format along; grad, V and the format are constants in each call. */
    /* a step of V registers (a constant) in NAME_loop; the arguments after V are FMT_ARG (empty, or a comma and
       the format: its comma already expanded) */
    #define NORMKIT_COL_STEP(NAME, V, ...) case V:                                                         \
        NAME##_rows(dy, x, i0, e, length, l, p, s1, s2, grad, V, k, pf __VA_ARGS__); break;
    #define NORMKIT_COL_SUMS(NAME, T, LOAD, LOADN, FMT_PARAM, FMT_ARG)                                    \
        static inline __attribute__((always_inline)) void NAME##_rows(                                    \
                const T* dy, const T* x, Py_ssize_t i0, Py_ssize_t e, Py_ssize_t length, Py_ssize_t l,     \
                const float* p, double* s1, double* s2, int grad, int V, int k, Py_ssize_t pf FMT_PARAM) {  \
            NORMKIT_CVEC a[NORMKIT_CREGS], b[NORMKIT_CREGS], vp[NORMKIT_CREGS], ak, bk, vk, d, g;          \
            Py_ssize_t i, o, lk = l + NORMKIT_CW * V;                                                      \
            int j;                                                                                         \
            for (j = 0; j < V; j++) {                                                                      \
                a[j] = NORMKIT_CZERO(); b[j] = NORMKIT_CZERO();                                            \
                vp[j] = NORMKIT_CLOAD(p + l + NORMKIT_CW * j);                                             \
            }                                                                                              \
            ak = NORMKIT_CZERO(); bk = NORMKIT_CZERO();                                                    \
            vk = k ? NORMKIT_CLOADN(p + lk, k) : NORMKIT_CZERO();                                          \
            for (i = i0; i < e; i++) {                                                                     \
                for (j = 0; j < V; j++) {                                                                  \
                    o = i * length + l + NORMKIT_CW * j;                                                   \
                    if (pf) {                                                                              \
                        __builtin_prefetch(x + o + pf, 0, 3);                                              \
                        if (grad) __builtin_prefetch(dy + o + pf, 0, 3);                                   \
                    }                                                                                      \
                    d = NORMKIT_CSUB(LOAD(x + o), vp[j]);                                                  \
                    g = grad ? LOAD(dy + o) : d;                                                           \
                    a[j] = NORMKIT_CADD(a[j], g);                                                          \
                    b[j] = NORMKIT_CFMADD(g, d, b[j]);                                                     \
                }                                                                                          \
                if (k) {                                                                                   \
                    o = i * length + lk;                                                                   \
                    if (pf) {                                                                              \
                        __builtin_prefetch(x + o + pf, 0, 3);                                              \
                        if (grad) __builtin_prefetch(dy + o + pf, 0, 3);                                   \
                    }                                                                                      \
                    d = NORMKIT_CSUB(LOADN(x + o, k), vk);                                                 \
                    g = grad ? LOADN(dy + o, k) : d;                                                       \
                    ak = NORMKIT_CADD(ak, g);                                                              \
                    bk = NORMKIT_CFMADD(g, d, bk);                                                         \
                }                                                                                          \
            }                                                                                              \
            for (j = 0; j < V; j++) {                                                                      \
                normkit_add_pd_c(s1 + l + NORMKIT_CW * j, a[j]);                                           \
                normkit_add_pd_c(s2 + l + NORMKIT_CW * j, b[j]);                                           \
            }                                                                                              \
            if (k) normkit_add_pd_first(s1 + lk, s2 + lk, ak, bk, k);                                      \
        }                                                                                                  \
        static inline __attribute__((always_inline)) void NAME##_row_l1(                                   \
                const T* dy, const T* x, Py_ssize_t o, Py_ssize_t l, int V, int k, const float* p,         \
                double* s1, double* s2, float* A, float* B, int grad, int first, int last FMT_PARAM) {     \
            NORMKIT_CVEC d, g, a, b;                                                                       \
            int j;                                                                                         \
            for (j = 0; j <= V; j++, l += NORMKIT_CW) {                                                    \
                if (j == V && !k) break;                                                                   \
                if (j < V) {                                                                               \
                    d = NORMKIT_CSUB(LOAD(x + o + l), NORMKIT_CLOAD(p + l));                               \
                    g = grad ? LOAD(dy + o + l) : d;                                                       \
                } else {                                                                                   \
                    d = NORMKIT_CSUB(LOADN(x + o + l, k), NORMKIT_CLOADN(p + l, k));                       \
                    g = grad ? LOADN(dy + o + l, k) : d;                                                   \
                }                                                                                          \
                if (first) { a = g; b = NORMKIT_CMUL(g, d); }                                              \
                else {                                                                                     \
                    a = NORMKIT_CADD(NORMKIT_CLOAD(A + NORMKIT_CW * j), g);                                \
                    b = NORMKIT_CFMADD(g, d, NORMKIT_CLOAD(B + NORMKIT_CW * j));                           \
                }                                                                                          \
                if (!last) { NORMKIT_CSTORE(A + NORMKIT_CW * j, a); NORMKIT_CSTORE(B + NORMKIT_CW * j, b); } \
                else if (j < V) { normkit_add_pd_c(s1 + l, a); normkit_add_pd_c(s2 + l, b); }              \
                else normkit_add_pd_first(s1 + l, s2 + l, a, b, k);                                        \
            }                                                                                              \
        }                                                                                                  \
        static inline __attribute__((always_inline)) void NAME##_whole_rows(                               \
                const T* dy, const T* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0, Py_ssize_t l1,    \
                const float* p, double* s1, double* s2, int grad FMT_PARAM) {                              \
            float A[NORMKIT_WIDE_COLS] __attribute__((aligned(64)));                                       \
            float B[NORMKIT_WIDE_COLS] __attribute__((aligned(64)));                                       \
            Py_ssize_t i0, i, e;                                                                           \
            int V = (int)((l1 - l0) / NORMKIT_CW), k = (int)((l1 - l0) % NORMKIT_CW);                      \
            for (i0 = 0; i0 < n; i0 += 8) {                                                                \
                e = i0 + 8 < n ? i0 + 8 : n;                                                               \
                for (i = i0; i < e; i++) {                                                                 \
                    if (i == i0 && i == e - 1)                                                             \
                        NAME##_row_l1(dy, x, i * length, l0, V, k, p, s1, s2, A, B, grad, 1, 1 FMT_ARG);   \
                    else if (i == i0)                                                                      \
                        NAME##_row_l1(dy, x, i * length, l0, V, k, p, s1, s2, A, B, grad, 1, 0 FMT_ARG);   \
                    else if (i < e - 1)                                                                    \
                        NAME##_row_l1(dy, x, i * length, l0, V, k, p, s1, s2, A, B, grad, 0, 0 FMT_ARG);   \
                    else                                                                                   \
                        NAME##_row_l1(dy, x, i * length, l0, V, k, p, s1, s2, A, B, grad, 0, 1 FMT_ARG);   \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        static inline __attribute__((always_inline)) void NAME##_loop(                                    \
                const T* dy, const T* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0, Py_ssize_t l1,    \
                const float* p, double* s1, double* s2, int grad, int from_memory FMT_PARAM) {             \
            Py_ssize_t i0, e, l, pf, rest, ahead = 8;  /* rows; length is 0 for data without values */    \
            int V, k;                                                                                      \
            if (length > 0 && NORMKIT_PREFETCH_BYTES / (length * (Py_ssize_t)sizeof(T)) > 8)                \
                ahead = NORMKIT_PREFETCH_BYTES / (length * (Py_ssize_t)sizeof(T));                          \
            for (l = l0; l < l1; l++) { s1[l] = 0.0; s2[l] = 0.0; }                                        \
            if (from_memory && l1 - l0 > NORMKIT_CREGS * NORMKIT_CW && l1 - l0 <= NORMKIT_WIDE_COLS) {     \
                NAME##_whole_rows(dy, x, n, length, l0, l1, p, s1, s2, grad FMT_ARG);                      \
                return;                                                                                    \
            }                                                                                              \
            for (i0 = 0; i0 < n; i0 += 8) {                                                                \
                e = i0 + 8 < n ? i0 + 8 : n;                                                               \
                pf = e + ahead <= n ? ahead * length : 0;                                                  \
                for (l = l0; l < l1; l += NORMKIT_CW * V + k) {                                            \
                    rest = l1 - l;                                                                         \
                    V = rest >= NORMKIT_CREGS * NORMKIT_CW ? NORMKIT_CREGS : (int)(rest / NORMKIT_CW);     \
                    k = V == NORMKIT_CREGS ? 0 : (int)(rest % NORMKIT_CW);                                 \
                    switch (V) {                                                                           \
                    NORMKIT_COL_STEP(NAME, 0, FMT_ARG) NORMKIT_COL_STEP(NAME, 1, FMT_ARG)                  \
                    NORMKIT_COL_STEP(NAME, 2, FMT_ARG) NORMKIT_COL_STEP(NAME, 3, FMT_ARG)                  \
                    NORMKIT_COL_STEP(NAME, 4, FMT_ARG) NORMKIT_COL_STEP_WIDE(NAME, FMT_ARG)                \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
        }
    NORMKIT_COL_SUMS(normkit_col_sums32, float, NORMKIT_CLOAD, NORMKIT_CLOADN, , )
    #endif

    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    #ifdef __AVX512F__
    #define NORMKIT_CLOAD16(P) normkit_load16((P), fmt)
    #define NORMKIT_CLOAD16N(P, K) normkit_load16_first((P), (K), fmt)
    #else
    static inline __m256 normkit_load8_first(const uint16_t* p, Py_ssize_t k, int fmt) {
        uint16_t t[8] = {0};
        memcpy(t, p, (size_t)k * 2);
        return normkit_load8(t, fmt);
    }
    #define NORMKIT_CLOAD16(P) normkit_load8((P), fmt)
    #define NORMKIT_CLOAD16N(P, K) normkit_load8_first((P), (K), fmt)
    #endif
    NORMKIT_COL_SUMS(normkit_col_sums16, uint16_t, NORMKIT_CLOAD16, NORMKIT_CLOAD16N, NORMKIT_COMMA int fmt,
                     NORMKIT_COMMA fmt)
    #endif

    static inline int normkit_col_sums32(const float* dy, const float* x, Py_ssize_t n, Py_ssize_t length,
                                         Py_ssize_t l0, Py_ssize_t l1, const float* p, double* s1, double* s2,
                                         int from_memory) {
    #if defined(__AVX2__) && defined(__FMA__)
        if (dy) normkit_col_sums32_loop(dy, x, n, length, l0, l1, p, s1, s2, 1, from_memory);
        else normkit_col_sums32_loop(NULL, x, n, length, l0, l1, p, s1, s2, 0, from_memory);
        return 1;
    #else
        return 0;
    #endif
    }

    static inline int normkit_col_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, Py_ssize_t length,
                                         Py_ssize_t l0, Py_ssize_t l1, const float* p, double* s1, double* s2,
                                         int fmt, int from_memory) {
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (fmt == 1 && !normkit_f16c) return 0;
        /* 16-bit statistics keep the steps from memory too: their float32 sums of whole rows cost more stores per
           byte read than float32 data's; BatchNorm bfloat16 forward, 2 threads, whole rows -> steps, ms: (8192,
           1024, 1) 1.58 -> 1.21, (25000, 1024, 1) 6.18 -> 5.49; x86-64-v3 copy (100352, 64, 1) 1.10 -> 0.97;
           channels-last GroupNorm (8, 3136, 256) 1.61 -> 1.47. (Their gradient sums gain from whole rows.) */
        if (!dy) from_memory = 0;
        #define NORMKIT_COL_SUMS16(FMT, GRAD) \
            normkit_col_sums16_loop(dy, x, n, length, l0, l1, p, s1, s2, GRAD, from_memory, FMT)
        if (dy) { if (fmt) NORMKIT_COL_SUMS16(1, 1); else NORMKIT_COL_SUMS16(0, 1); }
        else { if (fmt) NORMKIT_COL_SUMS16(1, 0); else NORMKIT_COL_SUMS16(0, 0); }
        #undef NORMKIT_COL_SUMS16
        return 1;
    #else
        return 0;
    #endif
    }

    static inline int normkit_cols16(const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt,
                                     const float* m, const float* a, const float* b, const float* c, int mode) {
    #if defined(__AVX2__) && defined(__F16C__)
        return normkit_cols16_v3(dy, x, out, n, fmt, m, a, b, c, mode);
    #else
        return -1;
    #endif
    }

    static int normkit_affine16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, float m, float a, float c) {
    #if defined(__AVX2__) && defined(__F16C__)
        return normkit_affine16_v3(NULL, x, y, n, fmt, m, a, c);
    #else
        return -1;
    #endif
    }

    /* normkit_affine16 on `runs` runs of n values, `stride` values apart (a channel's rows of (N, C, S) data) in one
       call: 1 if every output is finite, 0 if not (the caller then goes run by run, which redoes such runs in
       double), -1 where it does not apply */
    static int normkit_affine16_runs(const uint16_t* x, uint16_t* y, Py_ssize_t runs, Py_ssize_t n,
                                     Py_ssize_t stride, int fmt, float m, float a, float c) {
    #if defined(__AVX2__) && defined(__F16C__)
        int ok = 1;
        Py_ssize_t r;
        if (fmt == 1 && !normkit_f16c) return -1;
        for (r = 0; r < runs; r++, x += stride, y += stride)
            ok &= fmt ? normkit_affine16_v3_loop(NULL, x, y, n, 1, m, a, c)
                      : normkit_affine16_v3_loop(NULL, x, y, n, 0, m, a, c);
        return ok;
    #else
        return -1;
    #endif
    }

    static int normkit_grad_apply16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t n, int fmt,
                                    float m, float a, float b, float c) {
    #if defined(__AVX2__) && defined(__F16C__)
        return normkit_grad_apply16_v3(dy, x, dx, n, fmt, m, a, b, c);
    #else
        return -1;
    #endif
    }

    /* normkit_grad_apply16 on runs as normkit_affine16_runs */
    static int normkit_grad_apply16_runs(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t runs,
                                         Py_ssize_t n, Py_ssize_t stride, int fmt, float m, float a, float b,
                                         float c) {
    #if defined(__AVX2__) && defined(__F16C__)
        int ok = 1;
        Py_ssize_t r;
        if (fmt == 1 && !normkit_f16c) return -1;
        for (r = 0; r < runs; r++, dy += stride, x += stride, dx += stride)
            ok &= fmt ? normkit_grad_apply16_v3_loop(dy, x, dx, n, 1, m, a, b, c)
                      : normkit_grad_apply16_v3_loop(dy, x, dx, n, 0, m, a, b, c);
        return ok;
    #else
        return -1;
    #endif
    }

    static int normkit_moments16(const uint16_t* x, Py_ssize_t n, int fmt, double pivot, double* s1, double* s2) {
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (fmt == 0) { normkit_moments_bf16(x, n, pivot, s1, s2); return 1; }
        if (normkit_f16c) { normkit_moments_f16(x, n, pivot, s1, s2); return 1; }
    #endif
        return 0;
    }

    /* grad_sums() without a weight on a 16-bit run, its loads widened in registers where the build has AVX2, FMA
       and F16C: each chunk of NORMKIT_SUM_CHUNK values summed in float32 lanes (four registers per sum, as
       normkit_grad_chunk_f), then added into double; a chunk whose sums are not finite summed again in double.
       Returns 0 where it does not apply. */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    #define NORMKIT_GSUM16(A, B, j) g = normkit_load8(dy + (j), fmt); A = _mm256_add_ps(A, g);        \
        B = _mm256_fmadd_ps(g, _mm256_sub_ps(normkit_load8(x + (j), fmt), vm), B);

    static inline __attribute__((always_inline)) void normkit_grad_sums16_loop(
            const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt, double mean, double* sdy, double* sdyx) {
        const float mf = (float)mean;
    #ifdef __AVX512F__
        /* 16 lanes, the chunk's last n % 16 values in a masked step (see NORMKIT_MOMENTS16_512) */
        const __m512 vm = _mm512_set1_ps(mf), z = _mm512_setzero_ps();
        __m512 a0, a1, b0, b1, g;
        __mmask16 k;
    #else
        const __m256 vm = _mm256_set1_ps(mf), z = _mm256_setzero_ps();
        __m256 a0, a1, a2, a3, b0, b1, b2, b3, g;
        float gs;
    #endif
        Py_ssize_t i0, i, end;
        float a, b;
        double da, db, dg, t1 = *sdy, t2 = *sdyx;  /* in locals: see grad_sums() */
        for (i0 = 0; i0 < n; i0 += NORMKIT_SUM_CHUNK) {
            end = i0 + NORMKIT_SUM_CHUNK < n ? i0 + NORMKIT_SUM_CHUNK : n;
    #ifdef __AVX512F__
            a0 = a1 = b0 = b1 = z;
            for (i = i0; i + 32 <= end; i += 32) {
                g = normkit_load16(dy + i, fmt); a0 = _mm512_add_ps(a0, g);
                b0 = _mm512_fmadd_ps(g, _mm512_sub_ps(normkit_load16(x + i, fmt), vm), b0);
                g = normkit_load16(dy + i + 16, fmt); a1 = _mm512_add_ps(a1, g);
                b1 = _mm512_fmadd_ps(g, _mm512_sub_ps(normkit_load16(x + i + 16, fmt), vm), b1);
            }
            if (i + 16 <= end) {
                g = normkit_load16(dy + i, fmt); a0 = _mm512_add_ps(a0, g);
                b0 = _mm512_fmadd_ps(g, _mm512_sub_ps(normkit_load16(x + i, fmt), vm), b0);
                i += 16;
            }
            if (i < end) {  /* the other lanes: g = 0 and x - mean = 0 */
                k = (__mmask16)((1u << (end - i)) - 1);
                g = normkit_load16_first(dy + i, end - i, fmt); a1 = _mm512_add_ps(a1, g);
                b1 = _mm512_fmadd_ps(g, _mm512_maskz_sub_ps(k, normkit_load16_first(x + i, end - i, fmt), vm), b1);
            }
            a = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            b = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    #else
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = z;
            for (i = i0; i + 32 <= end; i += 32) {
                NORMKIT_GSUM16(a0, b0, i) NORMKIT_GSUM16(a1, b1, i + 8)
                NORMKIT_GSUM16(a2, b2, i + 16) NORMKIT_GSUM16(a3, b3, i + 24)
            }
            for (; i + 8 <= end; i += 8) { NORMKIT_GSUM16(a0, b0, i) }
            a = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            b = normkit_hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
            for (; i < end; i++) {
                gs = normkit_scalar16(dy[i], fmt);
                a += gs;
                b += gs * (normkit_scalar16(x[i], fmt) - mf);
            }
    #endif
            if (isfinite(a) && isfinite(b)) { t1 += a; t2 += b; continue; }
            da = 0.0; db = 0.0;
            for (i = i0; i < end; i++) {
                dg = normkit_scalar16(dy[i], fmt);
                da += dg;
                db += dg * (normkit_scalar16(x[i], fmt) - (double)mf);  /* about mf, as the other chunks */
            }
            t1 += da; t2 += db;
        }
        *sdy = t1; *sdyx = t2;
    }
    #endif

    static int normkit_grad_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt, double mean,
                                   double* sdy, double* sdyx) {
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        if (fmt == 0) { normkit_grad_sums16_loop(dy, x, n, 0, mean, sdy, sdyx); return 1; }
        if (normkit_f16c) { normkit_grad_sums16_loop(dy, x, n, 1, mean, sdy, sdyx); return 1; }
    #endif
        return 0;
    }

    /* The 16-bit moments (dy NULL: about p, as normkit_moments16) or gradient sums (p the mean, as
       normkit_grad_sums16) of `runs` runs of n values, `stride` values apart (a channel's rows of (N, C, S) data), in
       one call, added to s1 and s2: each chunk of NORMKIT_SUM_CHUNK values of a run summed in float32 lanes as
       there, but the lanes then added into double lanes, and reduced once at the end, rather than to one float per
       chunk and checked. Returns 0, leaving s1 and s2 as they were, where it does not apply (the x86-64-v4 build
       only) or the sums are not finite (the callers then go run by run, which sums such chunks in double). Run by
       run, the reductions and checks of runs of 196 values (BatchNorm (64, 256, 14, 14)) were a third of the
       sums' time. */
    #if defined(__AVX512F__) && defined(__F16C__) && defined(__FMA__)
    static inline void normkit_add_lanes_pd(__m512d* lo, __m512d* hi, __m512 v) {
        *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    #define NORMKIT_RUNS16_STEP(A, B, J)                                                              \
        d = _mm512_sub_ps(normkit_load16(xr + (J), fmt), vp);                                         \
        g = grad ? normkit_load16(gr + (J), fmt) : d;                                                 \
        A = _mm512_add_ps(A, g); B = _mm512_fmadd_ps(g, d, B);
    static inline __attribute__((always_inline)) void normkit_sums16_runs_loop(
            const uint16_t* dy, const uint16_t* x, Py_ssize_t runs, Py_ssize_t n, Py_ssize_t stride, int fmt,
            int grad, float p, __m512d* acc) {
        const __m512 vp = _mm512_set1_ps(p), z = _mm512_setzero_ps();
        __m512 a0, a1, b0, b1, d, g;
        const uint16_t *xr, *gr = NULL;
        Py_ssize_t r, i0, i, end, q;
        for (r = 0; r < runs; r++) {
            xr = x + r * stride;
            if (grad) gr = dy + r * stride;
            if (r + 1 < runs)  /* runs far apart each start a stream the hardware has to find again */
                for (q = 0; q < n * 2 && q < 4096; q += 64) {
                    __builtin_prefetch((const char*)(xr + stride) + q, 0, 3);
                    if (grad) __builtin_prefetch((const char*)(gr + stride) + q, 0, 3);
                }
            for (i0 = 0; i0 < n; i0 += NORMKIT_SUM_CHUNK) {
                end = i0 + NORMKIT_SUM_CHUNK < n ? i0 + NORMKIT_SUM_CHUNK : n;
                a0 = a1 = b0 = b1 = z;
                for (i = i0; i + 32 <= end; i += 32) {
                    NORMKIT_RUNS16_STEP(a0, b0, i) NORMKIT_RUNS16_STEP(a1, b1, i + 16)
                }
                if (i + 16 <= end) { NORMKIT_RUNS16_STEP(a0, b0, i) i += 16; }
                if (i < end) {  /* the other lanes: d = 0 and g = 0 */
                    d = _mm512_maskz_sub_ps((__mmask16)((1u << (end - i)) - 1),
                                            normkit_load16_first(xr + i, end - i, fmt), vp);
                    g = grad ? normkit_load16_first(gr + i, end - i, fmt) : d;
                    a1 = _mm512_add_ps(a1, g); b1 = _mm512_fmadd_ps(g, d, b1);
                }
                normkit_add_lanes_pd(&acc[0], &acc[1], _mm512_add_ps(a0, a1));
                normkit_add_lanes_pd(&acc[2], &acc[3], _mm512_add_ps(b0, b1));
            }
        }
    }
    #endif
    static int normkit_sums16_runs(const uint16_t* dy, const uint16_t* x, Py_ssize_t runs, Py_ssize_t n,
                                   Py_ssize_t stride, int fmt, double p, double* s1, double* s2) {
    #if defined(__AVX512F__) && defined(__F16C__) && defined(__FMA__)
        __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
        double a, b;
        if (fmt == 1 && !normkit_f16c) return 0;
        if (dy) { if (fmt) normkit_sums16_runs_loop(dy, x, runs, n, stride, 1, 1, (float)p, acc);
                  else normkit_sums16_runs_loop(dy, x, runs, n, stride, 0, 1, (float)p, acc); }
        else { if (fmt) normkit_sums16_runs_loop(NULL, x, runs, n, stride, 1, 0, (float)p, acc);
               else normkit_sums16_runs_loop(NULL, x, runs, n, stride, 0, 0, (float)p, acc); }
        a = _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]));
        b = _mm512_reduce_add_pd(_mm512_add_pd(acc[2], acc[3]));
        if (!isfinite(a) || !isfinite(b)) return 0;
        *s1 += a; *s2 += b;
        return 1;
    #else
        return 0;
    #endif
    }

    /* The passes over a 16-bit row of LayerNorm and RMSNorm (y; the backward's sums and
       dx, optionally + dh) straight from and to its bits where the build has AVX2, FMA and F16C: widened and
       rounded in registers, where the float32 copies of the tile-by-tile loops cost more than the memory traffic
       ((8192, 1024) bfloat16 RMSNorm with the add, one thread: ~8.6 ms tile by tile, ~5 ms so). The y and dx
       passes return whether every output is finite (NORMKIT_ALL_FINITE); all return -1 where they do not apply
       (float16 without F16C, or the baseline build), then the callers go tile by tile. */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    /* a register of y from v (x), as _row_y computes them (centered: b is read; else NULL) */
    static inline NORMKIT_VEC normkit_row_y(NORMKIT_VEC v, const float* w, const float* b, int centered,
                                            NORMKIT_VEC m, NORMKIT_VEC rs, NORMKIT_VEC c0) {
        if (centered)
            return NORMKIT_FMADD(NORMKIT_FMADD(NORMKIT_SUB(v, m), rs, c0), NORMKIT_LOADU(w), NORMKIT_LOADU(b));
        return NORMKIT_MUL(NORMKIT_MUL(v, rs), NORMKIT_LOADU(w));
    }

    /* centered and fmt are constants in each call from normkit_row_y16, so that every combination is a loop
       of its own, without branches or reloaded constants in it */
    static inline __attribute__((always_inline)) int normkit_row_y16_loop(
            const uint16_t* x, uint16_t* y, Py_ssize_t n, const float* w, const float* b,
            float mean, float rstd, float c0, int centered, int fmt) {
        NORMKIT_STORE16_VARS
        NORMKIT_STEP_VARS
        const NORMKIT_VEC m = NORMKIT_SET1(mean), rs = NORMKIT_SET1(rstd), c = NORMKIT_SET1(c0);
        uint16_t tx[16] = {0}, to[16];
        float tw[16] = {0}, tb[16] = {0};
        Py_ssize_t i = 0;
        /* the register of y at offset o from X, W, B */
        #define NORMKIT_Y(X, W, B, o) \
            normkit_row_y(NORMKIT_LOAD_DATA((X) + (o), fmt), (W) + (o), centered ? (B) + (o) : NULL, centered, m, rs, c)
        #define NORMKIT_Y_AT(o) NORMKIT_Y(x + i, w + i, b + i, o)
        #define NORMKIT_Y_TAIL(o) NORMKIT_Y(tx, tw, tb, o)
        for (; i + 16 <= n; i += 16) {
            NORMKIT_STEP16_AT(y + i, NORMKIT_Y_AT)
        }
        if (i < n) {  /* through zero-padded buffers (whose lanes give 0, or are flagged and cost a double pass) */
            memcpy(tx, x + i, (size_t)(n - i) * 2);
            memcpy(tw, w + i, (size_t)(n - i) * 4);
            if (centered) memcpy(tb, b + i, (size_t)(n - i) * 4);
            NORMKIT_STEP16_AT(to, NORMKIT_Y_TAIL)
            memcpy(y + i, to, (size_t)(n - i) * 2);
        }
        #undef NORMKIT_Y_TAIL
        #undef NORMKIT_Y_AT
        #undef NORMKIT_Y
        return NORMKIT_ALL_FINITE;
    }

    /* dx = rstd * w * dy + cb * (x - mean) + cc (+ dh where dh is not NULL), as _row_dx computes it; returns whether
       every output is finite. has_dh and fmt are constants in each call from normkit_row_dx16. */
    static inline __attribute__((always_inline)) int normkit_row_dx16_loop(
            const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t n, const float* w,
            float mean, float rstd, float cb, float cc, int has_dh, int fmt) {
        NORMKIT_STORE16_VARS
        NORMKIT_STEP_VARS
        const NORMKIT_VEC m = NORMKIT_SET1(mean), rs = NORMKIT_SET1(rstd);
        const NORMKIT_VEC b = NORMKIT_SET1(cb), c = NORMKIT_SET1(cc);
        uint16_t tdy[16] = {0}, tdh[16] = {0}, tx[16] = {0}, to[16];
        float tw[16] = {0};
        Py_ssize_t i = 0;
        /* the register of dx at offset o (the 8-lane build's order of operations: dh added last) */
        #define NORMKIT_DX0(DY, X, W, o)                                                                  \
            NORMKIT_FMADD(NORMKIT_MUL(rs, NORMKIT_LOADU((W) + (o))), NORMKIT_LOAD_DATA((DY) + (o), fmt),  \
                          NORMKIT_FMADD(b, NORMKIT_SUB(NORMKIT_LOAD_DATA((X) + (o), fmt), m), c))
        #define NORMKIT_DX(DY, DH, X, W, o)                                                               \
            (has_dh ? NORMKIT_ADD(NORMKIT_DX0(DY, X, W, o), NORMKIT_LOAD_DATA((DH) + (o), fmt))          \
                    : NORMKIT_DX0(DY, X, W, o))
        #define NORMKIT_DX_AT(o) NORMKIT_DX(dy + i, dh + i, x + i, w + i, o)
        #define NORMKIT_DX_TAIL(o) NORMKIT_DX(tdy, tdh, tx, tw, o)
        for (; i + 16 <= n; i += 16) {
            NORMKIT_STEP16_AT(dx + i, NORMKIT_DX_AT)
        }
        if (i < n) {  /* through zero-padded buffers, as normkit_row_y16_loop */
            memcpy(tdy, dy + i, (size_t)(n - i) * 2);
            memcpy(tx, x + i, (size_t)(n - i) * 2);
            memcpy(tw, w + i, (size_t)(n - i) * 4);
            if (has_dh) memcpy(tdh, dh + i, (size_t)(n - i) * 2);
            NORMKIT_STEP16_AT(to, NORMKIT_DX_TAIL)
            memcpy(dx + i, to, (size_t)(n - i) * 2);
        }
        #undef NORMKIT_DX_TAIL
        #undef NORMKIT_DX_AT
        #undef NORMKIT_DX
        #undef NORMKIT_DX0
        return NORMKIT_ALL_FINITE;
    }

    #define NORMKIT_ROW_DX16(HAS_DH, FMT) normkit_row_dx16_loop(dy, dh, x, dx, n, w, mean, rstd, cb, cc, HAS_DH, FMT)
    static inline int normkit_row_dx16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx,
                                       Py_ssize_t n, int fmt, const float* w, float mean, float rstd, float cb,
                                       float cc) {
        if (fmt == 1 && !normkit_f16c) return -1;
        if (dh) return fmt ? NORMKIT_ROW_DX16(1, 1) : NORMKIT_ROW_DX16(1, 0);
        return fmt ? NORMKIT_ROW_DX16(0, 1) : NORMKIT_ROW_DX16(0, 0);
    }

    /* The first backward pass over a row, as _row_sums16 makes it tile by tile: grad_sums() into sg, sgx (chunks
       of 256 values summed in float32, a chunk whose sums are not finite again in double) and, unless accw is
       NULL, the parameter gradients into the float32 accumulators accw and (unless NULL: an uncentered row has no
       bias) accb. The weight's term is dy * ((x - mean) * rstd), that order kept by the fma (the compiler does not
       reassociate into it), so it overflows float32 only where the gradient itself is near float32's limit. */
    static inline __attribute__((always_inline)) void normkit_row_sums16_loop(
            const uint16_t* dy, const uint16_t* x, Py_ssize_t n, const float* w, double mean, double rstd,
            float* accw, float* accb, double* sg, double* sgx, int fmt) {
    #ifdef __AVX512F__
        /* 16 lanes a register, the chunk's last n % 16 values in a masked step (as normkit_grad_sums16_loop): the
           parameter gradients get the same operations, so the same bits, as in 8 lanes; the sums another order */
        const __m512 m = _mm512_set1_ps((float)mean), r = _mm512_set1_ps((float)rstd), z = _mm512_setzero_ps();
        __m512 vdy, vx, d, g, a, b, a1, b1;
        __mmask16 km;
    #else
        const __m256 m = _mm256_set1_ps((float)mean), r = _mm256_set1_ps((float)rstd), z = _mm256_setzero_ps();
        __m256 vdy, vx, d, g, a, b, a1, b1;
        uint16_t tdy[8], tx[8];
        float tw[8], taw[8], tab[8];
        Py_ssize_t k;
    #endif
        double ha, hb, da, db, dg, t1 = *sg, t2 = *sgx;  /* in locals: see grad_sums() */
        Py_ssize_t c0, e, i;
    #ifdef __AVX512F__
        /* One step over the 16 values at I into the sums A, B and the parameter gradients, the lanes of KM only */
        #define NORMKIT_SUMS16(I, A, B, KM)                                                                   \
            d = _mm512_maskz_sub_ps(KM, vx, m);                                                               \
            A = _mm512_add_ps(A, g);                                                                          \
            B = _mm512_fmadd_ps(g, d, B);                                                                     \
            if (accw) {                                                                                       \
                _mm512_mask_storeu_ps(accw + (I), KM, _mm512_fmadd_ps(vdy, _mm512_mul_ps(d, r),               \
                                                                      _mm512_maskz_loadu_ps(KM, accw + (I)))); \
                if (accb)                                                                                     \
                    _mm512_mask_storeu_ps(accb + (I), KM,                                                     \
                                          _mm512_add_ps(_mm512_maskz_loadu_ps(KM, accb + (I)), vdy));         \
            }
        #define NORMKIT_LOAD_SUMS16(I)                                                                        \
            vdy = normkit_load16(dy + (I), fmt);                                                              \
            vx = normkit_load16(x + (I), fmt);                                                                \
            g = _mm512_mul_ps(vdy, _mm512_loadu_ps(w + (I)));
        for (c0 = 0; c0 < n; c0 += 256) {
            e = n < c0 + 256 ? n : c0 + 256;
            a = b = a1 = b1 = z;
            for (i = c0; i + 32 <= e; i += 32) {
                NORMKIT_LOAD_SUMS16(i)
                NORMKIT_SUMS16(i, a, b, 0xFFFF)
                NORMKIT_LOAD_SUMS16(i + 16)
                NORMKIT_SUMS16(i + 16, a1, b1, 0xFFFF)
            }
            if (i + 16 <= e) {
                NORMKIT_LOAD_SUMS16(i)
                NORMKIT_SUMS16(i, a, b, 0xFFFF)
                i += 16;
            }
            if (i < e) {  /* the other lanes: dy = 0, w = 0 and x - mean = 0 */
                km = (__mmask16)((1u << (e - i)) - 1);
                vdy = normkit_load16_first(dy + i, e - i, fmt);
                vx = normkit_load16_first(x + i, e - i, fmt);
                g = _mm512_mul_ps(vdy, _mm512_maskz_loadu_ps(km, w + i));
                NORMKIT_SUMS16(i, a1, b1, km)
            }
            ha = _mm512_reduce_add_ps(_mm512_add_ps(a, a1));
            hb = _mm512_reduce_add_ps(_mm512_add_ps(b, b1));
    #else
        /* One step over the 8 values at I (vdy, vx, g loaded) into the sums A, B and the parameter gradients; K
           (8 but at a chunk's end) values are real. */
        #define NORMKIT_SUMS8(I, A, B, K)                                                                     \
            d = _mm256_sub_ps(vx, m);                                                                         \
            A = _mm256_add_ps(A, g);                                                                          \
            B = _mm256_fmadd_ps(g, d, B);                                                                     \
            if (accw && (K) == 8) {                                                                           \
                _mm256_storeu_ps(accw + (I), _mm256_fmadd_ps(vdy, _mm256_mul_ps(d, r), _mm256_loadu_ps(accw + (I)))); \
                if (accb) _mm256_storeu_ps(accb + (I), _mm256_add_ps(_mm256_loadu_ps(accb + (I)), vdy));      \
            } else if (accw) {                                                                                \
                memcpy(taw, accw + (I), (size_t)(K) * 4);                                                     \
                _mm256_storeu_ps(taw, _mm256_fmadd_ps(vdy, _mm256_mul_ps(d, r), _mm256_loadu_ps(taw)));       \
                memcpy(accw + (I), taw, (size_t)(K) * 4);                                                     \
                if (accb) {                                                                                   \
                    memcpy(tab, accb + (I), (size_t)(K) * 4);                                                 \
                    _mm256_storeu_ps(tab, _mm256_add_ps(_mm256_loadu_ps(tab), vdy));                          \
                    memcpy(accb + (I), tab, (size_t)(K) * 4);                                                 \
                }                                                                                             \
            }
        #define NORMKIT_LOAD_SUMS8(I)                                                                         \
            vdy = normkit_load8(dy + (I), fmt);                                                               \
            vx = normkit_load8(x + (I), fmt);                                                                 \
            g = _mm256_mul_ps(vdy, _mm256_loadu_ps(w + (I)));
        for (c0 = 0; c0 < n; c0 += 256) {
            e = n < c0 + 256 ? n : c0 + 256;
            a = z;
            b = z;
            a1 = z;
            b1 = z;
            /* two pairs of sums, 16 values a step: the additions of one pair wait on each other's latency */
            for (i = c0; i + 16 <= e; i += 16) {
                NORMKIT_LOAD_SUMS8(i)
                NORMKIT_SUMS8(i, a, b, 8)
                NORMKIT_LOAD_SUMS8(i + 8)
                NORMKIT_SUMS8(i + 8, a1, b1, 8)
            }
            for (; i < e; i += 8) {
                k = e - i < 8 ? e - i : 8;
                if (k == 8) {
                    NORMKIT_LOAD_SUMS8(i)
                } else {  /* zero-padded: the padding adds 0 * (0 - mean), or the chunk goes again in double */
                    memset(tdy, 0, sizeof tdy); memset(tx, 0, sizeof tx); memset(tw, 0, sizeof tw);
                    memcpy(tdy, dy + i, (size_t)k * 2); memcpy(tx, x + i, (size_t)k * 2);
                    memcpy(tw, w + i, (size_t)k * 4);
                    vdy = normkit_load8(tdy, fmt);
                    vx = normkit_load8(tx, fmt);
                    g = _mm256_mul_ps(vdy, _mm256_loadu_ps(tw));
                }
                NORMKIT_SUMS8(i, a, b, k)
            }
            a = _mm256_add_ps(a, a1);
            b = _mm256_add_ps(b, b1);
            ha = normkit_hsum8(a);
            hb = normkit_hsum8(b);
    #endif
            if (isfinite(ha) && isfinite(hb)) {
                t1 += ha;
                t2 += hb;
                continue;
            }
            da = 0.0;
            db = 0.0;
            for (i = c0; i < e; i++) {
                dg = (double)normkit_scalar16(dy[i], fmt) * w[i];
                da = da + dg;
                db = db + dg * (normkit_scalar16(x[i], fmt) - mean);
            }
            t1 += da;
            t2 += db;
        }
        *sg = t1;
        *sgx = t2;
    #ifdef __AVX512F__
        #undef NORMKIT_LOAD_SUMS16
        #undef NORMKIT_SUMS16
    #else
        #undef NORMKIT_LOAD_SUMS8
        #undef NORMKIT_SUMS8
    #endif
    }

    #define NORMKIT_ROW_SUMS16(FMT) \
        normkit_row_sums16_loop(dy, x, n, w, mean, rstd, accw, accb, sg, sgx, FMT)
    static inline int normkit_row_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt,
                                         const float* w, double mean, double rstd, float* accw, float* accb,
                                         double* sg, double* sgx) {
        if (fmt == 1 && !normkit_f16c) return -1;
        if (fmt) NORMKIT_ROW_SUMS16(1); else NORMKIT_ROW_SUMS16(0);
        return 0;
    }

    #define NORMKIT_ROW_Y16(CENTERED, FMT) normkit_row_y16_loop(x, y, n, w, b, mean, rstd, c0, CENTERED, FMT)
    #define NORMKIT_ROW_Y16_FMT(CENTERED) (fmt ? NORMKIT_ROW_Y16(CENTERED, 1) : NORMKIT_ROW_Y16(CENTERED, 0))
    static inline int normkit_row_y16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, const float* w,
                                      const float* b, int centered, float mean, float rstd, float c0) {
        if (fmt == 1 && !normkit_f16c) return -1;
        return centered ? NORMKIT_ROW_Y16_FMT(1) : NORMKIT_ROW_Y16_FMT(0);
    }
    #else
    static inline int normkit_row_y16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, const float* w,
                                      const float* b, int centered, float mean, float rstd, float c0) {
        return -1;
    }
    static inline int normkit_row_dx16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx,
                                       Py_ssize_t n, int fmt, const float* w, float mean, float rstd, float cb,
                                       float cc) {
        return -1;
    }
    static inline int normkit_row_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt,
                                         const float* w, double mean, double rstd, float* accw, float* accb,
                                         double* sg, double* sgx) {
        return -1;
    }
    #endif
    """
    int normkit_half_init(int allow_f16c) noexcept nogil
    int normkit_regs16(int fmt) noexcept nogil
    void normkit_widen(const uint16_t* s, float* d, Py_ssize_t n, int fmt) noexcept nogil
    bint normkit_narrow(const float* s, uint16_t* d, Py_ssize_t n, int fmt) noexcept nogil
    int normkit_affine16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, float m, float a,
                         float c) noexcept nogil
    int normkit_affine16_runs(const uint16_t* x, uint16_t* y, Py_ssize_t runs, Py_ssize_t n, Py_ssize_t stride,
                              int fmt, float m, float a, float c) noexcept nogil
    int normkit_grad_apply16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t n, int fmt, float m,
                             float a, float b, float c) noexcept nogil
    int normkit_grad_apply16_runs(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t runs, Py_ssize_t n,
                                  Py_ssize_t stride, int fmt, float m, float a, float b, float c) noexcept nogil
    int normkit_cols16(const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t n, int fmt, const float* m,
                       const float* a, const float* b, const float* c, int mode) noexcept nogil
    bint normkit_col_sums32(const float* dy, const float* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0,
                            Py_ssize_t l1, const float* p, double* s1, double* s2, bint from_memory) noexcept nogil
    bint normkit_col_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0,
                            Py_ssize_t l1, const float* p, double* s1, double* s2, int fmt,
                            bint from_memory) noexcept nogil
    bint normkit_moments16(const uint16_t* x, Py_ssize_t n, int fmt, double pivot, double* s1,
                           double* s2) noexcept nogil
    bint normkit_sums16_runs(const uint16_t* dy, const uint16_t* x, Py_ssize_t runs, Py_ssize_t n, Py_ssize_t stride,
                             int fmt, double p, double* s1, double* s2) noexcept nogil
    bint normkit_grad_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt, double mean,
                             double* sdy, double* sdyx) noexcept nogil

    int normkit_row_y16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, const float* w, const float* b,
                        int centered, float mean, float rstd, float c0) noexcept nogil
    int normkit_row_dx16(const uint16_t* dy, const uint16_t* dh, const uint16_t* x, uint16_t* dx, Py_ssize_t n,
                         int fmt, const float* w, float mean, float rstd, float cb, float cc) noexcept nogil
    int normkit_row_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t n, int fmt, const float* w,
                           double mean, double rstd, float* accw, float* accb, double* sg, double* sgx) noexcept nogil


# Data of this many bytes or more come from memory, where the column sums (NORMKIT_COL_SUMS, from_memory) read
# rows wider than one step of registers whole, once per group of rows; in cache they go in steps (fewer loads and
# stores). BatchNorm (R, C, 1), in-process, 2 threads, ms, steps -> whole rows: from memory, (100000, 256, 1) float32
# forward 12.4 -> 10.3, backward 18.5 -> 13.8; (25000, 1024, 1) 11.3 -> 10.6, 19.5 -> 16.2, bfloat16 backward
# 11.3 -> 9.8; (8192, 1024, 1) (32 MB) 3.31 -> 3.11, 6.05 -> 5.03; in cache, (32, 1024, 49) (6.4 MB) 0.58 -> 0.72,
# 0.89 -> 0.96; (1024, 512, 1) 0.10 -> 0.12, 0.14 -> 0.14; (64, 256, 49) bfloat16 0.15 -> 0.18, 0.20 -> 0.24.
# Channels-last GroupNorm (N, S, C) float32: (16, 3136, 256) 5.58 -> 4.37, 8.87 -> 6.56; (4, 3136, 256) (12.8 MB)
# 1.61 -> 1.39, 2.75 -> 2.11; (8, 256, 1024) (8 MB) forward 0.57 -> 0.64 (10-27% slower over runs), backward
# 1.26 -> 1.05. The 8 MiB is the one of _batchnorm.pyx's AHEAD_MIN_BYTES: a quarter of the 32 MiB L3.
cdef enum:
    FROM_MEMORY_BYTES = 8 << 20


# Values per tile of the 16-bit loops below: widened into float32 on the stack (4 KB per array, in L1), then the
# float32 loops above run on the tile. A multiple of SUM_CHUNK, so grad_sums() chunks as it does for float32. The
# x86-64-v3 build skips the float32 copy in the statistics pass and the channel ops' elementwise passes (above).
cdef enum:
    TILE16 = 1024


cdef inline double pivot16(const uint16_t* x, int fmt) noexcept nogil:
    """pivot_of() the first value of a 16-bit run."""
    cdef float first
    normkit_widen(x, &first, 1, fmt)
    return pivot_of(first)


cdef inline void moments16(const uint16_t* x, Py_ssize_t n, int fmt, double pivot, double* s1,
                           double* s2, bint wide=False) noexcept nogil:
    """moments() of a 16-bit run: chunk sums in float32 where the build allows (normkit_moments16), unless
    ``wide`` (the split directions' statistics, float64 throughout)."""
    cdef float t[TILE16]
    cdef Py_ssize_t tile, i, k
    if not wide and normkit_moments16(x, n, fmt, pivot, s1, s2):
        return
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        normkit_widen(x + i, t, k, fmt)
        normkit_moments_f(t, k, pivot, s1, s2)


cdef inline void to_double(const float* s, double* d, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        d[i] = s[i]


cdef inline void narrow64(const double* s, uint16_t* d, Py_ssize_t n, int fmt) noexcept nogil:
    """Round double values to 16 bits through float32 (exact there, or rounded once more, which the bounds of
    the 16-bit outputs allow; beyond float32's range is beyond the 16-bit one too)."""
    cdef float t[TILE16]
    cdef Py_ssize_t i
    for i in range(n):
        t[i] = <float>s[i]
    normkit_narrow(t, d, n, fmt)


# The elementwise passes below compute a tile in float32 and, when that gives inf or NaN, again in double: a
# product of terms that overflows float32 where the sum they make does not (16-bit outputs near bfloat16's top,
# which is float32's) would otherwise turn a finite result into inf or NaN. NaN or inf data costs that second pass.

cdef inline void affine16(const uint16_t* x, uint16_t* y, Py_ssize_t n, int fmt, double mean, double scale,
                          double shift) noexcept nogil:
    cdef float t[TILE16]
    cdef double d[TILE16]
    cdef float m = <float>mean
    cdef Py_ssize_t tile, i, k
    cdef int done
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        # as affine() computes it
        done = normkit_affine16(x + i, y + i, k, fmt, m, <float>scale,
                                <float>rounded_shift(shift, m, mean, scale))
        if done < 0:
            normkit_widen(x + i, t, k, fmt)
            affine(t, t, k, mean, scale, shift)
            done = normkit_narrow(t, y + i, k, fmt)
        if not done:
            normkit_widen(x + i, t, k, fmt)
            to_double(t, d, k)
            affine(d, d, k, mean, scale, shift)
            narrow64(d, y + i, k, fmt)


cdef inline void affine16_runs(const uint16_t* x, uint16_t* y, Py_ssize_t runs, Py_ssize_t n, Py_ssize_t stride,
                               int fmt, double mean, double scale, double shift) noexcept nogil:
    """affine16 on runs of n values, stride apart, in one call where the build allows (a run of 196 values spent
    a third of its time in the per-call setup), else or where an output is not finite run by run."""
    cdef float m = <float>mean
    cdef Py_ssize_t r
    if normkit_affine16_runs(x, y, runs, n, stride, fmt, m, <float>scale,
                             <float>rounded_shift(shift, m, mean, scale)) == 1:
        return
    for r in range(runs):
        affine16(x + r * stride, y + r * stride, n, fmt, mean, scale, shift)


cdef inline void grad_sums16(const uint16_t* dy, const uint16_t* x, const float* w, Py_ssize_t n, int fmt,
                             double mean, double* sdy, double* sdyx) noexcept nogil:
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef Py_ssize_t tile, i, k
    if w == NULL and normkit_grad_sums16(dy, x, n, fmt, mean, sdy, sdyx):
        return
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        normkit_widen(dy + i, tdy, k, fmt)
        normkit_widen(x + i, tx, k, fmt)
        grad_sums(tdy, tx, w + i if w != NULL else NULL, k, mean, sdy, sdyx)


cdef inline void grad_apply16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t n, int fmt,
                              double mean, double a, double b, double c) noexcept nogil:
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef double ddy[TILE16]
    cdef double dx64[TILE16]
    cdef Py_ssize_t tile, i, k
    cdef int done
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        done = normkit_grad_apply16(dy + i, x + i, dx + i, k, fmt, <float>mean, <float>a, <float>b, <float>c)
        if done < 0:
            normkit_widen(dy + i, tdy, k, fmt)
            normkit_widen(x + i, tx, k, fmt)
            grad_apply(tdy, tx, tdy, k, mean, a, b, c)
            done = normkit_narrow(tdy, dx + i, k, fmt)
        if not done:
            normkit_widen(dy + i, tdy, k, fmt)
            normkit_widen(x + i, tx, k, fmt)
            to_double(tdy, ddy, k)
            to_double(tx, dx64, k)
            grad_apply(ddy, dx64, dx64, k, mean, a, b, c)
            narrow64(dx64, dx + i, k, fmt)


cdef inline void grad_apply16_runs(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t runs,
                                   Py_ssize_t n, Py_ssize_t stride, int fmt, double mean, double a, double b,
                                   double c) noexcept nogil:
    """grad_apply16 on runs of n values, stride apart, as affine16_runs."""
    cdef Py_ssize_t r
    if normkit_grad_apply16_runs(dy, x, dx, runs, n, stride, fmt, <float>mean, <float>a, <float>b, <float>c) == 1:
        return
    for r in range(runs):
        grad_apply16(dy + r * stride, x + r * stride, dx + r * stride, n, fmt, mean, a, b, c)


cdef inline void scale_copy16(const uint16_t* dy, uint16_t* dx, Py_ssize_t n, int fmt, double a) noexcept nogil:
    cdef float t[TILE16]
    cdef double d[TILE16]
    cdef Py_ssize_t tile, i, k
    for tile in range((n + TILE16 - 1) // TILE16):
        i = tile * TILE16
        k = min(TILE16, n - i)
        normkit_widen(dy + i, t, k, fmt)
        scale_copy(t, t, k, a)
        if not normkit_narrow(t, dx + i, k, fmt):
            normkit_widen(dy + i, t, k, fmt)
            to_double(t, d, k)
            scale_copy(d, d, k, a)
            narrow64(d, dx + i, k, fmt)


# --- column sums: columns l0..l1 of n rows, `length` values apart (BatchNorm's columns schedule; the channels-last
# GroupNorm / InstanceNorm rows, l0 = 0 and l1 = length) --------------------------------------------------------

cdef inline bint all_finite(const double* a, const double* b, Py_ssize_t l0, Py_ssize_t l1) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(l0, l1):
        if not (isfinite(a[l]) and isfinite(b[l])):
            return False
    return True


cdef inline void column_moments(const floating* x, Py_ssize_t n, Py_ssize_t length, Py_ssize_t l0, Py_ssize_t l1,
                                 const floating* pivot, double* s1, double* s2, bint from_memory=False) noexcept nogil:
    # float32 data: in registers where the build allows (normkit_col_sums32). Otherwise four rows per sweep, their
    # terms added in the data's precision and then into double: the column sums are loaded and stored a quarter as
    # often, and the arithmetic runs in 8 float32 lanes rather than 4 doubles.
    cdef Py_ssize_t i, l
    cdef const floating* r
    cdef floating d0, d1, d2, d3
    if floating is float:
        if normkit_col_sums32(NULL, x, n, length, l0, l1, pivot, s1, s2, from_memory) and all_finite(s1, s2, l0, l1):
            return
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
    if not all_finite(s1, s2, l0, l1):
        # squares that overflow the data's precision (|x - pivot| beyond ~1e19 in float32), or a NaN or inf in
        # the data (which the double sums keep): this chunk again, in double
        for l in range(l0, l1):
            s1[l] = 0.0
            s2[l] = 0.0
        for i in range(n):
            for l in range(l0, l1):
                moments(x + i * length + l, 1, pivot[l], &s1[l], &s2[l])


cdef inline void column_grad_sums(const floating* dy, const floating* x, Py_ssize_t n, Py_ssize_t length,
                                   Py_ssize_t l0, Py_ssize_t l1, const floating* mean, double* sdy,
                                   double* sdyx, bint from_memory=False) noexcept nogil:
    # As column_moments(): in registers for float32 where the build allows, else four rows per sweep in the data's
    # precision, added into double.
    cdef Py_ssize_t i, l, o
    cdef floating g0, g1, g2, g3
    if floating is float:
        if normkit_col_sums32(dy, x, n, length, l0, l1, mean, sdy, sdyx, from_memory) and \
                all_finite(sdy, sdyx, l0, l1):
            return
    for l in range(l0, l1):
        sdy[l] = 0.0
        sdyx[l] = 0.0
    for i in range(0, n - 3, 4):
        o = i * length
        for l in range(l0, l1):
            g0 = dy[o + l]
            g1 = dy[o + length + l]
            g2 = dy[o + 2 * length + l]
            g3 = dy[o + 3 * length + l]
            sdy[l] += (g0 + g1) + (g2 + g3)
            sdyx[l] += ((g0 * (x[o + l] - mean[l]) + g1 * (x[o + length + l] - mean[l]))
                        + (g2 * (x[o + 2 * length + l] - mean[l]) + g3 * (x[o + 3 * length + l] - mean[l])))
    for i in range(n - n % 4, n):
        for l in range(l0, l1):
            g0 = dy[i * length + l]
            sdy[l] += g0
            sdyx[l] += g0 * (x[i * length + l] - mean[l])
    if not all_finite(sdy, sdyx, l0, l1):
        # products that overflow the data's precision, or non-finite data: this chunk again, in double
        for l in range(l0, l1):
            sdy[l] = 0.0
            sdyx[l] = 0.0
        for i in range(n):
            for l in range(l0, l1):
                grad_sums(dy + i * length + l, x + i * length + l, NULL, 1, mean[l], &sdy[l], &sdyx[l])
