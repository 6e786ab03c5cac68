"""Modules and model conversion.

Each normkit module subclasses its ``torch.nn`` twin and overrides only ``forward``: constructors, parameters,
buffers, ``state_dict`` and ``repr`` are torch's own, and ``isinstance(m, torch.nn.BatchNorm2d)`` stays true, so
code that looks for norm layers (weight-decay filters, conv-BN fusion) keeps working.

Because a normkit module adds no state, :func:`convert` switches the class of each torch.nn instance in place
instead of building new modules: parameters, buffers, hooks, device, train/eval state and the references an
optimizer already holds all stay the very same objects. Only exact torch.nn classes are converted; a user's
subclass has its own forward, which normkit must not replace.
"""

import warnings

import torch
from torch import nn

from .. import registry
from .functional import batch_norm, group_norm, instance_norm, layer_norm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "convert", "revert",
]


class _BatchNormForward:
    #: Backend name for this layer's kernels; None means the registry's order. Not part of the state_dict.
    backend = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
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
        )


class _InstanceNormForward:
    backend = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
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
        )
        return y.squeeze(0) if unbatched else y


class _LayerNormForward:
    backend = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class _GroupNormForward:
    backend = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)


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


_TO_NORMKIT = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm,
}
_TO_TORCH = {nk: tn for tn, nk in _TO_NORMKIT.items()}


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Make every torch.nn normalization layer of ``model`` (the model itself included) a normkit layer, in
    place, and return ``model``. ``backend`` pins the layers to one backend by name (also on layers that were
    already normkit's); None leaves the registry's order in charge."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        installed = [b.name for b in registry.list_backends(load=False)]
        if backend not in installed:
            raise registry.UnknownBackendError(
                f"convert: unknown backend {backend!r}; installed backends: {', '.join(installed)}")
    for module in model.modules():
        cls = _TO_NORMKIT.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if backend is not None and type(module) in _TO_TORCH:
            module.backend = backend
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: every normkit normalization layer becomes its torch.nn class again, in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        cls = _TO_TORCH.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.__dict__.pop("backend", None)
    return model
