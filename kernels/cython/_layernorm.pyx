# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""LayerNorm over the rows of an (M, K) array, with an elementwise (K,) weight and bias.

Rows are independent tasks. The parameter gradients sum over rows; to stay independent of the thread count they
are summed per fixed block of rows (blocks depend on the shape only) and the blocks merged in order. Rows too long
for per-block partial sums (K > LONG_ROW) are instead processed one at a time, split into tiles of columns: one
parallel pass for the row's sums (merged in tile order), one for dx and the parameter gradients, which then
accumulate in row order while the row is still in cache.
"""

import threading

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from _common cimport finish_moments, moments, pivot_of

# Per-block partial parameter gradients of all blocks together stay under this many doubles (8 MB).
cdef Py_ssize_t PARTIAL_BUDGET = 1 << 20
cdef Py_ssize_t MAX_BLOCKS = 64
cdef Py_ssize_t LONG_ROW = 1 << 16
cdef Py_ssize_t TILE = 4096

cdef int _nthreads = 1
_local = threading.local()


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


cdef double[::1] _scratch(Py_ssize_t n):
    """A work buffer of n doubles kept per calling thread: a fresh allocation on every call costs page faults
    that took as long as the kernel itself."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.buf = np.empty(n)
    return buf


cdef void _to_double(const floating[::1] a, double* out, Py_ssize_t k, double missing) noexcept:
    cdef Py_ssize_t j
    if a is None:
        for j in range(k):
            out[j] = missing
    else:
        for j in range(k):
            out[j] = a[j]


cdef void _forward_row(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                       double eps, floating* mean_out, floating* rstd_out) noexcept nogil:
    cdef Py_ssize_t j
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    moments(x, k, pivot, &s1, &s2)
    finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    # xhat in double (x - mean loses nothing to a large offset), the affine in the data's precision (it needs no
    # more); a constant row gives xhat = 0 and so exactly the bias
    for j in range(k):
        y[j] = <floating>((x[j] - mean) * rstd) * w[j] + b[j]


cdef void _row_sums(const floating* dy, const floating* x, Py_ssize_t k, const double* w, double mean,
                    double* sg, double* sgx) noexcept nogil:
    """Add sum(g) and sum(g * (x - mean)), g = dy * w, to sg[0] and sgx[0]."""
    cdef Py_ssize_t j
    cdef double a = 0.0, b = 0.0, g
    for j in range(k):
        g = dy[j] * w[j]
        a = a + g
        b = b + g * (x[j] - mean)
    sg[0] += a
    sgx[0] += b


cdef void _row_grads(const floating* dy, const floating* x, floating* dx, Py_ssize_t k, const double* w,
                     double mean, double rstd, double cb, double cc, double* dw, double* db) noexcept nogil:
    """dx = rstd * w * dy + cb * (x - mean) + cc, i.e. rstd * (g - mean(g) - xhat * mean(g * xhat)); adds
    dy * xhat to dw and dy to db unless dw is NULL."""
    # Two loops rather than one: with all six arrays in one loop gcc gives up vectorizing the float64 version
    # (too many possible overlaps to check at run time); the second reads dy and x again from L1.
    cdef Py_ssize_t j
    cdef double g
    for j in range(k):
        dx[j] = <floating>(rstd * w[j] * dy[j] + cb * (x[j] - mean) + cc)
    if dw != NULL:
        for j in range(k):
            g = dy[j]
            dw[j] += g * ((x[j] - mean) * rstd)
            db[j] += g


cdef inline void _coefficients(double sg, double sgx, Py_ssize_t k, double rstd, double* cb,
                               double* cc) noexcept nogil:
    cb[0] = -rstd * rstd * rstd * sgx / k
    cc[0] = -rstd * sg / k


cdef void _backward_block(const floating* dy, const floating* x, floating* dx, Py_ssize_t m0, Py_ssize_t m1,
                          Py_ssize_t k, const double* w, const floating* mean, const floating* rstd,
                          double* partial) noexcept nogil:
    """Rows m0..m1-1; their parameter gradients go to partial[0:k] (weight) and partial[k:2k] (bias), or nowhere
    if partial is NULL."""
    cdef Py_ssize_t i
    cdef double sg, sgx, cb, cc
    if partial != NULL:
        memset(partial, 0, 2 * k * sizeof(double))
    for i in range(m0, m1):
        sg = 0.0
        sgx = 0.0
        _row_sums(dy + i * k, x + i * k, k, w, mean[i], &sg, &sgx)
        _coefficients(sg, sgx, k, rstd[i], &cb, &cc)
        _row_grads(dy + i * k, x + i * k, dx + i * k, k, w, mean[i], rstd[i], cb, cc,
                   partial, partial + k if partial != NULL else NULL)


cdef void _merge_blocks(const double* partial, Py_ssize_t blocks, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t j1,
                        double* out) noexcept nogil:
    """out[j] = sum over blocks, in block order, of partial[block, j] for j0 <= j < j1 (rows of length k)."""
    cdef Py_ssize_t t, j
    for j in range(j0, j1):
        out[j] = 0.0
    for t in range(blocks):
        for j in range(j0, j1):
            out[j] += partial[t * k + j]


def layernorm_forward(const floating[:, ::1] x, const floating[::1] weight, const floating[::1] bias, double eps,
                      floating[:, ::1] y, floating[::1] mean, floating[::1] rstd):
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], i
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef floating* mp = &mean[0]
    cdef floating* rp = &rstd[0]
    cdef const floating[::1] wv = weight, bv = bias
    cdef int nt = _nthreads
    # missing parameters become ones and zeros, so that one loop serves every combination
    dtype = np.float32 if floating is float else np.float64
    if wv is None:
        wv = np.ones(k, dtype)
    if bv is None:
        bv = np.zeros(k, dtype)
    cdef const floating* w = &wv[0]
    cdef const floating* b = &bv[0]
    for i in prange(m, nogil=True, schedule="static", num_threads=nt):
        _forward_row(xp + i * k, yp + i * k, k, w, b, eps, mp + i, rp + i)


def layernorm_backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] mean,
                       const floating[::1] rstd, const floating[::1] weight, floating[:, ::1] dx,
                       floating[::1] dweight, floating[::1] dbias):
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], i, j, t, per_block, blocks, tiles
    cdef const floating* dyp = &dy[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef floating* dxp = &dx[0, 0]
    cdef const floating* mp = &mean[0]
    cdef const floating* rp = &rstd[0]
    cdef bint params = dweight is not None or dbias is not None
    cdef double[::1] buf
    cdef double *w
    cdef double *grads  # weight gradients, then bias gradients: 2k doubles
    cdef double *work
    cdef double sg, sgx, cb, cc
    cdef int nt = _nthreads
    if not params:
        blocks = min(m, MAX_BLOCKS)
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        buf = _scratch(k)
        w = &buf[0]
        _to_double(weight, w, k, 1.0)
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, mp, rp, NULL)
        return
    if k > LONG_ROW:
        tiles = (k + TILE - 1) // TILE
        buf = _scratch(3 * k + 2 * tiles)
        w, grads = &buf[0], &buf[k]
        work = grads + 2 * k
        _to_double(weight, w, k, 1.0)
        memset(grads, 0, 2 * k * sizeof(double))
        with nogil:
            for i in range(m):
                for t in prange(tiles, schedule="static", num_threads=nt):
                    work[2 * t] = 0.0
                    work[2 * t + 1] = 0.0
                    _row_sums(dyp + i * k + t * TILE, xp + i * k + t * TILE, min(TILE, k - t * TILE),
                              w + t * TILE, mp[i], &work[2 * t], &work[2 * t + 1])
                sg = 0.0
                sgx = 0.0
                for t in range(tiles):
                    sg = sg + work[2 * t]
                    sgx = sgx + work[2 * t + 1]
                _coefficients(sg, sgx, k, rp[i], &cb, &cc)
                for t in prange(tiles, schedule="static", num_threads=nt):
                    _row_grads(dyp + i * k + t * TILE, xp + i * k + t * TILE, dxp + i * k + t * TILE,
                               min(TILE, k - t * TILE), w + t * TILE, mp[i], rp[i], cb, cc,
                               grads + t * TILE, grads + k + t * TILE)
    else:
        blocks = min(m, MAX_BLOCKS, max(1, PARTIAL_BUDGET // (2 * k)))
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        buf = _scratch(k + 2 * k + blocks * 2 * k)
        w, grads = &buf[0], &buf[k]
        work = grads + 2 * k
        _to_double(weight, w, k, 1.0)
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_block(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, mp, rp,
                            work + t * 2 * k)
        # the partials are laid out as rows of 2k (weight then bias), so one merge does both
        tiles = (2 * k + TILE - 1) // TILE
        for t in prange(tiles, nogil=True, schedule="static", num_threads=nt):
            _merge_blocks(work, blocks, 2 * k, t * TILE, min(2 * k, (t + 1) * TILE), grads)
    for j in range(k):
        if dweight is not None:
            dweight[j] = <floating>grads[j]
        if dbias is not None:
            dbias[j] = <floating>grads[k + j]
