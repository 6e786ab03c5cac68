from normkit.registry import Backend

# Exactly what the kernels module implements: an op, direction or dtype added to the contract is not claimed
# until this backend has kernels for it.
_CHANNEL = ("forward", "forward_infer", "backward", "backward_infer")
_SPLIT = ("stats", "apply", "backward_reduce", "backward_apply")
_ROW = ("forward", "backward", "add_forward", "add_backward")
_ACT_CHANNEL = ("act_forward", "act_forward_infer", "act_backward", "act_backward_infer")
_ACT = ("act_forward", "act_backward")

backend = Backend(
    name="numba",
    module="normkit_kernels.numba.kernels",
    kernels={"batchnorm": _CHANNEL + _SPLIT + _ACT_CHANNEL, "instancenorm": _CHANNEL + _ACT_CHANNEL,
             "groupnorm": ("forward", "backward") + _ACT, "layernorm": _ROW + _ACT, "rmsnorm": _ROW},
    dtypes=("float32", "float64", "bfloat16", "float16"),
    channels_last={"batchnorm": _CHANNEL + _SPLIT, "instancenorm": _CHANNEL, "groupnorm": ("forward", "backward")},
    description="Numba JIT, parallel=True; compiled per dtype on first use and cached on disk",
)
