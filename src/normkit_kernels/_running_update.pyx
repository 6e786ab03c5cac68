# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""normkit.running's update of one set of running statistics, compiled: its NumPy form makes about twenty ufunc
calls on (C,) vectors, ~25 µs a training call of BatchNorm (8, 64, 8, 8), a quarter of torch's whole forward +
backward there; this loop costs ~1 µs.

The arithmetic is the NumPy form's, operation for operation, so the two agree to the bit (tests/test_running.py):
the variance ``1/rstd^2 - eps`` in float64, clamped at 0 and scaled by count/(count-1); then
``(1 - momentum) * running`` in the buffers' dtype (NumPy casts the Python float to a float32 buffer's dtype)
plus ``momentum * batch`` in float64, rounded once to the buffers' dtype. setup.py compiles it without the
kernels' reassociation flags, which would change those roundings.

It is part of normkit's core, not a kernel: it sits in normkit_kernels because a source checkout's ``normkit/``
directory, imported before the installed package from the checkout, would hide a binary built there."""

from cython cimport floating


def update(floating[::1] running_mean, floating[::1] running_var, const floating[::1] mean,
           const floating[::1] rstd, double eps, double count, double momentum):
    """Update the buffers in place and return True; or return False, writing nothing, when the arrays are not all
    (C,) or a channel's ``1/rstd^2 - eps`` is below eps/16 or NaN (normkit.running.batch_variance recomputes such
    a channel's variance from the data). Buffers of another dtype or layout are refused by the call itself
    (TypeError or ValueError)."""
    cdef Py_ssize_t c = running_mean.shape[0], i
    if running_var.shape[0] != c or mean.shape[0] != c or rstd.shape[0] != c:
        return False
    cdef double trusted = eps * (1.0 / 16.0), bessel = count / (count - 1.0), r, v
    for i in range(c):
        r = rstd[i]
        v = 1.0 / (r * r) - eps
        if not v >= trusted:
            return False
    cdef floating keep = <floating>(1.0 - momentum)
    for i in range(c):
        r = rstd[i]
        v = 1.0 / (r * r) - eps
        v = (v if v > 0.0 else 0.0) * bessel
        running_mean[i] = <floating>(<double>(keep * running_mean[i]) + momentum * <double>mean[i])
        running_var[i] = <floating>(<double>(keep * running_var[i]) + momentum * v)
    return True
