"""Gradients of gradients (create_graph=True) through normkit.torch: the same values as torch.nn.functional's,
second derivatives checked by finite differences (gradgradcheck), and a clear error where normkit has no
differentiable backward; and torch.func's transforms (grad, vmap, jacrev, hessian, jvp), forward-mode AD and
torch.jit.trace, under which normkit's functions are torch's; so they are on the meta device."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import normkit.torch as nt  # noqa: E402

F = torch.nn.functional


def _data(shape, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5)
    b = torch.randn(c, generator=g, dtype=dtype)
    rm = torch.randn(shape[1], generator=g, dtype=dtype)
    rv = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def _act(z, name, slope=0.2):
    return {None: lambda: z, "relu": lambda: F.relu(z), "leaky_relu": lambda: F.leaky_relu(z, slope),
            "silu": lambda: F.silu(z), "gelu": lambda: F.gelu(z),
            "gelu_tanh": lambda: F.gelu(z, approximate="tanh")}[name]()


# (id, input shape, parameter shape, call) with call(m, x, w, b, rm, rv, **kw): m is normkit.torch or
# torch.nn.functional; kw (normkit's only) asks for a fused activation, which torch's side applies after the norm
CASES = [
    ("bn", (6, 3, 4, 5), (3,), lambda m, x, w, b, rm, rv, **kw: m.batch_norm(x, None, None, w, b, True, **kw)),
    ("bn-eval", (6, 3, 4, 5), (3,), lambda m, x, w, b, rm, rv, **kw: m.batch_norm(x, rm, rv, w, b, False, **kw)),
    ("bn-1d", (8, 3), (3,), lambda m, x, w, b, rm, rv, **kw: m.batch_norm(x, None, None, w, b, True, **kw)),
    ("in", (3, 4, 6, 5), (4,), lambda m, x, w, b, rm, rv, **kw: m.instance_norm(x, None, None, w, b, **kw)),
    ("in-running", (3, 4, 6, 5), (4,),
     lambda m, x, w, b, rm, rv, **kw: m.instance_norm(x, rm, rv, w, b, use_input_stats=False, **kw)),
    ("gn", (3, 6, 4, 5), (6,), lambda m, x, w, b, rm, rv, **kw: m.group_norm(x, 3, w, b, **kw)),
    ("ln", (3, 5, 4, 6), (4, 6), lambda m, x, w, b, rm, rv, **kw: m.layer_norm(x, (4, 6), w, b, **kw)),
    ("ln-all", (4, 6), (4, 6), lambda m, x, w, b, rm, rv, **kw: m.layer_norm(x, (4, 6), w, b, **kw)),  # no lead dims
    ("rms", (3, 5, 24), (24,), lambda m, x, w, b, rm, rv, **kw: m.rms_norm(x, (24,), w, **kw)),
]
ACTS = {"bn": "relu", "bn-eval": "leaky_relu", "bn-1d": "gelu", "in": "silu", "in-running": "gelu",
        "gn": "gelu_tanh", "ln": "silu"}  # RMSNorm has no fused activation


def _call(case, m, x, w, b, rm, rv, act):
    f = case[3]
    if m is nt and act is not None:
        return f(m, x, w, b, rm, rv, activation=act, **({"negative_slope": 0.2} if act == "leaky_relu" else {}))
    return _act(f(m, x, w, b, rm, rv), act)


def _second_order(case, m, act, params=True, dtype=torch.float64):
    """Gradients of a gradient penalty plus the loss, wrt x, weight and bias: loss = sum(y^3 * r), then autograd
    .grad with create_graph=True, then autograd.grad of |grads|^2 + loss (autograd.grad with inputs: the call that
    prunes what it cannot reach)."""
    name, shape, pshape, _ = case
    x, w, b, rm, rv = _data(shape, pshape, dtype)
    r = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    leaves = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if params else [])
    if not params:
        w = b = None
    y = _call(case, m, x, w, b, rm, rv, act)
    loss = (y.pow(3) * r).sum()
    used = [t for t in leaves if t is not None and (name != "rms" or t is not b)]
    first = torch.autograd.grad(loss, used, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return first, torch.autograd.grad(penalty + loss, used)


@pytest.mark.parametrize("case,act", [(c, None) for c in CASES] + [(c, ACTS[c[0]]) for c in CASES if c[0] in ACTS],
                         ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_second_order_matches_torch(case, act):
    got1, got2 = _second_order(case, nt, act)
    ref1, ref2 = _second_order(case, F, act)
    for g, r in zip(got1 + got2, ref1 + ref2):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("bn", "in", "gn", "ln", "rms")], ids=lambda c: c[0])
def test_without_parameters(case):
    got1, got2 = _second_order(case, nt, None, params=False)
    ref1, ref2 = _second_order(case, F, None, params=False)
    for g, r in zip(got1 + got2, ref1 + ref2):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("bn", "bn-eval", "gn", "ln", "rms")],
                         ids=lambda c: c[0])
def test_gradgradcheck(case):
    """Second derivatives by finite differences, wrt every input and the output gradient."""
    name, shape, pshape, _ = case
    x, w, b, rm, rv = _data(shape, pshape)
    act = ACTS.get(name, None)
    inputs = (x.requires_grad_(), w.requires_grad_()) + (() if name == "rms" else (b.requires_grad_(),))

    def f(x, w, b=None):
        return _call(case, nt, x, w, b, rm, rv, act)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_first_order_values_match_the_kernels():
    """Under create_graph the first-order gradients come from torch's operations: the kernels' values, to float32
    rounding."""
    case = CASES[5]  # gn
    x, w, b, _, _ = _data(case[1], case[2], torch.float32)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    plain = torch.autograd.grad(nt.group_norm(xs[0], 3, ws[0], b, activation="silu"), (xs[0], ws[0]), dy)
    graph = torch.autograd.grad(nt.group_norm(xs[1], 3, ws[1], b, activation="silu"), (xs[1], ws[1]), dy,
                                create_graph=True)
    assert all(g.requires_grad for g in graph)
    for p, g in zip(plain, graph):
        torch.testing.assert_close(g.detach(), p, rtol=1e-5, atol=1e-5)


def test_bfloat16_and_channels_last():
    """16-bit data with float32 parameters (autocast's mix) and a channels-last input: the gradients keep the
    dtypes of the first-order backward and match torch's float32 computation rounded to bfloat16."""
    x, w, b, _, _ = _data((4, 6, 5, 3), (6,), torch.float32)
    x16 = x.to(torch.bfloat16).to(memory_format=torch.channels_last)

    def run(m, x16, w):
        x16 = x16.clone().requires_grad_()
        w = w.clone().requires_grad_()
        y = m.batch_norm(x16, None, None, w, b, True) if m is nt else \
            F.batch_norm(x16.float(), None, None, w, b, True).to(torch.bfloat16)
        gx, gw = torch.autograd.grad(y.float().pow(2).sum(), (x16, w), create_graph=True)
        return (gx, gw), torch.autograd.grad(gx.float().pow(2).sum() + gw.pow(2).sum(), (x16, w))

    got, ref = run(nt, x16, w), run(F, x16, w)
    for g, r in zip(got[0] + got[1], ref[0] + ref[1]):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2 * r.abs().max().item())


@pytest.mark.parametrize("op", ["layer", "rms"])
def test_fused_add(op):
    x, w, b, _, _ = _data((3, 4, 8), (8,))
    res = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(fused):
        xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, res, w, b))
        if fused:
            y, h = nt.add_layer_norm(xs, rs, (8,), ws, bs) if op == "layer" else nt.add_rms_norm(xs, rs, (8,), ws)
        else:
            h = xs + rs
            y = F.layer_norm(h, (8,), ws, bs) if op == "layer" else F.rms_norm(h, (8,), ws)
        loss = y.pow(3).sum() + h.pow(2).sum()
        leaves = (xs, rs, ws) + ((bs,) if op == "layer" else ())
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        return first + torch.autograd.grad(sum(g.pow(2).sum() for g in first), leaves)

    for g, r in zip(run(True), run(False)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_a_converted_model_takes_a_gradient_penalty():
    """WGAN-GP's step: the penalty's gradient reaches the parameters through .backward() as with torch.nn."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.SiLU(),
                              torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.LayerNorm(144),
                              torch.nn.Linear(144, 1)).double()
    model = nt.convert(copy.deepcopy(ref), fuse=True)
    assert type(model) is nt.FusedSequential and nt.fusion_report(model).fused[0].activation == "silu"
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    for m in (ref, model):
        xi = x.clone().requires_grad_()
        out = m(xi)
        (gx,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        (out.mean() + gx.pow(2).sum()).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("make", [lambda: nt.BatchRenorm2d(3), lambda: nt.GhostBatchNorm2d(3, virtual_batch_size=2),
                                  lambda: nt.BatchNormalization(3)], ids=["renorm", "ghost", "keras"])
def test_layers_without_a_differentiable_backward_say_so(make):
    layer = make().train()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"gradients of its gradients \(create_graph=True\) are not supported"):
        torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"batched gradients \(is_grads_batched=True"):
        torch.autograd.grad(layer(x), x, torch.ones(2, *x.shape), is_grads_batched=True)
    layer(x).pow(3).sum().backward()  # the first-order backward is unaffected
    assert x.grad is not None


def test_create_graph_in_any_layout():
    """The differentiable form runs torch's operations on contiguous copies: torch's batch-norm backward is wrong for
    an instance_norm of one sample with a channels-last dy (dx off by 3.6 where its scale is 3.2) and for a batch_norm
    input with the channels fastest (7.5 of 3.7); normkit's answers are its kernels' whatever the layout."""
    g = torch.Generator().manual_seed(4)
    cases = [(lambda m, x, w: m.instance_norm(x, weight=w), (1, 3, 4, 5), None, torch.channels_last),
             (lambda m, x, w: m.batch_norm(x, None, None, w, None, True), (1, 3, 1, 3, 1), (1, 1, 3, 3, 9), None)]
    for f, shape, strides, dy_format in cases:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if strides is not None:
            x = torch.empty_strided(shape, strides, dtype=torch.float64).copy_(x)
        w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        if dy_format is not None:
            dy = dy.contiguous(memory_format=dy_format)
        results = []
        for create_graph in (False, True):
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            results.append(torch.autograd.grad(f(nt, xs, ws), (xs, ws), dy, create_graph=create_graph))
        xs, ws = x.contiguous().requires_grad_(), w.clone().requires_grad_()
        want = torch.autograd.grad(f(F, xs, ws), (xs, ws), dy.contiguous())  # torch's, on contiguous tensors
        for got in results:
            for a, b in zip(got, want):
                torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["layer", "rms"])
def test_fused_add_h_without_a_graph(op):
    """h = x + residual has no graph where neither requires grad (torch's sum has none), also under create_graph:
    the differentiable backward added dh to a dx that was not computed (TypeError)."""
    x, w, b, _, _ = _data((3, 4, 8), (8,))
    res = x.cos()
    ws = w.clone().requires_grad_()
    y, h = nt.add_layer_norm(x, res, (8,), ws, b) if op == "layer" else nt.add_rms_norm(x, res, (8,), ws)
    assert not h.requires_grad
    (dw,) = torch.autograd.grad((y.pow(3)).sum(), ws, create_graph=True)
    yt = F.layer_norm(x + res, (8,), ws, b) if op == "layer" else F.rms_norm(x + res, (8,), ws)
    torch.testing.assert_close(dw, torch.autograd.grad((yt.pow(3)).sum(), ws)[0], rtol=1e-9, atol=1e-9)


BATCHED = [("bn", lambda m, x, w: m.batch_norm(x, None, None, w, None, True)),
           ("gn-relu", lambda m, x, w: m.group_norm(x, 2, w, activation="relu") if m is nt
            else F.relu(F.group_norm(x, 2, w))),
           ("ln", lambda m, x, w: m.layer_norm(x, (5,))),
           ("add-rms", lambda m, x, w: m.add_rms_norm(x, x.sin(), (5,), None)[0] if m is nt
            else F.rms_norm(x + x.sin(), (5,)))]


@pytest.mark.parametrize("name,f", BATCHED, ids=[c[0] for c in BATCHED])
def test_batched_output_gradients(name, f):
    """torch.autograd.grad(..., is_grads_batched=True) and the vectorized jacobian hand backward a batched dy (no
    memory for a kernel): torch's operations take it, as torch's own functions do (an internal error before)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    dys = torch.randn(3, 2, 4, 3, 5, generator=g, dtype=torch.float64)

    def vjps(m):
        xs = x.clone().requires_grad_()
        return torch.autograd.grad(f(m, xs, w), xs, dys, is_grads_batched=True)[0]

    torch.testing.assert_close(vjps(nt), vjps(F), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.autograd.functional.jacobian(lambda t: f(nt, t, w), x, vectorize=True),
                               torch.autograd.functional.jacobian(lambda t: f(F, t, w), x, vectorize=True),
                               rtol=1e-9, atol=1e-9)


VJP_LAYERS = [("ln", (3, 4), lambda: torch.nn.LayerNorm(4)), ("gn", (3, 4, 5), lambda: torch.nn.GroupNorm(2, 4)),
              ("bn", (3, 4, 5), lambda: torch.nn.BatchNorm1d(4)), ("rms", (3, 4), lambda: torch.nn.RMSNorm(4)),
              ("in", (3, 4, 5), lambda: torch.nn.InstanceNorm1d(4, affine=True))]


@pytest.mark.parametrize("name,shape,make", VJP_LAYERS, ids=[c[0] for c in VJP_LAYERS])
def test_torch_func_vmap_around_autograd_grad(name, shape, make):
    """vmap(lambda v: autograd.grad(y, x, v)) over a graph built outside it (a jacobian by hand, gradcheck's
    batched-grad test) hands backward torch.func's batched dy, without storage: torch's operations take it, as for
    autograd's own batching (the kernel path failed: "Cannot access data pointer of Tensor that doesn't have
    storage")."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    basis = torch.eye(x0.numel(), dtype=torch.float64).reshape(-1, *shape)
    ref = make().double()
    ours = nt.convert(copy.deepcopy(ref))
    jacobians = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        y = m(x)
        jacobians.append(torch.func.vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0])(basis))
    torch.testing.assert_close(jacobians[1], jacobians[0], rtol=1e-10, atol=1e-10)


SHARED = [("ln-of-x-times-w", lambda m, x, w, b: m.layer_norm(x * w, (5,), w, b)),
          ("ln-of-ln", lambda m, x, w, b: m.layer_norm(m.layer_norm(x, (5,), w), (5,), w, b)),
          ("add-ln", lambda m, x, w, b: m.add_layer_norm(x * w, x, (5,), w, b)[0] if m is nt
           else F.layer_norm(x * w + x, (5,), w, b)),
          ("gn-of-x-times-w", lambda m, x, w, b: (lambda w4: m.group_norm(x * w4[:, None], 2, w4, b[:4]))(w[:4]))]


@pytest.mark.parametrize("name,f", SHARED, ids=[c[0] for c in SHARED])
def test_a_weight_that_also_feeds_the_input(name, f):
    """The backwards that go through autograd (create_graph=True, batched output gradients) differentiate the norm
    alone: its weight's gradient once (it took the path through the input too, counting it twice), and the
    caller's graph kept for its own retain_graph=True backward (its nodes had freed their saved tensors)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(f(F, x, w, b), (x, w, b), dy)
    for create_graph in (False, True):
        got = torch.autograd.grad(f(nt, x, w, b), (x, w, b), dy, create_graph=create_graph)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    y = f(nt, x, w, b)
    dys = torch.stack([dy, 2 * dy])
    batched = torch.autograd.grad(y, (x, w, b), dys, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(tuple(t[1] for t in batched), tuple(2 * t for t in want), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, b), dy), want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(lambda *t: f(nt, *t), (x, w, b))


FUNCS = [("bn", (6, 3, 4), lambda m, x: m.batch_norm(x, None, None, None, None, True)),
         ("in", (2, 3, 5), lambda m, x: m.instance_norm(x)),
         ("gn", (2, 4, 3), lambda m, x: m.group_norm(x, 2)),
         ("ln", (3, 8), lambda m, x: m.layer_norm(x, (8,))),
         ("rms", (3, 8), lambda m, x: m.rms_norm(x, (8,))),
         ("gn-silu", (2, 4, 3), lambda m, x: m.group_norm(x, 2, activation="silu") if m is nt
          else F.silu(F.group_norm(x, 2))),
         ("add-ln", (3, 8), lambda m, x: m.add_layer_norm(x, x.cos(), (8,))[0] if m is nt
          else F.layer_norm(x + x.cos(), (8,)))]


@pytest.mark.parametrize("transform", ["grad", "hessian", "jacrev", "vmap", "jvp", "dual"])
@pytest.mark.parametrize("name,shape,f", FUNCS, ids=[c[0] for c in FUNCS])
def test_torch_func_transforms(name, shape, f, transform):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(m):
        if transform == "grad":
            return torch.func.grad(lambda x: f(m, x).pow(3).sum())(x)
        if transform == "hessian":
            return torch.func.hessian(lambda x: f(m, x).pow(3).sum())(x)
        if transform == "jacrev":
            return torch.func.jacrev(lambda x: f(m, x))(x)
        if transform == "jvp":
            return torch.func.jvp(lambda x: f(m, x), (x,), (x.sin(),))[1]
        if transform == "dual":  # forward-mode AD with dual tensors
            with torch.autograd.forward_ad.dual_level():
                out = f(m, torch.autograd.forward_ad.make_dual(x, x.sin()))
                return torch.autograd.forward_ad.unpack_dual(out).tangent
        return torch.func.vmap(lambda xi: f(m, xi[None])[0])(x)  # each sample its own batch of one

    torch.testing.assert_close(run(nt), run(F), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,shape,f", FUNCS + [
    ("bn-cl", (4, 3, 2, 5), lambda m, x: m.batch_norm(x.contiguous(memory_format=torch.channels_last), None, None,
                                                      None, None, True)),
    ("add-rms", (3, 8), lambda m, x: m.add_rms_norm(x, x + 1, (8,))[1] if m is nt else x + (x + 1))],
    ids=lambda c: c if isinstance(c, str) else None)
def test_meta_device(name, shape, f, dtype):
    """Shapes without data (shape inference, FlopCounterMode): each function is torch's, with its output's shape,
    dtype and memory format."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    got, want = f(nt, x), f(F, x)
    assert got.device.type == "meta"
    assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())


def test_meta_device_checks_and_mixed_devices():
    x = torch.empty(3, 8, device="meta")
    with pytest.raises(ValueError, match="layernorm: residual must have the input's shape"):
        nt.add_layer_norm(x, torch.empty(8, device="meta"), (8,))
    with pytest.raises(TypeError, match="rmsnorm: residual must be a torch.Tensor"):
        nt.add_rms_norm(x, 1.0, (8,))
    with pytest.raises(ValueError, match="layernorm: weight is on device meta; normkit's kernels run on the CPU"):
        nt.layer_norm(torch.randn(3, 8), (8,), torch.empty(8, device="meta"))


def test_a_converted_model_runs_on_the_meta_device():
    """A model built on the meta device (no memory for its parameters) and converted runs there, training mode
    included (its running statistics are meta tensors too)."""
    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Flatten(),
                                   torch.nn.LayerNorm(8 * 6 * 6), torch.nn.RMSNorm(8 * 6 * 6))
    with torch.device("meta"):
        ref, model = build(), nt.convert(build(), fuse=True)
    assert type(model) is nt.FusedSequential and nt.fusion_report(model).fused[0].activation == "relu"
    x = torch.empty(2, 3, 8, 8, device="meta")
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(ref, mode)()
        got = model(x)
        assert got.device.type == "meta" and got.shape == ref(x).shape == (2, 8 * 6 * 6)
    assert model[1].num_batches_tracked.device.type == "meta"


def test_a_converted_model_under_fake_tensor_mode():
    """FakeTensorMode outside torch.compile (shape propagation, torch.fx's FakeTensorProp): a converted model runs
    torch's functions on the fakes, as on the meta device (the kernel path failed: .numpy() of a tensor
    subclass)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
                                   torch.nn.InstanceNorm2d(8, affine=True), torch.nn.Flatten(),
                                   torch.nn.LayerNorm(8 * 6 * 6), torch.nn.RMSNorm(8 * 6 * 6))
    ref = build()
    model = nt.convert(copy.deepcopy(ref))
    mode = FakeTensorMode()
    real = ref.state_dict()
    with mode:
        x = torch.empty(2, 3, 8, 8)
        state = {k: mode.from_tensor(v) for k, v in real.items()}
        for m in (ref, model):
            y = torch.func.functional_call(m, state, (x,))
            assert y.shape == (2, 8 * 6 * 6)


def test_a_parameter_as_input_compiles_in_one_graph():
    """A Tensor subclass as the input (a Parameter) under torch.compile(fullgraph=True): the FakeTensor test, which
    dynamo cannot trace, is an eager-only one (it failed the graph)."""
    p = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.float64))
    w = torch.nn.Parameter(torch.rand(16, dtype=torch.float64) + 0.5)
    torch._dynamo.reset()
    f = torch.compile(lambda: nt.layer_norm(p, (16,), w), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(), F.layer_norm(p, (16,), w))


def test_flop_counter_on_the_meta_device():
    """FlopCounterMode over a training step on meta tensors counts a converted model as it counts torch.nn's."""
    from torch.utils.flop_counter import FlopCounterMode

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6), torch.nn.Linear(288, 4))
    with torch.device("meta"):
        ref, model = build(), nt.convert(build())
    x = torch.empty(2, 3, 8, 8, device="meta")
    flops = []
    for m in (ref, model):
        with FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_per_sample_gradients_of_a_converted_model():
    """torch.func's per-sample-gradient recipe (functional_call, vmap over grad) on a converted model."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                              torch.nn.Flatten(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1)).double()
    model = nt.convert(copy.deepcopy(ref), fuse=True)
    assert type(model) is nt.FusedSequential and nt.fusion_report(model).fused[0].activation == "silu"
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi):
            return torch.func.functional_call(m, p, (xi[None],)).pow(2).sum()
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    got, want = per_sample(model), per_sample(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_jit_trace_records_the_norms(mode):
    """A kernel's writes through a pointer are invisible to the tracer (the traced graph returned an empty
    tensor's contents): under torch.jit.trace the functions are torch's, which it records."""
    torch.manual_seed(0)
    model = nt.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8),
        torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6), torch.nn.RMSNorm(8 * 6 * 6)), fuse=True)
    getattr(model, mode)()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 8, 8), check_trace=False)
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


class _OwnRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fuse", [False, True])
def test_torch_jit_script_names_normkit_and_what_to_use(fuse):
    """TorchScript cannot compile a kernel call: every normkit module says so and what works instead (its own error
    named normkit's internal signatures), before compiling anything, and the model is left as it was; the reverted
    model scripts."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8),
              torch.nn.InstanceNorm2d(8), torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6),
              torch.nn.RMSNorm(8 * 6 * 6), _OwnRMSNorm(8 * 6 * 6)]
    model = nt.convert(torch.nn.Sequential(*layers), fuse=fuse,
                       rmsnorm_classes={_OwnRMSNorm: nt.RMSNormSemantics()}).eval()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError, match=r"torch.jit.script: BatchNorm2d is normkit's, whose kernels TorchScript "
                                           r"cannot compile; use torch.compile or torch.jit.trace on the model, or "
                                           r"script normkit.torch.revert\(model\)"):
        torch.jit.script(model)
    assert [type(m) for m in model.modules()] == classes
    for m in (nt.GroupNorm(2, 8), nt.LayerNorm(4), nt.RMSNorm(4), nt.InstanceNorm2d(3), nt.BatchRenorm2d(3),
              nt.GhostBatchNorm2d(3, virtual_batch_size=2), nt.BatchNormalization(3), nt.SyncBatchNorm(3),
              model[-1]):
        with pytest.raises(RuntimeError, match=f"torch.jit.script: {type(m).__name__} is normkit's"):
            torch.jit.script(torch.nn.Sequential(m))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(nt.revert(model))(x), want, rtol=1e-5, atol=1e-5)


def test_second_order_uses_the_forwards_running_statistics():
    """Eval-mode batch_norm under create_graph: the running statistics of the forward call, even when a training
    step moves the buffers before the backward."""
    x, w, b, rm, rv = _data((6, 3, 4, 5), (3,))

    def second_order(m, rm, rv):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = m.batch_norm(xs, rm, rv, ws, b, False)
        if m is nt:
            nt.batch_norm(torch.randn(6, 3, 4, 5, dtype=torch.float64), rm, rv, training=True)  # moves rm, rv
        first = torch.autograd.grad(y.pow(3).sum(), (xs, ws), create_graph=True)
        return first + torch.autograd.grad(sum(g.pow(2).sum() for g in first), (xs, ws))

    for g, r in zip(second_order(nt, rm.clone(), rv.clone()), second_order(F, rm.clone(), rv.clone())):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
