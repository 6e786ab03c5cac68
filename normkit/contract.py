"""The op table and the kernel contract: what every op is, and what every backend (built-in or plugin) implements.

Every fact about an op lives in its :class:`OpSpec` in :data:`SPECS`: its names, its ``torch.nn.functional``
twin, its directions and each direction's kernel arguments, how its input is cut into normalized sets (which gives
the shapes of the statistics), whether it is centered (RMSNorm is not), and where its parameters sit. The NumPy
and PyTorch frontends, the reference, the conformance kit, the bench and the tests derive what they need from
this table; an op that is not in it is an error everywhere, never another op.

A backend's kernels module exposes ``KERNELS``, a dict mapping ``(op, direction, dtype)`` to a callable, e.g.
``KERNELS[("groupnorm", "forward", "float32")]``. normkit's frontends validate all arguments, make every array
C-contiguous with the kernel's dtype, allocate every output, and then call the kernel positionally with the
arguments :attr:`OpSpec.args` names. Every array (and every address) starts at a multiple of its element size,
and at no larger boundary in general: views of a tensor or an array start anywhere on an element, so a kernel
must not assume 16-, 32- or 64-byte alignment (unaligned vector loads, or a scalar start up to an aligned
address). A kernel only computes: it writes its outputs in place, returns nothing, and never writes anywhere else.
Data without values never reaches a kernel (the PyTorch frontend gives empty inputs torch's results itself: empty
outputs, untouched running statistics, zero parameter gradients; the NumPy frontend refuses them), so a kernel may
assume every dimension of its data is at least 1: the conformance kit never calls one on empty data, and the
built-in kernels promise only not to crash the process there.

Shapes: ``x``, ``dy``, ``y``, ``dx`` are (N, C, S) for the channel ops (batchnorm / instancenorm / groupnorm; S is
the product of the spatial dims, 1 for (N, C) inputs) and (M, K) for the row ops (layernorm, rmsnorm; K =
prod(normalized_shape)). All arrays have the kernel's dtype, including ``mean``/``rstd`` (but see the split
directions and the 16-bit dtypes below). ``weight``/``bias`` may be ``None`` (no affine); in backward
``dweight``/``dbias`` are ``None`` when that gradient is not wanted. ``rstd`` is ``1 / sqrt(var + eps)`` with the
biased (population) variance.
Statistics must not be computed as E[x^2] - E[x]^2 in working precision.

``backward`` is the gradient of a training-mode forward (statistics depend on x):
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over each normalized set, with ``g = dy * weight`` and
``xhat = (x - mean) * rstd``; ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` per channel (per element of
the normalized shape for layernorm). ``backward_infer`` is the gradient of an inference-mode forward, where
``mean``/``rstd`` came from running statistics and are constants: ``dx = dy * weight * rstd``.

Split directions (ops whose spec has ``split=True``: batchnorm). They cut the training step into reductions
and elementwise passes, so that statistics can be merged across batches or processes between the two (synchronized
BatchNorm, Batch Renormalization); the fused ``forward``/``backward`` stay the kernels of plain BatchNorm. Here
``mean``, ``m2``, ``rstd`` (of ``backward_reduce``), ``sum_dy`` and ``sum_dy_xhat`` are float64 (C,) arrays whatever
the kernel's dtype (:func:`arg_dtype`); ``scale``, ``shift``, ``a``, ``b``, ``d`` are (C,) arrays of the kernel's
dtype; ``count`` = N*S is known to the caller and is no argument. Each direction writes only its outputs:

- ``stats(x, mean, m2)``: ``mean[c]`` = the mean of channel c over (N, S) and ``m2[c]`` = sum((x - mean[c])**2)
  (the sum of squared deviations, not the variance), accumulated in float64 on values shifted by a per-channel
  pivot (or compensated), never as E[x^2] - E[x]^2 in working precision; a NaN in a channel makes both NaN, an
  inf makes the mean that inf and m2 NaN (as the reference). Two such triples (count, mean, m2) merge with
  Chan's formula (:func:`normkit.split.merge_stats`).
- ``apply(x, scale, shift, y)``: ``y = x * scale[c] + shift[c]``, in the kernel's dtype (one multiply-add per
  element). For BatchNorm ``scale = weight * rstd`` and ``shift = bias - mean *
  scale``; in float32 the product ``x * scale`` rounds at the size of ``|mean| * rstd`` (the set's condition
  number), which is within the conformance kit's bound for y.
- ``backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat)``: ``sum_dy[c] = sum(dy)`` and ``sum_dy_xhat[c] =
  sum(dy * xhat)`` over (N, S), with ``xhat = (x - mean[c]) * rstd[c]`` and mean/rstd given in float64; stored
  in float64, accumulated at least as accurately as the fused backward's ``dbias`` / ``dweight``.
- ``backward_apply(dy, x, a, b, d, dx)``: ``dx = a[c] * dy + b[c] * x + d[c]``, in the kernel's dtype. For the
  training-mode BatchNorm gradient (weight w, or 1; count M; sums over the whole batch, possibly merged across
  processes), exactly ``dx = w * rstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)`` becomes, per channel
  (computed in float64, then rounded to the dtype)::

      a = w * rstd
      b = -w * rstd**2 * sum_dy_xhat / M
      d = -w * rstd * sum_dy / M - b * mean        (rstd * (rstd * mean * sum_dy_xhat - sum_dy) * w / M)

  and ``dweight = sum_dy_xhat``, ``dbias = sum_dy``. The same form holds other gradients: inference
  (``b = d = 0``), or Batch Renormalization's (its r and d corrections folded into a, b, d).

Fused residual add (ops whose spec has ``fused_add=True``: the row ops). ``h = x + residual`` (rounded once to the
dtype) and ``y = norm(h)`` in one pass over memory, the pre-norm transformer's ``h = x + sublayer(x)`` then
``norm(h)``:

- ``add_forward(x, residual, weight, bias, eps, y, h, mean, rstd)`` writes ``h`` and what ``forward`` on that
  ``h`` writes: the statistics and ``y`` of the sum rounded to the dtype, as a separate add then the norm computes
  them, so that ``add_backward`` (which reads ``h``) differentiates what was normalized. For 16-bit data the
  exact sum and the rounded one can differ by more than the rows' spread (1.0 + 1e-4 in float16);
- ``add_backward(dy, dh, h, mean, rstd, weight, dx, dweight, dbias)``: ``dx`` = the ``backward`` of ``y``'s
  gradient ``dy`` at ``h``, plus ``dh``, the gradient flowing into ``h`` from its other uses (``None`` when there
  is none). ``dx`` is the gradient of both ``x`` and ``residual``.

Uncentered ops (``centered=False``: RMSNorm) have no mean and no bias: ``rstd = 1 / sqrt(mean(x**2) + eps)``,
``y = x * rstd * weight``, and their arguments are the others' without ``bias``, ``mean`` and ``dbias``
(``forward(x, weight, eps, y, rstd)``, ``backward(dy, x, rstd, weight, dx, dweight)`` with ``xhat = x * rstd``
and ``dx = rstd * (g - xhat * mean(g * xhat))``; the add directions likewise). ``mean(x**2)`` is accumulated in
float64, so no cancellation is possible.

Fused activation (ops whose spec has ``activation=True``: batchnorm, instancenorm, groupnorm, layernorm). The
activation that follows a norm in most models, applied in the norm's own pass over memory: ``y = act(z)`` with
``z = xhat * weight + bias`` (what the plain direction writes as ``y``). ``activation`` is an index into
:data:`ACTIVATIONS` (a Python int) and ``slope`` leaky_relu's ``negative_slope`` (a float, ignored by the others).
Each plain direction ``d`` among forward, forward_infer, backward, backward_infer that the op has gains ``act_d``:

- ``act_forward`` / ``act_forward_infer``: the plain direction's arguments with ``activation, slope`` after
  ``eps``; ``y = act(z)``, the statistics as the plain direction's (of x, not of y).
- ``act_backward`` / ``act_backward_infer``: the plain direction's arguments with ``bias, activation, slope`` after
  ``weight``: the plain gradient of ``g = dy * act'(z)`` (so ``dbias = sum(g)``, ``dweight = sum(g * xhat)``),
  where ``z`` is recomputed from x, the given statistics, weight and bias rather than saved.

Derivatives, at z: relu ``0 if z <= 0 else 1``; leaky_relu ``1 if z > 0 else slope`` (both as torch's, also for a NaN z,
whose set is NaN anyway: relu passes dy there, leaky_relu scales it by the slope; and relu's ``g`` is a select, as
torch's backward: 0 where z <= 0 even for a NaN or infinite dy); silu ``s * (1 + z * (1 - s))`` with
``s = sigmoid(z)``; gelu (erf) ``Phi(z) + z * phi(z)``; gelu_tanh that of ``0.5 * z * (1 + tanh(sqrt(2/pi) * (z +
0.044715 * z**3)))`` (torch's ``approximate="tanh"``). ``z`` is computed in the kernel's working precision (float32 at
least) and ``y`` rounded once; accuracy as the plain direction's, except that relu's and leaky_relu's derivative jumps
at 0, so an element whose ``z`` is within rounding of 0 may take either side. :mod:`normkit.activation` holds the same
functions in NumPy. A backend may declare channels-last ``act_`` kernels like any other direction; without one,
channels-last data of a per-channel ``act_`` direction runs its NCHW kernel on the (N*S, C, 1) view and any other goes
through an NCHW copy.

The split, add and activation directions were added to contract 1 without changing its version: a backend that does not
declare them is unaffected.

16-bit dtypes (``bfloat16``, ``float16``): storage in 16 bits, arithmetic in float32 at least. A kernel of one of
:data:`HALF_DTYPES` receives the data arrays ``x``, ``y``, ``dy``, ``dx`` as C-contiguous ``np.uint16`` arrays
holding the raw 16-bit patterns (NumPy has no bfloat16, and Numba and Cython know no 16-bit float type; one storage
type keeps kernels free of ml_dtypes, and the kernel's key says which format). Every other float array (``weight``,
``bias``, ``mean``, ``rstd``, ``running_mean``, ``running_var``, ``dweight``, ``dbias``; ``scale``, ``shift``,
``a``, ``b``, ``d`` of the split directions) is float32; the split directions' float64 arguments stay float64.
:func:`arg_dtype` and :func:`storage_dtype` say this for every argument; nothing else restates it. Statistics are
accumulated as in the float32 kernels (float64, shifted by a pivot; never E[x^2] - E[x]^2). Each 16-bit output
element is rounded once, from float32 (or better) to 16 bits, round-to-nearest-even; NaN stays NaN, beyond the range
gives +-inf (float16's largest value is 65504). Saved ``mean``/``rstd`` are float32. Accuracy: ``y`` within 1 ulp of
the 16-bit type of the float64 reference computed from the exactly widened input and rounded once; ``dx`` within 2
ulp plus the condition-based slack float32 kernels get; float32 outputs as accurate as the float32 kernels'.
Conversions: bfloat16 -> float32 is ``(uint32)u << 16``; float32 -> bfloat16 is ``(u + 0x7FFF + ((u >> 16) & 1)) >>
16`` with NaN kept a quiet NaN (``(u >> 16) | 0x0040``); float16 <-> float32 by F16C where the CPU has it, otherwise a
bit-exact software conversion (subnormals included). :mod:`normkit.half` holds the same conversions in NumPy.

Channels-last kernels (layout ``"nhwc"``; channel ops only: batchnorm, instancenorm, groupnorm; LayerNorm
normalizes trailing dims and has no layout). A backend declares them in ``Backend.channels_last`` (op ->
directions, each also a direction of its ``kernels``; the same dtypes) and provides them under 4-tuple keys
``(op, direction, dtype, "nhwc")``; the 3-tuple keys stay the NCHW kernels. A channels-last kernel takes the same
positional arguments as the NCHW kernel of its direction, except that ``x``, ``y``, ``dy``, ``dx`` are
C-contiguous (N, S, C) arrays (S the product of the spatial dims, in order): the memory of a torch
``channels_last`` / ``channels_last_3d`` tensor, or of a NumPy array with NHWC strides. Every other array
(weight, bias, statistics, running statistics, parameter gradients, the split directions' per-channel arrays) has
exactly the NCHW kernel's shape and meaning; a GroupNorm group is a run of C/G consecutive channels of each row of
C. Numerics and tolerances are the NCHW kernel's. ``normkit.registry.lookup(..., layout="nhwc")`` finds them, of
the backend that runs the op's NCHW kernels (never a later one in the order); when that backend has none, the
frontends run a per-channel direction (:meth:`OpSpec.per_channel`) as the NCHW
kernel on the (N*S, C, 1) view of the data (:func:`on_columns`, no copy), and any other on an NCHW copy of the
input, handing the output back in the input's memory format: a backend without them is at most slower on
channels-last data. An input that is both NCHW- and NHWC-contiguous (C = 1, or S = 1) goes to the NCHW kernel: the
memory is the same. A backend's ``channels_last`` covers float32 and float64 (:data:`LAYOUT_DTYPES`) unless it
names its channels-last dtypes (``Backend.channels_last_dtypes``): 16-bit channels-last kernels take the data
arrays as (N, S, C) ``np.uint16`` bit patterns and everything else as the 16-bit NCHW kernels do; 16-bit data
without them takes the two ways above.

Address kernels (optional; every dtype, :data:`ADDRESS_DTYPES`): the NCHW kernel of a direction, taking
memory by address. A backend declares them in ``Backend.addresses`` (op -> directions, each also a direction of its
``kernels``) and provides them under keys ``(op, direction, dtype, "addr")``. An address kernel takes the kernel
shape first, (N, C, S) or the row ops' (M, K), then the NCHW kernel's positional arguments, except that every array
but the statistics ``mean`` and ``rstd`` is passed as the integer address of its C-contiguous memory (0 for None);
``mean`` and ``rstd`` stay arrays. The kernel cannot check memory behind an address: the caller guarantees that each
holds exactly the array the NCHW kernel would get (16-bit data: its uint16 bit patterns, everything else float32,
as the 16-bit kernels take them). Why they exist: ``normkit.torch``'s eager path hands them a tensor's
``data_ptr()`` where a NumPy view of it and a typed-memoryview acquisition of that view cost ~1 us each, as much as
the whole kernel at small shapes. ``normkit.registry.lookup_address`` finds the one of the backend
``lookup`` picks; :func:`with_addresses` calls one as its NCHW kernel is called (the conformance kit runs them on
the NCHW cases so). On channels-last data of a per-channel direction ``normkit.torch`` runs the address kernel on the
(N*S, C, 1) columns view unless the backend has a channels-last kernel of its own for it (one that :func:`on_columns`
did not make), which then runs. The ``forward`` address kernel of a centered op may return the largest ``|mean| * rstd``
over its sets (a float, sets with a NaN left out), else None: it tells ``normkit.torch`` whether the backward of float32
data shifts it by its mean first (:mod:`normkit.recenter`), which otherwise costs two NumPy calls there, several
microseconds right after autograd's engine (the conformance kit checks a returned value).

The contract is versioned; a backend declares the version it targets and normkit refuses other versions.
Optional module attributes: ``set_num_threads(n)`` (normkit calls it whenever the user sets a thread count, and
once when the module is loaded; it must not change any process-wide setting such as OpenMP's or PyTorch's thread
count) and ``INFO`` (a dict of short strings shown by ``normkit list``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

CONTRACT_VERSION = 1

DTYPES = ("float32", "float64", "bfloat16", "float16")
# Stored in 16 bits, computed in float32: their kernels take the data arrays as uint16 bit patterns (docstring).
HALF_DTYPES = ("bfloat16", "float16")
# The arrays of input size; all others are per-set or per-channel.
DATA_ARGS = ("x", "y", "dy", "dx", "residual", "h", "dh")  # the last three: the fused residual add's
# The fused activations (OpSpec.activation), in the order whose index a kernel receives as ``activation``.
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
ACT_PREFIX = "act_"
# What a backend implements when it names no dtypes (contract 1's): a plugin written then must not start claiming a
# dtype added to DTYPES later.
DEFAULT_DTYPES = ("float32", "float64")

# The kernel arguments of each direction, shared by the ops whose kernels look alike. ``num_groups`` follows x (or
# dy, x) for the ops that have it.
_FORWARD = ("x", "weight", "bias", "eps", "y", "mean", "rstd")
_FORWARD_INFER = ("x", "weight", "bias", "running_mean", "running_var", "eps", "y")
_BACKWARD = ("dy", "x", "mean", "rstd", "weight", "dx", "dweight", "dbias")
_BACKWARD_INFER = _BACKWARD
# The fused residual add (OpSpec.fused_add), row ops only; see the module docstring.
ADD_DIRECTIONS = ("add_forward", "add_backward")
_ADD_FORWARD = ("x", "residual", "weight", "bias", "eps", "y", "h", "mean", "rstd")
_ADD_BACKWARD = ("dy", "dh", "h", "mean", "rstd", "weight", "dx", "dweight", "dbias")
# What an uncentered op (OpSpec.centered=False: RMSNorm) has none of.
_CENTERED_ONLY = ("bias", "mean", "dbias")
# The split directions (OpSpec.split), per-channel ops only; see the module docstring.
SPLIT_DIRECTIONS = ("stats", "apply", "backward_reduce", "backward_apply")
_SPLIT_ARGS = {
    "stats": ("x", "mean", "m2"),
    "apply": ("x", "scale", "shift", "y"),
    "backward_reduce": ("dy", "x", "mean", "rstd", "sum_dy", "sum_dy_xhat"),
    "backward_apply": ("dy", "x", "a", "b", "d", "dx"),
}
# Arguments of a split direction that are float64 whatever the kernel's dtype.
_FLOAT64_ARGS = {
    "stats": ("mean", "m2"),
    "backward_reduce": ("mean", "rstd", "sum_dy", "sum_dy_xhat"),
}

# The outputs of each direction, among its arguments.
OUTPUTS = {
    "forward": ("y", "mean", "rstd"),
    "forward_infer": ("y",),
    "backward": ("dx", "dweight", "dbias"),
    "backward_infer": ("dx", "dweight", "dbias"),
    "stats": ("mean", "m2"),
    "apply": ("y",),
    "backward_reduce": ("sum_dy", "sum_dy_xhat"),
    "backward_apply": ("dx",),
    "add_forward": ("y", "h", "mean", "rstd"),
    "add_backward": ("dx", "dweight", "dbias"),
}
OUTPUTS.update({ACT_PREFIX + d: OUTPUTS[d] for d in ("forward", "forward_infer", "backward", "backward_infer")})


def plain_direction(direction: str) -> str:
    """The direction an activation direction fuses an activation into (``act_forward`` -> ``forward``); any other
    direction is its own."""
    return direction.removeprefix(ACT_PREFIX)


def arg_dtype(direction: str, name: str, dtype: str) -> str:
    """The dtype of the values of argument ``name`` of a ``direction`` kernel of dtype ``dtype``: the kernel's own,
    except for the float64 statistics and sums of the split directions, and for 16-bit kernels every array but the
    data arrays (:data:`DATA_ARGS`), which is float32."""
    if name in _FLOAT64_ARGS.get(direction, ()):
        return "float64"
    if dtype in HALF_DTYPES and name not in DATA_ARGS:
        return "float32"
    return dtype


def storage_dtype(direction: str, name: str, dtype: str) -> np.dtype:
    """The NumPy dtype of the array a kernel receives as argument ``name``: :func:`arg_dtype`, with 16-bit values
    stored as ``np.uint16`` bit patterns."""
    value = arg_dtype(direction, name, dtype)
    return np.dtype(np.uint16) if value in HALF_DTYPES else np.dtype(value)


def stat_dtype(dtype: str) -> str:
    """The dtype of the saved statistics (and of weight, bias, dweight, dbias as kernels see them) of a kernel of
    dtype ``dtype``."""
    return arg_dtype("forward", "mean", dtype)


@dataclass(frozen=True)
class OpSpec:
    """One op. ``sets`` says what one normalized set is, and so the shape of the statistics:

    =========  ==================================  ===================
    sets       one set                             statistics' shape
    =========  ==================================  ===================
    channel    one channel over N and S            (C,)
    instance   one (sample, channel) row of S      (N, C)
    group      one (sample, group) of C/G rows     (N, G)
    row        one row of K                        (M,)
    =========  ==================================  ===================

    ``running``: the op has running statistics (and so the ``*_infer`` directions and a momentum).
    ``training_flag``: the name of its ``torch.nn.functional`` argument that asks for batch statistics.
    ``split``: the op also has the split directions :data:`SPLIT_DIRECTIONS` (per-channel statistics only).
    ``centered``: the op subtracts the mean and has a bias; False for RMSNorm (no mean, no bias, see the module
    docstring).
    ``fused_add``: the op also has the fused residual-add directions :data:`ADD_DIRECTIONS` (row ops only).
    ``activation``: the op also has ``act_`` twins of its forward / backward directions (a fused activation).
    """

    name: str
    aliases: tuple[str, ...]
    torch_name: str
    sets: str
    running: bool = False
    training_flag: str | None = None
    split: bool = False
    centered: bool = True
    fused_add: bool = False
    activation: bool = False

    def __post_init__(self) -> None:
        if self.split and self.sets != "channel":
            raise ValueError(f"{self.name}: the split directions are defined for per-channel statistics only")
        if self.fused_add and self.sets != "row":
            raise ValueError(f"{self.name}: the fused residual add is defined for row ops only")
        if self.activation and not self.centered:
            raise ValueError(f"{self.name}: the fused activation is defined for centered ops only")
        if not self.centered and (self.running or self.split):
            raise ValueError(f"{self.name}: an uncentered op has no mean, so no running or split statistics")

    @property
    def grouped(self) -> bool:
        return self.sets == "group"

    @property
    def directions(self) -> tuple[str, ...]:
        fused = ("forward", "forward_infer", "backward", "backward_infer") if self.running else ("forward", "backward")
        act = tuple(ACT_PREFIX + d for d in fused) if self.activation else ()
        return fused + (SPLIT_DIRECTIONS if self.split else ()) + (ADD_DIRECTIONS if self.fused_add else ()) + act

    @functools.cache  # the specs are module constants, so caching per spec never grows
    def args(self, direction: str) -> tuple[str, ...]:
        """The kernel's positional argument names for ``direction`` (cached: the frontends ask on every call that
        places arguments by name)."""
        if direction not in self.directions:
            raise ValueError(f"{self.name} has no direction {direction!r}; it has {', '.join(self.directions)}")
        plain = plain_direction(direction)
        names = {"forward": _FORWARD, "forward_infer": _FORWARD_INFER, "backward": _BACKWARD,
                 "backward_infer": _BACKWARD_INFER, "add_forward": _ADD_FORWARD, "add_backward": _ADD_BACKWARD,
                 **_SPLIT_ARGS}[plain]
        if plain != direction:  # an activation direction: its arguments follow eps (forward) or weight (backward)
            at, extra = ("eps", ("activation", "slope")) if "forward" in plain else ("weight", ("bias", "activation",
                                                                                                "slope"))
            at = names.index(at) + 1
            names = (*names[:at], *extra, *names[at:])
        if not self.centered:
            names = tuple(n for n in names if n not in _CENTERED_ONLY)
        if self.grouped:
            at = names.index("x") + 1
            names = (*names[:at], "num_groups", *names[at:])
        return names

    def per_channel(self, direction: str) -> bool:
        """Whether ``direction`` normalizes each channel's values as one set: every direction of BatchNorm, and the
        inference ones of the channel ops (per-channel running statistics). Its NCHW kernel then gives a
        channels-last input's results when run on the (N*S, C, 1) view of the (N, S, C) memory
        (:func:`on_columns`): the same values per channel, in another order."""
        return self.sets == "channel" or (self.sets != "row" and plain_direction(direction).endswith("_infer"))

    def outputs(self, direction: str) -> tuple[str, ...]:
        """The outputs of the ``direction`` kernel, among its arguments."""
        args = self.args(direction)
        return tuple(n for n in OUTPUTS[direction] if n in args)

    def kernel_args(self, direction: str, values: dict) -> tuple:
        """The positional arguments of the ``direction`` kernel, taken by name from ``values``."""
        return tuple(values.get(name) for name in self.args(direction))

    # --- shapes, for inputs already in the kernel's shape: (N, C, S) or (M, K) ---------------------------------

    def stat_shape(self, kshape: tuple[int, ...], groups: int | None = None, training: bool = True) -> tuple:
        """Shape of the saved mean / rstd (running statistics give per-channel ones)."""
        sets = self.sets
        if not training or sets == "channel":
            return (kshape[1],)
        if sets == "row":
            return (kshape[0],)
        return (kshape[0], groups if sets == "group" else kshape[1])

    def param_shape(self, kshape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of weight / bias as kernels see them: per channel, or per element of a row."""
        return (kshape[1],)

    def set_size(self, kshape: tuple[int, ...], groups: int | None = None) -> int:
        """How many values one normalized set holds."""
        if self.sets == "channel":
            return kshape[0] * kshape[2]
        if self.sets == "group":
            return kshape[1] // groups * kshape[2]
        return kshape[-1]

    def param_count(self, kshape: tuple[int, ...]) -> int:
        """How many terms one element of dweight / dbias sums."""
        return kshape[0] if self.sets == "row" else kshape[0] * kshape[2]

    def as_sets(self, a: np.ndarray, groups: int | None = None) -> np.ndarray:
        """A kernel-shaped array as (*stat_shape, set_size): one normalized set per last axis (a copy for
        channel sets, whose values are strided)."""
        if self.sets == "channel":
            return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        if self.sets == "group":
            return a.reshape(a.shape[0], groups, -1)
        return a

    def per_element(self, stat: np.ndarray, kshape: tuple[int, ...]) -> np.ndarray:
        """Per-set values (shaped like the statistics) broadcast to kernel-shaped elements."""
        if self.sets == "channel":
            return stat[None, :, None]
        if self.sets == "instance":
            return stat[:, :, None]
        if self.sets == "group":
            return np.repeat(stat, kshape[1] // stat.shape[1], axis=1)[:, :, None]
        return stat[:, None]

    def per_param(self, p: np.ndarray) -> np.ndarray:
        """A weight-shaped array broadcast to kernel-shaped elements."""
        return p[None, :] if self.sets == "row" else p[None, :, None]

    def param_axes(self) -> tuple[int, ...]:
        """The kernel-shape axes that dweight / dbias sum over."""
        return (0,) if self.sets == "row" else (0, 2)


SPECS = {spec.name: spec for spec in (
    OpSpec("batchnorm", ("bn", "batch_norm"), "batch_norm", "channel", running=True, training_flag="training",
           split=True, activation=True),
    OpSpec("layernorm", ("ln", "layer_norm"), "layer_norm", "row", fused_add=True, activation=True),
    OpSpec("instancenorm", ("in", "instance_norm"), "instance_norm", "instance", running=True,
           training_flag="use_input_stats", activation=True),
    OpSpec("groupnorm", ("gn", "group_norm"), "group_norm", "group", activation=True),
    OpSpec("rmsnorm", ("rms", "rms_norm"), "rms_norm", "row", centered=False, fused_add=True),
)}

OPS = tuple(SPECS)
# The memory layouts of the channel ops' data arrays (see the module docstring), and the ops that have them.
NCHW, NHWC = "nchw", "nhwc"
LAYOUTS = (NCHW, NHWC)
CHANNEL_OPS = tuple(name for name, s in SPECS.items() if s.sets != "row")
# (op, direction) of the plain per-channel directions (OpSpec.per_channel, no fused activation): those a backend can
# give channels-last data as its NCHW kernels on the (N*S, C, 1) view (on_columns), as both built-in backends do
PER_CHANNEL = tuple((op, d) for op in CHANNEL_OPS for d in SPECS[op].directions
                    if SPECS[op].per_channel(d) and not d.startswith(ACT_PREFIX))
LAYOUT_DTYPES = ("float32", "float64")  # the dtypes a backend's channels-last kernels are for, unless it says
ADDRESS = "addr"  # the last element of an address kernel's key (see the module docstring)
ADDRESS_DTYPES = DTYPES

DIRECTIONS = {name: spec.directions for name, spec in SPECS.items()}


def spec(name: str) -> OpSpec:
    """The spec of op ``name`` (its canonical name); a clear error for any other name."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops are {', '.join(OPS)}") from None


def kernel_shape(spec_: OpSpec, shape: tuple[int, ...], ndims: int | None = None) -> tuple[int, ...]:
    """The kernel's view of an input of ``shape``: (N, C, S), or (M, K) for row ops normalizing the last
    ``ndims`` dims."""
    if spec_.sets == "row":
        k = math.prod(shape[len(shape) - ndims:])
        return (math.prod(shape[:len(shape) - ndims]), k)
    return (shape[0], shape[1], math.prod(shape[2:]))


def on_columns(spec_: OpSpec, direction: str, kernel):
    """A per-channel direction's NCHW ``kernel`` (:meth:`OpSpec.per_channel`) as a channels-last one: called with
    ``direction``'s arguments, its data arrays (N, S, C), it runs ``kernel`` on their (N*S, C, 1) views. No copy:
    how backends without a channels-last kernel of their own, and the frontends for dtypes and activations that
    have none, run channels-last data of these directions."""
    data = tuple(i for i, name in enumerate(spec_.args(direction)) if name in DATA_ARGS)

    def columns(*args):
        args = list(args)
        for i in data:
            a = args[i]
            args[i] = a.reshape(a.shape[0] * a.shape[1], a.shape[2], 1)
        kernel(*args)

    columns.on_columns_of = kernel  # (normkit.torch runs the backend's address kernel in its place)
    return columns


def with_addresses(spec_: OpSpec, direction: str, kernel):
    """An address kernel of ``direction`` called with the NCHW kernel's arguments (C-contiguous arrays): it gets the
    kernel shape (``x``'s; ``h``'s for a fused add's backward, which has no x) and the arrays' addresses, ``mean``
    and ``rstd`` as they are."""
    names = spec_.args(direction)
    at_x = names.index("x" if "x" in names else "h")
    by_address = tuple(i for i, name in enumerate(names) if name not in ("mean", "rstd"))

    def addresses(*args):
        shape, args = args[at_x].shape, list(args)
        for i in by_address:
            a = args[i]
            if a is None:
                args[i] = 0
            elif isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{spec_.name} {direction}: {names[i]} must be C-contiguous for its address")
                args[i] = a.ctypes.data
        return kernel(*shape, *args)

    return addresses


def kernel_table(functions, dtypes=DEFAULT_DTYPES) -> dict:
    """``KERNELS`` for a backend whose functions take every dtype: ``{(op, direction): f}`` becomes
    ``{(op, direction, dtype): f}`` for each dtype."""
    return {(op, direction, dtype): f for (op, direction), f in functions.items() for dtype in dtypes}


SERIAL_MAX_VALUES_DEFAULT = 32768


def serial_max_values() -> int:
    """The built-in backends' one-thread rule: a kernel given at most this many values runs on one thread, because
    waking the other threads costs more than such a pass. PyTorch's grain size, 32768, unless the environment's
    NORMKIT_SERIAL_MAX_VALUES (an integer >= 0) says otherwise."""
    raw = os.environ.get("NORMKIT_SERIAL_MAX_VALUES")
    if raw is None:
        return SERIAL_MAX_VALUES_DEFAULT
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"NORMKIT_SERIAL_MAX_VALUES must be an integer >= 0, got {raw!r}")
    return n
