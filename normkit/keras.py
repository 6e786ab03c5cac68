"""A Keras-style ``BatchNormalization`` layer on NumPy arrays, with the semantics of tf_keras 2.21's layer,
computed with BatchNorm's split kernels (:mod:`normkit.split`).

    layer = normkit.BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3)
    y = layer(x, training=True)            # batch statistics; updates the moving statistics
    dx, dgamma, dbeta = layer.backward(dy)  # gradients of the last training call
    y = layer(x)                           # training=False: the moving statistics

What tf_keras does, and so what this layer does:

- Training: per-channel mean and biased variance over every axis but ``axis``;
  ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``; each moving statistic becomes
  ``moving - (moving - batch) * (1 - momentum)`` (``moving * momentum + batch * (1 - momentum)``) with the biased
  batch variance. Inference normalizes with ``moving_mean`` and ``moving_variance``.
- ``fused``: tf_keras's fused path, which it takes by default (``fused=None``) for float32 layers on inputs of
  rank 4 with axis 1 or 3 and rank 5 with axis 1 or 4, without renorm or ghost batches, computes the same but
  moves ``moving_variance`` towards the unbiased batch variance (count / (count - 1) times the biased one; 0 for
  one value). ``fused`` is decided as tf_keras decides it, at build; ``fused=False`` is the path described here.
- ``renorm`` (Batch Renormalization): with ``sigma = sqrt(var + epsilon)`` and ``s = max(renorm_stddev,
  sqrt(epsilon))``, ``r = clip(sigma / s, rmin, rmax)`` and ``d = clip((mean - renorm_mean) / s, -dmax, dmax)``
  (a missing key does not clip), ``y = gamma * (xhat * r + d) + beta`` with r and d constants for the gradient.
  Then ``renorm_mean`` and ``renorm_stddev`` move towards mean and sigma with ``renorm_momentum``,
  ``moving_mean`` towards mean and ``moving_stddev`` towards sigma with ``momentum``, and ``moving_variance =
  max(moving_stddev**2 - epsilon, 0)``. ``moving_stddev`` and ``renorm_stddev`` start at sqrt(1) = 1.
- ``virtual_batch_size`` (ghost batches): the batch (N, ...) is reshaped to (virtual_batch_size, N //
  virtual_batch_size, ...), so sample i belongs to ghost batch i mod (N // virtual_batch_size); each ghost batch
  is normalized with its own statistics, the moving statistics (and renorm's r and d) use the mean over the ghost
  batches of their means and of their variances. As in tf_keras the parameters then have the shape
  ``(1, 1, ..., C)`` (rank + 1) instead of ``(C,)``.

As in Keras 2, a layer whose ``trainable`` is False runs in inference mode whatever ``training`` says (freezing
a BatchNormalization for fine-tuning freezes its statistics too), and ``training`` takes Keras's learning phase, 1
or 0, as well as a bool.

Variables are NumPy arrays of the layer's ``dtype`` (float32 unless ``dtype="float64"``), replaced (never
modified in place) by each training call. Inputs may be float32 or float64 (the output has the input's dtype, not
the layer's); statistics are float64. ``backward`` keeps a reference to the last training call's input: do not
modify it in between.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import warnings

import numpy as np

from . import registry, split

__all__ = ["BatchNormalization"]

_CLIP_KEYS = ("rmax", "rmin", "dmax")
_NAMED_INITIALIZERS = {"zeros": 0.0, "ones": 1.0}


def _describe(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _weighted_moments(x3: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel of the (N, C, S) kernel view: tf.nn.weighted_moments's mean and variance (0 where the weights
    sum to 0, its div_no_nan) in float64, and the weights' sum (the count of a 0 / 1 mask)."""
    x64 = x3.astype(np.float64)
    total = weights.sum(axis=(0, 2))
    scale = _reciprocal_no_nan(total)
    with np.errstate(invalid="ignore", over="ignore"):  # (an inf in the data: NaN statistics, as in tf)
        mean = (weights * x64).sum(axis=(0, 2)) * scale
        var = (weights * np.square(x64 - mean[:, None])).sum(axis=(0, 2)) * scale
    return mean, var, total


def _weighted_backward(dy3, x3, weights, total, mean, rstd, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx of y = w * (x - mean) * rstd + b with the weighted statistics (``total``: the weights' sum per channel),
    and the sums of dy and dy * xhat over every position: dx = w * rstd * (dy - weights * (sum(dy) + xhat *
    sum(dy * xhat)) / total)."""
    dy64 = dy3.astype(np.float64)
    scale = _reciprocal_no_nan(total)
    with np.errstate(invalid="ignore", over="ignore"):  # (an inf in the data, rstd inf: NaN, as in the forward)
        xhat = (x3.astype(np.float64) - mean[:, None]) * rstd[:, None]
        sum_dy, sum_dy_xhat = dy64.sum(axis=(0, 2)), (dy64 * xhat).sum(axis=(0, 2))
        dx = (w * rstd)[:, None] * (dy64 - weights * scale[:, None] * (sum_dy[:, None] + xhat * sum_dy_xhat[:, None]))
    return dx.astype(x3.dtype), sum_dy, sum_dy_xhat


def _reciprocal_no_nan(total: np.ndarray) -> np.ndarray:
    """1 / total, 0 where total is 0 (tf's div_no_nan: negative sums divide too)."""
    with np.errstate(divide="ignore"):
        return np.where(total != 0, 1.0 / total, 0.0)


class BatchNormalization:
    """tf_keras's ``BatchNormalization`` for NumPy arrays, with a ``backward``; see :mod:`normkit.keras`."""

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", moving_mean_initializer="zeros",
                 moving_variance_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, fused=None, trainable=True, virtual_batch_size=None, adjustment=None,
                 name="batch_normalization", synchronized=False, dtype="float32", backend=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"BatchNormalization: name must be a str or None, got {_describe(name)}")
        self.name = "batch_normalization" if name is None else name
        for arg, v in (("beta_regularizer", beta_regularizer), ("gamma_regularizer", gamma_regularizer),
                       ("beta_constraint", beta_constraint), ("gamma_constraint", gamma_constraint)):
            if v is not None:  # (tf_keras adds a regularizer to the model's loss, applies a constraint after an update)
                raise ValueError(f"{self._who}: {arg} must be None: normkit's layer has no loss or optimizer to "
                                 f"apply it in (add it in the training code), got {_describe(v)}")
        if adjustment is not None:
            raise ValueError(f"{self._who}: adjustment must be None (not supported), got {_describe(adjustment)}")
        if synchronized is not False:
            raise ValueError(f"{self._who}: synchronized must be False (normkit.torch.SyncBatchNorm synchronizes "
                             f"BatchNorm across processes), got {_describe(synchronized)}")
        self.beta_initializer = self._initializer("beta_initializer", beta_initializer)
        self.gamma_initializer = self._initializer("gamma_initializer", gamma_initializer)
        self.moving_mean_initializer = self._initializer("moving_mean_initializer", moving_mean_initializer)
        self.moving_variance_initializer = self._initializer("moving_variance_initializer",
                                                             moving_variance_initializer)
        if isinstance(axis, (list, tuple)):
            axes = list(axis)
        else:
            axes = [axis]
        if not axes or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axes):
            raise TypeError(f"{self._who}: axis must be an int or a non-empty list/tuple of ints, got "
                            f"{_describe(axis)}")
        self.axis = [int(a) for a in axes] if isinstance(axis, (list, tuple)) else int(axis)
        self.momentum = self._fraction("momentum", momentum)
        self.renorm_momentum = self._fraction("renorm_momentum", renorm_momentum)
        self.epsilon = self._epsilon(epsilon)
        for arg, v in (("center", center), ("scale", scale), ("renorm", renorm)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{self._who}: {arg} must be a bool, got {_describe(v)}")
        self.center, self.scale, self.renorm = bool(center), bool(scale), bool(renorm)
        self.renorm_clipping = self._clipping(renorm_clipping)
        self.virtual_batch_size = self._virtual_batch_size(virtual_batch_size)
        if not isinstance(trainable, (bool, np.bool_)):
            raise TypeError(f"{self._who}: trainable must be a bool, got {_describe(trainable)}")
        self.trainable = bool(trainable)
        try:
            self.dtype = np.dtype("float32" if dtype is None else dtype)  # (np.dtype(None) is float64)
        except TypeError:
            raise TypeError(f"{self._who}: dtype must be float32 or float64 (a NumPy dtype or its name), got "
                            f"{_describe(dtype)}") from None
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"{self._who}: dtype must be float32 or float64, got {self.dtype}")
        if fused is not None and not isinstance(fused, (bool, np.bool_)):
            raise TypeError(f"{self._who}: fused must be None or a bool, got {_describe(fused)}")
        self._fused_arg = None if fused is None else bool(fused)
        if self._fused_arg:
            self._fused_cannot_be_used(raise_=True)
        self.fused = self._fused_arg if self._fused_cannot_be_used() is None else False  # tf_keras: None till build
        if backend is not None:
            registry.require_backend(backend, self._who)
        self.backend = backend
        self.built = False
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self._saved = self._batch_stats = None

    # --- arguments -------------------------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        return f"BatchNormalization {self.name!r}"

    def _fraction(self, arg, v) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{self._who}: {arg} must be a number in [0, 1], got {_describe(v)}")
        return float(v)

    def _epsilon(self, v) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{self._who}: epsilon must be a finite number >= 0, got {_describe(v)}")
        return float(v)

    def _fused_cannot_be_used(self, raise_: bool = False):
        """Why tf_keras's fused path cannot take this layer whatever the input's rank (its
        ``_raise_if_fused_cannot_be_used``), or None; with ``raise_`` a ValueError saying it."""
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        why = None
        if self.renorm:
            why = "fused=True and renorm=True together are not supported"
        elif len(axes) > 1 or axes[0] not in (-4, -3, -1, 1, 3, 4):
            why = (f"fused=True is only supported when axis is 1 or 3 for inputs of rank 4, 1 or 4 for rank 5; "
                   f"got axis={self.axis}")
        elif self.virtual_batch_size is not None:
            why = "fused=True is not supported with virtual_batch_size"
        elif self.dtype == np.float64:
            why = "fused=True is only supported for float32 layers (as tf_keras's, for float16/bfloat16/float32)"
        if why and raise_:
            raise ValueError(f"{self._who}: {why}")
        return why

    def _resolve_fused(self, ndim: int, axes: list) -> bool:
        """Whether a layer built for inputs of rank ``ndim`` takes tf_keras's fused path (its ``build``): fused
        None takes it for rank 4 with axis 1 or 3 and rank 5 with axis 1 or 4 where nothing else rules it out."""
        if self._fused_arg is False or self._fused_cannot_be_used(raise_=bool(self._fused_arg)):
            return False
        if ndim not in (4, 5):
            if self._fused_arg:
                raise ValueError(f"{self._who}: fused=True supports inputs of rank 4 or 5 only, got rank {ndim}")
            return False
        if axes == [1] or axes == [ndim - 1]:
            return True
        if ndim == 5:
            return False
        raise ValueError(f"{self._who}: the fused path (fused={self._fused_arg}) takes axis 1 or 3 for inputs of "
                         f"rank 4, got axis {axes} (tf_keras refuses it too; pass fused=False)")

    def _virtual_batch_size(self, v):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{self._who}: virtual_batch_size must be None or a positive int, got {_describe(v)}")
        if v <= 0:
            raise ValueError(f"{self._who}: virtual_batch_size must be a positive int, got {v}")
        return int(v)

    def _initializer(self, arg, v):
        """An initializer as tf_keras takes it: "zeros" / "ones", its serialized form (a dict with "class_name"
        Zeros, Ones or Constant), or a callable ``f(shape, dtype=...)`` (tf_keras's initializer objects are)."""
        if isinstance(v, str) and v.lower() in _NAMED_INITIALIZERS:
            return v
        if isinstance(v, collections.abc.Mapping) and v.get("class_name") in ("Zeros", "Ones", "Constant"):
            value = dict(v.get("config") or {}).get("value", 0.0)
            if v["class_name"] != "Constant" or np.asarray(value).dtype.kind in "iuf":  # (a number or an array)
                return dict(v)
        if callable(v) and not isinstance(v, type):
            return v
        raise ValueError(f"{self._who}: {arg} must be 'zeros', 'ones', a serialized Zeros / Ones / Constant "
                         f"initializer, or a callable f(shape, dtype=...) (a tf_keras initializer object), got "
                         f"{_describe(v)}")

    def _initial(self, arg: str, shape: tuple) -> np.ndarray:
        """The initial value of shape ``shape`` that initializer ``arg`` gives."""
        init = getattr(self, arg)
        if isinstance(init, str):
            return np.full(shape, _NAMED_INITIALIZERS[init.lower()], self.dtype)
        if isinstance(init, collections.abc.Mapping):
            value = {"Zeros": 0.0, "Ones": 1.0}.get(init["class_name"])
            value = np.asarray(dict(init.get("config") or {}).get("value", 0.0) if value is None else value)
            try:
                return np.broadcast_to(value, shape).astype(self.dtype)
            except ValueError:
                raise ValueError(f"{self._who}: {arg}'s Constant value has shape {value.shape}, which does not fit "
                                 f"the variable's shape {shape}") from None
        value = np.asarray(init(shape, dtype=self.dtype.name))
        if value.shape != shape:
            raise ValueError(f"{self._who}: {arg} gave an array of shape {value.shape}, expected {shape}")
        return value.astype(self.dtype)

    def _clipping(self, clipping) -> dict:
        if clipping is None:
            return {}
        if not isinstance(clipping, collections.abc.Mapping):
            raise TypeError(f"{self._who}: renorm_clipping must be None or a dict with keys among {_CLIP_KEYS}, "
                            f"got {_describe(clipping)}")
        bad = sorted(set(clipping) - set(_CLIP_KEYS), key=str)
        if bad:
            raise ValueError(f"{self._who}: renorm_clipping has keys {bad}; expected keys among {_CLIP_KEYS}")
        out = {}
        for k, v in clipping.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ValueError(f"{self._who}: renorm_clipping[{k!r}] must be a number, got {_describe(v)}")
            out[k] = float(v)
        if out.get("dmax", 0.0) < 0:
            raise ValueError(f"{self._who}: renorm_clipping['dmax'] must be >= 0, got {out['dmax']}")
        if out.get("rmin", -math.inf) > out.get("rmax", math.inf):
            raise ValueError(f"{self._who}: renorm_clipping['rmin']={out['rmin']} is larger than "
                             f"renorm_clipping['rmax']={out['rmax']}")
        return out

    def _input(self, arg, x) -> np.ndarray:
        if type(x).__module__.split(".")[0] == "torch" or isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{self._who}: {arg} must be a float32 or float64 NumPy array, got {type(x).__name__}")
        x = np.asarray(x)
        if x.dtype.newbyteorder("=") not in (np.float32, np.float64):
            raise TypeError(f"{self._who}: {arg} must be float32 or float64, got dtype {x.dtype}")
        if not x.dtype.isnative:  # byte-swapped: copied, as the ops do
            x = x.astype(x.dtype.newbyteorder("="))
        if x.size == 0:
            raise ValueError(f"{self._who}: {arg} must not be empty, got shape {x.shape}")
        return x

    # --- build -----------------------------------------------------------------------------------------------

    _VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")

    def build(self, input_shape) -> None:
        """Create the variables for inputs of ``input_shape`` from the initializers (Keras's defaults: gamma 1, beta 0,
        moving_mean 0, moving_variance 1; with renorm moving_stddev and renorm_stddev the square root of
        moving_variance's, renorm_mean moving_mean's)."""
        if not self.built:  # (a layer is built once; torch's module rebuilds its core, whose variables it lends)
            assigned = self._weight_names()
            if assigned:  # build would replace them with the initial values, silently
                raise ValueError(f"{self._who}: {', '.join(assigned)} assigned before the layer was built; build "
                                 f"it first (layer.build(input_shape)), then assign them or call set_weights")
        try:
            shape = tuple(None if s is None else int(s) for s in input_shape)
        except (TypeError, ValueError):
            raise TypeError(f"{self._who}: input_shape must be a sequence of ints (None where unknown, as the "
                            f"batch size), got {_describe(input_shape)}") from None
        ndim = len(shape)
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"{self._who}: axis {a} is out of range for inputs of rank {ndim} "
                                 f"(shape {shape}); expected -{ndim} <= axis < {ndim}")
        axes = sorted(a % ndim for a in axes)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{self._who}: axis {self.axis} has a duplicate axis for inputs of rank {ndim}")
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(f"{self._who}: with virtual_batch_size the batch dimension must be 0, so axis cannot "
                             f"include 0, got axis={self.axis} for inputs of rank {ndim}")
        if any(s is not None and s <= 0 for s in shape):
            raise ValueError(f"{self._who}: input_shape must have positive sizes, got {shape}")
        if any(shape[a] is None for a in axes):
            raise ValueError(f"{self._who}: the size of axis {self.axis} must be known to build, got input_shape "
                             f"{shape}")
        self.fused = self._resolve_fused(ndim, axes)
        self._ndim, self._axes = ndim, axes
        self._dims = {a: shape[a] for a in axes}
        self._c = math.prod(shape[a] for a in axes)
        if len(axes) == 1 and self.virtual_batch_size is None:
            param_shape = (shape[axes[0]],)
        else:
            param_shape = [shape[i] if i in axes else 1 for i in range(ndim)]
            if self.virtual_batch_size is not None:
                param_shape.insert(1, 1)
            param_shape = tuple(param_shape)
        self._param_shape = param_shape
        for name, value in self._initial_values(param_shape).items():
            setattr(self, name, value)
        self.built = True

    def _initial_values(self, shape: tuple) -> dict[str, np.ndarray]:
        """The variables the layer has, of ``shape``, as its initializers make them."""
        values = {"gamma": self._initial("gamma_initializer", shape) if self.scale else None,
                  "beta": self._initial("beta_initializer", shape) if self.center else None,
                  "moving_mean": self._initial("moving_mean_initializer", shape),
                  "moving_variance": self._initial("moving_variance_initializer", shape)}
        if self.renorm:  # tf_keras: renorm_mean starts as moving_mean, the standard deviations at the square root of
            # moving_variance's initializer
            stddev = np.sqrt(self._initial("moving_variance_initializer", shape))
            values |= {"moving_stddev": stddev, "renorm_mean": self._initial("moving_mean_initializer", shape),
                       "renorm_stddev": stddev.copy()}
        return values

    def _check_shape(self, x: np.ndarray) -> None:
        if x.ndim != self._ndim:
            raise ValueError(f"{self._who}: expected inputs of rank {self._ndim} (as built), got shape {x.shape}")
        for a, s in self._dims.items():
            if x.shape[a] != s:
                raise ValueError(f"{self._who}: expected axis {a} of the input to have size {s} (as built), got "
                                 f"shape {x.shape}")

    def _flat(self, name: str) -> np.ndarray:
        """The variable ``name`` as a float64 (C,) array (checked: the user may have assigned it)."""
        v = np.asarray(getattr(self, name), np.float64)
        if v.size != self._c:
            raise ValueError(f"{self._who}: {name} has shape {v.shape}, expected {self._param_shape}")
        return v.reshape(self._c)

    def _store(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(v, np.float64).astype(self.dtype).reshape(self._param_shape)

    # --- layout ----------------------------------------------------------------------------------------------

    def _layout(self, shape: tuple, ghosts: int):
        """How to view an input of ``shape`` as the kernels' (N', C', S'): (shape of the array to transpose,
        permutation, (N', C', S')). With ghost batches the batch axis becomes (virtual_batch_size, ghosts) and the
        ghost axis joins the channel axes, so that C' = ghosts * C in ghost-major order."""
        if ghosts:
            full = (self.virtual_batch_size, ghosts) + shape[1:]
            kept = [1] + [a + 1 for a in self._axes]
        else:
            full, kept = shape, list(self._axes)
        lead = [i for i in range(len(full)) if i not in kept and i < kept[0]]
        trail = [i for i in range(len(full)) if i not in kept and i > kept[0]]
        perm = lead + kept + trail
        view = (math.prod(full[i] for i in lead), math.prod(full[i] for i in kept),
                math.prod(full[i] for i in trail))
        return full, perm, view

    @staticmethod
    def _to_kernel(x: np.ndarray, layout) -> np.ndarray:
        full, perm, view = layout
        return np.ascontiguousarray(x.reshape(full).transpose(perm)).reshape(view)

    @staticmethod
    def _from_kernel(y: np.ndarray, layout, shape: tuple) -> np.ndarray:
        full, perm, _ = layout
        y = y.reshape([full[i] for i in perm]).transpose(np.argsort(perm))
        return np.ascontiguousarray(y).reshape(shape)

    # --- the layer -------------------------------------------------------------------------------------------

    def __call__(self, inputs, training=False, mask=None):
        """The layer's output for ``inputs``: batch statistics when ``training`` (and the moving statistics are
        updated), the moving statistics otherwise (``training=None`` is inference, as tf_keras's default learning
        phase; 1 and 0 are Keras's learning phases). A layer with ``trainable = False`` runs in inference mode
        whatever ``training`` says (Keras 2's rule for BatchNormalization, which fine-tuning relies on). The first
        call builds the layer for the input's shape.

        ``mask`` (tf_keras's): weights, usually 0 / 1, of the input's shape without its last axis (as a Masking or
        ``Embedding(mask_zero=True)`` layer gives them); training statistics are then the weighted mean and
        variance (masked positions left out), and every position is normalized with them. The fused path ignores
        it with a warning, as tf_keras's does; inference does not use it."""
        if isinstance(training, numbers.Integral) and training in (0, 1):  # (bools too)
            training = bool(training)
        if not isinstance(training, (bool, np.bool_)) and training is not None:
            raise TypeError(f"{self._who}: training must be a bool (or Keras's learning phase, 0 or 1), got "
                            f"{_describe(training)}")
        x = self._input("inputs", inputs)
        if not self.built:
            self.build(x.shape)
        self._check_shape(x)
        if mask is not None and self.fused:  # (in training and inference alike, as tf_keras's warning)
            warnings.warn(f"{self._who}: mask is ignored on the fused path (as tf_keras does); pass fused=False to "
                          f"use it", UserWarning, stacklevel=2)
            mask = None
        if not (training and self.trainable):
            return self._infer(x)  # (which reads no mask, as tf_keras's does not)
        return self._train(x, None if mask is None else self._mask(mask, x))

    def _mask(self, mask, x: np.ndarray) -> np.ndarray:
        """tf_keras's mask as weights of x's shape (float64), for a training call."""
        if type(mask).__module__.split(".")[0] == "torch" or isinstance(mask, (str, bytes)):
            raise TypeError(f"{self._who}: mask must be a NumPy array of bools or numbers, got {type(mask).__name__}")
        m = np.asarray(mask)
        if m.dtype.kind not in "biuf":
            raise TypeError(f"{self._who}: mask must hold bools or numbers, got dtype {m.dtype}")
        try:
            weights = np.broadcast_to(m.astype(np.float64)[..., None], x.shape)
        except ValueError:
            raise ValueError(f"{self._who}: mask of shape {m.shape} does not broadcast to the input's shape {x.shape} "
                             f"with an axis added last (tf_keras's rule: the input's shape without its last "
                             f"axis)") from None
        if self.virtual_batch_size is not None:
            raise ValueError(f"{self._who}: mask with virtual_batch_size is not supported in training")
        return weights

    def _infer(self, x: np.ndarray) -> np.ndarray:
        layout = self._layout(x.shape, 0)
        x3 = self._to_kernel(x, layout)
        rstd = 1.0 / np.sqrt(self._flat("moving_variance") + self.epsilon)
        x3, centre = split.centered(x3, self._flat("moving_mean"), rstd)
        scale, shift = split.apply_coefficients(centre, rstd, self._weight(), self._bias(), x.dtype)
        y3 = split.batchnorm_apply(x3, scale, shift, self.backend)
        return self._from_kernel(y3, layout, x.shape)

    def _weight(self):
        return None if self.gamma is None else self._flat("gamma")

    def _bias(self):
        return None if self.beta is None else self._flat("beta")

    def _train(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        n, vbs = x.shape[0], self.virtual_batch_size
        if vbs is not None and n % vbs:
            raise ValueError(f"{self._who}: virtual_batch_size={vbs} must divide the batch size, got a batch of "
                             f"{n} (shape {x.shape})")
        ghosts = 0 if vbs is None else n // vbs
        g = max(ghosts, 1)
        layout = self._layout(x.shape, ghosts)
        x3 = self._to_kernel(x, layout)
        if mask is None:
            stats = split.batchnorm_stats(x3, self.backend)
            mean_gc, var_gc, count, weights = stats.mean, stats.var, stats.count, None  # (G * C,), ghost-major
        else:  # (no ghost batches, not fused: see _mask)
            weights = self._to_kernel(mask, layout)
            mean_gc, var_gc, count = _weighted_moments(x3, weights)
        with np.errstate(divide="ignore"):  # epsilon 0 and a set without variance: inf, then NaN as in tf_keras
            rstd_gc = 1.0 / np.sqrt(var_gc + self.epsilon)
        new_mean = mean_gc.reshape(g, self._c).mean(axis=0)           # tf_keras: the mean over ghost batches
        new_var = var_gc.reshape(g, self._c).mean(axis=0)
        gamma, beta = self._weight(), self._bias()
        renorm_state = {}
        if self.renorm:
            r, d, renorm_state = self._renorm(new_mean, new_var)
        else:
            r, d = np.ones(self._c), np.zeros(self._c)
        w = (1.0 if gamma is None else gamma) * r                       # y = w * xhat + b, r and d constants
        b = (1.0 if gamma is None else gamma) * d + (0.0 if beta is None else beta)
        w_gc, b_gc = np.tile(w, g), np.tile(b, g)
        xc, centre = split.centered(x3, mean_gc, rstd_gc)
        with np.errstate(invalid="ignore"):
            # (a weighted variance of 0 does not make every value its mean: masked values may differ)
            scale, shift = split.apply_coefficients(centre, rstd_gc, w_gc, b_gc, x.dtype,
                                                    var_gc if weights is None else None)
        y3 = split.batchnorm_apply(xc, scale, shift, self.backend)
        for name, v in renorm_state.items():  # (the state moves only once the call has succeeded)
            setattr(self, name, v)
        moving_var = new_var
        if self.fused:  # FusedBatchNormV3's unbiased variance goes into moving_variance (of 1 value: 0)
            moving_var = new_var * (count / (count - 1)) if count > 1 else np.zeros_like(new_var)
        self._update(new_mean, moving_var)
        self._batch_stats = (new_mean, new_var, count)             # for normkit.torch's BatchRenorm/GhostBatchNorm
        self._saved = (x3, layout, x.shape, mean_gc, rstd_gc, w_gc, r, d, count, g, weights)
        return self._from_kernel(y3, layout, x.shape)

    def _renorm(self, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Batch Renormalization's r and d (tf_keras's ``_renorm_correction_and_moments``), and the new
        renorm_mean and renorm_stddev."""
        sigma = np.sqrt(var + self.epsilon)
        renorm_mean, renorm_stddev = self._flat("renorm_mean"), self._flat("renorm_stddev")
        s = np.maximum(renorm_stddev, math.sqrt(self.epsilon))
        r = sigma / s
        d = (mean - renorm_mean) / s
        clip = self.renorm_clipping
        if "rmin" in clip:
            r = np.maximum(r, clip["rmin"])
        if "rmax" in clip:
            r = np.minimum(r, clip["rmax"])
        if "dmax" in clip:
            d = np.minimum(np.maximum(d, -clip["dmax"]), clip["dmax"])
        decay = 1.0 - self.renorm_momentum
        return r, d, {"renorm_mean": self._store(renorm_mean - (renorm_mean - mean) * decay),
                      "renorm_stddev": self._store(renorm_stddev - (renorm_stddev - sigma) * decay)}

    def _update(self, mean: np.ndarray, var: np.ndarray) -> None:
        decay = 1.0 - self.momentum
        moving_mean = self._flat("moving_mean")
        self.moving_mean = self._store(moving_mean - (moving_mean - mean) * decay)
        if self.renorm:
            moving_stddev = self._flat("moving_stddev")
            moving_stddev = moving_stddev - (moving_stddev - np.sqrt(var + self.epsilon)) * decay
            self.moving_stddev = self._store(moving_stddev)
            stddev = self._flat("moving_stddev")  # as stored, as tf_keras reads it back
            self.moving_variance = self._store(np.maximum(stddev * stddev - self.epsilon, 0.0))
        else:
            moving_variance = self._flat("moving_variance")
            self.moving_variance = self._store(moving_variance - (moving_variance - var) * decay)

    def backward(self, dy):
        """Gradients ``(dx, dgamma, dbeta)`` of the last training call's output for the output gradient ``dy``
        (dgamma None without ``scale``, dbeta None without ``center``). The batch statistics depend on x; renorm's
        r and d are constants, as in tf_keras. dx has the input's dtype, dgamma and dbeta the layer's."""
        if self._saved is None:
            raise ValueError(f"{self._who}: backward needs a training call first (layer(x, training=True))")
        return self._backward(self._saved, dy)

    def _backward(self, saved: tuple, dy):
        """``backward`` for the state ``saved`` by one training call (``_saved`` right after it): the torch frontend
        (normkit.torch.BatchNormalization) keeps it per call, for autograd."""
        x3, layout, shape, mean_gc, rstd_gc, w_gc, r, d, count, g, weights = saved
        dy = self._input("dy", dy)
        if dy.shape != shape:
            raise ValueError(f"{self._who}: dy must have the shape of the last training call's input {shape}, "
                             f"got {dy.shape}")
        if dy.dtype != x3.dtype:
            raise TypeError(f"{self._who}: dy must have the last training call's input dtype {x3.dtype}, got "
                            f"{dy.dtype}")
        dy3 = self._to_kernel(dy, layout)
        if weights is None:
            x3, centre = split.centered(x3, mean_gc, rstd_gc)
            sum_dy, sum_dy_xhat = split.batchnorm_backward_reduce(dy3, x3, centre, rstd_gc, self.backend)
            with np.errstate(invalid="ignore"):  # (rstd inf: see _train)
                a, b, dd = split.backward_coefficients(centre, rstd_gc, w_gc, sum_dy, sum_dy_xhat, count, x3.dtype)
            dx3 = split.batchnorm_backward_apply(dy3, x3, a, b, dd, self.backend)
        else:
            dx3, sum_dy, sum_dy_xhat = _weighted_backward(dy3, x3, weights, count, mean_gc, rstd_gc, w_gc)
        dx = self._from_kernel(dx3, layout, shape)
        sdy = sum_dy.reshape(g, self._c).sum(axis=0)
        sdyx = sum_dy_xhat.reshape(g, self._c).sum(axis=0)
        dgamma = self._store(r * sdyx + d * sdy) if self.scale else None
        dbeta = self._store(sdy) if self.center else None
        return dx, dgamma, dbeta

    def get_config(self) -> dict:
        """The constructor's arguments, as tf_keras's ``get_config`` gives them (and ``fused`` and ``backend``):
        ``BatchNormalization.from_config(layer.get_config())`` makes the same layer, unbuilt."""
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype.name, "axis": self.axis,
                "momentum": self.momentum, "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
                "beta_initializer": self.beta_initializer, "gamma_initializer": self.gamma_initializer,
                "moving_mean_initializer": self.moving_mean_initializer,
                "moving_variance_initializer": self.moving_variance_initializer, "beta_regularizer": None,
                "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None, "renorm": self.renorm,
                "renorm_clipping": dict(self.renorm_clipping), "renorm_momentum": self.renorm_momentum,
                "virtual_batch_size": self.virtual_batch_size, "fused": self._fused_arg, "backend": self.backend}

    @classmethod
    def from_config(cls, config) -> "BatchNormalization":
        """A layer from :meth:`get_config`'s dict, or from a tf_keras BatchNormalization's ``get_config()``."""
        if not isinstance(config, collections.abc.Mapping):
            raise TypeError(f"BatchNormalization.from_config: config must be a dict, got {_describe(config)}")
        return cls(**config)

    def get_weights(self) -> list[np.ndarray]:
        """The variables in tf_keras's order: gamma, beta (when present), moving_mean, moving_variance, and with
        renorm moving_stddev, renorm_mean, renorm_stddev."""
        return [getattr(self, k).copy() for k in self._weight_names()]

    def _weight_names(self) -> list[str]:
        """The variables the layer has (built: per scale, center and renorm), in tf_keras's order."""
        return [k for k in self._VARIABLES if getattr(self, k) is not None]

    def set_weights(self, weights) -> None:
        """Assign the variables from a list in :meth:`get_weights`'s order and shapes (tf_keras's), copied in the
        layer's dtype: a tf_keras layer's ``get_weights()`` loads here. The layer must be built."""
        if not self.built:
            raise ValueError(f"{self._who}: set_weights on a layer that is not built; build it first "
                             f"(layer.build(input_shape)) or call it once")
        names = self._weight_names()
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{self._who}: set_weights expects {len(names)} arrays ({', '.join(names)}), got "
                             f"{len(weights)}")
        values = [np.asarray(w) for w in weights]
        for name, v in zip(names, values):
            if v.shape != self._param_shape:
                raise ValueError(f"{self._who}: set_weights: {name} must have shape {self._param_shape}, got "
                                 f"{v.shape}")
            if v.dtype.kind not in "fiu":
                raise TypeError(f"{self._who}: set_weights: {name} must be real numbers, got dtype {v.dtype}")
        for name, v in zip(names, values):
            setattr(self, name, v.astype(self.dtype))

    def __repr__(self) -> str:
        return (f"BatchNormalization(axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
                f"center={self.center}, scale={self.scale}, renorm={self.renorm}, "
                f"renorm_clipping={self.renorm_clipping or None}, renorm_momentum={self.renorm_momentum}, "
                f"virtual_batch_size={self.virtual_batch_size}, dtype={self.dtype.name!r}, name={self.name!r})")
