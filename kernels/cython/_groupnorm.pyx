# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GroupNorm and InstanceNorm (GroupNorm with one channel per group), training mode.

A set (sample n, group g) is Cg * S contiguous values, so sets are independent tasks: one prange over them,
statistics and elementwise pass of a set done by one thread while the set is in cache. Parameter gradients
are summed over samples afterwards in sample order, so no result depends on the thread count.
"""

import numpy as np

from cython cimport floating
from cython.parallel cimport prange

from _common cimport affine, finish_moments, grad_apply, grad_sums, moments, pivot_of

cdef int _nthreads = 1


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


cdef inline const floating* _ptr(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef void _forward_set(const floating* x, floating* y, Py_ssize_t cg, Py_ssize_t s, const floating* w,
                       const floating* b, double eps, floating* mean_out, floating* rstd_out) noexcept nogil:
    # x, y: the set's first value; w, b: its first channel's parameters, or NULL
    cdef Py_ssize_t c
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    moments(x, cg * s, pivot, &s1, &s2)
    finish_moments(s1, s2, cg * s, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    for c in range(cg):
        affine(x + c * s, y + c * s, s, mean, rstd * w[c] if w != NULL else rstd,
               b[c] if b != NULL else 0.0)


cdef void _backward_set(const floating* dy, const floating* x, floating* dx, Py_ssize_t cg, Py_ssize_t s,
                        const floating* w, double mean, double rstd, double* sdy, double* sdyx) noexcept nogil:
    # sdy, sdyx receive the set's per-channel sum(dy) and sum(dy * (x - mean)) for the parameter gradients.
    # With g = dy * w: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), expanded into one fused pass.
    cdef Py_ssize_t c
    cdef double sg = 0.0, sgx = 0.0, wc, m = <double>(cg * s), b, k
    for c in range(cg):
        sdy[c] = 0.0
        sdyx[c] = 0.0
        grad_sums(dy + c * s, x + c * s, NULL, s, mean, &sdy[c], &sdyx[c])
        wc = w[c] if w != NULL else 1.0
        sg = sg + wc * sdy[c]
        sgx = sgx + wc * sdyx[c]
    b = -rstd * rstd * rstd * sgx / m
    k = -rstd * sg / m
    for c in range(cg):
        wc = w[c] if w != NULL else 1.0
        grad_apply(dy + c * s, x + c * s, dx + c * s, s, mean, rstd * wc, b, k)


cdef void _groupnorm_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                             const floating[::1] bias, double eps, floating[:, :, ::1] y, floating[:, ::1] mean,
                             floating[:, ::1] rstd):
    cdef Py_ssize_t n = x.shape[0], s = x.shape[2], cg = x.shape[1] // num_groups, t
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef floating* mp = &mean[0, 0]
    cdef floating* rp = &rstd[0, 0]
    cdef const floating* w = _ptr(weight)
    cdef const floating* b = _ptr(bias)
    cdef int nt = _nthreads
    # set t = (sample t // G, group t % G) starts at value t * cg * s
    for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
        _forward_set(xp + t * cg * s, yp + t * cg * s, cg, s,
                     w + (t % num_groups) * cg if w != NULL else NULL,
                     b + (t % num_groups) * cg if b != NULL else NULL,
                     eps, mp + t, rp + t)


cdef void _groupnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                              const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                              floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], s = x.shape[2], cg = c // num_groups, t, i, j
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0]
    cdef const floating* mp = &mean[0, 0]
    cdef const floating* rp = &rstd[0, 0]
    cdef const floating* w = _ptr(weight)
    cdef double[:, ::1] sdy = np.empty((n, c))
    cdef double[:, ::1] sdyx = np.empty((n, c))
    cdef double* sdyp = &sdy[0, 0]
    cdef double* sdyxp = &sdyx[0, 0]
    cdef double acc
    cdef int nt = _nthreads
    for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
        _backward_set(dyp + t * cg * s, xp + t * cg * s, dxp + t * cg * s, cg, s,
                      w + (t % num_groups) * cg if w != NULL else NULL,
                      mp[t], rp[t], sdyp + t * cg, sdyxp + t * cg)
    # dweight = sum(dy * xhat) = sum over samples of rstd * sum(dy * (x - mean)); summed in sample order
    if dweight is not None:
        for j in range(c):
            acc = 0.0
            for i in range(n):
                acc = acc + <double>rstd[i, j // cg] * sdyx[i, j]
            dweight[j] = <floating>acc
    if dbias is not None:
        for j in range(c):
            acc = 0.0
            for i in range(n):
                acc = acc + sdy[i, j]
            dbias[j] = <floating>acc


def groupnorm_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                      const floating[::1] bias, double eps, floating[:, :, ::1] y, floating[:, ::1] mean,
                      floating[:, ::1] rstd):
    _groupnorm_forward(x, num_groups, weight, bias, eps, y, mean, rstd)


def groupnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                       const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                       floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    _groupnorm_backward(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias)


def instancenorm_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                         double eps, floating[:, :, ::1] y, floating[:, ::1] mean, floating[:, ::1] rstd):
    _groupnorm_forward(x, x.shape[1], weight, bias, eps, y, mean, rstd)


def instancenorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                          const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                          floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    _groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, dx, dweight, dbias)
