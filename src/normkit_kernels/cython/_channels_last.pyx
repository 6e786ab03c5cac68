# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GroupNorm and InstanceNorm (GroupNorm with one channel per group) on channels-last data, training mode, with or
without a fused activation.

x is (N, S, C), C-contiguous: sample n is S rows of C values, and a set (n, g) is the columns g*Cg..(g+1)*Cg-1
of those rows. Sums run down the columns, vectorized along C, with the NCHW BatchNorm's columns schedule's loops
(column_moments() and column_grad_sums() of _common.pxd, whole rows; normkit_col_sums16 for 16-bit data): in
registers where the build allows (groups of 8 rows in float32 lanes), else four rows per sweep in the data's
precision, then into double per column; redone in double where that overflowed or met a NaN/inf. A set's column
sums are then merged in channel order. Rows of a few values (a few channels) are taken k at a time as one row,
each column a set of its own (Fold: float rows of at most 8 values into rows of 16 or more, fold_rows; 16-bit rows
of at most 32 into rows of at most 128, FOLD16_WIDTH), the per-column pivots and coefficients repeated for them,
the rows left over on their own: each short row had cost a masked load and a call.

Tasks are cut from the shape alone, so no result depends on the thread count: one task per sample when there are
enough samples (its sums, statistics and elementwise pass while the sample is in cache); otherwise blocks of rows,
whose column sums are merged in block order before a second parallel pass. Parameter gradients are summed over
samples in sample order.

BatchNorm, and the inference directions that take running statistics, need no kernel here: on (N, S, C) data they
are the NCHW per-channel kernels on the (N*S, C, 1) view (see kernels.py).

A fused activation (the act_ kernels) is applied to each row of y while it is in L1; in backward the gradient
sums' pass leaves g = dy * act'(z) in dx (z recomputed from x and the statistics), which the elementwise pass then
reads instead of dy.

Large outputs (set_stream_min_bytes) are written with non-temporal stores (columns_stream), but for the backward
with an activation, which reads g back from dx.

16-bit data (the ...16 kernels, bfloat16 / float16 bit patterns with float32 parameters and statistics): the same
tasks, the column sums and each row's elementwise pass in registers where the build allows (normkit_col_sums16,
normkit_cols16: the loops of the NCHW BatchNorm's columns schedule, whose rows are these rows), else widened row
by row; sums that are not finite again in double, and a tile of outputs that is not all finite again from double
coefficients, as the NCHW 16-bit kernels do.
"""

import os

import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport uint16_t

from _common cimport (
    FROM_MEMORY_BYTES, NO_ACT, SERIAL_MAX_VALUES, STREAM_AFFINE, STREAM_GRAD, TILE16, act_grad, affine_columns,
    affine_columns_act, all_finite, column_grad_sums, column_moments, columns_stream, finish_moments, fold_rows,
    grad_apply_columns, narrow64, normkit_col_sums16, normkit_cols16, normkit_cols_act_grad_f, normkit_half_init,
    normkit_narrow, normkit_sfence, normkit_widen, pivot_of, threads_for,
)

# float16 converts with F16C where the CPU has it, unless NORMKIT_CYTHON_NO_F16C=1 (see _groupnorm.pyx).
F16C = bool(normkit_half_init(os.environ.get("NORMKIT_CYTHON_NO_F16C", "") in ("", "0")))

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


def set_from_memory_bytes(Py_ssize_t n):
    global _from_memory
    _from_memory = n


cdef enum:
    # with at least SAMPLE_TASKS samples, one task per sample; with fewer, each sample's rows are cut into blocks of
    # at least BLOCK_ROWS rows, enough for SAMPLE_TASKS tasks in all
    SAMPLE_TASKS = 8
    BLOCK_ROWS = 64
    # 16-bit rows of at most FOLD16_MAX_ROW values are folded (Fold) into rows of at most FOLD16_WIDTH values, one
    # step of the column sums' registers in the x86-64-v4 build, rather than the float kernels' 16 (fold_rows):
    # their passes cost a call or two per row. InstanceNorm (8, S, C) bfloat16 with 6.4M values, 1 thread, forward
    # / backward, ms. Before any fold (x86-64-v4): C = 1 177 / 205, C = 3 58 / 69, C = 8 22 / 26, C = 16 4.2 /
    # 5.3, C = 32 3.1 / 4.5. In-process A/B, folded to 16 (the float rule: C <= 8) / to 128, v4: C = 1 4.70 /
    # 2.15 and 5.73 / 3.61, C = 8 4.63 / 2.13 and 5.37 / 2.95; unfolded / to 128: C = 3 (no float fold: 18 values)
    # 11.0 / 2.7 and 12.6 / 3.9, C = 12 15.8 / 2.8 and 17.5 / 3.7, C = 16 4.69 / 1.97 and 5.40 / 3.21, C = 32 3.22
    # / 2.03 and 3.91 / 3.07. The x86-64-v3 build: C = 1 4.94 / 2.46 and 6.09 / 4.57 (folded to 16 / to 128), C =
    # 12 20.4 / 2.8 and 27.7 / 4.4 (unfolded / to 128), C = 32 3.19 / 2.35 and 3.87 / 4.24: the v3 backward lost
    # at C = 32, kept for v4's gain; at C = 48 both lost a little in the backward (3.5 -> 3.7-3.8), hence 32.
    # Float32 folded to 128 lost in v3 (backward 1.3-1.8x: its column sums' steps are 32 values) and in v4's
    # forward at C = 1 and 32 (1.25-1.35x). A 16-bit fold takes at most the S rows a sample has, so a short
    # sample folds too (a float one needs its k rows: fold_rows).
    FOLD16_WIDTH = 128
    FOLD16_MAX_ROW = 32


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _blocks(Py_ssize_t n, Py_ssize_t s) noexcept nogil:
    """Row blocks per sample (1: whole samples)."""
    if n >= SAMPLE_TASKS or n == 0:
        return 1
    return max(1, min(_cdiv(SAMPLE_TASKS, n), s // BLOCK_ROWS))


cdef struct Fold:
    # A sample's S rows of nc values as sf rows of `width` = k * nc values (fold_rows, FOLD16_WIDTH: k rows of a
    # few values as one; else k = 1), then the `tail` of S - k * sf rows of nc values.
    # The sf rows are cut into `blocks` blocks of `rows` rows, the tail goes with the last block. A sample has
    # blocks + 1 rows of column sums, `width` each: its blocks', then its tail's (nc columns), added up per channel
    # by _merge_sample. `from_memory`: the data are large enough to come from memory (_from_memory), where the
    # column sums read whole rows once (normkit_col_sums32 / 16's from_memory).
    Py_ssize_t k, width, sf, tail, blocks, rows
    bint from_memory


cdef inline Fold _fold(Py_ssize_t n, Py_ssize_t s, Py_ssize_t nc, bint half=False) noexcept nogil:
    """A sample's Fold; ``half``: 16-bit data's (FOLD16_WIDTH)."""
    cdef Fold f
    if half and 0 < nc <= FOLD16_MAX_ROW:
        f.k = max(1, min(FOLD16_WIDTH // nc, s))
    else:
        f.k = fold_rows(s, nc, 1)
    f.width = f.k * nc
    f.sf = s // f.k
    f.tail = s - f.sf * f.k
    f.blocks = _blocks(n, f.sf)
    f.rows = _cdiv(f.sf, f.blocks)
    f.from_memory = n * s * nc * (2 if half else 4) >= _from_memory  # (float64 sums take no register path)
    return f


cdef inline int _parts(const Fold* f, Py_ssize_t q) noexcept nogil:
    """Parts of block q's task: its rows, and with the last block the tail's."""
    return 2 if q == f.blocks - 1 and f.tail > 0 else 1


cdef inline Py_ssize_t _part_offset(const Fold* f, Py_ssize_t q, int j) noexcept nogil:
    """Where part j of block q starts, in values from the sample's first."""
    return f.sf * f.width if j else q * f.rows * f.width


cdef inline Py_ssize_t _part_rows(const Fold* f, Py_ssize_t q, int j) noexcept nogil:
    return f.tail if j else max(0, min(f.rows, f.sf - q * f.rows))


cdef inline Py_ssize_t _part_width(const Fold* f, Py_ssize_t nc, int j) noexcept nogil:
    return nc if j else f.width


cdef inline Py_ssize_t _part_sums(const Fold* f, Py_ssize_t q, int j) noexcept nogil:
    """Where part j of block q puts its column sums, in values from the sample's first row of sums."""
    return (f.blocks if j else q) * f.width


cdef void _repeat(floating* a, Py_ssize_t nc, Py_ssize_t k) noexcept nogil:
    """a's first nc values repeated k - 1 times after them: a folded row's per-column coefficients."""
    cdef Py_ssize_t g, l
    for g in range(1, k):
        for l in range(nc):
            a[g * nc + l] = a[l]


cdef void _merge_sample(double* a, double* b, const Fold* f, Py_ssize_t nc) noexcept nogil:
    """A sample's column sums per channel, into its first nc: its blocks' in block order (each one's k groups of
    nc columns in row order), then its tail's."""
    cdef Py_ssize_t q, l
    cdef double t1, t2
    for l in range(nc):
        t1 = a[l]
        t2 = b[l]
        for q in range(1, f.blocks * f.k):
            t1 = t1 + a[q * nc + l]
            t2 = t2 + b[q * nc + l]
        if f.tail:
            t1 = t1 + a[f.blocks * f.width + l]
            t2 = t2 + b[f.blocks * f.width + l]
        a[l] = t1
        b[l] = t2


cdef inline const floating* _ptr(const floating[::1] a) noexcept:
    return NULL if a is None else &a[0]


# --- column loops: rows of nc values, one accumulator per column ----------------------------------------------

cdef void _affine_rows(const floating* x, floating* y, Py_ssize_t rows, Py_ssize_t nc, const floating* mean,
                       const floating* scale, const floating* shift, int act, double slope,
                       bint stream) noexcept nogil:
    """y = act((x - mean) * scale + shift) row by row, each row while it is in L1 (none for NO_ACT); with
    ``stream``, y by non-temporal stores."""
    cdef Py_ssize_t i
    if stream:
        columns_stream(STREAM_AFFINE, NULL, x, y, 0, rows * nc, nc, mean, scale, shift, NULL, act, slope)
        normkit_sfence()
        return
    for i in range(rows):
        affine_columns_act(x + i * nc, y + i * nc, nc, mean, scale, shift, act, slope)


cdef void _act_grad_rows(const floating* dy, const floating* x, floating* g, Py_ssize_t rows, Py_ssize_t nc,
                         const floating* mean, const floating* zscale, const floating* zshift, int act,
                         double slope) noexcept nogil:
    """g = dy * act'(z), z = (x - mean) * zscale + zshift recomputed row by row (into g, then in place)."""
    cdef Py_ssize_t i
    for i in range(rows):
        if floating is float:
            normkit_cols_act_grad_f(dy + i * nc, x + i * nc, g + i * nc, nc, mean, zscale, zshift, act, <float>slope)
        else:
            affine_columns(x + i * nc, g + i * nc, nc, mean, zscale, zshift)
            act_grad(dy + i * nc, g + i * nc, nc, act, slope)


cdef void _grad_apply_rows(const floating* dy, const floating* x, floating* dx, Py_ssize_t rows, Py_ssize_t nc,
                           const floating* mean, const floating* ca, const floating* cb, const floating* cc,
                           bint stream) noexcept nogil:
    """dx = ca * dy + cb * (x - mean) + cc row by row; with ``stream``, by non-temporal stores."""
    cdef Py_ssize_t i
    if stream:
        columns_stream(STREAM_GRAD, dy, x, dx, 0, rows * nc, nc, mean, ca, cb, cc, NO_ACT, 0.0)
        normkit_sfence()
        return
    for i in range(rows):
        grad_apply_columns(dy + i * nc, x + i * nc, dx + i * nc, nc, mean, ca, cb, cc)


# --- a task's parts (Fold): its block of rows, and with the last block the tail's -------------------------------

cdef void _sums_task(const floating* dy, const floating* x, const Fold* f, Py_ssize_t q, Py_ssize_t nc,
                     const floating* p, double* s1, double* s2) noexcept nogil:
    """Block q's column sums of a sample (dy, x: its first value; s1, s2: its first row of sums; p per column of a
    folded row): column_moments() (dy NULL, p the pivots) or column_grad_sums() (p the means)."""
    cdef int j
    cdef Py_ssize_t o, r, w
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        r = _part_rows(f, q, j)
        w = _part_width(f, nc, j)
        if dy == NULL:
            column_moments(x + o, r, w, 0, w, p, s1 + _part_sums(f, q, j), s2 + _part_sums(f, q, j), f.from_memory)
        else:
            column_grad_sums(dy + o, x + o, r, w, 0, w, p, s1 + _part_sums(f, q, j), s2 + _part_sums(f, q, j),
                             f.from_memory)


cdef void _affine_task(const floating* x, floating* y, const Fold* f, Py_ssize_t q, Py_ssize_t nc,
                       const floating* mean, const floating* scale, const floating* shift, int act, double slope,
                       bint stream) noexcept nogil:
    cdef int j
    cdef Py_ssize_t o
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        _affine_rows(x + o, y + o, _part_rows(f, q, j), _part_width(f, nc, j), mean, scale, shift, act, slope, stream)


cdef void _act_grad_task(const floating* dy, const floating* x, floating* g, const Fold* f, Py_ssize_t q,
                         Py_ssize_t nc, const floating* mean, const floating* zscale, const floating* zshift, int act,
                         double slope) noexcept nogil:
    cdef int j
    cdef Py_ssize_t o
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        _act_grad_rows(dy + o, x + o, g + o, _part_rows(f, q, j), _part_width(f, nc, j), mean, zscale, zshift, act,
                       slope)


cdef void _grad_apply_task(const floating* dy, const floating* x, floating* dx, const Fold* f, Py_ssize_t q,
                           Py_ssize_t nc, const floating* mean, const floating* ca, const floating* cb,
                           const floating* cc, bint stream) noexcept nogil:
    cdef int j
    cdef Py_ssize_t o
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        _grad_apply_rows(dy + o, x + o, dx + o, _part_rows(f, q, j), _part_width(f, nc, j), mean, ca, cb, cc, stream)


# --- per-sample steps ------------------------------------------------------------------------------------------

cdef void _finish_sample(double* s1, double* s2, const Fold* f, Py_ssize_t nc, Py_ssize_t groups, Py_ssize_t s,
                         const floating* piv, double eps, const floating* w, const floating* b, double* mu,
                         double* rs, floating* cm, floating* scale, floating* shift) noexcept nogil:
    """One sample's statistics (mu, rs: per group) from its column sums (merged first: _merge_sample), and its
    per-column coefficients in the data's precision, repeated for a folded row; as in affine(), the shift takes the
    mean's rounding to that precision."""
    cdef Py_ssize_t cg = nc // max(1, groups), g, c
    cdef double t1, t2, sc
    _merge_sample(s1, s2, f, nc)
    for g in range(groups):
        t1 = 0.0
        t2 = 0.0
        for c in range(g * cg, (g + 1) * cg):
            t1 = t1 + s1[c]
            t2 = t2 + s2[c]
        finish_moments(t1, t2, cg * s, piv[g * cg], eps, &mu[g], &rs[g])
        for c in range(g * cg, (g + 1) * cg):
            sc = rs[g] * w[c] if w != NULL else rs[g]
            cm[c] = <floating>mu[g]
            scale[c] = <floating>sc
            shift[c] = <floating>((b[c] if b != NULL else 0.0) + (<double>cm[c] - mu[g]) * sc)
    _repeat(cm, nc, f.k)
    _repeat(scale, nc, f.k)
    _repeat(shift, nc, f.k)


cdef void _grad_coefficients(double* sdy, double* sdyx, const Fold* f, Py_ssize_t nc, Py_ssize_t groups,
                             Py_ssize_t s, const floating* rstd, const floating* w, floating* ca, floating* cb,
                             floating* cc) noexcept nogil:
    """dx = ca * dy + cb * (x - mean) + cc per column of one sample, from its gradient sums (merged first:
    _merge_sample), repeated for a folded row: with g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    over each set."""
    cdef Py_ssize_t cg = nc // max(1, groups), g, c
    cdef double sg, sgx, wc, r, m = <double>(cg * s), bb, k
    _merge_sample(sdy, sdyx, f, nc)
    for g in range(groups):
        sg = 0.0
        sgx = 0.0
        for c in range(g * cg, (g + 1) * cg):
            wc = w[c] if w != NULL else 1.0
            sg = sg + wc * sdy[c]
            sgx = sgx + wc * sdyx[c]
        r = rstd[g]
        bb = -r * r * r * sgx / m
        k = -r * sg / m
        for c in range(g * cg, (g + 1) * cg):
            ca[c] = <floating>(r * (w[c] if w != NULL else 1.0))
            cb[c] = <floating>bb
            cc[c] = <floating>k
    _repeat(ca, nc, f.k)
    _repeat(cb, nc, f.k)
    _repeat(cc, nc, f.k)


cdef void _param_grads(const double[:, ::1] sdy, const double[:, ::1] sdyx, const floating[:, ::1] rstd,
                       Py_ssize_t cg, Py_ssize_t per, floating[::1] dweight, floating[::1] dbias):
    """dweight = sum(g * xhat) = sum over samples of rstd * sum(g * (x - mean)), g = dy or dy * act'(z), and
    dbias = sum(g), from each sample's merged column sums (row i * per of sdy, sdyx); summed in sample order."""
    cdef Py_ssize_t n = rstd.shape[0], nc = rstd.shape[1] * cg, i, c
    cdef double acc
    if dweight is not None:
        for c in range(nc):
            acc = 0.0
            for i in range(n):
                acc = acc + <double>rstd[i, c // cg] * sdyx[i * per, c]
            dweight[c] = <floating>acc
    if dbias is not None:
        for c in range(nc):
            acc = 0.0
            for i in range(n):
                acc = acc + sdy[i * per, c]
            dbias[c] = <floating>acc


# --- the kernels' bodies ---------------------------------------------------------------------------------------

cdef void _forward(const floating[:, :, ::1] x, Py_ssize_t groups, const floating[::1] weight,
                   const floating[::1] bias, double eps, int act, double slope, floating[:, :, ::1] y,
                   floating[:, ::1] mean, floating[:, ::1] rstd):
    cdef Py_ssize_t n = x.shape[0], s = x.shape[1], nc = x.shape[2], cg = nc // max(1, groups)  # no groups: C = 0
    cdef Fold f = _fold(n, s, nc)
    cdef Py_ssize_t per = f.blocks + 1, i, g, c, t
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef const floating* w = _ptr(weight)
    cdef const floating* b = _ptr(bias)
    dtype = np.float32 if floating is float else np.float64
    cdef floating[:, ::1] piv = np.empty((n, f.width), dtype)
    cdef floating[:, ::1] cm = np.empty((n, f.width), dtype), scale = np.empty((n, f.width), dtype)
    cdef floating[:, ::1] shift = np.empty((n, f.width), dtype)
    cdef double[:, ::1] s1 = np.empty((n * per, f.width)), s2 = np.empty((n * per, f.width))
    cdef double[:, ::1] mu = np.empty((n, groups)), rs = np.empty((n, groups))
    cdef int nt = threads_for(n * s * nc, _nthreads, _serial_max)
    cdef bint stream = n * s * nc * <Py_ssize_t>sizeof(floating) >= _stream_min
    for i in range(n):
        for g in range(groups):
            for c in range(g * cg, (g + 1) * cg):
                piv[i, c] = <floating>pivot_of(x[i, 0, g * cg]) if s else 0
        _repeat(&piv[i, 0], nc, f.k)
    if f.blocks == 1:
        for i in prange(n, nogil=True, schedule="static", num_threads=nt):
            _sums_task(<floating*>NULL, xp + i * s * nc, &f, 0, nc, &piv[i, 0], &s1[i * per, 0], &s2[i * per, 0])
            _finish_sample(&s1[i * per, 0], &s2[i * per, 0], &f, nc, groups, s, &piv[i, 0], eps, w, b, &mu[i, 0],
                           &rs[i, 0], &cm[i, 0], &scale[i, 0], &shift[i, 0])
            _affine_task(xp + i * s * nc, yp + i * s * nc, &f, 0, nc, &cm[i, 0], &scale[i, 0], &shift[i, 0], act,
                         slope, stream)
    else:
        for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
            i = t // f.blocks
            _sums_task(<floating*>NULL, xp + i * s * nc, &f, t % f.blocks, nc, &piv[i, 0], &s1[i * per, 0],
                       &s2[i * per, 0])
        for i in range(n):
            _finish_sample(&s1[i * per, 0], &s2[i * per, 0], &f, nc, groups, s, &piv[i, 0], eps, w, b, &mu[i, 0],
                           &rs[i, 0], &cm[i, 0], &scale[i, 0], &shift[i, 0])
        for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
            i = t // f.blocks
            _affine_task(xp + i * s * nc, yp + i * s * nc, &f, t % f.blocks, nc, &cm[i, 0], &scale[i, 0],
                         &shift[i, 0], act, slope, stream)
    for i in range(n):
        for g in range(groups):
            mean[i, g] = <floating>mu[i, g]
            rstd[i, g] = <floating>rs[i, g]


cdef void _backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t groups,
                    const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                    const floating[::1] bias, int act, double slope, floating[:, :, ::1] dx, floating[::1] dweight,
                    floating[::1] dbias):
    """With an activation, the gradient sums' pass leaves g = dy * act'(z) in dx (z recomputed from x, the
    statistics, weight and bias), and the elementwise pass reads g from there instead of dy."""
    cdef Py_ssize_t n = x.shape[0], s = x.shape[1], nc = x.shape[2], cg = nc // max(1, groups)  # no groups: C = 0
    cdef Fold f = _fold(n, s, nc)
    cdef Py_ssize_t per = f.blocks + 1, i, c, t, o, q
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0]
    cdef const floating* w = _ptr(weight)
    cdef const floating* b = _ptr(bias)
    cdef const floating* gp = dyp if act == NO_ACT else dxp  # where the elementwise pass reads g
    dtype = np.float32 if floating is float else np.float64
    cdef floating[:, ::1] cm = np.empty((n, f.width), dtype), ca = np.empty((n, f.width), dtype)
    cdef floating[:, ::1] cb = np.empty((n, f.width), dtype), cc = np.empty((n, f.width), dtype)
    cdef floating[:, ::1] zs = np.empty((n, f.width), dtype), zb = np.empty((n, f.width), dtype)
    cdef double[:, ::1] sdy = np.empty((n * per, f.width)), sdyx = np.empty((n * per, f.width))
    cdef int nt = threads_for(n * s * nc, _nthreads, _serial_max)
    # with an activation, g is read from dx itself: ordinary stores, as BatchNorm's backward does
    cdef bint stream = act == NO_ACT and n * s * nc * <Py_ssize_t>sizeof(floating) >= _stream_min
    for i in range(n):
        for c in range(nc):
            cm[i, c] = mean[i, c // cg]
            zs[i, c] = <floating>(<double>rstd[i, c // cg] * (w[c] if w != NULL else 1.0))
            zb[i, c] = b[c] if b != NULL else 0.0
        _repeat(&cm[i, 0], nc, f.k)
        _repeat(&zs[i, 0], nc, f.k)
        _repeat(&zb[i, 0], nc, f.k)
    for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
        i = t // f.blocks
        q = t % f.blocks
        o = i * s * nc
        if act != NO_ACT:
            _act_grad_task(dyp + o, xp + o, dxp + o, &f, q, nc, &cm[i, 0], &zs[i, 0], &zb[i, 0], act, slope)
        _sums_task(gp + o, xp + o, &f, q, nc, &cm[i, 0], &sdy[i * per, 0], &sdyx[i * per, 0])
        if f.blocks == 1:  # the whole sample in this task: finish it while it is in cache
            _grad_coefficients(&sdy[i * per, 0], &sdyx[i * per, 0], &f, nc, groups, s, &rstd[i, 0], w, &ca[i, 0],
                               &cb[i, 0], &cc[i, 0])
            _grad_apply_task(gp + o, xp + o, dxp + o, &f, 0, nc, &cm[i, 0], &ca[i, 0], &cb[i, 0], &cc[i, 0], stream)
    if f.blocks > 1:
        for i in range(n):
            _grad_coefficients(&sdy[i * per, 0], &sdyx[i * per, 0], &f, nc, groups, s, &rstd[i, 0], w, &ca[i, 0],
                               &cb[i, 0], &cc[i, 0])
        for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
            i = t // f.blocks
            o = i * s * nc
            _grad_apply_task(gp + o, xp + o, dxp + o, &f, t % f.blocks, nc, &cm[i, 0], &ca[i, 0], &cb[i, 0],
                             &cc[i, 0], stream)
    _param_grads(sdy, sdyx, rstd, cg, per, dweight, dbias)


# --- kernels (normkit.contract, channels-last: x, y, dy, dx are (N, S, C)) ------------------------------------

def groupnorm_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                      const floating[::1] bias, double eps, floating[:, :, ::1] y, floating[:, ::1] mean,
                      floating[:, ::1] rstd):
    _forward(x, num_groups, weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def groupnorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                       const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                       floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _backward(dy, x, num_groups, mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


def instancenorm_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                         double eps, floating[:, :, ::1] y, floating[:, ::1] mean, floating[:, ::1] rstd):
    _forward(x, x.shape[2], weight, bias, eps, NO_ACT, 0.0, y, mean, rstd)


def instancenorm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                          const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                          floating[:, :, ::1] dx, floating[::1] dweight, floating[::1] dbias):
    cdef const floating[::1] no_bias = None
    _backward(dy, x, x.shape[2], mean, rstd, weight, no_bias, NO_ACT, 0.0, dx, dweight, dbias)


def groupnorm_act_forward(const floating[:, :, ::1] x, Py_ssize_t num_groups, const floating[::1] weight,
                          const floating[::1] bias, double eps, int activation, double slope, floating[:, :, ::1] y,
                          floating[:, ::1] mean, floating[:, ::1] rstd):
    _forward(x, num_groups, weight, bias, eps, activation, slope, y, mean, rstd)


def groupnorm_act_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, Py_ssize_t num_groups,
                           const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                           const floating[::1] bias, int activation, double slope, floating[:, :, ::1] dx,
                           floating[::1] dweight, floating[::1] dbias):
    _backward(dy, x, num_groups, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


def instancenorm_act_forward(const floating[:, :, ::1] x, const floating[::1] weight, const floating[::1] bias,
                             double eps, int activation, double slope, floating[:, :, ::1] y, floating[:, ::1] mean,
                             floating[:, ::1] rstd):
    _forward(x, x.shape[2], weight, bias, eps, activation, slope, y, mean, rstd)


def instancenorm_act_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                              const floating[:, ::1] mean, const floating[:, ::1] rstd, const floating[::1] weight,
                              const floating[::1] bias, int activation, double slope, floating[:, :, ::1] dx,
                              floating[::1] dweight, floating[::1] dbias):
    _backward(dy, x, x.shape[2], mean, rstd, weight, bias, activation, slope, dx, dweight, dbias)


# --- 16-bit data -----------------------------------------------------------------------------------------------

cdef void _col_sums16(const uint16_t* dy, const uint16_t* x, Py_ssize_t rows, Py_ssize_t nc, const float* p,
                      int fmt, float* row, bint from_memory, double* s1, double* s2) noexcept nogil:
    """column_moments() (dy NULL; p the pivots) or column_grad_sums() (p the means) of 16-bit rows: in registers
    where the build allows, else (or where those sums are not finite) in double, a row at a time widened into
    ``row`` (nc floats, 2 * nc with dy)."""
    cdef Py_ssize_t i, l
    cdef double d, g
    if normkit_col_sums16(dy, x, rows, nc, 0, nc, p, s1, s2, fmt, from_memory) and all_finite(s1, s2, 0, nc):
        return
    for l in range(nc):
        s1[l] = 0.0
        s2[l] = 0.0
    for i in range(rows):
        if dy != NULL:
            normkit_widen(dy + i * nc, row + nc, nc, fmt)
        normkit_widen(x + i * nc, row, nc, fmt)
        for l in range(nc):
            d = <double>row[l] - p[l]
            g = <double>row[nc + l] if dy != NULL else d
            s1[l] += g
            s2[l] += g * d


cdef void _rows16(const uint16_t* dy, const uint16_t* x, uint16_t* out, Py_ssize_t rows, Py_ssize_t nc, int fmt,
                  const float* m, const float* a, const float* b, const float* c, const double* m64,
                  const double* a64, const double* b64, const double* c64) noexcept nogil:
    """Each row's elementwise pass with per-column float32 coefficients: y = (x - m) * a + c (dy NULL) or
    dx = a * dy + b * (x - m) + c, tile by tile, in registers where the build allows, else widened; a tile whose
    outputs are not all finite again in double from the double coefficients (a float32 coefficient, such as
    scale = rstd * weight, may itself have overflowed)."""
    cdef float tdy[TILE16]
    cdef float tx[TILE16]
    cdef double d[TILE16]
    cdef Py_ssize_t i, q, j, k, l
    cdef int done
    for i in range(rows):
        for q in range((nc + TILE16 - 1) // TILE16):
            j = q * TILE16
            k = min(<Py_ssize_t>TILE16, nc - j)
            done = normkit_cols16(dy + i * nc + j if dy != NULL else NULL, x + i * nc + j, out + i * nc + j, k, fmt,
                                  m + j, a + j, b + j if b != NULL else NULL, c + j, 0 if dy == NULL else 1)
            if done < 0:
                normkit_widen(x + i * nc + j, tx, k, fmt)
                if dy == NULL:
                    for l in range(k):
                        tx[l] = (tx[l] - m[j + l]) * a[j + l] + c[j + l]
                else:
                    normkit_widen(dy + i * nc + j, tdy, k, fmt)
                    for l in range(k):
                        tx[l] = a[j + l] * tdy[l] + b[j + l] * (tx[l] - m[j + l]) + c[j + l]
                done = normkit_narrow(tx, out + i * nc + j, k, fmt)
            if done:
                continue
            normkit_widen(x + i * nc + j, tx, k, fmt)
            if dy == NULL:
                for l in range(k):
                    d[l] = (<double>tx[l] - m64[j + l]) * a64[j + l] + c64[j + l]
            else:
                normkit_widen(dy + i * nc + j, tdy, k, fmt)
                for l in range(k):
                    d[l] = a64[j + l] * tdy[l] + b64[j + l] * (<double>tx[l] - m64[j + l]) + c64[j + l]
            narrow64(d, out + i * nc + j, k, fmt)


cdef void _sums16_task(const uint16_t* dy, const uint16_t* x, const Fold* f, Py_ssize_t q, Py_ssize_t nc,
                       const float* p, int fmt, float* row, double* s1, double* s2) noexcept nogil:
    """_sums_task on 16-bit data, by _col_sums16 (``row``: a folded row's floats, two with dy)."""
    cdef int j
    cdef Py_ssize_t o
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        _col_sums16(dy + o if dy != NULL else NULL, x + o, _part_rows(f, q, j), _part_width(f, nc, j), p, fmt, row,
                    f.from_memory, s1 + _part_sums(f, q, j), s2 + _part_sums(f, q, j))


cdef void _rows16_task(const uint16_t* dy, const uint16_t* x, uint16_t* out, const Fold* f, Py_ssize_t q,
                       Py_ssize_t nc, int fmt, const float* m, const float* a, const float* b, const float* c,
                       const double* m64, const double* a64, const double* b64, const double* c64) noexcept nogil:
    cdef int j
    cdef Py_ssize_t o
    for j in range(_parts(f, q)):
        o = _part_offset(f, q, j)
        _rows16(dy + o if dy != NULL else NULL, x + o, out + o, _part_rows(f, q, j), _part_width(f, nc, j), fmt, m,
                a, b, c, m64, a64, b64, c64)


cdef void _forward16(int fmt, const uint16_t[:, :, ::1] x, Py_ssize_t groups, const float[::1] weight,
                     const float[::1] bias, double eps, uint16_t[:, :, ::1] y, float[:, ::1] mean,
                     float[:, ::1] rstd):
    cdef Py_ssize_t n = x.shape[0], s = x.shape[1], nc = x.shape[2], cg = nc // max(1, groups)  # no groups: C = 0
    cdef Fold f = _fold(n, s, nc, True)
    cdef Py_ssize_t per = f.blocks + 1, i, g, c, t, o
    cdef const uint16_t* xp = &x[0, 0, 0]
    cdef uint16_t* yp = &y[0, 0, 0]
    cdef const float* w = _ptr(weight)
    cdef const float* b = _ptr(bias)
    cdef float first
    cdef float[:, ::1] rowbuf = np.empty((n * f.blocks, f.width), np.float32)  # each task's widened row (fallback)
    cdef float[:, ::1] piv = np.empty((n, f.width), np.float32), cm = np.empty((n, f.width), np.float32)
    cdef float[:, ::1] scale = np.empty((n, f.width), np.float32), shift = np.empty((n, f.width), np.float32)
    cdef double[:, :, ::1] c64 = np.empty((n, 3, f.width))  # per column: mean, scale, shift in double
    cdef double[:, ::1] s1 = np.empty((n * per, f.width)), s2 = np.empty((n * per, f.width))
    cdef double[:, ::1] mu = np.empty((n, groups)), rs = np.empty((n, groups))
    cdef int nt = threads_for(n * s * nc, _nthreads, _serial_max)
    for i in range(n):
        for g in range(groups):
            first = 0.0
            if s:
                normkit_widen(xp + i * s * nc + g * cg, &first, 1, fmt)
            for c in range(g * cg, (g + 1) * cg):
                piv[i, c] = <float>pivot_of(first)
        _repeat(&piv[i, 0], nc, f.k)
    for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
        i = t // f.blocks
        _sums16_task(NULL, xp + i * s * nc, &f, t % f.blocks, nc, &piv[i, 0], fmt, &rowbuf[t, 0], &s1[i * per, 0],
                     &s2[i * per, 0])
    for i in range(n):
        _finish_sample(&s1[i * per, 0], &s2[i * per, 0], &f, nc, groups, s, &piv[i, 0], eps, w, b, &mu[i, 0],
                       &rs[i, 0], &cm[i, 0], &scale[i, 0], &shift[i, 0])
        for c in range(f.width):  # a folded row's columns: channel c % nc
            g = c % nc // cg
            c64[i, 0, c] = mu[i, g]
            c64[i, 1, c] = rs[i, g] * w[c % nc] if w != NULL else rs[i, g]
            c64[i, 2, c] = b[c % nc] if b != NULL else 0.0
    for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
        i = t // f.blocks
        o = i * s * nc
        _rows16_task(NULL, xp + o, yp + o, &f, t % f.blocks, nc, fmt, &cm[i, 0], &scale[i, 0], NULL, &shift[i, 0],
                     &c64[i, 0, 0], &c64[i, 1, 0], NULL, &c64[i, 2, 0])
    for i in range(n):
        for g in range(groups):
            mean[i, g] = <float>mu[i, g]
            rstd[i, g] = <float>rs[i, g]


cdef void _backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x, Py_ssize_t groups,
                      const float[:, ::1] mean, const float[:, ::1] rstd, const float[::1] weight,
                      uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    cdef Py_ssize_t n = x.shape[0], s = x.shape[1], nc = x.shape[2], cg = nc // max(1, groups)  # no groups: C = 0
    cdef Fold f = _fold(n, s, nc, True)
    cdef Py_ssize_t per = f.blocks + 1, i, c, t, o
    cdef const uint16_t* dyp = &dy[0, 0, 0]
    cdef const uint16_t* xp = &x[0, 0, 0]
    cdef uint16_t* dxp = &dx[0, 0, 0]
    cdef float[:, ::1] rowbuf = np.empty((n * f.blocks, 2 * f.width), np.float32)  # each task's widened rows
    cdef float[:, ::1] cm = np.empty((n, f.width), np.float32), ca = np.empty((n, f.width), np.float32)
    cdef float[:, ::1] cb = np.empty((n, f.width), np.float32), cc = np.empty((n, f.width), np.float32)
    cdef double[:, :, ::1] c64 = np.empty((n, 4, f.width))  # per column: mean, ca, cb, cc in double
    cdef double[:, ::1] sdy = np.empty((n * per, f.width)), sdyx = np.empty((n * per, f.width))
    # the coefficients are computed in double (as the float32 kernels do) from rstd and weight in double
    cdef double[:, ::1] r64 = np.asarray(rstd, np.float64)
    cdef double[::1] w64 = np.asarray(weight if weight is not None else np.ones(nc, np.float32), np.float64)
    cdef int nt = threads_for(n * s * nc, _nthreads, _serial_max)
    for i in range(n):
        for c in range(nc):
            cm[i, c] = mean[i, c // cg]
        _repeat(&cm[i, 0], nc, f.k)
    for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
        i = t // f.blocks
        o = i * s * nc
        _sums16_task(dyp + o, xp + o, &f, t % f.blocks, nc, &cm[i, 0], fmt, &rowbuf[t, 0], &sdy[i * per, 0],
                     &sdyx[i * per, 0])
    for i in range(n):
        _grad_coefficients(&sdy[i * per, 0], &sdyx[i * per, 0], &f, nc, groups, s, &r64[i, 0], &w64[0],
                           &c64[i, 1, 0], &c64[i, 2, 0], &c64[i, 3, 0])
        for c in range(f.width):  # cm and c64 already repeated for a folded row
            c64[i, 0, c] = cm[i, c]
            ca[i, c] = <float>c64[i, 1, c]
            cb[i, c] = <float>c64[i, 2, c]
            cc[i, c] = <float>c64[i, 3, c]
    for t in prange(n * f.blocks, nogil=True, schedule="static", num_threads=nt):
        i = t // f.blocks
        o = i * s * nc
        _rows16_task(dyp + o, xp + o, dxp + o, &f, t % f.blocks, nc, fmt, &cm[i, 0], &ca[i, 0], &cb[i, 0],
                     &cc[i, 0], &c64[i, 0, 0], &c64[i, 1, 0], &c64[i, 2, 0], &c64[i, 3, 0])
    _param_grads(sdy, sdyx, rstd, cg, per, dweight, dbias)


def groupnorm_forward16(int fmt, const uint16_t[:, :, ::1] x, Py_ssize_t num_groups, const float[::1] weight,
                        const float[::1] bias, double eps, uint16_t[:, :, ::1] y, float[:, ::1] mean,
                        float[:, ::1] rstd):
    _forward16(fmt, x, num_groups, weight, bias, eps, y, mean, rstd)


def groupnorm_backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x, Py_ssize_t num_groups,
                         const float[:, ::1] mean, const float[:, ::1] rstd, const float[::1] weight,
                         uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    _backward16(fmt, dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias)


def instancenorm_forward16(int fmt, const uint16_t[:, :, ::1] x, const float[::1] weight, const float[::1] bias,
                           double eps, uint16_t[:, :, ::1] y, float[:, ::1] mean, float[:, ::1] rstd):
    _forward16(fmt, x, x.shape[2], weight, bias, eps, y, mean, rstd)


def instancenorm_backward16(int fmt, const uint16_t[:, :, ::1] dy, const uint16_t[:, :, ::1] x,
                            const float[:, ::1] mean, const float[:, ::1] rstd, const float[::1] weight,
                            uint16_t[:, :, ::1] dx, float[::1] dweight, float[::1] dbias):
    _backward16(fmt, dy, x, x.shape[2], mean, rstd, weight, dx, dweight, dbias)
