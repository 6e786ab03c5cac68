"""LayerNorm: statistics per row of K values (the normalized shape, flattened), with an elementwise affine.

How the work is split: one work item per row; the row is reduced and then normalized while it is still in cache.
With fewer than ``MIN_SETS`` rows, each row is cut into pieces whose partial sums are merged per row, so that
small batches still use every core.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import (BLOCK, PIECE, TARGET_ITEMS, _act, _cdiv, _clear, _finish, _fma, _gact, _jit,
                      _npieces, _ones, _opt, _pivot, _pjit, _row_grad_sums, _row_stats, _store, _sums, _sync_threads,
                      _zeros, npieces, per_activation, split_sums, work_arrays)
from ._dtype16 import narrow, widen

# layernorm backward with long rows sums its parameter gradients in the data's dtype over at most FLUSH rows.
FLUSH = 16  # even: row pairs never straddle a flush
# layernorm backward with long rows: rows per group (even, so row pairs never straddle groups), so that a group's
# dy and x stay in cache (L3 is 32 MiB on the Zen 4 this was tuned on; 4 to 12 MiB measured alike, 2 rows of
# 200704 slightly best) between the two passes over them.
GROUP_BYTES = 4 << 20


@_jit
def _ln_apply(xr, yr, m, m64, r, w, b):
    """y = ((x - m) * r + c0) * w + b, with c0 = (m - m64) * r the rounding of the mean to the dtype."""
    t = w.dtype.type
    rt = t(r)
    c0 = t((np.float64(m) - m64) * r)
    for j in range(xr.shape[0]):
        yr[j] = narrow(yr, ((widen(xr[j]) - m) * rt + c0) * w[j] + b[j])


# Each schedule (whole rows, pieces of rows; short or long rows in backward) is a function of its own, chosen in
# Python by the callables below from the shape alone, so that a first call compiles only the one its shape takes
# (see batchnorm.py).

@_pjit
def _ln_forward(x, w, b, has_w, has_b, eps, y, mean, rstd):
    M, K = x.shape
    wv = w if has_w else _ones(K, mean.dtype)
    bv = b if has_b else _zeros(K, mean.dtype)
    for k in prange(M):
        xr = x[k]
        p = _pivot(widen(xr[0]))
        s1, s2 = _sums(xr, p)
        m64, r64 = _finish(p, s1, s2, K, eps)
        mean[k] = m64
        rstd[k] = r64
        _ln_apply(xr, y[k], mean[k], m64, r64, wv, bv)


@_pjit
def _ln_forward_pieces(x, w, b, has_w, has_b, eps, y, mean, rstd):
    M, K = x.shape
    wv = w if has_w else _ones(K, mean.dtype)
    bv = b if has_b else _zeros(K, mean.dtype)
    P = _npieces(M, K)
    L = _cdiv(K, P)
    part = np.empty((M * P, 2))
    for it in prange(M * P):
        k = it // P
        a = (it % P) * L
        s1, s2 = _sums(x[k, a:min(K, a + L)], _pivot(widen(x[k, 0])))
        part[it, 0] = s1
        part[it, 1] = s2
    st = np.empty((M, 2))
    for k in range(M):
        s1 = 0.0
        s2 = 0.0
        for q in range(P):
            s1 += part[k * P + q, 0]
            s2 += part[k * P + q, 1]
        m64, r64 = _finish(_pivot(widen(x[k, 0])), s1, s2, K, eps)
        mean[k] = m64
        rstd[k] = r64
        st[k, 0] = m64
        st[k, 1] = r64
    for it in prange(M * P):
        k = it // P
        a = (it % P) * L
        e = min(K, a + L)
        _ln_apply(x[k, a:e], y[k, a:e], mean[k], st[k, 0], st[k, 1], wv[a:e], bv[a:e])


@_jit
def _ln_flush(acc, out):
    """out += acc in float64, and acc starts again from 0 (the dtype accumulators of the parameter gradients)."""
    for j in range(acc.shape[0]):
        out[j] += np.float64(acc[j])
        acc[j] = 0.0


@_jit
def _ln_dx_grads(dyr, xr, dxr, m, r, B, Cc, w, acw, acb):
    """_ln_dx, also adding dy * xhat to acw and dy to acb, all in the dtype."""
    for j in range(xr.shape[0]):
        g = widen(dyr[j])
        xm = widen(xr[j]) - m
        dxr[j] = narrow(dxr, _fma(g, w[j] * r, xm * B + Cc))
        acw[j] += g * (xm * r)
        acb[j] += g


@_jit
def _ln_dx_grads_pair(dy1, x1, dx1, m1, r1, B1, C1, dy2, x2, dx2, m2, r2, B2, C2, two, w, acw, acb):
    """_ln_dx_grads for row 1 and, if ``two``, row 2 in the same loop."""
    if not two:
        _ln_dx_grads(dy1, x1, dx1, m1, r1, B1, C1, w, acw, acb)
        return
    for j in range(x1.shape[0]):
        g1 = widen(dy1[j])
        g2 = widen(dy2[j])
        xm1 = widen(x1[j]) - m1
        xm2 = widen(x2[j]) - m2
        wj = w[j]
        dx1[j] = narrow(dx1, _fma(g1, wj * r1, xm1 * B1 + C1))
        dx2[j] = narrow(dx2, _fma(g2, wj * r2, xm2 * B2 + C2))
        acw[j] += g1 * (xm1 * r1) + g2 * (xm2 * r2)
        acb[j] += g1 + g2


@_jit
def _ln_dx(dyr, xr, dxr, m, r, B, Cc, w):
    """dx = dy * w * r + (x - m) * B + Cc (dy * (w * r) fused into the sum: see _fma)."""
    for j in range(xr.shape[0]):
        dxr[j] = narrow(dxr, _fma(widen(dyr[j]), w[j] * r, (widen(xr[j]) - m) * B + Cc))


def ln_blocks(M, want):
    """Blocks of rows of the short-row backward (and of the fused activations'), each with its partial parameter
    gradients when ``want``."""
    return max(1, min(TARGET_ITEMS * 2, M // 8)) if want else min(M, TARGET_ITEMS * 2)


_ln_blocks = _jit(ln_blocks)


@_pjit
def _ln_backward_short(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, pw, pb, acw, acb):
    M, K = x.shape
    t = mean.dtype.type
    wv = w if has_w else _ones(K, mean.dtype)
    want = want_dw or want_db
    # A row fits in L1: its sums, then dx and the parameter gradients (in the dtype, flushed into float64
    # every FLUSH rows) while it is there. Blocks of rows keep partial parameter gradients (pw, pb; acw, acb the
    # dtype's, (R, K) each when ``want``). (Measured against float64 gradients in the sums' loop, and against
    # PyTorch's order of a separate first loop for them: this order is 10-20% faster.)
    R = _ln_blocks(M, want)
    RL = _cdiv(M, R)
    for it in prange(R):
        k0 = it * RL
        k1 = min(M, (it + 1) * RL)
        if want:
            _clear(pw[it])
            _clear(pb[it])
            _clear(acw[it])
            _clear(acb[it])
        for k in range(k0, k1):
            mk = mean[k]
            m64 = np.float64(mk)
            r = np.float64(rstd[k])
            sg, sgx = _row_grad_sums(dy[k], x[k], m64, r, wv)
            B = t(-r * r * sgx / K)
            Cc = t(-r * sg / K)
            if want:
                _ln_dx_grads(dy[k], x[k], dx[k], mk, rstd[k], B, Cc, wv, acw[it], acb[it])
                if (k - k0) % FLUSH == FLUSH - 1 or k == k1 - 1:
                    _ln_flush(acw[it], pw[it])
                    _ln_flush(acb[it], pb[it])
            else:
                _ln_dx(dy[k], x[k], dx[k], mk, t(r), B, Cc, wv)
    if want:
        # block by block (in block order for every j), reading the partial sums in memory order
        aw = _zeros(K, np.float64)
        ab = _zeros(K, np.float64)
        for it in range(R):
            pwi = pw[it]
            pbi = pb[it]
            for j in range(K):
                aw[j] += pwi[j]
                ab[j] += pbi[j]
        for j in range(K):
            if want_dw:
                dw[j] = aw[j]
            if want_db:
                db[j] = ab[j]


@_pjit
def _ln_backward_long(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, aw, ab, acw, acb):
    M, K = x.shape
    t = mean.dtype.type
    wv = w if has_w else _ones(K, mean.dtype)
    want = want_dw or want_db
    # Long rows, in groups of rows small enough to stay in L3 between the two passes over them: row sums over
    # (row, piece) items, then dx and the parameter gradients over column blocks, each block adding its rows in
    # order into aw, ab (float64) through acw, acb (the dtype; (K,) each when ``want``), cleared in the first
    # group and stored in the last. The dtype partial sums flush every FLUSH rows of the whole input, so the
    # grouping does not change the results.
    GR = max(2, GROUP_BYTES // (2 * K * x.itemsize) // 2 * 2)
    P = max(1, min(_cdiv(TARGET_ITEMS, min(GR, M)), K // PIECE))
    L = _cdiv(K, P)
    part = np.empty((GR * P, 2))
    coef = np.empty((M, 2), mean.dtype)
    JB = _cdiv(K, BLOCK)
    for k0 in range(0, M, GR):
        k1 = min(M, k0 + GR)
        for it in prange((k1 - k0) * P):
            k = k0 + it % (k1 - k0)
            a = (it // (k1 - k0)) * L
            e = min(K, a + L)
            sg, sgx = _row_grad_sums(dy[k, a:e], x[k, a:e], np.float64(mean[k]), np.float64(rstd[k]), wv[a:e])
            part[it, 0] = sg
            part[it, 1] = sgx
        for k in range(k0, k1):
            sg = 0.0
            sgx = 0.0
            for q in range(P):
                sg += part[q * (k1 - k0) + k - k0, 0]
                sgx += part[q * (k1 - k0) + k - k0, 1]
            r = np.float64(rstd[k])
            coef[k, 0] = -r * r * sgx / K
            coef[k, 1] = -r * sg / K
        for jb in prange(JB):
            j0 = jb * BLOCK
            j1 = min(K, j0 + BLOCK)
            if not want:
                for k in range(k0, k1):
                    _ln_dx(dy[k, j0:j1], x[k, j0:j1], dx[k, j0:j1], mean[k], t(rstd[k]), coef[k, 0], coef[k, 1],
                           wv[j0:j1])
                continue
            # parameter gradients: rows in pairs (half the accumulator traffic, measured 13% faster), summed in
            # the dtype over at most FLUSH rows, then added to float64
            awv = aw[j0:j1]
            abv = ab[j0:j1]
            acwv = acw[j0:j1]
            acbv = acb[j0:j1]
            if k0 == 0:
                _clear(awv)
                _clear(abv)
                _clear(acwv)
                _clear(acbv)
            for k in range(k0, k1, 2):
                k2 = min(k + 1, k1 - 1)
                _ln_dx_grads_pair(dy[k, j0:j1], x[k, j0:j1], dx[k, j0:j1], mean[k], rstd[k], coef[k, 0],
                                  coef[k, 1], dy[k2, j0:j1], x[k2, j0:j1], dx[k2, j0:j1], mean[k2], rstd[k2],
                                  coef[k2, 0], coef[k2, 1], k2 > k, wv[j0:j1], acwv, acbv)
                if k2 % FLUSH == FLUSH - 1 or k2 == M - 1:
                    _ln_flush(acwv, awv)
                    _ln_flush(acbv, abv)
            if k1 == M and want_dw:
                _store(awv, dw[j0:j1])
            if k1 == M and want_db:
                _store(abv, db[j0:j1])


# --- the contract's callables -----------------------------------------------------------------------------------

def layernorm_forward(x, weight, bias, eps, y, mean, rstd):
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    b, hb = _opt(bias, mean)
    kernel = _ln_forward if npieces(*x.shape) == 1 else _ln_forward_pieces
    kernel(x, w, b, hw, hb, eps, y, mean, rstd)


def layernorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    dw, wdw = _opt(dweight, mean)
    db, wdb = _opt(dbias, mean)
    M, K = x.shape
    short = K <= 4 * BLOCK  # rows that fit in L1 (see _ln_backward_short), or longer ones
    # the parameter gradients' partial sums: weight's and bias's in float64, then in the dtype
    shape = ((ln_blocks(M, True), K) if short else (K,)) if wdw or wdb else (0,) * (2 if short else 1)
    wide, own = (shape, np.float64), (shape, mean.dtype)
    acc = work_arrays(wide, wide, own, own)
    (_ln_backward_short if short else _ln_backward_long)(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb, *acc)


# --- fused activations (normkit.contract): the element loops built per activation (_common.per_activation) ----

@per_activation
def _ln_act(a):
    """LayerNorm's act_ passes for activation ``a``: (forward apply, backward)."""
    split = split_sums(a)

    @_pjit
    def apply(x, st, w, b, y, mean, slope):
        """y = act(((x - m) * r + c0) * w + b) as _ln_apply, over the (row, piece) items of _row_stats."""
        M, K = x.shape
        P = _npieces(M, K)
        L = _cdiv(K, P)
        t = w.dtype.type
        for it in prange(M * P):
            k = it // P
            lo = (it % P) * L
            xr = x[k, lo:min(K, lo + L)]
            yr = y[k, lo:min(K, lo + L)]
            wr = w[lo:min(K, lo + L)]
            br = b[lo:min(K, lo + L)]
            m = mean[k]
            rt = t(st[k, 1])
            c0 = t((np.float64(m) - st[k, 0]) * st[k, 1])
            for j in range(xr.shape[0]):
                yr[j] = _act(((xr[j] - m) * rt + c0) * wr[j] + br[j], xr[j], a, slope)

    @_pjit
    def backward(dy, x, mean, rstd, w, b, dx, dw, db, want_dw, want_db, slope, pw, pb):
        """Blocks of rows (as many as _ln_backward's short-row path makes); per row the sums of g * w and
        g * w * (x - m) with g = dy * act'(z) (g left in dx), then dx and the parameter gradients (float64, per
        block, merged in block order; pw, pb (R, K), or (R, 0) without ``want``) while the row is in cache."""
        M, K = x.shape
        t = mean.dtype.type
        want = want_dw or want_db
        R = _ln_blocks(M, want)
        RL = _cdiv(M, R)
        for it in prange(R):
            pwi = pw[it]
            pbi = pb[it]
            _clear(pwi)
            _clear(pbi)
            for k in range(it * RL, min(M, (it + 1) * RL)):
                dyr = dy[k]
                xr = x[k]
                dxr = dx[k]
                mk = mean[k]
                m64 = np.float64(mk)
                r64 = np.float64(rstd[k])
                rt = rstd[k]
                sg = 0.0
                sgx = 0.0
                # g = dy * act'(z), kept in dx for the second loop: act' once per value (computed in both loops,
                # the exp and division of silu and gelu made this kernel 2x Cython's); the sums of g * w in float64
                # (with 16-bit data a float32 weight may carry it past float32's range), from dx where split
                if split:  # see split_sums
                    for j in range(K):
                        dxr[j] = _gact(dyr[j], (xr[j] - mk) * rt * w[j] + b[j], xr[j], a, slope)
                    for j in range(K):
                        gw = np.float64(dxr[j]) * np.float64(w[j])
                        sg += gw
                        sgx += gw * (np.float64(xr[j]) - m64)
                else:
                    for j in range(K):
                        g = _gact(dyr[j], (xr[j] - mk) * rt * w[j] + b[j], xr[j], a, slope)
                        dxr[j] = g
                        gw = np.float64(g) * np.float64(w[j])
                        sg += gw
                        sgx += gw * (np.float64(xr[j]) - m64)
                B = t(-r64 * r64 * r64 * sgx / K)
                Cc = t(-r64 * sg / K)
                # two loops, not one testing ``want``: a loop that could store to pwi vectorizes behind a check
                # that pwi's range (K values from where a zero-size placeholder happens to sit) misses the other
                # arrays, and when it did not, the scalar loop that ran instead rounded otherwise (_common.py)
                if want:
                    for j in range(K):
                        xm = xr[j] - mk
                        g = dxr[j]
                        dxr[j] = _fma(g, w[j] * rt, xm * B + Cc)
                        pwi[j] += np.float64(g) * np.float64(xm * rt)
                        pbi[j] += np.float64(g)
                else:
                    for j in range(K):
                        dxr[j] = _fma(dxr[j], w[j] * rt, (xr[j] - mk) * B + Cc)
        for j in range(K if want else 0):
            aw = 0.0
            ab = 0.0
            for q in range(R):
                aw += pw[q, j]
                ab += pb[q, j]
            if want_dw:
                dw[j] = aw
            if want_db:
                db[j] = ab

    return apply, backward


def _affine(weight, bias, like):
    """weight and bias, ones and zeros where None (the act_ loops take both)."""
    K = like.shape[1]
    return (np.ones(K, like.dtype) if weight is None else weight, np.zeros(K, like.dtype) if bias is None else bias)


def layernorm_act_forward(x, weight, bias, eps, activation, slope, y, mean, rstd):
    _sync_threads(x.size)
    w, b = _affine(weight, bias, x)
    st = _row_stats(x, eps, mean, rstd)
    _ln_act(activation)[0](x, st, w, b, y, mean, slope)


def layernorm_act_backward(dy, x, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias):
    _sync_threads(x.size)
    w, b = _affine(weight, bias, x)
    dw, wdw = _opt(dweight, mean)
    db, wdb = _opt(dbias, mean)
    M, K = x.shape
    want = wdw or wdb
    spec = ((ln_blocks(M, want), K if want else 0), np.float64)
    pw, pb = work_arrays(spec, spec)
    _ln_act(activation)[1](dy, x, mean, rstd, w, b, dx, dw, db, wdw, wdb, slope, pw, pb)
