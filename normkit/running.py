"""Running statistics: the one place both frontends update them (torch.nn's convention)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

try:
    from normkit_kernels._running_update import update as _compiled_update
except ImportError:  # a build without it (a broken or partial one): the NumPy form, as the registry goes on without
    _compiled_update = None  # a backend that does not load

# 1/rstd^2 - eps is trusted where it is at least this fraction of eps: there the float32 rounding of rstd (a
# relative error of ~5e-7 in 1/rstd^2, i.e. of var + eps) is at most ~1e-5 of var.
_TRUSTED = 1.0 / 16.0


def batch_variance(batch_rstd: np.ndarray, eps: float, count: int,
                   exact: Optional[Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
    """The unbiased variance of each set, float64, from the saved ``rstd`` (the kernels' contract saves rstd, not
    the variance).

    ``var = 1/rstd^2 - eps`` cancels where var is not well above eps (var 1e-10 with eps 1e-3 would be +57%, and
    eps = inf gives NaN): for the channels holding such a set, ``exact(channels)`` recomputes the biased variance
    from the data (an index array in, the variances of those channels out, shaped as ``batch_rstd[..., channels]``),
    so that running_var is torch's also for nearly constant channels. That costs one more pass over those channels
    only. ``exact=None`` (a traced graph, where data-dependent indexing has no place) keeps the cancelled value.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # rstd 0 (eps = inf): inf - inf, recomputed below
        var = 1.0 / np.square(batch_rstd, dtype=np.float64) - eps
    trusted = eps * _TRUSTED
    if exact is not None and not var.min() >= trusted:  # (NaN: not)
        doubtful = ~(var >= trusted)
        channels = np.flatnonzero(doubtful if doubtful.ndim == 1 else doubtful.any(axis=0))
        var[..., channels] = exact(channels)
    return np.maximum(var, 0.0) * (count / (count - 1))


# values of the data that the exact variance widens to float64 at a time: its extra memory (a float64 copy of the
# channels at once cost 9x a constant bfloat16 channel's size, 36 GiB for a 4 GiB batch)
_PIECE = 1 << 20


def numpy_variance(x: np.ndarray, per_instance: bool,
                   widen: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`batch_variance`'s ``exact`` for an (N, C, *spatial) array of any layout and float dtype (``widen``:
    the float64 values of a piece of it, for 16-bit bit patterns; else ``astype``). Two passes (mean, then the
    squared deviations) in float64, over pieces of at most :data:`_PIECE` values."""
    to64 = widen or (lambda a: a.astype(np.float64))

    def exact(channels: np.ndarray) -> np.ndarray:
        if len(channels) * (x.size // x.shape[1]) <= _PIECE:  # small: at once
            axes = tuple(range(2, x.ndim)) if per_instance else (0, *range(2, x.ndim))
            with np.errstate(invalid="ignore", over="ignore"):  # (an inf in the data: inf - inf, NaN as it must be)
                return to64(np.take(x, channels, axis=1)).var(axis=axes)
        if per_instance:
            return np.array([[_variance(x[n, c], to64) for c in channels] for n in range(x.shape[0])],
                            np.float64).reshape(x.shape[0], len(channels))
        return np.array([_variance(x[:, c], to64) for c in channels], np.float64)
    return exact


def _variance(a: np.ndarray, to64) -> float:
    """The biased variance of all of ``a``'s values (any strides), in float64, never widening more than
    :data:`_PIECE` of them at a time."""
    def each():
        with np.nditer(a, flags=["external_loop", "buffered"], buffersize=_PIECE, order="K") as it:
            for piece in it:
                yield to64(piece)
    with np.errstate(invalid="ignore", over="ignore"):  # (an inf in the data: inf - inf, NaN as it must be)
        mean = sum(float(p.sum()) for p in each()) / a.size
        total = 0.0
        for p in each():
            d = p - mean
            total += float(np.dot(d, d))
    return total / a.size


def update_running(running_mean: np.ndarray, running_var: np.ndarray, batch_mean: np.ndarray,
                   batch_var: np.ndarray, momentum: float) -> None:
    """PyTorch's convention: running = (1 - momentum) * running + momentum * batch, ``batch_var`` unbiased (from
    :func:`batch_variance`).

    ``batch_mean``/``batch_var`` have the channel as their last axis; leading axes (instances) are averaged.
    Shared by both frontends' eager paths.
    """
    mean = batch_mean.astype(np.float64)
    var = batch_var
    if mean.ndim == 2:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    # 16-bit buffers (float16, bfloat16) are read in float64, so that the update rounds once, to their own dtype
    widen = (lambda r: r.astype(np.float64) if r.dtype.itemsize == 2 else r)
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN statistics, and a float32 buffer's overflow
        running_mean[...] = (1.0 - momentum) * widen(running_mean) + momentum * mean
        running_var[...] = (1.0 - momentum) * widen(running_var) + momentum * var


def update_from_rstd(running_mean: np.ndarray, running_var: np.ndarray, batch_mean: np.ndarray,
                     batch_rstd: np.ndarray, eps: float, count: int, momentum: float,
                     exact: Optional[Callable[[np.ndarray], np.ndarray]]) -> None:
    """:func:`update_running` with the variance of :func:`batch_variance`: the eager update of both frontends.

    The common case (float32 or float64 buffers and (C,) statistics of their dtype, C-contiguous, no channel near
    constant) runs compiled (``src/normkit_kernels/_running_update.pyx``, the same arithmetic to the bit), ~1 µs
    where the NumPy form costs ~22 on (C,) vectors; everything else takes the NumPy form."""
    if _compiled_update is not None:
        try:
            if _compiled_update(running_mean, running_var, batch_mean, batch_rstd, eps, eps * _TRUSTED,
                                count / (count - 1), momentum):
                return
        except (TypeError, ValueError):  # buffers the compiled update does not take: 16-bit, strided, mixed dtypes
            pass
    update_running(running_mean, running_var, batch_mean, batch_variance(batch_rstd, eps, count, exact), momentum)
