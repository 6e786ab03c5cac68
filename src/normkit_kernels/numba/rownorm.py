"""RMSNorm, and the fused residual add of both row ops (h = x + residual, then LayerNorm or RMSNorm of h, in one
pass over memory).

A forward and a backward are built for each kind of op (_forward_kernel, _backward_kernels); ``centered`` says
whether a row's mean is subtracted and a bias added (LayerNorm) or not (RMSNorm: rstd = 1/sqrt(mean(x**2) + eps),
the sum of squares in float64).
How the work is split: one work item per row in the forward (the fused add writes the row of h and reads it back
from cache); in the backward, fixed blocks of rows (a function of the shape only) keep partial parameter gradients,
merged in block order, so results do not depend on the thread count; long rows in few blocks go one at a time
instead, the threads sharing each row by pieces (_backward_pieces).

16-bit data (kernels.py views it as uint16 / int16) loads and stores through _dtype16.py's widen / narrow and is
computed in float32, the dtype of rstd and of the other float arguments, as layernorm.py does.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import prange

from ._common import (PIECE, TARGET_ITEMS, _cdiv, _clear, _finish, _jit, _ones, _opt, _pivot, _pjit, _row_grad_sums,
                      _store, _sums, _sync_threads, _zeros, work_arrays)
from ._dtype16 import narrow, widen

# A centered op's parameter gradients are summed in the dtype over at most FLUSH rows, then added into float64.
FLUSH = 16
# Partial parameter gradients of all row blocks together stay under this many doubles (8 MB).
PARTIAL_BUDGET = 1 << 20
# Rows longer than this in fewer than FEW_BLOCKS blocks go one at a time, the threads sharing each row by pieces
# (_backward_pieces): as blocks they ran on a thread each ((8, 2**20) RMSNorm with a weight gradient: one block).
LONG_ROW = 1 << 16
FEW_BLOCKS = 4


@_jit
def _row_blocks(M, K, want):
    """How many blocks of rows _backward makes: the shape's alone, so results do not depend on the thread count."""
    return max(1, min(TARGET_ITEMS * 2, M // 8, PARTIAL_BUDGET // (2 * K))) if want else min(M, TARGET_ITEMS * 2)


@_jit
def _sumsq(xr):
    s = 0.0
    for i in range(xr.shape[0]):
        d = np.float64(widen(xr[i]))
        s += d * d
    return s


@_jit
def _add(xr, rr, hr, sr):
    """h = x + residual rounded once to h's dtype, and h's values in the working dtype (that of the kernel's float
    arguments) into the row buffer sr: what is normalized, so that backward (which reads h) sees what forward did.
    For 16-bit data the float32 sum rounds once more to h's format."""
    for j in range(xr.shape[0]):
        hr[j] = narrow(hr, widen(xr[j]) + widen(rr[j]))
        sr[j] = widen(hr[j])


@_jit
def _normalize_centered(src, yr, w, b, eps, mean, rstd, k):
    """LayerNorm of one row: statistics in float64 into mean[k] and rstd[k], then y in the working dtype (that of
    w), as layernorm.py: the mean rounded to that dtype, with its rounding folded into c0."""
    K = src.shape[0]
    t = w.dtype.type
    p = _pivot(widen(src[0]))
    s1, s2 = _sums(src, p)
    m64, r64 = _finish(p, s1, s2, K, eps)
    mean[k] = m64
    m = mean[k]
    rt = t(r64)
    c0 = t((np.float64(m) - m64) * r64)
    for j in range(K):
        yr[j] = narrow(yr, ((widen(src[j]) - m) * rt + c0) * w[j] + b[j])
    rstd[k] = r64


@_jit
def _normalize_rms(src, yr, w, eps, rstd, k):
    """RMSNorm of one row: rstd[k] from the float64 sum of squares, then y in the working dtype (that of w)."""
    K = src.shape[0]
    t = w.dtype.type
    r64 = 1.0 / np.sqrt(_sumsq(src) / K + eps)
    rt = t(r64)
    for j in range(K):
        yr[j] = narrow(yr, (widen(src[j]) * rt) * w[j])
    rstd[k] = r64


@functools.cache
def _forward_kernel(centered, has_res):
    """The forward of one kind of row op, ``centered`` (LayerNorm) or not (RMSNorm), with a residual to add or not:
    both constants of the compiled code, as in _backward_kernels."""

    @_pjit
    def forward(x, res, h, w, has_w, b, has_b, eps, y, mean, rstd):
        M, K = x.shape
        wv = w if has_w else _ones(K, rstd.dtype)
        bv = b if has_b else _zeros(K, rstd.dtype)
        # blocks of rows, each with a row buffer for x + residual in the working dtype (see _add)
        R = max(1, min(M, 4 * TARGET_ITEMS))
        RL = _cdiv(M, R)
        for it in prange(R):
            s = _zeros(K if has_res else 0, rstd.dtype)
            for k in range(it * RL, min(M, (it + 1) * RL)):
                # four calls, not one on ``s if has_res else x[k]``: for 16-bit data the two rows differ in type
                if has_res:
                    _add(x[k], res[k], h[k], s)
                    if centered:
                        _normalize_centered(s, y[k], wv, bv, eps, mean, rstd, k)
                    else:
                        _normalize_rms(s, y[k], wv, eps, rstd, k)
                elif centered:
                    _normalize_centered(x[k], y[k], wv, bv, eps, mean, rstd, k)
                else:
                    _normalize_rms(x[k], y[k], wv, eps, rstd, k)

    return forward


@_jit
def _dx(dyr, xr, dxr, m, r, B, Cc, w):
    for j in range(xr.shape[0]):
        dxr[j] = narrow(dxr, widen(dyr[j]) * w[j] * r + (widen(xr[j]) - m) * B + Cc)


@_jit
def _dx_plus(dyr, dhr, xr, dxr, m, r, B, Cc, w):
    for j in range(xr.shape[0]):
        dxr[j] = narrow(dxr, widen(dyr[j]) * w[j] * r + (widen(xr[j]) - m) * B + Cc + widen(dhr[j]))


@_jit
def _param_grads(dyr, xr, m, r, acw, acb):
    """acw += dy * xhat and acb += dy, in the working dtype (that of acw)."""
    for j in range(xr.shape[0]):
        g = widen(dyr[j])
        acw[j] += g * ((widen(xr[j]) - m) * r)
        acb[j] += g


@_jit
def _weight_grads(dyr, xr, r, out):
    """out += dy * x * r in float64, for an uncentered row: ``reassoc`` may multiply dy * x first, which overflows
    float32 for values near 1e20 but never float64 (a centered row's x - mean keeps that order)."""
    for j in range(xr.shape[0]):
        out[j] += np.float64(widen(dyr[j])) * (np.float64(widen(xr[j])) * r)


@_jit
def _flush(acc, out):
    for j in range(acc.shape[0]):
        out[j] += np.float64(acc[j])
        acc[j] = 0.0


@functools.cache
def _backward_kernels(centered, has_dh):
    """(_backward, _backward_pieces) for one kind of row op: ``centered`` (LayerNorm) or not (RMSNorm), with a dh or
    not (the fused add). Both are constants of the compiled code, whose other branches numba drops: one function
    for every kind compiled them all, 0.6-0.8 s more on a first call."""

    @_pjit
    def _backward(dy, dh, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, pw, pb, acw, acb):
        """The parameter gradients' partial sums per block, (R, K) each when ``want``: pw, pb in float64 (pb a
        centered op's only), acw, acb the dtype accumulators of a centered op."""
        M, K = x.shape
        t = rstd.dtype.type  # the working dtype: the data's, float32 for 16-bit data
        wv = w if has_w else _ones(K, rstd.dtype)
        want = want_dw or want_db
        R = _row_blocks(M, K, want)
        RL = _cdiv(M, R)
        for it in prange(R):
            k0 = it * RL
            k1 = min(M, (it + 1) * RL)
            if want:
                _clear(pw[it])
                if centered:
                    _clear(pb[it])
                    _clear(acw[it])
                    _clear(acb[it])
            for k in range(k0, k1):
                mk = mean[k] if centered else t(0.0)
                r = np.float64(rstd[k])
                sg, sgx = _row_grad_sums(dy[k], x[k], np.float64(mk), 1.0, wv)
                # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); an uncentered row has no mean(g) term
                B = t(-r * r * r * sgx / K)
                Cc = t(-r * sg / K) if centered else t(0.0)
                if has_dh:
                    _dx_plus(dy[k], dh[k], x[k], dx[k], mk, rstd[k], B, Cc, wv)
                else:
                    _dx(dy[k], x[k], dx[k], mk, rstd[k], B, Cc, wv)
                # nested ifs: numba drops the branch of the other kind of op only when ``centered`` stands alone
                if want:
                    if centered:
                        _param_grads(dy[k], x[k], mk, rstd[k], acw[it], acb[it])
                        if (k - k0) % FLUSH == FLUSH - 1 or k == k1 - 1:
                            _flush(acw[it], pw[it])
                            _flush(acb[it], pb[it])
                    else:
                        _weight_grads(dy[k], x[k], r, pw[it])
        if want:
            # block by block, in block order for every j
            aw = _zeros(K, np.float64)  # (np.zeros here would be a parallel loop of its own: see _zeros)
            ab = _zeros(K, np.float64)
            for it in range(R):
                for j in range(K):
                    aw[j] += pw[it, j]
                if centered:
                    for j in range(K):
                        ab[j] += pb[it, j]
            for j in range(K):
                if want_dw:
                    dw[j] = aw[j]
                if want_db:
                    db[j] = ab[j]

    @_pjit
    def _backward_pieces(dy, dh, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, aw, ab, acw, acb):
        """_backward for long rows in few blocks: one row at a time, the threads sharing it by pieces of PIECE columns,
        each piece's sums and parameter-gradient terms (as _backward's), the row's sums added in piece order, then each
        piece's dx. aw, ab, acw, acb are _backward's pw, pb, acw, acb of one block, (K,) each; each piece clears its
        part in the first row and stores it in the last."""
        M, K = x.shape
        t = rstd.dtype.type
        wv = w if has_w else _ones(K, rstd.dtype)
        want = want_dw or want_db
        P = _cdiv(K, PIECE)
        sums = np.empty((P, 2))  # every piece writes its row of it
        for k in range(M):
            mk = mean[k] if centered else t(0.0)
            r = np.float64(rstd[k])
            for it in prange(P):
                j0 = it * PIECE
                j1 = min(K, j0 + PIECE)
                if k == 0 and want:
                    _clear(aw[j0:j1])
                    if centered:
                        _clear(ab[j0:j1])
                        _clear(acw[j0:j1])
                        _clear(acb[j0:j1])
                sg, sgx = _row_grad_sums(dy[k, j0:j1], x[k, j0:j1], np.float64(mk), 1.0, wv[j0:j1])
                sums[it, 0] = sg
                sums[it, 1] = sgx
                if want:
                    if centered:
                        _param_grads(dy[k, j0:j1], x[k, j0:j1], mk, rstd[k], acw[j0:j1], acb[j0:j1])
                        if k % FLUSH == FLUSH - 1 or k == M - 1:
                            _flush(acw[j0:j1], aw[j0:j1])
                            _flush(acb[j0:j1], ab[j0:j1])
                    else:
                        _weight_grads(dy[k, j0:j1], x[k, j0:j1], r, aw[j0:j1])
            sg = 0.0
            sgx = 0.0
            for it in range(P):
                sg += sums[it, 0]
                sgx += sums[it, 1]
            B = t(-r * r * r * sgx / K)
            Cc = t(-r * sg / K) if centered else t(0.0)
            for it in prange(P):
                j0 = it * PIECE
                j1 = min(K, j0 + PIECE)
                if has_dh:
                    _dx_plus(dy[k, j0:j1], dh[k, j0:j1], x[k, j0:j1], dx[k, j0:j1], mk, rstd[k], B, Cc, wv[j0:j1])
                else:
                    _dx(dy[k, j0:j1], x[k, j0:j1], dx[k, j0:j1], mk, rstd[k], B, Cc, wv[j0:j1])
                if k == M - 1 and want_dw:
                    _store(aw[j0:j1], dw[j0:j1])
                if k == M - 1 and want_db:
                    _store(ab[j0:j1], db[j0:j1])

    return _backward, _backward_pieces


# --- the contract's callables -----------------------------------------------------------------------------------

_EMPTY2 = {np.dtype(t): np.empty((0, 0), t) for t in (np.float32, np.float64, np.uint16, np.int16)}


def _opt2(a, x):
    """An optional (M, K) argument: None -> (an empty 2-D array of x's dtype, False)."""
    return (_EMPTY2[x.dtype], False) if a is None else (a, True)


def _fwd(x, residual, h, weight, bias, centered, eps, y, mean, rstd):
    _sync_threads(x.size)
    w, hw = _opt(weight, rstd)
    b, hb = _opt(bias, rstd)
    res, has_res = _opt2(residual, x)
    h, _ = _opt2(h, x)
    m, _ = _opt(mean, rstd)
    _forward_kernel(centered, has_res)(x, res, h, w, hw, b, hb, eps, y, m, rstd)


def _bwd(dy, dh, x, mean, rstd, weight, centered, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, rstd)
    dw, wdw = _opt(dweight, rstd)
    db, wdb = _opt(dbias, rstd)
    d, has_dh = _opt2(dh, x)
    m, _ = _opt(mean, rstd)
    M, K = x.shape
    want = wdw or wdb
    blocks = _row_blocks(M, K, want)
    long_rows = K > LONG_ROW and blocks < FEW_BLOCKS
    # the parameter gradients' partial sums (see _backward): pw, then pb, acw, acb (a centered op's only)
    full = ((K,) if long_rows else (blocks, K)) if want else (0,) * (1 if long_rows else 2)
    part = full if centered else full[:-1] + (0,)
    acc = work_arrays((full, np.float64), (part, np.float64), (part, rstd.dtype), (part, rstd.dtype))
    backward, backward_pieces = _backward_kernels(centered, has_dh)
    (backward_pieces if long_rows else backward)(dy, d, x, m, rstd, w, hw, dx, dw, db, wdw, wdb, *acc)


def rmsnorm_forward(x, weight, eps, y, rstd):
    _fwd(x, None, None, weight, None, False, eps, y, None, rstd)


def rmsnorm_backward(dy, x, rstd, weight, dx, dweight):
    _bwd(dy, None, x, None, rstd, weight, False, dx, dweight, None)


def rmsnorm_add_forward(x, residual, weight, eps, y, h, rstd):
    _fwd(x, residual, h, weight, None, False, eps, y, None, rstd)


def rmsnorm_add_backward(dy, dh, h, rstd, weight, dx, dweight):
    _bwd(dy, dh, h, None, rstd, weight, False, dx, dweight, None)


def layernorm_add_forward(x, residual, weight, bias, eps, y, h, mean, rstd):
    _fwd(x, residual, h, weight, bias, True, eps, y, mean, rstd)


def layernorm_add_backward(dy, dh, h, mean, rstd, weight, dx, dweight, dbias):
    _bwd(dy, dh, h, mean, rstd, weight, True, dx, dweight, dbias)
