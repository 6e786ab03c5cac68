"""normkit-aten: PyTorch's own CPU normalization kernels as a normkit backend.

This module is the declaration the ``normkit.backends`` entry point names. It must stay light: normkit imports
it to list backends, so it names its kernels module instead of importing it (and with it, torch).
"""

from normkit import Backend

__version__ = "0.1.0"

backend = Backend(
    name="aten",
    module="normkit_aten.kernels",
    kernels={
        "batchnorm": ("forward", "forward_infer", "backward", "backward_infer"),
        "instancenorm": ("forward", "forward_infer", "backward", "backward_infer"),
        "groupnorm": ("forward", "backward"),
        "layernorm": ("forward", "backward"),
    },
    dtypes=("float32", "float64"),
    contract=1,
    description="PyTorch's CPU kernels (torch.ops.aten.native_*_norm) on NumPy arrays, for comparison",
)
