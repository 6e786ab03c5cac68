"""Running statistics: the one place both frontends update them (torch.nn's convention)."""

from __future__ import annotations

import numpy as np


def update_running(running_mean: np.ndarray, running_var: np.ndarray, batch_mean: np.ndarray,
                   batch_rstd: np.ndarray, eps: float, count: int, momentum: float) -> None:
    """PyTorch's convention: running = (1 - momentum) * running + momentum * batch, unbiased batch variance.

    ``batch_mean``/``batch_rstd`` have the channel as their last axis; leading axes (instances) are averaged.
    The biased variance is recovered from rstd in float64; it is clamped at 0 because rounding of rstd can make
    1/rstd^2 - eps slightly negative when var << eps. Shared by both frontends' eager paths.

    Its error is that of rstd's rounding to the statistics' dtype: relative to var + eps (float32: ~1e-7 of it),
    which is all that normalizing with the running statistics reads. The stored running_var itself is off by up
    to that much, so where var is far below eps (var 1e-10 with eps 1e-3: +57%, where torch keeps it) the buffer
    is not torch's, while the outputs computed from it are. The kernels' contract saves rstd, not the variance.
    """
    var = np.maximum(1.0 / np.square(batch_rstd.astype(np.float64)) - eps, 0.0) * (count / (count - 1))
    mean = batch_mean.astype(np.float64)
    if mean.ndim == 2:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    # 16-bit buffers (float16, bfloat16) are read in float64, so that the update rounds once, to their own dtype
    widen = (lambda r: r.astype(np.float64) if r.dtype.itemsize == 2 else r)
    running_mean[...] = (1.0 - momentum) * widen(running_mean) + momentum * mean
    running_var[...] = (1.0 - momentum) * widen(running_var) + momentum * var
