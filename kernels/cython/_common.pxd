# cython: language_level=3, cdivision=True
"""Inner loops shared by the kernel modules: one pass over a contiguous run of values, accumulating in double.

Every reduction is a plain loop over one accumulator pair; the build's -fassociative-math (without
-ffinite-math-only) lets the compiler split it into vector lanes while NaN and inf still propagate.
"""

from cython cimport floating
from libc.math cimport isfinite, sqrt


cdef inline double pivot_of(double first) noexcept nogil:
    # Statistics are accumulated on x - pivot (a value from the set) so that a large offset cancels before
    # squaring. A non-finite pivot would turn every shifted value into NaN, so an inf set keeps its mean of inf.
    return first if isfinite(first) else 0.0


cdef extern from *:
    # The statistics pass, in double. From a plain loop the compiler makes one vector register per sum, and the
    # loop waits on the latency of its additions; with AVX (the x86-64-v3 build) four registers per sum instead:
    # LayerNorm forward on (64, 1024) in L2, one thread, 8.3 -> 7.5 us. The order of the additions is fixed by
    # the code, so results do not depend on the thread count; the baseline build keeps the plain loop.
    """
    #if defined(__AVX__)
    #include <immintrin.h>
    #define NORMKIT_LOAD4_F(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    #define NORMKIT_LOAD4_D(p) _mm256_loadu_pd(p)
    #define NORMKIT_MOMENTS_BLOCKS(LOAD)                                                              \
        __m256d p = _mm256_set1_pd(pivot), z = _mm256_setzero_pd(), d0, d1, d2, d3;               \
        __m256d a0 = z, a1 = z, a2 = z, a3 = z, b0 = z, b1 = z, b2 = z, b3 = z;                   \
        for (; i + 16 <= n; i += 16) {                                                            \
            d0 = LOAD(x + i) - p; d1 = LOAD(x + i + 4) - p;                                       \
            d2 = LOAD(x + i + 8) - p; d3 = LOAD(x + i + 12) - p;                                  \
            a0 += d0; a1 += d1; a2 += d2; a3 += d3;                                               \
            b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;                           \
        }                                                                                         \
        a0 = (a0 + a1) + (a2 + a3); b0 = (b0 + b1) + (b2 + b3);                                   \
        ta = (a0[0] + a0[1]) + (a0[2] + a0[3]); tb = (b0[0] + b0[1]) + (b0[2] + b0[3]);
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
    NORMKIT_MOMENTS(normkit_moments_f, float, NORMKIT_LOAD4_F)
    NORMKIT_MOMENTS(normkit_moments_d, double, NORMKIT_LOAD4_D)
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
    """mean and 1/sqrt(var + eps) from shifted sums; var is the biased variance, clamped at 0 (NaN stays NaN)."""
    cdef double dmean = s1 / m
    cdef double var = s2 / m - dmean * dmean
    if var < 0.0:
        var = 0.0
    mean[0] = pivot + dmean
    rstd[0] = 1.0 / sqrt(var + eps)


cdef inline void affine(const floating* x, floating* y, Py_ssize_t n, double mean, double scale,
                        double shift) noexcept nogil:
    """y = (x - mean) * scale + shift, computed in the data's precision: for float32 that is twice the vector
    lanes of double, and the pass then keeps up with memory. The mean's rounding to that precision goes into the
    shift, so a large offset costs nothing; subtracting first (rather than folding the mean into the shift) keeps
    a constant input's output exactly equal to the bias."""
    cdef floating m = <floating>mean
    cdef floating a = <floating>scale
    cdef floating c = <floating>(shift + (<double>m - mean) * scale)
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = (x[i] - m) * a + c


# Values per chunk that grad_sums() adds in the data's precision before adding them into double.
DEF SUM_CHUNK = 256


cdef inline void grad_sums(const floating* dy, const floating* x, const floating* w, Py_ssize_t n, double mean,
                           double* sdy, double* sdyx) noexcept nogil:
    """Add sum(g) to sdy[0] and sum(g * (x - mean)) to sdyx[0], with g = dy * w (LayerNorm's elementwise weight),
    or g = dy where w is NULL (the compiler makes a loop of each).

    This loop reads dy and x from memory and runs at the speed of its arithmetic, so each chunk of SUM_CHUNK
    values is summed in the data's precision (8 float32 lanes rather than 4 doubles) and then added into double;
    mean is the saved statistic, of the data's precision. A chunk whose sums are not finite (products beyond
    float32's range, or NaN/inf data) is summed again in double, which keeps what can be kept."""
    cdef floating m = <floating>mean, a, b, g
    cdef double da, db, dg
    cdef Py_ssize_t c, i, i0, k
    for c in range((n + SUM_CHUNK - 1) // SUM_CHUNK):
        i0 = c * SUM_CHUNK
        k = min(SUM_CHUNK, n - i0)
        a = 0
        b = 0
        for i in range(i0, i0 + k):
            g = dy[i] * w[i] if w != NULL else dy[i]
            a = a + g
            b = b + g * (x[i] - m)
        if isfinite(a) and isfinite(b):
            sdy[0] += a
            sdyx[0] += b
        else:
            da = 0.0
            db = 0.0
            for i in range(i0, i0 + k):
                dg = <double>dy[i] * w[i] if w != NULL else dy[i]
                da = da + dg
                db = db + dg * (x[i] - mean)
            sdy[0] += da
            sdyx[0] += db


cdef inline void grad_apply(const floating* dy, const floating* x, floating* dx, Py_ssize_t n, double mean,
                            double a, double b, double c) noexcept nogil:
    """dx = a * dy + b * (x - mean) + c: the input gradient of one normalized set, or of one channel within it.
    In the data's precision, as affine(); mean is the saved statistic, already of that precision."""
    cdef floating m = <floating>mean, ta = <floating>a, tb = <floating>b, tc = <floating>c
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = ta * dy[i] + tb * (x[i] - m) + tc


cdef inline void scale_copy(const floating* dy, floating* dx, Py_ssize_t n, double a) noexcept nogil:
    cdef floating ta = <floating>a
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = ta * dy[i]


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
    /* Whether setup.py also built the x86-64-v3 copy of the modules and this CPU can run it. */
    static int normkit_use_x86_64_v3(void) {
    #ifdef NORMKIT_HAVE_X86_64_V3_BUILD
        __builtin_cpu_init();
        return __builtin_cpu_supports("x86-64-v3") != 0;
    #else
        return 0;
    #endif
    }
    """
    const int NORMKIT_HAVE_OPENMP
    const char* NORMKIT_BUILD_FLAGS
    const char* NORMKIT_OPENMP_NOTE
    int normkit_use_x86_64_v3() noexcept nogil
