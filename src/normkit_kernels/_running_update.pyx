# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""normkit.running's update of one set of running statistics, compiled: its NumPy form makes about twenty NumPy
calls on (C,) vectors, ~22 µs a BatchNorm training call (29 with the torch frontend's views), a fifth of torch's
whole forward + backward at (8, 64, 8, 8); this call costs ~1 µs.

The arithmetic is the NumPy form's, operation for operation and in its order, so the two agree to the bit
(tests/test_running.py; a NaN's sign and payload aside, where the compiler may swap the operands of an add): the
variance ``1/rstd^2 - eps`` in float64, clamped at 0 and scaled by ``correction`` (count/(count-1), computed by
the caller as the NumPy form computes it); then ``(1 - momentum) * running`` in the buffers' dtype (NumPy casts the
Python float to a float32 buffer's dtype) plus ``momentum * batch`` in float64, rounded once to the buffers' dtype;
all of running_mean first, then running_var, as NumPy writes them (the two may share memory). setup.py compiles it
without the kernels' reassociation flags and without contracting a multiply and an add into an FMA, either of
which would change those roundings.

It is part of normkit's core, not a kernel: it sits in normkit_kernels because a source checkout's ``normkit/``
directory, imported before the installed package from the checkout, would hide a binary built there."""

from cython cimport floating


def update(floating[::1] running_mean not None, floating[::1] running_var not None,
           const floating[::1] mean not None, const floating[::1] rstd not None, double eps, double trusted,
           double correction, double momentum):
    """Update the buffers in place and return True; or return False, writing nothing, when the arrays are not all
    (C,) or a channel's ``1/rstd^2 - eps`` is below ``trusted`` (normkit.running's eps * _TRUSTED) or NaN
    (normkit.running.batch_variance recomputes such a channel's variance from the data). Buffers of another dtype
    or layout are refused by the call itself (TypeError or ValueError)."""
    cdef Py_ssize_t c = running_mean.shape[0], i
    if running_var.shape[0] != c or mean.shape[0] != c or rstd.shape[0] != c:
        return False
    cdef double r, v
    for i in range(c):
        r = rstd[i]
        v = 1.0 / (r * r) - eps
        if not v >= trusted:
            return False
    cdef floating keep = <floating>(1.0 - momentum)
    for i in range(c):
        running_mean[i] = <floating>(<double>(keep * running_mean[i]) + momentum * <double>mean[i])
    for i in range(c):
        r = rstd[i]
        v = 1.0 / (r * r) - eps
        v = (v if v > 0.0 else 0.0) * correction
        running_var[i] = <floating>(<double>(keep * running_var[i]) + momentum * v)
    return True
