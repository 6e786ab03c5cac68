"""Numba kernels for the four ops, following :mod:`normkit.contract`.

How the work is split (every split is a function of the shape only, never of the thread count, and partial sums
are merged in a fixed order, so results are identical for any number of threads and from run to run):

* groupnorm / instancenorm / layernorm: one work item per normalized set (a contiguous run of ``x``); the set
  is reduced and then normalized while it is still in cache. With fewer than ``MIN_SETS`` sets, each set is cut
  into pieces whose partial sums are merged per set, so that small batches still use every core.
* batchnorm: with enough channels whose data fits in L2, one work item per channel (reduce, then apply, in
  cache); otherwise work items are (n, c, piece) rows, or, for tiny spatial sizes such as (N, C) inputs, tasks
  of whole channels on the flattened (N, C*S) view that sum, finish and apply their columns (when there are
  enough of them); else, for a small view, tasks that each sum all of it and apply their own rows; else blocks
  of rows of that view, merged per channel afterwards.

Statistics are a shifted single pass accumulated in float64: each set subtracts a pivot (its first element, or
0 if that is not finite) and sums d and d*d. The shift removes the cancellation of E[x^2] - E[x]^2; float64
keeps d*d of float32 data near 1e30 finite. All pieces of a set share its pivot, so merging is plain addition.

The elementwise passes run in the data's dtype as ``(x - mean) * scale + shift``: exact ``bias`` for a constant
input; the difference between the float64 mean and the mean rounded to the dtype is folded into ``shift``.

``fastmath`` is limited to flags that let LLVM vectorize float reductions (reassoc) and fuse multiply-adds,
without assuming the absence of NaN/inf (no ``nnan``/``ninf``), so non-finite inputs propagate as in the
reference.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, config, types
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads

from normkit.contract import kernel_table

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# Work splitting (shape-only). Fewer sets than MIN_SETS: cut sets into pieces of at least PIECE elements, aiming
# at TARGET_ITEMS work items.
MIN_SETS = 8
TARGET_ITEMS = 16
PIECE = 4096
# batchnorm: spatial sizes below WIDE_S use the flattened (N, C*S) view; a channel is one work item when there
# are at least MIN_SETS channels and the input data of one channel fits in FUSED_BYTES (L2 is 1 MiB per core on
# the Zen 4 this was tuned on; a partial miss falls back to L3).
WIDE_S = 16
FUSED_BYTES = 1 << 20
# layernorm backward with long rows sums its parameter gradients in the data's dtype over at most FLUSH rows.
FLUSH = 16  # even: row pairs never straddle a flush
# layernorm backward with long rows: rows per group (even, so row pairs never straddle groups), so that a group's
# dy and x stay in cache (L3 is 32 MiB on the Zen 4 this was tuned on; 4 to 12 MiB measured alike, 2 rows of
# 200704 slightly best) between the two passes over them.
GROUP_BYTES = 4 << 20
# Width of the column blocks of the flattened (N, C*S) view and of layernorm's parameter gradients.
BLOCK = 2048
# batchnorm on the flattened view: a column task takes the whole channels in CHUNK columns; with at least
# WIDE_TASKS of them, each task sums, finishes and applies its channels in one parallel region, in cache.
CHUNK = 256
WIDE_TASKS = 4
# Flattened inputs of at most SMALL_BYTES with fewer column tasks: each of SMALL_TASKS tasks sums the whole input
# (identical results in each) and normalizes its own block of rows, so that the work takes one parallel region
# instead of two plus a merge. (256, 16): forward 1.18 -> 0.33, backward 1.38 -> 0.51 of PyTorch; past 128 KiB the
# repeated sums cost more than they save ((4096, 16) backward 0.85 -> 1.13).
SMALL_BYTES = 128 << 10
SMALL_TASKS = 2
# Rows of the flattened view shorter than a column block are handled TILE values (whole rows) at a time: one slice
# and one vectorized loop per tile rather than per row ((4096, 16): one per 16 rows).
TILE = 256
# Runs of data up to this long are prefetched by hand (see _prefetch_run).
PREFETCH_BYTES = 4096


def _cache_probe():
    return 0


def _can_cache() -> bool:
    """numba caches next to this file, else in the user's cache directory (or NUMBA_CACHE_DIR); when none of
    them is writable, decorating with cache=True raises, and the kernels compile in every process instead."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError:
        return False
    return True


CACHE = _can_cache()
_jit = njit(cache=CACHE, fastmath=FASTMATH, nogil=True)
_pjit = njit(cache=CACHE, fastmath=FASTMATH, nogil=True, parallel=True)


# --- scalar helpers ---------------------------------------------------------------------------------------------

@_jit
def _pivot(v):
    p = np.float64(v)
    return p if np.isfinite(p) else 0.0


@_jit
def _finite(v):
    """isfinite as a comparison: numba's np.isfinite is x - x == 0, which ``reassoc`` may fold to True for a
    computed x (seen for sums of NaN)."""
    return abs(v) < np.inf


@_jit
def _cdiv(a, b):
    return -(-a // b)


@_jit
def _npieces(nsets, m):
    """Pieces per set: 1 when there are enough sets, else enough pieces (of >= PIECE elements) for TARGET_ITEMS."""
    if nsets >= MIN_SETS:
        return 1
    return max(1, min(_cdiv(TARGET_ITEMS, nsets), m // PIECE))


@intrinsic
def _prefetch(typingctx, a, i):
    """LLVM's prefetch (for reading, into every cache level) of the cache line holding a[i]; a hint, it cannot
    fault or change any result."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(a, i), codegen


@_jit
def _prefetch_run(a, start, count):
    """Ask for the run a[start:start + count] (of a flat array) that is about to be read, if it is at most
    PREFETCH_BYTES long. Short runs far apart (a channel's rows of (N, C, S) data) each start a new stream that
    the hardware prefetcher has to discover again (BN (64, 256, 14, 14) backward: 0.91 -> 0.78 of PyTorch);
    longer runs it catches by itself (prefetching their start measured 5% slower on (32, 64, 56, 56))."""
    if count * a.itemsize > PREFETCH_BYTES:
        return
    for j in range(0, count, 64 // a.itemsize):
        _prefetch(a, start + j)


# The inner loops run from 0, over a view or over the last index of the whole array (x[n, c, j] for j in
# range(S)): a loop from a run-time start index keeps numba's negative-index wraparound check in the loop, which
# stops LLVM from vectorizing it (measured 7x slower; x[n, c, c0 + j] doubled InstanceNorm's backward). A view
# costs about as much as the arithmetic on a run of 200 values, and so does passing an array to a helper, so the
# loops over short runs are indexed, and written out where they are used: helpers _run_sums(x, n, c, p) and the
# like in their place made BatchNorm training on (64, 256, 14, 14) 1.35x slower, and inference on (32, 512, 7, 7)
# 1.4x.

@_jit
def _sums(xr, p):
    """sum(d), sum(d*d) over xr with d = x - p, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.shape[0]):
        d = np.float64(xr[i]) - p
        s1 += d
        s2 += d * d
    return s1, s2


@_jit
def _dsums(dyr, xr, m):
    """sum(dy), sum(dy * (x - m)), in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.shape[0]):
        g = np.float64(dyr[i])
        s1 += g
        s2 += g * (np.float64(xr[i]) - m)
    return s1, s2


@_jit
def _finish(p, s1, s2, count, eps):
    """(mean, rstd) in float64 from shifted sums."""
    mu = s1 / count
    var = s2 / count - mu * mu
    if var < 0.0:  # rounding; written as a comparison so that a NaN variance stays NaN
        var = 0.0
    return p + mu, 1.0 / np.sqrt(var + eps)


@_jit
def _apply_range(xs, ys, a, e, S, c0, m, m64, r, w, b, has_w, has_b):
    """y = (x - m) * scale_c + shift_c over positions [a, e) of one set whose channels (runs of S) start at c0.

    ``m`` is the mean in the data's dtype, ``m64`` in float64; their difference goes into the shift.
    """
    t = xs.dtype.type
    ci = a // S
    i = a
    while i < e:
        hi = min((ci + 1) * S, e)
        sc = r * (np.float64(w[c0 + ci]) if has_w else 1.0)
        sh = (np.float64(b[c0 + ci]) if has_b else 0.0) + (np.float64(m) - m64) * sc
        sct = t(sc)
        sht = t(sh)
        xv = xs[i:hi]
        yv = ys[i:hi]
        for j in range(hi - i):
            yv[j] = (xv[j] - m) * sct + sht
        i = hi
        ci += 1


# --- groupnorm / instancenorm: sets of cpg channels -------------------------------------------------------------

@_pjit
def _sets_forward(x, G, w, b, has_w, has_b, eps, y, mean, rstd):
    N, C, S = x.shape
    cpg = C // G
    m = cpg * S
    nsets = N * G
    xs2 = x.reshape(nsets, m)
    ys2 = y.reshape(nsets, m)
    mf = mean.reshape(nsets)
    rf = rstd.reshape(nsets)
    P = _npieces(nsets, m)
    if P == 1:
        # indexed rather than through views of each set and channel: a view costs more than a short run's
        # arithmetic (InstanceNorm (32, 512, 7, 7) forward: 0.55 -> 0.26 of PyTorch)
        t = x.dtype.type
        for k in prange(nsets):
            n = k // G
            c0 = (k % G) * cpg
            p = _pivot(xs2[k, 0])
            s1 = 0.0
            s2 = 0.0
            for j in range(m):
                d = np.float64(xs2[k, j]) - p
                s1 += d
                s2 += d * d
            m64, r64 = _finish(p, s1, s2, m, eps)
            mf[k] = m64
            rf[k] = r64
            mk = mf[k]
            for c in range(c0, c0 + cpg):
                sc = r64 * (np.float64(w[c]) if has_w else 1.0)
                sct = t(sc)
                sht = t((np.float64(b[c]) if has_b else 0.0) + (np.float64(mk) - m64) * sc)
                for j in range(S):
                    y[n, c, j] = (x[n, c, j] - mk) * sct + sht
        return
    L = _cdiv(m, P)
    part = np.empty((nsets * P, 2))
    for it in prange(nsets * P):
        k = it // P
        a = (it % P) * L
        s1, s2 = _sums(xs2[k, a:min(m, a + L)], _pivot(xs2[k, 0]))
        part[it, 0] = s1
        part[it, 1] = s2
    st = np.empty((nsets, 2))
    for k in range(nsets):
        s1 = 0.0
        s2 = 0.0
        for q in range(P):
            s1 += part[k * P + q, 0]
            s2 += part[k * P + q, 1]
        m64, r64 = _finish(_pivot(xs2[k, 0]), s1, s2, m, eps)
        mf[k] = m64
        rf[k] = r64
        st[k, 0] = m64
        st[k, 1] = r64
    for it in prange(nsets * P):
        k = it // P
        a = (it % P) * L
        _apply_range(xs2[k], ys2[k], a, min(m, a + L), S, (k % G) * cpg, mf[k], st[k, 0], st[k, 1], w, b,
                     has_w, has_b)


@_jit
def _set_coefs(sdy, sdyx, n, g, cpg, m, r, w, has_w):
    """dx = dy * (r * w_c) + (x - mean) * B + Cc for set (n, g): returns (B, Cc) in float64."""
    sg = 0.0
    sgx = 0.0
    for ci in range(cpg):
        c = g * cpg + ci
        wc = np.float64(w[c]) if has_w else 1.0
        sg += wc * sdy[n, c]
        sgx += wc * sdyx[n, c]
    mg = sg / m
    mgx = r * sgx / m  # mean(g * xhat)
    return -r * r * mgx, -r * mg


@_jit
def _dx(dyr, xr, dxr, A, B, Cc, m):
    for j in range(xr.shape[0]):
        dxr[j] = dyr[j] * A + (xr[j] - m) * B + Cc


@_pjit
def _sets_backward(dy, x, G, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    N, C, S = x.shape
    cpg = C // G
    m = cpg * S
    nsets = N * G
    t = x.dtype.type
    sdy = np.empty((N, C))
    sdyx = np.empty((N, C))
    if _npieces(nsets, m) == 1:
        for k in prange(nsets):
            n = k // G
            g = k % G
            mk = mean[n, g]
            m64 = np.float64(mk)
            r = np.float64(rstd[n, g])
            # indexed rather than through a view of each channel's run, as in _sets_forward
            for c in range(g * cpg, (g + 1) * cpg):
                s1 = 0.0
                s2 = 0.0
                for j in range(S):
                    gj = np.float64(dy[n, c, j])
                    s1 += gj
                    s2 += gj * (np.float64(x[n, c, j]) - m64)
                sdy[n, c] = s1
                sdyx[n, c] = s2
            B, Cc = _set_coefs(sdy, sdyx, n, g, cpg, m, r, w, has_w)
            Bt = t(B)
            Ct = t(Cc)
            for c in range(g * cpg, (g + 1) * cpg):
                At = t(r * (np.float64(w[c]) if has_w else 1.0))
                for j in range(S):
                    dx[n, c, j] = dy[n, c, j] * At + (x[n, c, j] - mk) * Bt + Ct
    else:
        # few sets: (n, c, piece) work items
        Q, L = _row_split(N, C, S)
        part = np.empty((N * C * Q, 2))
        for it in prange(N * C * Q):
            n = it // (C * Q)
            c = (it // Q) % C
            a = (it % Q) * L
            e = min(S, a + L)
            s1, s2 = _dsums(dy[n, c, a:e], x[n, c, a:e], np.float64(mean[n, c // cpg]))
            part[it, 0] = s1
            part[it, 1] = s2
        for n in range(N):
            for c in range(C):
                s1 = 0.0
                s2 = 0.0
                for q in range(Q):
                    s1 += part[(n * C + c) * Q + q, 0]
                    s2 += part[(n * C + c) * Q + q, 1]
                sdy[n, c] = s1
                sdyx[n, c] = s2
        coef = np.empty((N, G, 2))
        for n in range(N):
            for g in range(G):
                B, Cc = _set_coefs(sdy, sdyx, n, g, cpg, m, np.float64(rstd[n, g]), w, has_w)
                coef[n, g, 0] = B
                coef[n, g, 1] = Cc
        for it in prange(N * C * Q):
            n = it // (C * Q)
            c = (it // Q) % C
            g = c // cpg
            a = (it % Q) * L
            A = np.float64(rstd[n, g]) * (np.float64(w[c]) if has_w else 1.0)
            e = min(S, a + L)
            _dx(dy[n, c, a:e], x[n, c, a:e], dx[n, c, a:e], t(A), t(coef[n, g, 0]), t(coef[n, g, 1]), mean[n, g])
    if want_dw or want_db:
        # over n in order for every c, reading the (N, C) sums row by row
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        for n in range(N):
            for c in range(C):
                s1[c] += sdy[n, c]
                s2[c] += np.float64(rstd[n, c // cpg]) * sdyx[n, c]
        for c in range(C):
            if want_db:
                db[c] = s1[c]
            if want_dw:
                dw[c] = s2[c]


# --- per-channel statistics and elementwise passes over (N, C, S) (batchnorm, *_infer) -------------------------

@_jit
def _row_split(N, C, S):
    """Pieces per (n, c) row and their length, for the (n, c, piece) work items. With one piece per row, the
    loops index x[n, c, j] (no views, one division per item): BatchNorm inference forward on (32, 512, 7, 7) went
    from 1.06 to 0.66 of PyTorch."""
    Q = max(1, min(_cdiv(TARGET_ITEMS, N * C), S // PIECE))
    return Q, _cdiv(S, Q)


@_jit
def _wide_split(N, W):
    """Row blocks and column blocks of the flattened (N, W) view, W = C*S."""
    R = max(1, min(TARGET_ITEMS, N // 32, (1 << 20) // W))
    return R, _cdiv(N, R), _cdiv(W, BLOCK)


@_jit
def _add_terms(av, bv, ref, p1, p2, mode):
    """Elementwise, in float64, the terms of _channel_sums' integrands: mode 0 adds d = a - ref to p1 and d*d to
    p2; mode 1 adds a to p1 and a*(b - ref) to p2."""
    if mode == 0:
        for j in range(av.shape[0]):
            d = np.float64(av[j]) - ref[j]
            p1[j] += d
            p2[j] += d * d
    else:
        for j in range(av.shape[0]):
            g = np.float64(av[j])
            p1[j] += g
            p2[j] += g * (np.float64(bv[j]) - ref[j])


@_pjit
def _channel_sums(a, bx, ref, mode):
    """Per-channel float64 sums over (N, S) of one of two integrands, merged in a fixed order:

    mode 0: d = a - ref[c]          -> (sum d, sum d*d)            (statistics; ref = pivots)
    mode 1: a = dy, bx = x          -> (sum dy, sum dy*(x - ref[c])) (parameter gradients)
    """
    N, C, S = a.shape
    out = np.empty((C, 2))
    if S >= WIDE_S:
        Q, L = _row_split(N, C, S)
        part = np.empty((N * C * Q, 2))
        if Q == 1:
            for it in prange(N * C):
                n = it // C
                c = it - n * C
                rc = ref[c]
                s1 = 0.0
                s2 = 0.0
                if mode == 0:
                    for j in range(S):
                        d = np.float64(a[n, c, j]) - rc
                        s1 += d
                        s2 += d * d
                else:
                    for j in range(S):
                        g = np.float64(a[n, c, j])
                        s1 += g
                        s2 += g * (np.float64(bx[n, c, j]) - rc)
                part[it, 0] = s1
                part[it, 1] = s2
        else:
            for it in prange(N * C * Q):
                n = it // (C * Q)
                c = (it // Q) % C
                lo = (it % Q) * L
                e = min(S, lo + L)
                if mode == 0:
                    s1, s2 = _sums(a[n, c, lo:e], ref[c])
                else:
                    s1, s2 = _dsums(a[n, c, lo:e], bx[n, c, lo:e], ref[c])
                part[it, 0] = s1
                part[it, 1] = s2
        # over n, then q, in order for every c, reading the partial sums in memory order
        out[:] = 0.0
        for n in range(N):
            for c in range(C):
                for q in range(Q):
                    out[c, 0] += part[(n * C + c) * Q + q, 0]
                    out[c, 1] += part[(n * C + c) * Q + q, 1]
        return out
    W = C * S
    R, RL, JB = _wide_split(N, W)
    if JB == 1:
        return _tiled_sums(a, bx, ref, mode, R, RL)
    a2 = a.reshape(N, W)
    b2 = bx.reshape(N, W)
    refw = np.empty(W)
    for j in range(W):
        refw[j] = ref[j // S]
    part = np.empty((R, 2, W))
    for it in prange(R * JB):
        r = it // JB
        j0 = (it % JB) * BLOCK
        j1 = min(W, j0 + BLOCK)
        p1 = part[r, 0, j0:j1]
        p2 = part[r, 1, j0:j1]
        for j in range(j1 - j0):
            p1[j] = 0.0
            p2[j] = 0.0
        rw = refw[j0:j1]
        for n in range(r * RL, min(N, (r + 1) * RL)):
            _add_terms(a2[n, j0:j1], b2[n, j0:j1], rw, p1, p2, mode)
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for r in range(R):
            for s in range(S):
                s1 += part[r, 0, c * S + s]
                s2 += part[r, 1, c * S + s]
        out[c, 0] = s1
        out[c, 1] = s2
    return out


@_jit
def _tiled(per_channel, S, T, dtype):
    """Per-channel values repeated for each column of a tile of T values (whole rows of W = C*S columns)."""
    out = np.empty(T, dtype)
    C = per_channel.shape[0]
    for q0 in range(0, T, C * S):
        for c in range(C):
            for s in range(S):
                out[q0 + c * S + s] = per_channel[c]
    return out


@_pjit
def _tiled_sums(a, bx, ref, mode, R, RL):
    """_channel_sums on the flattened view when a row fits in one column block: each of R blocks of RL rows
    walks its contiguous span in tiles of whole rows, summing per tile position; tile positions, then blocks,
    are merged per channel in a fixed order."""
    N, C, S = a.shape
    W = C * S
    RT = max(1, TILE // W)
    T = RT * W
    fa = a.reshape(N * W)
    fb = bx.reshape(N * W)
    rt = _tiled(ref, S, T, np.float64)
    part = np.zeros((R, 2, T))
    for r in prange(R):
        p1 = part[r, 0]
        p2 = part[r, 1]
        n1 = min(N, (r + 1) * RL)
        for n in range(r * RL, n1, RT):
            o = n * W
            L = (min(n1, n + RT) - n) * W
            _add_terms(fa[o:o + L], fb[o:o + L], rt, p1, p2, mode)
    out = np.zeros((C, 2))
    for r in range(R):
        for q0 in range(0, T, W):
            for c in range(C):
                for s in range(S):
                    out[c, 0] += part[r, 0, q0 + c * S + s]
                    out[c, 1] += part[r, 1, q0 + c * S + s]
    return out


@_pjit
def _tiled_apply(a, bx, m, A, B, Cc, mode, out, R, RL):
    """The elementwise passes on the flattened view in tiles of whole rows (see _tiled_sums):
    mode 0: out = (a - m) * A + Cc;  mode 1: out = a * A + (bx - m) * B + Cc (a = dy, bx = x)."""
    N, C, S = a.shape
    W = C * S
    RT = max(1, TILE // W)
    T = RT * W
    fa = a.reshape(N * W)
    fb = bx.reshape(N * W)
    fo = out.reshape(N * W)
    mt = _tiled(m, S, T, a.dtype)
    at = _tiled(A, S, T, a.dtype)
    bt = _tiled(B, S, T, a.dtype)
    ct = _tiled(Cc, S, T, a.dtype)
    for r in prange(R):
        n1 = min(N, (r + 1) * RL)
        for n in range(r * RL, n1, RT):
            o = n * W
            L = (min(n1, n + RT) - n) * W
            av = fa[o:o + L]
            bv = fb[o:o + L]
            ov = fo[o:o + L]
            if mode == 0:
                for q in range(L):
                    ov[q] = (av[q] - mt[q]) * at[q] + ct[q]
            else:
                for q in range(L):
                    ov[q] = av[q] * at[q] + (bv[q] - mt[q]) * bt[q] + ct[q]


@_pjit
def _channel_affine(x, m, sc, sh, y):
    """y = (x - m[c]) * sc[c] + sh[c]; m, sc, sh have x's dtype."""
    N, C, S = x.shape
    if S >= WIDE_S:
        Q, L = _row_split(N, C, S)
        if Q == 1:
            for it in prange(N * C):
                n = it // C
                c = it - n * C
                mc = m[c]
                scc = sc[c]
                shc = sh[c]
                for j in range(S):
                    y[n, c, j] = (x[n, c, j] - mc) * scc + shc
            return
        for it in prange(N * C * Q):
            n = it // (C * Q)
            c = (it // Q) % C
            lo = (it % Q) * L
            e = min(S, lo + L)
            xr = x[n, c, lo:e]
            yr = y[n, c, lo:e]
            mc = m[c]
            scc = sc[c]
            shc = sh[c]
            for j in range(e - lo):
                yr[j] = (xr[j] - mc) * scc + shc
        return
    W = C * S
    R, RL, JB = _wide_split(N, W)
    if JB == 1:
        _tiled_apply(x, x, m, sc, sc, sh, 0, y, R, RL)
        return
    x2 = x.reshape(N, W)
    y2 = y.reshape(N, W)
    mw = np.empty(W, x.dtype)
    scw = np.empty(W, x.dtype)
    shw = np.empty(W, x.dtype)
    for j in range(W):
        mw[j] = m[j // S]
        scw[j] = sc[j // S]
        shw[j] = sh[j // S]
    for it in prange(R * JB):
        r = it // JB
        j0 = (it % JB) * BLOCK
        j1 = min(W, j0 + BLOCK)
        mv = mw[j0:j1]
        scv = scw[j0:j1]
        shv = shw[j0:j1]
        for n in range(r * RL, min(N, (r + 1) * RL)):
            xr = x2[n, j0:j1]
            yr = y2[n, j0:j1]
            for j in range(j1 - j0):
                yr[j] = (xr[j] - mv[j]) * scv[j] + shv[j]


@_pjit
def _channel_dx(dy, x, m, A, B, Cc, dx):
    """dx = dy * A[c] + (x - m[c]) * B[c] + Cc[c]; coefficient arrays have x's dtype."""
    N, C, S = x.shape
    if S >= WIDE_S:
        Q, L = _row_split(N, C, S)
        if Q == 1:
            for it in prange(N * C):
                n = it // C
                c = it - n * C
                Ac = A[c]
                Bc = B[c]
                Cv = Cc[c]
                mc = m[c]
                for j in range(S):
                    dx[n, c, j] = dy[n, c, j] * Ac + (x[n, c, j] - mc) * Bc + Cv
            return
        for it in prange(N * C * Q):
            n = it // (C * Q)
            c = (it // Q) % C
            lo = (it % Q) * L
            e = min(S, lo + L)
            _dx(dy[n, c, lo:e], x[n, c, lo:e], dx[n, c, lo:e], A[c], B[c], Cc[c], m[c])
        return
    W = C * S
    R, RL, JB = _wide_split(N, W)
    if JB == 1:
        _tiled_apply(dy, x, m, A, B, Cc, 1, dx, R, RL)
        return
    d2 = dy.reshape(N, W)
    x2 = x.reshape(N, W)
    o2 = dx.reshape(N, W)
    mw = np.empty(W, x.dtype)
    aw = np.empty(W, x.dtype)
    bw = np.empty(W, x.dtype)
    cw = np.empty(W, x.dtype)
    for j in range(W):
        mw[j] = m[j // S]
        aw[j] = A[j // S]
        bw[j] = B[j // S]
        cw[j] = Cc[j // S]
    for it in prange(R * JB):
        r = it // JB
        j0 = (it % JB) * BLOCK
        j1 = min(W, j0 + BLOCK)
        mv = mw[j0:j1]
        av = aw[j0:j1]
        bv = bw[j0:j1]
        cv = cw[j0:j1]
        for n in range(r * RL, min(N, (r + 1) * RL)):
            dr = d2[n, j0:j1]
            xr = x2[n, j0:j1]
            outr = o2[n, j0:j1]
            for j in range(j1 - j0):
                outr[j] = dr[j] * av[j] + (xr[j] - mv[j]) * bv[j] + cv[j]


@_jit
def _fused_channels(N, C, S, itemsize, arrays):
    return S >= WIDE_S and C >= MIN_SETS and N * S * itemsize * arrays <= FUSED_BYTES


@_jit
def _column_tasks(C, S):
    """Column tasks of CHUNK // S whole channels on the flattened (N, C*S) view, or 0 if there are too few."""
    T = _cdiv(C, max(1, CHUNK // S))
    return T if S < WIDE_S and T >= WIDE_TASKS else 0


@_jit
def _small_view(N, C, S, itemsize):
    """Whether a flattened (N, C*S) input is small enough that every task sums all of it (see SMALL_BYTES)."""
    return S < WIDE_S and N * C * S * itemsize <= SMALL_BYTES


@_jit
def _channel_of_columns(s1, s2, c, S):
    """Channel c's sums from its S column sums, in column order."""
    a1 = 0.0
    a2 = 0.0
    for i in range(c * S, (c + 1) * S):
        a1 += s1[i]
        a2 += s2[i]
    return a1, a2


@_jit
def _column_sums(a2, b2, l0, L, ref, mode):
    """Float64 sums down columns l0..l0+L of a flattened (N, W) view, in row order, with the integrands of
    _channel_sums (mode 0: d = a - ref -> sum d, sum d*d; mode 1: sum a, sum a*(b - ref)). Four rows per sweep:
    a quarter of the loads and stores of the column sums, which bound this loop."""
    N = a2.shape[0]
    s1 = np.zeros(L)
    s2 = np.zeros(L)
    for n in range(0, N - N % 4, 4):
        a0 = a2[n, l0:l0 + L]
        a1 = a2[n + 1, l0:l0 + L]
        a2_ = a2[n + 2, l0:l0 + L]
        a3 = a2[n + 3, l0:l0 + L]
        if mode == 0:
            for j in range(L):
                d0 = np.float64(a0[j]) - ref[j]
                d1 = np.float64(a1[j]) - ref[j]
                d2 = np.float64(a2_[j]) - ref[j]
                d3 = np.float64(a3[j]) - ref[j]
                s1[j] += (d0 + d1) + (d2 + d3)
                s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        else:
            b0 = b2[n, l0:l0 + L]
            b1 = b2[n + 1, l0:l0 + L]
            b2_ = b2[n + 2, l0:l0 + L]
            b3 = b2[n + 3, l0:l0 + L]
            for j in range(L):
                g0 = np.float64(a0[j])
                g1 = np.float64(a1[j])
                g2 = np.float64(a2_[j])
                g3 = np.float64(a3[j])
                rj = ref[j]
                s1[j] += (g0 + g1) + (g2 + g3)
                s2[j] += ((g0 * (np.float64(b0[j]) - rj) + g1 * (np.float64(b1[j]) - rj))
                          + (g2 * (np.float64(b2_[j]) - rj) + g3 * (np.float64(b3[j]) - rj)))
    for n in range(N - N % 4, N):
        _add_terms(a2[n, l0:l0 + L], b2[n, l0:l0 + L], ref, s1, s2, mode)
    return s1, s2


@_jit
def _forward_columns(x2, y2, S, c0, c1, n0, n1, write, eps, w, b, has_w, has_b, mean, rstd):
    """batchnorm forward of channels c0..c1 on the flattened view (N, C*S): column sums over every row, the
    statistics (stored if ``write``), then the apply on rows n0..n1."""
    N = x2.shape[0]
    l0 = c0 * S
    L = (c1 - c0) * S
    p = np.empty(L)
    for j in range(L):
        p[j] = _pivot(x2[0, l0 + j // S * S])
    s1, s2 = _column_sums(x2, x2, l0, L, p, 0)
    m = np.empty(L, x2.dtype)
    sc = np.empty(L, x2.dtype)
    sh = np.empty(L, x2.dtype)
    for c in range(c1 - c0):
        a1, a2 = _channel_of_columns(s1, s2, c, S)
        m64, r64 = _finish(p[c * S], a1, a2, N * S, eps)
        mt = x2.dtype.type(m64)
        if write:
            mean[c0 + c] = mt
            rstd[c0 + c] = r64
        scale = r64 * (np.float64(w[c0 + c]) if has_w else 1.0)
        shift = (np.float64(b[c0 + c]) if has_b else 0.0) + (np.float64(mt) - m64) * scale
        for i in range(c * S, (c + 1) * S):
            m[i] = mt
            sc[i] = scale
            sh[i] = shift
    for n in range(n0, n1):
        xr = x2[n, l0:l0 + L]
        yr = y2[n, l0:l0 + L]
        for j in range(L):
            yr[j] = (xr[j] - m[j]) * sc[j] + sh[j]


@_jit
def _backward_columns(dy2, x2, dx2, S, c0, c1, n0, n1, write, mean, rstd, w, has_w, dw, db, want_dw, want_db):
    """batchnorm backward of channels c0..c1 on the flattened view: column sums over every row, coefficients
    (and the parameter gradients, stored if ``write``), then dx on rows n0..n1."""
    N = x2.shape[0]
    l0 = c0 * S
    L = (c1 - c0) * S
    cnt = N * S
    ref = np.empty(L)
    for j in range(L):
        ref[j] = mean[c0 + j // S]
    s1, s2 = _column_sums(dy2, x2, l0, L, ref, 1)
    m = np.empty(L, x2.dtype)
    A = np.empty(L, x2.dtype)
    B = np.empty(L, x2.dtype)
    Cc = np.empty(L, x2.dtype)
    for c in range(c1 - c0):
        a1, a2 = _channel_of_columns(s1, s2, c, S)
        r = np.float64(rstd[c0 + c])
        wc = np.float64(w[c0 + c]) if has_w else 1.0
        for i in range(c * S, (c + 1) * S):
            m[i] = mean[c0 + c]
            A[i] = r * wc
            B[i] = -r * r * (r * wc * a2 / cnt)
            Cc[i] = -r * (wc * a1 / cnt)
        if want_db and write:
            db[c0 + c] = a1
        if want_dw and write:
            dw[c0 + c] = r * a2
    for n in range(n0, n1):
        dr = dy2[n, l0:l0 + L]
        xr = x2[n, l0:l0 + L]
        outr = dx2[n, l0:l0 + L]
        for j in range(L):
            outr[j] = dr[j] * A[j] + (xr[j] - m[j]) * B[j] + Cc[j]


@_pjit
def _bn_forward(x, w, b, has_w, has_b, eps, y, mean, rstd):
    N, C, S = x.shape
    cnt = N * S
    if _fused_channels(N, C, S, x.itemsize, 1):
        # one channel per work item: its rows are still in L2 for the apply pass. The loops index x[n, c, j]
        # rather than take a view of each row: a view per row of 196 values made this path 1.5x slower.
        xf = x.reshape(N * C * S)
        t = x.dtype.type
        for c in prange(C):
            p = _pivot(x[0, c, 0])
            s1 = 0.0
            s2 = 0.0
            for n in range(N):
                if n + 1 < N:
                    _prefetch_run(xf, ((n + 1) * C + c) * S, S)
                for j in range(S):
                    d = np.float64(x[n, c, j]) - p
                    s1 += d
                    s2 += d * d
            m64, r64 = _finish(p, s1, s2, cnt, eps)
            mean[c] = m64
            rstd[c] = r64
            mc = mean[c]
            sc = r64 * (np.float64(w[c]) if has_w else 1.0)
            sh = (np.float64(b[c]) if has_b else 0.0) + (np.float64(mc) - m64) * sc
            sct = t(sc)
            sht = t(sh)
            for n in range(N):
                for j in range(S):
                    y[n, c, j] = (x[n, c, j] - mc) * sct + sht
        return
    T = _column_tasks(C, S)
    if T:
        k = CHUNK // S
        x2 = x.reshape(N, C * S)
        y2 = y.reshape(N, C * S)
        for t in prange(T):
            _forward_columns(x2, y2, S, t * k, min(C, (t + 1) * k), 0, N, True, eps, w, b, has_w, has_b, mean, rstd)
        return
    if _small_view(N, C, S, x.itemsize):
        x2 = x.reshape(N, C * S)
        y2 = y.reshape(N, C * S)
        RL = _cdiv(N, SMALL_TASKS)
        for t in prange(SMALL_TASKS):
            _forward_columns(x2, y2, S, 0, C, min(N, t * RL), min(N, (t + 1) * RL), t == 0, eps, w, b, has_w, has_b,
                             mean, rstd)
        return
    piv = np.empty(C)
    for c in range(C):
        piv[c] = _pivot(x[0, c, 0])
    sums = _channel_sums(x, x, piv, 0)
    sc = np.empty(C, x.dtype)
    sh = np.empty(C, x.dtype)
    for c in range(C):
        m64, r64 = _finish(piv[c], sums[c, 0], sums[c, 1], cnt, eps)
        mean[c] = m64
        rstd[c] = r64
        s = r64 * (np.float64(w[c]) if has_w else 1.0)
        sc[c] = s
        sh[c] = (np.float64(b[c]) if has_b else 0.0) + (np.float64(mean[c]) - m64) * s
    _channel_affine(x, mean, sc, sh, y)


@_pjit
def _bn_backward(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    N, C, S = x.shape
    cnt = N * S
    t = x.dtype.type
    if _fused_channels(N, C, S, x.itemsize, 2):
        # as in _bn_forward: one channel per work item, indexed without a view per row
        dyf = dy.reshape(N * C * S)
        xf = x.reshape(N * C * S)
        for c in prange(C):
            mc = mean[c]
            m64 = np.float64(mc)
            r = np.float64(rstd[c])
            s1 = 0.0
            s2 = 0.0
            for n in range(N):
                if n + 1 < N:
                    _prefetch_run(dyf, ((n + 1) * C + c) * S, S)
                    _prefetch_run(xf, ((n + 1) * C + c) * S, S)
                for j in range(S):
                    g = np.float64(dy[n, c, j])
                    s1 += g
                    s2 += g * (np.float64(x[n, c, j]) - m64)
            wc = np.float64(w[c]) if has_w else 1.0
            A = t(r * wc)
            B = t(-r * r * (r * wc * s2 / cnt))
            Cc = t(-r * (wc * s1 / cnt))
            for n in range(N):
                for j in range(S):
                    dx[n, c, j] = dy[n, c, j] * A + (x[n, c, j] - mc) * B + Cc
            if want_db:
                db[c] = s1
            if want_dw:
                dw[c] = r * s2
        return
    T = _column_tasks(C, S)
    if T:
        k = CHUNK // S
        d2 = dy.reshape(N, C * S)
        x2 = x.reshape(N, C * S)
        o2 = dx.reshape(N, C * S)
        for t in prange(T):
            _backward_columns(d2, x2, o2, S, t * k, min(C, (t + 1) * k), 0, N, True, mean, rstd, w, has_w, dw, db,
                              want_dw, want_db)
        return
    if _small_view(N, C, S, x.itemsize):
        d2 = dy.reshape(N, C * S)
        x2 = x.reshape(N, C * S)
        o2 = dx.reshape(N, C * S)
        RL = _cdiv(N, SMALL_TASKS)
        for t in prange(SMALL_TASKS):
            _backward_columns(d2, x2, o2, S, 0, C, min(N, t * RL), min(N, (t + 1) * RL), t == 0, mean, rstd, w,
                              has_w, dw, db, want_dw, want_db)
        return
    ref = np.empty(C)
    for c in range(C):
        ref[c] = mean[c]
    sums = _channel_sums(dy, x, ref, 1)
    A = np.empty(C, x.dtype)
    B = np.empty(C, x.dtype)
    Cc = np.empty(C, x.dtype)
    for c in range(C):
        r = np.float64(rstd[c])
        wc = np.float64(w[c]) if has_w else 1.0
        A[c] = r * wc
        B[c] = -r * r * (r * wc * sums[c, 1] / cnt)
        Cc[c] = -r * (wc * sums[c, 0] / cnt)
        if want_db:
            db[c] = sums[c, 0]
        if want_dw:
            dw[c] = r * sums[c, 1]
    _channel_dx(dy, x, mean, A, B, Cc, dx)


@_jit
def _channel_forward_infer(x, w, b, has_w, has_b, running_mean, running_var, eps, y):
    C = x.shape[1]
    sc = np.empty(C, x.dtype)
    sh = np.empty(C, x.dtype)
    for c in range(C):
        s = (np.float64(w[c]) if has_w else 1.0) / np.sqrt(np.float64(running_var[c]) + eps)
        sc[c] = s
        sh[c] = np.float64(b[c]) if has_b else 0.0
    _channel_affine(x, running_mean, sc, sh, y)


@_jit
def _channel_backward_infer(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    C = x.shape[1]
    zero = np.zeros(C, x.dtype)
    A = np.empty(C, x.dtype)
    for c in range(C):
        A[c] = np.float64(rstd[c]) * (np.float64(w[c]) if has_w else 1.0)
    _channel_affine(dy, zero, A, zero, dx)  # dx = dy * rstd * weight; x is not involved
    if want_dw or want_db:
        ref = np.empty(C)
        for c in range(C):
            ref[c] = mean[c]
        sums = _channel_sums(dy, x, ref, 1)
        for c in range(C):
            if want_db:
                db[c] = sums[c, 0]
            if want_dw:
                dw[c] = np.float64(rstd[c]) * sums[c, 1]


# --- layernorm: rows of K with an elementwise affine --------------------------------------------------------------

@_jit
def _ln_apply(xr, yr, m, m64, r, w, b):
    """y = ((x - m) * r + c0) * w + b, with c0 = (m - m64) * r the rounding of the mean to the dtype."""
    t = xr.dtype.type
    rt = t(r)
    c0 = t((np.float64(m) - m64) * r)
    for j in range(xr.shape[0]):
        yr[j] = ((xr[j] - m) * rt + c0) * w[j] + b[j]


@_pjit
def _ln_forward(x, w, b, has_w, has_b, eps, y, mean, rstd):
    M, K = x.shape
    wv = w if has_w else np.ones(K, x.dtype)
    bv = b if has_b else np.zeros(K, x.dtype)
    P = _npieces(M, K)
    if P == 1:
        for k in prange(M):
            xr = x[k]
            p = _pivot(xr[0])
            s1, s2 = _sums(xr, p)
            m64, r64 = _finish(p, s1, s2, K, eps)
            mean[k] = m64
            rstd[k] = r64
            _ln_apply(xr, y[k], mean[k], m64, r64, wv, bv)
        return
    L = _cdiv(K, P)
    part = np.empty((M * P, 2))
    for it in prange(M * P):
        k = it // P
        a = (it % P) * L
        s1, s2 = _sums(x[k, a:min(K, a + L)], _pivot(x[k, 0]))
        part[it, 0] = s1
        part[it, 1] = s2
    st = np.empty((M, 2))
    for k in range(M):
        s1 = 0.0
        s2 = 0.0
        for q in range(P):
            s1 += part[k * P + q, 0]
            s2 += part[k * P + q, 1]
        m64, r64 = _finish(_pivot(x[k, 0]), s1, s2, K, eps)
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
def _ln_row_sums(dyr, xr, m, r, w):
    """sum(g), sum(g * xhat) over (a piece of) one row, g = dy * w, into float64.

    Each chunk of PIECE values is summed in the dtype, then added into float64: for float32, twice the vector
    lanes of float64 and no conversions (15% faster in cache; a lane adds at most PIECE / 64 terms). A chunk
    whose sums are not finite (products beyond float32's range, or NaN/inf data) is summed again in float64."""
    t = xr.dtype.type
    mt = t(m)
    sg = 0.0
    sgx = 0.0
    for c0 in range(0, xr.shape[0], PIECE):
        dyc = dyr[c0:c0 + PIECE]
        xc = xr[c0:c0 + PIECE]
        wc = w[c0:c0 + PIECE]
        a = t(0.0)
        b = t(0.0)
        for j in range(xc.shape[0]):
            g = dyc[j] * wc[j]
            a += g
            b += g * (xc[j] - mt)
        if _finite(a) and _finite(b):
            sg += np.float64(a)
            sgx += np.float64(b)
            continue
        for j in range(xc.shape[0]):
            g64 = np.float64(dyc[j]) * np.float64(wc[j])
            sg += g64
            sgx += g64 * (np.float64(xc[j]) - m)
    return sg, sgx * r


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
        g = dyr[j]
        xm = xr[j] - m
        dxr[j] = g * w[j] * r + xm * B + Cc
        acw[j] += g * (xm * r)
        acb[j] += g


@_jit
def _ln_dx_grads_pair(dy1, x1, dx1, m1, r1, B1, C1, dy2, x2, dx2, m2, r2, B2, C2, two, w, acw, acb):
    """_ln_dx_grads for row 1 and, if ``two``, row 2 in the same loop."""
    if not two:
        _ln_dx_grads(dy1, x1, dx1, m1, r1, B1, C1, w, acw, acb)
        return
    for j in range(x1.shape[0]):
        g1 = dy1[j]
        g2 = dy2[j]
        xm1 = x1[j] - m1
        xm2 = x2[j] - m2
        wj = w[j]
        dx1[j] = g1 * wj * r1 + xm1 * B1 + C1
        dx2[j] = g2 * wj * r2 + xm2 * B2 + C2
        acw[j] += g1 * (xm1 * r1) + g2 * (xm2 * r2)
        acb[j] += g1 + g2


@_jit
def _ln_dx(dyr, xr, dxr, m, r, B, Cc, w):
    """dx = dy * w * r + (x - m) * B + Cc."""
    for j in range(xr.shape[0]):
        dxr[j] = dyr[j] * w[j] * r + (xr[j] - m) * B + Cc


@_pjit
def _ln_backward(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    M, K = x.shape
    t = x.dtype.type
    wv = w if has_w else np.ones(K, x.dtype)
    want = want_dw or want_db
    if K <= 4 * BLOCK:
        # A row fits in L1: its sums, then dx and the parameter gradients (in the dtype, flushed into float64
        # every FLUSH rows) while it is there. Blocks of rows keep partial parameter gradients. (Measured against
        # float64 gradients in the sums' loop, and against PyTorch's order of a separate first loop for them:
        # this order is 10-20% faster.)
        R = max(1, min(TARGET_ITEMS * 2, M // 8)) if want else min(M, TARGET_ITEMS * 2)
        RL = _cdiv(M, R)
        pw = np.zeros((R, K) if want else (1, 1))
        pb = np.zeros((R, K) if want else (1, 1))
        acw = np.zeros((R, K) if want else (1, 1), x.dtype)
        acb = np.zeros((R, K) if want else (1, 1), x.dtype)
        for it in prange(R):
            k0 = it * RL
            k1 = min(M, (it + 1) * RL)
            for k in range(k0, k1):
                mk = mean[k]
                m64 = np.float64(mk)
                r = np.float64(rstd[k])
                sg, sgx = _ln_row_sums(dy[k], x[k], m64, r, wv)
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
            aw = np.zeros(K)
            ab = np.zeros(K)
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
        return
    # Long rows, in groups of rows small enough to stay in L3 between the two passes over them: row sums over
    # (row, piece) items, then dx and the parameter gradients over column blocks, each block adding its rows in
    # order. The dtype partial sums flush every FLUSH rows of the whole input, so the grouping does not change
    # the results.
    GR = max(2, GROUP_BYTES // (2 * K * x.itemsize) // 2 * 2)
    P = max(1, min(_cdiv(TARGET_ITEMS, min(GR, M)), K // PIECE))
    L = _cdiv(K, P)
    part = np.empty((GR * P, 2))
    coef = np.empty((M, 2), x.dtype)
    JB = _cdiv(K, BLOCK)
    aw = np.zeros(K)
    ab = np.zeros(K)
    acw = np.zeros(K, x.dtype)
    acb = np.zeros(K, x.dtype)
    for k0 in range(0, M, GR):
        k1 = min(M, k0 + GR)
        for it in prange((k1 - k0) * P):
            k = k0 + it % (k1 - k0)
            a = (it // (k1 - k0)) * L
            e = min(K, a + L)
            sg, sgx = _ln_row_sums(dy[k, a:e], x[k, a:e], np.float64(mean[k]), np.float64(rstd[k]), wv[a:e])
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
            for k in range(k0, k1, 2):
                k2 = min(k + 1, k1 - 1)
                _ln_dx_grads_pair(dy[k, j0:j1], x[k, j0:j1], dx[k, j0:j1], mean[k], rstd[k], coef[k, 0],
                                  coef[k, 1], dy[k2, j0:j1], x[k2, j0:j1], dx[k2, j0:j1], mean[k2], rstd[k2],
                                  coef[k2, 0], coef[k2, 1], k2 > k, wv[j0:j1], acwv, acbv)
                if k2 % FLUSH == FLUSH - 1 or k2 == M - 1:
                    _ln_flush(acwv, awv)
                    _ln_flush(acbv, abv)
    for j in range(K if want else 0):
        if want_dw:
            dw[j] = aw[j]
        if want_db:
            db[j] = ab[j]


# --- the contract's callables --------------------------------------------------------------------------------------

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _opt(a, x):
    """None -> (an empty array of x's dtype, False), so that one compiled specialization serves both."""
    return (_EMPTY[x.dtype], False) if a is None else (a, True)


def batchnorm_forward(x, weight, bias, eps, y, mean, rstd):
    _sync_threads()
    w, hw = _opt(weight, x)
    b, hb = _opt(bias, x)
    _bn_forward(x, w, b, hw, hb, eps, y, mean, rstd)


def channel_forward_infer(x, weight, bias, running_mean, running_var, eps, y):
    _sync_threads()
    w, hw = _opt(weight, x)
    b, hb = _opt(bias, x)
    _channel_forward_infer(x, w, b, hw, hb, running_mean, running_var, eps, y)


def batchnorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads()
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    _bn_backward(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb)


def channel_backward_infer(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads()
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    _channel_backward_infer(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb)


def groupnorm_forward(x, num_groups, weight, bias, eps, y, mean, rstd):
    _sync_threads()
    w, hw = _opt(weight, x)
    b, hb = _opt(bias, x)
    _sets_forward(x, num_groups, w, b, hw, hb, eps, y, mean, rstd)


def groupnorm_backward(dy, x, num_groups, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads()
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    _sets_backward(dy, x, num_groups, mean, rstd, w, hw, dx, dw, db, wdw, wdb)


def instancenorm_forward(x, weight, bias, eps, y, mean, rstd):
    groupnorm_forward(x, x.shape[1], weight, bias, eps, y, mean, rstd)


def instancenorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    groupnorm_backward(dy, x, x.shape[1], mean, rstd, weight, dx, dweight, dbias)


def layernorm_forward(x, weight, bias, eps, y, mean, rstd):
    _sync_threads()
    w, hw = _opt(weight, x)
    b, hb = _opt(bias, x)
    _ln_forward(x, w, b, hw, hb, eps, y, mean, rstd)


def layernorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads()
    w, hw = _opt(weight, x)
    dw, wdw = _opt(dweight, x)
    db, wdb = _opt(dbias, x)
    _ln_backward(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb)


# numba's thread count is per calling thread: remember the wanted count and apply it in whichever thread calls a
# kernel (a threading.local check costs far less than numba.get_num_threads()).
_wanted: int | None = None
_applied = threading.local()


def _sync_threads() -> None:
    if _wanted is not None and getattr(_applied, "n", None) != _wanted:
        numba.set_num_threads(_wanted)
        _applied.n = _wanted


def set_num_threads(n: int) -> None:
    global _wanted
    _wanted = min(n, config.NUMBA_NUM_THREADS)
    _sync_threads()


def _threading_layer() -> str:
    try:
        _launch_threads()  # cheap: loads the threading library, compiles nothing
        return numba.threading_layer()
    except Exception as exc:  # noqa: BLE001 - only informational
        return f"unavailable ({type(exc).__name__})"


INFO = {
    "numba": numba.__version__,
    "threading layer": _threading_layer(),
    "max threads": str(config.NUMBA_NUM_THREADS),
    "fastmath": ",".join(sorted(FASTMATH)),
    "compile cache": "on" if CACHE else "off: no writable cache directory (set NUMBA_CACHE_DIR)",
}

KERNELS = kernel_table({
    ("batchnorm", "forward"): batchnorm_forward,
    ("batchnorm", "forward_infer"): channel_forward_infer,
    ("batchnorm", "backward"): batchnorm_backward,
    ("batchnorm", "backward_infer"): channel_backward_infer,
    ("instancenorm", "forward"): instancenorm_forward,
    ("instancenorm", "forward_infer"): channel_forward_infer,
    ("instancenorm", "backward"): instancenorm_backward,
    ("instancenorm", "backward_infer"): channel_backward_infer,
    ("groupnorm", "forward"): groupnorm_forward,
    ("groupnorm", "backward"): groupnorm_backward,
    ("layernorm", "forward"): layernorm_forward,
    ("layernorm", "backward"): layernorm_backward,
})
