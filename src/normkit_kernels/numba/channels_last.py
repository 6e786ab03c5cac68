"""Channels-last kernels: the channel ops on C-contiguous (N, S, C) data (see the channels-last part of
normkit.contract), with per-channel and per-set arrays shaped as for the NCHW kernels.

BatchNorm's training backward is InstanceNorm's on the (1, N*S, C) view: its per-channel sets over all rows are the
sets of one sample. Its other directions have no kernel here: kernels.py runs the NCHW kernels on the
(N*S, C, 1) view (contract.on_columns), which batchnorm.py handles by tiles of whole rows (vectorized along the
contiguous C) in row blocks merged in a fixed order. For the training forward that schedule is the faster: in one
process, 2 threads, float32, with a 64 MiB write between calls, the columns view took 0.78-1.03x this module's time
at (32, 16, 112, 112), (32, 32, 56, 56), (32, 64, 56, 56), (64, 256, 14, 14), (32, 64, 28, 28) (median ~0.9), and
the backward 0.90-1.25x (median ~1.04), so the backward stays here.

GroupNorm and InstanceNorm (GroupNorm with G = C) have sets (n, g) that are strided here: each of the S rows of
sample n holds a run of C/G channels of every group. A work item takes rows of one sample in tiles of whole rows
(TILE values, so that short rows still make long vectorized loops), sums per tile position in float64, and folds
the positions into per-channel sums; channels fold into their group, in channel order. Every channel of a set
shares the set's pivot (the value of its first channel in the sample's first row), so the folds are plain
additions. How the work is split is a function of the shape only: with at least MIN_SETS samples, one item per
sample, which sums and then normalizes its rows while they are still in cache; with fewer, each sample is cut into
Q pieces of rows whose per-channel sums are merged in piece order before the elementwise pass.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import (MIN_SETS, PIECE, TARGET_ITEMS, _finish, _jit, _opt, _param_grads, _pivot, _pjit,
                      _sync_threads)
from .groupnorm import _set_coefs

# Values per tile of whole rows (at least one row).
TILE = 256


def sample_split(N, S, C):
    """Pieces per sample and their length in rows: 1 with enough samples, else enough pieces of at least PIECE
    values for TARGET_ITEMS work items. Plain Python for the callables, which choose the schedule from it, and
    compiled as _sample_split for the kernels (-(-a // b) is _cdiv)."""
    if N >= MIN_SETS:
        return 1, S
    Q = max(1, min(-(-TARGET_ITEMS // N), S * C // PIECE))
    return Q, -(-S // Q)


_sample_split = _jit(sample_split)


@_jit
def _tile_len(C):
    return max(1, TILE // C) * C


@_jit
def _set_ref(ref_sets, n, cpg, T):
    """Float64 per-set values (pivots, means) of sample n repeated for each tile position."""
    C = ref_sets.shape[1] * cpg
    out = np.empty(T)
    for q in range(T):
        out[q] = ref_sets[n, (q % C) // cpg]
    return out


@_jit
def _pivots(x, G):
    """Per set (n, g): its first channel's value in the sample's first row (0 if not finite)."""
    N, S, C = x.shape
    piv = np.empty((N, G))
    for n in range(N):
        for g in range(G):
            piv[n, g] = _pivot(x[n, 0, g * (C // G)])
    return piv


@_jit
def _fold(p1, p2, out):
    """Tile-position sums (T = RT * C each) into per-channel sums out[0], out[1], tile rows in order."""
    C = out.shape[1]
    for c in range(C):
        out[0, c] = 0.0
        out[1, c] = 0.0
    for q0 in range(0, p1.shape[0], C):
        for c in range(C):
            out[0, c] += p1[q0 + c]
            out[1, c] += p2[q0 + c]


# The statistics and the gradient sums have a function each (not one with a mode argument), and so do the two
# elementwise passes: a kernel then compiles only the loops it runs.

@_jit
def _rows_stats(fx, r0, r1, rt, out):
    """Per-channel float64 sum(d), sum(d*d), d = x - ref, over rows r0..r1 of a flat (rows, C) array, ``rt`` the
    ref per tile position, into out[0], out[1] (C each): per tile position over the tiles in row order, then
    folded per channel."""
    C = out.shape[1]
    T = rt.shape[0]
    RT = T // C
    p1 = np.zeros(T)
    p2 = np.zeros(T)
    for r in range(r0, r1, RT):
        o = r * C
        xv = fx[o:o + (min(r1, r + RT) - r) * C]
        for q in range(xv.shape[0]):
            d = np.float64(xv[q]) - rt[q]
            p1[q] += d
            p2[q] += d * d
    _fold(p1, p2, out)


@_jit
def _rows_grad_sums(fdy, fx, r0, r1, rt, out):
    """As _rows_stats, for sum(dy) and sum(dy * (x - ref))."""
    C = out.shape[1]
    T = rt.shape[0]
    RT = T // C
    p1 = np.zeros(T)
    p2 = np.zeros(T)
    for r in range(r0, r1, RT):
        o = r * C
        L = (min(r1, r + RT) - r) * C
        gv = fdy[o:o + L]
        xv = fx[o:o + L]
        for q in range(L):
            g = np.float64(gv[q])
            p1[q] += g
            p2[q] += g * (np.float64(xv[q]) - rt[q])
    _fold(p1, p2, out)


@_jit
def _rows_y(fx, fy, r0, r1, C, coef):
    """y = (x - m) * A + Cc over rows r0..r1 of flat (rows, C) arrays; coef = (m, A, -, Cc) per tile position."""
    mt = coef[0]
    at = coef[1]
    ct = coef[3]
    RT = mt.shape[0] // C
    for r in range(r0, r1, RT):
        o = r * C
        L = (min(r1, r + RT) - r) * C
        xv = fx[o:o + L]
        yv = fy[o:o + L]
        for q in range(L):
            yv[q] = (xv[q] - mt[q]) * at[q] + ct[q]


@_jit
def _rows_dx(fdy, fx, fdx, r0, r1, C, coef):
    """dx = dy * A + (x - m) * B + Cc over rows r0..r1; coef = (m, A, B, Cc) per tile position."""
    mt = coef[0]
    at = coef[1]
    bt = coef[2]
    ct = coef[3]
    RT = mt.shape[0] // C
    for r in range(r0, r1, RT):
        o = r * C
        L = (min(r1, r + RT) - r) * C
        gv = fdy[o:o + L]
        xv = fx[o:o + L]
        ov = fdx[o:o + L]
        for q in range(L):
            ov[q] = gv[q] * at[q] + (xv[q] - mt[q]) * bt[q] + ct[q]


@_jit
def _sample_sums(part, n, Q):
    """Sample n's per-channel sums: its Q pieces' in piece order."""
    C = part.shape[2]
    s = np.zeros((2, C))
    for q in range(Q):
        for c in range(C):
            s[0, c] += part[n * Q + q, 0, c]
            s[1, c] += part[n * Q + q, 1, c]
    return s


@_jit
def _forward_coefs(part, n, Q, piv, S, eps, w, b, has_w, has_b, mean, rstd, coef):
    """Sample n's statistics from its pieces' per-channel sums (stored in mean[n], rstd[n]) and the coefficients
    (m, sc, sc, sh) of y = (x - m) * sc + sh per tile position, in the data's dtype, into coef (4, T)."""
    G = mean.shape[1]
    C = part.shape[2]
    cpg = C // G
    t = mean.dtype.type
    s = _sample_sums(part, n, Q)
    per_c = np.empty((3, C), mean.dtype)
    for g in range(G):
        a1 = 0.0
        a2 = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            a1 += s[0, c]
            a2 += s[1, c]
        m64, r64 = _finish(piv[n, g], a1, a2, cpg * S, eps)
        mean[n, g] = m64
        rstd[n, g] = r64
        mg = mean[n, g]
        for c in range(g * cpg, (g + 1) * cpg):
            sc = r64 * (np.float64(w[c]) if has_w else 1.0)
            per_c[0, c] = mg
            per_c[1, c] = t(sc)
            per_c[2, c] = t((np.float64(b[c]) if has_b else 0.0) + (np.float64(mg) - m64) * sc)
    for q in range(coef.shape[1]):
        coef[0, q] = per_c[0, q % C]
        coef[1, q] = per_c[1, q % C]
        coef[2, q] = per_c[1, q % C]
        coef[3, q] = per_c[2, q % C]


@_jit
def _backward_coefs(part, n, Q, S, mean, rstd, w, has_w, sums, coef):
    """Sample n's per-channel sums (stored in sums[n]) and the coefficients (m, A, B, Cc) of
    dx = dy * A + (x - m) * B + Cc per tile position, in the data's dtype, into coef (4, T)."""
    G = mean.shape[1]
    C = part.shape[2]
    cpg = C // G
    s = _sample_sums(part, n, Q)
    for c in range(C):
        sums[n, c, 0] = s[0, c]
        sums[n, c, 1] = s[1, c]
    per_g = np.empty((G, 2))
    for g in range(G):
        per_g[g, 0], per_g[g, 1] = _set_coefs(sums, n, g, cpg, cpg * S, np.float64(rstd[n, g]), w, has_w)
    for q in range(coef.shape[1]):
        c = q % C
        g = c // cpg
        coef[0, q] = mean[n, g]
        coef[1, q] = np.float64(rstd[n, g]) * (np.float64(w[c]) if has_w else 1.0)
        coef[2, q] = per_g[g, 0]
        coef[3, q] = per_g[g, 1]
    return coef


@_jit
def _as_float64(a):
    """A 2-D array's values in float64."""
    out = np.empty(a.shape)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = a[i, j]
    return out


# The kernels hold no array expressions: in a parallel function each would become a parallel loop of its own and
# add to the compile time. With one piece per sample (_whole), one parallel loop sums, finishes and normalizes each
# sample while it is in cache; with more pieces (_pieces), one sums the pieces and a second one normalizes them, in
# reverse order, so that it starts with what the sums left in the last-level cache. Each schedule is a function of
# its own, chosen in Python by the callables below from the shape, so that a first call compiles only the one its
# shape takes (see batchnorm.py).

@_pjit
def _sets_forward_whole(x, G, w, b, has_w, has_b, eps, y, mean, rstd):
    N, S, C = x.shape
    T = _tile_len(C)
    fx = x.reshape(N * S * C)
    fy = y.reshape(N * S * C)
    piv = _pivots(x, G)
    part = np.empty((N, 2, C))
    for n in prange(N):
        r0 = n * S
        r1 = r0 + S
        _rows_stats(fx, r0, r1, _set_ref(piv, n, C // G, T), part[n])
        coef = np.empty((4, T), x.dtype)
        _forward_coefs(part, n, 1, piv, S, eps, w, b, has_w, has_b, mean, rstd, coef)
        _rows_y(fx, fy, r0, r1, C, coef)


@_pjit
def _sets_forward_pieces(x, G, w, b, has_w, has_b, eps, y, mean, rstd):
    N, S, C = x.shape
    T = _tile_len(C)
    fx = x.reshape(N * S * C)
    fy = y.reshape(N * S * C)
    piv = _pivots(x, G)
    Q, RL = _sample_split(N, S, C)
    part = np.empty((N * Q, 2, C))
    for it in prange(N * Q):
        n = it // Q
        r0 = n * S + (it % Q) * RL
        r1 = min((n + 1) * S, r0 + RL)
        _rows_stats(fx, r0, r1, _set_ref(piv, n, C // G, T), part[it])
    coefs = np.empty((N, 4, T), x.dtype)
    for n in range(N):
        _forward_coefs(part, n, Q, piv, S, eps, w, b, has_w, has_b, mean, rstd, coefs[n])
    for rev in prange(N * Q):
        it = N * Q - 1 - rev
        n = it // Q
        r0 = n * S + (it % Q) * RL
        _rows_y(fx, fy, r0, min((n + 1) * S, r0 + RL), C, coefs[n])


@_pjit
def _sets_backward_whole(dy, x, G, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    N, S, C = x.shape
    T = _tile_len(C)
    fdy = dy.reshape(N * S * C)
    fx = x.reshape(N * S * C)
    fdx = dx.reshape(N * S * C)
    m64 = _as_float64(mean)
    sums = np.empty((N, C, 2))
    part = np.empty((N, 2, C))
    for n in prange(N):
        r0 = n * S
        r1 = r0 + S
        _rows_grad_sums(fdy, fx, r0, r1, _set_ref(m64, n, C // G, T), part[n])
        coef = np.empty((4, T), x.dtype)
        _backward_coefs(part, n, 1, S, mean, rstd, w, has_w, sums, coef)
        _rows_dx(fdy, fx, fdx, r0, r1, C, coef)
    if want_dw or want_db:
        _param_grads(sums, rstd, dw, db, want_dw, want_db)


@_pjit
def _sets_backward_pieces(dy, x, G, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    N, S, C = x.shape
    T = _tile_len(C)
    fdy = dy.reshape(N * S * C)
    fx = x.reshape(N * S * C)
    fdx = dx.reshape(N * S * C)
    m64 = _as_float64(mean)
    sums = np.empty((N, C, 2))
    Q, RL = _sample_split(N, S, C)
    part = np.empty((N * Q, 2, C))
    for it in prange(N * Q):
        n = it // Q
        r0 = n * S + (it % Q) * RL
        r1 = min((n + 1) * S, r0 + RL)
        _rows_grad_sums(fdy, fx, r0, r1, _set_ref(m64, n, C // G, T), part[it])
    coefs = np.empty((N, 4, T), x.dtype)
    for n in range(N):
        _backward_coefs(part, n, Q, S, mean, rstd, w, has_w, sums, coefs[n])
    for rev in prange(N * Q):
        it = N * Q - 1 - rev
        n = it // Q
        r0 = n * S + (it % Q) * RL
        _rows_dx(fdy, fx, fdx, r0, min((n + 1) * S, r0 + RL), C, coefs[n])
    if want_dw or want_db:
        _param_grads(sums, rstd, dw, db, want_dw, want_db)


def _sets_forward(x, G, w, b, has_w, has_b, eps, y, mean, rstd):
    whole = sample_split(*x.shape)[0] == 1
    (_sets_forward_whole if whole else _sets_forward_pieces)(x, G, w, b, has_w, has_b, eps, y, mean, rstd)


def _sets_backward(dy, x, G, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    whole = sample_split(*x.shape)[0] == 1
    kernel = _sets_backward_whole if whole else _sets_backward_pieces
    kernel(dy, x, G, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db)


# --- the contract's callables: (op, direction, dtype, "nhwc") ----------------------------------------------------

def _one_sample(a):
    """(N, S, C) -> (1, N*S, C): BatchNorm's per-channel sets as InstanceNorm's of one sample (a view)."""
    return a.reshape(1, a.shape[0] * a.shape[1], a.shape[2])


def batchnorm_backward_nhwc(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    C = x.shape[2]
    _sets_backward(_one_sample(dy), _one_sample(x), C, mean.reshape(1, C), rstd.reshape(1, C), w, hw, _one_sample(dx),
                   dw, db, wdw, wdb)


def groupnorm_forward_nhwc(x, num_groups, weight, bias, eps, y, mean, rstd):
    _sync_threads(x.size)
    w, hw = _opt(weight, x)
    b, hb = _opt(bias, x)
    _sets_forward(x, num_groups, w, b, hw, hb, eps, y, mean, rstd)


def groupnorm_backward_nhwc(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    _sets_backward(dy, x, num_groups, mean, rstd, w, hw, dx, dw, db, wdw, wdb)


def instancenorm_forward_nhwc(x, weight, bias, eps, y, mean, rstd):
    groupnorm_forward_nhwc(x, x.shape[2], weight, bias, eps, y, mean, rstd)


def instancenorm_backward_nhwc(dy, x, mean, rstd, weight, dx, dweight, dbias):
    groupnorm_backward_nhwc(dy, x, x.shape[2], mean, rstd, weight, dx, dweight, dbias)


# the directions with a kernel here (kernels.py adds the per-channel ones as NCHW kernels on the columns view)
NHWC = {
    ("batchnorm", "backward"): batchnorm_backward_nhwc,
    ("instancenorm", "forward"): instancenorm_forward_nhwc,
    ("instancenorm", "backward"): instancenorm_backward_nhwc,
    ("groupnorm", "forward"): groupnorm_forward_nhwc,
    ("groupnorm", "backward"): groupnorm_backward_nhwc,
}
