"""PyTorch frontend: functional ops (custom ops under autograd and torch.compile), modules, model conversion.

    import normkit.torch
    model = normkit.torch.convert(model)       # every torch.nn norm layer now runs on normkit's kernels
    model = normkit.torch.convert(model, fuse=True)   # and norm + activation pairs fused (fusion_report(model))
    model = normkit.torch.convert_sync_batchnorm(model)   # BatchNorm synchronized over torch.distributed (CPU)
    y = normkit.torch.group_norm(x, 8, w, b)   # torch.nn.functional signatures, plus backend=

Imported only when asked for: ``import normkit`` never imports torch.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise ImportError("normkit.torch needs PyTorch; install it with: pip install 'normkit[torch]'") from exc

from .model_bench import benchmark
from .functional import add_layer_norm, add_rms_norm, batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from .keras import BatchNormalization
from .renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    RMSNormSemantics,
    convert,
    revert,
)
from .sync import SyncBatchNorm, convert_sync_batchnorm
from .fuse import Fusion, FusionReport, FusedSequential, fuse, fusion_report

__all__ = [
    "Fusion", "FusionReport", "FusedSequential", "fuse", "fusion_report",
    "RMSNorm", "RMSNormSemantics", "add_layer_norm", "add_rms_norm", "rms_norm",
    "BatchNormalization", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d",
    "BatchRenorm3d", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "SyncBatchNorm", "batch_norm", "benchmark", "convert",
    "convert_sync_batchnorm", "group_norm", "instance_norm", "layer_norm", "revert",
]
