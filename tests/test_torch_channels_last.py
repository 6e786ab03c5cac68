"""The PyTorch frontend on channels-last tensors: outputs, gradients and running statistics as torch.nn's, in the
memory format torch.nn gives them, with and without a channels-last kernel; the custom ops under torch.compile."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import normkit.torch as nt  # noqa: E402
from normkit import contract, registry  # noqa: E402
from support import ulps  # noqa: E402

nn = torch.nn
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def _layers(c):
    """(normkit layer, torch.nn layer, input dims) pairs with the same parameters."""
    pairs = [(nt.BatchNorm2d(c), nn.BatchNorm2d(c), 4), (nt.BatchNorm3d(c), nn.BatchNorm3d(c), 5),
             (nt.InstanceNorm2d(c, affine=True, track_running_stats=True),
              nn.InstanceNorm2d(c, affine=True, track_running_stats=True), 4),
             (nt.InstanceNorm3d(c, affine=True), nn.InstanceNorm3d(c, affine=True), 5),
             (nt.GroupNorm(1, c), nn.GroupNorm(1, c), 4), (nt.GroupNorm(c, c), nn.GroupNorm(c, c), 5)]
    if c % 3 == 0:
        pairs.append((nt.GroupNorm(3, c), nn.GroupNorm(3, c), 4))
    for ours, theirs, _ in pairs:
        with torch.no_grad():
            if getattr(theirs, "weight", None) is not None:
                theirs.weight.normal_()
                theirs.bias.normal_()
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
    return pairs


def _check_step(ours, theirs, x, backend=None, dy_format=None):
    """One forward + backward of both layers on the same channels-last input: values, memory formats, gradients,
    running statistics; x itself untouched."""
    fmt = CL[x.dim()]
    instance = isinstance(ours, nn.modules.instancenorm._InstanceNorm)
    xa = x.detach().clone().requires_grad_(True)
    # torch.nn's instance norm gets NCHW copies of x and dy: on channels-last ones with N = 1 its input gradient is
    # wrong (torch 2.13; off by O(1), see test_torch_instance_norm_channels_last_n1_gradient)
    xb = x.detach().clone(memory_format=torch.contiguous_format if instance else torch.preserve_format)
    xb.requires_grad_(True)
    before = x.detach().clone()
    if backend is not None:
        ours.backend = backend
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **TOL[x.dtype])
    # torch.nn's instance norm runs batch norm on a contiguous copy and hands back a contiguous output; normkit
    # keeps the input's layout for all three ops (the next layer of a channels-last model wants it)
    assert ya.stride() == (x.stride() if instance else yb.stride())
    assert ya.is_contiguous(memory_format=fmt)
    dy = torch.randn_like(x) if dy_format is None else torch.randn(x.shape, dtype=x.dtype).contiguous(
        memory_format=dy_format)
    ya.backward(dy), yb.backward(dy.contiguous() if instance else dy)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[x.dtype])
    assert xa.grad.stride() == x.stride() and (instance or xb.grad.stride() == x.stride())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL[x.dtype], msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL[x.dtype], msg=lambda m: f"{name}: {m}")
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (1, 9, 3, 7), (3, 6, 1, 1), (2, 1, 4, 4), (4, 17, 3, 3)])
def test_layers_on_channels_last_match_torch_nn(dtype, shape):
    torch.manual_seed(0)
    for ours, theirs, dims in _layers(shape[1]):
        full = shape if dims == 4 else (*shape, 2)
        if isinstance(theirs, nn.modules.instancenorm._InstanceNorm) and full[2] * full[3] * (full[4:] or [1])[0] < 2:
            continue  # instance norm needs more than one value per instance
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        x = torch.randn(full, dtype=dtype).contiguous(memory_format=CL[dims])
        for training in (True, False):
            ours.train(training), theirs.train(training)
            _check_step(ours, theirs, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_channels_last_comes_back_channels_last(dtype):
    """16-bit channels-last data: y and dx are handed back in the input's format (as torch.nn gives them, but for
    its InstanceNorm). Per-set statistics (GroupNorm, InstanceNorm training) run the default backend's (Cython's)
    16-bit channels-last kernels, per-channel ones (BatchNorm, inference) the NCHW kernel on the (N*S, C, 1) view:
    the same sums in another order either way, so each result within the contract's 1 ulp (y) / 2 ulps (dx) of
    the float64 one rounded once, and within twice that of the NCHW input's."""
    torch.manual_seed(2)
    for ours, _, dims in _layers(6):
        x = torch.randn((3, 6, 4, 5) if dims == 4 else (3, 6, 4, 5, 2)).to(dtype)
        dy = torch.randn(x.shape).to(dtype)
        for training in (True, False):
            ours.train(training)
            got = {}
            for fmt in (torch.contiguous_format, CL[dims]):
                xa = x.clone(memory_format=fmt).requires_grad_(True)
                layer = copy.deepcopy(ours)
                y = layer(xa)
                y.backward(dy.contiguous(memory_format=fmt))
                assert y.is_contiguous(memory_format=fmt) and xa.grad.is_contiguous(memory_format=fmt)
                got[fmt] = (y, xa.grad)
            for a, b, bound in zip(got[torch.contiguous_format], got[CL[dims]], (2, 4)):
                what = f"{type(ours).__name__} {dtype} training={training}"
                assert ulps(b.contiguous().view(torch.uint16).numpy(), a.view(torch.uint16).numpy()) <= bound, what


def test_torch_instance_norm_channels_last_n1_gradient():
    """Why _check_step feeds torch.nn's instance norm an NCHW copy: on a channels-last input with one sample,
    torch's own input gradient disagrees with its NCHW one (and with normkit's, on either layout). If this starts
    failing, torch has fixed it and _check_step can give torch the channels-last input again."""
    torch.manual_seed(4)
    x, dy = torch.randn(1, 9, 3, 7), torch.randn(1, 9, 3, 7)
    grads = {}
    for name, layer in (("torch", nn.InstanceNorm2d(9)), ("normkit", nt.InstanceNorm2d(9))):
        for fmt in (torch.contiguous_format, torch.channels_last):
            xa = x.clone(memory_format=fmt).requires_grad_(True)
            layer(xa).backward(dy.contiguous(memory_format=fmt))
            grads[name, fmt] = xa.grad
    ref = grads["torch", torch.contiguous_format]
    torch.testing.assert_close(grads["normkit", torch.contiguous_format], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["normkit", torch.channels_last], ref, rtol=1e-4, atol=1e-4)
    assert (grads["torch", torch.channels_last] - ref).abs().max() > 0.1


@pytest.mark.parametrize("backend", ["reference", "cython"])
def test_channels_last_with_and_without_a_channels_last_kernel(backend):
    """The reference has no channels-last kernels: a contiguous copy, the NCHW kernel, the output channels-last
    all the same; a grad_output in the other format is handled too."""
    torch.manual_seed(1)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for ours, theirs, dims in _layers(6):
        if dims == 4:
            _check_step(ours.double(), theirs.double(), x, backend=backend, dy_format=torch.contiguous_format)


def test_channels_last_input_goes_to_the_channels_last_kernel_without_copies():
    calls = []
    _, kernel = registry.lookup("batchnorm", "forward", "float32", "cython", layout="nhwc")
    spec = registry.Backend("cl_spy", registry.runtime_module({
        ("batchnorm", "forward", "float32"): kernel,
        ("batchnorm", "forward", "float32", "nhwc"): lambda *a: (calls.append(a), kernel(*a))}),
        kernels={"batchnorm": ("forward",)}, dtypes=("float32",), channels_last={"batchnorm": ("forward",)})
    registry.register_backend(spec)
    try:
        x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        y = nt.batch_norm(x, None, None, training=True, backend="cl_spy")
        (xa, *_, ya, _mean, _rstd), = calls
        assert xa.shape == (2, 9, 8) and xa.ctypes.data == x.data_ptr()
        assert ya.ctypes.data == y.data_ptr() and y.is_contiguous(memory_format=torch.channels_last)
    finally:
        registry.unregister_backend("cl_spy")


@pytest.mark.parametrize("own", [True, False])
def test_a_backends_own_channels_last_kernel_runs_before_its_address_kernel(own):
    """A backend with address kernels and a channels-last BatchNorm kernel of its own: normkit.torch ran the address
    kernel on the (N*S, C, 1) columns view, never the declared kernel (the NumPy frontend ran it). Where its
    channels-last kernel is its NCHW kernel on that view (contract.on_columns, as the built-ins'), the address kernel
    still runs in its place."""
    calls = []
    nchw = registry.lookup("batchnorm", "forward", "float32", "reference")[1]
    nhwc = contract.on_columns(contract.SPECS["batchnorm"], "forward", nchw)
    table = {("batchnorm", "forward", "float32"): nchw,
             ("batchnorm", "forward", "float32", "nhwc"):
                 (lambda *a: (calls.append("nhwc"), nhwc(*a))) if own else nhwc,
             ("batchnorm", "forward", "float32", "addr"): lambda n, c, s, *a: calls.append(("addr", n, c, s))}
    spec = registry.Backend("cl_addr_spy", registry.runtime_module(table), kernels={"batchnorm": ("forward",)},
                            dtypes=("float32",), channels_last={"batchnorm": ("forward",)},
                            addresses={"batchnorm": ("forward",)})
    registry.register_backend(spec)
    try:
        x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y = nt.batch_norm(x, None, None, training=True, backend="cl_addr_spy")
        if own:
            assert calls == ["nhwc"]
            torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
        else:
            assert calls == [("addr", 18, 8, 1)]
    finally:
        registry.unregister_backend("cl_addr_spy")


@pytest.mark.parametrize("op", ["groupnorm", "instancenorm"])
def test_channels_last_fused_activation_runs_the_channels_last_act_kernels(op):
    """Cython's channels-last act_ kernels get the tensors' own memory, no NCHW copy (a spy backend around them),
    and give the NCHW kernels' results."""
    calls = []
    directions = ("forward", "backward", "act_forward", "act_backward")
    table = {(op, d, "float32"): registry.lookup(op, d, "float32", "cython")[1] for d in directions}
    for d in directions[2:]:
        kernel = registry.lookup(op, d, "float32", "cython", layout="nhwc")[1]
        table[(op, d, "float32", "nhwc")] = (lambda d, k: lambda *a: (calls.append((d, a)), k(*a)))(d, kernel)
    registry.register_backend(registry.Backend("cl_act_spy", registry.runtime_module(table), kernels={op: directions},
                                               dtypes=("float32",), channels_last={op: directions[2:]}))
    try:
        torch.manual_seed(3)
        x, dy = torch.randn(2, 8, 3, 5), torch.randn(2, 8, 3, 5)
        w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
        results = []
        for fmt, backend in ((torch.channels_last, "cl_act_spy"), (torch.contiguous_format, "cython")):
            xa = x.contiguous(memory_format=fmt).requires_grad_(True)
            if op == "groupnorm":
                y = nt.group_norm(xa, 4, w, b, backend=backend, activation="silu")
            else:
                y = nt.instance_norm(xa, weight=w, bias=b, backend=backend, activation="silu")
            y.backward(dy.contiguous(memory_format=fmt))
            assert y.is_contiguous(memory_format=fmt) and xa.grad.is_contiguous(memory_format=fmt)
            results.append((y.detach(), xa.grad, w.grad.clone(), b.grad.clone()))
            w.grad = b.grad = None
            if backend == "cl_act_spy":
                assert [d for d, _ in calls] == ["act_forward", "act_backward"]
                assert calls[0][1][0].ctypes.data == xa.data_ptr()  # x itself, (N, S, C)
        for a, c in zip(*results):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    finally:
        registry.unregister_backend("cl_act_spy")


@pytest.mark.parametrize("make", [lambda: nt.BatchRenorm2d(6), lambda: nt.GhostBatchNorm2d(6, virtual_batch_size=2),
                                  lambda: nt.SyncBatchNorm(6), lambda: nt.BatchNormalization(6, axis=1),
                                  lambda: nt.BatchNormalization(6, axis=1, renorm=True, virtual_batch_size=2)],
                         ids=["renorm", "ghost", "sync", "keras", "keras_renorm_ghost"])
def test_sync_and_renorm_modules_keep_channels_last(make):
    """Modules built on the split kernels or the Keras-style core compute on an NCHW copy; their output and input
    gradient come back channels-last in training as in eval, as torch.nn.BatchNorm2d's (training gave NCHW; the
    Keras-style layer gave NCHW in both)."""
    torch.manual_seed(2)
    x = torch.randn(4, 6, 3, 3)
    dy = torch.randn(4, 6, 3, 3)
    for training in (True, False):
        layer = make().train(training)
        twin = copy.deepcopy(layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyncBatchNorm without a process group says so
            xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            y = layer(xc)
            y.backward(dy)
            xs = x.clone().requires_grad_()
            ys = twin(xs)
            ys.backward(dy)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert xc.grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ys)
        torch.testing.assert_close(xc.grad, xs.grad)


@pytest.mark.parametrize("make", [lambda: nt.BatchRenorm2d(3), lambda: nt.GhostBatchNorm2d(3, virtual_batch_size=2)],
                         ids=["renorm", "ghost"])
def test_renorm_and_ghost_refuse_an_input_of_another_dtype_in_training_as_in_eval(make):
    """A float64 input to a float32 layer: training took it (torch.nn.BatchNorm2d refuses it) and eval refused it,
    so a model trained and then failed at evaluation."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    for training in (True, False):
        with pytest.raises(TypeError, match="weight must have the input's dtype float64, got float32"):
            make().train(training)(x)


def test_channels_last_under_torch_compile():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nt.BatchNorm2d(8), nn.ReLU(),
                          nt.GroupNorm(2, 8), nt.InstanceNorm2d(8, affine=True))
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-4)
    assert y_c.is_contiguous(memory_format=torch.channels_last)
    proj = torch.randn(y.shape)
    (y * proj).sum().backward(), (y_c * proj).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
