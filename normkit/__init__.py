"""normkit: fast, correct normalization kernels (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, RMSNorm).

    import normkit
    gn = normkit.get("gn")
    y = gn(x, num_groups=16, weight=w, bias=b)

``import normkit`` is light: it imports NumPy only. Backends (Numba, Cython, plugins) load when first used, and
the PyTorch frontend (:mod:`normkit.torch`) only when asked for.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .checks import ArgumentError, ArgumentTypeError, UnsupportedInputError
from .keras import BatchNormalization
from .ops import Op, Saved, UnknownOpError, add_layer_norm, add_rms_norm, get, list_ops
from .primitives import batch_normalization, moments
from .registry import (
    Backend,
    BackendInfo,
    UnknownBackendError,
    get_backend_order,
    get_num_threads,
    list_backends,
    register_backend,
    set_backend_order,
    set_num_threads,
    unregister_backend,
)

try:
    __version__ = _version("normkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ArgumentError", "ArgumentTypeError", "Backend", "BackendInfo", "BatchNormalization", "Op", "Saved",
    "UnknownBackendError", "UnknownOpError", "UnsupportedInputError",
    "__version__", "add_layer_norm", "add_rms_norm", "batch_normalization", "get", "get_backend_order",
    "get_num_threads", "list_backends", "list_ops", "moments",
    "register_backend", "set_backend_order", "set_num_threads", "unregister_backend",
]
