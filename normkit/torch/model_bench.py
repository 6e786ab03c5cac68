"""Time a whole model with torch.nn's norm layers against the same model converted to normkit's.

    import normkit.torch
    result = normkit.torch.benchmark(model, (x,))      # prints a table; result.train.ratio, result.infer.ratio

:func:`benchmark` deep-copies the model twice (the user's instance is never converted, run or modified), converts
one copy with :func:`normkit.torch.convert` (``fuse=True``: also fusing norm + activation pairs), checks that both
copies compute the same outputs and gradients, then times a training step (zero_grad, forward, loss, backward, SGD
step) and an inference step (``eval()`` under ``torch.no_grad()``) of each, the two copies interleaved call by call,
and reports medians. ``autocast=torch.bfloat16`` (or float16) runs both copies' forwards under
``torch.autocast("cpu", dtype=...)``, mixed-precision training as on a real CPU model. ``control=True`` times a
third copy, a second torch.nn one, in the same rounds: its ratio to the first is what the machine and memory
placement alone make of two identical models, the resolution of the normkit/torch ratio.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import registry
from . import modules
from .fuse import fusion_report

try:  # page-fault counts (Unix); without it the results carry None
    from resource import RUSAGE_SELF, getrusage
except ImportError:  # pragma: no cover - Windows
    getrusage = None

__all__ = ["BenchmarkResult", "ModelMismatchError", "ModeResult", "benchmark", "format_summary"]

#: the agreement check: each output tensor must agree to within RTOL of its largest magnitude (the two sides
#: round differently: normkit accumulates in float64, torch in float32)
RTOL = 1e-3
#: and each parameter's gradient to within GRAD_RTOL in L2 norm (relative to the gradient's norm, or to 1e-3 of
#: the largest gradient norm if that is larger): gradients are not continuous in rounding errors. An activation
#: within rounding distance of a ReLU's kink goes either way, and its whole gradient with it; in the resnet model,
#: one such element among 6.4 million moves some gradients by 0.3% (torch float32 against torch float64 too)
GRAD_RTOL = 5e-2
#: Under autocast both copies' gradients are 16-bit computations, far apart in a deep model (bfloat16's 8 bits,
#: rounded differently at every layer on the two sides; the resnet model's stem gradient differs by 0.27 with the
#: exact reference backend too). There each gradient is held to its float32 value instead: normkit's must be within
#: AUTOCAST_SLACK times torch's own distance from it (plus GRAD_RTOL).
AUTOCAST_SLACK = 2.0
#: a difference in page faults per step that the table's notes point out: 1 MiB of 4 KiB pages, a few ms
FAULTS_NOTED = 256
SGD_LR = 1e-3
SGD_MOMENTUM = 0.9

_OPS = {
    "BatchNorm1d": "batchnorm", "BatchNorm2d": "batchnorm", "BatchNorm3d": "batchnorm",
    "InstanceNorm1d": "instancenorm", "InstanceNorm2d": "instancenorm", "InstanceNorm3d": "instancenorm",
    "LayerNorm": "layernorm", "GroupNorm": "groupnorm", "RMSNorm": "rmsnorm",
}


class ModelMismatchError(AssertionError):
    """The converted copy's outputs or gradients differ from the torch.nn copy's on the example inputs."""


class _Stdout:
    """Default of ``file``: whatever ``sys.stdout`` is when :func:`benchmark` is called (as for ``print``)."""

    def __repr__(self) -> str:
        return "sys.stdout"


_STDOUT = _Stdout()


@dataclass(frozen=True)
class ModeResult:
    """One mode ("train" or "infer"): medians over the timed steps, and every step's time, in milliseconds; and the
    median of each copy's minor page faults per step (None where the platform does not count them): memory the
    allocator handed back to the OS and took again, whose pages fault in on first touch (1-2 µs each)."""

    mode: str
    torch_ms: float
    normkit_ms: float
    ratio: float  # normkit_ms / torch_ms: below 1 means the converted model is faster
    torch_times_ms: tuple[float, ...] = field(repr=False)
    normkit_times_ms: tuple[float, ...] = field(repr=False)
    torch_faults: Optional[float] = None
    normkit_faults: Optional[float] = None
    # with control=True: a second torch.nn copy, timed in the same rounds
    control_ms: Optional[float] = None
    control_times_ms: tuple[float, ...] = field(default=(), repr=False)

    @property
    def control_ratio(self) -> Optional[float]:
        """control_ms / torch_ms: two identical torch.nn copies, so what the machine's noise and the copies' places
        in memory alone make of a tie (None without control)."""
        return None if self.control_ms is None else self.control_ms / self.torch_ms

    @property
    def ratio_range(self) -> tuple[float, float]:
        """The 10th and 90th percentiles of the rounds' own ratios (each round times both copies back to back): how
        far the machine's noise moves the ratio. With fewer than two rounds, the one ratio twice."""
        ratios = [n / t for t, n in zip(self.torch_times_ms, self.normkit_times_ms)]
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        deciles = statistics.quantiles(ratios, n=10, method="inclusive")
        return deciles[0], deciles[-1]


@dataclass
class BenchmarkResult:
    model: str  # the model's class name
    inputs: str  # the example inputs' shapes and dtypes
    steps: int
    warmup: int
    compiled: bool
    backend: Optional[str]  # as passed to convert(); None: the registry's order
    torch_threads: int
    normkit_threads: int
    layers: dict[str, int]  # converted layer class -> count
    kernels: dict[str, str]  # op -> backend whose forward kernel the converted layers run
    agreement: dict[str, float]  # what was compared -> largest difference relative to the torch side's magnitude
    train: Optional[ModeResult] = None
    infer: Optional[ModeResult] = None
    notes: list[str] = field(default_factory=list)
    autocast: Optional[str] = None  # the dtype of torch.autocast("cpu", ...) around the forwards, or None
    fused: Optional[int] = None  # with fuse=True: how many norm + activation pairs convert() fused

    @property
    def modes(self) -> list[ModeResult]:
        return [r for r in (self.train, self.infer) if r is not None]

    def format(self) -> str:
        backend = self.backend or "registry order"
        control = any(r.control_ms is not None for r in self.modes)
        lines = [
            f"{self.model}: inputs {self.inputs}; {self.steps} timed steps after {self.warmup} warm-up, "
            f"interleaved{', torch.compile on both' if self.compiled else ''}"
            f"{f', under torch.autocast({self.autocast})' if self.autocast else ''}",
            f"torch {torch.__version__}: {self.torch_threads} threads; normkit: {self.normkit_threads} threads, "
            f"backend {backend} (" + ", ".join(f"{op}: {name}" for op, name in self.kernels.items()) + ")",
            "converted: " + ", ".join(f"{n} {cls}" for cls, n in self.layers.items())
            + ("" if self.fused is None else f"; fused {self.fused} norm + activation pairs")
            + "; agreement: " + ", ".join(f"{k} {v:.1e}" for k, v in self.agreement.items()),
            f"{'mode':<6} {'torch ms':>10} {'normkit ms':>11} {'normkit/torch':>14} {'rounds p10-p90':>15}"
            + (f" {'torch/torch':>12}" if control else "") + f"{'page faults/step: torch, normkit':>34}",
        ]
        for r in self.modes:
            lo, hi = r.ratio_range
            faults = "-" if r.torch_faults is None else f"{r.torch_faults:.0f}, {r.normkit_faults:.0f}"
            lines.append(f"{r.mode:<6} {r.torch_ms:>10.2f} {r.normkit_ms:>11.2f} {r.ratio:>14.3f} "
                         f"{f'{lo:.3f}-{hi:.3f}':>15}" + (f" {r.control_ratio:>12.3f}" if control else "")
                         + f"{faults:>34}")
        if control:
            lines.append("torch/torch: a second torch.nn copy against the first, timed in the same rounds (control): "
                         "a normkit/torch ratio as far from 1 as that one is a tie")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_summary(results: dict[str, BenchmarkResult]) -> str:
    """One line per model (name -> result): train and inference medians and ratios (and, where a result has one,
    the control's torch/torch ratio)."""
    width = max([5] + [len(name) for name in results])
    control = any(r.control_ms is not None for res in results.values() for r in res.modes)
    extra = f" {'torch/torch':>11}" if control else ""
    lines = [f"{'model':<{width}}  {'train: torch ms':>15} {'normkit ms':>10} {'ratio':>6}{extra}   "
             f"{'infer: torch ms':>15} {'normkit ms':>10} {'ratio':>6}{extra}"]
    for name, res in results.items():
        cells = []
        for r in (res.train, res.infer):
            ctl = "" if not control else f" {r.control_ratio:>11.3f}" if r and r.control_ms is not None else \
                f" {'-':>11}"
            cells.append((f"{r.torch_ms:>15.2f} {r.normkit_ms:>10.2f} {r.ratio:>6.3f}" if r
                          else f"{'-':>15} {'-':>10} {'-':>6}") + ctl)
        lines.append(f"{name:<{width}}  {cells[0]}   {cells[1]}")
    return "\n".join(lines)


# --- argument checks -------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"benchmark: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"benchmark: {name} must be >= {minimum}, got {value}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"benchmark: {name} must be True or False, got {type(value).__name__}")
    return value


def _leaves(obj) -> list:
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in _leaves(item)]
    return [obj]


def _tensors(obj) -> list[Tensor]:
    return [t for t in _leaves(obj) if isinstance(t, Tensor)]


def _describe(inputs: tuple) -> str:
    parts = []
    for x in inputs:
        if isinstance(x, Tensor):
            parts.append("x".join(map(str, x.shape)) + " " + str(x.dtype).removeprefix("torch."))
        else:
            parts.append(type(x).__name__)
    return ", ".join(parts) or "none"


# --- the agreement check ---------------------------------------------------------------------------------------

def _compare(key: str, what: str, expected: Tensor, actual: Tensor, agreement: dict[str, float],
             rtol: float = RTOL) -> None:
    """``actual`` (normkit) against ``expected`` (torch) to within ``rtol`` of the expected tensor's largest
    magnitude; records the largest difference, relative to that magnitude, under ``key``."""
    expected, actual = expected.detach(), actual.detach()
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ModelMismatchError(f"benchmark: the converted (normkit) copy's {what} is {tuple(actual.shape)} "
                                 f"{actual.dtype}, the torch.nn copy's {tuple(expected.shape)} {expected.dtype}")
    if not expected.is_floating_point():
        # integers made from floats (rounded, argmax) flip where rounding errors straddle a boundary, as often as
        # the floats' scale makes them (y * 1e5 rounded: 0.6% of elements): reported as the share that differs,
        # under a key of its own; the floating-point outputs are the check
        key = f"{key}, integer elements differing"
        diff = (expected != actual).double().mean().item() if expected.numel() else 0.0
    else:
        scale = expected.abs().max().item() if expected.numel() else 0.0
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        both_nan = expected.isnan() & actual.isnan()  # (agreeing: equal_nan below)
        diff = ((actual.double() - expected.double()).abs()[~both_nan].max().item() / scale
                if (~both_nan).any() else 0.0)
        try:
            # (atol alone: with rtol too an element as large as the scale could differ by twice the tolerance)
            torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale, equal_nan=True)
        except AssertionError as exc:
            raise ModelMismatchError(
                f"benchmark: the converted (normkit) copy's {what} differs from the torch.nn copy's on the example "
                f"inputs (tolerance {rtol:g} of its largest magnitude, {scale:.3g}):\n{exc}") from None
    agreement[key] = max(agreement.get(key, 0.0), diff if math.isfinite(diff) else math.inf)


def _projection_loss(out) -> Callable[[Any], Tensor]:
    """A fixed random projection of every floating-point output tensor: the loss sum((out * proj)), whose
    gradient is proj (the gradient of out.sum() through a normalization is zero)."""
    outs = [t for t in _tensors(out) if t.is_floating_point()]
    if not outs:
        raise ValueError("benchmark: the model's output has no floating-point tensor to build the default loss "
                         "from; pass loss_fn")
    gen = torch.Generator().manual_seed(0)
    projs = [torch.randn(t.shape, generator=gen, dtype=t.dtype) / math.sqrt(max(t.numel(), 1)) for t in outs]

    def loss(output) -> Tensor:
        ts = [t for t in _tensors(output) if t.is_floating_point()]
        return sum((t * p).sum() for t, p in zip(ts, projs))

    return loss


def _loss(loss_fn, out) -> Tensor:
    value = loss_fn(out)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(f"benchmark: loss_fn must return a tensor with one element, got "
                        f"{type(value).__name__}{tuple(value.shape) if isinstance(value, Tensor) else ''}")
    return value.reshape(())


def _backward(loss: Tensor) -> None:
    if not loss.requires_grad:
        raise ValueError("benchmark: the training loss does not require grad (the model's output is detached or "
                         "not differentiable, or loss_fn's value is): pass a loss_fn that is, or train=False")
    loss.backward()


@contextlib.contextmanager
def _same_random_numbers():
    """The CPU generator seeded alike for each copy's checked call (dropout's masks), the caller's state restored
    after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _own(inputs: tuple) -> tuple:
    """Copies of the input tensors for one copy of the model: a forward that changes its input in place changes
    neither the other copy's nor the caller's, and a backward fills no ``.grad`` of the caller's tensors."""
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs)


def _float32(inputs: tuple) -> tuple:
    return tuple(t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)


# --- the benchmark ---------------------------------------------------------------------------------------------

def _autocast_dtype(value) -> Optional[torch.dtype]:
    if value is None:
        return None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(value, value)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"benchmark: autocast must be None, torch.bfloat16 or torch.float16 (or their names), got "
                         f"{value!r}")
    return dtype


def _autocasting(run: Callable, dtype: Optional[torch.dtype]) -> Callable:
    """``run`` with its forward under ``torch.autocast("cpu", dtype)`` (the loss and backward stay outside, as in
    PyTorch's mixed-precision recipe)."""
    if dtype is None:
        return run

    def call(*args):
        with torch.autocast("cpu", dtype=dtype):
            return run(*args)

    return call


def benchmark(model: nn.Module, example_inputs, *, steps: int = 20, warmup: int = 3, train: bool = True,
              infer: bool = True, backend: Optional[str] = None, loss_fn: Optional[Callable[[Any], Tensor]] = None,
              compile: bool = False, autocast=None, fuse: bool = False, rmsnorm_classes=None,
              control: bool = False, file=_STDOUT) -> BenchmarkResult:
    """Time ``model`` with its torch.nn norm layers against a copy converted to normkit's; print a table.

    ``example_inputs`` is a tensor or a tuple of arguments: ``model(*example_inputs)``. Two deep copies are
    made: one keeps (or gets back) the torch.nn layers, the other is passed to ``convert(copy, backend=backend,
    fuse=fuse, rmsnorm_classes=rmsnorm_classes)`` (``fuse=True``: norm layers fused with the activation after them,
    the count in ``result.fused``; ``rmsnorm_classes``: a model's own RMSNorm classes, as convert takes them);
    ``model`` itself is left untouched. Before timing, one training forward and backward and one inference forward
    of each copy are compared, each copy's under the same random numbers (dropout draws the same masks);
    :class:`ModelMismatchError` if a floating-point output differs by more than 1e-3 of its largest magnitude, or a
    parameter's gradient by more than 5e-2 in L2 norm (see GRAD_RTOL; in 16 bits, under autocast or for a 16-bit
    model, outputs within 8 ulps of that dtype and gradients as close to a float32 copy's as torch's: see
    AUTOCAST_SLACK). Integer outputs are reported as the share of their elements that differ.

    ``train``: time a training step (``zero_grad``, forward, ``loss_fn(output).backward()``, an SGD step, so both
    copies' weights evolve alike); ``loss_fn`` defaults to a fixed random projection of the output.
    ``infer``: time an ``eval()`` forward under ``torch.no_grad()``. Each mode runs ``warmup`` untimed steps and
    then ``steps`` timed ones, the two copies alternating (which one goes first alternates too); the result holds
    medians and the ratio normkit/torch of the medians. ``compile``: run both copies through ``torch.compile``
    (compilation happens during the agreement check and is not timed). ``autocast``: ``torch.bfloat16`` or
    ``torch.float16`` (or the name) runs every forward under ``torch.autocast("cpu", dtype=autocast)``; outputs
    then agree to within a few ulps of that dtype instead of RTOL. The training step runs with gradients on, also
    when ``benchmark`` is called under ``torch.no_grad()``. Threads are left as they are.
    ``control``: also time a second torch.nn copy in the same rounds (the order of the three rotating through all
    six permutations: ``steps`` a multiple of 6 takes each as often), with its own first call untimed;
    ``result.train.control_ratio`` (its median over the first copy's) is what noise and memory placement alone
    make of two identical models: a normkit/torch ratio no further from 1 is a tie.
    ``file``: where to print the table (default: ``sys.stdout`` at call time; None prints nothing). Each mode also
    reports each copy's median page faults per step (counted outside the timed spans), and a note when they differ.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"benchmark: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        example_inputs = tuple(example_inputs)
    else:
        raise TypeError(f"benchmark: example_inputs must be a tensor or a tuple of model arguments, got "
                        f"{type(example_inputs).__name__}")
    steps = _check_int("steps", steps, 1)
    warmup = _check_int("warmup", warmup, 0)
    train, infer, compile = _check_bool("train", train), _check_bool("infer", infer), _check_bool("compile", compile)
    fuse, control = _check_bool("fuse", fuse), _check_bool("control", control)
    autocast = _autocast_dtype(autocast)
    if not (train or infer):
        raise ValueError("benchmark: train and infer are both False; nothing to time")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"benchmark: backend must be a backend name or None, got {type(backend).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"benchmark: loss_fn must be callable (output -> scalar tensor), got "
                        f"{type(loss_fn).__name__}")
    if file is _STDOUT:
        file = sys.stdout
    elif file is not None and not callable(getattr(file, "write", None)):
        raise TypeError(f"benchmark: file must be a text stream or None, got {type(file).__name__}")
    for what, tensors in (("model", [*model.parameters(), *model.buffers()]),
                          ("example_inputs", _tensors(example_inputs))):
        devices = {t.device.type for t in tensors} - {"cpu"}
        if devices:
            raise ValueError(f"benchmark: {what} has tensors on {', '.join(sorted(devices))}; normkit's kernels "
                             f"run on the CPU only (move it with .cpu())")
    lazy = [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:  # (copy.deepcopy refuses them)
        raise ValueError(f"benchmark: model has lazy modules whose first forward has not run ({', '.join(lazy)}); "
                         f"run model(*example_inputs) once first")
    if backend is not None:  # convert() checks it too, but this names benchmark
        registry.require_backend(backend, "benchmark")

    # the two contenders: copies, never the user's instance (which may itself be converted already)
    torch_model = modules.revert(copy.deepcopy(model))
    nk_model = modules.convert(copy.deepcopy(model), backend=backend, fuse=fuse, rmsnorm_classes=rmsnorm_classes)
    converted = [c for c in map(_converted, nk_model.modules()) if c is not None]
    layers = dict(sorted(Counter(name for name, _ in converted).items()))
    if not layers:
        raise ValueError(f"benchmark: model ({type(model).__name__}) has no torch.nn normalization layer that "
                         f"normkit.torch.convert replaces ({', '.join(sorted(_OPS))}) and none of rmsnorm_classes; "
                         f"nothing to compare")
    notes = _coverage_notes(torch_model)
    # the norm layers see the autocast dtype (a 16-bit convolution's or linear layer's output)
    dtype = autocast or next((p.dtype for p in nk_model.parameters() if p.is_floating_point()), torch.float32)
    # in 16 bits (autocast or a 16-bit model) both copies round at every layer, so one ulp of a norm layer's output
    # travels on; their gradients are then held to a float32 copy's (AUTOCAST_SLACK)
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    rtol = RTOL if low is None else max(RTOL, 8 * torch.finfo(low).eps)
    kernels = {}
    for op in dict.fromkeys(op for _, op in converted):
        try:
            kernels[op] = registry.lookup(op, "forward", str(dtype).removeprefix("torch."), backend)[0]
        except Exception as exc:  # the header says so; the first call below raises it if a layer needs the kernel
            kernels[op] = f"none ({exc})"

    if train and not any(p.requires_grad for p in nk_model.parameters()):
        raise ValueError("benchmark: model has no parameter that requires grad, so there is no training step to "
                         "time; pass train=False")
    # the control: a second torch.nn copy, made before any step changes the first
    contenders = (torch_model, nk_model) + ((copy.deepcopy(torch_model),) if control else ())
    runners = [_autocasting(torch.compile(m) if compile else m, autocast) for m in contenders]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=SGD_LR, momentum=SGD_MOMENTUM)
                  for m in contenders] if train else []
    threads_before = torch.get_num_threads()

    # the agreement check (first calls: also JIT and torch.compile compilation)
    agreement: dict[str, float] = {}
    first: dict[str, list[float]] = {}
    # the float32 copy that 16-bit gradients are measured against (before training updates any statistic)
    float32_model = copy.deepcopy(torch_model).float() if train and low is not None else None
    if train:
        outs = []
        for m, run, opt in zip((torch_model, nk_model), runners, optimizers):
            m.train()
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with _same_random_numbers(), torch.enable_grad():  # (dropout draws the same masks in both copies)
                out = run(*_own(example_inputs))
                if loss_fn is None:
                    loss_fn = _projection_loss(out)
                _backward(_loss(loss_fn, out))
            first.setdefault("training step", []).append(time.perf_counter() - t0)
            outs.append(out)
        _compare_outputs("training output", outs, agreement, rtol)
        float32_grads = None
        if float32_model is not None:
            float32_model.train()
            with _same_random_numbers(), torch.enable_grad():
                _backward(_loss(loss_fn, float32_model(*_float32(_own(example_inputs)))))
            float32_grads = _grads(float32_model)
        _compare_gradients(torch_model, nk_model, agreement,
                           1e-3 if low is None else max(1e-3, torch.finfo(low).eps), float32_grads)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    if infer:
        outs = []
        for m, run in zip((torch_model, nk_model), runners):
            m.eval()
            t0 = time.perf_counter()
            with _same_random_numbers(), torch.no_grad():
                outs.append(run(*_own(example_inputs)))
            first.setdefault("inference step", []).append(time.perf_counter() - t0)
        _compare_outputs("inference output", outs, agreement, rtol)
    notes.append("first calls, not timed (" + ("compilation, " if compile else "") + "JIT, first touch): " + "; ".join(
        f"{what} torch {t[0]:.2f} s, normkit {t[1]:.2f} s" for what, t in first.items()))

    result = BenchmarkResult(
        model=type(model).__name__, inputs=_describe(example_inputs), steps=steps, warmup=warmup, compiled=compile,
        backend=backend, torch_threads=threads_before, normkit_threads=registry.get_num_threads(), layers=layers,
        kernels=kernels, agreement=agreement, notes=notes,
        autocast=None if autocast is None else str(autocast).removeprefix("torch."),
        fused=len(fusion_report(nk_model).fused) if fuse else None)

    if train:
        def train_step(run, opt, inputs):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():  # (also when benchmark itself is called under no_grad)
                    _loss(loss_fn, run(*inputs)).backward()
                opt.step()
            return step

        for m in contenders:
            m.train()
        result.train = _time("train", [train_step(run, opt, _own(example_inputs))
                                       for run, opt in zip(runners, optimizers)], steps, warmup)
    if infer:
        def infer_step(run, inputs):
            def step():
                with torch.no_grad():
                    run(*inputs)
            return step

        for m in contenders:
            m.eval()
        result.infer = _time("infer", [infer_step(run, _own(example_inputs)) for run in runners], steps, warmup)

    result.notes += [note for note in map(_faults_note, result.modes) if note]
    if torch.get_num_threads() != threads_before:
        result.notes.append(f"torch's thread count changed from {threads_before} to {torch.get_num_threads()} "
                            f"during the run (an OpenMP runtime started by a backend?); timings are suspect")
    if file is not None:
        print(result.format(), file=file, flush=True)
    return result


def _grads(model: nn.Module) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _compare_gradients(torch_model: nn.Module, nk_model: nn.Module, agreement: dict[str, float],
                       floor_factor: float = 1e-3, float32_grads: Optional[dict] = None) -> None:
    """Each parameter's gradient in the two copies: within GRAD_RTOL of each other, or, given the float32 copy's
    gradients (under autocast), normkit's as close to those as torch's (AUTOCAST_SLACK). Records the largest
    difference between the two copies."""
    grads = [_grads(m) for m in (torch_model, nk_model)]
    # a gradient that is zero in exact arithmetic (a conv bias in front of a norm layer) is rounding noise on both
    # sides: the scale has a floor, 1e-3 of the largest gradient norm (the 16-bit eps under autocast)
    norms = {n: g.double().norm().item() for n, g in grads[0].items() if g is not None}
    floor = floor_factor * max(norms.values(), default=0.0)
    worst = 0.0
    for name, g in grads[0].items():
        h = grads[1][name]
        if (g is None) != (h is None):
            raise ModelMismatchError(f"benchmark: parameter {name} has a gradient in only one of the copies")
        if g is None:
            continue
        scale = max(norms[name], floor) or 1.0
        rel = (h.double() - g.double()).norm().item() / scale
        if float32_grads is None:
            ok, why = rel <= GRAD_RTOL, f"tolerance {GRAD_RTOL:g}"
        else:
            exact = float32_grads[name].double()
            ours, theirs = ((t.double() - exact).norm().item() / scale for t in (h, g))
            ok = ours <= AUTOCAST_SLACK * theirs + GRAD_RTOL
            why = (f"under autocast: {ours:.2g} from the float32 gradient, where torch's is {theirs:.2g} from it; "
                   f"tolerance {AUTOCAST_SLACK:g} x that + {GRAD_RTOL:g}")
        if not ok and math.isfinite(norms[name]):
            raise ModelMismatchError(
                f"benchmark: the converted (normkit) copy's gradient of {name} differs from the torch.nn copy's on the "
                f"example inputs by {rel:.2g} (L2 norm of the difference relative to the gradient's, {scale:.3g}; "
                f"{why})")
        worst = max(worst, rel if math.isfinite(rel) else 0.0)
    agreement["gradients"] = worst


def _compare_outputs(what: str, outs: Sequence, agreement: dict[str, float], rtol: float = RTOL) -> None:
    expected, actual = _leaves(outs[0]), _leaves(outs[1])
    if len(expected) != len(actual):
        raise ModelMismatchError(f"benchmark: {what}: the copies return different structures")
    for e, a in zip(expected, actual):
        if isinstance(e, Tensor) and isinstance(a, Tensor):
            _compare(what, what, e, a, agreement, rtol)


def _converted(module: nn.Module) -> Optional[tuple[str, str]]:
    """(class name, op) of a layer that convert() made normkit's, else None: a torch.nn class's name, or the name
    of a model's own RMSNorm class taken with rmsnorm_classes."""
    cls = modules._plain_class(module)[0]  # (under a parametrization's subclass)
    if cls in modules._TO_TORCH:
        return cls.__name__, _OPS[cls.__name__]
    if issubclass(cls, modules._DeclaredRMSNormForward):
        return cls._normkit_original.__name__, "rmsnorm"
    return None


def _coverage_notes(torch_model: nn.Module) -> list[str]:
    """Norm layers that convert() leaves alone, and modules known to bypass their norm layers' forward."""
    notes = []
    norm_bases = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                   getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if c is not None)
    missed = Counter(type(m).__name__ for m in torch_model.modules()
                     if isinstance(m, norm_bases) and modules._plain_class(m)[0] not in modules._TO_NORMKIT)
    if missed:
        notes.append("left as torch.nn (convert() replaces exact torch.nn classes only): "
                     + ", ".join(f"{n} {cls}" for cls, n in sorted(missed.items())))
    fast = [name for name, m in torch_model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if fast:
        notes.append(f"{len(fast)} nn.TransformerEncoderLayer: in inference their fast path calls ATen's fused "
                     f"kernel with the LayerNorms' weights and never their forward, so normkit does not run there")
    return notes


def _faults_note(r: ModeResult) -> Optional[str]:
    """A note when the copies' page faults per step differ by more than FAULTS_NOTED and a tenth."""
    if r.torch_faults is None or abs(r.normkit_faults - r.torch_faults) <= max(
            FAULTS_NOTED, 0.1 * max(r.torch_faults, r.normkit_faults)):
        return None
    return (f"{r.mode}: the copies' page faults per step differ ({r.torch_faults:.0f} torch, {r.normkit_faults:.0f} "
            f"normkit): memory the allocator gave back to the OS and a step touched again, 1-2 µs a page, which "
            f"follows the process's allocation history more than the norm layers (README, 'Is my model faster?')")


def _minor_faults() -> int:
    return getrusage(RUSAGE_SELF).ru_minflt if getrusage is not None else 0


def _time(mode: str, calls: Sequence[Callable[[], None]], steps: int, warmup: int) -> ModeResult:
    """Warm-up and timed rounds of the contenders (torch, normkit and, if given, the control); each round calls
    every one, in the next of their orders (both orders of two, the six of three, in turn, the first timed round
    taking the first order: ``steps`` a multiple of their count uses each equally). The page faults of each call
    are counted outside its timed span. A control's own first call is made first, untimed (its compilation, under
    compile=True: the other two made theirs in the agreement check)."""
    times: list[list[float]] = [[] for _ in calls]
    faults: list[list[int]] = [[] for _ in calls]
    orders = list(itertools.permutations(range(len(calls))))
    if len(calls) > 2:
        calls[2]()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + steps):
            for i in orders[(r - warmup) % len(orders)]:
                f0 = _minor_faults()
                t0 = time.perf_counter_ns()
                calls[i]()
                t1 = time.perf_counter_ns()
                if r >= warmup:
                    times[i].append((t1 - t0) * 1e-6)
                    faults[i].append(_minor_faults() - f0)
    finally:
        if gc_was_enabled:
            gc.enable()
    t, n = statistics.median(times[0]), statistics.median(times[1])
    counted = getrusage is not None
    control = len(calls) > 2
    return ModeResult(mode, t, n, n / t, tuple(times[0]), tuple(times[1]),
                      statistics.median(faults[0]) if counted else None,
                      statistics.median(faults[1]) if counted else None,
                      statistics.median(times[2]) if control else None, tuple(times[2]) if control else ())
