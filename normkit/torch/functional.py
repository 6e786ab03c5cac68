"""The functional ops, with the signatures of ``torch.nn.functional`` (plus ``backend=``).

Two paths to the same kernels:

* **eager** (the common case): a few checks, then the kernel on the tensors' own memory: a plain call
  (:func:`_plain`, no fused activation) goes to the backend's address kernel if it has one (``data_ptr()``s; see
  normkit.contract), any other call to the kernel on NumPy views; under autograd, one
  ``torch.autograd.Function`` around it. This costs about what ``torch.nn.functional`` costs.
* **under torch.compile**: each op is a ``torch.library.custom_op`` in the ``normkit::`` namespace (forward and
  backward are separate custom ops, both with a fake implementation), so the compiler sees one operator and
  never traces into NumPy. Running statistics are updated with torch operations in the wrapper, which the
  compiler traces like any other (torch refuses ``register_autograd`` on an op that declares ``mutates_args``).

Both paths run :func:`_forward` and :func:`_backward`, which take CPU tensors. Two cases leave the kernels for
torch's own operations, which autograd and torch.func can see through: a backward asked for a graph
(``create_graph=True``; :mod:`normkit.torch.differentiable`), and any call under a torch.func transform (vmap,
grad, ...), in forward-mode AD, under torch.jit.trace or on the meta device, which is ``torch.nn.functional``'s
(:func:`_torch_only`). Inputs are made contiguous (a copy only when they are not); outputs are allocated (see
below) and handed to the kernel to write into; the saved statistics stay NumPy arrays (tensors only where a
custom op returns or receives them).
The domain is torch's: empty batches, negative ``eps`` and any ``momentum`` are accepted and give what
``torch.nn.functional`` gives.

bfloat16 and float16 tensors: as torch's CPU kernels, with weight / bias in float32 or in the input's dtype, running
statistics in either (updated in their own dtype), the output in the input's dtype, float32 saved statistics and
gradients in each parameter's dtype. The kernels get the 16-bit data as ``np.uint16`` views of the tensors' memory
(``t.view(torch.uint16)``, no copy) and everything else as float32 (:mod:`normkit.contract`). Under
``torch.autocast("cpu", ...)`` torch casts nothing for the norm ops (they are in none of its CPU autocast lists), so
normkit's ops, receiving what torch's would, do what torch's do: a 16-bit convolution's output is normalized in its
16-bit dtype with the float32 parameters.

Channels-last: an input of the channel ops in ``torch.channels_last`` / ``channels_last_3d`` (or any dense layout
with dim 1 fastest, then the spatial dims in order) goes without a copy to the channels-last kernels as its
(N, S, C) view, and ``y`` (and, in backward, ``dx``) has the input's strides, as torch's BatchNorm and GroupNorm
give them (torch's InstanceNorm, and its ops on a 3-D input with C fastest, return a contiguous tensor of the same
values); a grad_output in another layout is copied to it. Without a channels-last kernel for the dtype (a backend
names its channels-last dtypes: contract.LAYOUT_DTYPES unless it says more) or the fused activation, a per-channel
direction (BatchNorm's, and the inference ones) runs the NCHW kernel on the (N*S, C, 1) view without a copy
(contract.on_columns), any other the NCHW one on a contiguous copy; the output is handed back channels-last either
way. A tensor that is contiguous too (C = 1, or all spatial dims 1) takes the NCHW path: the memory is the same.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import alloc, checks, half, recenter, registry
from .. import activation as _activation
from ..contract import ACT_PREFIX, ACTIVATIONS, NHWC, SPECS, OpSpec, on_columns
from ..ops import fused_kernel
from ..running import batch_variance, numpy_variance, update_from_rstd
from . import differentiable

__all__ = ["add_layer_norm", "add_rms_norm", "batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

_KERNEL_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                  torch.float16: "float16"}
_HALF = (torch.bfloat16, torch.float16)
# input dtype -> the dtype of the saved statistics, and of weight, bias, dweight, dbias as the kernels see them
_STAT_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
                torch.float16: torch.float32}
_NP_STAT_DTYPES = {dt: np.dtype(str(s).removeprefix("torch.")) for dt, s in _STAT_DTYPES.items()}
_MACHINE_EPS = {dt: torch.finfo(s).eps for dt, s in _STAT_DTYPES.items()}
_is_compiling = torch.compiler.is_compiling
_transforms_active = differentiable.transforms_active
_batched = differentiable.batched
_forward_ad = torch.autograd.forward_ad
_tracing = torch.jit.is_tracing  # (torch._C._is_tracing breaks a torch.compile graph)
# the same where torch.compile cannot be tracing (tested after _is_compiling), without is_tracing's two Python frames
_eager_tracing = getattr(torch._C, "_is_tracing", _tracing)


def _torch_only(input) -> bool:
    """Under torch.func's transforms (vmap, grad, jacrev, ...), in forward-mode AD (dual tensors) and under
    torch.jit.trace, which see torch's operations and not what a kernel writes through a pointer, each function
    is torch.nn.functional's (then the activation), with torch's checks and errors. So is a call on the meta
    device or on a FakeTensor, which have shapes and no data (shape inference, FlopCounterMode, FakeTensorMode
    outside torch.compile, models built on the meta device)."""
    return _transforms_active() or _forward_ad._current_level >= 0 or _tracing() or _on_meta(input)


def _on_meta(t) -> bool:
    # A FakeTensor is a subclass: a plain tensor skips the test, and so does a traced call (dynamo cannot trace
    # is_fake, and sees a Parameter's own class: a graph break at every call); the compiled path has its own op
    return isinstance(t, Tensor) and (t.is_meta or (type(t) is not Tensor and not _is_compiling()
                                                    and differentiable.is_fake(t)))


_DENSE = torch.contiguous_format
# normkit's kernels on torch's thread count, until normkit.set_num_threads: the registry reads it at each lookup,
# since torch.set_num_threads may come at any time
registry.follow_num_threads(torch.get_num_threads)


# --- checks ----------------------------------------------------------------------------------------------------

def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor(op: str, name: str, t, optional: bool = True) -> Optional[Tensor]:
    """Type and device checks done before anything else (the kernels run on the CPU only, and torch's own error
    for a missing CUDA kernel is obscure)."""
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        raise checks.ArgumentTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise checks.ArgumentError(f"{op}: {name} is on device {t.device}; normkit's kernels run on the CPU only "
                                   f"(move it with .cpu())")
    if t.layout is not torch.strided or t.is_nested:
        raise checks.UnsupportedInputError(f"{op}: {name} must be a dense tensor, got a "
                                           f"{'nested' if t.is_nested else str(t.layout).removeprefix('torch.')} "
                                           f"tensor")
    return t


def _input(op: str, x, min_ndim: int = 2) -> Tensor:
    x = _tensor(op, "input", x, optional=False)
    if x.dtype not in _KERNEL_DTYPES:
        checks.dtype(op, "input", _dtype_name(x))
    checks.shape(op, "input", x.shape, min_ndim, strict=False)
    return x


def _params(op: str, x: Tensor, shape: tuple, weight, bias) -> tuple[Optional[Tensor], Optional[Tensor]]:
    out = []
    for name, p in (("weight", weight), ("bias", bias)):
        p = _tensor(op, name, p)
        if p is not None and (p.shape != shape or p.dtype != x.dtype and not (
                p.dtype == torch.float32 and x.dtype in _HALF)):
            checks.param(op, name, p.shape, _dtype_name(p), shape, _dtype_name(x))
        out.append(p)
    if x.dtype in _HALF:
        _half_params(op, x, weight=out[0], bias=out[1])
    return out[0], out[1]


def _half_params(op: str, x: Tensor, **tensors) -> None:
    dtypes = {t.dtype for t in tensors.values() if t is not None}
    if len(dtypes) > 1 or not dtypes <= {torch.float32, x.dtype}:  # the error, named (the check costs ~5 µs)
        checks.half_params(op, _dtype_name(x), {n: _dtype_name(t) for n, t in tensors.items() if t is not None})


def _running(op: str, x: Tensor, running_mean, running_var, weight=None, bias=None) -> bool:
    running_mean, running_var = _tensor(op, "running_mean", running_mean), _tensor(op, "running_var", running_var)
    if not checks.running_pair(op, running_mean, running_var):
        return False
    c = x.shape[1]
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r.shape != (c,) or not r.is_floating_point():
            checks.running(op, name, r.shape, r.is_floating_point(), _dtype_name(r), c)
    if x.dtype in _HALF:
        _half_params(op, x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return True


# what _plain finds: not plain (0), or plain with x contiguous or channels-last dense
_CONTIGUOUS, _CHANNELS_LAST = 1, 2
_CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _plain(x: Tensor, pshape: tuple, *tensors, channels_last: bool = False) -> int:
    """Whether a call is the common case, which the eager path runs in the fewest Python steps: ``x`` (of type
    exactly ``torch.Tensor``: the caller checks, before it takes ``pshape`` from x's shape) a contiguous CPU tensor
    of a kernel dtype with values, and every other tensor None or a contiguous CPU tensor of shape ``pshape`` and
    x's dtype (for 16-bit x: all of them x's dtype or all float32, autocast's case), none of them a negative view
    (``torch._neg_view``, whose memory holds the values' negatives: an address kernel would read them as they are).
    What it accepts the checks accept, so it stands for them; anything else takes the general path, whose checks
    name what is wrong (and whose NumPy views resolve negative views). Returns 0 (not plain) or _CONTIGUOUS; with
    ``channels_last`` (the channel ops), an x in ``torch.channels_last`` / ``channels_last_3d`` that is not also
    contiguous gives _CHANNELS_LAST.

    Why it matters: in a model each norm call comes right after a convolution or a matmul that has evicted the
    interpreter's data from the caches, and there every Python step of the general path costs several µs (a
    BatchNorm2d eval call at (32, 128, 7, 7) right after a convolution paid ~70 µs of Python where a loop of calls
    pays ~10; ``python benchmarks/test_overhead.py``, its last table, times calls in that context)."""
    dtype = x.dtype
    # (the alignment tests are _misaligned's, written out: a call here costs ~0.2 us a tensor)
    if dtype not in _KERNEL_DTYPES or not x.is_cpu or not x.numel() or x.is_neg() or x.data_ptr() % x.itemsize:
        return 0
    try:
        if x.is_contiguous():
            plain = _CONTIGUOUS
        elif channels_last and x.is_contiguous(memory_format=_CHANNELS_LAST_FORMATS.get(x.dim(), _DENSE)):
            plain = _CHANNELS_LAST
        else:
            return 0
    except RuntimeError:  # a layout without strides (sparse): the checks name it
        return 0
    if dtype in _HALF:  # the parameters' dtype: of the first one given, x's or float32
        for t in tensors:
            if isinstance(t, Tensor):
                dtype = t.dtype
                break
        if dtype != x.dtype and dtype != torch.float32:
            return 0
    for t in tensors:
        if t is not None and not (isinstance(t, Tensor) and t.dtype == dtype and t.shape == pshape and t.is_cpu
                                  and t.is_contiguous() and not t.is_neg() and not t.data_ptr() % t.itemsize):
            return 0
    return plain


def _misaligned(*tensors) -> bool:
    """Whether a tensor (None: no) starts at an address that is not a multiple of its element size: a tensor over
    a byte buffer at an odd offset (``torch.frombuffer(..., offset=1)``). Kernels are handed element-aligned memory
    only (normkit.contract), so :func:`_aligned` copies such tensors."""
    for t in tensors:
        if t is not None and t.data_ptr() % t.itemsize:
            return True
    return False


def _aligned(*tensors) -> tuple:
    """The tensors, each misaligned one (:func:`_misaligned`) replaced by a copy with its strides."""
    return tuple(t if t is None or not _misaligned(t) else t.clone() for t in tensors)


def _check_saved(op: str, dy: Tensor, x: Tensor, mean: Optional[Tensor], rstd: Tensor, stats_shape: tuple) -> None:
    if dy.shape != x.shape:
        raise checks.ArgumentError(f"{op}: grad_output must have the input's shape {tuple(x.shape)}, got "
                                   f"{tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise checks.ArgumentTypeError(f"{op}: grad_output must have the input's dtype {_dtype_name(x)}, got "
                                       f"{_dtype_name(dy)}")
    for name, s in (("mean", mean), ("rstd", rstd)):
        if s is None and not SPECS[op].centered:
            continue
        if tuple(s.shape) != tuple(stats_shape) or s.dtype != _STAT_DTYPES[x.dtype]:
            raise checks.ArgumentError(f"{op}: saved {name} must have shape {tuple(stats_shape)} and dtype "
                                       f"{_dtype_name(rstd.new_empty(0, dtype=_STAT_DTYPES[x.dtype]))}, got "
                                       f"{tuple(s.shape)} and {_dtype_name(s)}; pass what forward returned")


# --- the kernels on tensors: shared by the eager path and the custom ops ---------------------------------------
#
# Per-call cost matters here (at small shapes it is most of a call), hence these choices, each measured:
# * plain calls: addresses (``data_ptr()``, ~0.2 us) to the address kernels, where a NumPy view (~0.9 us) and the
#   kernel's typed-memoryview acquisition of it (~0.35 us) cost about 1.2 us per tensor;
# * inputs otherwise: NumPy views by ``numpy(force=True)`` (one C call, where ``detach().numpy()`` makes a tensor
#   first);
# * y and dx (input-sized): ``torch.empty_like(x, memory_format=_DENSE)``, ~1 µs less than ``new_empty`` and the
#   same standard strides (without memory_format, a contiguous x with odd strides on size-1 dimensions would pass
#   them on). They stay torch's: its allocator maps large blocks as huge pages, where ``np.empty`` of a 2 MB
#   output took ~500 page faults on every call in a training loop (at (16, 128, 256));
#   torch's CPU allocator aligns them to 64 bytes, as normkit's own outputs are (normkit.alloc);
# * dweight, dbias (per-channel vectors): ``torch.from_numpy(alloc.empty(...))`` (64-byte aligned from 256 KiB
#   up, as the NumPy frontend's outputs), ~0.7 µs below that size where ``new_empty`` +
#   ``.numpy()`` costs ~2. Either way the storage cannot grow with ``resize_`` (``Tensor.numpy()`` makes it so);
# * the statistics stay NumPy arrays, wrapped in tensors only where a custom op returns them (the eager path
#   never shows them).

def _np(t: Optional[Tensor]):
    """A NumPy view of a CPU tensor's memory, for the kernel to read (below autograd). ``force=True`` detaches
    without a copy; it would copy only a tensor NumPy cannot view (a negative-bit one), which a read tolerates.
    16-bit tensors give their bit patterns (``np.uint16``), as the kernels take them; a negative one is resolved
    first (torch cannot view its bits as another dtype)."""
    if t is None:
        return None
    if t.dtype in _HALF:  # torch's uint16 view: ~0.6 us less than int16 and NumPy's own view on top
        return (t.resolve_neg() if t.is_neg() else t).view(torch.uint16).numpy(force=True)
    return t.numpy(force=True)


def _flat(t: Optional[Tensor]):
    """weight / bias as the kernels take them: flat, and in float32 when they are 16-bit (a copy of C values)."""
    if t is None:
        return None
    a = t.detach().float().numpy() if t.dtype in _HALF else t.numpy(force=True)
    return a if a.ndim == 1 else a.reshape(-1)


def _writable(t: Tensor) -> np.ndarray:
    """A NumPy view for a kernel to write (16-bit: the bit patterns)."""
    if t.dtype in _HALF:
        return t.detach().view(torch.uint16).numpy()
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _from_numpy(a: Optional[np.ndarray]) -> Optional[Tensor]:
    return None if a is None else torch.from_numpy(a)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _is_nhwc(spec: OpSpec, t: Tensor) -> bool:
    """Whether a channel op's input of 3 or more dims is channels-last dense and not contiguous (see the module
    docstring)."""
    return (spec.sets != "row" and t.dim() >= 3 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous())


def channels_last(x: Tensor) -> bool:
    """Whether a channel op gives ``x``'s results channels-last (see _like)."""
    return _is_nhwc(_BN, x)


def in_layout(t: Tensor, nhwc: bool) -> Tensor:
    """A contiguous result ``t`` of a channel op, channels-last where the op's input was (``nhwc``:
    :func:`channels_last`): for the layers whose cores take contiguous copies (Batch Renormalization, ghost batches,
    SyncBatchNorm)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if nhwc else t


def _nsc(t: Tensor, kshape: tuple) -> np.ndarray:
    """The (N, S, C) NumPy view of a channels-last tensor whose kernel shape is ``kshape`` (N, C, S) (16-bit: its
    bit patterns)."""
    return _np(t.movedim(1, -1)).reshape(kshape[0], kshape[2], kshape[1])


def _like(spec: OpSpec, x: Tensor) -> Tensor:
    """An output in the layout the op gives x: channels-last (x's strides) for a channel op on channels-last x,
    else contiguous."""
    return torch.empty_like(x) if _is_nhwc(spec, x) else torch.empty_like(x, memory_format=_DENSE)


def _kernel_shape(spec: OpSpec, shape, ndims: int) -> tuple[int, ...]:
    if spec.sets == "row":
        lead = len(shape) - ndims
        return (math.prod(shape[:lead]), math.prod(shape[lead:]))
    return (shape[0], shape[1], math.prod(shape[2:]))


def _eps(op: str, eps) -> float:
    return eps if type(eps) is float else checks.eps(op, eps, strict=False)


def _kernel(spec: OpSpec, direction: str, x: Tensor, backend, act, bias=None):
    """The NCHW kernel of a plain direction, called with the plain direction's arguments. With an activation
    (``act`` = (index, slope)) it is the ``act_`` direction's kernel (:func:`normkit.activation.kernel`: fused, or
    the plain one composed) given the activation's arguments, and in backward the bias, where the contract puts
    them."""
    dtype = _KERNEL_DTYPES[x.dtype]
    if act is None:
        return registry.lookup(spec.name, direction, dtype, backend)[1]
    return _with_act(spec, direction, _activation.kernel(spec.name, ACT_PREFIX + direction, dtype, backend)[1], act,
                     bias)


def _with_act(spec: OpSpec, direction: str, kernel, act, bias):
    """An ``act_`` kernel called with its plain ``direction``'s arguments: the activation's, and in backward the
    bias, go where the contract puts them."""
    at = spec.args(direction).index("eps" if "forward" in direction else "weight") + 1
    extra = act if "forward" in direction else (_flat(_contiguous(bias)), *act)
    return lambda *args: kernel(*args[:at], *extra, *args[at:])


def _nhwc_kernel(spec: OpSpec, direction: str, x: Tensor, backend, act, bias=None):
    """The channels-last kernel of a plain direction (its data (N, S, C)), with :func:`_kernel`'s arguments: a
    backend's own for the dtype if one has it (with an activation, of the act_ direction), else for a per-channel
    direction the NCHW one on (N*S, C, 1) views (contract.on_columns); None when neither exists."""
    found = registry.lookup(spec.name, direction if act is None else ACT_PREFIX + direction, _KERNEL_DTYPES[x.dtype],
                            backend, NHWC)
    if found is not None:
        return found[1] if act is None else _with_act(spec, direction, found[1], act, bias)
    if spec.per_channel(direction):
        return on_columns(spec, direction, _kernel(spec, direction, x, backend, act, bias))
    return None


def _act(op: str, activation, negative_slope) -> Optional[tuple[int, float]]:
    return None if activation is None else _activation.code(op, activation, negative_slope)


def _forward(spec: OpSpec, x: Tensor, weight, bias, eps: float, groups: int, kshape: tuple, running_mean,
             running_var, backend, save: bool = True, act=None,
             plain: int = 0) -> tuple[Tensor, Optional[np.ndarray], Optional[np.ndarray], Optional[float]]:
    """(y, mean, rstd, offset), the statistics as NumPy arrays and ``offset`` what an address kernel returned
    (normkit.contract; else None): batch statistics when ``running_mean`` is None, else
    normalization by the running ones (then mean and rstd are those, as constants; with ``save=False`` they are
    not made and come back None). ``kshape`` is ``_kernel_shape`` of ``x``; a channels-last x gives a channels-last
    y. ``act``: None, or the fused activation's (index, slope). ``plain``: what :func:`_plain` gave the call (the
    checks it stands for, and the layout, need no second look)."""
    direction = "forward" if running_mean is None else "forward_infer"
    if not plain and _misaligned(x, weight, bias, running_mean, running_var):  # (_plain checked its tensors)
        x, weight, bias, running_mean, running_var = _aligned(x, weight, bias, running_mean, running_var)
    if plain == _CONTIGUOUS:
        if act is None and (running_mean is None or not save):
            kernel = _common_kernel(spec, direction, x, backend, weight, bias, running_mean, running_var)
            if kernel is not None:
                return _forward_by_address(kernel, spec, x, weight, bias, eps, groups, kshape, running_mean,
                                           running_var)
        kernel = registry.lookup(spec.name, direction, _KERNEL_DTYPES[x.dtype], backend)[1] if act is None else \
            _kernel(spec, direction, x, backend, act)
        y = torch.empty_like(x, memory_format=_DENSE)
        if x.dtype in _HALF:
            xa, ya = _np(x).reshape(kshape), _writable(y).reshape(kshape)
        else:
            xa, ya = x.numpy(force=True).reshape(kshape), y.numpy().reshape(kshape)
    elif plain == _CHANNELS_LAST or _is_nhwc(spec, x):
        kernel = _columns_by_address(spec, direction, x, backend, act, plain, weight, bias, running_mean,
                                     running_var) if running_mean is None or not save else None
        if kernel is not None:  # the (N*S, C, 1) columns are x's own memory: no views to make
            return _forward_by_address(kernel, spec, x, weight, bias, eps, groups, _columns(kshape), running_mean,
                                       running_var, torch.empty_like(x))
        kernel = _nhwc_kernel(spec, direction, x, backend, act)
        if kernel is None:  # no channels-last kernel: the NCHW one on a copy, y handed back channels-last
            y, mean, rstd, offset = _forward(spec, x.contiguous(), weight, bias, eps, groups, kshape, running_mean,
                                             running_var, backend, save, act)
            return torch.empty_like(x).copy_(y), mean, rstd, offset
        y = torch.empty_like(x)
        ya, xa = _nsc(y, kshape), _nsc(x, kshape)
    else:
        x = _contiguous(x)
        y = torch.empty_like(x, memory_format=_DENSE)
        ya = _writable(y)
        if ya.size:
            kernel = _kernel(spec, direction, x, backend, act)
            xa, ya = _np(x).reshape(kshape), ya.reshape(kshape)
    if not plain:
        weight, bias = _contiguous(weight), _contiguous(bias)
    if running_mean is None:
        stat = spec.stat_shape(kshape, groups)
        dtype = _NP_STAT_DTYPES[x.dtype]
        mean, rstd = np.empty(stat, dtype) if spec.centered else None, np.empty(stat, dtype)
        if ya.size:
            w, b = _flat(weight), _flat(bias)
            if not spec.centered:
                kernel(xa, w, eps, ya, rstd)
            elif spec.grouped:
                kernel(xa, groups, w, b, eps, ya, mean, rstd)
            else:
                kernel(xa, w, b, eps, ya, mean, rstd)
        elif rstd.size:  # sets without values (torch's empty layer_norm rows): mean 0, variance 0
            if mean is not None:
                mean.fill(0.0)
            rstd.fill(1.0 / math.sqrt(eps) if eps > 0 else math.inf if eps == 0 else math.nan)
        return y, mean, rstd, None
    sdt = _STAT_DTYPES[x.dtype]
    if save or running_mean.dtype != sdt or running_var.dtype != sdt or not (
            running_mean.is_contiguous() and running_var.is_contiguous()):
        # fresh arrays: saved statistics must not alias the running ones, which the next training step changes
        rm = mean = x.new_empty(kshape[1], dtype=sdt).copy_(running_mean).numpy()
        rv = x.new_empty(kshape[1], dtype=sdt).copy_(running_var).numpy()
    else:  # nothing is saved: the kernel only reads them
        mean = None
        rm, rv = _np(running_mean), _np(running_var)
    if ya.size:
        kernel(xa, _flat(weight), _flat(bias), rm, rv, eps, ya)
    if not save:
        return y, None, None, None
    with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0 gives NaN / inf, as in torch
        rstd = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(rv.dtype)
    return y, mean, rstd, None


def _columns(kshape: tuple) -> tuple:
    """The kernel shape (N*S, C, 1) of the columns view of channels-last data whose (N, C, S) shape is kshape."""
    return (kshape[0] * kshape[2], kshape[1], 1)


def _columns_by_address(spec: OpSpec, direction: str, x: Tensor, backend, act, plain: int, *tensors):
    """For channels-last ``x``: the address kernel of a per-channel direction, to run on the (N*S, C, 1) columns
    view (contract.on_columns: the same memory), or None. None without one (see registry.lookup_address), with a
    fused activation, or when a tensor (weight, bias, running statistics) is not contiguous of x's dtype (float32
    for 16-bit x) or any is a negative view: what _plain checked when ``plain``; the shapes were checked already."""
    if act is not None:
        return None
    kernel = registry.lookup_address(spec.name, direction, _KERNEL_DTYPES[x.dtype], backend, NHWC)
    if kernel is None:
        return None
    if plain:
        return kernel if x.dtype not in _HALF or _float32_params(x, *tensors) else None
    if _negative(x, *tensors):
        return None
    pdtype = torch.float32 if x.dtype in _HALF else x.dtype  # what the kernel reads behind the addresses
    for t in tensors:
        if t is not None and (t.dtype != pdtype or not t.is_contiguous()):
            return None
    return kernel


def _float32_params(x: Tensor, *tensors) -> bool:
    """Whether the parameters and running statistics (None: absent) are what an address kernel reads for x: for
    16-bit x float32 (autocast's case; a 16-bit parameter takes the kernel on arrays, which converts it), for
    others x's dtype, which _plain checked (the callers test ``x.dtype in _HALF`` first: a call costs µs in a
    model, see _plain)."""
    if x.dtype in _HALF:
        for t in tensors:
            if t is not None and t.dtype != torch.float32:
                return False
    return True


def _negative(*tensors) -> bool:
    """Whether a tensor (None: no) is a negative view (``torch._neg_view``): its memory holds the values' negatives,
    which an address kernel would read as they are (a NumPy view, ``numpy(force=True)``, resolves them). Eager only:
    torch.compile cannot trace ``is_neg``."""
    for t in tensors:
        if t is not None and t.is_neg():
            return True
    return False


def _common_kernel(spec: OpSpec, direction: str, x: Tensor, backend, *tensors):
    """The address kernel of ``direction`` (normkit.contract) for a call that :func:`_plain` found contiguous and
    that has no fused activation, or None (then the kernel on arrays): None where the backend has none, and for
    16-bit x whose parameters or running statistics (``tensors``, None: absent) are not float32, which an address
    kernel reads (:func:`_float32_params`)."""
    kernel = registry.lookup_address(spec.name, direction, _KERNEL_DTYPES[x.dtype], backend)
    return kernel if kernel is not None and (x.dtype not in _HALF or _float32_params(x, *tensors)) else None


def _forward_by_address(kernel, spec: OpSpec, x: Tensor, weight, bias, eps: float, groups: int, kshape: tuple,
                        running_mean, running_var,
                        y: Optional[Tensor] = None) -> tuple[Tensor, Optional[np.ndarray], Optional[np.ndarray],
                                                             Optional[float]]:
    """:func:`_forward` of a call whose tensors are dense, of the shapes and dtype its kernel takes (a call that
    passed :func:`_plain`, or :func:`_columns_by_address`'s), by the direction's address kernel (see
    normkit.contract); ``y``: the output, if not a new contiguous one. Inference saves nothing here."""
    if y is None:
        y = torch.empty_like(x, memory_format=_DENSE)
    w = 0 if weight is None else weight.data_ptr()
    b = 0 if bias is None else bias.data_ptr()
    if running_mean is not None:
        kernel(*kshape, x.data_ptr(), w, b, running_mean.data_ptr(), running_var.data_ptr(), eps, y.data_ptr())
        return y, None, None, None
    stat = spec.stat_shape(kshape, groups)
    dtype = _NP_STAT_DTYPES[x.dtype]
    rstd = np.empty(stat, dtype)
    if not spec.centered:
        kernel(*kshape, x.data_ptr(), w, eps, y.data_ptr(), rstd)
        return y, None, rstd, None
    mean = np.empty(stat, dtype)
    if spec.grouped:
        offset = kernel(*kshape, x.data_ptr(), groups, w, b, eps, y.data_ptr(), mean, rstd)
    else:
        offset = kernel(*kshape, x.data_ptr(), w, b, eps, y.data_ptr(), mean, rstd)
    return y, mean, rstd, offset


def _backward(spec: OpSpec, dy: Tensor, x: Tensor, mean: np.ndarray, rstd: np.ndarray, weight, groups: int,
              kshape: tuple, batch_stats: bool, pshape: tuple, weight_grad: bool, bias_grad: bool,
              backend, bias=None, act=None, plain: int = 0,
              recentre: Optional[bool] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """dx and, when asked for, dweight and dbias (None otherwise; float32 for a 16-bit x, whatever the parameters'
    dtype: the callers cast them). ``mean``/``rstd``: contiguous NumPy arrays. A channels-last x gives a
    channels-last dx (dy is copied to that layout if it is not in it). ``act``: None, or the fused activation's
    (index, slope), whose derivative the kernel recomputes from x, the statistics, weight and ``bias``.
    ``plain``: what :func:`_plain` gave x and weight in forward (dy, autograd's, has x's shape and dtype).
    ``recentre``: whether x is first shifted by its mean (:mod:`normkit.recenter`), as forward's kernel told (None:
    decided here)."""
    direction = "backward" if batch_stats else "backward_infer"
    dy = _materialized(dy)
    if _misaligned(dy) or not plain and _misaligned(x, weight, bias):  # (_plain checked x and weight in forward)
        dy, x, weight, bias = _aligned(dy, x, weight, bias)
    if recentre or (recentre is None and x.dtype == torch.float32 and batch_stats and spec.centered
                    and recenter.needed(mean, rstd)):
        x, mean, plain = _recentered(spec, x, mean, groups, kshape, plain)
    if plain == _CONTIGUOUS and act is None and dy.is_contiguous() and dy.dtype == x.dtype and dy.shape == x.shape:
        kernel = _common_kernel(spec, direction, x, backend, weight)
        if kernel is not None and not dy.is_neg():
            return _backward_by_address(kernel, spec, dy, x, mean, rstd, weight, groups, kshape, pshape, weight_grad,
                                        bias_grad)
    if plain == _CONTIGUOUS and dy.is_contiguous():
        kernel = registry.lookup(spec.name, direction, _KERNEL_DTYPES[x.dtype], backend)[1] if act is None else \
            _kernel(spec, direction, x, backend, act, bias)
        if x.dtype in _HALF:
            dya, xa, view = _np(dy).reshape(kshape), _np(x).reshape(kshape), lambda t: _writable(t).reshape(kshape)
        else:
            dya, xa = dy.numpy(force=True).reshape(kshape), x.numpy(force=True).reshape(kshape)
            view = lambda t: t.numpy().reshape(kshape)  # noqa: E731
        return _run_backward(kernel, spec, dya, xa, torch.empty_like(x, memory_format=_DENSE), view, mean, rstd,
                             weight, groups, pshape, weight_grad, bias_grad)
    if plain == _CHANNELS_LAST or (not plain and _is_nhwc(spec, x)):  # (a contiguous x with a strided dy: below)
        if dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        by_address = None if dy.is_neg() else _columns_by_address(spec, direction, x, backend, act, plain, weight)
        if by_address is not None:  # dy has x's strides: its columns too
            return _backward_by_address(by_address, spec, dy, x, mean, rstd, weight, groups, _columns(kshape), pshape,
                                        weight_grad, bias_grad, torch.empty_like(x))
        kernel = _nhwc_kernel(spec, direction, x, backend, act, bias)
        if kernel is None:  # no channels-last kernel: the NCHW one on copies, dx handed back channels-last
            dx, dw, db = _backward(spec, dy.contiguous(), x.contiguous(), mean, rstd, weight, groups, kshape,
                                   batch_stats, pshape, weight_grad, bias_grad, backend, bias, act)
            return torch.empty_like(x).copy_(dx), dw, db
        return _run_backward(kernel, spec, _nsc(dy, kshape), _nsc(x, kshape), torch.empty_like(x),
                             lambda t: _nsc(t, kshape), mean, rstd, weight, groups, pshape, weight_grad, bias_grad)
    dy, x = _contiguous(dy), _contiguous(x)
    kernel = _kernel(spec, direction, x, backend, act, bias) if x.numel() else None
    return _run_backward(kernel, spec, _np(dy).reshape(kshape), _np(x).reshape(kshape),
                         torch.empty_like(x, memory_format=_DENSE), lambda t: _writable(t).reshape(kshape), mean,
                         rstd, weight, groups, pshape, weight_grad, bias_grad)


def _materialized(dy: Optional[Tensor]) -> Optional[Tensor]:
    """A gradient with memory: autograd can hand a ZeroTensor (``torch._efficientzerotensor``: zeros without
    storage, whose address is NULL) to a backward; its zeros, made, are what the kernels read."""
    return torch.zeros_like(dy) if dy is not None and dy._is_zerotensor() else dy


def _recentered(spec: OpSpec, x: Tensor, mean: np.ndarray, groups: int, kshape: tuple,
                plain: int) -> tuple[Tensor, np.ndarray, int]:
    """x shifted by its float32 mean per set, in x's layout, the shifted data's mean, and ``plain`` for the new x
    (:mod:`normkit.recenter`)."""
    nhwc = plain == _CHANNELS_LAST or (not plain and _is_nhwc(spec, x))
    if not (nhwc or x.is_contiguous()):
        x, plain = x.contiguous(), 0
    shifted = torch.empty_like(x)  # (x's strides)
    view = (lambda t: _nsc(t, kshape)) if nhwc else (lambda t: _np(t).reshape(kshape))  # noqa: E731
    return shifted, recenter.shifted(spec, view(x), mean, groups, nhwc, view(shifted))[1], plain


def _backward_by_address(kernel, spec: OpSpec, dy: Tensor, x: Tensor, mean, rstd, weight, groups: int, kshape: tuple,
                         pshape: tuple, weight_grad: bool, bias_grad: bool,
                         dx: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:func:`_backward` of a call whose forward passed :func:`_plain` and whose dy is contiguous with x's shape and
    dtype (or, channels-last, :func:`_columns_by_address`'s), by the direction's address kernel; ``dx``: the input
    gradient, if not a new contiguous one. dweight and dbias are torch's (64-byte aligned, as in torch)."""
    if dx is None:
        dx = torch.empty_like(x, memory_format=_DENSE)
    # weight, when given, has the gradients' shape and dtype: empty_like costs 0.7 us where empty(shape, dtype=) 1.1
    dw = torch.empty_like(weight) if weight_grad else None
    w, dwp = 0 if weight is None else weight.data_ptr(), 0 if dw is None else dw.data_ptr()
    if not spec.centered:
        kernel(*kshape, dy.data_ptr(), x.data_ptr(), rstd, w, dx.data_ptr(), dwp)
        return dx, dw, None
    db = None if not bias_grad else torch.empty_like(weight) if weight is not None else \
        torch.empty(pshape, dtype=_STAT_DTYPES[x.dtype])
    dbp = 0 if db is None else db.data_ptr()
    if spec.grouped:
        kernel(*kshape, dy.data_ptr(), x.data_ptr(), groups, mean, rstd, w, dx.data_ptr(), dwp, dbp)
    else:
        kernel(*kshape, dy.data_ptr(), x.data_ptr(), mean, rstd, w, dx.data_ptr(), dwp, dbp)
    return dx, dw, db


def _run_backward(kernel, spec: OpSpec, dya: np.ndarray, xa: np.ndarray, dx: Tensor, view, mean, rstd, weight,
                  groups: int, pshape: tuple, weight_grad: bool,
                  bias_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The backward kernel on the kernel views of dy and x, writing ``view(dx)``."""
    weight = _contiguous(weight)
    dtype = _NP_STAT_DTYPES[dx.dtype]
    dwa = alloc.empty(pshape, dtype) if weight_grad else None
    dba = alloc.empty(pshape, dtype) if bias_grad else None
    dw, db = _from_numpy(dwa), _from_numpy(dba)
    if not dx.numel():  # no values: every gradient is an empty or zero sum
        for g in (dwa, dba):
            if g is not None:
                g.fill(0.0)
        return dx, dw, db
    dxa = view(dx)
    if len(pshape) > 1:  # layer_norm over several dimensions: the kernels take dweight, dbias flat
        dwa, dba = (None if a is None else a.reshape(-1) for a in (dwa, dba))
    if not spec.centered:
        kernel(dya, xa, rstd, _flat(weight), dxa, dwa)
    elif spec.grouped:
        kernel(dya, xa, groups, mean, rstd, _flat(weight), dxa, dwa, dba)
    else:
        kernel(dya, xa, mean, rstd, _flat(weight), dxa, dwa, dba)
    return dx, dw, db


# --- eager: one autograd.Function for every op -----------------------------------------------------------------

class _Call:
    """The non-tensor arguments of one call, the running statistics it updates, and (after forward) the saved
    statistics, as NumPy arrays: internal constants, so they need neither tensors nor ``save_for_backward``."""

    __slots__ = ("spec", "eps", "groups", "kshape", "pshape", "running_mean", "running_var", "batch_stats",
                 "update", "count", "momentum", "backend", "act", "plain", "kernel", "mean", "rstd", "recentre")

    def __init__(self, spec, eps, groups, kshape, pshape, running_mean, running_var, batch_stats, update, count,
                 momentum, backend, act, plain, kernel=None):
        self.spec, self.eps, self.groups, self.kshape, self.pshape = spec, eps, groups, kshape, pshape
        self.running_mean, self.running_var, self.batch_stats = running_mean, running_var, batch_stats
        self.update, self.count, self.momentum, self.backend, self.act = update, count, momentum, backend, act
        self.plain, self.kernel = plain, kernel

    def forward(self, x: Tensor, weight, bias, save: bool) -> Tensor:
        use_running = not self.batch_stats
        if self.kernel is not None:  # a common call with batch statistics (_run_common, _common_channel)
            y, self.mean, self.rstd, offset = _forward_by_address(self.kernel, self.spec, x, weight, bias, self.eps,
                                                                  self.groups, self.kshape, None, None)
        else:
            y, self.mean, self.rstd, offset = _forward(self.spec, x, weight, bias, self.eps, self.groups,
                                                       self.kshape, self.running_mean if use_running else None,
                                                       self.running_var if use_running else None, self.backend,
                                                       save, self.act, self.plain)
        # whether backward shifts x by its mean (normkit.recenter: float32 data only), where the kernel said (else
        # backward finds out)
        self.recentre = False if x.dtype != torch.float32 else None if offset is None else offset > recenter.OFFSET
        if self.update and self.spec.sets != "instance":  # (instance norm: after the output, see _run)
            self.update_running(x)
        return y

    def update_running(self, x: Tensor) -> None:
        _update_running_now(self.running_mean, self.running_var, self.mean, self.rstd, self.eps, self.count,
                            self.momentum, x, self.spec.sets == "instance")


_NUMPY_RUNNING = (torch.float32, torch.float64)


def _update_running_now(running_mean: Tensor, running_var: Tensor, mean: np.ndarray, rstd: np.ndarray, eps: float,
                        count: int, momentum: float, x: Tensor, per_instance: bool) -> None:
    """The eager update: normkit.running's on the buffers' own memory (~5 µs with the views, compiled, where torch
    operations cost tens), except for 16-bit buffers and negative views, and for instance norm, whose buffers torch
    writes with ``copy_``: autograd's version counters see that (a graph that saved a buffer refuses its backward)
    and an inference tensor refuses it outside inference mode (torch's batch-norm kernel writes its own buffers in
    place, as NumPy does). The buffers are written, so their views come from ``numpy()``, which never copies
    (``numpy(force=True)`` could)."""
    exact = functools.partial(_exact_variance, x, per_instance)
    if not per_instance and running_mean.dtype in _NUMPY_RUNNING and running_var.dtype in _NUMPY_RUNNING \
            and not (running_mean.is_neg() or running_var.is_neg()):
        update_from_rstd(_writable(running_mean), _writable(running_var), mean, rstd, eps, count, momentum, exact)
    else:
        var = batch_variance(rstd, eps, count, exact)
        _update_running_traced(running_mean, running_var, torch.from_numpy(mean), torch.from_numpy(var), momentum)


def _exact_variance(x: Tensor, per_instance: bool, channels: np.ndarray) -> np.ndarray:
    """:func:`normkit.running.batch_variance`'s ``exact`` for an (N, C, *spatial) tensor: NumPy's on its memory
    (16-bit: the bit patterns, widened piece by piece), viewed only when a channel needs it."""
    widen = functools.partial(half.widen, dtype=_dtype_name(x)) if x.dtype in _HALF else None
    return numpy_variance(_np(x.detach()), per_instance, widen)(channels)


def _param_grads(dw: Optional[Tensor], db: Optional[Tensor], weight_dtype, bias_dtype):
    """The kernels' float32 gradients of 16-bit parameters, in the parameters' dtype (rounded once)."""
    if dw is not None and dw.dtype != weight_dtype:
        dw = dw.to(weight_dtype)
    if db is not None and db.dtype != bias_dtype:
        db = db.to(bias_dtype)
    return dw, db


def _grads(ctx, dy):
    x, weight, *bias = ctx.saved_tensors  # bias: saved only for an activation's derivative
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    c = ctx.call
    dx, dw, db = _backward(c.spec, dy, x, c.mean, c.rstd, weight, c.groups, c.kshape, c.batch_stats, c.pshape,
                           need_w, need_b, c.backend, bias[0] if bias else None, c.act, c.plain, c.recentre)
    if x.dtype in _HALF:
        dw, db = _param_grads(dw, db, ctx.param_dtypes[0], ctx.param_dtypes[1])
    return dx if need_x else None, dw, db, None


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, call):
        y = call.forward(x, weight, bias, save=True)
        if call.act is None:
            ctx.save_for_backward(x, weight)
        else:  # backward recomputes the activation's input from x, the statistics, weight and bias
            ctx.save_for_backward(x, weight, bias)
        ctx.call = call
        if x.dtype in _HALF:
            ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        return y

    @staticmethod
    def backward(ctx, dy):
        # Grad mode is off in backward unless it was asked for a graph (create_graph=True): then gradients that
        # autograd can differentiate again, from torch's operations (the kernels' would silently have none); so
        # for a batched dy (is_grads_batched, the vectorized jacobian, torch.func.vmap around autograd.grad), which
        # has no memory for a kernel to read
        if torch.is_grad_enabled() or _batched(dy):
            x, weight, *bias = ctx.saved_tensors
            need = ctx.needs_input_grad[:3]
            bias_dtype = ctx.param_dtypes[1] if x.dtype in _HALF else x.dtype
            return (*differentiable.grads(ctx.call, x, weight, bias[0] if bias else None, dy, need, bias_dtype),
                    None)
        return _grads(ctx, dy)


# What Function.apply (torch/autograd/function.py) does before the C++ apply, for a Function without setup_context
# such as _Norm and _AddNorm: unless a functorch transform is active (then the whole Python apply), unwrap the dead
# functorch wrappers among the tensor arguments. Written out at each call with the same C calls, it skips the Python
# frames of apply and of its argument scan, ~4 us of a small call's 50 with autograd (a shared wrapper taking
# *args gave half of it back). They are torch's private API (2.1 and later); a torch without them gets
# Function.apply.
try:
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
    _cpp_apply = torch._C._FunctionBase.__dict__["apply"]
except (AttributeError, KeyError):
    _cpp_apply = None
_norm_apply = None if _cpp_apply is None else _cpp_apply.__get__(None, _Norm)


def _direct_backward(function) -> None:
    """In backward the engine calls the node's ``apply(*grads)``, whose BackwardCFunction version looks up the
    Function's backward in two Python frames (~0.6 us of a small call's ~20 us backward): the node class of
    ``function`` (torch makes one per Function) calls ``function.backward`` itself."""
    node = getattr(function, "_backward_cls", None)  # torch's private API (1.x to 2.13): without it, torch's way
    if node is not None:
        node.apply = function.backward


_direct_backward(_Norm)


def _needs_grad(x: Tensor, weight, bias) -> bool:
    """Whether autograd records the call (then _Norm runs it)."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def _run(call: _Call, x: Tensor, weight, bias) -> Tensor:
    if _needs_grad(x, weight, bias):
        if _norm_apply is None:
            y = _Norm.apply(x, weight, bias, call)
        else:
            y = _norm_apply(_unwrap_if_dead(x), None if weight is None else _unwrap_if_dead(weight),
                            None if bias is None else _unwrap_if_dead(bias), call)
    else:
        y = call.forward(x, weight, bias, save=False)
    if call.update and call.spec.sets == "instance":
        # torch's instance_norm updates its buffers after its output is made and saved for backward, so that a
        # checkpoint's recomputation, which stops there (torch.utils.checkpoint's default), updates them once
        call.update_running(x)
    return y


# --- under torch.compile: custom ops -----------------------------------------------------------------------------

def _stat_shape(spec: OpSpec, x: Tensor, groups: int, ndims: int, batch_stats: bool) -> tuple:
    return spec.stat_shape(_kernel_shape(spec, x.shape, ndims), groups, batch_stats)


def _fake_forward(spec, x, groups, ndims, batch_stats):
    shape = _stat_shape(spec, x, groups, ndims, batch_stats)
    sdt = _STAT_DTYPES[x.dtype]
    return _like(spec, x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


def _grads_or_empty(x: Tensor, dx, dw, db):
    """Custom ops cannot return None: a gradient that is not wanted is an empty tensor."""
    sdt = _STAT_DTYPES[x.dtype]
    return dx, x.new_empty((0,), dtype=sdt) if dw is None else dw, x.new_empty((0,), dtype=sdt) if db is None else db


def _op_outputs(y: Tensor, mean: np.ndarray, rstd: np.ndarray, _offset=None) -> tuple[Tensor, Tensor, Tensor]:
    """A forward custom op's outputs from :func:`_forward`'s (the backward op decides on recentring itself)."""
    return y, torch.from_numpy(mean), torch.from_numpy(rstd)


def _stat(t: Tensor) -> np.ndarray:
    """A saved statistic given back to a backward custom op, as :func:`_backward` takes it."""
    return _np(_contiguous(t))


def _op_act(op: str, activation: Optional[int], slope: float) -> Optional[tuple[int, float]]:
    """A custom op's ``activation`` (an index into ACTIVATIONS, or None) and ``slope``, as ``act``."""
    if activation is None:
        return None
    if isinstance(activation, bool) or not isinstance(activation, int) or not 0 <= activation < len(ACTIVATIONS):
        raise checks.ArgumentError(f"{op}: activation must be None or an index into {ACTIVATIONS}, got "
                                   f"{activation!r}")
    return _activation.code(op, ACTIVATIONS[activation], slope)


def _op_args(act: Optional[tuple[int, float]]) -> tuple[Optional[int], float]:
    """``act`` as a custom op's last two arguments (activation, slope)."""
    return (None, 0.01) if act is None else act


def _fake_backward(spec, x, pshape, weight_grad, bias_grad):
    sdt = _STAT_DTYPES[x.dtype]
    return (_like(spec, x), x.new_empty(pshape if weight_grad else (0,), dtype=sdt),
            x.new_empty(pshape if bias_grad else (0,), dtype=sdt))


_BN, _IN, _GN, _LN, _RMS = (SPECS[n] for n in ("batchnorm", "instancenorm", "groupnorm", "layernorm", "rmsnorm"))


@torch.library.custom_op("normkit::batch_norm", mutates_args=(), device_types="cpu")
def _batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, eps: float, backend: Optional[str],
                activation: Optional[int] = None, slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_channel_op(_BN, input, weight, bias, running_mean, running_var, training, eps)
    return _op_outputs(*_forward(_BN, input, weight, bias, eps, 0, _kernel_shape(_BN, input.shape, 0),
                                 None if training else running_mean, None if training else running_var, backend,
                                 act=_op_act("batchnorm", activation, slope)))


@_batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, training, eps, backend, activation=None, slope=0.01):
    _check_channel_op(_BN, input, weight, bias, running_mean, running_var, training, eps)
    _op_act("batchnorm", activation, slope)
    return _fake_forward(_BN, input, 0, 0, training)


@torch.library.custom_op("normkit::batch_norm_backward", mutates_args=(), device_types="cpu")
def _batch_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                         training: bool, weight_grad: bool, bias_grad: bool, backend: Optional[str],
                         bias: Optional[Tensor] = None, activation: Optional[int] = None,
                         slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_channel_backward(_BN, grad_output, input, mean, rstd, weight, training)
    pshape = (input.shape[1],)
    return _grads_or_empty(input, *_backward(_BN, grad_output, input, _stat(mean), _stat(rstd), weight, 0,
                                             _kernel_shape(_BN, input.shape, 0), training, pshape, weight_grad,
                                             bias_grad, backend, bias, _op_act("batchnorm", activation, slope)))


@_batch_norm_backward.register_fake
def _(grad_output, input, mean, rstd, weight, training, weight_grad, bias_grad, backend, bias=None, activation=None,
      slope=0.01):
    _check_channel_backward(_BN, grad_output, input, mean, rstd, weight, training)
    return _fake_backward(_BN, input, (input.shape[1],), weight_grad, bias_grad)


@torch.library.custom_op("normkit::instance_norm", mutates_args=(), device_types="cpu")
def _instance_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], use_input_stats: bool, eps: float, backend: Optional[str],
                   activation: Optional[int] = None, slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_channel_op(_IN, input, weight, bias, running_mean, running_var, use_input_stats, eps)
    return _op_outputs(*_forward(_IN, input, weight, bias, eps, 0, _kernel_shape(_IN, input.shape, 0),
                                 None if use_input_stats else running_mean,
                                 None if use_input_stats else running_var, backend,
                                 act=_op_act("instancenorm", activation, slope)))


@_instance_norm.register_fake
def _(input, weight, bias, running_mean, running_var, use_input_stats, eps, backend, activation=None, slope=0.01):
    _check_channel_op(_IN, input, weight, bias, running_mean, running_var, use_input_stats, eps)
    _op_act("instancenorm", activation, slope)
    return _fake_forward(_IN, input, 0, 0, use_input_stats)


@torch.library.custom_op("normkit::instance_norm_backward", mutates_args=(), device_types="cpu")
def _instance_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                            weight: Optional[Tensor], use_input_stats: bool, weight_grad: bool, bias_grad: bool,
                            backend: Optional[str], bias: Optional[Tensor] = None, activation: Optional[int] = None,
                            slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_channel_backward(_IN, grad_output, input, mean, rstd, weight, use_input_stats)
    pshape = (input.shape[1],)
    return _grads_or_empty(input, *_backward(_IN, grad_output, input, _stat(mean), _stat(rstd), weight, 0,
                                             _kernel_shape(_IN, input.shape, 0), use_input_stats, pshape,
                                             weight_grad, bias_grad, backend, bias,
                                             _op_act("instancenorm", activation, slope)))


@_instance_norm_backward.register_fake
def _(grad_output, input, mean, rstd, weight, use_input_stats, weight_grad, bias_grad, backend, bias=None,
      activation=None, slope=0.01):
    _check_channel_backward(_IN, grad_output, input, mean, rstd, weight, use_input_stats)
    return _fake_backward(_IN, input, (input.shape[1],), weight_grad, bias_grad)


@torch.library.custom_op("normkit::group_norm", mutates_args=(), device_types="cpu")
def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                backend: Optional[str], activation: Optional[int] = None,
                slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_group_op(input, num_groups, weight, bias, eps)
    return _op_outputs(*_forward(_GN, input, weight, bias, eps, num_groups, _kernel_shape(_GN, input.shape, 0),
                                 None, None, backend, act=_op_act("groupnorm", activation, slope)))


@_group_norm.register_fake
def _(input, num_groups, weight, bias, eps, backend, activation=None, slope=0.01):
    _check_group_op(input, num_groups, weight, bias, eps)
    _op_act("groupnorm", activation, slope)
    return _fake_forward(_GN, input, num_groups, 0, True)


@torch.library.custom_op("normkit::group_norm_backward", mutates_args=(), device_types="cpu")
def _group_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                         weight: Optional[Tensor], weight_grad: bool, bias_grad: bool, backend: Optional[str],
                         bias: Optional[Tensor] = None, activation: Optional[int] = None,
                         slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    _check_group_backward(grad_output, input, mean, rstd, num_groups, weight)
    pshape = (input.shape[1],)
    return _grads_or_empty(input, *_backward(_GN, grad_output, input, _stat(mean), _stat(rstd), weight,
                                             num_groups, _kernel_shape(_GN, input.shape, 0), True, pshape,
                                             weight_grad, bias_grad, backend, bias,
                                             _op_act("groupnorm", activation, slope)))


@_group_norm_backward.register_fake
def _(grad_output, input, mean, rstd, num_groups, weight, weight_grad, bias_grad, backend, bias=None,
      activation=None, slope=0.01):
    _check_group_backward(grad_output, input, mean, rstd, num_groups, weight)
    return _fake_backward(_GN, input, (input.shape[1],), weight_grad, bias_grad)


@torch.library.custom_op("normkit::layer_norm", mutates_args=(), device_types="cpu")
def _layer_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, backend: Optional[str], activation: Optional[int] = None,
                slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    shape = _check_layer_op(input, normalized_shape, weight, bias, eps)
    return _op_outputs(*_forward(_LN, input, weight, bias, eps, 0, _kernel_shape(_LN, input.shape, len(shape)),
                                 None, None, backend, act=_op_act("layernorm", activation, slope)))


@_layer_norm.register_fake
def _(input, normalized_shape, weight, bias, eps, backend, activation=None, slope=0.01):
    shape = _check_layer_op(input, normalized_shape, weight, bias, eps)
    _op_act("layernorm", activation, slope)
    return _fake_forward(_LN, input, 0, len(shape), True)


@torch.library.custom_op("normkit::layer_norm_backward", mutates_args=(), device_types="cpu")
def _layer_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                         normalized_shape: list[int], weight: Optional[Tensor], weight_grad: bool, bias_grad: bool,
                         backend: Optional[str], bias: Optional[Tensor] = None, activation: Optional[int] = None,
                         slope: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    shape = _check_layer_backward(grad_output, input, mean, rstd, normalized_shape, weight)
    return _grads_or_empty(input, *_backward(_LN, grad_output, input, _stat(mean), _stat(rstd), weight, 0,
                                             _kernel_shape(_LN, input.shape, len(shape)), True, shape,
                                             weight_grad, bias_grad, backend, bias,
                                             _op_act("layernorm", activation, slope)))


@_layer_norm_backward.register_fake
def _(grad_output, input, mean, rstd, normalized_shape, weight, weight_grad, bias_grad, backend, bias=None,
      activation=None, slope=0.01):
    shape = _check_layer_backward(grad_output, input, mean, rstd, normalized_shape, weight)
    return _fake_backward(_LN, input, shape, weight_grad, bias_grad)


@torch.library.custom_op("normkit::rms_norm", mutates_args=(), device_types="cpu")
def _rms_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], eps: float,
              backend: Optional[str]) -> tuple[Tensor, Tensor]:
    shape = _check_layer_op(input, normalized_shape, weight, None, eps, _RMS)
    y, _, rstd, _ = _forward(_RMS, input, weight, None, eps, 0, _kernel_shape(_RMS, input.shape, len(shape)), None,
                             None, backend)
    return y, torch.from_numpy(rstd)


@_rms_norm.register_fake
def _(input, normalized_shape, weight, eps, backend):
    shape = _check_layer_op(input, normalized_shape, weight, None, eps, _RMS)
    return input.new_empty(input.shape), input.new_empty(_stat_shape(_RMS, input, 0, len(shape), True),
                                                         dtype=_STAT_DTYPES[input.dtype])


@torch.library.custom_op("normkit::rms_norm_backward", mutates_args=(), device_types="cpu")
def _rms_norm_backward(grad_output: Tensor, input: Tensor, rstd: Tensor, normalized_shape: list[int],
                       weight: Optional[Tensor], weight_grad: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    shape = _check_layer_backward(grad_output, input, None, rstd, normalized_shape, weight, _RMS)
    dx, dw, _ = _backward(_RMS, grad_output, input, None, _stat(rstd), weight, 0,
                          _kernel_shape(_RMS, input.shape, len(shape)), True, shape, weight_grad, False, backend)
    return dx, input.new_empty((0,), dtype=_STAT_DTYPES[input.dtype]) if dw is None else dw  # as _grads_or_empty


@_rms_norm_backward.register_fake
def _(grad_output, input, rstd, normalized_shape, weight, weight_grad, backend):
    shape = _check_layer_backward(grad_output, input, None, rstd, normalized_shape, weight, _RMS)
    return input.new_empty(input.shape), input.new_empty(shape if weight_grad else (0,),
                                                         dtype=_STAT_DTYPES[input.dtype])


def _rms_setup(ctx, inputs, output):
    x, normalized_shape, weight, _eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.extra, ctx.backend = normalized_shape, backend
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.mark_non_differentiable(output[1])


def _rms_autograd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[2]
    dx, dw = _rms_norm_backward(dy, x, rstd, ctx.extra, weight, need_w, ctx.backend)
    if x.dtype in _HALF and need_w:  # the kernels' float32 gradient, in the weight's dtype (see _autograd)
        dw = _param_grads(dw, None, ctx.weight_dtype, None)[0]
    return dx if ctx.needs_input_grad[0] else None, None, dw if need_w else None, None, None


_rms_norm.register_autograd(_rms_autograd, setup_context=_rms_setup)


def _channel_setup(ctx, inputs, output):
    x, weight, bias, _rm, _rv, batch_stats, _eps, backend, activation, slope = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.extra, ctx.backend, ctx.act = batch_stats, backend, (activation, slope)
    ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
    ctx.mark_non_differentiable(mean, rstd)


def _group_setup(ctx, inputs, output):  # group_norm and layer_norm: (x, num_groups | normalized_shape, w, b, ...)
    x, extra, weight, bias, _eps, backend, activation, slope = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.extra, ctx.backend, ctx.act = extra, backend, (activation, slope)
    ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
    ctx.mark_non_differentiable(mean, rstd)


def _autograd(backward_op, weight_at: int):
    """The backward of a forward custom op whose weight and bias are inputs ``weight_at`` and ``weight_at + 1``,
    as the custom op ``backward_op``."""
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_w, need_b = need[weight_at], need[weight_at + 1]
        dx, dw, db = backward_op(dy, x, mean, rstd, *((ctx.extra, weight) if weight_at == 2 else (weight, ctx.extra)),
                                 need_w, need_b, ctx.backend, bias, *ctx.act)
        if x.dtype in _HALF:
            dw, db = _param_grads(dw if need_w else None, db if need_b else None, *ctx.param_dtypes)
        grads = [None] * len(need)
        grads[0], grads[weight_at], grads[weight_at + 1] = (dx if need[0] else None, dw if need_w else None,
                                                             db if need_b else None)
        return tuple(grads)

    return backward


_batch_norm.register_autograd(_autograd(_batch_norm_backward, 1), setup_context=_channel_setup)
_instance_norm.register_autograd(_autograd(_instance_norm_backward, 1), setup_context=_channel_setup)
_group_norm.register_autograd(_autograd(_group_norm_backward, 2), setup_context=_group_setup)
_layer_norm.register_autograd(_autograd(_layer_norm_backward, 2), setup_context=_group_setup)


# The custom ops check their arguments themselves: torch.ops.normkit.* are public, and called directly they get
# the same clear errors as the functions.

def _check_channel_op(spec, x, weight, bias, running_mean, running_var, batch_stats, eps):
    x = _input(spec.name, x)
    _params(spec.name, x, (x.shape[1],), weight, bias)
    checks.eps(spec.name, eps, strict=False)
    if batch_stats:
        checks.stats_count(spec.name, x.shape, per_instance=spec.sets == "instance")
    elif not _running(spec.name, x, running_mean, running_var, weight, bias):
        raise checks.missing_running(spec.name, spec.training_flag)


def _check_channel_backward(spec, dy, x, mean, rstd, weight, batch_stats):
    x = _input(spec.name, x)
    _params(spec.name, x, (x.shape[1],), weight, None)
    kshape = _kernel_shape(spec, x.shape, 0)
    _check_saved(spec.name, dy, x, mean, rstd, spec.stat_shape(kshape, None, batch_stats))


def _check_group_op(x, num_groups, weight, bias, eps):
    x = _input("groupnorm", x)
    checks.num_groups("groupnorm", num_groups, x.shape[1])
    _params("groupnorm", x, (x.shape[1],), weight, bias)
    checks.eps("groupnorm", eps, strict=False)


def _check_group_backward(dy, x, mean, rstd, num_groups, weight):
    _check_group_op(x, num_groups, weight, None, 0.0)
    _check_saved("groupnorm", dy, x, mean, rstd, (x.shape[0], num_groups))


def _check_layer_op(x, normalized_shape, weight, bias, eps, spec=_LN) -> tuple:
    op = spec.name
    shape = checks.normalized_shape(op, normalized_shape)
    x = _input(op, x, min_ndim=len(shape))
    checks.trailing(op, x.shape, shape)
    _params(op, x, shape, weight, bias)
    checks.eps(op, eps, strict=False)
    return shape


def _check_layer_backward(dy, x, mean, rstd, normalized_shape, weight, spec=_LN) -> tuple:
    shape = _check_layer_op(x, normalized_shape, weight, None, 0.0, spec)
    _check_saved(spec.name, dy, x, mean, rstd, (math.prod(x.shape[:x.dim() - len(shape)]),))
    return shape


def _update_running_traced(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                           momentum: float) -> None:
    """:func:`normkit.running.update_running` in torch operations, for torch.compile to trace; ``var`` unbiased."""
    with torch.no_grad():
        mean, var = mean.double(), var.double()
        if mean.dim() == 2:
            mean, var = mean.mean(0), var.mean(0)
        running_mean.copy_((1.0 - momentum) * running_mean.double() + momentum * mean)
        running_var.copy_((1.0 - momentum) * running_var.double() + momentum * var)


# --- the public functions --------------------------------------------------------------------------------------

def _channel(spec: OpSpec, custom_op, input, running_mean, running_var, weight, bias, batch_stats, momentum, eps,
             backend, act):
    op = spec.name
    x = input
    if type(batch_stats) is not bool:
        checks.flag(op, spec.training_flag, batch_stats)
    compiling = _is_compiling()  # first: _plain's looks are eager-only
    try:
        plain = (not compiling and type(x) is Tensor and x.dim() >= 2 and type(eps) is float
                 and (running_mean is None) is (running_var is None)
                 and _plain(x, (x.shape[1],), weight, bias, running_mean, running_var, channels_last=True))
    except RuntimeError:  # a strided nested tensor, which has no shape: the checks name it
        plain = 0
    if plain:
        has_running = running_mean is not None
    else:
        x = _input(op, input)
        weight, bias = _params(op, x, (x.shape[1],), weight, bias)
        has_running = _running(op, x, running_mean, running_var, weight, bias)
        eps = _eps(op, eps)
    shape = x.shape
    n, c = shape[0], shape[1]
    s = x.numel() // (n * c) if plain else math.prod(shape[2:])  # plain: values, so n, c > 0
    if batch_stats:
        count = s if spec.sets == "instance" else n * s
        if count == 1:
            checks.stats_count(op, shape, per_instance=spec.sets == "instance")  # raises torch's error
    elif not has_running:
        raise checks.missing_running(op, spec.training_flag)
    else:
        count = 0
    if has_running and (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        # as torch's batch_norm: they would be constants to autograd (and training updates them in place)
        which = " and ".join(name for name, r in (("running_mean", running_mean), ("running_var", running_var))
                             if r.requires_grad)
        raise checks.ArgumentError(f"{op}: the running statistics get no gradient, so they must not require one; "
                                   f"got {which} with requires_grad=True (detach them, or pass buffers)")
    update = has_running and batch_stats
    if update and not plain:
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if c > 1 and r.stride(0) == 0:  # an expanded tensor: every channel's update would land on one element
                raise checks.ArgumentError(f"{op}: {name} is updated in place, but its {c} elements share one "
                                           f"memory location (an expanded tensor); pass a tensor of its own")
    if update and type(momentum) is not float:
        momentum = checks.momentum(op, momentum, strict=False)
    if not plain and not x.numel():  # torch: no statistics to take; the running ones stay as they are
        update = False
    if compiling:
        if update:
            y, mean, rstd = custom_op(x, weight, bias, None, None, True, eps, backend, *_op_args(act))
            # the variance from rstd alone: a graph has no data-dependent recomputation (running.batch_variance)
            var = (rstd.double().pow(-2) - eps).clamp_min(0.0) * (count / (count - 1))
            _update_running_traced(running_mean, running_var, mean, var, momentum)
            return y
        return custom_op(x, weight, bias, running_mean, running_var, batch_stats, eps, backend, *_op_args(act))[0]
    call = _Call(spec, eps, 0, (n, c, s), (c,), running_mean, running_var, batch_stats, update, count, momentum,
                 backend, act, plain)
    return _run(call, x, weight, bias)


_ACTIVATION_DOC = """

    ``activation`` (None, "relu", "leaky_relu", "silu", "gelu" or "gelu_tanh"; ``negative_slope`` for
    leaky_relu) applies that activation to the output in the same pass over memory, as ``torch.nn.functional``'s
    activation after the norm would (gelu_tanh is ``gelu(approximate="tanh")``); its backward recomputes the
    activation's input from x and the saved statistics."""


def batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, backend=None, activation=None, negative_slope=0.01):
    if activation is None:
        y = _common_channel(_BN, input, running_mean, running_var, weight, bias, training, momentum, eps, backend)
        if y is not None:
            return y
    if _torch_only(input):
        return differentiable.activation(F.batch_norm(input, running_mean, running_var, weight, bias, training,
                                                      momentum, eps), _act("batchnorm", activation, negative_slope))
    if isinstance(input, Tensor) and input.dim() == 1 and not input.numel() and weight is None and bias is None \
            and all(r is None or (isinstance(r, Tensor) and not r.numel()) for r in (running_mean, running_var)):
        _act("batchnorm", activation, negative_slope)
        return input.clone()  # the one 1-D input torch takes: an empty one, with nothing to normalize
    if type(eps) is not float or eps <= 0.0:
        checks.batchnorm_eps("batchnorm", eps, training)
    return _channel(_BN, _batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps,
                    backend, _act("batchnorm", activation, negative_slope))


batch_norm.__doc__ = """:func:`torch.nn.functional.batch_norm` computed by normkit; ``running_mean``/``running_var``
    are updated in place when ``training``. ``backend`` picks a backend by name (default: the registry's
    order).""" + _ACTIVATION_DOC


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, backend=None, activation=None, negative_slope=0.01):
    # eps 0 with input statistics: torch's batch-norm kernel takes rstd = 0 where an instance's variance is 0 too
    # (ATen's InvStd), so a constant instance gives the bias and zero gradients where normkit's kernels, like
    # torch's other norms, give NaN; its own kernel keeps that answer
    if activation is None:
        y = _common_channel(_IN, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                            backend)
        if y is not None:
            return y
    if _torch_only(input) or (use_input_stats and isinstance(eps, (int, float)) and eps == 0):
        return differentiable.activation(F.instance_norm(input, running_mean, running_var, weight, bias,
                                                         use_input_stats, momentum, eps),
                                         _act("instancenorm", activation, negative_slope))
    return _channel(_IN, _instance_norm, input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                    eps, backend, _act("instancenorm", activation, negative_slope))


instance_norm.__doc__ = """:func:`torch.nn.functional.instance_norm` computed by normkit; running statistics, when
    given, are updated in place with the average over the instances when ``use_input_stats``.""" + _ACTIVATION_DOC


def _common_channel(spec: OpSpec, x, running_mean, running_var, weight, bias, batch_stats, momentum, eps,
                    backend) -> Optional[Tensor]:
    """batch_norm's / instance_norm's common call, as :func:`_common_row`: the plain branch of :func:`_channel`
    without its steps, for x of two or more dims that :func:`_plain` finds contiguous or channels-last with the
    parameters and running statistics, a bool mode, a positive float eps, a float momentum with batch statistics
    (a module's; the general path takes the rest), running statistics that require no grad and more than one value
    a set. The output, or None."""
    has_running = running_mean is not None
    if type(batch_stats) is not bool or type(eps) is not float or not eps > 0.0 or not _common_eager(x) \
            or (running_var is None) is has_running \
            or (type(momentum) is not float if batch_stats else not has_running):
        return None
    try:
        if x.dim() < 2:
            return None
        n, c = x.shape[0], x.shape[1]
        plain = _plain(x, (c,), weight, bias, running_mean, running_var, channels_last=True)
    except RuntimeError:  # a strided nested tensor, which has no shape; a layout without memory (sparse)
        return None
    if not plain or has_running and (running_mean.requires_grad or running_var.requires_grad):
        return None
    kshape = (n, c, x.numel() // (n * c))
    count, kernel = 0, None
    if batch_stats:
        count = kshape[2] if spec.sets == "instance" else n * kshape[2]
        if count == 1:  # (torch's error)
            return None
        if plain == _CONTIGUOUS:  # (else _forward finds the kernel, as for the general path's plain calls)
            kernel = _common_kernel(spec, "forward", x, backend, weight, bias)
    elif not _needs_grad(x, weight, bias):  # inference, nothing saved: the kernel alone, where there is one
        if plain == _CONTIGUOUS:
            found = _common_kernel(spec, "forward_infer", x, backend, weight, bias, running_mean, running_var)
            if found is not None:
                return _forward_by_address(found, spec, x, weight, bias, eps, 0, kshape, running_mean, running_var)[0]
        else:
            found = _columns_by_address(spec, "forward_infer", x, backend, None, plain, weight, bias, running_mean,
                                        running_var)
            if found is not None:
                return _forward_by_address(found, spec, x, weight, bias, eps, 0, _columns(kshape), running_mean,
                                           running_var, torch.empty_like(x))[0]
    return _run(_Call(spec, eps, 0, kshape, (c,), running_mean, running_var, batch_stats, has_running and batch_stats,
                      count, momentum, backend, None, plain, kernel), x, weight, bias)


def _common_group(x, num_groups, weight, bias, eps, backend) -> Optional[Tensor]:
    """group_norm's common call, as :func:`_common_row`: x of two or more dims that :func:`_plain` finds
    contiguous or channels-last, an int number of groups that divides C, a float eps; the output, or None."""
    if type(eps) is not float or type(num_groups) is not int or not _common_eager(x):
        return None
    try:
        if x.dim() < 2:
            return None
        n, c = x.shape[0], x.shape[1]
        if num_groups <= 0 or c % num_groups or n * c == num_groups and x.numel() == num_groups:
            return None  # (one value a group: torch's error)
        plain = _plain(x, (c,), weight, bias, channels_last=True)
    except RuntimeError:  # a strided nested tensor, which has no shape; a layout without memory (sparse)
        return None
    if not plain:
        return None
    kernel = _common_kernel(_GN, "forward", x, backend, weight, bias) if plain == _CONTIGUOUS else None
    return _run_common(_GN, kernel, x, weight, bias, eps, num_groups, (n, c, x.numel() // (n * c)), (c,), backend,
                       plain)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, backend=None, activation=None,
               negative_slope=0.01):
    if activation is None:
        y = _common_group(input, num_groups, weight, bias, eps, backend)
        if y is not None:
            return y
    if _torch_only(input):
        return differentiable.activation(F.group_norm(input, num_groups, weight, bias, eps),
                                         _act("groupnorm", activation, negative_slope))
    op = "groupnorm"
    x = input
    compiling = _is_compiling()  # first: _plain's looks are eager-only
    try:
        plain = not compiling and type(x) is Tensor and x.dim() >= 2 and type(eps) is float and \
            _plain(x, (x.shape[1],), weight, bias, channels_last=True)
    except RuntimeError:  # a strided nested tensor, which has no shape: the checks name it
        plain = 0
    if not plain:
        x = _input(op, input)
    shape = x.shape
    n, c = shape[0], shape[1]
    groups = num_groups if type(num_groups) is int and num_groups > 0 and not c % num_groups else \
        checks.num_groups(op, num_groups, c)
    if n * c == groups and x.numel() == groups:  # torch's check: N * (C / G) * S must not be 1
        checks.group_count(op, shape, groups)
    if not plain:
        weight, bias = _params(op, x, (c,), weight, bias)
        eps = _eps(op, eps)
    act = None if activation is None else _act(op, activation, negative_slope)
    if compiling:
        return _group_norm(x, groups, weight, bias, eps, backend, *_op_args(act))[0]
    kshape = (n, c, x.numel() // (n * c) if plain else math.prod(shape[2:]))  # plain: values, so n, c > 0
    return _run(_Call(_GN, eps, groups, kshape, (c,), None, None, True, False, 0, 0.0, backend, act, plain), x,
                weight, bias)


group_norm.__doc__ = """:func:`torch.nn.functional.group_norm` computed by normkit.""" + _ACTIVATION_DOC


def _row_plain(x, normalized_shape, eps, *params) -> bool:
    """:func:`_plain` for the row ops, given a module's normalized_shape (a tuple the input ends with)."""
    try:
        return type(x) is Tensor and type(eps) is float and checks.ends_with(x.shape, normalized_shape) \
            and _plain(x, normalized_shape, *params)
    except RuntimeError:  # a strided nested tensor, which has no shape: the checks name it
        return False


def _torch_computes(input, op: str) -> bool:
    """Inputs of the row ops that normkit has no kernels for and torch computes: nested tensors, jagged or strided
    (the batches of variable-length sequences that nn.TransformerEncoder makes), and complex data for RMSNorm. They
    run torch's function, as a drop-in replacement must (also where torch refuses some of them: torch's error)."""
    return isinstance(input, Tensor) and (input.is_nested or op == "rmsnorm" and input.is_complex())


def _row_input(op: str, input, normalized_shape) -> tuple[Tensor, tuple]:
    x = _input(op, input, min_ndim=1)
    if checks.ends_with(x.shape, normalized_shape):
        return x, normalized_shape
    shape = checks.normalized_shape(op, normalized_shape)
    checks.shape(op, "input", x.shape, len(shape), strict=False)
    checks.trailing(op, x.shape, shape)
    return x, shape


def _common_eager(x) -> bool:
    """Whether a call may be a common call (_common_row, _common_group, _common_channel): x exactly a Tensor, run
    eagerly, outside torch.func's transforms, forward AD and torch.jit.trace (see _torch_only; _plain refuses the
    meta device, and FakeTensors are subclasses)."""
    return type(x) is Tensor and not (_is_compiling() or _transforms_active() or _forward_ad._current_level >= 0
                                      or _eager_tracing())


def _common_row(spec: OpSpec, x, normalized_shape, weight, bias, eps, backend) -> Optional[Tensor]:
    """A row op's common call in the fewest Python steps (in a model each step costs µs, see _plain): eager, x a
    tensor that :func:`_plain` finds contiguous and that ends with the module's normalized_shape, a float eps (for
    RMSNorm None too), no fused activation (the caller checks). Its output, or None: then the general path runs,
    which repeats these checks and names what is wrong."""
    if not _common_eager(x):
        return None
    if eps is None and not spec.centered:  # RMSNorm's default (_rms_eps)
        eps = _MACHINE_EPS.get(x.dtype)
    try:
        if type(eps) is not float or not checks.ends_with(x.shape, normalized_shape) \
                or _plain(x, normalized_shape, weight, bias) != _CONTIGUOUS:
            return None
    except RuntimeError:  # a strided nested tensor, which has no shape
        return None
    k = math.prod(normalized_shape)
    return _run_common(spec, _common_kernel(spec, "forward", x, backend, weight, bias), x, weight, bias, eps, 0,
                       (x.numel() // k, k), normalized_shape, backend, _CONTIGUOUS)


def _run_common(spec: OpSpec, kernel, x: Tensor, weight, bias, eps: float, groups: int, kshape: tuple,
                pshape: tuple, backend, plain: int) -> Tensor:
    """A common call of an op without running statistics (_common_row, _common_group), ``plain`` as _plain found
    it: without autograd and with an address kernel (``kernel``, else None), the kernel alone; else _Norm, or the
    forward, as the general path runs its plain calls."""
    if kernel is not None and not _needs_grad(x, weight, bias):
        return _forward_by_address(kernel, spec, x, weight, bias, eps, groups, kshape, None, None)[0]
    return _run(_Call(spec, eps, groups, kshape, pshape, None, None, True, False, 0, 0.0, backend, None, plain,
                      kernel), x, weight, bias)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None, activation=None,
               negative_slope=0.01):
    if activation is None:
        y = _common_row(_LN, input, normalized_shape, weight, bias, eps, backend)
        if y is not None:
            return y
    if _torch_only(input):
        return differentiable.activation(F.layer_norm(input, normalized_shape, weight, bias, eps),
                                         _act("layernorm", activation, negative_slope))
    op = "layernorm"
    compiling = _is_compiling()  # first: _plain's looks are eager-only
    plain = not compiling and _row_plain(input, normalized_shape, eps, weight, bias)
    if plain:
        x, shape = input, normalized_shape
    elif _torch_computes(input, op):
        return differentiable.activation(F.layer_norm(input, normalized_shape, weight, bias, eps),
                                         _act(op, activation, negative_slope))
    else:
        x, shape = _row_input(op, input, normalized_shape)
        weight, bias = _params(op, x, shape, weight, bias)
        eps = _eps(op, eps)
    act = None if activation is None else _act(op, activation, negative_slope)
    if compiling:
        return _layer_norm(x, list(shape), weight, bias, eps, backend, *_op_args(act))[0]
    kshape = _kernel_shape(_LN, x.shape, len(shape))
    return _run(_Call(_LN, eps, 0, kshape, shape, None, None, True, False, 0, 0.0, backend, act, plain), x, weight,
                bias)


layer_norm.__doc__ = """:func:`torch.nn.functional.layer_norm` computed by normkit.""" + _ACTIVATION_DOC


def _rms_eps(x: Tensor, eps) -> float:
    """torch's default: the machine epsilon of the type it computes in (float32's for 16-bit data, not the
    dtype's own: ATen takes its opmath type's)."""
    return _MACHINE_EPS[x.dtype] if eps is None else _eps("rmsnorm", eps)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, backend=None):
    """:func:`torch.nn.functional.rms_norm` computed by normkit (``eps=None``: the machine epsilon of the type it
    computes in, float32's for 16-bit data, as in torch)."""
    y = _common_row(_RMS, input, normalized_shape, weight, None, eps, backend)
    if y is not None:
        return y
    if _torch_only(input):
        return F.rms_norm(input, normalized_shape, weight, eps)
    op = "rmsnorm"
    if _torch_computes(input, op):  # (every plain call was _common_row's)
        return F.rms_norm(input, normalized_shape, weight, eps)
    x, shape = _row_input(op, input, normalized_shape)
    weight, _ = _params(op, x, shape, weight, None)
    eps = _rms_eps(x, eps)
    if _is_compiling():
        return _rms_norm(x, list(shape), weight, eps, backend)[0]
    kshape = _kernel_shape(_RMS, x.shape, len(shape))
    return _run(_Call(_RMS, eps, 0, kshape, shape, None, None, True, False, 0, 0.0, backend, None, 0), x, weight,
                None)


# --- the fused residual add: (y, h) with h = x + residual and y = norm(h) -----------------------------------------

class _AddCall:
    """One call of a fused add: its op, shapes and backend; after forward, the saved statistics (NumPy)."""

    __slots__ = ("spec", "eps", "kshape", "pshape", "backend", "mean", "rstd")
    act = None  # no fused activation (differentiable.grads reads it as of a _Call)

    def __init__(self, spec, eps, kshape, pshape, backend):
        self.spec, self.eps, self.kshape, self.pshape, self.backend = spec, eps, kshape, pshape, backend

    def forward(self, x: Tensor, residual: Tensor, weight, bias) -> tuple[Tensor, Tensor]:
        """One kernel where the backend that runs the op has the fused add for the dtype; else the sum, then the
        op's kernel."""
        spec = self.spec
        x, residual, weight, bias = (_contiguous(t) for t in _aligned(x, residual, weight, bias))
        used, fused = fused_kernel(spec.name, "add_forward", _KERNEL_DTYPES[x.dtype], self.backend)
        if fused is None or not x.numel():
            h = torch.add(x, residual)
            y, self.mean, self.rstd, _ = _forward(spec, h, weight, bias, self.eps, 0, self.kshape, None, None, used)
            return y, h
        y, h = torch.empty_like(x, memory_format=_DENSE), torch.empty_like(x, memory_format=_DENSE)
        stat = spec.stat_shape(self.kshape)
        dtype = _NP_STAT_DTYPES[x.dtype]
        self.mean, self.rstd = np.empty(stat, dtype) if spec.centered else None, np.empty(stat, dtype)
        k = self.kshape
        fused(*spec.kernel_args("add_forward", dict(
            x=_np(x).reshape(k), residual=_np(residual).reshape(k), weight=_flat(weight), bias=_flat(bias),
            eps=self.eps, y=_writable(y).reshape(k), h=_writable(h).reshape(k), mean=self.mean, rstd=self.rstd)))
        return y, h

    def backward(self, dy: Tensor, dh: Optional[Tensor], h: Tensor, weight, weight_grad: bool, bias_grad: bool):
        """(dx, dweight, dbias): dx is the gradient of both x and residual, the norm's backward plus dh."""
        spec = self.spec
        dy, dh, weight = _aligned(_contiguous(_materialized(dy)), _contiguous(_materialized(dh)), weight)
        used, fused = fused_kernel(spec.name, "add_backward", _KERNEL_DTYPES[h.dtype], self.backend)
        if fused is None or not h.numel():
            dx, dw, db = _backward(spec, dy, h, self.mean, self.rstd, weight, 0, self.kshape, True, self.pshape,
                                   weight_grad, bias_grad, used)
            return (dx if dh is None else dx.add_(dh)), dw, db
        weight = _contiguous(weight)
        dx = torch.empty_like(h, memory_format=_DENSE)
        dtype = _NP_STAT_DTYPES[h.dtype]
        mean = self.mean
        if h.dtype == torch.float32 and mean is not None and recenter.needed(mean, self.rstd):
            h, mean, _ = _recentered(spec, _contiguous(h), mean, 0, self.kshape, _CONTIGUOUS)
        dwa = np.empty(self.pshape, dtype) if weight_grad else None
        dba = np.empty(self.pshape, dtype) if bias_grad else None
        k = self.kshape
        fused(*spec.kernel_args("add_backward", dict(
            dy=_np(dy).reshape(k), dh=None if dh is None else _np(dh).reshape(k), h=_np(h).reshape(k),
            mean=mean, rstd=self.rstd, weight=_flat(weight), dx=_writable(dx).reshape(k),
            dweight=None if dwa is None else dwa.reshape(-1), dbias=None if dba is None else dba.reshape(-1))))
        return dx, _from_numpy(dwa), _from_numpy(dba)


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, call):
        y, h = call.forward(x, residual, weight, bias)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):  # h = x + residual has no graph, as in torch
            ctx.mark_non_differentiable(h)
        ctx.save_for_backward(h, weight)
        ctx.call = call
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        ctx.set_materialize_grads(False)  # no gradient for y or h comes as None, not as a tensor of zeros
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight = ctx.saved_tensors
        need_x, need_r, need_w, need_b, _ = ctx.needs_input_grad
        if dy is None:  # only h was used: the norm passes no gradient
            dx, dw, db = dh, None, None
        elif torch.is_grad_enabled() or _batched(dy):  # see _Norm.backward
            dx, dw, db = differentiable.grads(ctx.call, h, weight, None, dy, (need_x or need_r, need_w, need_b),
                                              ctx.param_dtypes[1] or h.dtype)
            dx = dx if dh is None else dx + dh  # (dx is None only where h has no graph: dh None)
        else:
            dx, dw, db = ctx.call.backward(dy, dh, h, weight, need_w, need_b)
            if h.dtype in _HALF:
                dw, db = _param_grads(dw, db, *ctx.param_dtypes)
        return dx if need_x else None, dx if need_r else None, dw, db, None


_add_norm_apply = None if _cpp_apply is None else _cpp_apply.__get__(None, _AddNorm)  # see _norm_apply
_direct_backward(_AddNorm)


def _check_residual(op: str, x: Tensor, residual: Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise checks.ArgumentError(f"{op}: residual must have the input's shape {tuple(x.shape)} and dtype "
                                   f"{_dtype_name(x)}, got {tuple(residual.shape)} and {_dtype_name(residual)}")


def _add_then_norm(spec, x, residual, shape, weight, bias, eps, backend):
    """The sum, then the op: under torch.compile (which fuses what it can) and where each function is torch's."""
    h = x + residual
    norm = layer_norm(h, shape, weight, bias, eps, backend=backend) if spec.centered else \
        rms_norm(h, shape, weight, eps, backend=backend)
    return norm, h


def _add_on_meta(spec, x, residual, shape, weight, bias, eps, backend):
    """A fused add on the meta device (see _torch_only): the residual's checks, then torch's operations."""
    if not isinstance(residual, Tensor):
        raise checks.ArgumentTypeError(f"{spec.name}: residual must be a torch.Tensor, got "
                                       f"{type(residual).__name__}")
    _check_residual(spec.name, x, residual)
    return _add_then_norm(spec, x, residual, shape, weight, bias, eps, backend)


def _add_norm(spec, x, residual, shape, weight, bias, eps, backend):
    op = spec.name
    residual = _tensor(op, "residual", residual, optional=False)
    _check_residual(op, x, residual)
    if _is_compiling() or _torch_only(x):
        return _add_then_norm(spec, x, residual, shape, weight, bias, eps, backend)
    call = _AddCall(spec, eps, _kernel_shape(spec, x.shape, len(shape)), shape, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        if _add_norm_apply is None:  # see _norm_apply
            return _AddNorm.apply(x, residual, weight, bias, call)
        return _add_norm_apply(_unwrap_if_dead(x), _unwrap_if_dead(residual),
                               None if weight is None else _unwrap_if_dead(weight),
                               None if bias is None else _unwrap_if_dead(bias), call)
    return call.forward(x, residual, weight, bias)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """``(y, h)`` with ``h = x + residual`` and ``y = layer_norm(h, normalized_shape, weight, bias, eps)``: the
    pre-norm transformer's residual step, in one pass over memory where the backend has the fused kernel (else
    the sum, then layer_norm). Gradients flow to x and residual from both y and h."""
    op = "layernorm"
    if _on_meta(x):
        return _add_on_meta(_LN, x, residual, normalized_shape, weight, bias, eps, backend)
    x, shape = _row_input(op, x, normalized_shape)
    weight, bias = _params(op, x, shape, weight, bias)
    return _add_norm(_LN, x, residual, shape, weight, bias, _eps(op, eps), backend)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, backend=None):
    """``(y, h)`` with ``h = x + residual`` and ``y = rms_norm(h, normalized_shape, weight, eps)``, in one pass
    over memory where the backend has the fused kernel (see :func:`add_layer_norm`)."""
    op = "rmsnorm"
    if _on_meta(x):
        return _add_on_meta(_RMS, x, residual, normalized_shape, weight, None, eps, backend)
    x, shape = _row_input(op, x, normalized_shape)
    weight, _ = _params(op, x, shape, weight, None)
    return _add_norm(_RMS, x, residual, shape, weight, None, _rms_eps(x, eps), backend)
