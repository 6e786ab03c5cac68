"""BatchNorm over (N, C, S) inputs with per-channel statistics, and the per-channel elementwise passes of inference
(``channel_forward_infer`` / ``channel_backward_infer``, which InstanceNorm's inference uses too). The split
directions (``stats``, ``apply``, ``backward_reduce``, ``backward_apply``) are the fused kernels' reductions and
elementwise passes (the schedules in _CHANNEL_SUMS, _CHANNEL_AFFINE, _CHANNEL_DX) called on their own.

How the work is split: with enough channels whose data fits in L2, one work item per channel (reduce, then apply,
in cache); otherwise work items are (n, c, piece) rows, or, for tiny spatial sizes such as (N, C) inputs, tasks of
whole channels on the flattened (N, C*S) view that sum, finish and apply their columns (when there are enough of
them); else, for a small view, tasks that each sum all of it and apply their own rows; else blocks of rows of that
view, merged per channel afterwards.

Each schedule is a jitted function of its own, chosen in Python by the callables at the end from the shape alone:
numba compiles a function whole, with every branch, so one function holding every schedule took 10-25 s to
compile on its first call, where a shape needs one or two parallel loops.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import (BLOCK, MIN_SETS, TARGET_ITEMS, _act, _cdiv, _clear, _dsums, _dx, _finish, _gact, _jit, _opt,
                      _param_grads, _pivot, _pjit, _prefetch, _row_split, _sjit, _sums, _sync_threads, act_rows,
                      per_activation, row_split)
from ._dtype16 import narrow, widen

# batchnorm: spatial sizes below WIDE_S use the flattened (N, C*S) view; a channel is one work item when there
# are at least MIN_SETS channels and the input data of one channel fits in FUSED_BYTES (L2 is 1 MiB per core on
# the Zen 4 this was tuned on; a partial miss falls back to L3).
WIDE_S = 16
FUSED_BYTES = 1 << 20
# ...and so do spatial sizes below FLAT_S where the batch has at least S samples: the (n, c) schedules then read N
# runs of fewer than 64 values a channel, each paying a loop's start, and the flattened view is faster. In-process,
# 2 threads, float32, the flattened view against the (n, c) schedules, forward / backward: (64, 256, 4x4) 0.43 /
# 0.52, (2048, 32, 16) 0.36 / 0.42, (64, 128, 5x5) 0.57 / 0.77, (64, 256, 6x6) 0.59 / 0.74, (256, 64, 32) 0.43 /
# 0.62, (64, 512, 7x7) 0.74 / 0.89, (128, 256, 7x7) 0.63 / 0.82, (64, 512, 63) 0.61 / 0.78; with a fused ReLU
# 0.31-0.97 / 0.30-0.93. Smaller batches lose ((8, 256, 4x4) 1.4 / 1.7, (16, 256, 5x5) 0.93 / 1.13, (32, 256, 7x7)
# 0.91 / 1.15, (8, 2048, 7x7) 1.8 / 2.2), and so do 8x8 and larger ((64, 256, 8x8) 0.94 / 1.29).
FLAT_S = 64
# The fused activations' (n, c) passes (act_rows) cost more a run than the plain kernels' schedules, so the act_
# kernels take the flattened view (the plain kernels and _act_flat's passes) also for S < ACT_FLAT_S from a batch
# of ACT_FLAT_N: in-process, 2 threads, float32, against act_rows, forward / backward: SiLU (4, 256, 4x4) 1.0 /
# 0.63, (8, 256, 4x4) 0.71 / 0.39, (8, 512, 5x5) 0.72 / 0.43, (16, 256, 5x5) 0.54 / 0.33, (16, 64, 30) 0.55 /
# 0.32; ReLU (8, 256, 4x4) 0.73 / 0.65. Smaller batches lose ((1, 256, 5x5) SiLU 2.4 / 1.6, (3, 512, 4x4) 1.3 /
# 0.74), and so does ReLU at 7x7 in small batches ((8, 2048, 7x7) 1.6 / 1.5).
ACT_FLAT_S = 32
ACT_FLAT_N = 4
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
# ...and TILE_MEMORY values where the data come from memory (AHEAD_MIN_BYTES or more), as the Cython columns pass
# (ROW_BLOCK_MEMORY in _batchnorm.pyx): the channels-last inference pass of (32, 64, 56, 56) right after a
# convolution took 0.85x the time of 256-value tiles (in-process); in cache the 256 win (64: 1.11-1.16x), and right
# after a convolution at the ResNet model's smaller shapes the two were within 0.95-1.02x of each other. 16-bit data
# keep TILE (bfloat16 (32, 64, 56, 56) and (32, 128, 56, 56): 0.88-0.98x after a convolution, 1.03-1.13x in cache).
TILE_MEMORY = 64
# Runs of data up to this long are prefetched by hand (see _prefetch_run). The fused-channel schedules ask for the
# run AHEAD_BYTES ahead where the input has AHEAD_MIN_BYTES or more (beyond a quarter of the 32 MiB L3 the data
# come from memory, and the next run alone is closer than memory's latency), else the next one, as the Cython
# channel schedule does: in-process A/B against the next run, 2 threads, float32, forward / backward (64, 256,
# 14, 14) 0.90-0.92 / 0.87-0.89, (128, 256, 14, 14) 0.80-0.83 / 0.85-0.92 (the same bits; in cache unchanged).
PREFETCH_BYTES = 4096
AHEAD_BYTES = 8192
AHEAD_MIN_BYTES = 8 << 20


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


def _runs_ahead(run_bytes, data_bytes):
    """How many runs ahead the fused-channel schedules ask for the run they will read (AHEAD_BYTES)."""
    return 1 if data_bytes < AHEAD_MIN_BYTES else max(1, AHEAD_BYTES // max(1, run_bytes))


def wide_split(N, W):
    """Row blocks and column blocks of the flattened (N, W) view, W = C*S (plain Python for the dispatchers,
    compiled as _wide_split for the kernels; -(-a // b) is _cdiv)."""
    R = max(1, min(TARGET_ITEMS, N // 32, (1 << 20) // W))
    return R, -(-N // R), -(-W // BLOCK)


_wide_split = _jit(wide_split)


@_jit
def _add_sq_terms(av, ref, p1, p2):
    """Elementwise, in float64: d = a - ref added to p1 and d*d to p2 (the statistics' integrands)."""
    for j in range(av.shape[0]):
        d = np.float64(widen(av[j])) - ref[j]
        p1[j] += d
        p2[j] += d * d


@_jit
def _add_dot_terms(av, bv, ref, p1, p2):
    """Elementwise, in float64: a added to p1 and a*(b - ref) to p2 (the gradients' integrands)."""
    for j in range(av.shape[0]):
        g = np.float64(widen(av[j]))
        p1[j] += g
        p2[j] += g * (np.float64(widen(bv[j])) - ref[j])


@_jit
def _add_dot_terms_scaled(av, bv, ref, p1, p2, sv, ov):
    """_add_dot_terms, and ov = a * sv elementwise in the same pass."""
    for j in range(av.shape[0]):
        a = widen(av[j])
        ov[j] = narrow(ov, a * sv[j])
        g = np.float64(a)
        p1[j] += g
        p2[j] += g * (np.float64(widen(bv[j])) - ref[j])


@_jit
def _dsums_scaled(dyr, xr, m, s, outr):
    """_dsums(dyr, xr, m), and outr = dy * s in the same pass."""
    s1 = 0.0
    s2 = 0.0
    for i in range(xr.shape[0]):
        a = widen(dyr[i])
        outr[i] = narrow(outr, a * s)
        g = np.float64(a)
        s1 += g
        s2 += g * (np.float64(widen(xr[i])) - m)
    return s1, s2


@_sjit
def _merge_rows(part, N, C, Q):
    """Per-channel sums of the (n, c, piece) partial sums: over n, then q, in order for every c, reading the
    partial sums in memory order."""
    out = np.empty((C, 2))  # not np.zeros: its implementation compiles on its own, 0.15 s of a first call
    for c in range(C):
        out[c, 0] = 0.0
        out[c, 1] = 0.0
    for n in range(N):
        for c in range(C):
            for q in range(Q):
                out[c, 0] += part[(n * C + c) * Q + q, 0]
                out[c, 1] += part[(n * C + c) * Q + q, 1]
    return out


@_sjit
def _merge_columns(part, C, S):
    """Per-channel sums of the (R, 2, T) column sums of the flattened view (T: whole rows of C*S columns): over
    blocks r, then tiles, then a channel's S columns, in order."""
    out = np.empty((C, 2))  # see _merge_rows
    for c in range(C):
        out[c, 0] = 0.0
        out[c, 1] = 0.0
    for r in range(part.shape[0]):
        for q0 in range(0, part.shape[2], C * S):
            for c in range(C):
                for s in range(S):
                    out[c, 0] += part[r, 0, q0 + c * S + s]
                    out[c, 1] += part[r, 1, q0 + c * S + s]
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


def _channel_sums(mode):
    """The per-channel sums' schedules (rows, pieces, tiled, blocks; the callables pick one by _channel_schedule),
    one parallel loop each: per-channel float64 sums over (N, S) of one of two integrands, merged in a fixed order:

    mode 0: d = a - ref[c]          -> (sum d, sum d*d)            (statistics; ref = pivots)
    mode 1: a = dy, bx = x          -> (sum dy, sum dy*(x - ref[c])) (parameter gradients)
    mode 2: mode 1, and out = dy * sc[c] in the same pass          (backward_infer's dx; sc and out given)

    ``mode`` is a constant of the compiled code, whose other branches numba drops: as an argument, every first
    call compiled both integrands (0.3-0.4 s of a schedule's 2.2-2.6 s)."""

    @_pjit
    def rows(a, bx, ref, sc=None, out=None):
        """(n, c) rows, one work item each (not _flat_view, one piece per row)."""
        N, C, S = a.shape
        part = np.empty((N * C, 2))
        for it in prange(N * C):
            n = it // C
            c = it - n * C
            rc = ref[c]
            s1 = 0.0
            s2 = 0.0
            if mode == 0:
                for j in range(S):
                    d = np.float64(widen(a[n, c, j])) - rc
                    s1 += d
                    s2 += d * d
            elif mode == 1:
                for j in range(S):
                    g = np.float64(widen(a[n, c, j]))
                    s1 += g
                    s2 += g * (np.float64(widen(bx[n, c, j])) - rc)
            else:
                scc = sc[c]
                for j in range(S):
                    v = widen(a[n, c, j])
                    out[n, c, j] = narrow(out, v * scc)
                    g = np.float64(v)
                    s1 += g
                    s2 += g * (np.float64(widen(bx[n, c, j])) - rc)
            part[it, 0] = s1
            part[it, 1] = s2
        return _merge_rows(part, N, C, 1)

    @_pjit
    def pieces(a, bx, ref, sc=None, out=None):
        """(n, c, piece) work items (not _flat_view, more than one piece per row)."""
        N, C, S = a.shape
        Q, L = _row_split(N, C, S)
        part = np.empty((N * C * Q, 2))
        for it in prange(N * C * Q):
            n = it // (C * Q)
            c = (it // Q) % C
            lo = (it % Q) * L
            e = min(S, lo + L)
            if mode == 0:
                s1, s2 = _sums(a[n, c, lo:e], ref[c])
            elif mode == 1:
                s1, s2 = _dsums(a[n, c, lo:e], bx[n, c, lo:e], ref[c])
            else:
                s1, s2 = _dsums_scaled(a[n, c, lo:e], bx[n, c, lo:e], ref[c], sc[c], out[n, c, lo:e])
            part[it, 0] = s1
            part[it, 1] = s2
        return _merge_rows(part, N, C, Q)

    @_pjit
    def tiled(a, bx, ref, sc=None, out=None):
        """The flattened view when a row fits in one column block: each of R blocks of RL rows walks its
        contiguous span in tiles of whole rows, summing per tile position; tile positions, then blocks, are
        merged per channel in a fixed order."""
        N, C, S = a.shape
        W = C * S
        R, RL, _ = _wide_split(N, W)
        RT = max(1, TILE // W)
        T = RT * W
        fa = a.reshape(N * W)
        fb = bx.reshape(N * W)
        rt = _tiled(ref, S, T, np.float64)
        if mode == 2:
            st = _tiled(sc, S, T, sc.dtype)
            fo = out.reshape(N * W)
        part = np.empty((R, 2, T))
        for r in prange(R):
            p1 = part[r, 0]
            p2 = part[r, 1]
            _clear(p1)
            _clear(p2)
            n1 = min(N, (r + 1) * RL)
            for n in range(r * RL, n1, RT):
                o = n * W
                L = (min(n1, n + RT) - n) * W
                if mode == 0:
                    _add_sq_terms(fa[o:o + L], rt, p1, p2)
                elif mode == 1:
                    _add_dot_terms(fa[o:o + L], fb[o:o + L], rt, p1, p2)
                else:
                    _add_dot_terms_scaled(fa[o:o + L], fb[o:o + L], rt, p1, p2, st, fo[o:o + L])
        return _merge_columns(part, C, S)

    @_pjit
    def blocks(a, bx, ref, sc=None, out=None):
        """Blocks of rows and columns of the flattened (N, C*S) view (_flat_view, rows longer than a block)."""
        N, C, S = a.shape
        W = C * S
        R, RL, JB = _wide_split(N, W)
        a2 = a.reshape(N, W)
        b2 = bx.reshape(N, W)
        refw = np.empty(W)
        for j in range(W):
            refw[j] = ref[j // S]
        if mode == 2:
            o2 = out.reshape(N, W)
            scw = np.empty(W, sc.dtype)
            for j in range(W):
                scw[j] = sc[j // S]
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
                if mode == 0:
                    _add_sq_terms(a2[n, j0:j1], rw, p1, p2)
                elif mode == 1:
                    _add_dot_terms(a2[n, j0:j1], b2[n, j0:j1], rw, p1, p2)
                else:
                    _add_dot_terms_scaled(a2[n, j0:j1], b2[n, j0:j1], rw, p1, p2, scw[j0:j1], o2[n, j0:j1])
        return _merge_columns(part, C, S)

    return rows, pieces, tiled, blocks


def _tiled_pass(mode):
    """The elementwise passes on the flattened view in tiles of whole rows, at least ``tile`` values each (see
    _channel_sums' tiled), ``mode`` compiled in as there: mode 0: out = (a - m) * A + Cc;  mode 1: out = a * A +
    (bx - m) * B + Cc (a = dy, bx = x)."""

    @_pjit
    def apply(a, bx, m, A, B, Cc, out, tile):
        N, C, S = a.shape
        W = C * S
        R, RL, _ = _wide_split(N, W)
        RT = max(1, tile // W)
        T = RT * W
        fa = a.reshape(N * W)
        fb = bx.reshape(N * W)
        fo = out.reshape(N * W)
        mt = _tiled(m, S, T, m.dtype)
        at = _tiled(A, S, T, m.dtype)
        ct = _tiled(Cc, S, T, m.dtype)
        if mode == 0:
            bt = mt
        else:
            bt = _tiled(B, S, T, m.dtype)
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
                        ov[q] = narrow(ov, (widen(av[q]) - mt[q]) * at[q] + ct[q])
                else:
                    for q in range(L):
                        ov[q] = narrow(ov, widen(av[q]) * at[q] + (widen(bv[q]) - mt[q]) * bt[q] + ct[q])

    return apply


_tiled_affine = _tiled_pass(0)
_tiled_dx = _tiled_pass(1)


# The elementwise passes' schedules, one parallel loop each, as the sums' (the same shapes take the same kind):
# _affine_*: y = (x - m[c]) * sc[c] + sh[c];  _dx_*: dx = dy * A[c] + (x - m[c]) * B[c] + Cc[c]; the per-channel
# arrays have x's dtype.

@_pjit
def _affine_rows(x, m, sc, sh, y):
    N, C, S = x.shape
    for it in prange(N * C):
        n = it // C
        c = it - n * C
        mc = m[c]
        scc = sc[c]
        shc = sh[c]
        for j in range(S):
            y[n, c, j] = narrow(y, (widen(x[n, c, j]) - mc) * scc + shc)


@_pjit
def _affine_pieces(x, m, sc, sh, y):
    N, C, S = x.shape
    Q, L = _row_split(N, C, S)
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
            yr[j] = narrow(yr, (widen(xr[j]) - mc) * scc + shc)


def _affine_tiled(x, m, sc, sh, y):
    _tiled_affine(x, x, m, sc, sc, sh, y, TILE_MEMORY if x.nbytes >= AHEAD_MIN_BYTES and x.itemsize >= 4 else TILE)


@_pjit
def _affine_blocks(x, m, sc, sh, y):
    N, C, S = x.shape
    W = C * S
    R, RL, JB = _wide_split(N, W)
    x2 = x.reshape(N, W)
    y2 = y.reshape(N, W)
    mw = np.empty(W, m.dtype)
    scw = np.empty(W, m.dtype)
    shw = np.empty(W, m.dtype)
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
                yr[j] = narrow(yr, (widen(xr[j]) - mv[j]) * scv[j] + shv[j])


@_pjit
def _dx_rows(dy, x, m, A, B, Cc, dx):
    N, C, S = x.shape
    for it in prange(N * C):
        n = it // C
        c = it - n * C
        Ac = A[c]
        Bc = B[c]
        Cv = Cc[c]
        mc = m[c]
        for j in range(S):
            dx[n, c, j] = narrow(dx, widen(dy[n, c, j]) * Ac + (widen(x[n, c, j]) - mc) * Bc + Cv)


@_pjit
def _dx_pieces(dy, x, m, A, B, Cc, dx):
    N, C, S = x.shape
    Q, L = _row_split(N, C, S)
    for it in prange(N * C * Q):
        n = it // (C * Q)
        c = (it // Q) % C
        lo = (it % Q) * L
        e = min(S, lo + L)
        _dx(dy[n, c, lo:e], x[n, c, lo:e], dx[n, c, lo:e], A[c], B[c], Cc[c], m[c])


def _dx_tiled(dy, x, m, A, B, Cc, dx):
    _tiled_dx(dy, x, m, A, B, Cc, dx, TILE)


@_pjit
def _dx_blocks(dy, x, m, A, B, Cc, dx):
    N, C, S = x.shape
    W = C * S
    R, RL, JB = _wide_split(N, W)
    d2 = dy.reshape(N, W)
    x2 = x.reshape(N, W)
    o2 = dx.reshape(N, W)
    mw = np.empty(W, m.dtype)
    aw = np.empty(W, m.dtype)
    bw = np.empty(W, m.dtype)
    cw = np.empty(W, m.dtype)
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
                outr[j] = narrow(outr, widen(dr[j]) * av[j] + (widen(xr[j]) - mv[j]) * bv[j] + cv[j])


# the schedules of the per-channel passes, by _channel_schedule's kind
_ROWS, _PIECES, _TILED, _BLOCKS = range(4)
_CHANNEL_SUMS = (_channel_sums(0), _channel_sums(1), _channel_sums(2))  # [mode][kind]
_CHANNEL_AFFINE = (_affine_rows, _affine_pieces, _affine_tiled, _affine_blocks)
_CHANNEL_DX = (_dx_rows, _dx_pieces, _dx_tiled, _dx_blocks)


def _flat_view(N, S):
    """Whether (N, C, S) data take the schedules of the flattened (N, C*S) view (WIDE_S, FLAT_S)."""
    return S < WIDE_S or (S < FLAT_S and N >= S)


def _act_flat_view(N, S):
    """Whether the act_ kernels of (N, C, S) data take the flattened view (ACT_FLAT_S, ACT_FLAT_N)."""
    return _flat_view(N, S) or (S < ACT_FLAT_S and N >= ACT_FLAT_N)


def _channel_schedule(N, C, S):
    """Which schedule the per-channel sums and passes take for (N, C, S) data: (n, c) rows with one or more
    pieces each, or the flattened (N, C*S) view in tiles of whole rows (a row fits in one column block) or in
    blocks of rows and columns."""
    if not _flat_view(N, S):
        return _ROWS if row_split(N, C, S)[0] == 1 else _PIECES
    return _TILED if wide_split(N, C * S)[2] == 1 else _BLOCKS


# The dispatchers' predicates (plain Python: they choose which schedule to compile and call)

def _fused_channels(N, C, S, itemsize, arrays):
    return not _flat_view(N, S) and C >= MIN_SETS and N * S * itemsize * arrays <= FUSED_BYTES


def _column_tasks(N, C, S):
    """Column tasks of CHUNK // S whole channels on the flattened (N, C*S) view, or 0 if there are too few."""
    T = -(-C // max(1, CHUNK // S))
    return T if _flat_view(N, S) and T >= WIDE_TASKS else 0


def _small_view(N, C, S, itemsize):
    """Whether a flattened (N, C*S) input is small enough that every task sums all of it (see SMALL_BYTES)."""
    return _flat_view(N, S) and N * C * S * itemsize <= SMALL_BYTES


@_jit
def _channel_of_columns(s1, s2, c, S):
    """Channel c's sums from its S column sums, in column order."""
    a1 = 0.0
    a2 = 0.0
    for i in range(c * S, (c + 1) * S):
        a1 += s1[i]
        a2 += s2[i]
    return a1, a2


def _column_sums_of(mode):
    """Float64 sums down columns l0..l0+L of a flattened (N, W) view, in row order, with the integrands of the
    per-channel sums (mode 0: d = a - ref -> sum d, sum d*d; mode 1: sum a, sum a*(b - ref)), ``mode`` compiled in
    as in _channel_sums. Four rows per sweep: a quarter of the loads and stores of the column sums, which bound
    this loop."""

    @_jit
    def column_sums(a2, b2, l0, L, ref):
        N = a2.shape[0]
        s1 = np.empty(L)
        s2 = np.empty(L)
        for j in range(L):
            s1[j] = 0.0
            s2[j] = 0.0
        for n in range(0, N - N % 4, 4):
            a0 = a2[n, l0:l0 + L]
            a1 = a2[n + 1, l0:l0 + L]
            a2_ = a2[n + 2, l0:l0 + L]
            a3 = a2[n + 3, l0:l0 + L]
            if mode == 0:
                for j in range(L):
                    d0 = np.float64(widen(a0[j])) - ref[j]
                    d1 = np.float64(widen(a1[j])) - ref[j]
                    d2 = np.float64(widen(a2_[j])) - ref[j]
                    d3 = np.float64(widen(a3[j])) - ref[j]
                    s1[j] += (d0 + d1) + (d2 + d3)
                    s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            else:
                b0 = b2[n, l0:l0 + L]
                b1 = b2[n + 1, l0:l0 + L]
                b2_ = b2[n + 2, l0:l0 + L]
                b3 = b2[n + 3, l0:l0 + L]
                for j in range(L):
                    g0 = np.float64(widen(a0[j]))
                    g1 = np.float64(widen(a1[j]))
                    g2 = np.float64(widen(a2_[j]))
                    g3 = np.float64(widen(a3[j]))
                    rj = ref[j]
                    s1[j] += (g0 + g1) + (g2 + g3)
                    s2[j] += ((g0 * (np.float64(widen(b0[j])) - rj) + g1 * (np.float64(widen(b1[j])) - rj))
                              + (g2 * (np.float64(widen(b2_[j])) - rj) + g3 * (np.float64(widen(b3[j])) - rj)))
        for n in range(N - N % 4, N):
            if mode == 0:
                _add_sq_terms(a2[n, l0:l0 + L], ref, s1, s2)
            else:
                _add_dot_terms(a2[n, l0:l0 + L], b2[n, l0:l0 + L], ref, s1, s2)
        return s1, s2

    return column_sums


_column_sq_sums = _column_sums_of(0)
_column_dot_sums = _column_sums_of(1)


@_jit
def _forward_columns(x2, y2, S, c0, c1, n0, n1, write, eps, w, b, has_w, has_b, mean, rstd):
    """batchnorm forward of channels c0..c1 on the flattened view (N, C*S): column sums over every row, the
    statistics (stored if ``write``), then the apply on rows n0..n1."""
    N = x2.shape[0]
    l0 = c0 * S
    L = (c1 - c0) * S
    p = np.empty(L)
    for j in range(L):
        p[j] = _pivot(widen(x2[0, l0 + j // S * S]))
    s1, s2 = _column_sq_sums(x2, x2, l0, L, p)
    m = np.empty(L, mean.dtype)
    sc = np.empty(L, mean.dtype)
    sh = np.empty(L, mean.dtype)
    for c in range(c1 - c0):
        a1, a2 = _channel_of_columns(s1, s2, c, S)
        m64, r64 = _finish(p[c * S], a1, a2, N * S, eps)
        mt = mean.dtype.type(m64)
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
            yr[j] = narrow(yr, (widen(xr[j]) - m[j]) * sc[j] + sh[j])


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
    s1, s2 = _column_dot_sums(dy2, x2, l0, L, ref)
    m = np.empty(L, mean.dtype)
    A = np.empty(L, mean.dtype)
    B = np.empty(L, mean.dtype)
    Cc = np.empty(L, mean.dtype)
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
            outr[j] = narrow(outr, widen(dr[j]) * A[j] + (widen(xr[j]) - m[j]) * B[j] + Cc[j])


# BatchNorm training's schedules: one compiled function each, so that a first call compiles only the one its
# shape takes (numba compiles a function whole, every branch of it; the dispatchers below choose in Python).

@_pjit
def _bn_forward_fused(x, w, b, has_w, has_b, eps, y, mean, rstd, ahead):
    """One channel per work item: its rows are still in L2 for the apply pass. The loops index x[n, c, j] rather
    than take a view of each row: a view per row of 196 values made this path 1.5x slower."""
    N, C, S = x.shape
    cnt = N * S
    xf = x.reshape(N * C * S)
    t = mean.dtype.type
    for c in prange(C):
        p = _pivot(widen(x[0, c, 0]))
        s1 = 0.0
        s2 = 0.0
        for n in range(1, min(ahead, N)):
            _prefetch_run(xf, (n * C + c) * S, S)
        for n in range(N):
            if n + ahead < N:
                _prefetch_run(xf, ((n + ahead) * C + c) * S, S)
            for j in range(S):
                d = np.float64(widen(x[n, c, j])) - p
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
                y[n, c, j] = narrow(y, (widen(x[n, c, j]) - mc) * sct + sht)


@_pjit
def _bn_forward_columns(x, w, b, has_w, has_b, eps, y, mean, rstd, T):
    N, C, S = x.shape
    k = CHUNK // S
    x2 = x.reshape(N, C * S)
    y2 = y.reshape(N, C * S)
    for t in prange(T):
        _forward_columns(x2, y2, S, t * k, min(C, (t + 1) * k), 0, N, True, eps, w, b, has_w, has_b, mean, rstd)


@_pjit
def _bn_forward_small(x, w, b, has_w, has_b, eps, y, mean, rstd):
    N, C, S = x.shape
    x2 = x.reshape(N, C * S)
    y2 = y.reshape(N, C * S)
    RL = _cdiv(N, SMALL_TASKS)
    for t in prange(SMALL_TASKS):
        _forward_columns(x2, y2, S, 0, C, min(N, t * RL), min(N, (t + 1) * RL), t == 0, eps, w, b, has_w, has_b,
                         mean, rstd)


@_jit
def _pivots(x):
    C = x.shape[1]
    piv = np.empty(C)
    for c in range(C):
        piv[c] = _pivot(widen(x[0, c, 0]))
    return piv


@_jit
def _forward_coefs(piv, sums, cnt, eps, w, b, has_w, has_b, mean, rstd):
    """The statistics (stored) and the apply pass's (scale, shift) per channel, from the shifted sums."""
    C = piv.shape[0]
    sc = np.empty(C, mean.dtype)
    sh = np.empty(C, mean.dtype)
    for c in range(C):
        m64, r64 = _finish(piv[c], sums[c, 0], sums[c, 1], cnt, eps)
        mean[c] = m64
        rstd[c] = r64
        s = r64 * (np.float64(w[c]) if has_w else 1.0)
        sc[c] = s
        sh[c] = (np.float64(b[c]) if has_b else 0.0) + (np.float64(mean[c]) - m64) * s
    return sc, sh


@_pjit
def _bn_backward_fused(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, ahead):
    """As _bn_forward_fused: one channel per work item, indexed without a view per row."""
    N, C, S = x.shape
    cnt = N * S
    t = mean.dtype.type
    dyf = dy.reshape(N * C * S)
    xf = x.reshape(N * C * S)
    for c in prange(C):
        mc = mean[c]
        m64 = np.float64(mc)
        r = np.float64(rstd[c])
        s1 = 0.0
        s2 = 0.0
        for n in range(1, min(ahead, N)):
            _prefetch_run(dyf, (n * C + c) * S, S)
            _prefetch_run(xf, (n * C + c) * S, S)
        for n in range(N):
            if n + ahead < N:
                _prefetch_run(dyf, ((n + ahead) * C + c) * S, S)
                _prefetch_run(xf, ((n + ahead) * C + c) * S, S)
            for j in range(S):
                g = np.float64(widen(dy[n, c, j]))
                s1 += g
                s2 += g * (np.float64(widen(x[n, c, j])) - m64)
        wc = np.float64(w[c]) if has_w else 1.0
        A = t(r * wc)
        B = t(-r * r * (r * wc * s2 / cnt))
        Cc = t(-r * (wc * s1 / cnt))
        for n in range(N):
            for j in range(S):
                dx[n, c, j] = narrow(dx, widen(dy[n, c, j]) * A + (widen(x[n, c, j]) - mc) * B + Cc)
        if want_db:
            db[c] = s1
        if want_dw:
            dw[c] = r * s2


@_pjit
def _bn_backward_columns(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db, T):
    N, C, S = x.shape
    k = CHUNK // S
    d2 = dy.reshape(N, C * S)
    x2 = x.reshape(N, C * S)
    o2 = dx.reshape(N, C * S)
    for t in prange(T):
        _backward_columns(d2, x2, o2, S, t * k, min(C, (t + 1) * k), 0, N, True, mean, rstd, w, has_w, dw, db,
                          want_dw, want_db)


@_pjit
def _bn_backward_small(dy, x, mean, rstd, w, has_w, dx, dw, db, want_dw, want_db):
    N, C, S = x.shape
    d2 = dy.reshape(N, C * S)
    x2 = x.reshape(N, C * S)
    o2 = dx.reshape(N, C * S)
    RL = _cdiv(N, SMALL_TASKS)
    for t in prange(SMALL_TASKS):
        _backward_columns(d2, x2, o2, S, 0, C, min(N, t * RL), min(N, (t + 1) * RL), t == 0, mean, rstd, w,
                          has_w, dw, db, want_dw, want_db)


@_jit
def _float64(a):
    out = np.empty(a.shape[0])
    for c in range(a.shape[0]):
        out[c] = a[c]
    return out


@_jit
def _backward_coefs(sums, cnt, mean, rstd, w, has_w, dw, db, want_dw, want_db):
    """The dx pass's (A, B, Cc) per channel and the parameter gradients (stored), from the sums."""
    C = sums.shape[0]
    A = np.empty(C, mean.dtype)
    B = np.empty(C, mean.dtype)
    Cc = np.empty(C, mean.dtype)
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
    return A, B, Cc


@_jit
def _infer_coefs(w, b, has_w, has_b, running_mean, running_var, eps):
    C = running_mean.shape[0]
    sc = np.empty(C, running_mean.dtype)
    sh = np.empty(C, running_mean.dtype)
    for c in range(C):
        s = (np.float64(w[c]) if has_w else 1.0) / np.sqrt(np.float64(running_var[c]) + eps)
        sc[c] = s
        sh[c] = np.float64(b[c]) if has_b else 0.0
    return sc, sh


@_jit
def _infer_dx_scale(rstd, w, has_w):
    C = rstd.shape[0]
    A = np.empty(C, rstd.dtype)
    for c in range(C):
        A[c] = np.float64(rstd[c]) * (np.float64(w[c]) if has_w else 1.0)
    return A


@_jit
def _channel_param_grads(sums, rstd, dw, db, want_dw, want_db):
    for c in range(sums.shape[0]):
        if want_db:
            db[c] = sums[c, 0]
        if want_dw:
            dw[c] = np.float64(rstd[c]) * sums[c, 1]


# --- the contract's callables -----------------------------------------------------------------------------------

def batchnorm_forward(x, weight, bias, eps, y, mean, rstd):
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    b, hb = _opt(bias, mean)
    N, C, S = x.shape
    if _fused_channels(N, C, S, x.itemsize, 1):
        _bn_forward_fused(x, w, b, hw, hb, eps, y, mean, rstd, _runs_ahead(S * x.itemsize, x.nbytes))
        return
    T = _column_tasks(N, C, S)
    if T:
        _bn_forward_columns(x, w, b, hw, hb, eps, y, mean, rstd, T)
    elif _small_view(N, C, S, x.itemsize):
        _bn_forward_small(x, w, b, hw, hb, eps, y, mean, rstd)
    else:
        kind = _channel_schedule(N, C, S)
        piv = _pivots(x)
        sums = _CHANNEL_SUMS[0][kind](x, x, piv)
        sc, sh = _forward_coefs(piv, sums, N * S, eps, w, b, hw, hb, mean, rstd)
        _CHANNEL_AFFINE[kind](x, mean, sc, sh, y)


def channel_forward_infer(x, weight, bias, running_mean, running_var, eps, y):
    _sync_threads(x.size)
    w, hw = _opt(weight, running_mean)
    b, hb = _opt(bias, running_mean)
    sc, sh = _infer_coefs(w, b, hw, hb, running_mean, running_var, eps)
    _CHANNEL_AFFINE[_channel_schedule(*x.shape)](x, running_mean, sc, sh, y)


def batchnorm_backward(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    dw, wdw = _opt(dweight, mean)
    db, wdb = _opt(dbias, mean)
    N, C, S = x.shape
    if _fused_channels(N, C, S, x.itemsize, 2):
        _bn_backward_fused(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb,
                           _runs_ahead(2 * S * x.itemsize, x.nbytes))  # dy's and x's runs
        return
    T = _column_tasks(N, C, S)
    if T:
        _bn_backward_columns(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb, T)
    elif _small_view(N, C, S, x.itemsize):
        _bn_backward_small(dy, x, mean, rstd, w, hw, dx, dw, db, wdw, wdb)
    else:
        kind = _channel_schedule(N, C, S)
        sums = _CHANNEL_SUMS[1][kind](dy, x, _float64(mean))
        A, B, Cc = _backward_coefs(sums, N * S, mean, rstd, w, hw, dw, db, wdw, wdb)
        _CHANNEL_DX[kind](dy, x, mean, A, B, Cc, dx)


def channel_backward_infer(dy, x, mean, rstd, weight, dx, dweight, dbias):
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    dw, wdw = _opt(dweight, mean)
    db, wdb = _opt(dbias, mean)
    kind = _channel_schedule(*x.shape)
    scale = _infer_dx_scale(rstd, w, hw)  # dx = dy * rstd * weight
    if wdw or wdb:  # dx in the pass of the gradients' sums, one read of dy
        _channel_param_grads(_CHANNEL_SUMS[2][kind](dy, x, _float64(mean), scale, dx), rstd, dw, db, wdw, wdb)
    else:
        zero = np.zeros(x.shape[1], rstd.dtype)
        _CHANNEL_AFFINE[kind](dy, zero, scale, zero, dx)


# --- the split directions (normkit.contract): reductions and elementwise passes of the fused kernels above --------

@_jit
def _stats_finish(piv, sums, cnt, mean, m2):
    for c in range(piv.shape[0]):
        s1 = sums[c, 0]
        d = s1 / cnt
        v = sums[c, 1] - s1 * d
        if v < 0.0:  # rounding; a NaN stays NaN
            v = 0.0
        mean[c] = piv[c] + d
        m2[c] = v


def batchnorm_stats(x, mean, m2):
    _sync_threads(x.size)
    piv = _pivots(x)
    sums = _CHANNEL_SUMS[0][_channel_schedule(*x.shape)](x, x, piv)  # float64 d = x - pivot and d*d, in order
    _stats_finish(piv, sums, x.shape[0] * x.shape[2], mean, m2)


def batchnorm_apply(x, scale, shift, y):
    _sync_threads(x.size)
    # y = (x - 0) * scale + shift: the per-channel affine pass of inference, with no mean to subtract
    _CHANNEL_AFFINE[_channel_schedule(*x.shape)](x, np.zeros(x.shape[1], scale.dtype), scale, shift, y)


def batchnorm_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat):
    _sync_threads(x.size)
    sums = _CHANNEL_SUMS[1][_channel_schedule(*x.shape)](dy, x, mean)  # float64 sum(dy), sum(dy * (x - mean))
    _channel_param_grads(sums, rstd, sum_dy_xhat, sum_dy, True, True)


def batchnorm_backward_apply(dy, x, a, b, d, dx):
    _sync_threads(x.size)
    # dx = dy * a + (x - 0) * b + d: the fused backward's elementwise pass
    _CHANNEL_DX[_channel_schedule(*x.shape)](dy, x, np.zeros(x.shape[1], a.dtype), a, b, d, dx)


# --- fused activations (normkit.contract): statistics and coefficients here, the element passes _common.act_rows'
# over (n, c) rows (forward: one read of x for the statistics, one fused pass; backward: the gradient sums, then
# dx, each a read of dy and x): the simplest of the schedules above; the shapes of the flattened view take the plain
# kernels and _act_flat's passes instead. The statistics are the plain forward's (its _CHANNEL_SUMS schedule for
# the shape).

@_jit
def _bn_act_coefs(piv, sums, cnt, w, b, has_w, has_b, eps, mean, rstd):
    """The batch statistics (stored) from the pivots and shifted sums, and act_rows' forward coefficients (m,
    scale, shift) per channel, (1, C) each."""
    C = piv.shape[0]
    m = np.empty((1, C), mean.dtype)
    sc = np.empty((1, C), mean.dtype)
    sh = np.empty((1, C), mean.dtype)
    for c in range(C):
        m64, r64 = _finish(piv[c], sums[c, 0], sums[c, 1], cnt, eps)
        mean[c] = m64
        rstd[c] = r64
        m[0, c] = mean[c]
        s = r64 * (np.float64(w[c]) if has_w else 1.0)
        sc[0, c] = s
        sh[0, c] = (np.float64(b[c]) if has_b else 0.0) + (np.float64(mean[c]) - m64) * s
    return m, sc, sh


@_jit
def _infer_act_coefs(w, b, has_w, has_b, running_mean, running_var, eps):
    """act_rows' forward coefficients per channel from running statistics, (1, C) each."""
    C = running_mean.shape[0]
    m = np.empty((1, C), running_mean.dtype)
    sc = np.empty((1, C), running_mean.dtype)
    sh = np.empty((1, C), running_mean.dtype)
    for c in range(C):
        m[0, c] = running_mean[c]
        sc[0, c] = (np.float64(w[c]) if has_w else 1.0) / np.sqrt(np.float64(running_var[c]) + eps)
        sh[0, c] = np.float64(b[c]) if has_b else 0.0
    return m, sc, sh


@_jit
def _channel_z_coefs(mean, rstd, w, b, has_w, has_b):
    """Per channel, (1, C) each: mean, rstd in float64, and z = (x - mean) * zs + zb's zs and zb."""
    C = mean.shape[0]
    m = np.empty((1, C), mean.dtype)
    r = np.empty((1, C))
    zs = np.empty((1, C), mean.dtype)
    zb = np.empty((1, C), mean.dtype)
    for c in range(C):
        m[0, c] = mean[c]
        r[0, c] = rstd[c]
        zs[0, c] = np.float64(rstd[c]) * (np.float64(w[c]) if has_w else 1.0)
        zb[0, c] = b[c] if has_b else 0.0
    return m, r, zs, zb


@_jit
def _channel_dx_coefs(sums, cnt, rstd, w, has_w, training):
    """dx = g * A + (x - m) * B + Cc per channel, (1, C) each, from act_rows' sums: through the batch statistics
    (``training``, over cnt = N * S values a channel), or dx = g * w * rstd (running statistics; ``sums``
    unused)."""
    N = sums.shape[0]
    C = rstd.shape[0]
    t = rstd.dtype.type
    A = np.empty((1, C), rstd.dtype)
    B = np.empty((1, C), rstd.dtype)
    Cc = np.empty((1, C), rstd.dtype)
    for c in range(C):
        rc = np.float64(rstd[c])
        wc = np.float64(w[c]) if has_w else 1.0
        A[0, c] = rc * wc
        B[0, c] = 0.0
        Cc[0, c] = 0.0
        if training:
            s1 = 0.0
            s2 = 0.0
            for n in range(N):
                s1 += sums[n, c, 0]
                s2 += sums[n, c, 1]
            B[0, c] = t(-rc * rc * (rc * wc * s2 / cnt))
            Cc[0, c] = t(-rc * (wc * s1 / cnt))
    return A, B, Cc


@per_activation
def _act_flat(a):
    """BatchNorm's act_ element passes for activation ``a`` on the flattened (N, C*S) view, for the shapes that
    take it (_act_flat_view), where act_rows' (n, c) work items hold S values each (one for BatchNorm1d's (N, C)): there
    the fused kernels ran 10-75x slower than the plain ones ((2048, 256, 1) ReLU backward 16 ms against 0.15). So
    the plain kernels run, with these around them: (the activation in place, g = dy * act'(z) with per-column
    coefficients)."""

    @_pjit
    def apply(y2, x2, slope):
        for n in prange(y2.shape[0]):
            yr = y2[n]
            xr = x2[n]
            for j in range(yr.shape[0]):
                yr[j] = _act(yr[j], xr[j], a, slope)

    @_pjit
    def grad(dy2, x2, m, zs, zb, slope, g2):
        for n in prange(x2.shape[0]):
            dyr = dy2[n]
            xr = x2[n]
            gr = g2[n]
            for j in range(xr.shape[0]):
                gr[j] = _gact(dyr[j], (xr[j] - m[j]) * zs[j] + zb[j], xr[j], a, slope)

    return apply, grad


def _flat(a):
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])


def batchnorm_act_forward(x, weight, bias, eps, activation, slope, y, mean, rstd):
    if _act_flat_view(x.shape[0], x.shape[2]):  # see _act_flat
        batchnorm_forward(x, weight, bias, eps, y, mean, rstd)
        _act_flat(activation)[0](_flat(y), _flat(x), slope)
        return
    _sync_threads(x.size)
    w, hw = _opt(weight, mean)
    b, hb = _opt(bias, mean)
    piv = _pivots(x)
    sums = _CHANNEL_SUMS[0][_channel_schedule(*x.shape)](x, x, piv)  # the plain forward's statistics pass
    m, sc, sh = _bn_act_coefs(piv, sums, x.shape[0] * x.shape[2], w, b, hw, hb, eps, mean, rstd)
    act_rows(activation)[0](x, m, sc, sh, y, slope)


def channel_act_forward_infer(x, weight, bias, running_mean, running_var, eps, activation, slope, y):
    if _act_flat_view(x.shape[0], x.shape[2]):  # see _act_flat
        channel_forward_infer(x, weight, bias, running_mean, running_var, eps, y)
        _act_flat(activation)[0](_flat(y), _flat(x), slope)
        return
    _sync_threads(x.size)
    w, hw = _opt(weight, running_mean)
    b, hb = _opt(bias, running_mean)
    m, sc, sh = _infer_act_coefs(w, b, hw, hb, running_mean, running_var, eps)
    act_rows(activation)[0](x, m, sc, sh, y, slope)


def _act_backward(training):
    """act_backward (``training``: through the batch statistics) or act_backward_infer (running statistics); the
    latter sums the gradients of g only when dweight or dbias is wanted."""
    def kernel(dy, x, mean, rstd, weight, bias, activation, slope, dx, dweight, dbias):
        _sync_threads(x.size)
        w, hw = _opt(weight, mean)
        b, hb = _opt(bias, mean)
        m, r, zs, zb = _channel_z_coefs(mean, rstd, w, b, hw, hb)
        S = x.shape[2]
        if _act_flat_view(x.shape[0], S):  # see _act_flat: g, then the plain backward of it
            g = np.empty_like(dy)
            _act_flat(activation)[1](_flat(dy), _flat(x), np.repeat(m[0], S), np.repeat(zs[0], S),
                                     np.repeat(zb[0], S), slope, _flat(g))
            (batchnorm_backward if training else channel_backward_infer)(g, x, mean, rstd, weight, dx, dweight,
                                                                          dbias)
            return
        dw, wdw = _opt(dweight, mean)
        db, wdb = _opt(dbias, mean)
        _, sums_pass, dx_pass = act_rows(activation)
        sums = sums_pass(dy, x, m, zs, zb, slope, dx) if training or wdw or wdb else _NO_SUMS
        A, B, Cc = _channel_dx_coefs(sums, x.shape[0] * x.shape[2], rstd, w, hw, training)
        dx_pass(dy, x, m, zs, zb, A, B, Cc, dx, slope)
        if wdw or wdb:
            _param_grads(sums, r, dw, db, wdw, wdb)
    kernel.__name__ = kernel.__qualname__ = "batchnorm_act_backward" if training else "channel_act_backward_infer"
    return kernel


_NO_SUMS = np.zeros((0, 0, 2))
batchnorm_act_backward = _act_backward(True)
channel_act_backward_infer = _act_backward(False)
