"""``normkit.torch.BatchNormalization``: tf_keras 2.21's ``BatchNormalization`` as a torch.nn.Module.

The computation is :class:`normkit.BatchNormalization`'s (normkit/keras.py), run on NumPy views of the tensors
inside one ``torch.autograd.Function``: there is one implementation of the Keras semantics (momentum convention
``moving = moving * momentum + batch * (1 - momentum)``, biased variance, Batch Renormalization with r and d
clipped and constant for the gradient, ghost batches where sample i joins ghost batch i mod (N //
virtual_batch_size)). This module only keeps the variables as torch parameters and buffers, with Keras's names.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from .. import keras as _keras
from . import differentiable
from .functional import channels_last, in_layout
from .modules import NotScriptable, fx_node

__all__ = ["BatchNormalization"]

_NP = {torch.float32: np.float32, torch.float64: np.float64}
_RENORM_BUFFERS = ("moving_stddev", "renorm_mean", "renorm_stddev")


class _KerasBN(torch.autograd.Function):
    jvp = differentiable.no_jvp("Keras-style BatchNormalization layers")

    @staticmethod
    def forward(ctx, x, gamma, beta, module, mask):
        core = module._core
        xa = x.detach().contiguous().numpy()
        training = module.training and core.trainable
        y = core(xa, training=training, mask=mask)
        ctx.save_for_backward(x)  # only for torch's check of in-place changes (backward reads views of its memory)
        if training:
            ctx.saved = core._saved
            core._saved = None                    # the state belongs to this call (autograd may interleave calls)
            with torch.no_grad():
                for name in module._buffer_names():
                    getattr(module, name).copy_(torch.from_numpy(np.asarray(getattr(core, name)).reshape(-1)))
        else:
            ctx.saved = None
            ctx.infer = (xa, core._flat("moving_mean").copy(), 1.0 / np.sqrt(core._flat("moving_variance")
                                                                         + core.epsilon))
        ctx.core, ctx.axes, ctx.pdtype = core, module._axes(x.dim()), module.moving_mean.dtype
        ctx.has_gamma, ctx.has_beta = gamma is not None, beta is not None
        if gamma is not None:
            ctx.gamma = gamma.detach().numpy().astype(np.float64)
        ctx.nhwc = channels_last(x)
        return in_layout(torch.from_numpy(y), ctx.nhwc)

    @staticmethod
    def backward(ctx, dy):
        differentiable.refuse("normkit BatchNormalization", dy)
        ctx.saved_tensors  # raises torch's error if x was changed in place since forward
        dya = dy.contiguous().numpy()
        if ctx.saved is not None:
            dx, dgamma, dbeta = ctx.core._backward(ctx.saved, dya)
        else:                                     # inference: y = gamma * (x - moving_mean) * rstd + beta
            xa, mean, rstd = ctx.infer
            shape = [xa.shape[i] if i in ctx.axes else 1 for i in range(xa.ndim)]
            red = tuple(i for i in range(xa.ndim) if i not in ctx.axes)
            w = rstd * (ctx.gamma if ctx.has_gamma else 1.0)
            dy64 = dya.astype(np.float64)
            dx = (dy64 * w.reshape(shape)).astype(xa.dtype)
            xhat = (xa.astype(np.float64) - mean.reshape(shape)) * rstd.reshape(shape)
            np_dtype = _NP[ctx.pdtype]
            dgamma = (dy64 * xhat).sum(axis=red).astype(np_dtype) if ctx.has_gamma else None
            dbeta = dy64.sum(axis=red).astype(np_dtype) if ctx.has_beta else None
        grads = [in_layout(torch.from_numpy(np.ascontiguousarray(dx)), ctx.nhwc)]
        for g in (dgamma, dbeta):
            grads.append(None if g is None else torch.from_numpy(np.ascontiguousarray(g).reshape(-1)))
        return grads[0], grads[1], grads[2], None, None


class _CoreSetting:
    """A module attribute that is the core's hyperparameter of the same name: read from the core, and on assignment
    checked by ``check(core, value)`` (the constructor's check) and stored there; ``rebuild``: the core's build
    checks the layout against it, so the next call builds again."""

    def __init__(self, check, rebuild: bool = False):
        self.check, self.rebuild = check, rebuild

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, module, owner=None):
        return self if module is None else getattr(module._core, self.name)

    def __set__(self, module, value):
        setattr(module._core, self.name, self.check(module._core, value))
        if self.rebuild:
            module._core.built = False


class _FixedSetting:
    """A module attribute fixed at construction, the core's of the same name: it decides which parameters and
    buffers the module has, or their layout, so assigning it would leave them behind."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, module, owner=None):
        return self if module is None else getattr(module._core, self.name)

    def __set__(self, module, value):
        raise AttributeError(f"BatchNormalization: {self.name} is fixed at construction (it decides the parameters "
                             f"and buffers); make a new layer for {self.name}={value!r}")


class BatchNormalization(NotScriptable, nn.Module):
    """tf_keras 2.21's ``BatchNormalization`` as a torch.nn.Module: Keras's constructor arguments, with ``axis=1``
    by default (channels of NCHW inputs) and ``num_features`` the size of that axis (a list of axes: their sizes'
    product, the variables holding those dims flattened in the axes' order). ``fused`` as in tf_keras: its
    fused path (the default, ``fused=None``, for float32 inputs of rank 4 or 5 with the channels at axis 1 or last,
    without renorm or virtual_batch_size) puts the unbiased batch variance into ``moving_variance``.

    Training in ``module.train()`` (batch statistics; the moving statistics are updated), inference in
    ``module.eval()`` (``moving_mean`` and ``moving_variance``), as ``layer(x, training=True/False)`` in Keras.
    Semantics exactly :class:`normkit.BatchNormalization`'s (see :mod:`normkit.keras`), which computes them:

    - ``moving = moving * momentum + batch * (1 - momentum)`` (Keras's momentum, not torch's), biased variance;
    - ``renorm``: r = clip(sigma_B / max(renorm_stddev, sqrt(epsilon)), rmin, rmax), d = clip((mean_B -
      renorm_mean) / max(renorm_stddev, sqrt(epsilon)), -dmax, dmax) with ``renorm_clipping``'s keys (a missing key
      does not clip), constants for the gradient; renorm_mean/renorm_stddev move with ``renorm_momentum``,
      moving_mean/moving_stddev with ``momentum``, and ``moving_variance = max(moving_stddev**2 - epsilon, 0)``;
    - ``virtual_batch_size``: sample i is in ghost batch i mod (N // virtual_batch_size) (tf_keras's reshape), each
      ghost batch is normalized with its own statistics, the moving statistics (and r, d) use the means over the
      ghost batches of their means and variances. N must be a multiple of virtual_batch_size in training.

    State, with Keras's names, all of shape ``(num_features,)`` (tf_keras's ghost-batch variables have shape
    ``(1, 1, ..., C)``; reshape when porting): parameters ``gamma`` (when ``scale``) and ``beta`` (when
    ``center``); buffers ``moving_mean``, ``moving_variance`` and, with ``renorm``, ``moving_stddev``,
    ``renorm_mean``, ``renorm_stddev``. The buffers' dtype is the computation's (float32 unless the module is made
    float64 with ``.double()``); the output has the input's dtype. CPU tensors only. The initializers (as
    :class:`normkit.BatchNormalization` takes them) are called at construction with the shape ``(num_features,)``:
    with ghost batches a random initializer whose scale depends on the shape's fans (VarianceScaling, Glorot) draws
    from another distribution than tf_keras's, which calls it with the ghost-batch shape of the input's rank.
    """

    def __init__(self, num_features: int, axis: int = 1, momentum: float = 0.99, epsilon: float = 1e-3,
                 center: bool = True, scale: bool = True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones", renorm: bool = False,
                 renorm_clipping=None, renorm_momentum: float = 0.99, virtual_batch_size=None, fused=None,
                 device=None, dtype=None, trainable: bool = True):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features <= 0:
            raise ValueError(f"BatchNormalization: num_features must be a positive int, got {num_features!r}")
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        if not axes or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axes):
            raise TypeError(f"BatchNormalization: axis must be an int or a non-empty list of ints, got {axis!r} "
                            f"({type(axis).__name__})")
        if dtype is not None and dtype not in _NP:  # (the computation's: checked at the first call otherwise)
            raise TypeError(f"BatchNormalization: dtype must be torch.float32 or torch.float64, got {dtype!r}")
        # the NumPy layer checks (and keeps) every other argument
        self._core = _keras.BatchNormalization(
            axis=[int(a) for a in axes] if isinstance(axis, (list, tuple)) else int(axis), momentum=momentum,
            epsilon=epsilon, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer, moving_variance_initializer=moving_variance_initializer,
            renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
            virtual_batch_size=virtual_batch_size, fused=fused, dtype="float64" if dtype == torch.float64 else None,
            name="normkit.torch", trainable=trainable)
        self.num_features = int(num_features)
        kw = {"device": device, "dtype": dtype}
        initial = {name: None if v is None else torch.from_numpy(v).to(**kw)
                   for name, v in self._core._initial_values((self.num_features,)).items()}
        self.gamma = nn.Parameter(initial["gamma"]) if self.scale else None
        self.beta = nn.Parameter(initial["beta"]) if self.center else None
        for name in ("moving_mean", "moving_variance") + (_RENORM_BUFFERS if self.renorm else ()):
            self.register_buffer(name, initial[name])
        self.trainable = trainable  # (gamma's and beta's requires_grad)

    # The hyperparameters Keras reads at every call live in the core, which computes with them: assigning one here
    # checks it as the constructor does and takes effect at the next call, as in tf_keras.
    momentum = _CoreSetting(lambda core, v: core._fraction("momentum", v))
    renorm_momentum = _CoreSetting(lambda core, v: core._fraction("renorm_momentum", v))
    epsilon = _CoreSetting(lambda core, v: core._epsilon(v))
    renorm_clipping = _CoreSetting(lambda core, v: core._clipping(v))
    virtual_batch_size = _CoreSetting(lambda core, v: core._virtual_batch_size(v), rebuild=True)
    axis, center, scale, renorm = _FixedSetting(), _FixedSetting(), _FixedSetting(), _FixedSetting()
    fused = _FixedSetting()  # (resolved for the input's rank at the first call, as in tf_keras: None till then)

    @property
    def trainable(self) -> bool:
        """Keras 2's freeze: False makes every call inference, as in ``eval()`` (the moving statistics are used and
        stay), and gamma and beta get no gradient (``requires_grad`` False; True gives it back)."""
        return self._core.trainable

    @trainable.setter
    def trainable(self, value) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"BatchNormalization: trainable must be a bool, got {type(value).__name__}")
        self._core.trainable = bool(value)
        for p in (self.gamma, self.beta):
            if p is not None:
                p.requires_grad_(bool(value))

    @property
    def backend(self):
        """Backend name for the kernels (None: the registry's order)."""
        return self._core.backend

    @backend.setter
    def backend(self, name):
        self._core.backend = name

    def _buffer_names(self) -> tuple[str, ...]:
        return ("moving_mean", "moving_variance") + (_RENORM_BUFFERS if self.renorm else ())

    def _axes(self, ndim: int) -> list[int]:
        """The normalized axes, sorted (the variables hold the kept dims flattened in this order)."""
        return sorted(a % ndim for a in self._axis_list())

    def _axis_list(self) -> list[int]:
        """``axis`` as given: an int, or a list of them."""
        return self.axis if isinstance(self.axis, list) else [self.axis]

    def _check(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"BatchNormalization: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _NP:
            raise TypeError(f"BatchNormalization: input must be float32 or float64, got {x.dtype}")
        for name, t in [("input", x), *self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]:
            if not t.is_cpu:
                raise ValueError(f"BatchNormalization: {name} is on device {t.device}; normkit's kernels run on "
                                 f"the CPU only")
        if any(not -x.dim() <= a < x.dim() for a in self._axis_list()):
            raise ValueError(f"BatchNormalization: axis {self.axis} is out of range for an input of shape "
                             f"{tuple(x.shape)}")
        axes = self._axes(x.dim())
        if len(set(axes)) != len(axes):
            raise ValueError(f"BatchNormalization: axis {self.axis} names a dim twice for an input of rank {x.dim()}")
        if math.prod(x.shape[a] for a in axes) != self.num_features:
            dims = f"dim={axes[0]}" if len(axes) == 1 else f"dims {axes} (their sizes' product)"
            raise ValueError(f"BatchNormalization: expected input's size at {dims} to match num_features "
                             f"({self.num_features}), got shape {tuple(x.shape)}")
        dtypes = {t.dtype for t in (*self.parameters(recurse=False), *self.buffers(recurse=False))}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _NP:
            raise TypeError(f"BatchNormalization: parameters and buffers must all be float32 or all float64, got "
                            f"{sorted(str(d) for d in dtypes)}")

    @differentiable.numpy_step("Keras-style BatchNormalization layers")
    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: tf_keras's (see :class:`normkit.BatchNormalization`), a bool or float tensor of the input's
        shape without its last dimension: training statistics leave out the positions where it is 0."""
        if isinstance(input, torch.fx.Proxy):
            return fx_node(self, input) if mask is None else fx_node(self, input, mask)
        self._check(input)
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"BatchNormalization: mask must be a torch.Tensor or None, got {type(mask).__name__}")
            mask = mask.detach().cpu()
            mask = (mask.float() if mask.dtype == torch.bfloat16 else mask).numpy()  # (NumPy has no bfloat16)
        if input.numel() == 0:  # as torch's BatchNorm: an empty output, zero parameter gradients, statistics untouched
            params = [p.sum() for p in (self.gamma, self.beta) if p is not None]
            return input.clone() + (sum(params).to(input.dtype) * 0 if params else 0)
        core = self._core
        dtype = np.dtype(_NP[self.moving_mean.dtype])
        if not core.built or core._ndim != input.dim() or core.dtype != dtype:
            core.dtype = dtype  # (the fused path takes float32 layers only)
            core.build(tuple(input.shape))    # the layout for this rank (checks axis 0 with virtual_batch_size)
        core.gamma = None if self.gamma is None else self.gamma.detach().numpy()
        core.beta = None if self.beta is None else self.beta.detach().numpy()
        for name in self._buffer_names():
            setattr(core, name, getattr(self, name).numpy())
        try:
            return _KerasBN.apply(input, self.gamma, self.beta, self, mask)
        finally:                              # the core keeps no reference to the module's tensors
            for name in ("gamma", "beta") + self._buffer_names():
                setattr(core, name, None)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
                f"center={self.center}, scale={self.scale}, renorm={self.renorm}, "
                f"renorm_clipping={self.renorm_clipping or None}, renorm_momentum={self.renorm_momentum}, "
                f"virtual_batch_size={self.virtual_batch_size}, fused={self.fused}")
