"""Modules and model conversion.

Each normkit module subclasses its ``torch.nn`` twin and overrides only ``forward``: constructors, parameters,
buffers, ``state_dict`` and ``repr`` are torch's own, and ``isinstance(m, torch.nn.BatchNorm2d)`` stays true, so
code that looks for norm layers (weight-decay filters, ``torch.nn.utils.fusion.fuse_conv_bn_eval``) keeps working;
code that matches exact types (``torch.ao.quantization.fuse_modules``) needs :func:`revert` first.
Under ``torch.fx.symbolic_trace`` each module is one ``call_module`` node, as torch.nn's norm layers are.

Because a normkit module adds no state, :func:`convert` switches the class of each torch.nn instance in place
instead of building new modules: parameters, buffers, hooks, device, train/eval state and the references an
optimizer already holds all stay the very same objects. Only exact torch.nn classes are converted; a user's
subclass has its own forward, which normkit must not replace, unless the user declares what it computes: a model's
own RMSNorm class (transformers' ``LlamaRMSNorm`` and its kin) is converted when passed in ``rmsnorm_classes``
with its :class:`RMSNormSemantics`.

BatchNorm, InstanceNorm, GroupNorm and LayerNorm take two more keyword arguments, ``activation=None`` and
``negative_slope=0.01``: the fused activation of :mod:`normkit.torch.functional` (their repr shows it when set).
:func:`convert` with ``fuse=True`` fuses norm layers with the activation that follows them (:mod:`.fuse`).
"""

import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from .. import activation as _activation
from .. import registry
from .functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "RMSNorm", "RMSNormSemantics", "convert", "revert",
]


_Proxy = torch.fx.Proxy  # (looked up once: every forward tests its input against it)


def fx_node(module: nn.Module, input: torch.fx.Proxy, *args) -> torch.fx.Proxy:
    """A normkit module's forward under torch.fx.symbolic_trace: one call_module node, as torch.nn's norm layers
    are (fx's default tracer keeps modules of torch.nn.* as leaves and traces into any other's forward, and a Proxy
    cannot go through normkit's checks and kernels)."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input, *args), {})


class NotScriptable:
    """Every normkit module: ``torch.jit.script`` cannot compile a kernel called from Python, and without this its
    error names normkit's internal signatures. ``__prepare_scriptable__`` is the hook it calls on each module before
    compiling; a module returned from it would replace this one inside the user's model, so it refuses instead."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"torch.jit.script: {type(self).__name__} is normkit's, whose kernels TorchScript cannot "
                           f"compile; use torch.compile or torch.jit.trace on the model, or script "
                           f"normkit.torch.revert(model)")


class _Activation(NotScriptable):
    """The ``activation`` and ``negative_slope`` keyword arguments of the norms that fuse one. Class attributes
    give the default (none) to modules :func:`convert` switched the class of, which never ran this ``__init__``.
    ``_normalize(input, activation, negative_slope)`` is the forward with another activation: what a call site
    that ``convert(fuse=True)`` fused calls (:mod:`.fuse`), the module itself unchanged."""

    activation: Optional[str] = None
    negative_slope: float = 0.01

    def __init__(self, *args, activation: Optional[str] = None, negative_slope: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        _activation.code(type(self).__name__, activation, negative_slope)
        self.activation, self.negative_slope = activation, float(negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, _Proxy):
            return fx_node(self, input)
        return self._normalize(input, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is None:
            return text
        act = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return f"{text}, {act}" if text else act


class _BatchNormForward(_Activation):
    #: Backend name for this layer's kernels; None means the registry's order. Not part of the state_dict.
    backend = None

    def _normalize(self, input: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
        # torch.nn's _BatchNorm.forward, calling normkit's batch_norm
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in eval when there are no buffers
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # buffers are passed only when they are updated (training and tracked) or used (eval)
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
            backend=self.backend,
            activation=activation,
            negative_slope=negative_slope,
        )


class _InstanceNormForward(_Activation):
    backend = None

    def _normalize(self, input: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
        # torch.nn's _InstanceNorm.forward, calling normkit's instance_norm
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. You can silence this warning by "
                "not passing in num_features, which is not used because affine=False",
                stacklevel=2,
            )
        unbatched = input.dim() == self._get_no_batch_dim()
        y = instance_norm(
            input.unsqueeze(0) if unbatched else input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            backend=self.backend,
            activation=activation,
            negative_slope=negative_slope,
        )
        return y.squeeze(0) if unbatched else y


class _LayerNormForward(_Activation):
    backend = None

    def _normalize(self, input: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend,
                          activation=activation, negative_slope=negative_slope)


class _RMSNormForward(NotScriptable):
    backend = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, _Proxy):
            return fx_node(self, input)
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class _GroupNormForward(_Activation):
    backend = None

    def _normalize(self, input: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend,
                          activation=activation, negative_slope=negative_slope)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` computed by normkit."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` computed by normkit."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` computed by normkit."""


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` computed by normkit."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` computed by normkit."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` computed by normkit."""


class LayerNorm(_LayerNormForward, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` computed by normkit."""


class GroupNorm(_GroupNormForward, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` computed by normkit."""


class RMSNorm(_RMSNormForward, nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` computed by normkit."""


@dataclass(frozen=True)
class RMSNormSemantics:
    """What a model's own RMSNorm class computes, for :func:`convert`'s ``rmsnorm_classes``. It normalizes over
    the last dimension: ``y = x / sqrt(mean(x**2, -1) + eps) * weight``.

    ``eps``: the name of the instance attribute holding eps, or a number. ``weight``: the name of the attribute
    holding the weight (a Parameter of shape (hidden,), or None in an instance without one), or None for no weight.
    An instance holding a ``bias`` tensor is refused (it would not be added). ``compute_dtype``: None to compute
    in the input's dtype (``torch.nn.RMSNorm``'s semantics); ``torch.float32`` for transformers' LlamaRMSNorm
    (and its copies in Mistral, Qwen2, ...), which normalizes ``x.to(float32)``, casts the result back to the
    input's dtype, and only then multiplies by the weight::

        RMSNormSemantics(eps="variance_epsilon", compute_dtype=torch.float32)

    ``cast_to``: with a ``compute_dtype``, the dtype the normalized value is cast to before the weight multiplies
    it: "input" (LlamaRMSNorm's), or "weight" for transformers' T5LayerNorm and diffusers' RMSNorm, which
    normalize in the wider of the input's dtype and ``compute_dtype`` and cast the result to the weight's dtype when
    that is float16 or bfloat16 (a bfloat16 input with a float32 weight gives a float32 output; without a weight,
    the input's dtype)::

        RMSNormSemantics(eps="variance_epsilon", compute_dtype=torch.float32, cast_to="weight")
    """

    eps: Union[str, float] = "eps"
    weight: Optional[str] = "weight"
    compute_dtype: Optional[torch.dtype] = None
    cast_to: str = "input"

    def __post_init__(self):
        if self.cast_to not in ("input", "weight"):
            raise ValueError(f"RMSNormSemantics: cast_to must be 'input' or 'weight', got {self.cast_to!r}")
        if self.compute_dtype is not None and not (isinstance(self.compute_dtype, torch.dtype)
                                                   and self.compute_dtype.is_floating_point):
            raise TypeError(f"RMSNormSemantics: compute_dtype must be None or a floating torch.dtype, got "
                            f"{self.compute_dtype!r}")

    def check(self, module: nn.Module) -> None:
        cls = type(module).__name__
        if isinstance(self.eps, str) and not isinstance(getattr(module, self.eps, None), (int, float)):
            raise ValueError(f"convert: {cls} has no number in attribute {self.eps!r} (RMSNormSemantics.eps)")
        if self.weight is not None and not isinstance(getattr(module, self.weight, False), (torch.Tensor, type(None))):
            raise ValueError(f"convert: {cls} has no tensor or None in attribute {self.weight!r} "
                             f"(RMSNormSemantics.weight)")
        if isinstance(getattr(module, "bias", None), torch.Tensor):  # diffusers' RMSNorm(bias=True)
            raise ValueError(f"convert: this {cls} holds a bias tensor, which RMSNormSemantics does not add")


class _DeclaredRMSNormForward(NotScriptable):
    """forward of a user's RMSNorm class converted with its RMSNormSemantics (``_normkit_semantics``)."""

    backend = None
    _normkit_semantics: RMSNormSemantics
    _normkit_original: type

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, _Proxy):
            return fx_node(self, input)
        sem = self._normkit_semantics
        eps = getattr(self, sem.eps) if isinstance(sem.eps, str) else sem.eps
        weight = None if sem.weight is None else getattr(self, sem.weight)
        shape = tuple(input.shape[-1:])
        compute = sem.compute_dtype
        if compute is None or (input.dtype == compute and (weight is None or weight.dtype == compute)):
            # one kernel: torch.nn.RMSNorm's semantics, and the others' when nothing is cast
            return rms_norm(input, shape, weight, float(eps), backend=self.backend)
        if sem.cast_to == "input":
            y = rms_norm(input.to(compute), shape, None, float(eps), backend=self.backend).to(input.dtype)
            return y if weight is None else weight * y
        normalized = torch.promote_types(input.dtype, compute)  # T5's x * rsqrt(variance computed in float32)
        if weight is not None and weight.dtype == normalized:  # nothing cast between: one kernel
            return rms_norm(input.to(normalized), shape, weight, float(eps), backend=self.backend)
        y = rms_norm(input.to(normalized), shape, None, float(eps), backend=self.backend)
        if weight is None:
            return y.to(input.dtype)
        return weight * (y.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else y)

    def __reduce_ex__(self, protocol):
        # the class is made at run time, so pickle cannot find it by name: it is made again on loading, from the
        # user's class (found by name as in the unconverted model) and the semantics; the state is the module's own
        return _declared_instance, (self._normkit_original, self._normkit_semantics), self.__dict__


def _declared_instance(cls: type, semantics: RMSNormSemantics) -> nn.Module:
    """An empty instance of ``_declared_class(cls, semantics)``, for pickle to give the module's state."""
    declared = _declared_class(cls, semantics)
    return declared.__new__(declared)


_declared_classes: dict = {}


def _declared_class(cls: type, semantics: RMSNormSemantics) -> type:
    """A subclass of the user's class whose forward is normkit's (one per class and semantics): ``isinstance``
    stays true, and :func:`revert` finds the original in ``_normkit_original``."""
    key = (cls, semantics)
    if key not in _declared_classes:
        _declared_classes[key] = type(f"Normkit{cls.__name__}", (_DeclaredRMSNormForward, cls), {
            "_normkit_semantics": semantics, "_normkit_original": cls, "__module__": __name__,
            "__doc__": f"{cls.__qualname__} computed by normkit ({semantics})"})
    return _declared_classes[key]


_TO_NORMKIT = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
}
_TO_TORCH = {nk: tn for tn, nk in _TO_NORMKIT.items()}
# torch's lazy norm layers become their class (cls_to_become) at their first forward; convert() points them at
# normkit's class instead (the first forward itself runs torch's, which has already started)
_LAZY = {
    nn.LazyBatchNorm1d: BatchNorm1d, nn.LazyBatchNorm2d: BatchNorm2d, nn.LazyBatchNorm3d: BatchNorm3d,
    nn.LazyInstanceNorm1d: InstanceNorm1d, nn.LazyInstanceNorm2d: InstanceNorm2d,
    nn.LazyInstanceNorm3d: InstanceNorm3d,
}


def _plain_class(module: nn.Module) -> tuple[type, bool]:
    """The module's class, and whether it is the subclass ``torch.nn.utils.parametrize`` made of it (its
    ``Parametrized<class>``, whose only base it is)."""
    cls = type(module)
    # (the submodule register_parametrization adds, looked up without the module's own __getattr__)
    if "parametrizations" in module._modules and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
        return cls.__bases__[0], True
    return cls, False


def _switch_class(module: nn.Module, cls: type, parametrized: bool) -> None:
    module.__class__ = cls
    if parametrized:  # torch's Parametrized<class> of the new class, as register_parametrization makes it
        parametrize._inject_new_class(module)
        for name in module.parametrizations:
            parametrize._inject_property(module, name)


def convert(model: nn.Module, backend: str | None = None, *,
            rmsnorm_classes: Mapping[type, RMSNormSemantics] | None = None, fuse: bool = False) -> nn.Module:
    """Make every torch.nn normalization layer of ``model`` (the model itself included) a normkit layer, in
    place, and return ``model`` (but ``torch.nn.SyncBatchNorm``: :func:`~normkit.torch.convert_sync_batchnorm`).
    ``backend`` pins the layers to one backend by name (also on layers that were already normkit's); None leaves
    the registry's order in charge.

    ``rmsnorm_classes`` opts a model's own RMSNorm classes in: ``{LlamaRMSNorm: RMSNormSemantics(
    eps="variance_epsilon", compute_dtype=torch.float32)}`` converts every instance of exactly that class (not of
    its subclasses) to a subclass of it whose forward is normkit's rms_norm with the declared semantics.

    ``fuse=True`` then fuses each norm layer with the activation after it wherever that is provable (in
    ``nn.Sequential`` and in forwards that ``torch.fx`` can trace; see :mod:`normkit.torch.fuse`), in place;
    :func:`~normkit.torch.fusion_report` tells what was fused.

    Lazy layers (``nn.LazyBatchNorm2d``, ...) whose first forward has not run yet become normkit's layers at it,
    when torch would make them torch.nn's (that first forward is torch's); ``fuse`` leaves them out: convert after
    a first forward to fuse them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse, bool):
        raise TypeError(f"convert: fuse must be True or False, got {type(fuse).__name__}")
    declared = {}
    for cls, sem in (rmsnorm_classes or {}).items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"convert: rmsnorm_classes keys must be torch.nn.Module classes, got {cls!r}")
        if not isinstance(sem, RMSNormSemantics):
            raise TypeError(f"convert: rmsnorm_classes[{cls.__name__}] must be an RMSNormSemantics, got "
                            f"{type(sem).__name__}")
        declared[cls] = _declared_class(cls, sem)
    if backend is not None:
        registry.require_backend(backend, "convert")
    modules = [(module, *_plain_class(module)) for module in model.modules()]
    for module, plain, _ in modules:  # (every check before any change: a refusal leaves the model as it was)
        if plain not in _TO_NORMKIT and plain in declared:
            declared[plain]._normkit_semantics.check(module)
    for module, plain, parametrized in modules:
        cls = _TO_NORMKIT.get(plain, declared.get(plain))
        if cls is not None:
            _switch_class(module, cls, parametrized)
            plain = cls
        elif plain in _LAZY:
            module.cls_to_become = _LAZY[plain]
        if backend is not None and (plain in _TO_TORCH or plain in _LAZY
                                    or isinstance(module, _DeclaredRMSNormForward)):
            module.backend = backend
    if fuse:
        from .fuse import fuse_model

        fuse_model(model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: every normkit normalization layer becomes its torch.nn class again, in place, and what
    ``fuse=True`` fused is unfused; a normkit :class:`~normkit.torch.SyncBatchNorm` becomes a
    ``torch.nn.SyncBatchNorm`` (with its process group), undoing :func:`~normkit.torch.convert_sync_batchnorm`.
    ValueError for a norm layer built with an activation (``activation=`` or :func:`~normkit.torch.fuse`), which
    no torch.nn class can hold."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, got {type(model).__name__}")
    from .fuse import unfuse_model
    from .sync import SyncBatchNorm

    unfuse_model(model)
    for module in model.modules():
        plain, parametrized = _plain_class(module)
        cls = nn.SyncBatchNorm if plain is SyncBatchNorm else _TO_TORCH.get(plain)
        if isinstance(module, _DeclaredRMSNormForward):
            cls = plain._normkit_original
        if cls is not None:
            _switch_class(module, cls, parametrized)
        if cls is not None or plain in _LAZY:
            for attribute in ("backend", "activation", "negative_slope", "cls_to_become"):
                module.__dict__.pop(attribute, None)
    return model
