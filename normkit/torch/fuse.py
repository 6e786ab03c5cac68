"""Fusing a norm layer with the activation that follows it: :func:`fuse` for one pair, and what
``convert(model, fuse=True)`` does to a whole model.

``convert(model, fuse=True)`` fuses, in place, wherever it can prove that a norm layer's output goes to an
activation and nowhere else:

* **in every ``nn.Sequential``** (exactly that class, whose forward is known): a norm child followed by an
  activation child. The norm module itself gets the activation (so its state_dict keys, parameters and buffers
  are untouched) and the activation child is replaced by a :class:`FusedActivation` (an ``nn.Identity`` that
  remembers it), so the indices and keys of the other children stay valid;
* **in every other module whose own forward ``torch.fx`` can trace** (its children are leaves: each module is
  traced alone, so the children's forwards and hooks still run): a call of a norm child whose only user is a
  supported activation (a module call, or ``F.relu``, ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, ``F.silu``,
  ``F.gelu`` with constant arguments). The activation node is removed from the traced graph, the norm child
  gets the activation, and the module's class becomes a subclass of its own class whose forward is the rewritten
  graph's code (``isinstance`` and the module's other methods stay; :func:`~normkit.torch.revert` restores the
  class). A module whose forward cannot be traced, or traces differently in train and eval mode (it reads
  ``self.training``, which fx would freeze), is left alone, and the report says why; so is one whose forward
  fx would record wrongly: an argument with a default (its ``None`` branch would be lost), a ``no_grad`` /
  ``autocast`` block or a Python random draw (fx records neither), tensor constants. A norm child that another
  method of the module calls (timm's ``forward_features``) or that is a grandchild stays unfused. As with any
  fx rewrite, plain Python values the forward reads (a float attribute, a flag) are frozen at their values at
  conversion, and the rewritten module cannot be pickled whole (save its state_dict).

Neither path fuses a norm or an activation that has hooks (they would see other values, or not run), or a forward
set on the instance, nor anything while global module hooks are registered. What the Sequential path cannot see:
code that calls the fused Sequential's norm child directly (``seq[0](x)``, or iterating over its children to
tap the norm's output) gets the activation's output from it.

A norm layer is fused only when it is an exact normkit (after conversion) BatchNorm, InstanceNorm, GroupNorm or
LayerNorm without an activation yet, called once, and held in one place of the model. In-place activations
(``nn.ReLU(inplace=True)``) fuse too: the norm's output had no other user. What was fused and what was not comes
back in a :class:`FusionReport`: ``fusion_report(model)`` after ``convert(model, fuse=True)``, also logged at
INFO on the ``normkit.torch`` logger.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn


__all__ = ["FusedActivation", "Fusion", "FusionReport", "fuse", "fusion_report"]

_log = logging.getLogger("normkit.torch")
_REPORT = "_normkit_fusion_report"
_SUPPORTED = "nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU"


def activation_of(module: nn.Module) -> tuple[str, float]:
    """``(activation, negative_slope)`` for a torch.nn activation module; TypeError/ValueError for any other."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.SiLU:
        return "silu", 0.01
    if kind is nn.GELU:
        if module.approximate not in ("none", "tanh"):
            raise ValueError(f"fuse: nn.GELU(approximate={module.approximate!r}) has no fused form; "
                             f"approximate must be 'none' or 'tanh'")
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.01
    raise TypeError(f"fuse: activation must be one of {_SUPPORTED} (exactly those classes), got {kind.__name__}")


def _normkit_class(norm: nn.Module) -> type:
    """The normkit class a norm module becomes when fused; TypeError/ValueError when there is none."""
    from . import modules

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
    negative_slope, ``nn.SiLU``, ``nn.GELU`` with approximate "none" or "tanh"). ``norm`` itself is not changed.
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


class FusedActivation(nn.Identity):
    """What ``convert(model, fuse=True)`` leaves where an ``nn.Sequential`` had an activation fused into the norm
    before it: an identity that keeps the activation module (unregistered: it has no state) for ``revert``."""

    def __init__(self, original: nn.Module, into: str):
        super().__init__()
        self.__dict__["original"] = original
        self.into = into

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} fused into {self.into}"


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
    """What ``convert(model, fuse=True)`` fused, and what it traced in vain or left unfused (qualified name ->
    reason: a module fx could not be trusted with, or a norm another method calls)."""

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


def _fusable(norm: nn.Module, shared: set) -> bool:
    from . import modules

    return (type(norm) in modules._TO_TORCH and type(norm) is not modules.RMSNorm and norm.activation is None
            and id(norm) not in shared and _plain_calls(norm))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _plain_calls(module: nn.Module) -> bool:
    """Whether calling the module runs its class's forward and nothing else: no hooks (a hook on the norm would
    see the activation's output, one on the activation would not run) and no forward set on the instance
    (accelerate's hooks do that)."""
    return "forward" not in module.__dict__ and not any(getattr(module, h, None) for h in _HOOKS)


def _global_hooks() -> bool:
    """Module hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)."""
    from torch.nn.modules import module as _module

    return any(getattr(_module, f"_global{h}", None) for h in _HOOKS)


def fuse_model(model: nn.Module) -> FusionReport:
    """``convert(model, fuse=True)``'s fusion, on a model whose norms convert() has already switched."""
    report = FusionReport()
    if _global_hooks():
        report.not_traced[""] = "global module hooks are registered: fusing would change what they see"
        model.__dict__[_REPORT] = report
        return report
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    shared = {i for i, n in counts.items() if n > 1}
    names = {id(m): name for name, m in model.named_modules()}
    for module in model.modules():
        if type(module) is nn.Sequential:
            _fuse_sequential(module, names, shared, report)
    for name, module in list(model.named_modules()):
        if _traceable_candidate(module, shared):
            _fuse_traced(module, name, shared, report)
    model.__dict__[_REPORT] = report
    _log.info("normkit.torch.convert(fuse=True): %s", report)
    return report


def _fuse_sequential(seq: nn.Sequential, names: dict, shared: set, report: FusionReport) -> None:
    prefix = names[id(seq)]
    keys = list(seq._modules)
    for key, next_key in zip(keys, keys[1:]):
        norm, act = seq._modules[key], seq._modules[next_key]
        if norm is None or act is None or not _fusable(norm, shared) or not _plain_calls(act):
            continue
        try:
            name, slope = activation_of(act)
        except (TypeError, ValueError):
            continue
        norm_name = f"{prefix}.{key}" if prefix else key
        norm.activation, norm.negative_slope = name, slope
        norm.__dict__["_normkit_fused"] = True
        seq._modules[next_key] = FusedActivation(act, norm_name)
        act_name = f"{prefix}.{next_key}" if prefix else next_key
        report.fused.append(Fusion(norm_name, _describe(name, slope), "nn.Sequential",
                                   f"{act_name} ({type(act).__name__})"))


# --- torch.fx: a module's own forward ----------------------------------------------------------------------------

def _traceable_candidate(module: nn.Module, shared: set) -> bool:
    """A module with a forward of its own (not torch's or normkit's) and a norm it could fuse among its
    descendants."""
    origin = type(module).__module__
    if origin.startswith("torch.") or origin in _LAYER_MODULES or hasattr(type(module), "_normkit_fx_original"):
        return False
    return any(_fusable(m, shared) for m in module.modules() if m is not module)


# normkit's own layers: their forwards call normkit's functions, nothing to fuse in them
_LAYER_MODULES = {f"normkit.torch.{m}" for m in ("modules", "renorm", "sync", "keras", "fuse")}


class _ChildrenAreLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph:
    before = set(module.__dict__)
    try:
        graph = _ChildrenAreLeaves().trace(module)
    finally:
        added = set(module.__dict__) - before
        for key in added:  # tensor constants fx attaches to the traced module
            del module.__dict__[key]
    if added:  # the graph reads them: its code cannot run without them
        raise ValueError("its forward makes tensor constants (torch.tensor(...) and the like), which the rewritten "
                         "forward could not keep")
    return graph


# What fx records wrongly in a forward, refused before tracing: an argument with a default (fx traces it as a value
# that is always given, so a `None` default's branch is lost), and the context managers and Python random draws fx
# does not record (a no_grad or autocast block would silently vanish; a layer-drop draw would be frozen).
_NOT_RECORDED = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "autocast", "random")


def _untraceable(cls: type) -> Optional[str]:
    """Why fx cannot be trusted with ``cls``'s forward, or None."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    optional = [p.name for p in params if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if optional:
        return f"its forward has optional arguments ({', '.join(optional)}), which fx would freeze"
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return "its forward's source is not available to check"
    used = [word for word in _NOT_RECORDED if word in source]
    return f"its forward uses {', '.join(used)}, which fx does not record" if used else None


def _used_elsewhere(cls: type, attribute: str) -> Optional[str]:
    """The first method of ``cls`` (its own classes, not torch's) other than forward and __init__ that calls
    ``self.<attribute>(...)`` (timm's forward_features, say): it would get the activation that forward's rewrite
    moved into the norm."""
    call = re.compile(rf"self\.{re.escape(attribute)}\s*\(")
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for name, member in vars(klass).items():
            if name in ("forward", "__init__") or not inspect.isfunction(member):
                continue
            try:
                source = inspect.getsource(member)
            except (OSError, TypeError):
                return name
            if call.search(source):
                return name
    return None


def _trace_both_modes(module: nn.Module) -> fx.Graph:
    """The graph of the module's forward, checked to be the same in train and eval mode."""
    modes = {m: m.training for m in module.modules()}
    try:
        graphs = []
        for mode in (module.training, not module.training):
            module.train(mode)
            graphs.append(_trace(module))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise ValueError("its forward traces differently in train and eval mode (it reads self.training)")
    return graphs[0]


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


def _activation_call(node: fx.Node, root: nn.Module, arg: fx.Node) -> Optional[tuple[str, float, str]]:
    """(activation, slope, description) when ``node`` applies a supported activation to ``arg`` alone."""
    if not node.args or node.args[0] is not arg:
        return None
    if any(isinstance(a, (fx.Node, list, tuple, dict)) for a in (*node.args[1:], *node.kwargs.values())):
        return None  # computed or structured arguments: not provably an activation of arg alone
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs or not _plain_calls(module):
            return None
        try:
            name, slope = activation_of(module)
        except (TypeError, ValueError):
            return None
        return name, slope, f"{node.target} ({type(module).__name__})"
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
        return "relu", 0.01, f"Tensor.{node.target}"
    if node.op != "call_function":
        return None
    target = node.target
    described = f"{getattr(target, '__module__', None) or 'torch'}.{getattr(target, '__name__', target)}"
    if target in _RELU_FUNCTIONS:
        return "relu", 0.01, described
    if target is F.silu:
        return "silu", 0.01, described
    if target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return ("leaky_relu", float(slope), described) if isinstance(slope, (int, float)) else None
    if target is F.gelu:
        approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
        if approximate in ("none", "tanh"):
            return ("gelu" if approximate == "none" else "gelu_tanh"), 0.01, described
    return None


def _fuse_traced(module: nn.Module, name: str, shared: set, report: FusionReport) -> None:
    why = _untraceable(type(module))
    if why is not None:
        report.not_traced[name] = why
        return
    try:
        graph = _trace_both_modes(module)
    except Exception as exc:  # anything fx raises: the module is simply not rewritten
        report.not_traced[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip()
        return
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = []
    for node in list(graph.nodes):
        # a direct child only: a grandchild's own parent calls it too, without the activation
        if node.op != "call_module" or "." in node.target or calls[node.target] != 1 or len(node.users) != 1:
            continue
        norm = module.get_submodule(node.target)
        if not _fusable(norm, shared):
            continue
        user = next(iter(node.users))
        found = _activation_call(user, module, node)
        if found is None:
            continue
        elsewhere = _used_elsewhere(type(module), node.target)
        if elsewhere is not None:
            report.not_traced[f"{name}.{node.target}" if name else node.target] = \
                f"not fused: {type(module).__name__}.{elsewhere} uses it too"
            continue
        act, slope, described = found
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        fused.append((node.target, norm, act, slope, described))
    if not fused:
        return
    graph.lint()
    code = fx.GraphModule(module, graph)
    for target, norm, act, slope, described in fused:
        norm.activation, norm.negative_slope = act, slope
        norm.__dict__["_normkit_fused"] = True
        report.fused.append(Fusion(f"{name}.{target}" if name else target, _describe(act, slope), "torch.fx",
                                   described))
    module.__class__ = _traced_class(type(module), type(code).forward)


def _traced_class(cls: type, forward) -> type:
    """A subclass of ``cls`` whose forward is a rewritten graph's (one per module: the code is the module's)."""
    return type(cls.__name__, (cls,), {"forward": forward, "_normkit_fx_original": cls, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__,
                                       "__doc__": f"{cls.__qualname__} with norm + activation pairs fused by "
                                                  f"normkit.torch.convert(fuse=True)"})


def unfuse_model(model: nn.Module) -> None:
    """Undo :func:`fuse_model` (for revert): activations back in their Sequentials, traced classes back to the
    user's, fused norms without their activation. A norm given an activation by its constructor or :func:`fuse`
    cannot become a torch.nn module: ValueError, before anything is changed."""
    stuck = [name for name, m in model.named_modules()
             if getattr(m, "activation", None) is not None and not m.__dict__.get("_normkit_fused")]
    if stuck:
        raise ValueError(f"revert: {', '.join(n or '(model)' for n in stuck)} applies a fused activation that a "
                         f"torch.nn norm cannot hold (built with activation= or by fuse()); replace "
                         f"{'it' if len(stuck) == 1 else 'them'} first")
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if isinstance(child, FusedActivation):
                module._modules[key] = child.original
        original = type(module).__dict__.get("_normkit_fx_original")
        if original is not None:
            module.__class__ = original
        if module.__dict__.pop("_normkit_fused", False):
            module.__dict__.pop("activation", None)
            module.__dict__.pop("negative_slope", None)
    model.__dict__.pop(_REPORT, None)
