# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""LayerNorm over the rows of an (M, K) array, with an elementwise (K,) weight and bias.

Rows are independent tasks. The parameter gradients sum over rows, so to stay independent of the thread count
they are summed per fixed block of rows (blocks depend on the shape only) and the blocks merged in order;
when rows are so long that per-block partial sums would cost too much memory, a second pass over chunks of
columns sums each column in row order instead.
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport prange

from _common cimport affine, finish_moments, grad_apply, grad_sums, moments, pivot_of

# Partial parameter gradients of all row blocks together stay under this many doubles (4 MB per gradient).
cdef Py_ssize_t PARTIAL_BUDGET = 1 << 19
cdef Py_ssize_t MAX_BLOCKS = 64
# Rows longer than this take the column pass for parameter gradients (a budget of fewer than 16 blocks).
cdef Py_ssize_t LONG_ROW = PARTIAL_BUDGET // 16
cdef Py_ssize_t CHUNK = 1024

cdef int _nthreads = 1


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


cdef inline const floating* _ptr(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef void _forward_row(const floating* x, floating* y, Py_ssize_t k, const floating* w, const floating* b,
                       double eps, floating* mean_out, floating* rstd_out) noexcept nogil:
    cdef Py_ssize_t j
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    moments(x, k, pivot, &s1, &s2)
    finish_moments(s1, s2, k, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    # (x - mean) * rstd first, then the affine: a constant row gives exactly the bias
    if w != NULL and b != NULL:
        for j in range(k):
            y[j] = <floating>((x[j] - mean) * rstd * w[j] + b[j])
    elif w != NULL:
        for j in range(k):
            y[j] = <floating>((x[j] - mean) * rstd * w[j])
    elif b != NULL:
        for j in range(k):
            y[j] = <floating>((x[j] - mean) * rstd + b[j])
    else:
        affine(x, y, k, mean, rstd, 0.0)


cdef void _row_coefficients(const floating* dy, const floating* x, Py_ssize_t k, const floating* w, double mean,
                            double rstd, double* cb, double* cc) noexcept nogil:
    # With g = dy * w: dx = rstd * w * dy + cb * (x - mean) + cc, i.e. rstd * (g - mean(g) - xhat * mean(g * xhat))
    cdef Py_ssize_t j
    cdef double sg = 0.0, sgx = 0.0, g
    if w == NULL:
        grad_sums(dy, x, k, mean, &sg, &sgx)
    else:
        for j in range(k):
            g = dy[j] * <double>w[j]
            sg = sg + g
            sgx = sgx + g * (x[j] - mean)
    cb[0] = -rstd * rstd * rstd * sgx / k
    cc[0] = -rstd * sg / k


cdef void _row_dx(const floating* dy, const floating* x, floating* dx, Py_ssize_t k, const floating* w,
                  double mean, double rstd, double cb, double cc) noexcept nogil:
    cdef Py_ssize_t j
    if w == NULL:
        grad_apply(dy, x, dx, k, mean, rstd, cb, cc)
    else:
        for j in range(k):
            dx[j] = <floating>(rstd * w[j] * dy[j] + cb * (x[j] - mean) + cc)


cdef void _add_param_grads(const floating* dy, const floating* x, Py_ssize_t k, double mean, double rstd,
                           double* dw, double* db) noexcept nogil:
    # dw += dy * xhat, db += dy (either may be NULL)
    cdef Py_ssize_t j
    if dw != NULL:
        for j in range(k):
            dw[j] += dy[j] * ((x[j] - mean) * rstd)
    if db != NULL:
        for j in range(k):
            db[j] += dy[j]


cdef void _backward_rows(const floating* dy, const floating* x, floating* dx, Py_ssize_t m0, Py_ssize_t m1,
                         Py_ssize_t k, const floating* w, const floating* mean, const floating* rstd,
                         double* dw, double* db) noexcept nogil:
    """dx of rows m0..m1-1, adding their parameter gradients to dw, db (NULL: not wanted)."""
    cdef Py_ssize_t i
    cdef double cb, cc
    for i in range(m0, m1):
        _row_coefficients(dy + i * k, x + i * k, k, w, mean[i], rstd[i], &cb, &cc)
        _row_dx(dy + i * k, x + i * k, dx + i * k, k, w, mean[i], rstd[i], cb, cc)
        _add_param_grads(dy + i * k, x + i * k, k, mean[i], rstd[i], dw, db)


cdef void _backward_columns(const floating* dy, const floating* x, floating* dx, Py_ssize_t m, Py_ssize_t k,
                            Py_ssize_t j0, Py_ssize_t j1, const floating* w, const floating* mean,
                            const floating* rstd, const double* cb, const double* cc, double* dw,
                            double* db) noexcept nogil:
    """Columns j0..j1-1 of every row, in row order: dx, and the parameter gradients summed into dw, db."""
    cdef Py_ssize_t i, off = j0, n = j1 - j0
    for i in range(m):
        _row_dx(dy + i * k + off, x + i * k + off, dx + i * k + off, n, w + off if w != NULL else NULL,
                mean[i], rstd[i], cb[i], cc[i])
        _add_param_grads(dy + i * k + off, x + i * k + off, n, mean[i], rstd[i],
                         dw + off if dw != NULL else NULL, db + off if db != NULL else NULL)


def layernorm_forward(const floating[:, ::1] x, const floating[::1] weight, const floating[::1] bias, double eps,
                      floating[:, ::1] y, floating[::1] mean, floating[::1] rstd):
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], i
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef floating* mp = &mean[0]
    cdef floating* rp = &rstd[0]
    cdef const floating* w = _ptr(weight)
    cdef const floating* b = _ptr(bias)
    cdef int nt = _nthreads
    for i in prange(m, nogil=True, schedule="static", num_threads=nt):
        _forward_row(xp + i * k, yp + i * k, k, w, b, eps, mp + i, rp + i)


def layernorm_backward(const floating[:, ::1] dy, const floating[:, ::1] x, const floating[::1] mean,
                       const floating[::1] rstd, const floating[::1] weight, floating[:, ::1] dx,
                       floating[::1] dweight, floating[::1] dbias):
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], i, j, t, per_block, blocks
    cdef const floating* dyp = &dy[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef floating* dxp = &dx[0, 0]
    cdef const floating* mp = &mean[0]
    cdef const floating* rp = &rstd[0]
    cdef const floating* w = _ptr(weight)
    cdef bint want_w = dweight is not None, want_b = dbias is not None
    cdef double[::1] dw = np.zeros(k), db = np.zeros(k), cb, cc
    cdef double[:, ::1] pw, pb
    cdef double* pwp = NULL
    cdef double* pbp = NULL
    cdef int nt = _nthreads
    if (want_w or want_b) and k > LONG_ROW:
        cb, cc = np.empty(m), np.empty(m)
        for i in prange(m, nogil=True, schedule="static", num_threads=nt):
            _row_coefficients(dyp + i * k, xp + i * k, k, w, mp[i], rp[i], &cb[i], &cc[i])
        for t in prange((k + CHUNK - 1) // CHUNK, nogil=True, schedule="static", num_threads=nt):
            _backward_columns(dyp, xp, dxp, m, k, t * CHUNK, min(k, (t + 1) * CHUNK), w, mp, rp, &cb[0], &cc[0],
                              &dw[0] if want_w else NULL, &db[0] if want_b else NULL)
    else:
        blocks = min(m, MAX_BLOCKS, max(1, PARTIAL_BUDGET // k))
        per_block = (m + blocks - 1) // blocks
        blocks = (m + per_block - 1) // per_block
        pw = np.zeros((blocks if want_w else 1, k))
        pb = np.zeros((blocks if want_b else 1, k))
        if want_w:
            pwp = &pw[0, 0]
        if want_b:
            pbp = &pb[0, 0]
        for t in prange(blocks, nogil=True, schedule="static", num_threads=nt):
            _backward_rows(dyp, xp, dxp, t * per_block, min(m, (t + 1) * per_block), k, w, mp, rp,
                           pwp + t * k if want_w else NULL, pbp + t * k if want_b else NULL)
        # merge the blocks in order
        for t in range(blocks if (want_w or want_b) else 0):
            for j in range(k):
                if want_w:
                    dw[j] += pw[t, j]
                if want_b:
                    db[j] += pb[t, j]
    for j in range(k):
        if want_w:
            dweight[j] = <floating>dw[j]
        if want_b:
            dbias[j] = <floating>db[j]
