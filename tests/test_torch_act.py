"""Fused activations in the PyTorch frontend: ``activation=`` on the functions and modules, ``fuse()``, and
``convert(model, fuse=True)``. Expected values are torch.nn.functional's norm followed by torch's activation,
computed in float64; normkit runs the reference backend (float64 inside, each output rounded once), so float32
results are within a few ulps of the float64 ones."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import gc
import importlib
import inspect
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import types
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normkit.torch as nt  # noqa: E402
from normkit.torch import functional  # noqa: E402

nn, F = torch.nn, torch.nn.functional
SLOPE = 0.2
ACTS = {
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}
# float32: the reference rounds each output once from float64, so a few ulps of float32 relative to the output's
# largest element (gradients sum terms of that size); float64: the same in float64 plus torch's own summation order
REL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _close(actual, expected, dtype, what):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=REL[dtype] * scale,
                               msg=lambda m: f"{what}: {m}")


def _op(op, training):
    """(normkit call, torch.nn.functional call, input shape, running statistics or None) for one op."""
    running = op in ("batchnorm", "instancenorm") and not training
    if op == "batchnorm":
        return (lambda x, w, b, rm, rv, **k: nt.batch_norm(x, rm, rv, w, b, training, **k),
                lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training), (4, 3, 5), running)
    if op == "instancenorm":
        return (lambda x, w, b, rm, rv, **k: nt.instance_norm(x, rm, rv, w, b, training, **k),
                lambda x, w, b, rm, rv: F.instance_norm(x, rm, rv, w, b, training), (2, 3, 4, 3), running)
    if op == "groupnorm":
        return (lambda x, w, b, rm, rv, **k: nt.group_norm(x, 2, w, b, **k),
                lambda x, w, b, rm, rv: F.group_norm(x, 2, w, b), (2, 4, 3, 2), False)
    return (lambda x, w, b, rm, rv, **k: nt.layer_norm(x, (4,), w, b, **k),
            lambda x, w, b, rm, rv: F.layer_norm(x, (4,), w, b), (3, 2, 4), False)


def _case(op, training, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    _, _, shape, running = _op(op, training)
    c = shape[-1] if op == "layernorm" else shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(c, generator=gen, dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    stats = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.3,
             torch.rand(c, generator=gen, dtype=torch.float64) + 0.5) if running else (None, None)
    proj = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), b.to(dtype), tuple(None if s is None else s.to(dtype) for s in stats), proj


def _forward_backward(f, x, w, b, stats, proj):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = f(x, w, b, *stats)
    grads = torch.autograd.grad((y.double() * proj).sum(), (x, w, b))
    return y, grads


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("op, training", [("batchnorm", True), ("batchnorm", False), ("instancenorm", True),
                                          ("instancenorm", False), ("groupnorm", True), ("layernorm", True)])
@pytest.mark.parametrize("act", tuple(ACTS))
def test_functional_activation_matches_torch(act, op, training, dtype):
    nk, ref, _, _ = _op(op, training)
    x, w, b, stats, proj = _case(op, training, dtype)
    y, grads = _forward_backward(lambda *a: nk(*a, activation=act, negative_slope=SLOPE, backend="reference"),
                                 x, w, b, stats, proj)
    expected_y, expected_grads = _forward_backward(lambda *a: ACTS[act](ref(*a)), x.double(), w.double(),
                                                   b.double(), tuple(None if s is None else s.double()
                                                                     for s in stats), proj)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, expected_y, dtype, "y")
    for name, g, e in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        _close(g, e, dtype, name)


def test_training_batch_norm_updates_running_statistics_as_without_activation():
    x, w, b, _, _ = _case("batchnorm", True, torch.float32)
    stats = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
    nt.batch_norm(x, *stats[0], w, b, True, activation="silu", backend="reference")
    F.batch_norm(x, *stats[1], w, b, True)
    for mine, theirs in zip(*stats):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op, training", [("batchnorm", True), ("batchnorm", False), ("instancenorm", False),
                                          ("groupnorm", True)])
def test_channels_last_input_gives_channels_last_output(op, training):
    """No channels-last kernel has an activation: BatchNorm and the inference directions run the NCHW one on the
    (N*S, C, 1) view, GroupNorm on a copy; either way the output is channels-last."""
    nk, ref, _, _ = _op(op, training)
    x, w, b, stats, _ = _case(op, training, torch.float32)
    x = x.reshape(2, 3, -1, 2) if x.dim() == 3 else x  # 4-D for torch.channels_last
    proj = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    y, grads = _forward_backward(lambda *a: nk(*a, activation="gelu"), x, w, b, stats, proj)
    e, expected = _forward_backward(lambda *a: F.gelu(ref(*a)), x.double(), w.double(), b.double(),
                                    tuple(None if s is None else s.double() for s in stats), proj)
    assert y.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(
        memory_format=torch.channels_last)
    _close(y, e, torch.float32, "y")
    for g, h in zip(grads, expected):
        _close(g, h, torch.float32, "grad")


def test_bfloat16_within_a_few_ulps():
    """bfloat16 data with float32 parameters (autocast's case): y within 1 ulp of the rounded float64 result (2
    allowed here), the gradients within the kernels' 2 ulps plus cancellation slack, relative to their scale."""
    x, w, b, _, proj = _case("groupnorm", True, torch.float32, seed=3)
    xb = x.to(torch.bfloat16)
    y, grads = _forward_backward(lambda *a: nt.group_norm(a[0], 2, a[1], a[2], activation="silu",
                                                          backend="reference"), xb, w, b, (None, None), proj)
    e, expected = _forward_backward(lambda *a: F.silu(F.group_norm(a[0], 2, a[1], a[2])), xb.double(), w.double(),
                                    b.double(), (None, None), proj)
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.double(), e, rtol=2 * eps, atol=1e-30)
    for g, h in zip(grads, expected):
        torch.testing.assert_close(g.double(), h, rtol=0.0, atol=4 * eps * h.abs().max().item())


@pytest.mark.parametrize("op", ("batchnorm", "instancenorm", "groupnorm", "layernorm"))
def test_empty_batch(op):
    nk, ref, shape, _ = _op(op, True)
    c = shape[-1] if op == "layernorm" else shape[1]
    x = torch.empty((0, *shape[1:]), requires_grad=True)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    y = nk(x, w, b, None, None, activation="relu")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


def test_gradcheck_float64():
    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.tensor([1.5, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: nt.group_norm(x, 1, w, b, activation="gelu_tanh"), (x, w, b))


def test_bad_activation_arguments():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="groupnorm: activation must be None or one of"):
        nt.group_norm(x, 2, activation="tanh")
    with pytest.raises(ValueError, match="layernorm: negative_slope must be a finite number"):
        nt.layer_norm(x, (3,), activation="leaky_relu", negative_slope=math.nan)
    with pytest.raises(ValueError, match="BatchNorm1d: activation must be"):
        nt.BatchNorm1d(4, activation="swish")


# --- modules ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, torch_build", [
    (lambda: nt.BatchNorm2d(4, activation="leaky_relu", negative_slope=SLOPE), lambda: nn.BatchNorm2d(4)),
    (lambda: nt.InstanceNorm2d(4, affine=True, track_running_stats=True, activation="gelu"),
     lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
    (lambda: nt.GroupNorm(2, 4, activation="silu"), lambda: nn.GroupNorm(2, 4)),
    (lambda: nt.LayerNorm(3, activation="relu"), lambda: nn.LayerNorm(3)),
])
def test_modules_take_activation(build, torch_build):
    mine, theirs = build(), torch_build()
    act = ACTS[mine.activation]
    assert f"activation={mine.activation!r}" in repr(mine)
    assert list(mine.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        mine.train(training), theirs.train(training)
        torch.testing.assert_close(mine(x), act(theirs(x)), rtol=1e-5, atol=1e-6)


# --- fuse() -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation, expected", [
    (nn.ReLU(), ("relu", F.relu)), (nn.ReLU(inplace=True), ("relu", F.relu)),
    (nn.LeakyReLU(SLOPE), ("leaky_relu", ACTS["leaky_relu"])), (nn.SiLU(), ("silu", F.silu)),
    (nn.GELU(), ("gelu", F.gelu)), (nn.GELU(approximate="tanh"), ("gelu_tanh", ACTS["gelu_tanh"])),
])
def test_fuse_each_activation(activation, expected):
    norm = nn.BatchNorm2d(4)
    fused = nt.fuse(norm, activation)
    assert type(fused) is nt.BatchNorm2d and fused.activation == expected[0] and type(norm) is nn.BatchNorm2d
    assert fused.weight is norm.weight and fused.running_mean is norm.running_mean
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    y = fused(x)  # training: updates the running statistics both modules hold
    torch.testing.assert_close(norm.running_mean, x.mean((0, 2, 3)) * 0.1, rtol=1e-5, atol=1e-7)
    norm.eval(), fused.eval()
    torch.testing.assert_close(fused(x), expected[1](norm(x)), rtol=1e-5, atol=1e-6)
    assert y.shape == x.shape


def test_fuse_errors():
    with pytest.raises(TypeError, match="fuse: activation must be one of nn.ReLU.*got Hardswish"):
        nt.fuse(nn.BatchNorm2d(4), nn.Hardswish())
    with pytest.raises(TypeError, match="fuse: norm must be .*got BatchRenorm2d"):
        nt.fuse(nt.BatchRenorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="fuse: RMSNorm has no fused activation"):
        nt.fuse(nn.RMSNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match="already applies activation='silu'"):
        nt.fuse(nt.GroupNorm(2, 4, activation="silu"), nn.ReLU())
    with pytest.raises(TypeError, match="fuse: activation must be a torch.nn.Module, got function"):
        nt.fuse(nn.LayerNorm(4), F.relu)
    with pytest.raises(ValueError, match="convert_sync_batchnorm: this BatchNorm2d applies activation='relu'"):
        nt.convert_sync_batchnorm(nt.fuse(nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(ValueError, match="revert: 0 applies a fused activation"):
        nt.revert(nn.Sequential(nt.BatchNorm2d(4, activation="relu")))


def test_modules_with_an_activation_attribute_are_no_fused_norms():
    """A user's block holding ``self.activation = nn.ReLU()`` (diffusers, transformers) is not a norm with a fused
    activation: convert_sync_batchnorm and revert raised for it."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.activation = nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.activation(self.bn(x))

    model = nt.convert(nn.Sequential(Block()), fuse=True)
    assert type(nt.convert_sync_batchnorm(copy.deepcopy(model))[0].bn) is nt.SyncBatchNorm
    assert type(nt.revert(model)[0].bn) is nn.BatchNorm2d


# --- convert(fuse=True) -------------------------------------------------------------------------------------------

def _spy_fused_kernels(monkeypatch) -> list:
    """The (op, direction) of each fused-activation kernel normkit looks up from now on."""
    looked_up = []
    kernel = functional._activation.kernel
    monkeypatch.setattr(functional._activation, "kernel",
                        lambda op, direction, *a: looked_up.append((op, direction)) or kernel(op, direction, *a))
    return looked_up


def _train_step(model, x, proj, owner=None):
    """Output and parameter gradients (of ``owner``'s parameters: the module a compiled ``model`` wraps)."""
    owner = model if owner is None else owner
    owner.zero_grad(set_to_none=True)
    y = model(x)
    (y * proj).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in owner.named_parameters()}


def _assert_same_model_results(original, converted, x):
    """Training output and parameter gradients, and eval output, of the converted model against the original's
    (float32: normkit's float64 statistics against torch's float32 ones). A gradient that is zero in exact
    arithmetic (a conv bias in front of a norm) is rounding noise on both sides, so the gradients' tolerance is
    relative to the largest gradient element of the model."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        shape = original.eval()(x).shape
    original.train()
    proj = torch.randn(shape, generator=gen)
    (y, grads), (e, expected) = _train_step(converted, x, proj), _train_step(original, x, proj)
    torch.testing.assert_close(y, e, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-3, atol=1e-5 * scale)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


def test_convert_fuses_in_sequential(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(SLOPE), nn.Flatten(),
                          nn.LayerNorm(8 * 6 * 6), nn.Tanh())
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert nt.convert(model, fuse=True) is model
    report = nt.fusion_report(model)
    assert [(f.norm, f.activation, f.found_by) for f in report.fused] == [
        ("1", "relu", "nn.Sequential"), ("4", f"leaky_relu(negative_slope={SLOPE:g})", "nn.Sequential")]
    assert type(model) is nt.FusedSequential and type(model[2]) is nn.ReLU and model[1].activation is None
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    looked_up = _spy_fused_kernels(monkeypatch)
    _assert_same_model_results(original, model, x)
    assert {("batchnorm", "act_forward"), ("batchnorm", "act_backward")} <= set(looked_up)
    twin = pickle.loads(pickle.dumps(model))
    assert type(twin) is nt.FusedSequential
    torch.testing.assert_close(twin(x), model(x))
    nt.revert(model)
    assert type(model) is nn.Sequential and type(model[1]) is nn.BatchNorm2d and nt.fusion_report(model) is None


class _Taps(nn.Module):
    """One norm called twice (each call followed by an activation), grandchildren's norms called directly (one of
    them without an activation, and held by another Sequential of the model too)."""

    def __init__(self, c, shared):
        super().__init__()
        self.norm, self.inner = nn.GroupNorm(2, c), nn.Sequential(nn.LayerNorm([c, 4, 4]))
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1), shared, nn.SiLU())

    def forward(self, x):
        h = F.relu(self.norm(x)) + F.silu(self.norm(x * 2))
        return self.seq(F.gelu(self.inner[0](h))) + self.seq[1](h)


def test_rewritten_modules_copy_and_refuse_pickle_clearly():
    """A module whose forward convert(fuse=True) rewrote cannot be pickled (its forward has no name); pickle said
    the user's class was "not the same object" as itself, naming neither normkit nor what to do. copy and deepcopy
    keep working, with the rewritten forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Taps(4, nn.GroupNorm(2, 4))).eval()
    nt.convert(model, fuse=True)
    assert nt.fusion_report(model).fused
    with pytest.raises(pickle.PicklingError, match=r"_Taps: its forward was rewritten by normkit.torch.convert\("
                                                   r"fuse=True\), which pickle cannot save; save the model's "
                                                   r"state_dict\(\) instead, or normkit.torch.revert\(model\)"):
        pickle.dumps(model)
    x = torch.randn(2, 3, 4, 4)
    for twin in (copy.deepcopy(model), copy.copy(model)):
        assert type(twin[1]) is type(model[1])
        torch.testing.assert_close(twin(x), model(x))
    deep = copy.deepcopy(model)
    assert deep[1].norm is not model[1].norm and copy.copy(model[1]).norm is model[1].norm
    nt.revert(deep)
    assert len(pickle.dumps(deep))


def test_fused_call_sites_leave_the_modules_alone(monkeypatch):
    """convert(fuse=True) rewrites call sites, not modules: every norm called alone (``seq[1](x)``, by another
    method, by a hook-based feature extractor) gives its own output, so one norm called in several places fuses
    at each call that an activation follows and nowhere else. A call site finds at each call what would tell the
    difference (a hook registered since, an activation module replaced, global module hooks) and then makes the
    two calls."""
    torch.manual_seed(0)
    shared = nn.GroupNorm(2, 4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Taps(4, shared), nn.Sequential(shared, nn.ReLU()))
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    taps = model[1]
    assert sorted((f.norm, f.activation) for f in nt.fusion_report(model).fused) == [
        ("1.inner.0", "gelu"), ("1.norm", "relu"), ("1.norm", "silu"), ("1.seq.1", "silu"), ("2.0", "relu")]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    looked_up = _spy_fused_kernels(monkeypatch)
    _assert_same_model_results(original, model, x)
    assert {("groupnorm", "act_forward"), ("layernorm", "act_backward")} <= set(looked_up)
    h = torch.randn(2, 4, 4, 4)
    for name in ("norm", "inner", "seq"):  # eval mode, after _assert_same_model_results
        torch.testing.assert_close(getattr(taps, name)(h), getattr(original[1], name)(h), msg=name)
    torch.testing.assert_close(model[2][0](h), original[2][0](h))

    seen = []
    handle = taps.seq[1].register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    torch.testing.assert_close(model(x), original(x))
    assert seen and seen[0] < -0.5  # the norm's own output, not silu's (>= -0.28)
    handle.remove()
    taps.seq[2] = nn.Tanh()
    original[1].seq[2] = nn.Tanh()
    global_hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        torch.testing.assert_close(model(x), original(x))
    finally:
        global_hook.remove()
    looked_up.clear()
    torch.testing.assert_close(model(x), original(x))
    assert ("groupnorm", "act_forward") in looked_up
    fused = sorted(map(str, nt.fusion_report(model).fused))
    nt.convert(model, fuse=True)  # again (to pin a backend, say): the same report, less seq's pair (a Tanh now)
    assert sorted(map(str, nt.fusion_report(model).fused)) == [f for f in fused if not f.startswith("1.seq.1 ")]


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, plus the input: the UNet block, written as a module with a forward."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class Untraceable(nn.Module):
    """A forward with data-dependent control flow (fx cannot trace it) around a Sequential it can still fuse."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 1), nn.GroupNorm(2, c), nn.GELU())
        self.norm = nn.GroupNorm(2, c)

    def forward(self, x):
        y = F.relu(self.norm(x))
        return self.body(y) if y.sum() > 0 else y


def test_convert_fuses_in_traced_module_and_falls_back_where_fx_cannot_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResnetBlock(8), Untraceable(8))
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert {(f.norm, f.activation, f.found_by) for f in report.fused} == {
        ("1.norm1", "silu", "torch.fx"), ("1.norm2", "silu", "torch.fx"), ("2.body.1", "gelu", "nn.Sequential")}
    assert list(report.not_traced) == ["2"] and "TraceError" in report.not_traced["2"]
    assert isinstance(model[1], ResnetBlock) and type(model[2]) is Untraceable
    assert list(model.state_dict()) == keys
    assert "1.norm1 + silu" in str(report)
    _assert_same_model_results(original, model, torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7)))
    nt.revert(model)
    assert type(model[1]) is ResnetBlock and type(model[1].norm1) is nn.GroupNorm


def test_convert_leaves_a_norm_with_other_users_and_fuses_each_mode_apart():
    """A forward that reads self.training gets a graph per mode. One that reads a submodule's flag (a BatchNorm
    frozen in eval while its block trains) was traced with every flag alike: with mixed flags its own forward runs
    (found by a fuzz of the fusion: the mixed branch was frozen out)."""
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            y = self.norm(x)
            return F.relu(y) + y

    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

        def forward(self, x):
            return F.relu(self.norm(x)) if self.training else self.norm(x)

    class ReadsNormFlag(ModeDependent):
        def forward(self, x):
            y = F.relu(self.norm(x))
            return y * 2 if self.training and not self.norm.training else y

    model = nn.Sequential(TwoUses(), ModeDependent(), ReadsNormFlag())
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert [f.norm for f in report.fused] == ["1.norm", "2.norm"] and report.not_traced == {}
    x = torch.randn(3, 4, requires_grad=True)
    # (mode, norm's mode) -> whether each block's output has a relu of its own (not fused)
    for train, norm_train, relu in ((True, True, (False, False)), (False, False, (False, False)),
                                    (True, False, (False, True))):
        for m in (model, original):
            m.train(train)
            m[1].norm.train(norm_train)
            m[2].norm.train(norm_train)
        for i in (1, 2):
            y, want = model[i](x), original[i](x)
            torch.testing.assert_close(y, want)
            assert y.requires_grad == want.requires_grad
            assert ("ReluBackward0" in _autograd_nodes(y)) == relu[i - 1], (i, train, norm_train)


def _converted(modules: list) -> tuple:
    """The modules in an nn.ModuleList converted with fuse=True, a copy of them as they were, and the report."""
    model = nn.ModuleList(modules)
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    return model, original, nt.fusion_report(model)


def _autograd_nodes(y: torch.Tensor) -> set:
    """The names of the autograd nodes behind ``y`` (a fused call has no separate activation node)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


class _WithOptional(nn.Module):  # diffusers' ResnetBlock2D(x, temb=None)
    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x, temb=None):
        h = F.silu(self.norm(x))
        return h if temb is None else h + self.proj(temb)


class _VarArgs(nn.Module):  # diffusers' ResnetBlock2D(input_tensor, temb, *args, **kwargs)
    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.GroupNorm(2, 4), nn.Linear(3, 4)

    def forward(self, x, temb, *args, **kwargs):
        h = F.silu(self.norm(x))
        if temb is not None:  # (fx's proxy never is None)
            h = h + self.proj(temb)[:, :, None]
        if args:
            h = h + args[0]
        return h * kwargs.get("scale", 1.0)


def test_convert_fuses_a_forward_for_the_calls_it_traced():
    """A forward with optional arguments, *args or **kwargs is traced for calls giving its required arguments
    alone, for each choice of those after the first being None, and runs fused for those, by position or by name
    (diffusers' VAE calls resnet(h, temb=None), which ran unfused while reported fused); any other call runs the
    forward as written (fx would have frozen the branch the call takes)."""
    torch.manual_seed(0)
    model = _VarArgs()
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    assert [f.norm for f in nt.fusion_report(model).fused] == ["norm"]
    x, temb = torch.randn(2, 4, 5, requires_grad=True), torch.randn(2, 3)
    calls = [((x, temb), {}, True), ((x, None), {}, True), ((x, temb, 1.5), {}, False),
             ((x, temb), {"scale": 2.0}, False), ((), {"x": x, "temb": temb}, True), ((x,), {"temb": None}, True),
             ((x,), {"temb": temb, "scale": 2.0}, False), ((x,), {"scale": 2.0, "temb": temb}, False)]
    for args, kwargs, fused in calls:
        y = model(*args, **kwargs)
        torch.testing.assert_close(y, original(*args, **kwargs))
        assert ("SiluBackward0" not in _autograd_nodes(y)) == fused, (len(args), kwargs)
    assert list(inspect.signature(model.forward).parameters) == ["x", "temb", "args", "kwargs"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # the choice of graph compiles too
    for args in ((x, temb), (x, None)):
        torch.testing.assert_close(compiled(*args), original(*args))
    nt.revert(model)
    assert type(model) is _VarArgs


class _Doubler:  # not a module: no name in the forward's source leads to its code
    def scale(self, y):
        return y * 2 if isinstance(y, torch.Tensor) else y  # an fx proxy is no Tensor: the trace would keep y


class _ThroughObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.helper = nn.LayerNorm(4), _Doubler()

    def forward(self, x):
        return self.helper.scale(F.relu(self.norm(x)))


class _WordsNotCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        """Not random: a no_grad here would be wrong."""
        y = F.relu(self.norm(x))  # isinstance, torch.rand, autocast: words in a comment
        if len(self.norm.normalized_shape) > 5:
            raise ValueError("an operand of rank 6 is not supported")
        return y


_MADE = {}
exec("def scale(y):\n    return y * 2 if isinstance(y, torch.Tensor) else y\n", {"torch": torch}, _MADE)


class _MadeAtRunTime(_ThroughObject):  # a helper without source: its bytecode's names are read
    def forward(self, x):
        return _MADE["scale"](F.relu(self.norm(x)))


def test_convert_reads_the_code_the_trace_runs():
    """What fx would record wrongly is looked for in the code the trace runs, wherever it is (a helper object's
    method was not seen, and its isinstance test was frozen: the converted block returned y instead of 2y; code made
    by exec has no source: the names it uses), and not in comments, strings or code the trace does not run
    (diffusers' deprecate() behind *args)."""
    torch.manual_seed(0)
    model, original, report = _converted([_ThroughObject(), _WordsNotCode(), _MadeAtRunTime()])
    assert [f.norm for f in report.fused] == ["1.norm"]
    assert "uses isinstance" in report.not_traced["0"] and "uses isinstance" in report.not_traced["2"]
    x = torch.randn(3, 4)
    for m, o in zip(model, original):
        torch.testing.assert_close(m(x), o(x))


class _WithTemb(nn.Module):
    def __init__(self, block, temb):
        super().__init__()
        self.block = block
        self.register_buffer("temb", temb)

    def forward(self, x):
        return self.block(x, self.temb)


def test_convert_fuses_diffusers_resnet_blocks(monkeypatch):
    """diffusers' ResnetBlock2D (forward(input_tensor, temb, *args, **kwargs), reading self.training before its
    shortcut; temb=None in a VAE) was left unfused: a diffusers UNet or VAE fused none of its GroupNorm + SiLU
    pairs."""
    resnet = pytest.importorskip("diffusers.models.resnet")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    for temb in (torch.randn(2, 3), None):
        block = resnet.ResnetBlock2D(in_channels=4, out_channels=8, temb_channels=None if temb is None else 3,
                                     groups=2)
        model = _WithTemb(block, temb)
        original = copy.deepcopy(model)
        nt.convert(model, fuse=True)
        assert [f.norm for f in nt.fusion_report(model).fused] == ["block.norm1", "block.norm2"]
        looked_up = _spy_fused_kernels(monkeypatch)
        _assert_same_model_results(original, model, x)
        assert ("groupnorm", "act_backward") in looked_up


@pytest.mark.parametrize("key, fused", [("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                        ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh")])
def test_fuse_takes_transformers_activation_modules(monkeypatch, key, fused):
    """transformers' ACT2FN modules (LLaMA's and MobileViT's "silu", BERT's "gelu", GPT-2's "gelu_new") are not
    nn.SiLU / nn.GELU: convert(fuse=True) fused none of them (MobileViT: 0 of its BatchNorm + SiLU pairs)."""
    activations = pytest.importorskip("transformers.activations")
    torch.manual_seed(0)
    act = activations.ACT2FN[key]
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), act)
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    assert [(f.norm, f.activation) for f in nt.fusion_report(model).fused] == [("1", fused)]
    looked_up = _spy_fused_kernels(monkeypatch)
    _assert_same_model_results(original, model, torch.randn(2, 3, 5, 5))
    assert ("batchnorm", "act_backward") in looked_up
    assert nt.fuse(nn.GroupNorm(2, 4), act).activation == fused


def test_fuse_leaves_transformers_activations_that_compute_otherwise():
    """GELUActivation(use_gelu_python=True) and a class whose forward was replaced (the kernels hub does that) run
    other code than torch's function: not fused."""
    activations = pytest.importorskip("transformers.activations")
    python_gelu = activations.GELUActivation(use_gelu_python=True)
    with pytest.raises(ValueError, match="fuse: this GELUActivation does not run transformers' own forward"):
        nt.fuse(nn.BatchNorm2d(4), python_gelu)
    model = nn.Sequential(nn.BatchNorm2d(4), python_gelu)
    nt.convert(model, fuse=True)
    assert nt.fusion_report(model).fused == []

    class Patched(activations.SiLUActivation):
        pass

    with pytest.raises(TypeError, match="got Patched"):
        nt.fuse(nn.BatchNorm2d(4), Patched())
    forward = activations.SiLUActivation.forward
    try:
        activations.SiLUActivation.forward = lambda self, x: F.silu(x) * 2
        with pytest.raises(ValueError, match="this SiLUActivation does not run"):
            nt.fuse(nn.BatchNorm2d(4), activations.SiLUActivation())
    finally:
        activations.SiLUActivation.forward = forward


def test_convert_fuses_transformers_mobilevit_conv_layers(monkeypatch):
    """MobileViT's convolution layers (convolution, BatchNorm, ACT2FN["silu"]) fuse through fx."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                          neck_hidden_sizes=[8, 8, 8, 16, 16, 16, 32], num_attention_heads=2)
    model = transformers.MobileViTModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    nt.convert(model, fuse=True)
    fused = nt.fusion_report(model).fused
    assert len(fused) > 10 and {f.activation for f in fused} == {"silu"}
    assert all(f.replaced.endswith("(SiLUActivation)") for f in fused)
    looked_up = _spy_fused_kernels(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    assert ("batchnorm", "act_forward_infer") in looked_up


def test_convert_fuses_what_a_diffusers_vae_calls_by_keyword(monkeypatch):
    """AutoencoderKL's encoder and decoder blocks call resnet(h, temb=None): every pair the report lists runs
    fused (they ran the blocks' own forward, unfused)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = vae(x, sample_posterior=False).sample
    nt.convert(vae, fuse=True)
    reported = {f.norm for f in nt.fusion_report(vae).fused}
    names = {id(m): n for n, m in vae.named_modules()}
    ran = set()
    normalize = type(vae.encoder.down_blocks[0].resnets[0].norm1)._normalize
    monkeypatch.setattr(type(vae.encoder.down_blocks[0].resnets[0].norm1), "_normalize",
                        lambda self, x, act, slope: (act is not None and ran.add(names[id(self)]),
                                                     normalize(self, x, act, slope))[1])
    with torch.no_grad():
        torch.testing.assert_close(vae(x, sample_posterior=False).sample, want, rtol=1e-4, atol=1e-4)
    assert len(reported) > 10 and reported <= ran


class _FlagBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.conv(x)

    @property
    def frozen(self):
        return not self.training

    def maybe_scale(self, h):
        return h * 2 if self.training else h


class _ChildFlagProperty(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.block = nn.BatchNorm1d(4), _FlagBlock()

    def forward(self, x):
        h = F.relu(self.bn(x))
        return self.block(h * 3 if self.block.frozen else h)


class _ChildFlagMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.blocks = nn.BatchNorm1d(4), nn.ModuleList([_FlagBlock(), _FlagBlock()])

    def forward(self, x):
        h = F.relu(self.bn(x))
        for b in self.blocks:
            h = b(b.maybe_scale(h))
        return h


class _FlagByName(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm1d(4), nn.ReLU()

    def forward(self, x):
        h = self.act(self.bn(x))
        return h + 1 if getattr(self.bn, "training", False) else h


def test_convert_fuse_reads_flags_wherever_the_trace_reads_them():
    """Found by a fourth fuzz: a child's flag read in the child's own code (a property, a method through a loop
    variable) or by getattr with the name in a string was not seen, and with a child in eval while the model
    trained the converted model took the all-train branch. A child's method or property run by the forward is
    refused (fx copies its code: a fifth fuzz found a method reached through a loop variable kept after the child
    was replaced); the getattr read makes the fused graph run only while every flag agrees."""
    torch.manual_seed(0)
    model, original, report = _converted([_ChildFlagProperty(), _ChildFlagMethod(), _FlagByName()])
    assert [f.norm for f in report.fused] == ["2.bn"]
    assert "_FlagBlock.frozen of a submodule" in report.not_traced["0"]
    assert "_FlagBlock.maybe_scale of a submodule" in report.not_traced["1"]
    x = torch.randn(3, 4, 5)
    for frozen in ("0.block", "1.blocks.0", "2.bn", None):
        for m in (model, original):
            m.train()
            if frozen:
                m.get_submodule(frozen).eval()
        for i in range(3):
            torch.testing.assert_close(model[i](x), original[i](x), msg=f"{i} with {frozen} in eval")


class _FStringTest(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, y):
        kind = f"{isinstance(y, torch.Tensor)}"  # (before Python 3.12, one string token: code in it)
        h = F.relu(self.bn(x))
        return h * y if kind == "True" else h + 1


class _MutableDefault(_FStringTest):
    def forward(self, x, feats=[]):  # noqa: B006 (the point)
        h = F.relu(self.bn(x))
        feats.append(h)
        return h


class _OwnGenerators(_FStringTest):
    def __init__(self):
        super().__init__()
        self.py, self.np = random.Random(0), np.random.default_rng(0)

    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 0 if self.py.choice((True, False)) or self.np.integers(0, 2) else h


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


_reverse = _Reverse.apply


class _ApplyAlias(_FStringTest):
    def forward(self, x):
        return _reverse(F.relu(self.bn(x)))


class _BufferTest(_FStringTest):
    def __init__(self):
        super().__init__()
        self.register_buffer("warm", torch.tensor(0.0))

    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 2 if self.warm > 0 else h


def test_convert_fuse_refuses_what_a_fourth_fuzz_found_frozen():
    """Found by a fourth fuzz, each frozen at conversion by the trace: an isinstance in an f-string (its words
    were blanked as a string's), a forward's list default (the trace at the defaults appended fx proxies to the
    class's own list), draws of a generator the module holds, a Function's apply under another name (its backward
    was lost), a test of a buffer's value. Each is left unfused, the default list untouched."""
    torch.manual_seed(0)
    model = nn.ModuleList([_FStringTest(), _MutableDefault(), _OwnGenerators(), _ApplyAlias(), _BufferTest()])
    feats = _MutableDefault.forward.__defaults__[0]
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert report.fused == [] and feats == []
    for i, why in enumerate(["uses isinstance", "a default argument's value", "a random draw",
                             "autograd.Function.apply", "Tensor.bool"]):
        assert why in report.not_traced[str(i)], (i, report.not_traced[str(i)])
    model[4].warm.fill_(1.0), original[4].warm.fill_(1.0)
    x, y = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 1)
    torch.testing.assert_close(model[0](x, y), original[0](x, y))
    for i in range(1, 5):
        torch.testing.assert_close(model[i](x), original[i](x))
    (g,) = torch.autograd.grad(model[3](x).sum(), x)
    torch.testing.assert_close(g, torch.autograd.grad(original[3](x).sum(), x)[0])
    assert len(feats) == 2  # one call each


def test_convert_fuse_ignores_what_an_import_in_the_forward_runs(tmp_path, monkeypatch):
    """Found by a fourth fuzz: a forward's first import ran the module's top level under the trace, and its words
    refused the forward on the first convert of a process but not on the next."""
    (tmp_path / "_normkit_lazy_import.py").write_text(
        "def check():\n    return isinstance(3, int)\n\nCHECKED = check()\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class Lazy(_Holds):
        def forward(self, x):
            import _normkit_lazy_import  # noqa: F401
            return F.relu(self.bn(x))

    assert "_normkit_lazy_import" not in sys.modules
    monkeypatch.delitem(sys.modules, "_normkit_lazy_import", raising=False)
    model = nt.convert(Lazy(), fuse=True)
    assert [f.norm for f in nt.fusion_report(model).fused] == ["bn"], nt.fusion_report(model)


def test_rewritten_modules_have_code_of_their_own():
    """Found by a fourth fuzz: every rewritten module's forward shared one code object, and torch.compile, which
    counts recompilations per code object (8), failed on the ninth block compiled with fullgraph=True."""
    blocks = [nt.convert(_WithOptional(), fuse=True) for _ in range(2)]
    assert type(blocks[0]).forward.__code__ is not type(blocks[1]).forward.__code__


_FEATURES: list = []
_DRAWS = random.Random(0)


class _Holds(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.cache, self.log = nn.BatchNorm1d(4), {"feats": []}, types.SimpleNamespace(calls=0)
        rng = np.random.default_rng(0)
        self.drop = lambda: rng.integers(0, 2)
        self.register_buffer("warm", torch.tensor(0.0))


class _AppendsNested(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        self.cache["feats"].append(h)
        return h


class _CountsOnObject(_Holds):
    def forward(self, x):
        self.log.calls += 1
        return F.relu(self.bn(x))


class _AppendsGlobal(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        _FEATURES.append(h)
        return h


class _GlobalDraw(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 0 if _DRAWS.choice((True, False)) else h


class _ClosureDraw(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 0 if self.drop() else h


class _EqualBuffer(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 2 if torch.equal(self.warm, self.warm * 0 + 1) else h


def test_convert_fuse_refuses_what_a_fifth_fuzz_found_frozen():
    """Found by a fifth fuzz, each run once by the trace and frozen by the rewrite: appends to a list in a dict
    attribute or in a global, a counter on a plain object, draws of a global generator or one in a closure, a
    buffer's value read by torch.equal. Each is left unfused; the global list and generator are as they were."""
    torch.manual_seed(0)
    model = nn.ModuleList([_AppendsNested(), _CountsOnObject(), _AppendsGlobal(), _GlobalDraw(), _ClosureDraw(),
                           _EqualBuffer()])
    draws = _DRAWS.getstate()
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert report.fused == [] and _FEATURES == [] and _DRAWS.getstate() == draws
    for i, why in enumerate(["what it holds", "what it holds", "a global", "a random draw", "a random draw",
                             "torch.equal"]):
        assert why in report.not_traced[str(i)], (i, report.not_traced[str(i)])
    x = torch.randn(3, 4)
    model[0](x), model[1](x), model[2](x)
    assert len(model[0].cache["feats"]) == 1 and model[1].log.calls == 1 and len(_FEATURES) == 1
    _FEATURES.clear()


_SCRIPT = """
data = torch.Generator().manual_seed(0)  # a training script's generator: a global of the forward's file


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(x))


class Draws(Block):
    def forward(self, x):
        h = F.relu(self.bn(x))
        return h + torch.rand(1, generator=data)
"""


def test_convert_fuse_with_a_global_torch_generator(tmp_path):
    """A torch.Generator among the forward's globals: its state was taken by Tensor.numpy while that was watched
    as the forward's value read, so nothing in the file fused ("uses Tensor.numpy"). It fuses; a forward that does
    draw from it is still refused, and the generator's state is put back."""
    path = tmp_path / "user_script_with_generator.py"
    path.write_text("import torch\nimport torch.nn.functional as F\nfrom torch import nn\n" + _SCRIPT)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = nn.ModuleList([script.Block(), script.Draws()])
    state = script.data.get_state()
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert [f.norm for f in report.fused] == ["0.bn"] and list(report.not_traced) == ["1"], report
    assert "its forward uses rand" in report.not_traced["1"]
    assert torch.equal(script.data.get_state(), state)


class _Instantiating(dict):  # transformers' ACT2FN: a global whose items are made when looked up
    def __getitem__(self, key):
        return super().__getitem__(key)()


_ACTIVATIONS = _Instantiating(relu=nn.ReLU)


class _FromRegistry(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm1d(4), _ACTIVATIONS["relu"]

    def forward(self, x):
        return self.act(self.bn(x))


def test_convert_fuse_watches_plain_globals_only():
    """The globals watched for appends are plain lists, dicts, sets and deques: a dict subclass making its items
    when looked up (transformers' ACT2FN) compared unequal to its copy, and every transformers ResNet block was
    refused."""
    model = nt.convert(_FromRegistry(), fuse=True)
    assert [f.norm for f in nt.fusion_report(model).fused] == ["bn"]


_CALLS = 0


class _CountsGlobal(_Holds):
    def forward(self, x):
        global _CALLS
        _CALLS += 1
        return F.relu(self.bn(x))


class _CountsOnClass(_Holds):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return F.relu(self.bn(x))


@dataclasses.dataclass(slots=True)
class _Record:
    calls: int = 0


class _Tracker:
    def __init__(self):
        self.stats = types.SimpleNamespace(calls=0, rng=np.random.default_rng(0))


class _CountsDeep(_Holds):
    def __init__(self):
        super().__init__()
        self.record, self.tracker, self.steps = _Record(), _Tracker(), torch.zeros(())

    def forward(self, x):
        self.record.calls += 1
        self.tracker.stats.calls += 1
        self.steps += 1  # a tensor attribute, not a buffer
        return F.relu(self.bn(x))


class _DrawsDeep(_CountsDeep):
    picks = collections.OrderedDict(rng=random.Random(1))

    def __init__(self):
        super().__init__()
        self.pick = functools.partial(np.random.default_rng(2).integers, 0, 2)

    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 0 if self.tracker.stats.rng.integers(0, 2) or self.pick() or self.picks["rng"].choice((0, 1)) \
            else h


class _EqualMethod(_Holds):
    def forward(self, x):
        h = F.relu(self.bn(x))
        return h * 2 if self.warm.equal(self.warm * 0 + 1) else h


class _ConvertsInside(_Holds):
    def forward(self, x):
        nt.convert(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), fuse=True)  # (a trace inside a trace)
        return F.relu(self.bn(x))


def test_convert_fuse_refuses_what_a_sixth_fuzz_found_frozen(tmp_path, monkeypatch):
    """Found by a sixth fuzz, each run once by the trace and frozen by the rewrite: a global counter, a class
    attribute counter, a helper in another module appending to that module's list, counters in a slots record,
    two plain objects down and in a tensor attribute, draws of generators behind a plain object, a partial, a
    class attribute's OrderedDict, a buffer's value read by Tensor.equal. Each is refused, and the globals and
    class attributes are as they were. A forward converting a model of its own hung on the trace lock (now a
    reentrant lock)."""
    (tmp_path / "_normkit_helper.py").write_text("SEEN = []\n\ndef keep(h):\n    SEEN.append(h)\n    return h\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = importlib.import_module("_normkit_helper")

    class ViaHelper(_Holds):
        def forward(self, x):
            return helper.keep(F.relu(self.bn(x)))

    torch.manual_seed(0)
    model = nn.ModuleList([_CountsGlobal(), _CountsOnClass(), ViaHelper(), _CountsDeep(), _DrawsDeep(), _EqualMethod(),
                           _ConvertsInside()])
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert report.fused == []  # (the last: its trace ran the inner convert's no_grad; it came back)
    for i, why in enumerate(["a global", "a class attribute", "a global", "what it holds", "a random draw",
                             "Tensor.equal", "no_grad"]):
        assert why in report.not_traced[str(i)], (i, report.not_traced[str(i)])
    assert (_CALLS, _CountsOnClass.calls, helper.SEEN) == (0, 0, [])
    x = torch.randn(3, 4)
    for m in model[:4]:
        m(x)
    assert (_CALLS, _CountsOnClass.calls, len(helper.SEEN)) == (1, 1, 1)
    assert (model[3].record.calls, model[3].tracker.stats.calls, model[3].steps.item()) == (1, 1, 1)


class _RaisingList(list):
    def __iter__(self):
        raise RuntimeError("not now")


class _Gone:
    pass


_SYSTEM_RANDOM = random.SystemRandom()  # (no state to read)
_RAISING = _RaisingList([1])
_DEAD = weakref.proxy(_Gone())  # (dead at once: touching it raises ReferenceError)


def test_convert_fuse_reads_odd_globals_and_lazy_imports(tmp_path, monkeypatch):
    """Found by a seventh fuzz: reading the globals of the code the trace runs raised inside the trace function
    for a SystemRandom (the exception reached the forward and switched the watching off: a forward catching it
    was traced unwatched), a dead weak proxy stopped the putting back of the rest, a list subclass's raising
    __iter__ refused the module, and a package's lazy `from . import sub` was undone (pkg.sub then raised
    AttributeError). Odd objects hold nothing, imports stay, and these blocks fuse."""
    package = tmp_path / "_normkit_lazy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("def scale():\n    from . import sub\n    return sub.SCALE\n")
    (package / "sub.py").write_text("SCALE = 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = importlib.import_module("_normkit_lazy_pkg")

    class Lazy(_Holds):
        def forward(self, x):
            return F.relu(self.bn(x)) * lazy.scale()

    model = nn.ModuleList([Lazy(), _FromRegistry()])
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    assert [f.norm for f in nt.fusion_report(model).fused] == ["0.bn", "1.bn"], nt.fusion_report(model)
    assert importlib.import_module("_normkit_lazy_pkg.sub").SCALE == lazy.sub.SCALE == 2.0
    x = torch.randn(3, 4)
    torch.testing.assert_close(model[0](x), original[0](x))


_COLLECTIONS = 0


def _count_collections(phase, info):  # a gc callback rebinding a global, as hypothesis's GC timing does
    global _COLLECTIONS
    _COLLECTIONS += 1


def test_convert_fuse_does_not_blame_a_forward_for_garbage_collection():
    """Found by CI: a garbage collection during the trace ran hypothesis's gc callback, which rebinds globals of its
    own module, and every later forward was refused for changing a global. The trace runs with gc paused."""
    threshold = gc.get_threshold()
    gc.callbacks.append(_count_collections)
    gc.set_threshold(1)  # (a collection at nearly every allocation, were gc running)
    try:
        model = nt.convert(_FromRegistry(), fuse=True)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(_count_collections)
    assert [f.norm for f in nt.fusion_report(model).fused] == ["bn"], nt.fusion_report(model)


def test_concurrent_converts_leave_torch_as_it_was():
    """Found by a fifth fuzz: two threads' traces overlapping left the first one's watches patched into torch for
    good (the second saved them as the originals): every bool(tensor) then appended to a dead list."""
    originals = {name: vars(torch.Tensor).get(name) for name in ("__bool__", "item", "numpy")}
    grad_enabled = torch.is_grad_enabled

    def convert_some():
        for _ in range(4):
            nt.convert(nn.Sequential(_WithOptional()), fuse=True)

    threads = [threading.Thread(target=convert_some) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: vars(torch.Tensor).get(name) for name in originals} == originals
    assert torch.is_grad_enabled is grad_enabled


FORK_IN_TRACE = r"""
import gc, os, threading, time
import torch, torch.nn as nn
import normkit.torch as nt

inside, go = threading.Event(), threading.Event()


class Waits(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        inside.set()
        go.wait()
        return self.act(self.bn(x))


grad_enabled, tensor_bool = torch.is_grad_enabled, vars(torch.Tensor).get("__bool__")
tracing = threading.Thread(target=nt.convert, args=(nn.Sequential(Waits()),), kwargs={"fuse": True})
tracing.start()
assert inside.wait(60), "no trace"  # the other thread is inside its trace: lock taken, gc off, torch patched
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    model = nt.convert(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()), fuse=True)
    state = (gc.isenabled(), torch.is_grad_enabled is grad_enabled, vars(torch.Tensor).get("__bool__") is tensor_bool,
             [f.norm for f in nt.fusion_report(model).fused])
    os.write(w, repr(state).encode())
    os._exit(0)
deadline = time.monotonic() + 60
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("hang")
        break
    time.sleep(0.05)
else:
    print(os.read(r, 1000).decode())
go.set()
tracing.join()
"""


def test_a_process_forked_during_another_threads_trace_can_convert(tmp_path):
    """Found by the fork campaign: a fork while another thread traced a forward (convert(fuse=True)) left the child
    with the trace's lock taken by a thread it does not have, so its own convert(fuse=True) waited for good; and
    with garbage collection off and torch's functions patched, since that trace never ends there. (A file: convert
    traces only forwards whose source it can read.)"""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    script = tmp_path / "fork_in_trace.py"
    script.write_text(FORK_IN_TRACE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(True, True, True, ['1'])", out.stdout + out.stderr


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        with torch.no_grad():
            t = F.relu(self.norm(x))
        return x * t


class _Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return F.relu(self.norm(x)) * torch.tensor(2.0)


class _TwoMethods(nn.Module):  # timm's forward_features / forward_head
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def features(self, x):
        return F.gelu(self.norm(x))

    def forward(self, x):
        return F.relu(self.norm(x))


def test_convert_fuses_only_what_fx_records_faithfully():
    """Found by a fuzz of the fusion: fx freezes an optional argument's branch, drops no_grad / autocast blocks
    and Python random draws, and keeps tensor constants only on its own GraphModule (the rewrite raised outside
    its try); hooks on either module (or on every module) would see other values or not run; a forward set on
    the instance is not the class's. All of them are left unfused, with the reason in the report, and compute as
    torch's. A method other than forward that calls a fused norm gets the norm's own output."""
    torch.manual_seed(0)
    with_hooks = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with_hooks[0].register_forward_hook(lambda m, i, o: o * 2)
    act_hook = nn.Sequential(nn.LayerNorm(4), nn.GELU())
    act_hook[1].register_forward_pre_hook(lambda m, i: (i[0] - 1,))
    patched = nn.Sequential(nn.LayerNorm(4), nn.SiLU())
    patched[0].forward = lambda x: nn.LayerNorm.forward(patched[0], x) + 1  # accelerate's add_hook_to_module
    model, original, report = _converted([_WithOptional(), _NoGrad(), _Constant(), _TwoMethods(), with_hooks,
                                          act_hook, patched])
    assert [(f.norm, f.activation) for f in report.fused] == [("0.norm", "silu"), ("3.norm", "relu")]
    assert "uses no_grad" in report.not_traced["1"]
    assert "tensor constants" in report.not_traced["2"]
    x = torch.randn(3, 4)
    for i in range(6):  # (patched's instance forward closes over its own module: left out)
        torch.testing.assert_close(model[i](x), original[i](x))
    torch.testing.assert_close(model[0](x, x), original[0](x, x))
    torch.testing.assert_close(model[3].features(x), original[3].features(x))
    assert [type(m) for m in model[4:]] == [nn.Sequential] * 3
    plain = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        nt.convert(plain, fuse=True)
    finally:
        handle.remove()
    assert nt.fusion_report(plain).fused == [] and "global module hooks" in nt.fusion_report(plain).not_traced[""]


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.leaky_relu(self.norm(x), 0.3, inplace=True)


class _SideEffects(nn.Module):  # a forward keeping a feature map and counting its calls
    def __init__(self):
        super().__init__()
        self.norm, self.last, self.feats = nn.BatchNorm1d(4), None, []

    def forward(self, x):
        y = F.relu(self.norm(x))
        self.last = y
        self.feats.append(y)
        return y


class _HelperNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.body(x)

    def body(self, x):
        with torch.no_grad():
            h = self.proj(x)
        return F.relu(self.norm(h))


class _Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.BatchNorm1d(4), nn.ReLU()
        self.out_act = self.act

    def forward(self, x):
        return self.out_act(self.norm(x))


class _FreezingTrain(nn.Module):  # detection backbones: train() freezes the BatchNorm
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.norm.requires_grad_(False)
        return self

    def forward(self, x):
        return F.relu(self.norm(x))


class _Registered(nn.Module):
    registry = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _Registered.registry.append(cls)


class _RegisteredBlock(_Registered):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.norm(x))


class _ConvNormActivation(nn.Sequential):  # torchvision's Conv2dNormActivation: nn.Sequential's forward
    pass


def test_convert_fuse_keeps_what_a_traced_forward_does():
    """Found by a fuzz of the call-site fusion: the fallback made an in-place activation out of place (a hook on the
    norm saw another tensor); tracing left fx proxies in attributes a forward assigns and lost a no_grad block in
    a method forward calls; a module held under two names was called by the other; a user's train() ran (freezing
    parameters); a class's __init_subclass__ saw normkit's class; nn.Sequential subclasses were unrolled by fx (a
    slice then failed); LeakyReLU(inf) was fused (the kernel refuses it); a patched activation class was ignored;
    converting again lost the report. Each now runs as the original, fused or with the reason in the report."""
    torch.manual_seed(0)
    model = nn.ModuleList([_InPlace(), _SideEffects(), _HelperNoGrad(), _Alias(), _FreezingTrain().eval(),
                           _RegisteredBlock(), _ConvNormActivation(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.SiLU()),
                           nn.Sequential(nn.BatchNorm1d(4), nn.LeakyReLU(float("inf")))])
    original = copy.deepcopy(model)
    registered = list(_Registered.registry)
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert sorted(f.norm for f in report.fused) == ["0.norm", "4.norm", "6.1"]
    assert "changes module attributes (feats, last, " in report.not_traced["1"]
    assert "uses no_grad" in report.not_traced["2"]
    assert "two names" in report.not_traced["3"]
    assert "__init_subclass__" in report.not_traced["5"] and _Registered.registry == registered
    assert model[1].last is None and model[1].feats == []
    assert all(p.requires_grad for p in model[4].parameters())
    assert isinstance(model[6], _ConvNormActivation) and isinstance(model[6][0:2], _ConvNormActivation)
    x = torch.randn(6, 4)
    seen = []
    model[0].norm.register_forward_hook(lambda m, i, o: seen.append(o))
    original[0].norm.register_forward_hook(lambda m, i, o: seen.append(o))
    outputs = [(m(x), o(x)) for m, o in zip(model, original)]
    for got, want in outputs:
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(seen[0], seen[1])  # the hook's tensor, activated in place on both
    assert seen[0].data_ptr() == outputs[0][0].data_ptr()
    original[2](x).sum().backward()
    model[2](x).sum().backward()
    assert model[2].proj.weight.grad is None and original[2].proj.weight.grad is None
    model[3].out_act = original[3].out_act = nn.Tanh()
    torch.testing.assert_close(model[3](x), original[3](x))
    nt.convert(model, fuse=True)
    assert sorted(f.norm for f in nt.fusion_report(model).fused) == ["0.norm", "4.norm", "6.1"]


class _Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        with torch.no_grad():
            x = self.lin(x)
        return F.relu(self.norm(x))


class _SuperForward(_Frozen):  # the no_grad is in the overridden forward
    def forward(self, x):
        return super().forward(x) * 2


def _frozen_projection(m, x):
    with torch.no_grad():
        return m.lin(x)


class _ModuleHelper(_Frozen):
    def forward(self, x):
        return F.relu(self.norm(_frozen_projection(self, x)))


class _SharedOrder(nn.Module):  # the fused call must run where the norm's call ran: the running statistics' order
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm1d(4), nn.ReLU(inplace=True)

    def forward(self, a):
        ya = self.bn(a)
        yb = self.bn(a * 3 + 1)
        skip = self.act(a)  # in place on the norm's input, after the norm read it
        return F.silu(ya) + yb + skip


class _Bookkeeping(nn.Module):  # state a forward keeps, deeper than an attribute
    def __init__(self):
        super().__init__()
        self.norm, self.log = nn.BatchNorm1d(4), {"feats": []}
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        y = F.relu(self.norm(x))
        self.log["feats"].append(y)
        return y


class _LayerDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        if self.training and torch.rand([]) < 0.5:
            return x
        return F.gelu(self.norm(x))


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def features(self, x):
        return F.relu(self.norm(x))


class _ChildMethod(nn.Module):  # timm's forward_features, on a child
    def __init__(self):
        super().__init__()
        self.body = _Body()

    def forward(self, x):
        return self.body.features(x)


def test_convert_fuse_traces_without_touching_the_model():
    """Found by a second fuzz of the call-site fusion: a no_grad reached through super().forward or a module's
    helper function, torch.rand deciding a layer drop, a buffer updated in place and containers nested in an
    attribute (tracing ran them for real, or left fx proxies in them), a child's method (fx copies its code) were
    all traced; the fused call ran where the activation was (a shared BatchNorm's running statistics then came in
    the other order, an in-place op between them changed the norm's input); a norm replaced by a function raised.
    Now fx traces a copy of the module (sharing its tensors), such forwards are left alone, and the rest runs as
    the original."""
    torch.manual_seed(0)
    model = nn.ModuleList([_SuperForward(), _ModuleHelper(), _SharedOrder(), _Bookkeeping(), _LayerDrop(),
                           _ChildMethod()])
    original = copy.deepcopy(model)
    nt.convert(model, fuse=True)
    report = nt.fusion_report(model)
    assert [f.norm for f in report.fused] == ["2.bn"]
    for i, why in enumerate(["uses no_grad", "uses no_grad", None, "changes module attributes", "uses rand",
                             "calls body.features"]):
        assert why is None or why in report.not_traced[str(i)], i
    assert model[3].calls.item() == 0 and model[3].log == {"feats": []}
    x = torch.randn(6, 4)
    with torch.no_grad():  # (its in-place op on a saved input: torch's backward refuses it)
        torch.testing.assert_close(model[2](x.clone()), original[2](x.clone()))
    for i, (m, o) in enumerate(zip(model, original)):
        if i in (2, 4):
            continue  # its draws: compared in eval below
        y, want = m(x.clone()), o(x.clone())
        torch.testing.assert_close(y, want, msg=str(i))
        y.sum().backward()
        want.sum().backward()
        for (name, p), q in zip(m.named_parameters(), o.parameters()):
            assert (p.grad is None) == (q.grad is None), (i, name)
    torch.testing.assert_close(model[2].bn.running_mean, original[2].bn.running_mean)
    model.eval(), original.eval()
    torch.testing.assert_close(model[4](x), original[4](x))
    for m in (model[2], original[2]):  # no longer a module: the two calls
        del m.bn
        m.bn = lambda t: t * 2
    torch.testing.assert_close(model[2](x.clone()), original[2](x.clone()))


def test_convert_fuse_leaves_a_forward_without_python_source():
    """A forward that is a callable object (no function, no code to read): left alone, not a crash."""
    class Forward:
        def __call__(self, module, x):
            return F.relu(module.norm(x))

    class Odd(nn.Module):
        forward = Forward()

        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

    model = nt.convert(Odd(), fuse=True)
    assert "source is not available" in nt.fusion_report(model).not_traced[""]


class _Stopper:  # a callable attribute: no name in the forward's source leads to its no_grad
    def __call__(self, lin, x):
        with torch.no_grad():
            return lin(x)


class _CallableNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.stop = nn.Linear(4, 4), nn.BatchNorm1d(4), _Stopper()

    def forward(self, x):
        return F.relu(self.norm(self.stop(self.lin, x)))


class _Dropping(nn.Module):  # a layer drop drawn without a word the source check knows
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        if torch.empty(()).exponential_().item() < 0.69 and self.norm.eps > 0:
            return x
        return F.gelu(self.norm(x))


class _DataCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.data += 1  # .data: a version counter of its own
        return F.relu(self.norm(x))


class _Registry(type):
    classes: dict = {}

    def __new__(mcs, name, bases, namespace):
        cls = super().__new__(mcs, name, bases, namespace)
        _Registry.classes[name] = cls
        return cls


class _MetaBlock(nn.Module, metaclass=_Registry):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.norm(x))


class _ConfigGetattr(nn.Module):  # a __getattr__ falling back to a dict: KeyError, not AttributeError
    def __init__(self):
        super().__init__()
        self.norm, self.config = nn.BatchNorm1d(4), {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__"):
                raise
            return self.__dict__["config"][name]

    def forward(self, x):
        return F.relu(self.norm(torch.nn.functional.dropout(x, 0.0)))


class _Stages(nn.Module):  # ModuleDict's own methods are fine to call
    def __init__(self):
        super().__init__()
        self.norm, self.stages = nn.BatchNorm1d(4), nn.ModuleDict({"a": nn.Linear(4, 4)})

    def forward(self, x):
        for _, stage in self.stages.items():
            x = stage(x)
        return F.relu(self.norm(x))


def test_convert_fuse_watches_what_the_trace_runs():
    """Found by a third fuzz: a no_grad reached through a callable attribute (no name leads there), a random draw
    without "rand" in its name (it also moved torch's generator during convert), a buffer updated through .data,
    a class with a metaclass (it ran for normkit's class), a __getattr__ raising KeyError and a forward without a
    signature (convert raised), a ModuleDict's items() taken for a child's method. Tracing now watches grad mode,
    autocast and the random generators as it runs; the rest are refused, and ModuleDict fuses."""
    torch.manual_seed(0)
    model = nn.ModuleList([_CallableNoGrad(), _Dropping(), _DataCounter(), _MetaBlock(), _ConfigGetattr(),
                           _Stages()])
    original = copy.deepcopy(model)
    registered = dict(_Registry.classes)
    rng = torch.get_rng_state()
    nt.convert(model, fuse=True)
    assert torch.equal(torch.get_rng_state(), rng) and _Registry.classes == registered
    report = nt.fusion_report(model)
    assert sorted(f.norm for f in report.fused) == ["4.norm", "5.norm"]
    for i, why in enumerate(["no_grad", "a random draw", "a buffer, in place", "metaclass"]):
        assert why in report.not_traced[str(i)], i
    assert model[2].calls.item() == 0
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    got = [m(x) for m in model]
    torch.manual_seed(1)
    for g, want in zip(got, [o(x) for o in original]):
        torch.testing.assert_close(g, want)
    got[0].sum().backward()
    assert model[0].lin.weight.grad is None

    class NoSignature(nn.Module):
        forward = staticmethod(torch.relu)

        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

    assert "source is not available" in nt.fusion_report(nt.convert(NoSignature(), fuse=True)).not_traced[""]


def test_fused_sites_follow_a_patched_activation_class(monkeypatch):
    model = nt.convert(nn.Sequential(nn.BatchNorm1d(4), nn.SiLU()), fuse=True)
    monkeypatch.setattr(nn.SiLU, "forward", lambda self, x: torch.clamp(F.silu(x), max=0.1))
    x = torch.randn(6, 4)
    assert model(x).max() <= 0.1


def test_torch_compile_of_fused_model_matches_eager(monkeypatch):
    """The compiled graph calls the custom ops with the activation: the act_ kernels run, forward and backward."""
    torch.manual_seed(0)
    model = nt.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU()),
                       fuse=True, backend="reference")
    twin = copy.deepcopy(model)
    looked_up = _spy_fused_kernels(monkeypatch)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    proj = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(9))
    (y, grads), (e, expected) = _train_step(compiled, x, proj, twin), _train_step(model, x, proj)
    assert {("batchnorm", "act_forward"), ("batchnorm", "act_backward"), ("groupnorm", "act_forward"),
            ("groupnorm", "act_backward")} <= set(looked_up)
    torch.testing.assert_close(y, e, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4,
                                   atol=1e-5 * expected[name].abs().max().item())


def test_torch_compile_dynamic_shapes_of_fused_model():
    """dynamic=True makes a module's float attributes (negative_slope) symbolic: the checks take them without a
    graph break, and two batch sizes run one graph."""
    torch.manual_seed(0)
    model = nt.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                                     nn.GroupNorm(4, 8), nn.SiLU()), fuse=True, backend="reference")
    assert nt.fusion_report(model).fused[0].activation == "leaky_relu(negative_slope=0.2)"
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


class _EveryNorm(nn.Module):
    """Every kind of norm layer, in a Sequential (fused by convert(fuse=True) as a FusedSequential) and in a forward
    of its own (fused by rewriting it with fx)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.GroupNorm(4, 8),
                                 nn.SiLU(), nn.InstanceNorm2d(8, affine=True))
        self.extra = nn.Sequential(nt.BatchRenorm2d(8, rmax=2.0, dmax=1.0),
                                   nt.GhostBatchNorm2d(8, virtual_batch_size=2), nt.BatchNormalization(8),
                                   nt.SyncBatchNorm(8))
        self.ln, self.rms = nn.LayerNorm(6), nn.RMSNorm(6)

    def forward(self, x):
        h = self.extra(self.seq(x))
        return self.rms(F.gelu(self.ln(h[..., :6])))


@pytest.mark.parametrize("fuse", [False, True])
def test_fx_symbolic_trace_makes_each_normkit_layer_one_node(fuse):
    """fx's default tracer keeps torch.nn's layers as leaves by their module path and traces into any other's
    forward, which a Proxy cannot go through (normkit's checks, kernels and fused calls): normkit's layers make
    their call_module node themselves, and the traced module computes what the model computes."""
    torch.manual_seed(0)
    model = nt.convert(_EveryNorm().double(), fuse=fuse)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (SyncBatchNorm without a process group says so)
        graph = torch.fx.symbolic_trace(model)
        called = {n.target for n in graph.graph.nodes if n.op == "call_module"}
        assert {"seq.1", "seq.3", "seq.5", "extra.0", "extra.1", "extra.2", "extra.3", "ln", "rms"} <= called
        for mode in (False, True):
            model.train(mode), graph.train(mode)
            twin = copy.deepcopy(model)
            # (the graph calls a fused pair's norm and activation one after the other: float64 rounding apart)
            torch.testing.assert_close(graph(x), twin(x), rtol=1e-12, atol=1e-12)
