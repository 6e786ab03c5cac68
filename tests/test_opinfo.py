"""PyTorch's own OpInfo samples for the norms, through normkit.torch: the whole input domain torch accepts.

Every sample of ``op_db``'s ``nn.functional.{batch,group,layer,instance,rms}_norm`` (float32 and float64, the dtypes
normkit computes in) is one test: normkit's function and torch's each get their own copy of the sample's tensors
(running statistics are updated in place), and must agree on the output, on every tensor argument after the call
(running statistics; nothing else may change), and on the gradient of a fixed random projection of the output
with respect to every tensor that requires grad. NaN where torch gives NaN counts as equal.

Tolerances are relative to the size of the terms each result is computed from, not to the result itself: a
gradient such as dx of a set of two or three values is a near-cancellation of terms as large as
rstd * |weight| * |dy| (for a set of two values, dx is 0 but for eps), so both sides' rounding of those terms is
what the comparison must allow.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # common_methods_invocations imports it
cmi = pytest.importorskip("torch.testing._internal.common_methods_invocations")
op_db = getattr(cmi, "op_db", None)
if op_db is None:
    pytest.skip("torch.testing._internal.common_methods_invocations has no op_db", allow_module_level=True)

import normkit.torch as nt  # noqa: E402

F = torch.nn.functional

# OpInfo name -> (normkit's function, torch's function whose signature both share)
FUNCTIONS = {
    "nn.functional.batch_norm": (nt.batch_norm, F.batch_norm),
    "nn.functional.group_norm": (nt.group_norm, F.group_norm),
    "nn.functional.layer_norm": (nt.layer_norm, F.layer_norm),
    "nn.functional.instance_norm": (nt.instance_norm, F.instance_norm),
    "nn.functional.rms_norm": (nt.rms_norm, F.rms_norm),
}
DTYPES = (torch.float32, torch.float64)
# error allowed, relative to the magnitude of the terms a result is computed from: ~80 ulps of float32, ~4500 ulps
# of float64 (far below any real error, far above the different order in which two implementations round)
REL = {torch.float32: 1e-5, torch.float64: 1e-12}


def collect_samples():
    """Every (OpInfo, dtype, sample) as a pytest.param with its own id, e.g. ``batch_norm-float32-03-0``
    (op, dtype, index of the sample in the OpInfo's sequence, input shape joined by x).

    ``make_tensor`` draws from torch's global generator: it is seeded here, inside fork_rng so that collecting
    this module leaves the global generator as it found it."""
    params = []
    with torch.random.fork_rng(devices=[]):
        for opinfo in op_db:
            if opinfo.name not in FUNCTIONS:
                continue
            supported = opinfo.supported_dtypes("cpu")  # batch_norm's "without_cudnn" variant: CUDA only
            for dtype in DTYPES:
                if dtype not in supported:
                    continue
                torch.manual_seed(0)
                for i, sample in enumerate(opinfo.sample_inputs("cpu", dtype, requires_grad=True)):
                    name = opinfo.name.rsplit(".", 1)[1] + (f"_{opinfo.variant_test_name}"
                                                            if opinfo.variant_test_name else "")
                    shape = "x".join(map(str, sample.input.shape)) or "scalar"
                    params.append(pytest.param(opinfo.name, dtype, sample,
                                               id=f"{name}-{str(dtype)[6:]}-{i:02d}-{shape}"))
    return params


SAMPLES = collect_samples()


def test_samples_were_collected():
    """The OpInfos are there and none of the four ops is silently missing (the count is in the test ids)."""
    counts = {name: sum(p.values[0] == name for p in SAMPLES) for name in FUNCTIONS}
    assert all(counts.values()), counts


# --- helpers ---------------------------------------------------------------------------------------------------

def _copy(value):
    """A fresh copy of every tensor in a sample's (nested) arguments: leaves that require grad stay leaves."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _max_abs(*tensors) -> float:
    """The largest finite |value| over the tensors (0 for none or empty ones)."""
    best = 0.0
    for t in tensors:
        if t is not None and t.numel():
            t = t.detach().double().abs()
            t = t[torch.isfinite(t)]
            if t.numel():
                best = max(best, float(t.max()))
    return best


def _stats(name: str, p: dict) -> tuple[float, float, float]:
    """(rstd, xhat, u): the largest finite 1/sqrt(var + eps) the op normalizes with, the largest |x - mean| * rstd
    and the largest (|x| + |mean|) * rstd, computed in float64 from the statistics the op uses (the batch's, or the
    running ones in evaluation). rstd and xhat size the terms of y and of the gradients; u sizes the rounding of
    x - mean that every implementation does in its own dtype (large when the variance is small against |x|)."""
    x = p["input"].detach().double()
    eps = float(torch.finfo(p["input"].dtype).eps if p["eps"] is None else p["eps"])  # rms_norm's default: None
    if x.numel() == 0:
        return 0.0, 0.0, 0.0
    if name.endswith("rms_norm"):  # uncentered: the mean is 0 and var is the mean of squares
        shape = p["normalized_shape"]
        sets = x.reshape(*x.shape[:x.dim() - len(shape)], -1)
        rstd = (sets.square().mean(-1, keepdim=True) + eps).rsqrt()
        return _max_abs(rstd), _max_abs(sets * rstd), _max_abs(x) * _max_abs(rstd)
    if name.endswith("layer_norm"):
        shape = p["normalized_shape"]
        sets, dims = x.reshape(*x.shape[:x.dim() - (1 if isinstance(shape, int) else len(shape))], -1), [-1]
    elif name.endswith("group_norm"):
        sets, dims = x.reshape(x.shape[0], p["num_groups"], -1), [-1]
    else:
        sets = x
        batch_stats = p["training"] if "training" in p else p["use_input_stats"]
        if not batch_stats and p["running_var"] is not None:
            view = (1, -1) + (1,) * (x.dim() - 2)
            mean, var = p["running_mean"].double().reshape(view), p["running_var"].double().reshape(view)
            dims = None
        else:  # batch_norm: over N and the spatial dims; instance_norm: the spatial dims
            first = 0 if "training" in p else 2
            dims = [d for d in range(first, x.dim()) if d != 1] if x.dim() > 1 else [0]
    if dims is not None:
        mean, var = sets.mean(dims, keepdim=True), sets.var(dims, unbiased=False, keepdim=True)
    rstd = (var + eps).rsqrt()
    return _max_abs(rstd), _max_abs((sets - mean) * rstd), (_max_abs(x) + _max_abs(mean)) * _max_abs(rstd)


def _assert_close(actual, expected, scale: float, rel: float, what: str):
    """|actual - expected| <= rel * scale elementwise, NaN where expected is NaN (and only there)."""
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=0.0, atol=rel * scale, equal_nan=True,
                               msg=lambda m: f"{what} (tolerance {rel:g} x scale {scale:.3g}): {m}")


def _bind(fn, args, kwargs) -> dict:
    """The call's arguments by parameter name (normkit's functions take torch's parameters, in torch's order)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _run(fn, torch_fn, sample):
    """fn on a fresh copy of the sample's tensors: (output, the copied arguments by name after the call, the
    tensor arguments' values before it)."""
    args, kwargs = _copy((sample.input, *sample.args)), _copy(sample.kwargs)
    named = _bind(torch_fn, args, kwargs)
    before = {k: v.detach().clone() for k, v in named.items() if isinstance(v, torch.Tensor)}
    return fn(*args, **kwargs), named, before


# --- the test --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype,sample", SAMPLES)
def test_opinfo_sample(name, dtype, sample):
    ours_fn, torch_fn = FUNCTIONS[name]
    rel = REL[dtype]
    p = _bind(torch_fn, (sample.input, *sample.args), sample.kwargs)
    rstd, xhat, u = _stats(name, p)
    w = 1.0 if p["weight"] is None else _max_abs(p["weight"])

    y_ref, ref_args, ref_before = _run(torch_fn, torch_fn, sample)
    y, args, _ = _run(ours_fn, torch_fn, sample)

    # forward: y = x * rstd * weight - mean * rstd * weight + bias
    _assert_close(y, y_ref, max(1.0, _max_abs(y_ref), u * w + _max_abs(p.get("bias"))), rel, "output")

    # every tensor argument after the call: running statistics updated alike, nothing else modified. An update
    # (1 - momentum) * running + momentum * batch has terms bounded by |after| + 2 |1 - momentum| |before|.
    momentum = p.get("momentum") or 0.0
    for arg, before in ref_before.items():
        scale = max(1.0, _max_abs(ref_args[arg]) + 2 * abs(1 - momentum) * _max_abs(before))
        _assert_close(args[arg], ref_args[arg], scale, rel, f"{arg} after the call")

    # backward: the gradient of <proj, y> for a fixed random proj (a loss whose gradient is no cancellation
    # residue), wrt every tensor that requires grad; an unused one's gradient (None) is zero. Terms:
    # dbias = sum(dy); dweight = sum(dy * xhat), xhat rounded by u; dx = rstd * weight * (dy - mean(dy)
    # - xhat * mean(dy * xhat)), nearly cancelling for small sets (to 0 but for eps, for a set of two values).
    leaves = [k for k, v in ref_args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not leaves:
        return
    proj = torch.randn(y_ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    dy = _max_abs(proj)
    terms = {"input": dy * rstd * w * max(1.0, xhat * xhat, xhat * u), "weight": dy * max(xhat, u), "bias": dy}
    grads_ref = torch.autograd.grad(y_ref, [ref_args[k] for k in leaves], proj, allow_unused=True)
    grads = torch.autograd.grad(y, [args[k] for k in leaves], proj, allow_unused=True)
    for arg, g, g_ref in zip(leaves, grads, grads_ref):
        g = torch.zeros_like(args[arg]) if g is None else g
        g_ref = torch.zeros_like(ref_args[arg]) if g_ref is None else g_ref
        _assert_close(g, g_ref, max(1.0, _max_abs(g_ref), terms[arg]), rel, f"gradient wrt {arg}")
