"""The PyTorch frontend (normkit.torch): custom ops, autograd, modules against torch.nn, convert/revert,
torch.compile, state_dicts, errors. Kernels come from the registry's default order unless a test says otherwise."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normkit  # noqa: E402
import normkit.reference  # noqa: E402
import normkit.torch as nt  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from normkit.torch.models import SmallCNN  # noqa: E402

nn = torch.nn
DTYPES = (torch.float32, torch.float64)
# float32 against torch.nn: both sides round differently (torch accumulates in float32, normkit in float64)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def _assert_close_to_scale(actual, expected, what="", rel=1e-5):
    """|actual - expected| <= rel * max(1, max |expected|) elementwise: float32 rounding (~100 ulps at rel=1e-5) of
    terms as large as the result's largest element, the size of what a loss without cancellation sums."""
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def test_import_normkit_does_not_import_torch():
    code = "import sys, normkit; normkit.get('bn'); normkit.list_backends(load=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- custom ops ------------------------------------------------------------------------------------------------

def _forward_samples(dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=dtype, generator=g).requires_grad_(requires_grad)
    w = torch.randn(4, dtype=dtype, generator=g).requires_grad_(requires_grad)
    b = torch.randn(4, dtype=dtype, generator=g).requires_grad_(requires_grad)
    rm, rv = torch.randn(4, dtype=dtype, generator=g), torch.rand(4, dtype=dtype, generator=g) + 0.5
    ops = torch.ops.normkit
    return [
        (ops.batch_norm, (x, w, b, None, None, True, 1e-5, None)),
        (ops.batch_norm, (x, w, None, rm, rv, False, 1e-3, None)),
        (ops.instance_norm, (x, None, b, None, None, True, 1e-5, None)),
        (ops.instance_norm, (x, w, b, rm, rv, False, 1e-5, None)),
        (ops.group_norm, (x, 2, w, b, 1e-5, None)),
        (ops.group_norm, (x, 4, None, None, 1e-5, "reference")),
        (ops.layer_norm, (x, [4, 5], None, None, 1e-5, None)),
        (ops.layer_norm, (x, [5], torch.randn(5, dtype=dtype, generator=g).requires_grad_(requires_grad), None,
                          1e-5, None)),
    ]


def _backward_samples(dtype):
    """Each forward sample's backward, fed with what the forward returned."""
    ops, out = torch.ops.normkit, []
    g = torch.Generator().manual_seed(1)
    for op, args in _forward_samples(dtype, requires_grad=False):
        x = args[0]
        _, mean, rstd = op(*args)
        dy = torch.randn(x.shape, dtype=x.dtype, generator=g)
        if op in (ops.batch_norm, ops.instance_norm):
            x, w, b, _, _, batch_stats, _, _ = args
            backward = ops.batch_norm_backward if op is ops.batch_norm else ops.instance_norm_backward
            out.append((backward, (dy, x, mean, rstd, w, batch_stats, w is not None, b is not None, None)))
        else:  # group_norm and layer_norm: (x, num_groups / normalized_shape, weight, bias, eps, backend)
            x, extra, w, b, _, _ = args
            backward = ops.group_norm_backward if op is ops.group_norm else ops.layer_norm_backward
            out.append((backward, (dy, x, mean, rstd, extra, w, w is not None, b is not None, None)))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward(dtype, requires_grad):
    for op, args in _forward_samples(dtype, requires_grad):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_backward(dtype):
    for op, args in _backward_samples(dtype):
        torch.library.opcheck(op, args)


def _leaf(shape, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, dtype=torch.float64, generator=g) + 0.5 if positive else \
        torch.randn(shape, dtype=torch.float64, generator=g)
    return t.requires_grad_()


GRADCHECK = {
    "bn-train": lambda x, w, b: nt.batch_norm(x, None, None, w, b, True),
    "bn-eval": lambda x, w, b: nt.batch_norm(x, _leaf(4, 9).detach(), _leaf(4, 8, True).detach(), w, b, False),
    "bn-bias-only": lambda x, w, b: nt.batch_norm(x, None, None, None, b, True),
    "in-train": lambda x, w, b: nt.instance_norm(x, None, None, w, b),
    "in-eval": lambda x, w, b: nt.instance_norm(x, _leaf(4, 9).detach(), _leaf(4, 8, True).detach(), w, None,
                                                use_input_stats=False),
    "gn": lambda x, w, b: nt.group_norm(x, 2, w, b),
    "gn-weight-only": lambda x, w, b: nt.group_norm(x, 1, w),
    "ln": lambda x, w, b: nt.layer_norm(x, (5,), w[:1].expand(5), b[1:2].expand(5)),
    "ln-2d": lambda x, w, b: nt.layer_norm(x, (4, 5)),
}


@pytest.mark.parametrize("case", GRADCHECK)
def test_gradcheck(case):
    x, w, b = _leaf((3, 4, 5), 1), _leaf(4, 2), _leaf(4, 3)
    assert torch.autograd.gradcheck(GRADCHECK[case], (x, w, b))


# --- modules against torch.nn ----------------------------------------------------------------------------------

# (constructor, input shape): every option the issue names
MODULES = {
    "bn1d-NC": (lambda: nn.BatchNorm1d(6), (8, 6)),
    "bn1d-NCL": (lambda: nn.BatchNorm1d(6, momentum=None), (4, 6, 7)),
    "bn2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 3)),
    "bn2d-no-affine": (lambda: nn.BatchNorm2d(6, affine=False, momentum=0.3), (4, 6, 5, 3)),
    "bn2d-untracked": (lambda: nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 5, 3)),
    "bn3d": (lambda: nn.BatchNorm3d(3, eps=1e-3), (2, 3, 4, 3, 2)),
    "in1d-unbatched": (lambda: nn.InstanceNorm1d(6), (6, 9)),
    "in1d-tracked": (lambda: nn.InstanceNorm1d(6, affine=True, track_running_stats=True), (4, 6, 9)),
    "in2d": (lambda: nn.InstanceNorm2d(6, affine=True), (4, 6, 5, 3)),
    "in3d-unbatched-tracked": (lambda: nn.InstanceNorm3d(3, track_running_stats=True), (3, 4, 3, 2)),
    "ln": (lambda: nn.LayerNorm(7), (4, 6, 7)),
    "ln-2d": (lambda: nn.LayerNorm((6, 7), eps=1e-3), (4, 6, 7)),
    "ln-no-bias": (lambda: nn.LayerNorm(7, bias=False), (4, 7)),
    "ln-no-affine": (lambda: nn.LayerNorm(7, elementwise_affine=False), (3, 4, 7)),
    "gn": (lambda: nn.GroupNorm(3, 6), (4, 6, 5, 3)),
    "gn-no-affine-1d": (lambda: nn.GroupNorm(2, 6, affine=False), (4, 6)),
}


def _pair(make, dtype, seed=0):
    """A torch.nn module with non-trivial parameters/buffers, and its normkit twin from the same state_dict."""
    torch.manual_seed(seed)
    ref = make().to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        if getattr(ref, "running_var", None) is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours = nt.convert(copy.deepcopy(ref))
    assert type(ours) is not type(ref) and isinstance(ours, type(ref))
    return ref, ours


def _step(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y.detach(), grads


def _assert_same(ref, ours, tol):
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULES)
def test_module_matches_torch(case, dtype):
    make, shape = MODULES[case]
    ref, ours = _pair(make, dtype)
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for mode in ("train", "train", "train", "eval", "train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        x = torch.randn(shape, dtype=dtype, generator=g) * 3 + 2
        dy = torch.randn(shape, dtype=dtype, generator=g)
        (y_ref, g_ref), (y, grads) = _step(ref, x, dy), _step(ours, x, dy)
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, **tol)
        _assert_same(ref, ours, tol)  # running statistics and num_batches_tracked


@pytest.mark.parametrize("case", MODULES)
def test_modules_run_on_normkit_kernels(case, spy):
    """Matching torch.nn is not enough: a module that fell back to torch's own kernels would match too."""
    make, shape = MODULES[case]
    module = nt.convert(make(), backend="spy")
    g = torch.Generator().manual_seed(0)
    for training in (True, False):
        spy.clear()
        module.train(training)
        y = module(torch.randn(shape, generator=g, requires_grad=True))
        y.backward(torch.randn(y.shape, generator=g))
        directions = {key[1] for key, _ in spy}
        assert directions & {"forward", "forward_infer"} and directions & {"backward", "backward_infer"}, spy


def test_module_input_checks_are_torchs():
    with pytest.raises(ValueError, match="expected 4D input"):
        nt.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        nt.BatchNorm1d(3)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="num_features"):
        nt.InstanceNorm1d(3, affine=True)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nt.BatchNorm1d(3)(torch.randn(1, 3))


def test_functional_matches_torch_and_get_routes_tensors(spy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, dtype=torch.float64, generator=g)
    w, b = torch.rand(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    F = nn.functional
    rm, rv = torch.randn(6, dtype=torch.float64, generator=g), torch.rand(6, dtype=torch.float64, generator=g)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    cases = [
        (normkit.get("bn")(x, rm, rv, w, b, True, 0.2, backend="spy"),
         F.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.2)),
        (normkit.get("in")(x, weight=w, bias=b, backend="spy"), F.instance_norm(x, weight=w, bias=b)),
        (normkit.get("gn")(x, 3, w, b, 1e-3, backend="spy"), F.group_norm(x, 3, w, b, 1e-3)),
        (normkit.get("ln")(x, (6, 5), backend="spy"), F.layer_norm(x, (6, 5))),
        (normkit.get("rms")(x, (5,), b[:5], 1e-3, backend="spy"), F.rms_norm(x, (5,), b[:5], 1e-3)),
    ]
    for y, y_ref in cases:
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(rm, rm_ref), torch.testing.assert_close(rv, rv_ref)
    assert [key[0] for key, _ in spy] == ["batchnorm", "instancenorm", "groupnorm", "layernorm", "rmsnorm"]


# --- kernels get the tensors' memory ---------------------------------------------------------------------------

def test_kernels_get_tensor_memory_without_copies(spy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    w, b = torch.rand(6, generator=g, requires_grad=True), torch.randn(6, generator=g, requires_grad=True)
    y = nt.group_norm(x, 2, w, b, backend="spy")
    (key, (x3, groups, w_, b_, eps, y3, mean, rstd)), = spy
    assert key == ("groupnorm", "forward", "float32")
    assert x3.ctypes.data == x.data_ptr() and w_.ctypes.data == w.data_ptr() and b_.ctypes.data == b.data_ptr()
    assert y3.ctypes.data == y.data_ptr()  # the kernel wrote straight into the tensor torch allocated
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    (key, (dy3, x3, *_, dx3, dw, db)) = spy[1]
    assert key == ("groupnorm", "backward", "float32")
    assert dy3.ctypes.data == dy.data_ptr() and x3.ctypes.data == x.data_ptr() and dx3.ctypes.data == x.grad.data_ptr()


def test_non_contiguous_input_works_and_is_not_modified():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, 6, 3, generator=g)
    x = base.permute(0, 3, 1, 2)  # (5, 3, 4, 6), not contiguous
    before = base.clone()
    m, ref = nt.BatchNorm2d(3), nn.BatchNorm2d(3)
    _assert_close_to_scale(m(x), ref(x), "batch_norm")
    cl = torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last)
    _assert_close_to_scale(nt.group_norm(cl, 3), nn.functional.group_norm(cl, 3), "group_norm")
    xt = x.transpose(-1, -2)
    _assert_close_to_scale(nt.layer_norm(xt, (6, 4)), nn.functional.layer_norm(xt, (6, 4)), "layer_norm")
    assert torch.equal(base, before)
    _assert_close_to_scale(m.running_mean, ref.running_mean, "running_mean")
    _assert_close_to_scale(m.running_var, ref.running_var, "running_var")


def test_outputs_are_plain_contiguous_tensors():
    """y and the gradients have the standard strides even when the input's size-1 dimensions have odd ones (a
    channels_last (N, C, 1, 1) tensor is contiguous), and y aliases nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 1, 1, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(3, generator=g, requires_grad=True)
    assert x.is_contiguous() and x.stride() != (3, 1, 1, 1)
    y = nt.batch_norm(x, None, None, w, None, True)
    assert y.stride() == (3, 1, 1, 1)
    _assert_close_to_scale(y, nn.functional.batch_norm(x, None, None, w, None, True), "batch_norm")
    y.backward(torch.ones_like(y))
    assert x.grad.stride() == (3, 1, 1, 1) and w.grad.shape == (3,)
    y2 = nt.layer_norm(x.detach(), (3, 1, 1))
    assert y2.stride() == (3, 1, 1, 1) and y2.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_in_place_changes_are_caught():
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    w = torch.rand(4, generator=g, requires_grad=True)
    y = nt.group_norm(xc, 2, w)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_statistics_do_not_alias_the_running_ones():
    """Eval-mode batch_norm under autograd: backward uses the running statistics of the forward call, even when a
    training step changes the buffers in between."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, generator=g, requires_grad=True)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    ref_x = x.detach().clone().requires_grad_()
    y = nt.batch_norm(x, rm, rv, training=False)
    ref = nn.functional.batch_norm(ref_x, rm.clone(), rv.clone(), training=False)
    nt.batch_norm(torch.randn(6, 3, 4, generator=g), rm, rv, training=True)  # moves rm, rv
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    ref.backward(dy)
    _assert_close_to_scale(x.grad, ref_x.grad, "dx")



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("buffers", [torch.float32, torch.bfloat16])
def test_running_var_of_nearly_constant_channels(dtype, buffers):
    """running_var is torch's also where the batch variance is far below eps (var 1e-10 with eps 1e-3, a constant
    channel, eps = inf), where 1/rstd^2 - eps, from the saved float32 rstd, is cancellation noise; channels-last
    and contiguous inputs, and buffers NumPy updates (float32) or torch does (bfloat16)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 1e-5, 0.0, 3e-3, 1e2], dtype=torch.float64)[:, None, None]
    offset = torch.tensor([0.0, 1.0, 3.0, -2.0, 1e3], dtype=torch.float64)[:, None, None]
    x = (torch.randn(4, 5, 6, 3, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for fn, flag in ((F.batch_norm, "training"), (F.instance_norm, "use_input_stats")):
            for eps in (1e-3, float("inf")):
                rv64 = torch.ones(5, dtype=torch.float64)
                fn(x.double(), torch.zeros(5, dtype=torch.float64), rv64, momentum=1.0, eps=eps, **{flag: True})
                rv = torch.ones(5, dtype=buffers)
                getattr(nt, fn.__name__)(xin, torch.zeros(5, dtype=buffers), rv, momentum=1.0, eps=eps,
                                         **{flag: True})
                tol = 2e-5 if buffers == torch.float32 else 8e-3
                torch.testing.assert_close(rv.double(), rv64, rtol=tol, atol=0, msg=f"{fn.__name__} eps={eps}")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_instance_norm_running_statistics_under_checkpoint(use_reentrant):
    """torch's instance_norm updates its buffers after its output: a non-reentrant checkpoint's recomputation stops
    before that (its default early stop), a reentrant one runs the whole forward again; normkit's buffers were
    updated twice in the first case (0.17 for torch's 0.09)."""
    from torch.utils.checkpoint import checkpoint
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 5, 4, generator=g) + 1.0
    dy = torch.randn(3, 2, 5, 4, generator=g)
    buffers = {}
    for lib in (F, nt):
        x = x0.clone().requires_grad_()
        rm, rv = torch.zeros(2), torch.ones(2)
        y = checkpoint(lambda t: lib.instance_norm(t, rm, rv, use_input_stats=True), x, use_reentrant=use_reentrant)
        y.backward(dy)
        buffers[lib] = (rm, rv)
    for a, b in zip(buffers[nt], buffers[F]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_instance_norm_running_statistics_are_written_as_torch_writes_them():
    """With copy_, as torch's instance_norm: a graph that saved a buffer refuses its backward after the update
    (normkit's NumPy write left the version counter, and that backward read the new values), and an inference-mode
    buffer refuses the update outside inference mode. batch_norm's buffers, which torch's kernel writes in place,
    and negative views (torch._neg_view, which NumPy cannot view: an error before) are updated."""
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1))
    for lib in (F, nt):
        rm = torch.zeros(2)
        s = torch.ones(2, requires_grad=True)
        saved = s * rm  # saves rm for s's gradient
        lib.instance_norm(x, rm, torch.ones(2), use_input_stats=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.sum().backward()
        with torch.inference_mode():
            rm, rv = torch.zeros(2), torch.ones(2)
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            lib.instance_norm(x, rm, rv, use_input_stats=True)
    for fn in (nt.batch_norm, nt.instance_norm):
        rm, rv = torch._neg_view(torch.zeros(2)), torch._neg_view(-torch.ones(2))
        fn(x, rm, rv, momentum=1.0, **({"training": True} if fn is nt.batch_norm else {"use_input_stats": True}))
        dims = (0, 2) if fn is nt.batch_norm else (2,)
        mean, var = x.mean(dims), x.var(dims)
        torch.testing.assert_close(rm, mean if mean.dim() == 1 else mean.mean(0))
        torch.testing.assert_close(rv, var if var.dim() == 1 else var.mean(0))


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous tensor (every other element of a buffer twice the size)."""
    return torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)[..., ::2].copy_(t)


PLAIN_CALLS = {  # op -> (input shape, call(f, x, w, b, rm, rv) under autograd)
    "batchnorm train": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, True, 0.3)),
    "batchnorm eval": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, False)),
    "instancenorm": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.instance_norm(x, rm, rv, w, b, True, 0.3)),
    "groupnorm": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.group_norm(x, 3, w, b)),
    "layernorm": ((4, 5, 6), lambda f, x, w, b, rm, rv: f.layer_norm(x, (6,), w, b)),
    "rmsnorm": ((4, 5, 6), lambda f, x, w, b, rm, rv: f.rms_norm(x, (6,), w)),
    "batchnorm relu": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, True, activation="relu")),
    "groupnorm silu": ((4, 6, 5), lambda f, x, w, b, rm, rv: f.group_norm(x, 3, w, b, activation="silu")),
    "layernorm gelu": ((4, 5, 6), lambda f, x, w, b, rm, rv: f.layer_norm(x, (6,), w, b, activation="gelu")),
}


# (data dtype, parameter dtype): 16-bit data with float32 parameters is autocast's case
PLAIN_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                (torch.float16, torch.float16)]


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("dtype, pdtype", PLAIN_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", PLAIN_CALLS)
def test_plain_calls_take_the_short_path_and_agree_with_the_general_one(case, dtype, pdtype, grad, monkeypatch):
    """Contiguous inputs and parameters take the eager path's short way (functional._plain; the common calls'
    steps, with autograd and without it); the same values in non-contiguous tensors take the general one (copies,
    then the same kernels): y, the gradients and the running statistics agree bit for bit."""
    from normkit.torch import functional

    taken = []
    plain = functional._plain
    monkeypatch.setattr(functional, "_plain", lambda *a, **k: taken.append(plain(*a, **k)) or taken[-1])
    shape, call = PLAIN_CALLS[case]
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    c = shape[-1] if case.startswith(("layernorm", "rmsnorm")) else shape[1]
    w, b = (torch.rand(c, generator=g) + 0.5).to(pdtype), torch.randn(c, generator=g).to(pdtype)
    rm, rv = torch.randn(c, generator=g).to(pdtype), (torch.rand(c, generator=g) + 0.5).to(pdtype)
    results, plains = [], []
    for make in (lambda t: t.clone(), _strided_copy):
        xs, ws, bs = (make(t).requires_grad_(grad) for t in (x, w, b))
        rms, rvs = make(rm), make(rv)
        taken.clear()
        y = call(nt, xs, ws, bs, rms, rvs)
        plains.append(taken[:])
        assert y.requires_grad == grad
        if grad:
            y.backward(dy)
        results.append((y.detach(), xs.grad, ws.grad, bs.grad if case != "rmsnorm" else None, rms, rvs))
    assert plains[0] and all(plains[0]) and not any(plains[1])  # the first call was plain, the strided one not
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *results):
        assert e is None and a is None or torch.equal(a, e), name


@pytest.mark.parametrize("case", [*PLAIN_CALLS, "add_layer_norm"])
def test_a_zero_tensor_grad_output_is_zeros(case):
    """autograd may hand a backward a ZeroTensor (torch._efficientzerotensor: zeros without memory, NULL address):
    the gradients are those of zeros (an address kernel refused the NULL address with a misleading error)."""
    shape, call = PLAIN_CALLS.get(case, ((4, 5, 6), None))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    c = shape[-1] if case.startswith(("layernorm", "rmsnorm", "add")) else shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    grads = []
    for dy in (torch._efficientzerotensor(shape), torch.zeros(shape)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        if call is None:
            y = nt.add_layer_norm(xs, torch.ones(shape), (c,), ws, bs)[0]
        else:
            y = call(nt, xs, ws, bs, torch.zeros(c), torch.ones(c))
        grads.append(torch.autograd.grad(y, (xs, ws), dy, allow_unused=True))
    for a, e in zip(*grads):
        assert a is None and e is None or torch.equal(a, e)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [c for c in PLAIN_CALLS if not c.endswith(("relu", "silu", "gelu"))])
def test_plain_calls_with_a_strided_grad_output(case, channels_last):
    """A plain input whose grad_output is not in its layout (an expanded one, as autograd gives for a broadcast
    loss): dx as torch's, in float64."""
    shape, call = PLAIN_CALLS[case]
    shape = (shape[0], shape[1], 3, shape[2])
    if channels_last and case.startswith(("layernorm", "rmsnorm")):
        pytest.skip("channels-last is a layout of the channel ops")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[-1] if case.startswith(("layernorm", "rmsnorm")) else shape[1]
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(shape[1:], generator=g, dtype=torch.float64).expand(shape)
    grads = []
    for f in (nt, torch.nn.functional):
        xs, ws, bs = (t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b))
        call(f, xs, ws, bs, rm.clone(), rv.clone()).backward(dy)
        grads.append((xs.grad, ws.grad))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype, pdtype", PLAIN_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", [c for c in PLAIN_CALLS if not c.startswith(("layernorm", "rmsnorm"))])
def test_channels_last_plain_calls_agree_with_the_general_path(case, dtype, pdtype, monkeypatch):
    """A channels-last input with plain parameters takes the short way too (functional._plain gives
    _CHANNELS_LAST); the same tensors sent down the general path (_plain made to refuse them) give the same bits,
    y and dx channels-last."""
    from normkit.torch import functional

    taken = []
    plain = functional._plain
    shape, call = PLAIN_CALLS[case]
    shape = (shape[0], shape[1], 3, shape[2])
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
             for _ in range(2))
    c = shape[1]
    w, b = (torch.rand(c, generator=g) + 0.5).to(pdtype), torch.randn(c, generator=g).to(pdtype)
    rm, rv = torch.randn(c, generator=g).to(pdtype), (torch.rand(c, generator=g) + 0.5).to(pdtype)
    results = []
    for general in (False, True):
        monkeypatch.setattr(functional, "_plain", lambda *a, **k: 0 if general else taken.append(plain(*a, **k))
                            or taken[-1])
        xs, ws, bs = (t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b))
        rms, rvs = rm.clone(), rv.clone()
        y = call(nt, xs, ws, bs, rms, rvs)
        y.backward(dy)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert xs.grad.is_contiguous(memory_format=torch.channels_last)
        results.append((y.detach(), xs.grad, ws.grad, bs.grad, rms, rvs))
    assert taken == [functional._CHANNELS_LAST]  # (asked once: the common path, or the general one)
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *results):
        assert torch.equal(a, e), name

# --- convert / revert / state_dict -----------------------------------------------------------------------------

def _train(model, steps, seed, dtype=torch.float32):
    """SGD on one fixed batch (so the loss must go down), returning the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(16, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# (losses, state and outputs) relative error allowed. float64: both sides' rounding is ~1e-15 after the 6 steps, so
# any real difference shows. float32: torch's own float32 BatchNorm rounding, amplified by training, moves a conv
# weight by 7e-5 from the exact trajectory after 6 steps on this batch (normkit, accumulating in float64, by 3e-8),
# so its state is compared to 1e-3 of its scale; the losses (mean cross-entropies) agree to 2e-7.
CNN_TOL = {torch.float32: dict(loss=1e-4, state=1e-3), torch.float64: dict(loss=1e-9, state=1e-9)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_cnn_trains_like_torch(dtype):
    torch.manual_seed(0)
    ref = SmallCNN().to(dtype)
    model = copy.deepcopy(ref)
    assert nt.convert(model) is model
    assert sum(type(m).__module__ == "normkit.torch.modules" for m in model.modules()) == 4
    ref_losses, losses = _train(ref, 6, seed=1, dtype=dtype), _train(model, 6, seed=1, dtype=dtype)
    np.testing.assert_allclose(losses, ref_losses, rtol=CNN_TOL[dtype]["loss"])
    assert losses[-1] < losses[0]
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        _assert_close_to_scale(b, a, name, rel=CNN_TOL[dtype]["state"])
    ref.eval(), model.eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)
    _assert_close_to_scale(model(x), ref(x), "eval output", rel=CNN_TOL[dtype]["state"])


def test_convert_keeps_state_and_revert_undoes_it():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    model.features.train()  # mixed train/eval state must survive
    hook_calls = []
    model.features[1].register_forward_hook(lambda *a: hook_calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    identity = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    kinds = {n: type(m) for n, m in model.named_modules()}
    training = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 8, 8)

    with torch.no_grad():
        y_torch = copy.deepcopy(model)(x)
    nt.convert(model, backend="reference")
    for n, m in model.named_modules():
        assert m.training == training[n]
        if kinds[n] in nt.modules._TO_NORMKIT:
            assert type(m) is nt.modules._TO_NORMKIT[kinds[n]] and m.backend == "reference"
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is identity[n]  # the optimizer's references stay valid
    assert opt.param_groups[0]["params"][1] is model.features[1].weight
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_torch)
    assert hook_calls

    nt.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert not any("backend" in vars(m) for m in model.modules())
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t is identity[n]
    assert model.state_dict().keys() == before.keys()

    class MyBN(nn.BatchNorm2d):
        pass

    assert type(nt.convert(MyBN(3))) is MyBN  # a user's subclass keeps its own forward
    assert type(nt.convert(nn.LayerNorm(3))) is nt.LayerNorm  # the model may itself be a norm layer
    with pytest.raises(normkit.UnknownBackendError, match="nope"):
        nt.convert(model, backend="nope")


def test_convert_makes_lazy_layers_normkit_layers_at_their_first_forward():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(),
                             nn.LazyInstanceNorm2d(affine=True))

    ref = make()  # (lazy layers cannot be deep-copied)
    model = nt.convert(make(), backend="reference")
    x = torch.randn(4, 3, 8, 8)
    for step in range(2):  # the first forward is torch's (it materializes the layers), the second normkit's
        ys = []
        for m in (model, ref):
            torch.manual_seed(1)  # the convolution's weights are drawn at the first forward
            ys.append(m(x))
        torch.testing.assert_close(*ys)
        assert [type(m) for m in model[1::2]] == [nt.BatchNorm2d, nt.InstanceNorm2d]
        assert model[1].backend == "reference"
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)

    lazy = nt.revert(nt.convert(nn.Sequential(nn.LazyBatchNorm2d()), backend="reference"))
    assert "cls_to_become" not in vars(lazy[0]) and "backend" not in vars(lazy[0])
    lazy(x)
    assert type(lazy[0]) is nn.BatchNorm2d


@pytest.mark.parametrize("case", MODULES)
def test_state_dict_round_trip(case):
    make, shape = MODULES[case]
    ref, _ = _pair(make, torch.float32)
    ref.train()
    ref(torch.randn(shape, generator=torch.Generator().manual_seed(1)))  # running stats, num_batches_tracked
    ours = nt.convert(make())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = make()
    back.load_state_dict(ours.state_dict(), strict=True)
    for sd in (ours.state_dict(), back.state_dict()):
        assert sd.keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            assert torch.equal(sd[k], v), k


# --- torch.compile ---------------------------------------------------------------------------------------------

def test_torch_compile_matches_eager():
    """Compiled and eager agree on outputs, gradients and running statistics.

    The loss is a fixed random projection <proj, y>: with y.square().sum() on a LayerNorm output (whose norm is
    fixed) the loss is nearly constant and every upstream gradient a cancellation residue, rounding noise that the
    eager and the compiled graph (other kernels, other summation orders, other CPUs) need not share. For the same
    reason the convolution has no bias: BatchNorm removes any per-channel constant, so that gradient is exactly 0
    and what autograd computes for it is noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nt.BatchNorm2d(8), nn.ReLU(),
                          nt.GroupNorm(2, 8), nn.Flatten(), nt.LayerNorm(8 * 5 * 5))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: a graph break would fail, not fall back to eager
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(4, 3, 5, 5, generator=g)
        proj = torch.randn(4, 8 * 5 * 5, generator=g)
        y, y_c = model(x), compiled(x)
        _assert_close_to_scale(y_c, y, f"step {step} output")
        (y * proj).sum().backward(), (y_c * proj).sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            _assert_close_to_scale(q.grad, p.grad, f"step {step} gradient of {name}")
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        _assert_close_to_scale(b, a, name)  # running statistics and num_batches_tracked
    model.eval(), twin.eval()
    x = torch.randn(4, 3, 5, 5, generator=g)
    _assert_close_to_scale(compiled(x), model(x), "eval output")


def test_row_ops_on_nested_and_complex_inputs_are_torchs():
    """Inputs normkit has no kernels for, where torch computes: nested tensors in layer_norm / rms_norm (jagged, as
    variable-length batches; strided, as nn.TransformerEncoder makes them) and complex rms_norm. They run torch's
    function: its values and gradients, and its errors where it refuses."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g)]
    w, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    jagged = torch.nested.nested_tensor(rows, layout=torch.jagged)
    with warnings.catch_warnings():  # torch's: strided nested tensors are a prototype
        warnings.simplefilter("ignore")
        strided = torch.nested.nested_tensor(rows)
    for x in (jagged, strided):
        for got, want in ((nt.layer_norm(x, (5,), w, b), F.layer_norm(x, (5,), w, b)),
                          (nt.LayerNorm(5).eval()(x), torch.nn.LayerNorm(5).eval()(x))):
            for a, e in zip(got.unbind(), want.unbind()):
                torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(nt.rms_norm(jagged, (5,), w).unbind(), F.rms_norm(jagged, (5,), w).unbind()):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with pytest.raises(ValueError, match="NestedTensor layer_norm requires weight and bias"):  # torch's refusal
        nt.layer_norm(strided, (5,))
    xc = torch.randn(4, 5, dtype=torch.complex64, generator=g, requires_grad=True)
    y = nt.rms_norm(xc, (5,), w)
    torch.testing.assert_close(y, F.rms_norm(xc, (5,), w), rtol=0, atol=0)
    y.abs().sum().backward()
    assert xc.grad is not None and xc.grad.dtype == torch.complex64


# --- errors ----------------------------------------------------------------------------------------------------

def test_errors_name_op_argument_expectation_and_what_came():
    x = torch.randn(4, 6, 5)
    # (an input on the meta device is torch's case: tests/test_torch_higher_order.py)
    with pytest.raises(ValueError, match=r"groupnorm: weight is on device meta; .*CPU only"):
        nt.group_norm(x, 2, torch.ones(6, device="meta"))
    with pytest.raises(TypeError, match=r"layernorm: input must be float32, float64, bfloat16 or float16, got dtype "
                                        r"complex64"):
        nt.layer_norm(x.to(torch.complex64), (5,))
    with pytest.raises(TypeError, match=r"instancenorm: input must be float32, float64, bfloat16 or float16, got "
                                        r"dtype int64"):
        nt.instance_norm(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"batchnorm: input must be a torch.Tensor, got ndarray"):
        nt.batch_norm(np.ones((2, 3)), training=True)
    with pytest.raises(TypeError, match=r"groupnorm: input must be a dense tensor, got a sparse_coo tensor"):
        nt.group_norm(x.to_sparse(), 2)
    with pytest.raises(TypeError, match=r"layernorm: weight must be a dense tensor, got a sparse_coo tensor"):
        nt.layer_norm(x, (5,), torch.ones(5).to_sparse())
    jagged = torch.nested.nested_tensor([torch.randn(3, 5), torch.randn(2, 5)], layout=torch.jagged)
    with warnings.catch_warnings():  # torch's: strided nested tensors are a prototype
        warnings.simplefilter("ignore")
        strided = torch.nested.nested_tensor([torch.randn(3, 5), torch.randn(2, 5)])
    # the channel ops: torch has no answer either; a strided one has no shape, which the common case's looks read
    for call in (lambda: nt.group_norm(strided, 1), lambda: nt.batch_norm(strided, None, None, training=True),
                 lambda: nt.instance_norm(jagged)):
        with pytest.raises(TypeError, match=r"norm: input must be a dense tensor, got a nested tensor"):
            call()
    with pytest.raises(ValueError, match=r"batchnorm: input must have shape \(N, C\) or \(N, C, \*spatial\), got "
                                         r"shape \(6,\)"):
        nt.batch_norm(torch.randn(6), training=True)
    with pytest.raises(ValueError, match=r"groupnorm: num_groups=4 must divide the number of channels C=6"):
        nt.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"layernorm: input of shape \(4, 6, 5\) does not end with normalized_shape"):
        nt.layer_norm(x, (6,))
    with pytest.raises(ValueError, match=r"batchnorm: weight must have shape \(6,\), got \(5,\)"):
        nt.batch_norm(x, weight=torch.ones(5), training=True)
    with pytest.raises(TypeError, match=r"groupnorm: bias must have the input's dtype float32, got float64"):
        nt.group_norm(x, 2, bias=torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batchnorm: running_var must have shape \(6,\)"):
        nt.batch_norm(x, torch.zeros(6), torch.ones(5), training=True)
    with pytest.raises(ValueError, match=r"batchnorm: training=False normalizes with running_mean"):
        nt.batch_norm(x)
    # torch's batch_norm takes them and each channel's update overwrites the last one's; its instance_norm refuses
    with pytest.raises(ValueError, match=r"batchnorm: running_mean is updated in place, but its 6 elements share one "
                                         r"memory location"):
        nt.batch_norm(x, torch.zeros(1).expand(6), torch.ones(1).expand(6), training=True)
    torch.testing.assert_close(nt.batch_norm(x, torch.zeros(1).expand(6), torch.ones(1).expand(6)),
                               F.batch_norm(x, torch.zeros(6), torch.ones(6)))  # only read: as torch, taken
    # running statistics that require grad: torch refuses them (no derivative), normkit treated them as constants
    # and, in training, updated such a leaf in place; without grad mode both take them
    for training in (False, True):
        for f in (nt.batch_norm, nt.instance_norm):
            flag = {"training" if f is nt.batch_norm else "use_input_stats": training}
            with pytest.raises(ValueError, match=r"norm: the running statistics get no gradient, so they must not "
                                                 r"require one; got running_var with requires_grad=True"):
                f(x, torch.zeros(6), torch.ones(6, requires_grad=True), **flag)
            with torch.no_grad():
                f(x, torch.zeros(6, requires_grad=True), torch.ones(6), **flag)
    # torch.nn.functional's own refusals (torch 2.13): batch_norm's eps <= 0 in training, < 0 otherwise; a group
    # norm whose groups hold one value in the whole batch
    with pytest.raises(ValueError, match=r"batchnorm: eps must be positive in training, got 0.0"):
        nt.batch_norm(x, training=True, eps=0.0)
    with pytest.raises(ValueError, match=r"batchnorm: eps must be >= 0, got -0.001"):
        nt.batch_norm(x, torch.zeros(6), torch.ones(6), eps=-1e-3)
    with pytest.raises(ValueError, match=r"groupnorm: expected more than 1 value per group in the batch, got input of "
                                         r"shape \(1, 6, 1\) with num_groups=6"):
        nt.group_norm(x[:1, :, :1], 6)
    assert nt.group_norm(x[:2, :, :1], 6).shape == (2, 6, 1)  # torch takes two samples of one value a group
    # no refusal of momentum outside [0, 1] or of other ops' negative eps: torch.nn.functional accepts them (NaN
    # where var + eps < 0), and so must normkit.torch (tests/test_opinfo.py runs PyTorch's own samples of them)
    with pytest.raises(normkit.UnknownBackendError, match=r"unknown backend 'nope'"):
        nt.group_norm(x, 2, backend="nope")
    with pytest.raises(ValueError, match=r"groupnorm: grad_output must have the input's shape"):
        torch.ops.normkit.group_norm_backward(x[:1], x, x[:, :2, 0], x[:, :2, 0], 2, None, False, False, None)


_X = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))
_LONG = torch.ones(4, 6, 2, dtype=torch.long)
# mistakes a user makes, as (name, call on a functional namespace or a module factory); torch's own error classes
# are RuntimeError, NotImplementedError, ValueError and TypeError among these
_MISTAKES = [
    ("batch_norm running statistics of 5 channels", lambda f: f.batch_norm(_X, torch.zeros(5), torch.ones(5))),
    ("batch_norm weight of 5 channels", lambda f: f.batch_norm(_X, None, None, torch.ones(5), training=True)),
    ("batch_norm float64 weight", lambda f: f.batch_norm(_X, None, None, torch.ones(6, dtype=torch.float64),
                                                         training=True)),
    ("batch_norm float64 input, float32 weight",
     lambda f: f.batch_norm(_X.double(), None, None, torch.ones(6), training=True)),
    ("batch_norm int64 input", lambda f: f.batch_norm(_LONG, None, None, training=True)),
    ("batch_norm one value a channel", lambda f: f.batch_norm(torch.ones(1, 6), None, None, training=True)),
    ("batch_norm eps < 0 in training", lambda f: f.batch_norm(_X, None, None, training=True, eps=-1.0)),
    ("group_norm groups not dividing C", lambda f: f.group_norm(_X, 4)),
    ("group_norm weight of 5 channels", lambda f: f.group_norm(_X, 3, torch.ones(5))),
    ("group_norm float num_groups", lambda f: f.group_norm(_X, 3.0)),
    ("group_norm str num_groups", lambda f: f.group_norm(_X, "3")),
    ("group_norm int64 input", lambda f: f.group_norm(_LONG, 3)),
    ("group_norm float64 input, float32 weight", lambda f: f.group_norm(_X.double(), 3, torch.ones(6))),
    ("layer_norm shape not trailing", lambda f: f.layer_norm(_X, (4,))),
    ("layer_norm weight of another shape", lambda f: f.layer_norm(_X, (5,), torch.ones(4))),
    ("layer_norm int64 input", lambda f: f.layer_norm(_LONG, (2,))),
    ("layer_norm float64 input, float32 weight", lambda f: f.layer_norm(_X.double(), (5,), torch.ones(5))),
    ("layer_norm float in normalized_shape", lambda f: f.layer_norm(_X, (5.0,))),
    ("layer_norm bool in normalized_shape", lambda f: f.layer_norm(_X[..., :1], (True,))),
    ("instance_norm running statistics of 5 channels", lambda f: f.instance_norm(_X, torch.zeros(5), torch.ones(5))),
    ("instance_norm int64 input", lambda f: f.instance_norm(_LONG)),
    ("instance_norm expanded running statistics",
     lambda f: f.instance_norm(_X, torch.zeros(1).expand(6), torch.ones(1).expand(6))),
    ("instance_norm one spatial element", lambda f: f.instance_norm(torch.ones(4, 6, 1))),
    ("rms_norm shape not trailing", lambda f: f.rms_norm(_X, (4,))),
    ("rms_norm weight of another shape", lambda f: f.rms_norm(_X, (5,), torch.ones(4))),
    ("rms_norm int64 input", lambda f: f.rms_norm(_LONG, (2,))),
    ("batch_norm sparse input", lambda f: f.batch_norm(_X.to_sparse(), None, None, training=True)),
    ("group_norm sparse input", lambda f: f.group_norm(_X.to_sparse(), 3)),
    ("layer_norm sparse weight", lambda f: f.layer_norm(_X, (5,), torch.ones(5).to_sparse())),
    ("BatchNorm2d of 5 features", lambda f: (torch.nn if f is F else nt).BatchNorm2d(5)(_X)),
    ("LayerNorm of another shape", lambda f: (torch.nn if f is F else nt).LayerNorm(4)(_X)),
]


@pytest.mark.parametrize("name,call", _MISTAKES, ids=[m[0] for m in _MISTAKES])
def test_errors_are_of_the_class_torch_raises(name, call):
    """A drop-in replacement: what torch raises for a mistake, normkit raises an instance of (its errors are also
    ValueError or TypeError, which name the op and the argument)."""
    with pytest.raises(Exception) as torch_error:
        call(F)
    with pytest.raises(type(torch_error.value)) as normkit_error:
        call(nt)
    assert isinstance(normkit_error.value, (ValueError, TypeError))
    assert str(normkit_error.value).startswith(("batchnorm:", "groupnorm:", "layernorm:", "instancenorm:",
                                                "rmsnorm:")), normkit_error.value


def test_num_groups_takes_what_torch_takes():
    """torch's group_norm takes any integer num_groups operator.index takes (a 0-d integer tensor or array, a NumPy
    int), and refuses floats and bools; so do both frontends."""
    want = F.group_norm(_X, 3)
    for groups in (torch.tensor(3), np.int64(3), np.array(3)):
        _assert_close_to_scale(nt.group_norm(_X, groups), want, f"num_groups={groups!r}")
        np.testing.assert_allclose(normkit.get("gn")(_X.numpy(), groups), want.numpy(), rtol=1e-5, atol=1e-5)
    for groups in (torch.tensor(3.0), np.float64(3), True):
        with pytest.raises(TypeError, match="groupnorm: num_groups must be a positive int"):
            nt.group_norm(_X, groups)
        with pytest.raises(TypeError, match="groupnorm: num_groups must be a positive int"):
            normkit.get("gn")(_X.numpy(), groups)


@pytest.mark.parametrize("module", [False, True])
def test_instance_norm_eps_0_on_a_constant_instance_is_torchs(module):
    """torch's instance_norm takes rstd = 0 where an instance's variance and eps are both 0: the bias and zero
    gradients rather than NaN, and the running statistics as torch updates them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    x[1, 2] = 7.0  # a constant instance
    weight, bias, proj = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in (4, 4, x.shape))
    results = []
    for lib in (torch.nn, nt):
        norm = lib.InstanceNorm1d(4, eps=0.0, affine=True, track_running_stats=True).double()
        with torch.no_grad():
            norm.weight.copy_(weight), norm.bias.copy_(bias)
        xi = x.clone().requires_grad_()
        y = norm(xi) if module else lib.functional.instance_norm(xi, norm.running_mean, norm.running_var,
                                                                 norm.weight, norm.bias, eps=0.0)
        (y * proj).sum().backward()
        results.append((y, xi.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var))
    y = results[1][0]
    assert torch.isfinite(y).all() and torch.equal(y[1, 2], bias[2].expand(5))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_errors_surface_under_torch_compile():
    f = torch.compile(lambda x: nt.group_norm(x, 4), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"groupnorm: num_groups=4 must divide the number of channels C=6"):
        f(torch.randn(2, 6, 3))


def test_autograd_without_the_direct_cpp_apply(monkeypatch):
    """Eager calls reach the autograd Functions' C++ apply directly (functional._norm_apply, _add_norm_apply); where
    torch lacks the private calls for it they go through Function.apply: the same outputs and gradients."""
    from normkit.torch import functional

    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 8, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    wl, bl = (torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))

    def results():
        y = nt.group_norm(x, 4, w, b)
        ya, h = nt.add_layer_norm(x, r, (5,), wl, bl)
        loss = (y * y).sum() + (ya * ya).sum() + (h * h).sum()
        return (y, ya, h, *torch.autograd.grad(loss, (x, r, w, b, wl, bl)))

    direct = results()
    monkeypatch.setattr(functional, "_norm_apply", None)
    monkeypatch.setattr(functional, "_add_norm_apply", None)
    for a, c in zip(direct, results()):
        assert torch.equal(a, c)


class _Softplus(torch.nn.Module):
    def forward(self, w):
        return torch.nn.functional.softplus(w)


def test_convert_and_revert_take_parametrized_layers():
    """A parametrization makes a layer's class torch's Parametrized<class> subclass: convert and revert switch the
    class under it (with its parametrized properties), before or after it was registered; the results stay torch's,
    and the reverted model is torch.nn's again (it scripts, where normkit's layers refuse)."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
                              torch.nn.LayerNorm(5)).double()
    for i in (1, 3):
        parametrize.register_parametrization(ref[i], "weight", _Softplus())
    before = copy.deepcopy(ref)            # parametrized, then converted
    model = nt.convert(before)
    after = nt.convert(copy.deepcopy(ref))
    parametrize.register_parametrization(after[2], "bias", _Softplus())  # and one registered after convert
    parametrize.register_parametrization(ref[2], "bias", _Softplus())
    parametrize.register_parametrization(model[2], "bias", _Softplus())
    for m in (model, after):
        assert [type(layer).__name__ for layer in m[1:]] == ["ParametrizedBatchNorm2d", "ParametrizedGroupNorm",
                                                             "ParametrizedLayerNorm"]
        assert all(isinstance(layer, nt.modules._Activation) for layer in m[1:])
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    want = ref(x)
    for m in (model, after):
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
        nt.revert(m)
        assert [type(layer).__mro__[1] for layer in m[1:]] == [torch.nn.BatchNorm2d, torch.nn.GroupNorm,
                                                               torch.nn.LayerNorm]
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
        torch.jit.script(m)  # compiles, as torch.nn's does (running a parametrization scripted is torch's error)


@pytest.mark.parametrize("fn, flag", [(nt.batch_norm, "training"), (nt.instance_norm, "use_input_stats")])
def test_the_mode_flag_must_be_a_bool_as_in_torch(fn, flag):
    x = torch.ones(4, 3, 5)
    for bad in ("yes", None, 1, np.bool_(True)):
        with pytest.raises(TypeError, match="must be a bool, got"):
            fn(x, torch.zeros(3), torch.ones(3), **{flag: bad})
