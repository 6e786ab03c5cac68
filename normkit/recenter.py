"""Backward of float32 data far from zero against its spread: both frontends' training backward.

The kernels compute a float32 input's statistics in float64, but save them in float32 (the contract's statistics
dtype, PyTorch's too), so the saved mean is rounded by up to ``|mean| * 2**-24``, and backward, which recomputes
``xhat = (x - mean) * rstd`` from it, carries that rounding as an error of ``|mean| * rstd * 2**-24`` in every
xhat: 1e-3 of dx at mean 1e6 and std 1, 16% at mean 1e8 and std 8, and a fused ReLU's recomputed input changing
sign next to zero. The gradient is the same for data shifted by a constant per set, so where a set's mean is
more than :data:`OFFSET` standard deviations from zero the frontends hand the backward kernel ``x - mean`` (in
float32: exact where x is within a factor 2 of the mean, else rounded by half an ulp of the difference) and that
shifted data's own mean, summed in float64 and small, whose rounding no longer matters. This costs one pass over
the data, only for such calls. The test comes with the statistics where the forward kernel was an address kernel
that returns the largest ``|mean| * rstd`` (the Cython backend's; normkit.contract); elsewhere it is
:func:`needed`, two NumPy calls on the statistics (in the torch frontend, right after autograd's engine, ~9 us of
a small call's time).
"""

from __future__ import annotations

import numpy as np

from .contract import OpSpec

# |mean| * rstd above which the float32 mean's rounding (2**-24 of it) may pass 2**-20 of a standard deviation
OFFSET = 16.0


def needed(mean: np.ndarray, rstd: np.ndarray) -> bool:
    """Whether a set's saved float32 mean lies more than OFFSET of its standard deviations from zero."""
    v = mean * rstd
    # The sum of squares bounds every set's: for most batches two NumPy calls decide (this runs on every backward,
    # where each costs microseconds, the Python around it being cold). fmax: a NaN does not hide the other sets.
    return not np.vdot(v, v) <= OFFSET * OFFSET and bool(np.fmax.reduce(np.abs(v), axis=None) > OFFSET)


def shifted(spec: OpSpec, x: np.ndarray, mean: np.ndarray, groups: int | None, nhwc: bool = False,
            out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x - mean`` per set (x's kernel shape and layout: (N, S, C) with ``nhwc``), written into ``out`` if given,
    and the float32 mean of it, summed in float64 (``mean``'s shape)."""
    out = np.empty_like(x) if out is None else out
    xk, ok = (x.transpose(0, 2, 1), out.transpose(0, 2, 1)) if nhwc else (x, out)
    np.subtract(xk, spec.per_element(mean, xk.shape), out=ok)
    return out, spec.as_sets(ok, groups).mean(axis=-1, dtype=np.float64).astype(np.float32).reshape(mean.shape)
