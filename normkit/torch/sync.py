"""Synchronized BatchNorm on the CPU over ``torch.distributed`` (gloo), from normkit's split kernels.

:class:`torch.nn.SyncBatchNorm` refuses CPU tensors; :class:`SyncBatchNorm` here has its constructor,
parameters, buffers, ``state_dict`` and ``repr``, and its own ``forward``. A training step costs two
collectives of O(C) float64 values each:

* forward: every process computes its per-channel (count, mean, m2) with the ``stats`` kernel; one ``all_gather``
  of a (2C+1,) float64 tensor ``[count, mean..., m2...]``; every process merges the gathered statistics in rank
  order with Chan's formula (:func:`normkit.split.merge_stats`), so all get bit-identical global statistics; then
  the ``apply`` kernel, and the running statistics are updated with the global mean and unbiased variance.
* backward: per-channel (sum_dy, sum_dy_xhat) from ``backward_reduce``; one ``all_reduce`` (SUM) of a (2C,)
  float64 tensor; ``backward_apply`` with coefficients from the global count. As in torch, the weight and bias
  gradients are the LOCAL sums (DistributedDataParallel all-reduces parameter gradients), and the all_reduce is
  skipped when the input needs no gradient (in every process alike, as in torch).

A process with an empty batch contributes count 0, gets an empty output and still joins both collectives.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..split import (Stats, apply_coefficients, backward_coefficients, batchnorm_apply, batchnorm_backward_apply,
                     batchnorm_backward_reduce, batchnorm_stats, centered, merge_stats)
from . import differentiable
from .functional import _input, _np, _params, batch_norm, channels_last, in_layout
from .modules import NotScriptable, fx_node

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

_OP = "SyncBatchNorm"


def _merge_gathered(rows: list[np.ndarray], c: int) -> Stats:
    """Chan's merge of gathered ``[count, mean, m2]`` rows, in rank order (the same result on every process)."""
    total = Stats(0, np.zeros(c), np.zeros(c))
    for row in rows:
        count = int(row[0])
        if count:
            total = merge_stats(total, Stats(count, row[1:c + 1].copy(), row[c + 1:].copy()))
    return total


class _SyncBatchNormFunction(torch.autograd.Function):
    jvp = differentiable.no_jvp("SyncBatchNorm")

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, backend):
        ctx.nhwc, x = channels_last(x), x.contiguous()
        c = x.shape[1]
        local = np.zeros(2 * c + 1)
        if x.numel():
            st = batchnorm_stats(_np(x), backend)
            local[0], local[1:c + 1], local[c + 1:] = st.count, st.mean, st.m2
        world = dist.get_world_size(group)
        send = torch.from_numpy(local)
        rows = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(rows, send, group)  # collective 1 of 2
        stats = _merge_gathered([r.numpy() for r in rows], c)
        n = stats.count
        if n == 0:  # no process has a value: nothing to normalize, nothing to learn from
            mean = np.full(c, np.nan)
            rstd = np.full(c, np.nan)
        else:
            mean = stats.mean
            with np.errstate(invalid="ignore", divide="ignore"):
                rstd = 1.0 / np.sqrt(stats.m2 / n + eps)
        if running_mean is not None and n > 0:
            with np.errstate(invalid="ignore", divide="ignore"):  # n == 1: unbiased variance NaN, as in torch
                unbiased = stats.m2 / np.float64(n - 1)
            with torch.no_grad():
                for buf, value in ((running_mean, mean), (running_var, unbiased)):
                    new = (1.0 - momentum) * buf.double() + momentum * torch.from_numpy(value)
                    buf.copy_(new)
        if x.numel():
            xc, centre = centered(_np(x), mean, rstd)
            scale, shift = apply_coefficients(centre, rstd, _np(weight), _np(bias), xc.dtype, stats.var)
            y = in_layout(torch.from_numpy(batchnorm_apply(xc, scale, shift, backend)), ctx.nhwc)
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.rstd, ctx.count, ctx.group, ctx.backend = mean, rstd, n, group, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        differentiable.refuse("normkit SyncBatchNorm", dy)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        c = x.shape[1]
        dy = dy.contiguous()
        xc, centre = centered(_np(x), ctx.mean, ctx.rstd)
        if x.numel():
            sum_dy, sum_dy_xhat = batchnorm_backward_reduce(_np(dy), xc, centre, ctx.rstd, ctx.backend)
        else:
            sum_dy, sum_dy_xhat = np.zeros(c), np.zeros(c)
        # the local sums (torch's convention: DDP reduces parameter gradients), before the all_reduce
        dw = torch.from_numpy(sum_dy_xhat.astype(_np(x).dtype)) if need_w else None
        db = torch.from_numpy(sum_dy.astype(_np(x).dtype)) if need_b else None
        dx = None
        if need_x:
            both = torch.from_numpy(np.concatenate([sum_dy, sum_dy_xhat]))
            dist.all_reduce(both, dist.ReduceOp.SUM, ctx.group)  # collective 2 of 2
            g = both.numpy()
            if x.numel():
                a, b, d = backward_coefficients(centre, ctx.rstd, None if weight is None else _np(weight),
                                                g[:c], g[c:], ctx.count, xc.dtype)
                dx = in_layout(torch.from_numpy(batchnorm_backward_apply(_np(dy), xc, a, b, d, ctx.backend)),
                               ctx.nhwc)
            else:
                dx = torch.empty_like(x)
        return dx, dw, db, None, None, None, None, None, None


class SyncBatchNorm(NotScriptable, _BatchNorm):
    """:class:`torch.nn.SyncBatchNorm` for CPU tensors, computed by normkit's split kernels (float32/float64;
    bfloat16 and float16 data in float32, as torch does).

    Same constructor, parameters, buffers, ``state_dict`` and ``repr`` as torch's, but not a subclass of it:
    :class:`torch.nn.parallel.DistributedDataParallel` refuses every ``torch.nn.SyncBatchNorm`` instance in a CPU
    module ("SyncBatchNorm layers only work with GPU modules"), so this one derives from torch's ``_BatchNorm``
    (as torch's SyncBatchNorm does) and repeats torch's constructor and input checks.

    Training across a process group of two or more takes one ``all_gather`` in forward and one ``all_reduce`` in
    backward. In eval mode the running statistics are used and nothing is communicated. With a group of one
    process, or when ``torch.distributed`` is not initialized, it is normkit's plain BatchNorm (like torch, which
    falls back silently; normkit warns in the second case, since a SyncBatchNorm that does not synchronize is
    usually a setup mistake).
    """

    #: Backend name for this layer's kernels; None means the registry's order. Not part of the state_dict.
    backend = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        # torch.nn.SyncBatchNorm.forward, with normkit's kernels and a CPU instead of a GPU requirement
        if isinstance(input, torch.fx.Proxy):
            return fx_node(self, input)
        if isinstance(input, Tensor) and not input.is_cpu:
            raise ValueError(f"normkit.torch.SyncBatchNorm runs on the CPU only, got an input on device "
                             f"{input.device} (torch.nn.SyncBatchNorm is the one for GPUs)")
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None

        world = 1
        group = None
        if bn_training and self.training:
            if not (dist.is_available() and dist.is_initialized()):
                # in eager mode only: dynamo cannot trace warnings.warn, so under torch.compile it would break
                # the graph (and fail fullgraph=True) of a layer that otherwise compiles whole
                if not torch.compiler.is_compiling():
                    warnings.warn("normkit.torch.SyncBatchNorm: torch.distributed is not initialized, so this layer "
                                  "normalizes with the local batch's statistics only (plain BatchNorm), as "
                                  "torch.nn.SyncBatchNorm does then; call torch.distributed.init_process_group to "
                                  "synchronize", RuntimeWarning, stacklevel=2)
            else:
                group = self.process_group if self.process_group else dist.group.WORLD
                world = dist.get_world_size(group)
        if world <= 1:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                              self.eps, backend=self.backend)
        return self._synchronized(input, running_mean, running_var, factor, group)

    @differentiable.numpy_step("SyncBatchNorm layers, in a process group of more than one process,")
    def _synchronized(self, input: Tensor, running_mean, running_var, factor: float, group) -> Tensor:
        x = _input(_OP, input)
        weight, bias = _params(_OP, x, (x.shape[1],), self.weight, self.bias)
        dtype = x.dtype
        if dtype in (torch.bfloat16, torch.float16):
            # computed in float32, as torch's SyncBatchNorm computes 16-bit data (statistics of the exact widened
            # values; y and the input gradient rounded once from float32), the casts differentiable by autograd
            x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
        y = _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, float(self.eps), float(factor),
                                         group, self.backend)
        return y.to(dtype)  # (itself where x was float32 or float64)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """:meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` making normkit's :class:`SyncBatchNorm`: every
    BatchNorm layer (torch's or normkit's BatchNorm1d/2d/3d, or a torch.nn.SyncBatchNorm) is replaced by a new
    module that carries the very same parameter and buffer objects; ``module`` itself is returned converted (a new
    object if it is a BatchNorm layer). BatchRenorm*d, GhostBatchNorm*d and the Keras-style BatchNormalization have
    no synchronized version: a TypeError, rather than their semantics lost or their statistics left per process.
    A SyncBatchNorm (torch's or normkit's) keeps its own ``process_group`` unless ``process_group`` is given."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be a torch.nn.Module, got {type(module).__name__}")
    from .keras import BatchNormalization
    from .renorm import _RenormGhostForward

    if isinstance(module, _RenormGhostForward):  # a torch.nn.BatchNorm*d subclass: SyncBatchNorm would drop r, d
        raise TypeError(f"convert_sync_batchnorm: {type(module).__name__} has no synchronized version (its batch "
                        f"renormalization / ghost batches would be lost)")
    if isinstance(module, BatchNormalization):  # not a _BatchNorm: left alone it would normalize per process
        raise TypeError("convert_sync_batchnorm: the Keras-style BatchNormalization has no synchronized version "
                        "(its statistics would stay those of each process)")
    out = module
    if isinstance(module, _BatchNorm):
        if getattr(module, "activation", None) is not None:  # a normkit BatchNorm*d built with activation=
            raise ValueError(f"convert_sync_batchnorm: this {type(module).__name__} applies activation="
                             f"{module.activation!r}, which SyncBatchNorm has no fused form of (built with "
                             f"activation= or by normkit.torch.fuse)")
        group = process_group if process_group is not None else getattr(module, "process_group", None)
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, group, bias=module.bias is not None)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        if "backend" in module.__dict__:
            out.backend = module.backend
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
