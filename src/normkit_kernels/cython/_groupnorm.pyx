# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GroupNorm and InstanceNorm (GroupNorm with one channel per group), training mode.

A set (sample n, group g) is Cg * S contiguous values, so sets are independent tasks: one prange over them,
statistics and elementwise pass of a set done by one thread while the set is in cache. A single large set (a
batch of one with one group, say) would leave the other threads idle; it is cut into items of (channel, piece of
the channel's values) instead, whose partial sums are merged in item order (the pieces schedule). Which schedule
runs is the shape's choice alone, and parameter gradients are summed over samples afterwards in sample order, so
no result depends on the thread count.
"""

import os

import numpy as np

from cython cimport floating
from cython.parallel cimport prange

from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc

from _common cimport (
    NO_ACT, SERIAL_MAX_VALUES, SUM_CHUNK, act_grad_apply, act_grad_apply_stream, act_grad_sums, act_grad_sums_kept,
    affine16, affine_act, affine_act_stream, finish_moments, grad_apply, grad_apply16, grad_apply_inplace, grad_sums,
    grad_sums16, max_offset, moments, moments16, normkit_half_init, normkit_sfence, pivot16, pivot_of, threads_for,
)

# float16 converts with F16C where the CPU has it, unless NORMKIT_CYTHON_NO_F16C=1 asks for the portable code (to
# test or compare it); each module holds its own choice.
F16C = bool(normkit_half_init(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") in ("", "0")))

cdef int _nthreads = 1
cdef Py_ssize_t _serial_max = SERIAL_MAX_VALUES
# Outputs of this many bytes or more are written with non-temporal stores (set_stream_min_bytes).
cdef Py_ssize_t _stream_min = 1 << 62
# The pieces schedule: a single set of at least TARGET_ITEMS * PIECE values, cut into about TARGET_ITEMS items of
# at least PIECE values (0.5-0.65x of one thread per set). Two or more sets keep the sets schedule: pieces for them
# (tried, a set at a time or all sets' items together) ran 1.1-1.6x slower at two and four sets of 64K-512K values
# on two threads, whose sets schedule finds a set in its thread's cache on the second pass, and 0.85x at three.
cdef Py_ssize_t TARGET_ITEMS = 16
cdef Py_ssize_t PIECE = 4096


def set_num_threads(int n):
    global _nthreads
    _nthreads = n


def set_serial_max_values(Py_ssize_t n):
    global _serial_max
    _serial_max = n


def set_stream_min_bytes(Py_ssize_t n):
    global _stream_min
    _stream_min = n


cdef inline const floating* _ptr(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef inline floating* _out(floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


cdef void _forward_set(const floating* x, floating* y, Py_ssize_t cg, Py_ssize_t s, const floating* w,
                       const floating* b, double eps, int act, double slope, bint stream, floating* mean_out,
                       floating* rstd_out) noexcept nogil:
    # x, y: the set's first value; w, b: its first channel's parameters, or NULL; act: the fused activation, or
    # NO_ACT
    cdef Py_ssize_t c
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot_of(x[0])
    moments(x, cg * s, pivot, &s1, &s2)
    finish_moments(s1, s2, cg * s, pivot, eps, &mean, &rstd)
    mean_out[0] = <floating>mean
    rstd_out[0] = <floating>rstd
    for c in range(cg):
        if stream:
            affine_act_stream(x + c * s, y + c * s, s, mean, rstd * w[c] if w != NULL else rstd,
                              b[c] if b != NULL else 0.0, act, slope)
        else:
            affine_act(x + c * s, y + c * s, s, mean, rstd * w[c] if w != NULL else rstd,
                       b[c] if b != NULL else 0.0, act, slope)
    if stream:
        normkit_sfence()


cdef void _backward_set(const floating* dy, const floating* x, floating* dx, Py_ssize_t cg, Py_ssize_t s,
                        const floating* w, const floating* bias, int act, double slope, double mean, double rstd,
                        bint stream, double* sdy, double* sdyx) noexcept nogil:
    # sdy, sdyx receive the set's per-channel sum(dy) and sum(dy * (x - mean)) for the parameter gradients.
    # With g = dy * w: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), expanded into one fused pass. With a
    # fused activation, g = dy * act'(z) in place of dy throughout: the first pass leaves g in dx and the second
    # reads it there (with streaming stores, where dx is not to be read back, z is recomputed in both passes).
    cdef Py_ssize_t c
    cdef double sg = 0.0, sgx = 0.0, wc, m = <double>(cg * s), b, k, shift
    cdef bint kept = act != NO_ACT and not stream
    for c in range(cg):
        sdy[c] = 0.0
        sdyx[c] = 0.0
        wc = w[c] if w != NULL else 1.0
        shift = bias[c] if bias != NULL else 0.0
        if act == NO_ACT:  # grad_sums inlined here: through act_grad_sums, a call per channel (short channels)
            grad_sums(dy + c * s, x + c * s, NULL, s, mean, &sdy[c], &sdyx[c])
        elif kept:
            act_grad_sums_kept(dy + c * s, x + c * s, dx + c * s, s, mean, rstd * wc, shift, act, slope, &sdy[c],
                               &sdyx[c])
        else:
            act_grad_sums(dy + c * s, x + c * s, s, mean, rstd * wc, shift, act, slope, &sdy[c], &sdyx[c])
        sg = sg + wc * sdy[c]
        sgx = sgx + wc * sdyx[c]
    b = -rstd * rstd * rstd * sgx / m
    k = -rstd * sg / m
    for c in range(cg):
        wc = w[c] if w != NULL else 1.0
        shift = bias[c] if bias != NULL else 0.0
        if kept:
            grad_apply_inplace(dx + c * s, x + c * s, s, mean, rstd * wc, b, k)
        elif act == NO_ACT and not stream:  # as grad_sums above
            grad_apply(dy + c * s, x + c * s, dx + c * s, s, mean, rstd * wc, b, k)
        elif stream:
            act_grad_apply_stream(dy + c * s, x + c * s, dx + c * s, s, mean, rstd * wc, shift, act, slope, True,
                                  rstd * wc, b, k)
        else:
            act_grad_apply(dy + c * s, x + c * s, dx + c * s, s, mean, rstd * wc, shift, act, slope, True, rstd * wc,
                           b, k)
    if stream:
        normkit_sfence()


cdef Py_ssize_t _piece_length(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t num_groups) noexcept nogil:
    """Values per piece of a channel in the pieces schedule, for a single set (n = 1, one group), or 0 for the
    sets schedule. A multiple of SUM_CHUNK, so that the pieces' float sums are the whole run's chunks."""
    cdef Py_ssize_t pieces
    if n * num_groups > 1 or c * s < TARGET_ITEMS * PIECE:
        return 0
    pieces = max(1, min((TARGET_ITEMS + c - 1) // c, s // PIECE))
    return ((s + pieces - 1) // pieces + SUM_CHUNK - 1) // SUM_CHUNK * SUM_CHUNK


cdef void _groupnorm_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                             const floating[::1] bias, double eps, int act, double slope, floating[:, :, ::1] y,
                             floating[:, ::1] mean, floating[:, ::1] rstd):
    _forward_sets(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], num_groups, _ptr(weight), _ptr(bias), eps, act,
                  slope, &y[0, 0, 0], &mean[0, 0], &rstd[0, 0])


cdef int _forward_sets(const floating* xp, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t num_groups,
                       const floating* w, const floating* b, double eps, int act, double slope, floating* yp,
                       floating* mp, floating* rp) except -1:
    cdef Py_ssize_t cg = c // num_groups, t, length = _piece_length(n, c, s, num_groups)
    cdef int nt = threads_for(n * c * s, _nthreads, _serial_max)
    cdef bint stream = n * c * s * <Py_ssize_t>sizeof(floating) >= _stream_min
    if length:
        return _forward_pieces(xp, c, s, length, w, b, eps, act, slope, stream, nt, yp, mp, rp)
    # set t = (sample t // G, group t % G) starts at value t * cg * s
    for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
        _forward_set(xp + t * cg * s, yp + t * cg * s, cg, s,
                     w + (t % num_groups) * cg if w != NULL else NULL,
                     b + (t % num_groups) * cg if b != NULL else NULL,
                     eps, act, slope, stream, mp + t, rp + t)
    return 0


cdef int _forward_pieces(const floating* xp, Py_ssize_t c, Py_ssize_t s, Py_ssize_t length, const floating* w,
                         const floating* b, double eps, int act, double slope, bint stream, int nt, floating* yp,
                         floating* mp, floating* rp) except -1:
    """_forward_sets' pieces schedule for its single set (all c channels of the one sample): the items' moments
    about the set's pivot in parallel, added in item order, then the items' elementwise pass in parallel (a
    thread's items are the same in both, so they are still in its cache). Item i is piece i % q of channel i // q,
    q pieces of ``length`` values per channel."""
    cdef Py_ssize_t q = (s + length - 1) // length, i, o, e
    cdef double s1 = 0.0, s2 = 0.0, pivot = pivot_of(xp[0]), mean, rstd
    cdef double* part = <double*>malloc(2 * c * q * sizeof(double))
    if part == NULL:
        raise MemoryError()
    with nogil:
        for i in prange(c * q, schedule="static", num_threads=nt):
            o = (i // q) * s + (i % q) * length
            part[2 * i] = 0.0
            part[2 * i + 1] = 0.0
            moments(xp + o, min(length, s - (i % q) * length), pivot, &part[2 * i], &part[2 * i + 1])
        for i in range(c * q):
            s1 = s1 + part[2 * i]
            s2 = s2 + part[2 * i + 1]
        finish_moments(s1, s2, c * s, pivot, eps, &mean, &rstd)
        mp[0] = <floating>mean
        rp[0] = <floating>rstd
        for i in prange(c * q, schedule="static", num_threads=nt):
            o = (i // q) * s + (i % q) * length
            e = min(length, s - (i % q) * length)
            if stream:
                affine_act_stream(xp + o, yp + o, e, mean, rstd * w[i // q] if w != NULL else rstd,
                                  b[i // q] if b != NULL else 0.0, act, slope)
                normkit_sfence()
            else:
                affine_act(xp + o, yp + o, e, mean, rstd * w[i // q] if w != NULL else rstd,
                           b[i // q] if b != NULL else 0.0, act, slope)
    free(part)
    return 0


cdef void _groupnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                              const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                              const floating[::1] bias, int act, double slope, floating[:, :, ::1] dx,
                              floating[::1] dweight, floating[::1] dbias):
    _backward_sets(&dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], num_groups, &mean[0, 0],
                   &rstd[0, 0], _ptr(weight), _ptr(bias), act, slope, &dx[0, 0, 0], _out(dweight), _out(dbias))


cdef int _backward_sets(const floating* dyp, const floating* xp, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s,
                        Py_ssize_t num_groups, const floating* mp, const floating* rp, const floating* w,
                        const floating* b, int act, double slope, floating* dxp, floating* dweight,
                        floating* dbias) except -1:
    cdef Py_ssize_t cg = c // num_groups, t, length = _piece_length(n, c, s, num_groups)
    # per-channel sum(dy), then sum(dy * (x - mean)), of each sample (malloc: np.empty costs ~1 us a call)
    cdef double* sdyp = <double*>malloc(2 * n * c * sizeof(double))
    cdef double* sdyxp = sdyp + n * c
    cdef int nt = threads_for(n * c * s, _nthreads, _serial_max)
    # with an activation, ordinary stores (g kept in dx between the passes), as BatchNorm's backward: streaming
    # never changes which path runs, nor so the gradients' bits
    cdef bint stream = act == NO_ACT and n * c * s * <Py_ssize_t>sizeof(floating) >= _stream_min
    if sdyp == NULL:
        raise MemoryError()
    try:
        if length:
            _backward_pieces(dyp, xp, c, s, length, mp[0], rp[0], w, b, act, slope, stream, nt, dxp, sdyp, sdyxp)
        else:
            for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
                _backward_set(dyp + t * cg * s, xp + t * cg * s, dxp + t * cg * s, cg, s,
                              w + (t % num_groups) * cg if w != NULL else NULL,
                              b + (t % num_groups) * cg if b != NULL else NULL, act, slope,
                              mp[t], rp[t], stream, sdyp + t * cg, sdyxp + t * cg)
        _param_grads(sdyp, sdyxp, rp, n, c, cg, dweight, dbias)
    finally:
        free(sdyp)
    return 0


cdef int _backward_pieces(const floating* dyp, const floating* xp, Py_ssize_t c, Py_ssize_t s, Py_ssize_t length,
                          double mean, double rstd, const floating* w, const floating* bias, int act, double slope,
                          bint stream, int nt, floating* dxp, double* sdy, double* sdyx) except -1:
    """_backward_sets' pieces schedule for its single set, items as _forward_pieces': the items' sums of g and
    g * (x - mean) in parallel, each channel's added in item order into sdy, sdyx (c,), the coefficients from them
    as _backward_set's, then the items' input gradient in parallel (as there, g is left in dx between the passes
    unless dx is streamed)."""
    cdef Py_ssize_t q = (s + length - 1) // length, i, o, e, ch
    cdef double wc, sg = 0.0, sgx = 0.0, cb, cc, m = <double>(c * s)
    cdef bint kept = act != NO_ACT and not stream
    cdef double* part = <double*>malloc(2 * c * q * sizeof(double))
    if part == NULL:
        raise MemoryError()
    with nogil:
        for i in prange(c * q, schedule="static", num_threads=nt):
            o = (i // q) * s + (i % q) * length
            e = min(length, s - (i % q) * length)
            wc = w[i // q] if w != NULL else 1.0
            part[2 * i] = 0.0
            part[2 * i + 1] = 0.0
            if kept:
                act_grad_sums_kept(dyp + o, xp + o, dxp + o, e, mean, rstd * wc, bias[i // q] if bias != NULL else 0.0,
                                   act, slope, &part[2 * i], &part[2 * i + 1])
            else:
                act_grad_sums(dyp + o, xp + o, e, mean, rstd * wc, bias[i // q] if bias != NULL else 0.0, act, slope,
                              &part[2 * i], &part[2 * i + 1])
        for ch in range(c):
            sdy[ch] = 0.0
            sdyx[ch] = 0.0
            for i in range(ch * q, (ch + 1) * q):
                sdy[ch] += part[2 * i]
                sdyx[ch] += part[2 * i + 1]
            wc = w[ch] if w != NULL else 1.0
            sg = sg + wc * sdy[ch]
            sgx = sgx + wc * sdyx[ch]
        cb = -rstd * rstd * rstd * sgx / m
        cc = -rstd * sg / m
        for i in prange(c * q, schedule="static", num_threads=nt):
            o = (i // q) * s + (i % q) * length
            e = min(length, s - (i % q) * length)
            wc = w[i // q] if w != NULL else 1.0
            if kept:
                grad_apply_inplace(dxp + o, xp + o, e, mean, rstd * wc, cb, cc)
            elif stream:
                act_grad_apply_stream(dyp + o, xp + o, dxp + o, e, mean, rstd * wc,
                                      bias[i // q] if bias != NULL else 0.0, act, slope, True, rstd * wc, cb, cc)
                normkit_sfence()
            else:
                act_grad_apply(dyp + o, xp + o, dxp + o, e, mean, rstd * wc, bias[i // q] if bias != NULL else 0.0,
                               act, slope, True, rstd * wc, cb, cc)
    free(part)
    return 0


cdef void _param_grads(double* sdy, double* sdyx, const floating* rstd, Py_ssize_t n, Py_ssize_t c, Py_ssize_t cg,
                       floating* dweight, floating* dbias) noexcept nogil:
    """dweight = sum(dy * xhat) = sum over samples of rstd * sum(dy * (x - mean)), dbias = sum(dy); summed in
    sample order. sdy, sdyx: (n, c), the caller's scratch, summed into their first rows; rstd: (n, c // cg);
    dweight, dbias: (c,) or NULL. Sample by sample across all channels: one channel at a time, each addition
    waited on the one before (10% of GroupNorm's backward on (32, 512, 7, 7))."""
    cdef Py_ssize_t i, j, k, g = c // cg
    cdef double r
    if dweight != NULL:
        for i in range(n):
            for k in range(g):
                r = <double>rstd[i * g + k]
                if i == 0:
                    for j in range(k * cg, (k + 1) * cg):
                        sdyx[j] = 0.0 + r * sdyx[j]
                else:
                    for j in range(k * cg, (k + 1) * cg):
                        sdyx[j] = sdyx[j] + r * sdyx[i * c + j]
        for j in range(c):
            dweight[j] = <floating>sdyx[j]
    if dbias != NULL:
        for i in range(1, n):
            for j in range(c):
                sdy[j] = sdy[j] + sdy[i * c + j]
        for j in range(c):
            dbias[j] = <floating>sdy[j]


def groupnorm_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                      const floating[::1] bias, double eps, floating[:, :, ::1] y, floating[:, ::1] mean,
                      floating[:, ::1] rstd):
    _groupnorm_forward(x, num_groups, weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def groupnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                       const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                       floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _groupnorm_backward(dy, x, num_groups, mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


def instancenorm_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                         double eps, floating[:, :, ::1] y, floating[:, ::1] mean, floating[:, ::1] rstd):
    _groupnorm_forward(x, x.shape[1], weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def instancenorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                          const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                          floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


# --- fused activation (normkit.contract): the same sets, the activation applied in their passes ------------------

def groupnorm_act_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                          const floating[::1] bias, double eps, int activation, double slope, floating[:, :, ::1] y,
                          floating[:, ::1] mean, floating[:, ::1] rstd):
    _groupnorm_forward(x, num_groups, weight, bias, eps, activation, slope, y, mean, rstd)


def groupnorm_act_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                           const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                           const floating[::1] bias, int activation, double slope, floating[:, :, ::1] dx,
                           floating[::1] dweight, floating[::1] dbias):
    _groupnorm_backward(dy, x, num_groups, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


def instancenorm_act_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                             double eps, int activation, double slope, floating[:, :, ::1] y,
                             floating[:, ::1] mean, floating[:, ::1] rstd):
    _groupnorm_forward(x, x.shape[1], weight, bias, eps, activation, slope, y, mean, rstd)


def instancenorm_act_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                              const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                              const floating[::1] bias, int activation, double slope, floating[:, :, ::1] dx,
                              floating[::1] dweight, floating[::1] dbias):
    _groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


# --- address kernels (normkit.contract): the plain kernels on memory given by address ----------------------------

cdef int _check(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t num_groups, size_t x, size_t out,
                Py_ssize_t[8] mean_shape, Py_ssize_t[8] rstd_shape) except -1:
    # what can be checked without the arrays: the shapes against each other, data addresses not NULL
    if n < 1 or c < 1 or s < 1 or num_groups < 1 or c % num_groups or x == 0 or out == 0:
        raise ValueError(f"address kernel: bad shape ({n}, {c}, {s}) / groups {num_groups} or a NULL data address")
    if mean_shape[0] != n or mean_shape[1] != num_groups or rstd_shape[0] != n or rstd_shape[1] != num_groups:
        raise ValueError(f"address kernel: mean and rstd must be ({n}, {num_groups}), got "
                         f"({mean_shape[0]}, {mean_shape[1]}) and ({rstd_shape[0]}, {rstd_shape[1]})")
    return 0


def groupnorm_forward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, Py_ssize_t num_groups, size_t weight,
                           size_t bias, double eps, size_t y, floating[:, ::1] mean, floating[:, ::1] rstd):
    _check(n, c, s, num_groups, x, y, mean.shape, rstd.shape)
    _forward_sets(<const floating*>x, n, c, s, num_groups, <const floating*>weight, <const floating*>bias, eps,
                  NO_ACT, 0.0, <floating*>y, &mean[0, 0], &rstd[0, 0])
    return max_offset(&mean[0, 0], &rstd[0, 0], n * num_groups)


def groupnorm_backward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x, Py_ssize_t num_groups,
                            const floating[:, ::1] mean, const floating[:, ::1] rstd, size_t weight, size_t dx,
                            size_t dweight, size_t dbias):
    _check(n, c, s, num_groups, dy if x else 0, dx, mean.shape, rstd.shape)
    _backward_sets(<const floating*>dy, <const floating*>x, n, c, s, num_groups, &mean[0, 0], &rstd[0, 0],
                   <const floating*>weight, NULL, NO_ACT, 0.0, <floating*>dx, <floating*>dweight, <floating*>dbias)


def instancenorm_forward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight, size_t bias,
                              double eps, size_t y, floating[:, ::1] mean, floating[:, ::1] rstd):
    _check(n, c, s, c, x, y, mean.shape, rstd.shape)
    _forward_sets(<const floating*>x, n, c, s, c, <const floating*>weight, <const floating*>bias, eps, NO_ACT, 0.0,
                  <floating*>y, &mean[0, 0], &rstd[0, 0])
    return max_offset(&mean[0, 0], &rstd[0, 0], n * c)


def instancenorm_backward_addr(Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x,
                               const floating[:, ::1] mean, const floating[:, ::1] rstd, size_t weight, size_t dx,
                               size_t dweight, size_t dbias):
    _check(n, c, s, c, dy if x else 0, dx, mean.shape, rstd.shape)
    _backward_sets(<const floating*>dy, <const floating*>x, n, c, s, c, &mean[0, 0], &rstd[0, 0],
                   <const floating*>weight, NULL, NO_ACT, 0.0, <floating*>dx, <floating*>dweight, <floating*>dbias)


# --- 16-bit data (normkit.contract): uint16 patterns, fmt 0 bfloat16 / 1 float16; float32 parameters and stats ----

cdef void _forward_set16(const uint16_t* x, uint16_t* y, Py_ssize_t cg, Py_ssize_t s, const float* w,
                         const float* b, double eps, int fmt, float* mean_out, float* rstd_out) noexcept nogil:
    # as _forward_set, tile by tile
    cdef Py_ssize_t c
    cdef double s1 = 0.0, s2 = 0.0, mean, rstd, pivot = pivot16(x, fmt)
    moments16(x, cg * s, fmt, pivot, &s1, &s2)
    finish_moments(s1, s2, cg * s, pivot, eps, &mean, &rstd)
    mean_out[0] = <float>mean
    rstd_out[0] = <float>rstd
    for c in range(cg):
        affine16(x + c * s, y + c * s, s, fmt, mean, rstd * w[c] if w != NULL else rstd, b[c] if b != NULL else 0.0)


cdef void _backward_set16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, Py_ssize_t cg, Py_ssize_t s,
                          const float* w, double mean, double rstd, int fmt, double* sdy, double* sdyx) noexcept nogil:
    # as _backward_set, tile by tile
    cdef Py_ssize_t c
    cdef double sg = 0.0, sgx = 0.0, wc, m = <double>(cg * s), b, k
    for c in range(cg):
        sdy[c] = 0.0
        sdyx[c] = 0.0
        grad_sums16(dy + c * s, x + c * s, NULL, s, fmt, mean, &sdy[c], &sdyx[c])
        wc = w[c] if w != NULL else 1.0
        sg = sg + wc * sdy[c]
        sgx = sgx + wc * sdyx[c]
    b = -rstd * rstd * rstd * sgx / m
    k = -rstd * sg / m
    for c in range(cg):
        wc = w[c] if w != NULL else 1.0
        grad_apply16(dy + c * s, x + c * s, dx + c * s, s, fmt, mean, rstd * wc, b, k)


cdef void _forward16(int fmt, const uint16_t* xp, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t num_groups,
                     const float* w, const float* b, double eps, uint16_t* yp, float* mp, float* rp) noexcept:
    cdef Py_ssize_t cg = c // num_groups, t
    cdef int nt = threads_for(n * c * s, _nthreads, _serial_max)
    for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
        _forward_set16(xp + t * cg * s, yp + t * cg * s, cg, s,
                       w + (t % num_groups) * cg if w != NULL else NULL,
                       b + (t % num_groups) * cg if b != NULL else NULL,
                       eps, fmt, mp + t, rp + t)


cdef int _backward16(int fmt, const uint16_t* dyp, const uint16_t* xp, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s,
                     Py_ssize_t num_groups, const float* mp, const float* rp, const float* w, uint16_t* dxp,
                     float* dweight, float* dbias) except -1:
    cdef Py_ssize_t cg = c // num_groups, t
    # per-channel sum(dy), then sum(dy * (x - mean)), of each sample (malloc, as _backward_sets)
    cdef double* sdyp = <double*>malloc(2 * n * c * sizeof(double))
    cdef double* sdyxp = sdyp + n * c
    cdef int nt = threads_for(n * c * s, _nthreads, _serial_max)
    if sdyp == NULL:
        raise MemoryError()
    try:
        for t in prange(n * num_groups, nogil=True, schedule="static", num_threads=nt):
            _backward_set16(dyp + t * cg * s, xp + t * cg * s, dxp + t * cg * s, cg, s,
                            w + (t % num_groups) * cg if w != NULL else NULL,
                            mp[t], rp[t], fmt, sdyp + t * cg, sdyxp + t * cg)
        _param_grads(sdyp, sdyxp, rp, n, c, cg, dweight, dbias)
    finally:
        free(sdyp)
    return 0


def groupnorm_forward16(int fmt, const uint16_t[:, :, ::1] x, Py_ssize_t num_groups, const float[::1] weight,
                        const float[::1] bias, double eps, uint16_t[:, :, ::1] y, float[:, ::1] mean,
                        float[:, ::1] rstd):
    _forward16(fmt, &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], num_groups, _ptr(weight), _ptr(bias), eps,
               &y[0, 0, 0], &mean[0, 0], &rstd[0, 0])


def groupnorm_backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x, Py_ssize_t num_groups,
                         const float[:, ::1] mean, const float[:, ::1] rstd, const float[::1] weight,
                         uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    _backward16(fmt, &dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], num_groups, &mean[0, 0],
                &rstd[0, 0], _ptr(weight), &dx[0, 0, 0], _out(dweight), _out(dbias))


def instancenorm_forward16(int fmt, const uint16_t[:, :, ::1] x, const float[::1] weight, const float[::1] bias,
                           double eps, uint16_t[:, :, ::1] y, float[:, ::1] mean, float[:, ::1] rstd):
    groupnorm_forward16(fmt, x, x.shape[1], weight, bias, eps, y, mean, rstd)


def instancenorm_backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x,
                            const float[:, ::1] mean, const float[:, ::1] rstd, const float[::1] weight,
                            uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    groupnorm_backward16(fmt, dy, x, x.shape[1], mean, rstd, weight, dx, dweight, dbias)


# 16-bit address kernels: as the float ones, fmt first (as the array kernels); the data's addresses hold uint16
# patterns, weight, bias and the gradients float32

def groupnorm_forward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, Py_ssize_t num_groups,
                             size_t weight, size_t bias, double eps, size_t y, float[:, ::1] mean,
                             float[:, ::1] rstd):
    _check(n, c, s, num_groups, x, y, mean.shape, rstd.shape)
    _forward16(fmt, <const uint16_t*>x, n, c, s, num_groups, <const float*>weight, <const float*>bias, eps,
               <uint16_t*>y, &mean[0, 0], &rstd[0, 0])


def groupnorm_backward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x,
                              Py_ssize_t num_groups, const float[:, ::1] mean, const float[:, ::1] rstd,
                              size_t weight, size_t dx, size_t dweight, size_t dbias):
    _check(n, c, s, num_groups, dy if x else 0, dx, mean.shape, rstd.shape)
    _backward16(fmt, <const uint16_t*>dy, <const uint16_t*>x, n, c, s, num_groups, &mean[0, 0], &rstd[0, 0],
                <const float*>weight, <uint16_t*>dx, <float*>dweight, <float*>dbias)


def instancenorm_forward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t x, size_t weight,
                                size_t bias, double eps, size_t y, float[:, ::1] mean, float[:, ::1] rstd):
    _check(n, c, s, c, x, y, mean.shape, rstd.shape)
    _forward16(fmt, <const uint16_t*>x, n, c, s, c, <const float*>weight, <const float*>bias, eps, <uint16_t*>y,
               &mean[0, 0], &rstd[0, 0])


def instancenorm_backward16_addr(int fmt, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, size_t dy, size_t x,
                                 const float[:, ::1] mean, const float[:, ::1] rstd, size_t weight, size_t dx,
                                 size_t dweight, size_t dbias):
    _check(n, c, s, c, dy if x else 0, dx, mean.shape, rstd.shape)
    _backward16(fmt, <const uint16_t*>dy, <const uint16_t*>x, n, c, s, c, &mean[0, 0], &rstd[0, 0],
                <const float*>weight, <uint16_t*>dx, <float*>dweight, <float*>dbias)
