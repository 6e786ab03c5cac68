"""The kernel contract: what every backend (built-in or plugin) implements.

A backend's kernels module exposes ``KERNELS``, a dict mapping ``(op, direction, dtype)`` to a callable, e.g.
``KERNELS[("groupnorm", "forward", "float32")]``. normkit's frontends validate all arguments, make every array
C-contiguous with the kernel's dtype, allocate every output, and then call the kernel positionally. A kernel only
computes: it writes its outputs in place, returns nothing, and never writes anywhere else.

Shapes: ``x``, ``dy``, ``y``, ``dx`` are (N, C, S) for batchnorm / instancenorm / groupnorm (S is the product of the
spatial dims, 1 for (N, C) inputs) and (M, K) for layernorm (K = prod(normalized_shape)). All arrays have the
kernel's dtype, including ``mean``/``rstd``. ``weight``/``bias`` may be ``None`` (no affine); in backward
``dweight``/``dbias`` are ``None`` when that gradient is not wanted. ``rstd`` is ``1 / sqrt(var + eps)`` with the
biased (population) variance. Statistics must not be computed as E[x^2] - E[x]^2 in working precision.

=========================  =========================================================================
(op, direction)            positional arguments
=========================  =========================================================================
batchnorm, forward         x, weight, bias, eps, y, mean[C], rstd[C]
batchnorm, forward_infer   x, weight, bias, running_mean[C], running_var[C], eps, y
batchnorm, backward        dy, x, mean[C], rstd[C], weight, dx, dweight, dbias
batchnorm, backward_infer  dy, x, mean[C], rstd[C], weight, dx, dweight, dbias
instancenorm, forward      x, weight, bias, eps, y, mean[N, C], rstd[N, C]
instancenorm, forward_infer  same as batchnorm's
instancenorm, backward     dy, x, mean[N, C], rstd[N, C], weight, dx, dweight, dbias
instancenorm, backward_infer  same as batchnorm's
groupnorm, forward         x, num_groups, weight, bias, eps, y, mean[N, G], rstd[N, G]
groupnorm, backward        dy, x, num_groups, mean[N, G], rstd[N, G], weight, dx, dweight, dbias
layernorm, forward         x, weight[K], bias[K], eps, y, mean[M], rstd[M]
layernorm, backward        dy, x, mean[M], rstd[M], weight[K], dx, dweight[K], dbias[K]
=========================  =========================================================================

``backward`` is the gradient of a training-mode forward (statistics depend on x):
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over each normalized set, with ``g = dy * weight`` and
``xhat = (x - mean) * rstd``; ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` per channel (per element of
the normalized shape for layernorm). ``backward_infer`` is the gradient of an inference-mode forward, where
``mean``/``rstd`` came from running statistics and are constants: ``dx = dy * weight * rstd``.

The contract is versioned; a backend declares the version it targets and normkit refuses other versions.
Optional module attributes: ``set_num_threads(n)`` (normkit calls it whenever the user sets a thread count, and
once when the module is loaded) and ``INFO`` (a dict of short strings shown by ``normkit list``).
"""

CONTRACT_VERSION = 1

OPS = ("batchnorm", "layernorm", "instancenorm", "groupnorm")

DTYPES = ("float32", "float64")

# Which directions each op has. forward/backward are required for a backend to claim an op; the *_infer
# directions exist only where the op has running statistics.
DIRECTIONS = {
    "batchnorm": ("forward", "forward_infer", "backward", "backward_infer"),
    "instancenorm": ("forward", "forward_infer", "backward", "backward_infer"),
    "groupnorm": ("forward", "backward"),
    "layernorm": ("forward", "backward"),
}


def kernel_table(functions, dtypes=DTYPES) -> dict:
    """``KERNELS`` for a backend whose functions take every dtype: ``{(op, direction): f}`` becomes
    ``{(op, direction, dtype): f}`` for each dtype."""
    return {(op, direction, dtype): f for (op, direction), f in functions.items() for dtype in dtypes}
