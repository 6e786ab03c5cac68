"""Address kernels (normkit.contract): the NCHW kernels taking memory by address, which normkit.torch's eager path
calls on the inputs its checks accepted. The kit runs them on the NCHW cases; here: the registry's declarations and
look-up, the kit catching a wrong one, the Cython kernels' own argument checks, and the torch frontend using them
exactly where it may, with the array kernels' results."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import normkit
from normkit import Backend, reference, registry, testing
from normkit.contract import ADDRESS, DIRECTIONS, SPECS, with_addresses
from normkit.registry import runtime_module

cython_backend = pytest.importorskip("normkit_kernels.cython")
cython_kernels = pytest.importorskip("normkit_kernels.cython.kernels")
torch = pytest.importorskip("torch")
nt = pytest.importorskip("normkit.torch")

CYTHON = cython_kernels.KERNELS


@pytest.fixture
def register():
    names = []

    def _register(backend):
        normkit.register_backend(backend, replace=True)
        names.append(backend.name)
        return backend.name

    yield _register
    for name in names:
        normkit.unregister_backend(name)


def test_the_kit_checks_what_a_forward_address_kernel_returns(register):
    """The largest |mean| * rstd over the sets (normkit.torch decides by it whether backward recentres float32
    data): a kernel returning a wrong one fails the cases it returns it in; one returning None passes."""
    cython_ln = CYTHON[("layernorm", "forward", "float32", ADDRESS)]

    def says(value):
        def kernel(*args):
            cython_ln(*args)
            return value
        return kernel

    table = dict(reference.KERNELS)
    for name, value in (("offset_zero", 0.0), ("offset_none", None)):
        table[("layernorm", "forward", "float32", ADDRESS)] = says(value)
        register(Backend(name, runtime_module(table), kernels={"layernorm": ("forward",)}, dtypes=("float32",),
                         addresses={"layernorm": ("forward",)}))
    report = testing.check_backend("offset_zero")
    assert report and {f.check for f in report} == {"returned offset"}
    assert all("by address" in f.case for f in report)
    assert "the forward address kernel returned 0.0, where the largest |mean| * rstd over the sets is" in \
        report[0].message
    assert not testing.check_backend("offset_none")
    assert not testing.check_backend("cython", ops=["layernorm", "groupnorm", "batchnorm", "instancenorm"],
                                     dtypes=["float32"], quick=True)  # (its kernels return it)
    x = np.full((2, 8), 3.0, np.float32) + np.arange(8, dtype=np.float32)
    mean, rstd = np.empty(2, np.float32), np.empty(2, np.float32)
    got = cython_ln(2, 8, x.ctypes.data, 0, 0, 1e-5, np.empty_like(x).ctypes.data, mean, rstd)
    assert got == pytest.approx(float(np.max(np.abs(mean) * rstd)), rel=1e-6)


def test_the_kit_flags_any_other_kernel_that_returns_a_value(register):
    """Kernels return nothing (normkit.contract): an array kernel's value, or a backward address kernel's, is one
    the frontends drop, so the kit names it, and only that."""
    def returning(kernel, value):
        def wrapped(*args):
            kernel(*args)
            return value
        return wrapped

    table = dict(reference.KERNELS)
    table[("layernorm", "forward", "float32")] = returning(reference.KERNELS[("layernorm", "forward", "float32")],
                                                          1.5)
    cython_bwd = CYTHON[("layernorm", "backward", "float32", ADDRESS)]
    table[("layernorm", "backward", "float32", ADDRESS)] = returning(cython_bwd, np.zeros(3))
    table[("layernorm", "backward", "float32")] = reference.KERNELS[("layernorm", "backward", "float32")]
    register(Backend("returns", runtime_module(table), kernels={"layernorm": ("forward", "backward")},
                     dtypes=("float32",), addresses={"layernorm": ("backward",)}))
    report = testing.check_backend("returns")
    assert report and {f.check for f in report} == {"returned a value"}, report.format()
    assert {"by address" in f.case for f in report} == {True, False}
    assert {f.case.split()[1] for f in report} == {"forward", "backward"}, [f.case for f in report]
    assert "the kernel returned 1.5, where kernels write their outputs and return None" in report.format()


def test_a_fused_add_backward_address_kernel_takes_the_shape_of_h(register):
    """add_backward has no x: its kernel shape is h's (the kit crashed on such a declaration, checking nothing).
    An address kernel made of the reference's array kernel conforms."""
    import ctypes

    def at(address, shape):
        return None if address == 0 else np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)),
                                                                shape)

    array_kernel = reference.KERNELS[("layernorm", "add_backward", "float32")]

    calls = []

    def by_address(m, k, dy, dh, h, mean, rstd, weight, dx, dweight, dbias):
        calls.append((m, k))
        array_kernel(at(dy, (m, k)), at(dh, (m, k)), at(h, (m, k)), mean, rstd, at(weight, (k,)), at(dx, (m, k)),
                     at(dweight, (k,)), at(dbias, (k,)))

    table = dict(reference.KERNELS)
    table[("layernorm", "add_backward", "float32", ADDRESS)] = by_address
    register(Backend("add_addr", runtime_module(table), kernels={"layernorm": ("add_forward", "add_backward")},
                     dtypes=("float32",), addresses={"layernorm": ("add_backward",)}))
    report = testing.check_backend("add_addr", quick=True)
    assert not report, report.format()
    assert calls and report.cases_run > len(calls)  # (the array kernels' cases, then the same by address)


def test_the_kit_runs_address_kernels_and_catches_a_wrong_one(register):
    """A backend whose LayerNorm forward address kernel drops the bias: its array kernels conform, the address
    cases fail, named as such."""
    def drop_bias(m, k, x, weight, bias, eps, y, mean, rstd):
        CYTHON[("layernorm", "forward", "float64", ADDRESS)](m, k, x, weight, 0, eps, y, mean, rstd)

    table = dict(reference.KERNELS)
    table[("layernorm", "forward", "float64", ADDRESS)] = drop_bias
    register(Backend("addr_wrong", runtime_module(table), kernels={"layernorm": ("forward",)}, dtypes=("float64",),
                     addresses={"layernorm": ("forward",)}))
    report = testing.check_backend("addr_wrong")
    assert report, "a wrong address kernel passed"
    assert all("by address" in f.case and "bias" in f.case for f in report), report.format()
    assert all("affine=weight+bias" in f.case or "affine=bias " in f.case for f in report), report.format()
    right = dict(table)
    right[("layernorm", "forward", "float64", ADDRESS)] = CYTHON[("layernorm", "forward", "float64", ADDRESS)]
    register(Backend("addr_right", runtime_module(right), kernels={"layernorm": ("forward",)}, dtypes=("float64",),
                     addresses={"layernorm": ("forward",)}))
    report = testing.check_backend("addr_right")
    assert not report, report.format()
    assert report.cases_run == 2 * len(testing.cases("layernorm", "forward", "float64"))


def test_declarations_are_checked(register):
    with pytest.raises(ValueError, match="address kernels for groupnorm direction.*without the NCHW kernel"):
        Backend("bad", runtime_module({}), kernels={"groupnorm": ("forward",)},
                addresses={"groupnorm": ("backward",)}).validate()
    with pytest.raises(ValueError, match="address kernels for groupnorm direction"):
        Backend("bad", runtime_module({}), kernels={"groupnorm": ("forward",)},
                addresses={"groupnorm": "forward"}).validate()
    # declared but not provided: the backend fails to load, with the key named
    name = register(Backend("addr_missing", runtime_module(dict(reference.KERNELS)), kernels=DIRECTIONS,
                            addresses={"layernorm": ("forward",)}))
    with pytest.warns(RuntimeWarning, match="layernorm:forward:float32:addr"):
        with pytest.raises(ValueError):
            registry.lookup("layernorm", "forward", "float32", name)


def test_lookup_address_follows_the_backend_lookup_picks(register):
    assert registry.lookup_address("groupnorm", "forward", "float32", "cython") is \
        CYTHON[("groupnorm", "forward", "float32", ADDRESS)]
    assert registry.lookup_address("groupnorm", "forward", "float32", "reference") is None
    assert registry.lookup_address("groupnorm", "forward", "bfloat16", "cython") is \
        CYTHON[("groupnorm", "forward", "bfloat16", ADDRESS)]
    assert registry.lookup_address("groupnorm", "act_forward", "float32", "cython") is None
    order = normkit.get_backend_order()
    try:
        normkit.set_backend_order(["reference", "cython"])
        # reference is picked, and it has none: never another backend's address kernel
        assert registry.lookup("layernorm", "forward", "float32")[0] == "reference"
        assert registry.lookup_address("layernorm", "forward", "float32") is None
        normkit.set_backend_order(["cython", "reference"])
        assert registry.lookup_address("layernorm", "forward", "float32") is not None
    finally:
        normkit.set_backend_order(order)
    with pytest.raises(ValueError, match="unknown op"):
        registry.lookup_address("pixelnorm", "forward", "float32")


def test_lookup_address_for_channels_last_data_is_the_columns_kernel():
    """layout="nhwc": the NCHW address kernel of a per-channel direction (run on the (N*S, C, 1) columns view),
    None for the other directions."""
    for op, direction in (("batchnorm", "forward"), ("batchnorm", "backward"), ("instancenorm", "forward_infer")):
        assert registry.lookup_address(op, direction, "float32", "cython", "nhwc") is \
            CYTHON[(op, direction, "float32", ADDRESS)]
    for op, direction in (("groupnorm", "forward"), ("instancenorm", "forward"), ("layernorm", "forward")):
        assert CYTHON[(op, direction, "float32", ADDRESS)] is not None
        assert registry.lookup_address(op, direction, "float32", "cython", "nhwc") is None
    assert registry.lookup_address("batchnorm", "forward", "float32", "reference", "nhwc") is None


@pytest.mark.parametrize("key, args, match", [
    (("groupnorm", "forward", "float32"), lambda x, y, s: (1, 6, 5, x, 4, 0, 0, 1e-5, y, s((1, 4)), s((1, 4))),
     "groups 4"),
    (("groupnorm", "forward", "float32"), lambda x, y, s: (1, 6, 5, x, 3, 0, 0, 1e-5, y, s((1, 3)), s((2, 3))),
     "mean and rstd must be"),
    (("groupnorm", "forward", "float32"), lambda x, y, s: (1, 6, 5, 0, 3, 0, 0, 1e-5, y, s((1, 3)), s((1, 3))),
     "NULL"),
    (("layernorm", "forward", "float32"), lambda x, y, s: (3, 10, x, 0, 0, 1e-5, y, s((2,)), s((3,))),
     "mean and rstd must be"),
    (("layernorm", "backward", "float32"), lambda x, y, s: (3, 10, x, 0, s((3,)), s((3,)), 0, y, 0, 0), "NULL"),
    (("rmsnorm", "forward", "float32"), lambda x, y, s: (3, 0, x, 0, 1e-5, y, s((3,))), "bad shape"),
    (("batchnorm", "forward", "float32"), lambda x, y, s: (2, 3, 5, x, 0, 0, 1e-5, y, s((3,)), s((4,))),
     "statistics must be"),
    (("batchnorm", "forward_infer", "float32"), lambda x, y, s: (2, 3, 5, x, 0, 0, 0, x, 1e-5, y), "NULL"),
])
def test_cython_address_kernels_check_what_they_can(key, args, match):
    """Shapes that disagree, and NULL data, are a ValueError, never a write through a bad pointer."""
    x, y = np.zeros(60, np.float32), np.zeros(60, np.float32)
    kernel = CYTHON[(*key, ADDRESS)]
    with pytest.raises(ValueError, match=match):
        kernel(*args(x.ctypes.data, y.ctypes.data, lambda shape: np.zeros(shape, np.float32)))


def test_cython_address_kernels_give_the_array_kernels_bits(rng):
    """The same code behind both: bit-identical outputs, on every declared key (the kit holds them to the
    reference; this holds them to their twins). 16-bit data as the kernels take it: uint16 bit patterns (of
    random values), everything else float32."""
    shapes = {"channel": (3, 5, 7), "instance": (3, 5, 7), "group": (3, 6, 7), "row": (5, 33)}
    keys = sorted(k for k in CYTHON if len(k) == 4 and k[3] == ADDRESS)
    assert {k[2] for k in keys} == {"float32", "float64", "bfloat16", "float16"}
    for op, direction, dtype, _ in keys:
        spec = SPECS[op]
        shape = shapes[spec.sets]
        c = shape[1]
        half = dtype in ("bfloat16", "float16")
        npdt = np.dtype(np.float32 if half else dtype)

        def data(a):  # 16-bit: the bit patterns of float32 values' top halves (bfloat16) or of float16 values
            a = a.astype(np.float32)
            if not half:
                return a.astype(npdt)
            return (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else \
                a.astype(np.float16).view(np.uint16)

        values = {"x": data(rng.standard_normal(shape)), "dy": data(rng.standard_normal(shape)),
                  "weight": rng.standard_normal(c).astype(npdt), "bias": rng.standard_normal(c).astype(npdt),
                  "running_mean": rng.standard_normal(c).astype(npdt),
                  "running_var": rng.uniform(0.5, 2, c).astype(npdt), "eps": 1e-5, "num_groups": 3}
        stat = spec.stat_shape(shape, 3, direction != "forward_infer")
        values["mean"] = rng.standard_normal(stat).astype(npdt)
        values["rstd"] = rng.uniform(0.5, 2, stat).astype(npdt)
        outs = {"y": shape, "dx": shape, "dweight": (c,), "dbias": (c,)}
        if direction == "forward":
            outs |= {"mean": stat, "rstd": stat}
        results = []
        for kernel in (CYTHON[(op, direction, dtype)], with_addresses(spec, direction,
                                                                      CYTHON[(op, direction, dtype, ADDRESS)])):
            named = dict(values) | {k: np.full(s, np.nan, npdt) for k, s in outs.items()}
            if half:
                named |= {k: np.full(outs[k], 0x7FC0, np.uint16) for k in ("y", "dx")}
            kernel(*(named[a] for a in spec.args(direction)))
            results.append({a: named[a] for a in spec.args(direction) if a in outs})
        for name in results[0]:
            assert results[0][name].tobytes() == results[1][name].tobytes(), (op, direction, dtype, name)


@pytest.fixture
def address_spy(register):
    """A backend "aspy": Cython's kernels, recording the keys called."""
    calls = []
    declared = cython_backend.backend

    def wrap(key, kernel):
        @functools.wraps(kernel)  # (keeps on_columns's mark: the columns view by address, as Cython's)
        def call(*args):
            calls.append(key)
            return kernel(*args)

        return call

    table = {key: wrap(key, k) for key, k in CYTHON.items()}
    register(Backend("aspy", runtime_module(table), kernels=declared.kernels, dtypes=declared.dtypes,
                     channels_last=declared.channels_last, channels_last_dtypes=declared.channels_last_dtypes,
                     addresses=declared.addresses))
    return calls


def _run_all(dtype=torch.float32, channels_last=False, activation=None, strided=False, params16=False):
    """Forward and backward of every op on small tensors through backend "aspy", and BatchNorm inference; returns
    the outputs and gradients. ``strided``: the parameters and running statistics as non-contiguous views of the
    same values, which take the array kernels. Parameters are float32 for 16-bit data (autocast's case), or with
    ``params16`` of the data's dtype, which take the array kernels too."""
    g = torch.Generator().manual_seed(0)
    out = []
    x4 = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float32).to(dtype)
    if channels_last:
        x4 = x4.contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(4, 7, 12, generator=g).to(dtype)
    w6, b6 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    w12, b12 = torch.randn(12, generator=g), torch.randn(12, generator=g)
    if dtype == torch.float64 or params16:
        w6, b6, w12, b12 = (p.to(dtype) for p in (w6, b6, w12, b12))
    kw = {"backend": "aspy"}
    view = (lambda p: torch.stack([p, p], 1)[:, 0]) if strided else (lambda p: p)  # noqa: E731
    act = {} if activation is None else {"activation": activation}
    cases = [
        (x4, (w6, b6), lambda x, w, b: nt.group_norm(x, 3, w, b, **kw, **act)),
        (x4, (w6, b6), lambda x, w, b: nt.batch_norm(x, None, None, w, b, True, **kw, **act)),
        (x4, (w6, b6), lambda x, w, b: nt.instance_norm(x, None, None, w, b, **kw, **act)),
        (x3, (w12, b12), lambda x, w, b: nt.layer_norm(x, (12,), w, b, **kw, **act)),
    ]
    if activation is None:
        cases.append((x3, (w12,), lambda x, w: nt.rms_norm(x, (12,), w, **kw)))
    for x, params, f in cases:
        leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
        y = f(leaves[0], *map(view, leaves[1:]))
        y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
        out.extend([y.detach(), *(t.grad for t in leaves)])
    rm, rv = torch.randn(6, generator=g).to(w6.dtype), torch.rand(6, generator=g).to(w6.dtype) + 0.5
    out.append(nt.batch_norm(x4, view(rm), view(rv), view(w6), view(b6), False, **kw, **act))
    return out


def test_torch_goes_by_address_exactly_where_it_may(address_spy):
    addr = lambda: sorted({k[:2] for k in address_spy if k[-1] == ADDRESS})  # noqa: E731
    everything = [("batchnorm", "backward"), ("batchnorm", "forward"), ("batchnorm", "forward_infer"),
                  ("groupnorm", "backward"), ("groupnorm", "forward"), ("instancenorm", "backward"),
                  ("instancenorm", "forward"), ("layernorm", "backward"), ("layernorm", "forward"),
                  ("rmsnorm", "backward"), ("rmsnorm", "forward")]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # 16-bit data with float32 parameters too
        address_spy.clear()
        _run_all(dtype)
        assert addr() == everything, dtype
        assert not [k for k in address_spy if k[-1] != ADDRESS], dtype  # nothing else was needed
    for kwargs in ({"dtype": torch.bfloat16, "params16": True}, {"activation": "relu"},
                   {"dtype": torch.bfloat16, "params16": True, "channels_last": True}):
        address_spy.clear()
        _run_all(**kwargs)
        assert address_spy and not addr(), kwargs  # the array kernels, as before
    address_spy.clear()
    _run_all(strided=True)
    assert address_spy and not addr()
    address_spy.clear()
    _run_all(channels_last=True)  # BatchNorm on the columns view; GroupNorm / InstanceNorm by their own kernels
    assert addr() == [("batchnorm", "backward"), ("batchnorm", "forward"), ("batchnorm", "forward_infer"),
                      ("layernorm", "backward"), ("layernorm", "forward"), ("rmsnorm", "backward"),
                      ("rmsnorm", "forward")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_by_address_gives_the_array_kernels_results(address_spy, dtype, channels_last):
    """The same values through the address kernels and through the array ones (parameters given as strided views):
    bit-identical outputs and gradients, in the input's memory format (16-bit data: float32 parameters and their
    gradients)."""
    by_address = _run_all(dtype, channels_last)
    assert any(k[-1] == ADDRESS for k in address_spy)
    address_spy.clear()
    by_arrays = _run_all(dtype, channels_last, strided=True)
    assert address_spy and not any(k[-1] == ADDRESS for k in address_spy)
    assert len(by_address) == len(by_arrays) == 20
    for i, (a, b) in enumerate(zip(by_address, by_arrays)):
        assert a.dtype == b.dtype and a.dtype in (dtype, torch.float32) and a.stride() == b.stride(), i
        if a.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16: compare the bit patterns
            a, b = a.view(torch.int16), b.view(torch.int16)
        assert a.numpy().tobytes() == b.numpy().tobytes(), i
    if channels_last:  # y and dx of the channel ops stay channels-last
        assert by_address[4].is_contiguous(memory_format=torch.channels_last) and not by_address[4].is_contiguous()
        assert by_address[5].is_contiguous(memory_format=torch.channels_last) and not by_address[5].is_contiguous()


def test_negative_views_are_not_read_by_address():
    """A tensor with the negative bit (torch._neg_view) holds its values' negatives in memory: the calls that
    would go by address take the checked path, which reads the values."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 4, 5, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g)
    F = torch.nn.functional
    neg = torch._neg_view
    assert neg(x).is_neg() and neg(x).is_contiguous()
    torch.testing.assert_close(nt.layer_norm(neg(x), (5,), w, b), F.layer_norm(-x, (5,), w, b))
    torch.testing.assert_close(nt.layer_norm(x, (5,), neg(w), b), F.layer_norm(x, (5,), -w, b))
    torch.testing.assert_close(nt.rms_norm(x, (5,), neg(w)), F.rms_norm(x, (5,), -w))
    torch.testing.assert_close(nt.group_norm(neg(x), 2, neg(w[:4]), b[:4]), F.group_norm(-x, 2, -w[:4], b[:4]))
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    torch.testing.assert_close(nt.batch_norm(x, neg(rm), rv, None, None, False),
                               F.batch_norm(x, -rm, rv, None, None, False))
    x4 = torch.randn(2, 4, 3, 5, generator=g).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nt.batch_norm(neg(x4), rm, rv, w[:4], b[:4], False),
                               F.batch_norm(-x4, rm, rv, w[:4], b[:4], False))
    torch.testing.assert_close(nt.batch_norm(x4, neg(rm), rv, None, None, False),
                               F.batch_norm(x4, -rm, rv, None, None, False))
    dy = torch.randn(x.shape, generator=g)
    xg = neg(x).requires_grad_()  # a leaf neg view: its gradient too
    nt.batch_norm(xg, None, None, w[:4], b[:4], True).backward(dy)
    xr = (-x).requires_grad_()
    F.batch_norm(xr, None, None, w[:4], b[:4], True).backward(dy)
    torch.testing.assert_close(xg.grad, xr.grad)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()  # a negative grad_output
    nt.layer_norm(xg, (5,), w, b).backward(neg(dy))
    F.layer_norm(xr, (5,), w, b).backward(-dy)
    torch.testing.assert_close(xg.grad, xr.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_negative_views(dtype):
    """16-bit negative views as input or grad_output give what the same values in plain memory give: the checked
    path views their bits only once resolved (torch cannot view a negative tensor as another dtype; that error
    reached the user)."""
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(2, 4, 3, 5, generator=g).to(dtype), torch.randn(2, 4, 3, 5, generator=g).to(dtype)
    w = torch.randn(5, generator=g)
    neg = torch._neg_view
    for f in (lambda t: nt.layer_norm(t, (5,), w), lambda t: nt.rms_norm(t, (5,), w), lambda t: nt.group_norm(t, 2),
              lambda t: nt.batch_norm(t, None, None, training=True)):
        assert torch.equal(f(neg(x)), f(-x))
    grads = []
    for d in (neg(dy), -dy):
        xg = x.clone().requires_grad_()
        nt.instance_norm(xg).backward(d)
        grads.append(xg.grad)
    assert torch.equal(*grads)


def test_list_shows_the_address_kernels():
    from click.testing import CliRunner

    from normkit.cli import main

    listing = CliRunner().invoke(main, ["list"]).output
    assert "batchnorm by address (bfloat16, float16, float32, float64): backward, forward, forward_infer" in listing
    assert "rmsnorm by address (bfloat16, float16, float32, float64): backward, forward" in listing
    assert listing.count(" by address (") == 5  # cython's only


def _misaligned(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` in an array of ``dtype`` one byte into a buffer: its address is not a multiple of the element
    size (``np.frombuffer(..., offset=1)``)."""
    data = values.astype(dtype).tobytes()
    return np.frombuffer(bytearray(b"\0" + data), dtype, offset=1).reshape(values.shape)


def test_misaligned_data_reaches_kernels_as_an_aligned_copy(register):
    """Views of a byte buffer at an odd offset went to the kernels as they were (NumPy keeps them; torch's
    data_ptr() of one is odd), which compiled kernels may not read floats from; they are copied first, by both
    frontends, with the results of aligned data."""
    offsets = []

    def recording(op, direction):
        kernel = reference.KERNELS[(op, direction, "float32")]

        def run(*args):
            offsets.extend(a.ctypes.data % a.itemsize for a in args if isinstance(a, np.ndarray))
            kernel(*args)
        return run

    table = {(op, d, "float32"): recording(op, d) for op in ("layernorm", "batchnorm") for d in SPECS[op].directions}
    name = register(Backend("recorder", runtime_module(table), kernels={"layernorm": ("forward", "backward"),
                                                                       "batchnorm": DIRECTIONS["batchnorm"]},
                            dtypes=("float32",)))
    rng = np.random.default_rng(0)
    x, dy, w = rng.standard_normal((4, 6, 5)), rng.standard_normal((4, 6, 5)), rng.standard_normal(6)
    ln, bn = normkit.get("layernorm"), normkit.get("batchnorm")
    for a in (x, dy, w):
        assert not _misaligned(a, np.float32).flags.aligned
    y, saved = ln.forward(_misaligned(x, np.float32), (5,), backend=name)
    grads = ln.backward(_misaligned(dy, np.float32), _misaligned(x, np.float32), saved, (5,), backend=name)
    y_ref, saved_ref = ln.forward(x.astype(np.float32), (5,), backend=name)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(grads[0], ln.backward(dy.astype(np.float32), x.astype(np.float32), saved_ref, (5,),
                                                        backend=name)[0])
    yb = bn(_misaligned(x, np.float32), weight=_misaligned(w, np.float32), training=True, backend=name)
    np.testing.assert_array_equal(yb, bn(x.astype(np.float32), weight=w.astype(np.float32), training=True,
                                         backend=name))

    def tensor(a):
        t = torch.frombuffer(bytearray(b"\0" + a.astype(np.float32).tobytes()), dtype=torch.float32, offset=1,
                             count=a.size).view(a.shape)
        assert t.data_ptr() % 4
        return t

    for fn in (lambda x, w: nt.layer_norm(x, (5,), w[:5], None, backend=name),
               lambda x, w: nt.batch_norm(x, None, None, w, None, True, backend=name)):
        xt, wt = tensor(x).requires_grad_(), tensor(w).requires_grad_()
        out = fn(xt, wt)
        out.backward(tensor(dy))
        xc, wc = (torch.from_numpy(a.astype(np.float32)).requires_grad_() for a in (x, w))
        expected = fn(xc, wc)
        expected.backward(torch.from_numpy(dy.astype(np.float32)))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(xt.grad, xc.grad, rtol=0, atol=0)
        torch.testing.assert_close(wt.grad, wc.grad, rtol=0, atol=0)
    assert offsets and not any(offsets)
