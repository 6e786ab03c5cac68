"""Fusing a norm layer with the activation that follows it: :func:`fuse` for one pair, and what
``convert(model, fuse=True)`` does to a whole model.

``convert(model, fuse=True)`` fuses, in place, the call sites where it can prove that a norm layer's output goes to
an activation and nowhere else. The norm and activation modules themselves do not change: called on their own
(``seq[0](x)``, from another method, by a hook-based feature extractor) they compute what they did before. Where:

* **in every ``nn.Sequential``** (or subclass running its forward, as torchvision's ``Conv2dNormActivation``)
  with a norm child followed by an activation child: its class becomes :class:`FusedSequential` (for a subclass,
  a subclass of its class with that forward), whose forward runs each such pair as one call of the norm's fused
  kernels. Its children, indices and state_dict keys stay as they were;
* **in every other module whose own forward ``torch.fx`` can trace** (its children are leaves: each module is traced
  alone, so the children's forwards and hooks still run): a call of a norm submodule whose only user is a supported
  activation (a module call: torch.nn's or transformers' ``ACT2FN`` modules, see :func:`fuse`; or ``F.relu``,
  ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, ``F.silu``, ``F.gelu`` with constant arguments) becomes one call of
  :func:`call_fused`. The module's class becomes a subclass of its own class whose forward runs the rewritten graphs'
  code (``isinstance`` and the module's other methods stay; :func:`~normkit.torch.revert` restores the class). fx
  freezes the Python a forward runs, so a graph holds for the calls like the one traced: the forward is traced for calls
  giving its required arguments alone, by position or by name (arguments with defaults at their defaults, ``*args`` and
  ``**kwargs`` empty: diffusers' ``ResnetBlock2D(input_tensor, temb, *args, **kwargs)``), for each choice of those after
  the first being ``None`` (up to four arguments: a VAE's ``temb=None``), in train and in eval mode with every submodule
  in that mode; a call runs the graph traced for its arguments and its module's mode, and the module's own forward where
  there is none (an optional argument given) or where the forward reads another module's training flag
  (``self.bn.training``, anywhere the trace runs) and the flags differ. A module whose forward cannot be traced is left
  alone, and the report says why; so is one whose forward fx would record wrongly: a grad-mode read, a ``no_grad`` /
  ``autocast`` block or a random draw (torch's, Python's or NumPy's global generator, or one reachable from the modules,
  their classes, the forward's globals and closures, or the globals of the code the trace runs) anywhere the trace runs
  (fx records none of them: they are watched as it traces, and looked for in the code of every function the trace runs,
  torch's, normkit's and the standard library's aside, comments and strings aside, and what an import runs), a read of a
  buffer's or a parameter's value (``if self.step > 0``, ``torch.equal``, ``.item()``: fx would run it once),
  ``isinstance`` / ``is_tensor`` tests and an ``autograd.Function``'s apply by any name (fx sees proxies: the test's
  branch and the function's backward would be lost), tensor constants, attributes it assigns, containers it appends to,
  counters it bumps or tensors it updates in place (in the modules and what they hold, four references down; in its
  classes; in the forward's default arguments; in the globals of the code the trace runs, and objects of the user's
  classes they hold) or buffers it updates in place (fx does not record them; fx traces a copy of the module that shares
  its tensors, and puts back the globals, class attributes and random states the trace changed, so the model itself is
  not touched; parameters changed through ``.data`` are not seen; ``print``, logging and warnings run once, at
  conversion), a child's method or property other than forward (fx would copy its code), a submodule or parameter held
  under two names (fx would call one), an ``nn.Sequential`` subclass with its own forward (its slices would run the
  rewrite), a class with ``__init_subclass__`` or a metaclass (it would see the rewritten class). As with any fx
  rewrite, the forward's structure and the plain Python values it reads are frozen at conversion (a loop over an
  ``nn.ModuleList`` runs the modules it held then; a float attribute, an ``is None`` test of a submodule, attributes a
  ``train()`` override sets (each mode is traced with the flags set directly), a ``type(x) is`` or ``hasattr`` test of
  an argument keep their values; ``a, b = pair`` takes two items unchecked): add or remove modules before converting
  (replacing one works). Traces run one at a time (their watches patch torch process-wide), and each puts the global
  random states and the globals it changed back: convert while no other thread draws from them or changes those globals.
  A rewritten module, and an ``nn.Sequential`` subclass fused, cannot be pickled whole (save its state_dict).

A fused call site checks at each call that nothing could tell the difference, and otherwise makes the two calls
the code made: the norm is still an exact normkit (after conversion) BatchNorm, InstanceNorm, GroupNorm or
LayerNorm without an activation of its own, the activation still a supported one (a module may have been
replaced), neither has hooks or a forward set on the instance, and no global module hooks are registered.
In-place activations (``nn.ReLU(inplace=True)``) fuse too: the norm's output had no other user. What was fused
and what was not comes back in a :class:`FusionReport`: ``fusion_report(model)`` after
``convert(model, fuse=True)``, also logged at INFO on the ``normkit.torch`` logger.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import copy
import functools
import gc
import importlib
import inspect
import itertools
import logging
import os
import pickle
import random
import re
import sys
import sysconfig
import textwrap
import threading
import tokenize
import types
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd import grad_mode
from torch.nn.modules import module as _module

from . import modules

__all__ = ["FusedSequential", "Fusion", "FusionReport", "call_fused", "fuse", "fusion_report"]

_log = logging.getLogger("normkit.torch")
_REPORT = "_normkit_fusion_report"
_SUPPORTED = ("nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, and transformers' SiLUActivation, GELUActivation, "
              "GELUTanh, NewGELUActivation, FastGELUActivation")


_FLT_MAX = float(np.finfo(np.float32).max)  # a larger leaky_relu slope: torch refuses it on float32 data: no fusing
# the activation classes with a fused form, and their forwards (a class patched since runs unfused)
_ACTIVATION_FORWARDS = {cls: cls.forward for cls in (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU)}
# transformers' activation classes (ACT2FN's: BERT's "gelu", LLaMA's and MobileViT's "silu", GPT-2's "gelu_new")
# whose forward computes an activation normkit fuses: the fused form by class name, for the classes of
# transformers.activations as defined there (a forward replaced since, by the kernels hub for one, runs unfused).
# NewGELU and FastGELU write the tanh approximation out (FastGELU with sqrt(2/pi) to 10 digits): the same function
# as torch's gelu(approximate="tanh") to float32's precision, as GELUTanh's own docstring says.
_TRANSFORMERS = "transformers.activations"
_TRANSFORMERS_KINDS = {"SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                       "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}


def _transformers_kind(module: nn.Module) -> Optional[str]:
    """The fused form of one of transformers' activation modules, else None (transformers is not imported here:
    a model holding its modules has imported it)."""
    kind = type(module)
    name = _TRANSFORMERS_KINDS.get(kind.__name__)
    source = sys.modules.get(_TRANSFORMERS)
    if name is None or getattr(source, kind.__name__, None) is not kind \
            or getattr(kind.forward, "__module__", None) != _TRANSFORMERS \
            or getattr(kind.forward, "__qualname__", None) != f"{kind.__name__}.forward":
        return None
    if kind.__name__ == "GELUActivation":  # act is F.gelu, or a Python formula of it (use_gelu_python=True)
        return name if module.__dict__.get("act") is F.gelu else None
    if kind.__name__ == "GELUTanh":  # act is partial(F.gelu, approximate="tanh"), or a Python formula of it
        act = module.__dict__.get("act")
        plain = isinstance(act, functools.partial) and act.func is F.gelu and not act.args \
            and act.keywords == {"approximate": "tanh"}
        return name if plain else None
    return name


def _kind(module: nn.Module) -> Optional[tuple[str, float]]:
    """``(activation, negative_slope)`` for a supported activation module, else None."""
    kind = type(module)
    if kind.__module__ == _TRANSFORMERS:
        name = _transformers_kind(module)
        return None if name is None else (name, 0.01)
    if _ACTIVATION_FORWARDS.get(kind, _kind) is not kind.forward:
        return None
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.LeakyReLU:
        slope = float(module.negative_slope)
        return ("leaky_relu", slope) if abs(slope) <= _FLT_MAX else None  # finite, float32's (compile-safe)
    if kind is nn.SiLU:
        return "silu", 0.01
    if kind is nn.GELU and module.approximate in ("none", "tanh"):
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.01
    return None


def activation_of(module: nn.Module) -> tuple[str, float]:
    """``(activation, negative_slope)`` for a torch.nn activation module; TypeError/ValueError for any other."""
    found = _kind(module)
    if found is not None:
        return found
    if type(module) is nn.LeakyReLU:
        raise ValueError(f"fuse: nn.LeakyReLU(negative_slope={module.negative_slope}) has no fused form; "
                         f"negative_slope must be finite")
    if type(module) is nn.GELU:
        raise ValueError(f"fuse: nn.GELU(approximate={module.approximate!r}) has no fused form; "
                         f"approximate must be 'none' or 'tanh'")
    if type(module).__module__ == _TRANSFORMERS and type(module).__name__ in _TRANSFORMERS_KINDS:
        raise ValueError(f"fuse: this {type(module).__name__} does not run transformers' own forward with torch's "
                         f"function (its act or forward was replaced): no fused form")
    raise TypeError(f"fuse: activation must be one of {_SUPPORTED} (exactly those classes), "
                    f"got {type(module).__name__}")


def _normkit_class(norm: nn.Module) -> type:
    """The normkit class a norm module becomes when fused; TypeError/ValueError when there is none."""
    kind = type(norm)
    cls = modules._TO_NORMKIT.get(kind, kind if kind in modules._TO_TORCH else None)
    if cls is modules.RMSNorm:
        raise ValueError("fuse: RMSNorm has no fused activation (normkit fuses activations into centered norms: "
                         "BatchNorm, InstanceNorm, GroupNorm, LayerNorm)")
    if cls is None:
        raise TypeError(f"fuse: norm must be a torch.nn or normkit BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, "
                        f"GroupNorm or LayerNorm (exactly those classes), got {kind.__name__}")
    if getattr(norm, "activation", None) is not None:
        raise ValueError(f"fuse: this {kind.__name__} already applies activation={norm.activation!r}")
    return cls


def fuse(norm: nn.Module, activation: nn.Module) -> nn.Module:
    """A normkit norm module computing ``activation(norm(x))`` in one pass: a new module of the normkit class of
    ``norm`` sharing its parameters and buffers (the same tensors: training either updates both), with
    ``activation``/``negative_slope`` set from the activation module (``nn.ReLU``, ``nn.LeakyReLU`` with its
    negative_slope, ``nn.SiLU``, ``nn.GELU`` with approximate "none" or "tanh", transformers' activation modules
    for "silu", "gelu", "gelu_pytorch_tanh", "gelu_new" and "gelu_fast"). ``norm`` itself is not changed.
    TypeError for another norm or activation class, ValueError for a norm that already has an activation."""
    if not isinstance(norm, nn.Module):
        raise TypeError(f"fuse: norm must be a torch.nn.Module, got {type(norm).__name__}")
    if not isinstance(activation, nn.Module):
        raise TypeError(f"fuse: activation must be a torch.nn.Module, got {type(activation).__name__}")
    cls = _normkit_class(norm)
    name, slope = activation_of(activation)
    fused = cls.__new__(cls)
    # the module's own dicts (parameters, buffers, hooks) are copied, the tensors they hold are shared
    fused.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in norm.__dict__.items()})
    fused.activation, fused.negative_slope = name, slope
    return fused


# the norm classes with a fused form (exactly these: a subclass may compute something else), and their forwards
_NORMS = {cls: cls.forward for cls in modules._TO_TORCH if cls is not modules.RMSNorm}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _plain_calls(module: nn.Module) -> bool:
    """Whether calling the module runs its class's forward and nothing else: no hooks (a hook on the norm would
    not see its output alone, one on the activation would not run) and no forward set on the instance
    (accelerate's hooks do that)."""
    return "forward" not in module.__dict__ and not any(getattr(module, h, None) for h in _HOOKS)


def _global_hooks() -> bool:
    """Module hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)."""
    return any(getattr(_module, f"_global{h}", None) for h in _HOOKS)


def _pair(norm: nn.Module, act) -> Optional[tuple[str, float]]:
    """``(activation, negative_slope)`` when ``norm`` then ``act`` (an activation module, or a function's call as
    :func:`call_fused` takes it) can run as one call of the norm's fused kernels now, else None."""
    if type(norm) not in _NORMS or _NORMS[type(norm)] is not type(norm).forward or norm.activation is not None \
            or not _plain_calls(norm) or _global_hooks():
        return None
    if isinstance(act, tuple):
        return act[:2]
    return _kind(act) if isinstance(act, nn.Module) and _plain_calls(act) else None


# the activation functions a traced forward's call site may have called, by the name call_fused gets (fx's code can
# hold strings and constants, not function objects)
_FUNCTIONS = {"F.relu": F.relu, "F.relu_": F.relu_, "torch.relu": torch.relu, "torch.relu_": torch.relu_,
              "Tensor.relu": torch.Tensor.relu, "Tensor.relu_": torch.Tensor.relu_, "F.silu": F.silu,
              "F.leaky_relu": F.leaky_relu, "F.gelu": F.gelu}
_FUNCTION_NAMES = {f: name for name, f in _FUNCTIONS.items() if not name.startswith("Tensor.")}


def call_fused(norm: nn.Module, act, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))`` as one call of the norm's fused kernels where :func:`_pair` allows it, else the two calls
    as the code made them: what a call site that ``convert(fuse=True)`` rewrote in a traced forward runs. ``act``
    is the activation module or, for a function, ``(activation, negative_slope, name, args, kwargs)``: the fused
    form and the call (``_FUNCTIONS[name](y, *args, **kwargs)``, in place where it was)."""
    found = _pair(norm, act)
    if found is not None:
        return norm._normalize(x, *found)
    y = norm(x)
    if isinstance(act, tuple):
        return _FUNCTIONS[act[2]](y, *act[3], **act[4])
    return act(y)


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose forward runs each norm child followed by an activation child as one call of the
    norm's fused kernels (where :func:`call_fused` would); what ``convert(model, fuse=True)`` makes of an
    ``nn.Sequential``. The children are untouched: each called alone computes what it computes anywhere."""

    def forward(self, input):
        if isinstance(input, fx.Proxy):  # torch.fx.symbolic_trace: each child one node, as in nn.Sequential
            return super().forward(input)
        norm = None  # a norm child whose call waits for the next child
        for module in self:
            if norm is not None:
                found = _pair(norm, module)
                if found is not None:
                    input, norm = norm._normalize(input, *found), None
                    continue
                input, norm = norm(input), None
            if type(module) in _NORMS:
                norm = module
            else:
                input = module(input)
        return input if norm is None else norm(input)


@dataclass(frozen=True)
class Fusion:
    """One fused pair: the norm module's qualified name, the activation (as ``activation=``, with the slope for
    leaky_relu), how it was found ("nn.Sequential" or "torch.fx") and what the activation was."""

    norm: str
    activation: str
    found_by: str
    replaced: str

    def __str__(self) -> str:
        return f"{self.norm} + {self.activation} ({self.found_by}: {self.replaced})"


@dataclass
class FusionReport:
    """What ``convert(model, fuse=True)`` fused, and what it left alone (qualified name -> reason: a module fx
    could not be trusted with, or a Sequential subclass whose class could not be rewritten)."""

    fused: list[Fusion] = field(default_factory=list)
    not_traced: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} norm + activation pair{'s' * (len(self.fused) != 1)}"]
        lines += [f"  {f}" for f in self.fused]
        lines += [f"  not traced: {name or '(model)'}: {why}" for name, why in self.not_traced.items()]
        return "\n".join(lines)


def fusion_report(model: nn.Module) -> Optional[FusionReport]:
    """The :class:`FusionReport` of the last ``convert(model, fuse=True)``, or None if there was none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusion_report: model must be a torch.nn.Module, got {type(model).__name__}")
    return model.__dict__.get(_REPORT)


def _describe(name: str, slope: float) -> str:
    return f"leaky_relu(negative_slope={slope:g})" if name == "leaky_relu" else name


def fuse_model(model: nn.Module) -> FusionReport:
    """``convert(model, fuse=True)``'s fusion, on a model whose norms convert() has already switched."""
    report = FusionReport()
    if _global_hooks():
        report.not_traced[""] = "global module hooks are registered: fusing would change what they see"
        model.__dict__[_REPORT] = report
        return report
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Sequential) and type(module).forward in (nn.Sequential.forward,
                                                                           FusedSequential.forward):
            _fuse_sequential(module, name, report)
        elif hasattr(type(module), "_normkit_fx_original"):  # rewritten by an earlier convert(fuse=True)
            _report_traced(module, name, report)
        elif _traceable_candidate(module):
            _fuse_traced(module, name, report)
    model.__dict__[_REPORT] = report
    _log.info("normkit.torch.convert(fuse=True): %s", report)
    return report


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: FusionReport) -> None:
    keys = list(seq._modules)
    for key, next_key in zip(keys, keys[1:]):
        norm, act = seq._modules[key], seq._modules[next_key]
        found = None if norm is None or act is None else _pair(norm, act)
        if found is None:
            continue
        if type(seq) is nn.Sequential:
            seq.__class__ = FusedSequential
        elif type(seq).forward is nn.Sequential.forward:  # a subclass (torchvision's Conv2dNormActivation)
            why = _init_subclass(type(seq))
            if why:
                report.not_traced[prefix] = why
                return
            seq.__class__ = _traced_class(type(seq), FusedSequential.forward)
        act_name = f"{prefix}.{next_key}" if prefix else next_key
        report.fused.append(Fusion(f"{prefix}.{key}" if prefix else key, _describe(*found), "nn.Sequential",
                                   f"{act_name} ({type(act).__name__})"))


# --- torch.fx: a module's own forward ----------------------------------------------------------------------------

def _traceable_candidate(module: nn.Module) -> bool:
    """A module with a forward of its own (not torch's or normkit's) and a norm it could fuse among its
    descendants."""
    origin = type(module).__module__
    if origin.startswith("torch.") or origin in _LAYER_MODULES:
        return False
    return any(type(m) in _NORMS for m in module.modules() if m is not module)


# normkit's own layers: their forwards call normkit's functions, nothing to fuse in them
_LAYER_MODULES = {f"normkit.torch.{m}" for m in ("modules", "renorm", "sync", "keras", "fuse")}


class _ChildrenAreLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


_CONTAINERS = (list, dict, set, collections.deque)  # and their subclasses (OrderedDict, defaultdict)


def _state(module: nn.Module) -> tuple:
    """Every submodule's attributes, with shallow copies of the containers among them, and what they hold
    (:func:`_held`) with the version counters of the tensors among it; its buffers, their version counters and
    copies (a forward's in-place update of a buffer runs for real while fx traces); the containers among the
    defaults of its forwards (its class's and those it overrides: shared with the user's model), with copies; and
    the bindings of its classes that are not torch's (:class:`_Bindings`)."""
    attributes = [(m, dict(m.__dict__), {k: copy.copy(v) for k, v in m.__dict__.items() if isinstance(v, _CONTAINERS)})
                  for m in module.modules()]
    forwards = _forwards(type(module))
    defaults = [d for f in forwards for d in (*(f.__defaults__ or ()), *(f.__kwdefaults__ or {}).values())]
    defaults = [(d, copy.copy(d)) for d in {id(d): d for d in defaults if _plain(d)}.values()]
    held = [(v, _reachable([v])) for m in module.modules() for v in vars(m).values()]
    tensors = {id(t): t for found in (*(found for _, found in held), _reachable([d for d, _ in defaults]))
               for t in found if issubclass(type(t), torch.Tensor) and not t.is_inference()}  # (no version counter)
    classes = [_Bindings(k) for k in type(module).__mro__[:-1] if not k.__module__.startswith("torch.")]
    buffers = [(b, None if b.is_inference() else b._version, b.detach().clone()) for b in module.buffers()]
    return (attributes, buffers, defaults, [(v, tuple(map(id, found))) for v, found in held],
            [(t, t._version) for t in tensors.values()], classes)


_LARGE = 10_000  # a larger container is not looked into (a vocabulary, a table)
_STDLIB_CONTAINERS = (list, dict, set, collections.deque, collections.OrderedDict, collections.defaultdict,
                      collections.Counter)


def _plain(value) -> bool:
    """A container of the standard library's (not a subclass of the user's, whose methods could do anything)."""
    return type(value) in _STDLIB_CONTAINERS and len(value) <= _LARGE


def _inside(value) -> list:
    """The objects a container, a plain object (a SimpleNamespace or an instance of a class of the user's), a
    partial, a closure or a bound method refers to. Read by the built-in types' own methods and by the type rather
    than the object (a user's override does not run); an object that cannot be read holds nothing."""
    kind = type(value)
    try:
        if issubclass(kind, dict):
            return [*dict.keys(value), *dict.values(value)] if dict.__len__(value) <= _LARGE else []
        for base in (list, tuple, set, frozenset, collections.deque):
            if issubclass(kind, base):
                return list(base.__iter__(value)) if base.__len__(value) <= _LARGE else []
        if kind is functools.partial:
            return [value.func, *value.args, *value.keywords.values()]
        if kind is types.FunctionType:
            return [c.cell_contents for c in value.__closure__ or () if _filled(c)]
        if kind in (types.MethodType, types.BuiltinMethodType):
            return [value.__self__]
        if kind is not types.SimpleNamespace and not _users_object(value):
            return []  # (a logger, a tensor, a module: their own state, or watched apart)
        slots = [n for k in kind.__mro__ for n in vars(k).get("__slots__", ()) if isinstance(n, str)]
        has_dict = any("__dict__" in vars(k) for k in kind.__mro__[:-1])  # (object's own is no instance dict)
        attributes = list(object.__getattribute__(value, "__dict__").values()) if has_dict else []
        return attributes + [getattr(value, n) for n in slots if hasattr(value, n)]
    except Exception:  # (a dead weak proxy, a context proxy outside its context, a raising slot)
        return []


def _reachable(roots: list, depth: int = 4, limit: int = 100_000) -> list:
    """The objects reachable from ``roots`` through :func:`_inside`, ``depth`` steps at most."""
    seen, found, layer = set(), [], list(roots)
    for _ in range(depth):
        following = []
        for value in layer:
            if id(value) not in seen and len(seen) < limit:
                seen.add(id(value))
                found.append(value)
                following += _inside(value)
        layer = following
    return found


def _held(value) -> tuple:
    """What ``value`` holds (:func:`_reachable`), by identity: a forward's appends and counters there run once,
    while fx traces."""
    return tuple(map(id, _reachable([value])))


class _Bindings:
    """The names a module's globals (a dict) or a class binds, the plain containers among them and what objects of
    the user's classes among them hold, taken before a trace: a forward's rebinding, appends and counters there run
    once, while fx traces; bindings and containers are put back after."""

    def __init__(self, owner):
        self.owner = owner
        self.names = self._now()
        self.containers = [(v, copy.copy(v), _held(v)) for v in self.names.values() if _plain(v)]
        self.objects = [(v, _held(v)) for v in self.names.values() if _users_object(v)]

    def _now(self) -> dict:
        namespace = self.owner if isinstance(self.owner, dict) else vars(self.owner)
        # (not the dunders: a module's __loader__, warnings' __warningregistry__ are the machinery's own state)
        return {k: v for k, v in namespace.items() if not (k.startswith("__") and k.endswith("__"))}

    def restore(self) -> bool:
        """Puts back what changed; whether anything had. A module bound anew is an import's doing (a package's
        ``from . import sub``): it stays, and is no change."""
        now = self._now()
        added = [k for k in now.keys() - self.names.keys() if not issubclass(type(now[k]), types.ModuleType)]
        changed = bool(added) or any(now.get(k, self) is not v for k, v in self.names.items())
        for k in added:
            if isinstance(self.owner, dict):
                del self.owner[k]
            else:
                delattr(self.owner, k)
        for k, v in self.names.items():
            if now.get(k, self) is not v:
                if isinstance(self.owner, dict):
                    self.owner[k] = v
                else:
                    setattr(self.owner, k, v)
        for container, items, held in self.containers:
            if not _same(container, items) or _held(container) != held:
                changed = True
                _put_back(container, items)
        return changed or any(_held(v) != held for v, held in self.objects)


def _put_back_bindings(bindings) -> bool:
    """:meth:`_Bindings.restore`; True (changed, for all one can tell) where the bindings could not be taken or
    compared (:func:`_running` keeps the exception)."""
    if isinstance(bindings, Exception):
        return True
    try:
        return bindings.restore()
    except Exception:
        return True


def _users_object(value) -> bool:
    """An instance of a class defined in a file of the user's (not torch's, NumPy's C types, the standard library's:
    a logger's caches change as it logs)."""
    kind = type(value)
    if issubclass(kind, (type, types.ModuleType, types.FunctionType, nn.Module, torch.Tensor)):
        return False
    filename = getattr(sys.modules.get(kind.__module__), "__file__", None)
    return isinstance(filename, str) and not _trusted(filename)


def _forwards(cls: type) -> list:
    """The forward functions of ``cls`` and of the classes it overrides."""
    return [vars(k)["forward"] for k in cls.__mro__ if inspect.isfunction(vars(k).get("forward"))]


def _same(a, b) -> bool:
    """Whether two containers hold the same objects (by identity: the values may be fx proxies)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    if isinstance(a, set):
        return {id(v) for v in a} == {id(v) for v in b}
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _put_back(container, items) -> None:
    container.clear()
    container.update(items) if isinstance(items, (dict, set)) else container.extend(items)


def _restore(state: tuple, bindings: list) -> list[str]:
    """Puts back what :func:`_state` took and returns the names of what had changed: what a forward assigned,
    appended or updated in place while fx traced it, which the rewritten forward would not do (the values left
    would be fx's proxies), with the globals :func:`_running` took (``bindings``). What lies deeper than
    :func:`_reachable` looks is not seen."""
    changed = []
    attributes, buffers, defaults, held, versions, classes = state
    if any(_held(v) != before for v, before in held) or any(t._version != before for t, before in versions):
        changed.append("what it holds (a nested container, an object's attribute, a tensor)")
    if any([_put_back_bindings(b) for b in classes]):  # (a list: every one put back)
        changed.append("a class attribute")
    if any([_put_back_bindings(b) for b in bindings]):
        changed.append("a global")
    for m, saved, containers in attributes:
        now, missing = m.__dict__, object()
        changed += [k for k in now.keys() | saved.keys() if now.get(k, missing) is not saved.get(k, missing)]
        now.clear()
        now.update(saved)
        for k, items in containers.items():
            if not _same(now[k], items):
                changed.append(k)
                _put_back(now[k], items)
    for container, items in defaults:
        if not _same(container, items):
            changed.append("a default argument's value")
            _put_back(container, items)
    with torch.no_grad():
        for b, version, values in buffers:  # .data has a version counter of its own: the values too
            if (version is not None and b._version != version) \
                    or not (b.eq(values) | (b.isnan() & values.isnan())).all():
                changed.append("a buffer, in place")
                b.copy_(values)
    return changed


@contextlib.contextmanager
def _watch(used: list, module: nn.Module, generators: list):
    """Notes in ``used`` what fx runs but does not record while it traces: grad-mode and autocast blocks and reads
    (fx's own tracing uses none of them), random draws of torch's, Python's or NumPy's global generator or of a
    generator the forward can reach (:func:`_generators`, and those :func:`_running` adds to ``generators`` as it
    meets the globals of other modules; their states are put back), and reads of a tensor's value (the inputs are
    fx's proxies: a buffer's or a parameter's, ``if self.step > 0``, which fx would run once)."""
    patched = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name in (
        (grad_mode.no_grad, "__enter__"), (grad_mode.enable_grad, "__enter__"),
        (grad_mode.inference_mode, "__enter__"), (grad_mode.set_grad_enabled, "__init__"),
        (torch.autocast, "__enter__"), (torch, "is_grad_enabled"), (torch, "is_autocast_enabled"),
        *((torch.Tensor, name) for name in _VALUE_READS), (torch, "equal"), (torch, "allclose"),
        (torch, "is_nonzero"))]

    def noting(what, original):
        def run(*args, **kwargs):
            used.append(what)
            return original(*args, **kwargs)
        return run

    def restore():  # (also from a forked child's hook, at any point of the patching: so it can run twice)
        for owner, name, original, own in patched:
            if own:
                setattr(owner, name, original)
            elif name in vars(owner):  # inherited: the class gets no attribute of its own
                delattr(owner, name)

    generators.extend((g, _rng_state(g)) for g in (*_GLOBAL_GENERATORS, *_generators(module)))
    _UNDO.append(restore)  # (before the change, and taken off after its undo: a fork between sees both)
    for owner, name, original, _ in patched:
        setattr(owner, name, noting(getattr(owner, "__name__", "torch") + "." + name.strip("_"), original))
    try:
        yield
    finally:
        restore()
        _UNDO.remove(restore)
        for g, state in generators:
            if _rng_state(g) != state:
                used.append("a random draw")
                _set_rng_state(g, state)


_VALUE_READS = ("__bool__", "__int__", "__float__", "__complex__", "__index__", "item", "tolist", "is_nonzero",
                "numpy", "__array__", "__dlpack__", "equal", "allclose")
_GENERATORS = (torch.Generator, random.Random, np.random.Generator, np.random.RandomState)
# the generators behind torch.rand, random.random and np.random.rand (the last two private, and long stable)
_GLOBAL_GENERATORS = (torch.default_generator, random._inst, np.random.mtrand._rand)


def _generators(module: nn.Module) -> list:
    """The random generators a forward could draw from by a method without a telling name (``choice``,
    ``integers``): those :func:`_reachable` from the modules' attributes, its classes' attributes, its forwards
    (their closures) and their globals."""
    roots = [v for m in module.modules() for v in vars(m).values()]
    for k in type(module).__mro__[:-1]:
        roots += [v for v in vars(k).values() if not issubclass(type(v), type)]
    for f in _forwards(type(module)):
        roots += [f, *(v for v in f.__globals__.values() if not issubclass(type(v), (type, types.FunctionType)))]
    return [g for g in _reachable(roots) if _generator(g)]


def _generator(value) -> bool:
    """A random generator with a state (not ``random.SystemRandom``, which draws from the system)."""
    return issubclass(type(value), _GENERATORS) and not issubclass(type(value), random.SystemRandom)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


# Tensor.numpy as torch defines it: _watch patches the class's to note a forward's value reads, and the states that
# _rng_state takes while it is patched are normkit's bookkeeping, not the forward's
_tensor_numpy = torch.Tensor.numpy


def _rng_state(generator) -> bytes:
    if isinstance(generator, torch.Generator):
        return _tensor_numpy(generator.get_state()).tobytes()
    if isinstance(generator, np.random.Generator):
        return pickle.dumps(generator.bit_generator.state)
    return pickle.dumps(generator.get_state() if isinstance(generator, np.random.RandomState) else generator.getstate())


def _set_rng_state(generator, state: bytes) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = pickle.loads(state)
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(pickle.loads(state))
    else:
        generator.setstate(pickle.loads(state))


def _trace(module: nn.Module, inputs: int) -> tuple[fx.Graph, bool]:
    """The graph of the module's forward called with ``inputs`` arguments (:func:`_specialized`), and whether the
    code that tracing it ran reads training flags other than the module's own (:func:`_reads_flags`); ValueError
    where tracing changed the module (see :func:`_restore`) or ran what fx does not record (see :func:`_watch`,
    :func:`_misrecorded`)."""
    with _TRACING, _gc_paused():
        state, used, ran, bindings, generators = _state(module), [], {}, [], []
        try:
            with _watch(used, module, generators), _running(ran, module, bindings, generators):
                graph = _ChildrenAreLeaves().trace(module, concrete_args=(fx._symbolic_trace.PH,) * inputs)
        finally:
            changed = _restore(state, bindings)
    texts = {code: _text(code) for code in ran if not _trusted(code.co_filename)}  # the user's code the trace ran
    why = _misrecorded(module, "".join(map(_code, texts.values())))
    if why:
        raise ValueError(why)
    inlined = sorted({getattr(code, "co_qualname", code.co_name) for code in texts if "child" in ran[code]})
    if inlined:  # (a child's forward is a call in the graph: its methods and properties are not)
        raise ValueError(f"its forward runs {', '.join(inlined)} of a submodule, whose code fx would copy into the "
                         f"rewrite")
    if _FUNCTION_APPLY in ran:  # (reached by any name: an alias of a Function's apply has no ".apply(")
        used.append("autograd.Function.apply")
    if used:
        raise ValueError(f"its forward uses {', '.join(sorted(set(used)))}, which fx does not record")
    if any(k.startswith("_tensor_constant") for k in changed):  # the graph reads them: its code needs them
        raise ValueError("its forward makes tensor constants (torch.tensor(...) and the like), which the rewritten "
                         "forward could not keep")
    if changed:
        raise ValueError(f"its forward changes module attributes ({', '.join(sorted(set(changed)))}), which fx "
                         f"does not record")
    return graph, _reads_flags(texts, ran)


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__
# one trace at a time: _watch patches process-wide functions and puts back what it found, which two overlapping
# traces in two threads would leave patched (the second saves the first's patches as the originals)
_TRACING = threading.RLock()  # (reentrant: a forward may convert a model of its own)
_UNDO: list = []  # while a trace runs, how to put back what it changed process-wide: _watch's patches, gc


def _after_fork_in_child() -> None:
    """A trace that another thread was running when the process forked never ends in the child, which has no such
    thread: its lock would stay taken (the child's next convert(fuse=True) would wait for good), garbage collection
    off and torch's functions patched. Put back what it changed, latest first, and take a new lock."""
    global _TRACING
    if _TRACING._is_owned():  # the forking thread's own trace (a forward that forks) goes on in the child
        return
    _TRACING = threading.RLock()
    while _UNDO:
        _UNDO.pop()()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# What fx records wrongly and _watch does not catch, by words in the code the trace runs (conservative: "operand" has
# "rand"): grad-mode reads and blocks and random draws (a no_grad would silently vanish; a layer-drop draw would be
# frozen; _watch catches them where no name leads), type tests on what fx makes proxies, and autograd.Function.apply
# (fx records its forward only).
_NOT_RECORDED = ("no_grad", "enable_grad", "grad_enabled", "inference_mode", "autocast", "rand", "uniform",
                 "bernoulli", "normal_", "multinomial", "isinstance", "is_tensor", ".apply(")


def _untraceable(module: nn.Module) -> Optional[str]:
    """Why fx cannot be trusted with the module's forward, or None."""
    cls = type(module)
    if isinstance(module, nn.Sequential):  # its slices are made by self.__class__: they would run the rewrite
        return "an nn.Sequential subclass with a forward of its own"
    why = _init_subclass(cls)
    if why:
        return why
    for kind in ("modules", "parameters", "buffers"):
        named = getattr(module, f"named_{kind}")
        if len(list(named(remove_duplicate=False))) != len(list(named())):
            return f"one of its {kind} has two names, of which fx would call one"
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        inspect.getsource(cls.forward)
    except (OSError, TypeError, ValueError, AttributeError):  # no source file, or no Python function
        return "its forward's source is not available to check"
    keywords = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keywords:
        return f"its forward has keyword-only arguments without defaults ({', '.join(keywords)})"
    if not _inputs(cls):
        return "its forward has no required arguments"
    return None


def _text(code) -> str:
    """The source of ``code``; for code made at run time (``exec``, a namedtuple's ``__new__``), the names its
    bytecode uses."""
    try:
        return inspect.getsource(code)
    except (OSError, TypeError):  # no source: each name as a call and as an attribute call, for _NOT_RECORDED
        return "".join(f" {name}( .{name}(\n" for name in code.co_names)


def _reads_flags(texts: dict, ran: dict) -> bool:
    """Whether the user's code a trace ran (``texts``: code object -> source) may read a training flag other than
    the traced module's own: the word ``training`` anywhere in it (comments and strings too: ``getattr(m,
    "training")``), but for ``self.training`` in code that only ran with the traced module as ``self`` (``ran``,
    see :func:`_running`)."""
    for code, text in texts.items():
        reads = len(re.findall(r"\btraining\b", text))
        if ran[code] == {"root"}:
            reads -= len(re.findall(r"\bself\.training\b", text))
        if reads:
            return True
    return False


def _misrecorded(module: nn.Module, source: str) -> Optional[str]:
    """Why fx recorded the module's forward wrongly, read from the ``source`` its trace ran, or None."""
    used = [word for word in _NOT_RECORDED if word in source]
    if used:
        return f"its forward uses {', '.join(used)}, which fx does not record"
    for child, method in re.findall(r"\b\w+\.(\w+)\.(\w+)\s*\(", source):
        found = module._modules.get(child)
        if found is not None and not isinstance(found, _CONTAINER_MODULES) \
                and not isinstance(getattr(found, method, None), (nn.Module, type(None))):
            return f"its forward calls {child}.{method}, whose code fx would copy into the rewrite"
    return None


def _trusted(filename: str) -> bool:
    """Whether code from ``filename`` is fx's tracing or what it calls rather than the user's: torch's (fx itself,
    torch.nn.functional), normkit's (this module's _watch) and the standard library's (not the packages installed
    beside it)."""
    if filename.startswith(_OURS):  # (and "<frozen importlib._bootstrap>": the standard library, frozen)
        return True
    return filename.startswith(_STDLIB) and not {"site-packages", "dist-packages"} & set(filename.split(os.sep))


_OURS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep, "<frozen ")
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


# comments, string literals and (Python 3.12 and later) the literal text of f-strings; before 3.12 an f-string is
# one token, code in its braces included: kept whole
_NOT_CODE = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
_F_STRING = re.compile(r"[a-zA-Z]*[fF][a-zA-Z]*['\"]")


def _code(source: str) -> str:
    """``source`` with its comments and string literals blanked out (their words are not code)."""
    lines = textwrap.dedent(source).splitlines(keepends=True)
    try:
        tokens = list(tokenize.generate_tokens(iter(lines).__next__))
    except (tokenize.TokenError, SyntaxError):  # (a lambda's line, cut out of its expression): every word counts
        return source
    for token in tokens:
        if token.type in _NOT_CODE and not _F_STRING.match(token.string):
            (first, start), (last, end) = token.start, token.end
            for row in range(first - 1, last):
                line = lines[row]
                a, b = (start if row == first - 1 else 0), (end if row == last - 1 else len(line.rstrip("\n")))
                lines[row] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


@contextlib.contextmanager
def _running(ran: dict, module: nn.Module, bindings: list, generators: list):
    """Notes in ``ran`` the code of every Python function called in this thread, with what its ``self`` was in each
    call: "root" (``module``), "child" (one of its submodules) or "other"; and, the first time a function of the
    user's (not :func:`_trusted`) runs, its module's globals in ``bindings`` (:class:`_Bindings`) and the states of
    the random generators they reach in ``generators``. Not what an import runs (a module's top level and what it
    calls set up global state, once per process). A tracer or coverage tool set before misses those calls."""
    importing, children, namespaces = 0, {id(m) for m in module.modules() if m is not module}, set()

    def imported(frame, event, arg):
        nonlocal importing
        if event == "return":
            importing -= 1
        return imported

    def note(frame, event, arg):  # (the global trace function sees "call" events only)
        nonlocal importing
        if importing:
            return None
        if frame.f_code is _FIND_AND_LOAD or frame.f_code.co_name == "<module>":  # (the finders, loaders too)
            importing += 1
            return imported  # (a local trace function: it sees that frame's "return")
        me, namespace = frame.f_locals.get("self"), frame.f_globals
        if frame.f_code not in ran and id(namespace) not in namespaces and not _trusted(frame.f_code.co_filename):
            namespaces.add(id(namespace))
            try:  # (an exception here would go to the user's forward, and switch this trace function off)
                bindings.append(_Bindings(namespace))
                roots = [v for v in namespace.values() if not issubclass(type(v), (type, types.FunctionType))]
                generators.extend((g, _rng_state(g)) for g in _reachable(roots, depth=2) if _generator(g))
            except Exception as exc:
                bindings.append(exc)
        ran.setdefault(frame.f_code, set()).add("root" if me is module else "child" if id(me) in children else "other")
        return None
    previous = sys.gettrace()
    sys.settrace(note)
    try:
        yield
    finally:
        sys.settrace(previous)


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection: it would run gc.callbacks and finalizers, the code of whatever asked for them, as if
    the traced forward had (hypothesis's callback rebinds globals of its own)."""
    collecting = gc.isenabled()
    if collecting:
        _UNDO.append(gc.enable)  # (as in _watch: registered before the change, taken off after its undo)
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
            _UNDO.remove(gc.enable)


_FIND_AND_LOAD = importlib._bootstrap._find_and_load.__code__  # what an import statement runs, if not imported yet


def _inputs(cls: type) -> int:
    """How many arguments a call of the forward must give (the ones before the first default)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


# containers of modules: their methods (items, values) are fine to call in a forward
_CONTAINER_MODULES = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _init_subclass(cls: type) -> Optional[str]:
    """Why a subclass of ``cls`` made at run time would run the user's code, or None."""
    if type(cls) not in (type, abc.ABCMeta):
        return "its class has a metaclass, which the rewritten class would run"
    if any("__init_subclass__" in vars(k) for k in cls.__mro__[:-1] if not k.__module__.startswith("torch.")):
        return "its class defines __init_subclass__, which the rewritten class would run"
    return None


def _trace_calls(module: nn.Module) -> tuple[dict[tuple, fx.Graph], bool]:
    """The graphs of the module's forward, by ``(mode, nones)``: traced with every submodule in train or in eval
    mode, for calls whose required arguments are None where ``nones`` says (the first never: see
    :func:`_none_patterns`), one graph object where two are the same; and whether the code traced reads a training
    flag other than the module's own. A call with no None is always traced (what stops it is the module's reason not
    to be rewritten); a call with a None that cannot be traced gets no graph. fx runs the forward's Python: it runs on
    a copy of the module (sharing its tensors), so that what the forward stores in the module, however deep, stays
    there; :func:`_trace` puts back globals and class attributes, and refuses a forward that stores anything."""
    try:
        twin = copy.deepcopy(module, {id(t): t for t in (*module.parameters(), *module.buffers())})
    except Exception as exc:  # an attribute that cannot be copied
        raise ValueError(f"it cannot be copied for tracing ({type(exc).__name__})") from None
    graphs, sources, flags = {}, {}, False
    for nones in _none_patterns(_inputs(type(module))):
        twin.__class__ = _specialized(type(module), nones)
        for mode in (True, False):
            for m in twin.modules():  # the flag alone: a train() of the user's may do more (freeze parameters)
                m.training = mode
            try:
                graph, reads = _trace(twin, nones.count(False))
            except Exception:
                if any(nones):
                    continue
                raise
            src = graph.python_code("self").src
            graphs[mode, nones] = sources.setdefault(src, graph)
            flags |= reads
    return graphs, flags


def _none_patterns(inputs: int) -> list[tuple[bool, ...]]:
    """Which of ``inputs`` required arguments are None, for each call traced: none, and for up to four arguments
    each choice among all but the first (the input: diffusers' ``ResnetBlock2D(x, temb)`` gets ``temb=None`` in a
    VAE)."""
    if inputs > 4:
        return [(False,) * inputs]
    return [(False, *rest) for rest in itertools.product((False, True), repeat=inputs - 1)]


def _specialized(cls: type, nones: tuple[bool, ...]) -> type:
    """``cls`` with a forward taking its required arguments that are not None (``nones``) alone, for fx to trace:
    optional ones at their defaults, ``*args`` and ``**kwargs`` empty (:func:`_guarded` runs the graph only for such
    calls)."""
    def forward(self, *args):
        given = iter(args)
        return cls.forward(self, *(None if none else next(given) for none in nones))
    return type(cls.__name__, (cls,), {"forward": forward})


def _guarded(cls: type, inputs: int, traced: dict, flags: bool):
    """The rewritten forward: for calls like one traced (``inputs`` arguments, by position or by the names of
    parameters that take either, each None or not as traced), the graph traced for it in the module's mode
    (``traced[self.training, nones]``) with the arguments that are not None, unless the forward reads other modules'
    training flags (``flags``) and a submodule is in another mode (fx traced them all alike); the class's own forward
    for any other call."""
    original = cls.forward
    # the required arguments' names, where a call may give them by keyword (resnet(h, temb=None) in diffusers' VAE)
    params = list(inspect.signature(original).parameters.values())[1:1 + inputs]
    by_name = tuple(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else None for p in params)

    def forward(self, *args, **kwargs):
        if kwargs and len(args) + len(kwargs) == inputs and all(k in by_name[len(args):] for k in kwargs):
            args, kwargs = (*args, *(kwargs[name] for name in by_name[len(args):])), {}
        # (under torch.fx.symbolic_trace, the class's own forward: its fused calls cannot take a Proxy)
        if not kwargs and len(args) == inputs and not (flags and not _in_mode(self, self.training)) and \
                not any(isinstance(arg, fx.Proxy) for arg in args):
            nones = tuple(arg is None for arg in args)
            graph = traced.get((self.training, nones))
            if graph is not None:
                return graph(self, *(arg for arg in args if arg is not None)) if True in nones else graph(self, *args)
        return original(self, *args, **kwargs)
    # a code object of its own, as each fx graph's forward has: torch.compile counts recompilations per code object
    # (8 at most), and each rewritten module would be one more for a code shared by all of them
    names = {"co_qualname": f"{cls.__qualname__}.forward"} if hasattr(forward.__code__, "co_qualname") else {}
    own = forward.__code__.replace(**names)  # (a new code object even where no name changes: Python 3.10)
    return functools.update_wrapper(types.FunctionType(own, forward.__globals__, forward.__name__,
                                                       forward.__defaults__, forward.__closure__), original)


def _in_mode(module: nn.Module, mode: bool) -> bool:
    """Whether every submodule's training flag is ``mode``."""
    return all(m is None or (m.training is mode and _in_mode(m, mode)) for m in module._modules.values())


def _activation_call(node: fx.Node, root: nn.Module, arg: fx.Node) -> Optional[tuple]:
    """``(act, description)`` when ``node`` applies a supported activation to ``arg`` alone: ``act`` is the
    activation module's target, or a function's call as :func:`call_fused` takes it."""
    if not node.args or node.args[0] is not arg:
        return None
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, (fx.Node, list, tuple, dict)) for a in (*rest, *kwargs.values())):
        return None  # computed or structured arguments: not provably an activation of arg alone
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if rest or kwargs or _kind(module) is None:
            return None
        return node.target, f"{node.target} ({type(module).__name__})"
    if node.op == "call_method" and node.target in ("relu", "relu_") and not rest and not kwargs:
        return ("relu", 0.01, f"Tensor.{node.target}", (), {}), f"Tensor.{node.target}"
    name = _FUNCTION_NAMES.get(node.target) if node.op == "call_function" else None
    if name is None:
        return None
    if name == "F.leaky_relu":
        slope = rest[0] if rest else kwargs.get("negative_slope", 0.01)
        if not isinstance(slope, (int, float)) or not abs(slope) <= _FLT_MAX:
            return None
        fused = ("leaky_relu", float(slope))
    elif name == "F.gelu":
        approximate = rest[0] if rest else kwargs.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            return None
        fused = ("gelu" if approximate == "none" else "gelu_tanh", 0.01)
    else:
        fused = (name.split(".")[-1].rstrip("_"), 0.01)
    target = node.target
    return (*fused, name, rest, kwargs), f"{getattr(target, '__module__', None) or 'torch'}.{target.__name__}"


def _fuse_traced(module: nn.Module, name: str, report: FusionReport) -> None:
    why = _untraceable(module)
    if why is not None:
        report.not_traced[name] = why
        return
    try:
        graphs, flags = _trace_calls(module)
    except Exception as exc:  # anything fx raises: the module is simply not rewritten
        report.not_traced[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip()
        return
    unique = {id(g): g for g in graphs.values()}
    fused = {}  # the pairs fused in any graph, in order
    for graph in unique.values():
        fused.update(dict.fromkeys(_fuse_graph(module, graph)))
    if not fused:
        return
    code = {key: type(fx.GraphModule(module, graph)).forward for key, graph in unique.items()}
    forwards = {call: code[id(graph)] for call, graph in graphs.items()}
    module.__class__ = _traced_class(type(module), _guarded(type(module), _inputs(type(module)), forwards, flags),
                                     tuple(fused))
    _report_traced(module, name, report)


def _fuse_graph(module: nn.Module, graph: fx.Graph) -> list[tuple]:
    """Rewrites each norm + activation pair of ``graph`` as one :func:`call_fused`; the pairs, as
    ``(norm's target, activation, activation call)``."""
    fused = []
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        norm = module.get_submodule(node.target)
        user = next(iter(node.users))
        found = _activation_call(user, module, node)
        if found is None:
            continue
        act, described = found
        pair = _pair(norm, module.get_submodule(act) if isinstance(act, str) else act)
        if pair is None:
            continue
        with graph.inserting_before(node):  # where the norm ran (the activation reads nothing else)
            call = graph.call_function(call_fused, (graph.get_attr(node.target),
                                                    graph.get_attr(act) if isinstance(act, str) else act,
                                                    node.args[0]))
        user.replace_all_uses_with(call)
        graph.erase_node(user)
        graph.erase_node(node)
        fused.append((node.target, _describe(*pair), described))
    graph.lint()
    return fused


def _report_traced(module: nn.Module, name: str, report: FusionReport) -> None:
    report.fused += [Fusion(f"{name}.{target}" if name else target, activation, "torch.fx", described)
                     for target, activation, described in type(module)._normkit_fusions]


def _traced_class(cls: type, forward, fusions: tuple = ()) -> type:
    """A subclass of ``cls`` whose forward is a rewritten graph's (one per module: the code is the module's), with
    the call sites it fused (``(norm's target, activation, activation call)``)."""
    return type(cls.__name__, (cls,), {"forward": forward, "_normkit_fx_original": cls, "_normkit_fusions": fusions,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "__doc__": f"{cls.__qualname__} with norm + activation pairs fused by "
                                                  f"normkit.torch.convert(fuse=True)",
                                       "__reduce_ex__": _refuse_pickle, "__copy__": _copy, "__deepcopy__": _deepcopy})


def _refuse_pickle(self, protocol):
    # pickle would save the class by the user's name, find the user's class there and say it is "not the same
    # object", which blames the user's library; the rewritten forward has no name pickle could find
    raise pickle.PicklingError(f"{type(self).__qualname__}: its forward was rewritten by normkit.torch.convert("
                               f"fuse=True), which pickle cannot save; save the model's state_dict() instead, or "
                               f"normkit.torch.revert(model) before pickling it")


def _copy(self):
    """copy.copy, as for any module (it would otherwise ask __reduce_ex__, which refuses pickling)."""
    new = object.__new__(type(self))
    new.__setstate__(dict(self.__dict__))
    return new


def _deepcopy(self, memo):
    """copy.deepcopy, as for any module (see _copy): the class object itself, the state deep-copied."""
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__setstate__(copy.deepcopy(self.__dict__, memo))
    return new


def unfuse_model(model: nn.Module) -> None:
    """Undo :func:`fuse_model` (for revert): fused Sequentials and traced classes back to the user's classes. A
    norm given an activation by its constructor or :func:`fuse` cannot become a torch.nn module: ValueError,
    before anything is changed."""
    stuck = [name for name, m in model.named_modules()
             if isinstance(m, modules._Activation) and m.activation is not None]
    if stuck:
        raise ValueError(f"revert: {', '.join(n or '(model)' for n in stuck)} applies a fused activation that a "
                         f"torch.nn norm cannot hold (built with activation= or by fuse()); replace "
                         f"{'it' if len(stuck) == 1 else 'them'} first")
    for module in model.modules():
        if type(module) is FusedSequential:
            module.__class__ = nn.Sequential
        original = type(module).__dict__.get("_normkit_fx_original")
        if original is not None:
            module.__class__ = original
    model.__dict__.pop(_REPORT, None)
