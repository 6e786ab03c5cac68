"""RMSNorm and the fused residual add of the row ops (add_layer_norm, add_rms_norm): every built-in backend's kernels
against the float64 reference on awkward shapes and data, the PyTorch frontend against torch's own ops and
autograd, conversion of nn.RMSNorm and of a model's own RMSNorm class, and clear errors. (The op-table tests in
test_backends.py, test_reference.py and the conformance kit cover rmsnorm's plain directions as well.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import BACKENDS, assert_close

import normkit
import normkit.torch as nt
from normkit import reference
from normkit.registry import Backend, runtime_module

F = torch.nn.functional
ROW_OPS = ("layernorm", "rmsnorm")


def params(op, k, dtype, rng, affine):
    w = (1 + 0.5 * rng.standard_normal(k)).astype(dtype) if affine != "none" else None
    b = (0.5 * rng.standard_normal(k)).astype(dtype) if affine == "both" and op == "layernorm" else None
    return ({"weight": w, "bias": b} if op == "layernorm" else {"weight": w})


def add_pass(op, x, r, dy, dh, kw, backend):
    """Fused forward and backward: every output, by name."""
    nk = normkit.get(op)
    y, h, saved = nk.add_forward(x, r, (x.shape[-1],), **kw, backend=backend)
    dx, dw, db = nk.add_backward(dy, dh, h, saved, (x.shape[-1],), **kw, backend=backend)
    return {"y": y, "h": h, "mean": saved.mean, "rstd": saved.rstd, "dx": dx, "dweight": dw, "dbias": db}


def compare(got, want, dtype, what):
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, f"{what}: {name} should be None"
            continue
        direction = "backward" if name in ("dx", "dweight", "dbias") else "forward"
        assert_close(got[name], expected, dtype, direction, what=f"{what} {name}")


@st.composite
def row_cases(draw):
    # K=1, M=1, K not a multiple of any vector width, K across the 16-value blocks of the AVX sums
    return dict(m=draw(st.sampled_from([1, 2, 3, 17, 40])), k=draw(st.sampled_from([1, 2, 7, 16, 33, 100, 301])),
                dtype=draw(st.sampled_from(["float32", "float64"])),
                affine=draw(st.sampled_from(["none", "weight", "both"])), dh=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e15])), seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@given(case=row_cases())
def test_add_forms_match_reference(backend, op, case):
    rng = np.random.default_rng(case["seed"])
    shape, dt = (case["m"], case["k"]), case["dtype"]
    x = (rng.standard_normal(shape) * case["scale"]).astype(dt)
    r = (rng.standard_normal(shape) * case["scale"]).astype(dt)
    dy, dh = rng.standard_normal(shape).astype(dt), rng.standard_normal(shape).astype(dt) if case["dh"] else None
    kw = params(op, case["k"], dt, rng, case["affine"])
    got = add_pass(op, x, r, dy, dh, kw, backend)
    want = add_pass(op, x, r, dy, dh, kw, "reference")
    np.testing.assert_array_equal(got["h"], x + r)  # h is the sum rounded once, as x + r in the dtype
    compare(got, want, dt, f"{op} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=row_cases())
def test_rmsnorm_matches_reference(backend, case):
    rng = np.random.default_rng(case["seed"])
    shape, dt = (case["m"], case["k"]), case["dtype"]
    x = (rng.standard_normal(shape) * case["scale"]).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    kw = params("rmsnorm", case["k"], dt, rng, case["affine"])
    nk = normkit.get("rms")
    out = {}
    for be in (backend, "reference"):
        y, saved = nk.forward(x, (case["k"],), **kw, eps=1e-6, backend=be)
        dx, dw, db = nk.backward(dy, x, saved, (case["k"],), **kw, eps=1e-6, backend=be)
        assert saved.mean is None and db is None
        out[be] = {"y": y, "rstd": saved.rstd, "dx": dx, "dweight": dw}
    compare(out[backend], out["reference"], dt, str(case))


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rms_of_zero_rows(backend, dtype, rng):
    """rms of a zero row: rstd = 1/sqrt(eps), y = 0, and the gradient is dy * weight * rstd."""
    x = np.zeros((5, 37), dtype)
    x[2] = rng.standard_normal(37)  # one ordinary row among zero rows
    w = rng.standard_normal(37).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    eps = 1e-5
    nk = normkit.get("rmsnorm")
    y, saved = nk.forward(x, (37,), w, eps, backend=backend)
    zero = [0, 1, 3, 4]
    np.testing.assert_array_equal(y[zero], 0.0)
    np.testing.assert_allclose(saved.rstd[zero], 1 / np.sqrt(eps), rtol=np.finfo(dtype).eps)
    dx, dw, _ = nk.backward(dy, x, saved, (37,), w, eps, backend=backend)
    np.testing.assert_allclose(dx[zero], (dy * w)[zero] / np.sqrt(eps), rtol=8 * np.finfo(dtype).eps)
    assert np.isfinite(dx).all() and np.isfinite(dw).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_poisons_its_row_only(backend, op, bad, rng):
    x = rng.standard_normal((6, 50)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    r[3, 7] = bad  # in the residual: h holds it, and its row of y is NaN, as in the reference
    dy, dh = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(x.shape).astype(np.float32)
    kw = params(op, 50, np.float32, rng, "both")
    got = add_pass(op, x, r, dy, dh, kw, backend)
    want = add_pass(op, x, r, dy, dh, kw, "reference")
    assert np.isnan(got["y"][3]).any() and np.isfinite(np.delete(got["y"], 3, axis=0)).all()
    np.testing.assert_array_equal(np.isnan(got["y"]), np.isnan(want["y"]))
    np.testing.assert_array_equal(np.isnan(got["dx"]), np.isnan(want["dx"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("shape", [(2051, 300), (3, 70001), (5, 270001), (8, 20000)], ids=str)
def test_large_shapes_and_thread_count_independent(backend, op, shape, rng):
    """Enough rows for several parameter-gradient blocks (and a short last one), or rows over 65536 values in
    fewer than four blocks, or (Cython) up to 16 rows over 16384 values (the backward then shares each row among
    the threads by pieces); identical for 1 and 2 threads."""
    k = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy, dh = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(x.shape).astype(np.float32)
    kw = params(op, k, np.float32, rng, "both")
    threads = normkit.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            normkit.set_num_threads(min(n, threads))
            runs.append(add_pass(op, x, r, dy, dh, kw, backend))
            y, saved = normkit.get(op).forward(x, (k,), **kw, backend=backend)
            runs[-1].update(plain_y=y, plain_dx=normkit.get(op).backward(dy, x, saved, (k,), **kw,
                                                                             backend=backend)[0])
    finally:
        normkit.set_num_threads(threads)
    for other in runs[1:]:
        for name, value in runs[0].items():
            if value is not None:
                np.testing.assert_array_equal(other[name], value, err_msg=f"{op} {name} differs between runs")
    outputs = ("y", "h", "dx", "dweight", "dbias")
    compare({name: runs[0][name] for name in outputs},
            {name: v for name, v in add_pass(op, x, r, dy, dh, kw, "reference").items() if name in outputs},
            "float32", op)


def test_inputs_not_mutated(rng):
    for backend in BACKENDS:
        for op in ROW_OPS:
            x, r, dy, dh = (rng.standard_normal((4, 20)).astype(np.float32) for _ in range(4))
            kw = params(op, 20, np.float32, rng, "both")
            before = [a.copy() for a in (x, r, dy, dh, *kw.values())]
            add_pass(op, x, r, dy, dh, kw, backend)
            for a, b in zip((x, r, dy, dh, *kw.values()), before):
                np.testing.assert_array_equal(a, b)


def test_backend_without_fused_kernels_composes(rng):
    """A backend that has a row op's plain kernels only: the add forms run its kernels with a separate add (not
    another backend's fused kernel), and give the same results."""
    plain = {(op, d, "float32"): reference.KERNELS[(op, d, "float32")]
             for op in ROW_OPS for d in ("forward", "backward")}
    normkit.register_backend(Backend("plainrow", runtime_module(plain), kernels={op: ("forward", "backward")
                                                                                  for op in ROW_OPS},
                                     dtypes=("float32",)))
    try:
        for op in ROW_OPS:
            x, r, dy, dh = (rng.standard_normal((3, 9)).astype(np.float32) for _ in range(4))
            kw = params(op, 9, np.float32, rng, "both")
            got = add_pass(op, x, r, dy, dh, kw, "plainrow")
            compare(got, add_pass(op, x, r, dy, dh, kw, "reference"), "float32", op)
            _, _, saved = normkit.get(op).add_forward(x, r, (9,), **kw, backend="plainrow")
            assert saved.backend == "plainrow"
            y, h = nt.add_rms_norm(torch.from_numpy(x), torch.from_numpy(r), (9,), backend="plainrow")
            torch.testing.assert_close(y, F.rms_norm(torch.from_numpy(x + r), (9,)))
    finally:
        normkit.unregister_backend("plainrow")


# --- clear errors ------------------------------------------------------------------------------------------------

def test_errors(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    rms, ln = normkit.get("rms"), normkit.get("ln")
    with pytest.raises(ValueError, match=r"rmsnorm: residual must have the input's shape \(4, 8\), got \(4, 7\)"):
        normkit.add_rms_norm(x, x[:, :7].copy(), (8,))
    with pytest.raises(TypeError, match="layernorm: residual must have the input's dtype float32, got float64"):
        normkit.add_layer_norm(x, x.astype(np.float64), (8,))
    with pytest.raises(ValueError, match=r"rmsnorm: weight must have shape \(8,\), got \(7,\)"):
        rms.forward(x, (8,), np.ones(7, np.float32))
    _, ln_saved = ln.forward(x, (8,))
    with pytest.raises(TypeError, match="rmsnorm: saved holds a mean"):
        rms.backward(x, x, ln_saved, (8,))
    y, h, saved = rms.add_forward(x, x, (8,))
    with pytest.raises(ValueError, match=r"rmsnorm: grad_h must have the input's shape"):
        rms.add_backward(x, x[:2].copy(), h, saved, (8,))
    with pytest.raises(ValueError, match="rmsnorm: eps must be"):
        rms.forward(x, (8,), eps=-1.0)
    _, saved = rms.forward(x, (8,))
    with pytest.raises(ValueError, match=r"rmsnorm: saved statistics have shape \(4,\), expected \(3,\)"):
        rms.backward(x[:3], x[:3], saved, (8,))
    for shape in ((7.9,), [8.0], (2, 4.5)):  # torch refuses them too; int() would have truncated them
        with pytest.raises(TypeError, match="normalized_shape must be an int or a tuple of ints"):
            rms(x, shape)
        with pytest.raises(TypeError, match="normalized_shape must be an int or a tuple of ints"):
            ln(x, shape)
    with pytest.raises(ValueError, match=r"rmsnorm: residual must have the input's shape \(4, 8\) and dtype"):
        nt.add_rms_norm(torch.from_numpy(x), torch.zeros(4, 7), (8,))
    with pytest.raises(TypeError, match="rmsnorm: residual must be a torch.Tensor"):
        nt.add_rms_norm(torch.from_numpy(x), x, (8,))
    with pytest.raises(TypeError, match="rmsnorm: input must be float32, float64, bfloat16 or float16, got dtype int64"):
        nt.rms_norm(torch.zeros(2, 3, dtype=torch.int64), (3,))


# --- PyTorch -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,normalized", [((6, 33), (33,)), ((2, 3, 4, 5), (4, 5)), ((1, 1), (1,))], ids=str)
def test_rms_norm_matches_torch(dtype, shape, normalized):
    """Forward and autograd against torch.nn.functional.rms_norm, including its default eps (the dtype's)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3).requires_grad_()
    w = torch.randn(normalized, generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=dtype)
    for eps in (None, 1e-3):
        ours, theirs = nt.rms_norm(x, normalized, w, eps), F.rms_norm(x, normalized, w, eps)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, theirs, **tol)
        for a, b in zip(torch.autograd.grad(ours, (x, w), dy), torch.autograd.grad(theirs, (x, w), dy)):
            torch.testing.assert_close(a, b, **{k: 10 * v for k, v in tol.items()})
    assert normkit.get("rms_norm")(x.detach(), normalized).shape == x.shape  # a tensor goes to normkit.torch


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm, float32 weight
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_default_eps_of_16_bit_data_is_float32s(dtype):
    """eps=None on 16-bit data is float32's machine epsilon, as torch computes it (ATen takes its opmath type's),
    not the dtype's: on rows of small values the two give outputs that differ by a factor of 7 (bfloat16)."""
    x = torch.tensor([[0.01, -0.02, 0.015, 0.0], [3.0, -1.0, 0.5, 2.0]], dtype=dtype)
    want = F.rms_norm(x, (4,))
    assert not torch.equal(want, F.rms_norm(x, (4,), eps=torch.finfo(dtype).eps))  # the case tells them apart
    torch.testing.assert_close(nt.rms_norm(x, (4,)), want, rtol=0, atol=0)
    torch.testing.assert_close(nt.convert(torch.nn.RMSNorm(4).to(dtype))(x), want, rtol=0, atol=0)
    torch.testing.assert_close(nt.add_rms_norm(x, torch.zeros_like(x), (4,))[0], want, rtol=0, atol=0)
    if dtype == torch.float16:
        a = x.numpy()
    else:
        a = x.view(torch.int16).numpy().view(pytest.importorskip("ml_dtypes").bfloat16)
    np.testing.assert_array_equal(normkit.get("rms")(a, (4,)).view(np.int16), want.view(torch.int16).numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_forms_gradcheck_and_match_composition(backend):
    """Gradients to x and residual (and weight, bias) from y, from h, and from both, against torch's autograd of
    x + r followed by the norm; gradcheck in float64."""
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    forms = {
        "layernorm": (lambda x, r, w, b: nt.add_layer_norm(x, r, (12,), w, b, 1e-5, backend=backend),
                      lambda x, r, w, b: (F.layer_norm(x + r, (12,), w, b, 1e-5), x + r)),
        "rmsnorm": (lambda x, r, w, b: nt.add_rms_norm(x, r, (12,), w, 1e-5, backend=backend),
                    lambda x, r, w, b: (F.rms_norm(x + r, (12,), w, 1e-5), x + r)),
    }
    for op, (ours, theirs) in forms.items():
        inputs = (x, r, w, b) if op == "layernorm" else (x, r, w)
        fn = (lambda *a: ours(*a, *((None,) if op == "rmsnorm" else ())))
        assert torch.autograd.gradcheck(fn, inputs)
        for use in ("y", "h", "both"):
            def loss(f, use=use):
                y, h = f(x, r, w, b)
                return {"y": (y * y).sum(), "h": (h.sin()).sum(), "both": (y * h).sum()}[use]
            a = torch.autograd.grad(loss(ours), inputs, allow_unused=True)
            e = torch.autograd.grad(loss(theirs), inputs, allow_unused=True)
            for ga, ge in zip(a, e):
                if ge is None:
                    assert ga is None or not ga.any()
                else:
                    torch.testing.assert_close(ga, ge)


def test_add_forms_without_grad_and_compiled():
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    w = torch.randn(16)
    y, h = nt.add_rms_norm(x, r, (16,), w)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, F.rms_norm(x + r, (16,), w))
    compiled = torch.compile(lambda x, r: nt.add_layer_norm(x, r, (16,), w, None), fullgraph=True)
    y, h = compiled(x, r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,), w, None))


def test_dynamic_hidden_size_compiles_once():
    """Under dynamic shapes the checks of normalized_shape took each size with operator.index, which fixed a
    symbolic size to its value: a graph per hidden size (torch's F: one), and mark_dynamic / torch.export with a
    Dim on it refused. The values stay the eager ones."""
    from torch._dynamo.testing import CompileCounter

    for fn in (lambda x, r, w: nt.layer_norm(x, (x.shape[-1],), w, w), lambda x, r, w: nt.rms_norm(x, x.shape[-1:], w),
               lambda x, r, w: nt.add_layer_norm(x, r, x.shape[-1:], w, None)[0],
               lambda x, r, w: nt.add_rms_norm(x, r, (x.shape[-1],), w)[1]):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
        for hidden in (8, 12, 20):
            x, r, w = torch.randn(3, hidden), torch.randn(3, hidden), torch.rand(hidden) + 0.5
            torch.testing.assert_close(compiled(x, r, w), fn(x, r, w))
        assert counter.frame_count == 1
    torch._dynamo.reset()


def test_rmsnorm_module_and_convert():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8), torch.nn.RMSNorm([2, 4], eps=1e-3,
                                                                                              elementwise_affine=False))
    model[2] = torch.nn.Sequential(torch.nn.Unflatten(1, (2, 4)), model[2])
    x = torch.randn(5, 8)
    want = model(x)
    nt.convert(model, backend="numba")
    assert type(model[1]) is nt.RMSNorm and isinstance(model[1], torch.nn.RMSNorm) and model[1].backend == "numba"
    torch.testing.assert_close(model(x), want)
    nt.revert(model)
    assert type(model[1]) is torch.nn.RMSNorm
    m = nt.RMSNorm(8)
    torch.testing.assert_close(m(x), F.rms_norm(x, (8,), m.weight))


class ToyRMSNorm(torch.nn.Module):
    """A model's own RMSNorm in LlamaRMSNorm's style: computes in float32, casts back, then the weight."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


LLAMA = nt.RMSNormSemantics(eps="variance_epsilon", compute_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_convert_declared_rmsnorm_class(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), ToyRMSNorm(16)).to(dtype)
    x = torch.randn(3, 16, dtype=dtype, requires_grad=True)
    want = model(x)
    want_grads = torch.autograd.grad(want.sum(), (x, model[1].weight))
    assert nt.convert(model) is model and type(model[1]) is ToyRMSNorm  # only when opted in
    nt.convert(model, rmsnorm_classes={ToyRMSNorm: LLAMA})
    assert isinstance(model[1], ToyRMSNorm) and type(model[1]) is not ToyRMSNorm
    got = model(x)
    got_grads = torch.autograd.grad(got.sum(), (x, model[1].weight))
    # both compute in float32 (float64 input included), and round in different places
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)
    nt.revert(model)
    assert type(model[1]) is ToyRMSNorm


def test_declared_rmsnorm_class_pickles_and_copies():
    """The declared class is made at run time: a whole model pickles (torch.save / torch.load) and deep-copies,
    and comes back converted, with its own parameters, computing the same."""
    import io

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), ToyRMSNorm(16))
    nt.convert(model, rmsnorm_classes={ToyRMSNorm: LLAMA})
    x = torch.randn(3, 16)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(twin[1]) is type(model[1]) and twin[1].weight is not model[1].weight
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        nt.revert(twin)
        assert type(twin[1]) is ToyRMSNorm and type(model[1]) is not ToyRMSNorm


class ToyT5LayerNorm(torch.nn.Module):
    """transformers' T5LayerNorm (diffusers' RMSNorm the same with a weight): the normalized value is cast to the
    weight's dtype only when that is 16-bit."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


T5 = nt.RMSNormSemantics(eps="variance_epsilon", compute_dtype=torch.float32, cast_to="weight")


def _t5_style_classes():
    """The toy, and transformers' and diffusers' own classes where installed, as (class, semantics, make)."""
    found = [(ToyT5LayerNorm, T5, ToyT5LayerNorm)]
    try:
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        found.append((T5LayerNorm, T5, lambda h: T5LayerNorm(h, eps=1e-6)))
    except ImportError:
        pass
    try:
        from diffusers.models.normalization import RMSNorm
        found.append((RMSNorm, nt.RMSNormSemantics(compute_dtype=torch.float32, cast_to="weight"),
                      lambda h: RMSNorm(h, eps=1e-6)))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                              (torch.float32, torch.float64)])
def test_convert_declared_rmsnorm_cast_to_weight(x_dtype, w_dtype):
    """T5LayerNorm and diffusers' RMSNorm: a bfloat16 input with a float32 weight gives a float32 output (type
    promotion), which cast_to="input" could not say; the same dtype and values as the class's own forward."""
    for cls, semantics, make in _t5_style_classes():
        torch.manual_seed(0)
        module = make(16)
        with torch.no_grad():
            module.weight.copy_(1 + 0.1 * torch.randn(16))
        module.to(w_dtype)
        x = (3 + torch.randn(3, 5, 16)).to(x_dtype).requires_grad_()
        want = module(x)
        want_grads = torch.autograd.grad((want.float() * torch.linspace(-1, 1, 16)).sum(), (x, module.weight))
        nt.convert(module, rmsnorm_classes={cls: semantics})
        assert type(module) is not cls
        got = module(x)
        got_grads = torch.autograd.grad((got.float() * torch.linspace(-1, 1, 16)).sum(), (x, module.weight))
        assert got.dtype == want.dtype, cls.__name__
        half = {x_dtype, w_dtype} & {torch.bfloat16, torch.float16}
        tol = dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)


def test_rmsnorm_semantics_errors():
    with pytest.raises(ValueError, match="RMSNormSemantics: cast_to must be 'input' or 'weight', got 'output'"):
        nt.RMSNormSemantics(cast_to="output")
    with pytest.raises(TypeError, match="RMSNormSemantics: compute_dtype must be None or a floating torch.dtype, "
                                        "got 'float32'"):
        nt.RMSNormSemantics(compute_dtype="float32")
    with pytest.raises(ValueError, match="ToyT5LayerNorm has no tensor or None in attribute 'gamma'"):
        nt.convert(ToyT5LayerNorm(4), rmsnorm_classes={ToyT5LayerNorm: nt.RMSNormSemantics(
            eps="variance_epsilon", weight="gamma")})
    module = ToyT5LayerNorm(4)
    module.bias = torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), ToyT5LayerNorm(4), module)
    with pytest.raises(ValueError, match="this ToyT5LayerNorm holds a bias tensor, which RMSNormSemantics does not"):
        nt.convert(model, rmsnorm_classes={ToyT5LayerNorm: T5})
    # refused before anything changed (the layers before the refused one were converted)
    assert [type(m) for m in model] == [torch.nn.LayerNorm, ToyT5LayerNorm, ToyT5LayerNorm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_convert_declared_rmsnorm_instance_without_weight(dtype):
    """diffusers' RMSNorm(elementwise_affine=False) holds weight None: it converts (it was refused) and computes
    the class's own forward, in the input's dtype."""
    normalization = pytest.importorskip("diffusers.models.normalization")
    module = normalization.RMSNorm(16, eps=1e-6, elementwise_affine=False)
    x = (2 + torch.randn(3, 16)).to(dtype)
    want = module(x)
    nt.convert(module, rmsnorm_classes={normalization.RMSNorm: nt.RMSNormSemantics(compute_dtype=torch.float32,
                                                                                   cast_to="weight")})
    got = module(x)
    assert type(module) is not normalization.RMSNorm and got.dtype == want.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


def test_convert_declared_class_errors():
    with pytest.raises(TypeError, match="rmsnorm_classes keys must be torch.nn.Module classes"):
        nt.convert(torch.nn.Linear(2, 2), rmsnorm_classes={int: LLAMA})
    with pytest.raises(TypeError, match=r"rmsnorm_classes\[ToyRMSNorm\] must be an RMSNormSemantics"):
        nt.convert(torch.nn.Linear(2, 2), rmsnorm_classes={ToyRMSNorm: {"eps": "variance_epsilon"}})
    with pytest.raises(ValueError, match="ToyRMSNorm has no number in attribute 'eps'"):
        nt.convert(ToyRMSNorm(4), rmsnorm_classes={ToyRMSNorm: nt.RMSNormSemantics()})


def test_convert_llama_model():
    """A randomly initialized transformers Llama (no weights downloaded): LlamaRMSNorm converted with its
    declared semantics gives the same logits and gradients."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 16))
    want = model(ids).logits
    want_grad = torch.autograd.grad(want.square().mean(), model.model.norm.weight)[0]
    nt.convert(model, rmsnorm_classes={LlamaRMSNorm: LLAMA})
    converted = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(converted) == 5 and all(type(m) is not LlamaRMSNorm for m in converted)
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.square().mean(), model.model.norm.weight)[0], want_grad,
                               rtol=1e-4, atol=1e-6)


# --- bench and check ---------------------------------------------------------------------------------------------

def test_bench_covers_rmsnorm_and_the_add_forms():
    """Small versions of the "transformer" case set: every backend's output agrees with torch's (F.rms_norm, and
    x + r followed by the norm, backward through autograd with gradients for y and h)."""
    from normkit import bench, cases

    small = [cases.Case(op, (6, 5, 16), ln_dims=1, add=add) for op in ROW_OPS for add in (False, True)]
    result = bench.bench(cases=small, backends=list(BACKENDS) + ["reference"], repeat=2)
    rows = [r for r in result.rows if r.kind == "backend"]
    assert {(r.case, r.direction) for r in rows} == {(c.id, d) for c in small for d in ("forward", "backward")}
    assert all(r.check == "ok" for r in rows), [(r.case, r.name, r.check) for r in rows if r.check != "ok"]
    assert {c.op for c in cases.case_set("transformer")} == set(ROW_OPS)


def test_check_covers_rmsnorm_and_the_add_directions():
    import normkit.testing

    for backend in BACKENDS:
        report = normkit.testing.check_backend(backend, ops=ROW_OPS, dtypes=["float32"], quick=True)
        assert not report, report.format()
        assert report.cases_run >= 2 * 4 * 10  # two ops, forward, backward, add_forward, add_backward
