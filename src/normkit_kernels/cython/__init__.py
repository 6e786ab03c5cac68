from normkit.registry import Backend

# Exactly what the kernels module implements: an op, direction or dtype added to the contract is not claimed
# until this backend has kernels for it.
_CHANNEL = ("forward", "forward_infer", "backward", "backward_infer")
_SPLIT = ("stats", "apply", "backward_reduce", "backward_apply")
_ROW = ("forward", "backward", "add_forward", "add_backward")
_ACT = ("act_forward", "act_forward_infer", "act_backward", "act_backward_infer")
_ACT_TRAINING = ("act_forward", "act_backward")

backend = Backend(
    name="cython",
    module="normkit_kernels.cython.kernels",
    kernels={"batchnorm": _CHANNEL + _SPLIT + _ACT, "instancenorm": _CHANNEL + _ACT,
             "groupnorm": ("forward", "backward") + _ACT_TRAINING, "layernorm": _ROW + _ACT_TRAINING,
             "rmsnorm": _ROW},
    dtypes=("float32", "float64", "bfloat16", "float16"),
    channels_last={"batchnorm": _CHANNEL + _SPLIT, "instancenorm": _CHANNEL + _ACT_TRAINING,
                   "groupnorm": ("forward", "backward") + _ACT_TRAINING},
    channels_last_dtypes=("float32", "float64", "bfloat16", "float16"),
    addresses={"batchnorm": ("forward", "forward_infer", "backward"),
               "instancenorm": ("forward", "forward_infer", "backward"),
               "groupnorm": ("forward", "backward"), "layernorm": ("forward", "backward"),
               "rmsnorm": ("forward", "backward")},
    description="Cython with OpenMP prange, compiled at install time",
)
