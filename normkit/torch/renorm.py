"""``BatchRenorm1d/2d/3d`` and ``GhostBatchNorm1d/2d/3d``: Batch Renormalization (Ioffe, 2017) and ghost batch
normalization with torch.nn's BatchNorm conventions.

Both are subclasses of ``torch.nn.BatchNorm*d`` (constructor, ``weight``/``bias``/``running_mean``/``running_var``/
``num_batches_tracked``, input dimension checks, ``eval`` with the running statistics) and both run the same core
as :class:`normkit.torch.BatchNormalization` and :class:`normkit.BatchNormalization` (normkit/keras.py), configured
for torch's conventions; only the running statistics are updated here, the torch way:
``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``: cumulative average), with the
*unbiased* batch variance, as torch.nn.BatchNorm does.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from .. import keras as _keras
from . import differentiable
from .functional import _params, batch_norm, channels_last, in_layout
from .modules import NotScriptable, fx_node

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "GhostBatchNorm1d", "GhostBatchNorm2d",
           "GhostBatchNorm3d"]


class _CoreTrain(torch.autograd.Function):
    """The core's training step (normalization by batch statistics, r and d constants) and its backward."""

    jvp = differentiable.no_jvp("Batch Renormalization and ghost-batch layers")

    @staticmethod
    def forward(ctx, x, weight, bias, core, out):
        y = core(x.detach().contiguous().numpy(), training=True)
        ctx.save_for_backward(x)  # only for torch's check of in-place changes (the core kept views of its memory)
        ctx.core, ctx.saved, core._saved = core, core._saved, None
        ctx.wdtype = None if weight is None else weight.dtype
        ctx.bdtype = None if bias is None else bias.dtype
        out.append(core._batch_stats)
        ctx.nhwc = channels_last(x)
        return in_layout(torch.from_numpy(y), ctx.nhwc)

    @staticmethod
    def backward(ctx, dy):
        differentiable.refuse(f"normkit {ctx.core.name}", dy)
        ctx.saved_tensors  # raises torch's error if x was changed in place since forward
        dx, dw, db = ctx.core._backward(ctx.saved, dy.contiguous().numpy())
        dw = None if ctx.wdtype is None else torch.from_numpy(dw.reshape(-1)).to(ctx.wdtype)
        db = None if ctx.bdtype is None else torch.from_numpy(db.reshape(-1)).to(ctx.bdtype)
        return in_layout(torch.from_numpy(dx), ctx.nhwc), dw, db, None, None


class _RenormGhostForward(NotScriptable):
    """forward of BatchRenorm*d and GhostBatchNorm*d: the shared core in training, torch's batch_norm in eval."""

    _renorm = False
    #: Backend name for the kernels; None means the registry's order. Not part of the state_dict.
    backend = None

    def _core_for(self, x: Tensor, use_running: bool):
        core = _keras.BatchNormalization(
            axis=1, momentum=1.0, epsilon=self.eps, center=self.bias is not None, scale=self.weight is not None,
            renorm=use_running, renorm_clipping=self._clipping() if use_running else None, renorm_momentum=1.0,
            virtual_batch_size=self._vbs(), fused=False, dtype="float64", name=type(self).__name__,
            backend=self.backend)
        core.build(tuple(x.shape))
        core.gamma = None if self.weight is None else self.weight.detach().numpy()
        core.beta = None if self.bias is None else self.bias.detach().numpy()
        if use_running and getattr(self, "renorm_momentum", None) is not None:
            # r and d from the separate renorm statistics; the core floors renorm_stddev at sqrt(eps), as Keras
            core.renorm_mean = self.renorm_mean.numpy().astype(np.float64)
            core.renorm_stddev = self.renorm_std.numpy().astype(np.float64)
        elif use_running:                      # Batch Renormalization's r and d from the running statistics
            core.renorm_mean = self.running_mean.numpy().astype(np.float64)
            core.renorm_stddev = np.sqrt(self.running_var.numpy().astype(np.float64) + self.eps)
        return core

    def _vbs(self):
        return None

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_node(self, input)
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_cpu:
            raise ValueError(f"{type(self).__name__}: input is on device {input.device}; normkit's kernels run on "
                             f"the CPU only")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected input's size at dim=1 to match num_features "
                             f"({self.num_features}), got shape {tuple(input.shape)}")
        has_running = self.running_mean is not None and self.running_var is not None
        if not self.training and has_running:
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                              self.eps, backend=self.backend)
        if not input.numel():  # torch.nn.BatchNorm's empty batch: an empty output, running statistics untouched
            if self.training and self.track_running_stats and has_running:
                self.num_batches_tracked.add_(1)
            return batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps, backend=self.backend)
        return self._train(input, has_running)

    @differentiable.numpy_step("BatchRenorm*d and GhostBatchNorm*d in training")
    def _train(self, input: Tensor, has_running: bool) -> Tensor:
        # (checked here, after numpy_step's refusals: under torch.func.vmap the batch seen is one sample's)
        n, vbs = input.shape[0], self._vbs()
        if vbs is not None and n % vbs:
            raise ValueError(f"{type(self).__name__}: virtual_batch_size={vbs} must divide the batch size, got a "
                             f"batch of {n} (shape {tuple(input.shape)})")
        count = (n if vbs is None else vbs) * math.prod(input.shape[2:])
        if count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"{'per ghost batch ' if vbs else ''}when training, got input size {tuple(input.shape)}")
        if input.dtype not in (torch.float32, torch.float64):  # the core is NumPy float32/float64 code
            raise TypeError(f"{type(self).__name__}: training takes a float32 or float64 input, got "
                            f"{str(input.dtype).removeprefix('torch.')}; cast it to float32 (torch.autocast: end the "
                            f"autocast region before this layer)")
        _params(type(self).__name__, input, (self.num_features,), self.weight, self.bias)  # as eval's batch_norm
        core = self._core_for(input, self._renorm and has_running)
        out = []
        y = _CoreTrain.apply(input, self.weight, self.bias, core, out)
        if self.training and self.track_running_stats and has_running:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            mean, var, count = out[0]
            unbiased = var * (count / (count - 1))             # every ghost batch has count values per channel
            with torch.no_grad():
                rm, rv = self.running_mean, self.running_var
                rm.copy_(torch.from_numpy((1 - factor) * rm.numpy().astype(np.float64) + factor * mean))
                rv.copy_(torch.from_numpy((1 - factor) * rv.numpy().astype(np.float64) + factor * unbiased))
                if self._renorm and getattr(self, "renorm_momentum", None) is not None:
                    f, mm, ms = self.renorm_momentum, self.renorm_mean, self.renorm_std
                    mm.copy_(torch.from_numpy((1 - f) * mm.numpy().astype(np.float64) + f * mean))
                    ms.copy_(torch.from_numpy((1 - f) * ms.numpy().astype(np.float64) + f * np.sqrt(var + self.eps)))
        return y


def _positive_number(cls, arg, v, low):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v < low:
        raise ValueError(f"{cls}: {arg} must be a finite number >= {low}, got {v!r}")
    return float(v)


class _BatchRenorm(_RenormGhostForward):
    _renorm = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, rmax=3.0,
                 dmax=5.0, renorm_momentum=None, device=None, dtype=None, *, bias=True):
        who = type(self).__name__
        rmax = _positive_number(who, "rmax", rmax, 1.0)
        dmax = _positive_number(who, "dmax", dmax, 0.0)
        if renorm_momentum is not None:
            v = renorm_momentum
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{who}: renorm_momentum must be None or a number in [0, 1], got {v!r}")
            renorm_momentum = float(v)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.rmax, self.dmax, self.renorm_momentum = rmax, dmax, renorm_momentum
        if renorm_momentum is not None:
            if self.track_running_stats:
                kw = {"device": device, "dtype": dtype}
                self.register_buffer("renorm_mean", torch.zeros(num_features, **kw))
                self.register_buffer("renorm_std", torch.ones(num_features, **kw))
            else:
                self.register_buffer("renorm_mean", None)
                self.register_buffer("renorm_std", None)

    def _clipping(self) -> dict:
        """r's and d's clipping from rmax and dmax, which are read (and checked) at every call: they are ramped by
        assignment."""
        who = type(self).__name__
        rmax, dmax = _positive_number(who, "rmax", self.rmax, 1.0), _positive_number(who, "dmax", self.dmax, 0.0)
        return {"rmin": 1.0 / rmax, "rmax": rmax, "dmax": dmax}

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "renorm_mean", None) is not None:
            self.renorm_mean.zero_()
            self.renorm_std.fill_(1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, renorm_momentum={self.renorm_momentum}"


class _GhostBatchNorm(_RenormGhostForward):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 virtual_batch_size=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        v = virtual_batch_size
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{type(self).__name__}: virtual_batch_size must be a positive int, got {v!r}")
        self.virtual_batch_size = int(v)

    def _vbs(self):
        return self.virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


_RENORM_DOC = """Batch Renormalization (Ioffe, 2017) with torch.nn.{base}'s conventions (see the README).

    Training: with the batch's per-channel mean mu_B and biased variance var_B, sigma_B = sqrt(var_B + eps) and
    sigma = sqrt(running_var + eps), ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B -
    running_mean) / sigma, -dmax, dmax)``, ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias``, with r and d
    constants for the gradient (the paper's stop_gradient). r and d use the running statistics as they were
    before the step; then ``running_mean``/``running_var`` are updated as torch.nn.{base} does (``momentum``,
    unbiased variance; ``momentum=None`` is a cumulative average), and eval normalizes with them.

    ``renorm_momentum=None`` (default): one set of running statistics, the paper's, as above. A float in [0, 1]
    instead: r and d come from separate buffers ``renorm_mean`` (initially 0) and ``renorm_std`` (initially 1),
    as Keras's renorm_mean/renorm_stddev but in torch's momentum convention: ``s = max(renorm_std, sqrt(eps))``,
    ``r = clip(sigma_B / s, 1/rmax, rmax)``, ``d = clip((mu_B - renorm_mean) / s, -dmax, dmax)`` (values from
    before the step), then every training step ``renorm_mean = (1 - renorm_momentum) * renorm_mean +
    renorm_momentum * mu_B`` and ``renorm_std = (1 - renorm_momentum) * renorm_std + renorm_momentum * sigma_B``.
    They are state_dict entries; ``running_mean``/``running_var`` are still updated with ``momentum`` and used in
    eval. ``rmax`` and ``dmax`` are read at every
    call: ramp them (the paper starts at 1 and 0) by assigning the attributes. rmax=1, dmax=0 is plain BatchNorm.
    With ``track_running_stats=False`` there is nothing to renormalize against: r=1, d=0 (plain BatchNorm; the
    renorm buffers are then None, as the running statistics).
    """

_GHOST_DOC = """Ghost batch normalization with torch.nn.{base}'s conventions (see the README).

    Training: the batch of N samples (N a multiple of ``virtual_batch_size``) forms G = N // virtual_batch_size
    ghost batches, sample i in ghost batch ``i mod G`` (tf_keras's and normkit.BatchNormalization's grouping,
    which is not ``torch.chunk``'s contiguous one); each ghost batch is normalized with its own mean and biased
    variance. ``running_mean`` moves towards the mean over the ghost batches of their means and ``running_var``
    towards the mean of their unbiased variances, as torch.nn.{base} (``momentum``; None is a cumulative average).
    Eval normalizes with the running statistics, for any batch size. virtual_batch_size=N is plain BatchNorm.
    """


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = _RENORM_DOC.format(base="BatchNorm1d")


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = _RENORM_DOC.format(base="BatchNorm2d")


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = _RENORM_DOC.format(base="BatchNorm3d")


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = _GHOST_DOC.format(base="BatchNorm1d")


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = _GHOST_DOC.format(base="BatchNorm2d")


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    __doc__ = _GHOST_DOC.format(base="BatchNorm3d")
