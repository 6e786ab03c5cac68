"""normkit.torch.benchmark and normkit.torch.models: the model-level benchmark (torch.nn copy against a converted
copy), its agreement check, its argument errors, and ``normkit bench --model``. No timing assertions."""

from __future__ import annotations

import io
import itertools
import mmap
import statistics

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import normkit.torch as nt  # noqa: E402
from normkit import registry  # noqa: E402
from normkit.cli import main  # noqa: E402
from normkit.torch import model_bench, modules  # noqa: E402
from normkit.torch.model_bench import BenchmarkResult, ModelMismatchError, ModeResult  # noqa: E402
from normkit.torch.models import MODELS  # noqa: E402

nn = torch.nn
QUICK = dict(steps=2, warmup=1)
NORM_CLASS = {"resnet": "BatchNorm2d", "unet": "GroupNorm", "transformer": "LayerNorm", "transformer_rms": "RMSNorm"}


def snapshot(model):
    """Everything benchmark() must leave alone: classes, modes, parameters and buffers (bit for bit)."""
    return ([(name, type(m), m.training, "backend" in vars(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()})


def assert_unchanged(model, before):
    classes, state, grads = snapshot(model)
    assert classes == before[0]
    assert state.keys() == before[1].keys()
    for k, v in state.items():
        assert torch.equal(v, before[1][k]), k
    assert grads == before[2]


def small_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


# --- models ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_models_are_deterministic_and_keep_the_global_random_state(name):
    state = torch.random.get_rng_state()
    (m1, x1), (m2, x2) = MODELS[name](quick=True), MODELS[name](quick=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    m3, _ = MODELS[name](quick=True, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))
    assert m1.training
    assert any(type(m).__name__ == NORM_CLASS[name] for m in m1.modules())
    assert all(type(m) not in modules._TO_TORCH for m in m1.modules())  # torch.nn layers, not normkit's


def test_default_sizes():
    # the shapes the README and earlier measurements use; building the default models is cheap (no forward)
    shapes = {name: [tuple(x.shape) for x in MODELS[name]()[1]] for name in MODELS}
    assert shapes == {"resnet": [(32, 3, 112, 112)], "unet": [(8, 3, 32, 32)], "transformer": [(16, 128)],
                      "transformer_rms": [(16, 128)]}
    layer_norms = [m for m in MODELS["transformer"]()[0].modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == 9 and all(m.normalized_shape == (256,) for m in layer_norms)
    group_norms = [m for m in MODELS["unet"]()[0].modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms and all(m.num_groups == 32 for m in group_norms)


# --- benchmark -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_benchmark_quick_models(name):
    model, inputs = MODELS[name](quick=True)
    before = snapshot(model)
    out = io.StringIO()
    res = nt.benchmark(model, inputs, file=out, **QUICK)

    assert isinstance(res, BenchmarkResult)
    assert res.model == type(model).__name__ and res.steps == 2 and res.warmup == 1 and not res.compiled
    assert [r.mode for r in res.modes] == ["train", "infer"]
    for r in res.modes:
        assert isinstance(r, ModeResult)
        assert len(r.torch_times_ms) == len(r.normkit_times_ms) == 2
        assert all(t > 0 for t in r.torch_times_ms + r.normkit_times_ms)
        assert r.torch_ms == statistics.median(r.torch_times_ms) > 0
        assert r.normkit_ms == statistics.median(r.normkit_times_ms) > 0
        assert r.ratio == pytest.approx(r.normkit_ms / r.torch_ms)
        ratios = sorted(n / t for t, n in zip(r.torch_times_ms, r.normkit_times_ms))
        lo, hi = r.ratio_range
        assert ratios[0] <= lo <= hi <= ratios[-1]
        assert model_bench.getrusage is None or (r.torch_faults >= 0 and r.normkit_faults >= 0)
    n_norm = sum(type(m).__name__ == NORM_CLASS[name] for m in model.modules())
    assert res.layers == {NORM_CLASS[name]: n_norm}
    assert set(res.kernels) == {NORM_CLASS[name].lower().removesuffix("2d")}
    # the two copies agreed: outputs and gradients within the check's tolerance
    assert set(res.agreement) == {"training output", "gradients", "inference output"}
    assert 0 <= res.agreement["training output"] < 1e-3 and 0 <= res.agreement["inference output"] < 1e-3
    assert 0 <= res.agreement["gradients"] < 5e-2, res.agreement
    assert res.torch_threads >= 1 and res.normkit_threads >= 1

    text = out.getvalue()
    assert text.strip() == res.format()
    assert "normkit/torch" in text and "\ntrain " in text and "\ninfer " in text
    lo, hi = res.train.ratio_range
    assert f"{res.train.ratio:.3f} {f'{lo:.3f}-{hi:.3f}':>15}" in text
    if model_bench.getrusage is not None:
        assert f"{res.train.torch_faults:.0f}, {res.train.normkit_faults:.0f}\n" in text
    assert f"{n_norm} {NORM_CLASS[name]}" in text

    assert_unchanged(model, before)


@pytest.mark.skipif(model_bench.getrusage is None, reason="no resource module (Windows): faults are not counted")
def test_page_faults_are_counted_per_call_and_a_difference_is_noted():
    """_time counts each contender's minor page faults outside its timed span: a call that touches every page of a
    new 4 MiB anonymous mapping faults at least once per page (1024), the call beside it that touches nothing does
    not fault for it; the difference gets a note, a small one does not."""
    pages = 1024

    def touch_new_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # with transparent huge pages "always", one fault per 2 MiB
                m.madvise(mmap.MADV_NOHUGEPAGE)
            for i in range(0, len(m), mmap.PAGESIZE):
                m[i] = 1

    r = model_bench._time("train", [lambda: None, touch_new_pages], steps=3, warmup=1)
    assert r.normkit_faults >= pages > r.torch_faults
    note = model_bench._faults_note(r)
    assert note.startswith("train: the copies' page faults per step differ") and "normkit)" in note
    close = ModeResult("infer", 1.0, 1.0, 1.0, (1.0,), (1.0,), 5000.0, 5000.0 + model_bench.FAULTS_NOTED)
    assert model_bench._faults_note(close) is None
    assert model_bench._faults_note(ModeResult("infer", 1.0, 1.0, 1.0, (1.0,), (1.0,))) is None  # not counted
    assert ModeResult("infer", 1.0, 1.0, 1.0, (1.0,), (1.0,)).torch_faults is None


def test_benchmark_one_mode_custom_loss_and_tensor_input():
    model = small_bn_model()
    x = torch.randn(4, 3, 8, 8)
    res = nt.benchmark(model, x, train=True, infer=False, loss_fn=lambda out: out.square().mean(), file=None,
                       **QUICK)
    assert res.infer is None and res.train is not None and res.modes == [res.train]
    assert "infer" not in res.agreement
    res = nt.benchmark(model, [x], train=False, file=None, **QUICK)
    assert res.train is None and set(res.agreement) == {"inference output"}


def test_benchmark_compares_against_torch_even_when_the_model_is_already_converted():
    model = nt.convert(small_bn_model())
    before = snapshot(model)
    res = nt.benchmark(model, torch.randn(4, 3, 8, 8), file=None, **QUICK)
    assert res.layers == {"BatchNorm2d": 1}
    assert_unchanged(model, before)
    assert type(model[1]) is nt.BatchNorm2d  # still the user's converted model


def test_benchmark_backend_is_passed_to_convert():
    res = nt.benchmark(small_bn_model(), torch.randn(4, 3, 8, 8), backend="reference", file=None, **QUICK)
    assert res.backend == "reference" and res.kernels == {"batchnorm": "reference"}


def test_benchmark_takes_a_models_own_rmsnorm_classes():
    """benchmark had no rmsnorm_classes, so a model whose norms are its own RMSNorm class (transformers' Llama) was
    refused as having nothing to compare."""
    class OwnRMSNorm(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))
            self.variance_epsilon = 1e-6

        def forward(self, h):
            return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(nn.Linear(8, 8), OwnRMSNorm(8), nn.Linear(8, 8), OwnRMSNorm(8))
    with pytest.raises(ValueError, match="none of rmsnorm_classes; nothing to compare"):
        nt.benchmark(model, torch.randn(4, 8), file=None, **QUICK)
    own = {OwnRMSNorm: nt.RMSNormSemantics(eps="variance_epsilon")}
    res = nt.benchmark(model, torch.randn(4, 8), rmsnorm_classes=own, file=None, **QUICK)
    assert res.layers == {"OwnRMSNorm": 2} and set(res.kernels) == {"rmsnorm"}
    assert type(model[1]) is OwnRMSNorm  # the user's model untouched


def test_benchmark_notes_norm_layers_convert_leaves_alone():
    class MyNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), MyNorm(4))
    res = nt.benchmark(model, torch.randn(2, 3, 8, 8), file=None, **QUICK)
    assert res.layers == {"BatchNorm2d": 1}
    assert any("1 MyNorm" in n for n in res.notes)


def test_benchmark_raises_when_the_copies_disagree(monkeypatch):
    monkeypatch.setattr(modules._LayerNormForward, "forward", lambda self, x: nn.LayerNorm.forward(self, x) * 1.01)
    model, inputs = MODELS["transformer"](quick=True)
    with pytest.raises(ModelMismatchError, match="converted \\(normkit\\) copy's training output differs"):
        nt.benchmark(model, inputs, file=None, **QUICK)
    with pytest.raises(ModelMismatchError, match="converted \\(normkit\\) copy's inference output differs"):
        nt.benchmark(model, inputs, train=False, file=None, **QUICK)


def test_agreement_tolerance_is_the_documented_one():
    """Outputs agree to RTOL of their largest magnitude: assert_close was given that as atol and as rtol too, so
    the largest element could differ by twice it."""
    expected = torch.tensor([1.0, 0.5, -0.25])
    agreement = {}
    model_bench._compare("output", "output", expected, expected + torch.tensor([0.9e-3, 0.0, 0.0]), agreement)
    with pytest.raises(ModelMismatchError, match="tolerance 0.001 of its largest magnitude"):
        model_bench._compare("output", "output", expected, expected + torch.tensor([1.5e-3, 0.0, 0.0]), agreement)


def test_benchmark_raises_when_gradients_disagree(monkeypatch):
    class Scale(torch.autograd.Function):  # identity forward, wrong backward
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 2

    forward = modules._GroupNormForward.forward
    monkeypatch.setattr(modules._GroupNormForward, "forward", lambda self, x: Scale.apply(forward(self, x)))
    model, inputs = MODELS["unet"](quick=True)
    with pytest.raises(ModelMismatchError, match=r"copy's gradient of \S+ differs from the torch.nn copy's on the "
                                                 r"example inputs by \d"):
        nt.benchmark(model, inputs, file=None, **QUICK)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(model="not a model"), TypeError, "benchmark: model must be a torch.nn.Module, got str"),
    (dict(example_inputs=3), TypeError, "benchmark: example_inputs must be a tensor or a tuple"),
    (dict(steps=0), ValueError, "benchmark: steps must be >= 1, got 0"),
    (dict(steps=2.0), TypeError, "benchmark: steps must be an int, got float"),
    (dict(steps=True), TypeError, "benchmark: steps must be an int, got bool"),
    (dict(warmup=-1), ValueError, "benchmark: warmup must be >= 0, got -1"),
    (dict(train=False, infer=False), ValueError, "benchmark: train and infer are both False"),
    (dict(train=1), TypeError, "benchmark: train must be True or False, got int"),
    (dict(infer=None), TypeError, "benchmark: infer must be True or False, got NoneType"),
    (dict(compile="yes"), TypeError, "benchmark: compile must be True or False, got str"),
    (dict(backend="nope"), ValueError, "benchmark: unknown backend 'nope'; installed backends: "),
    (dict(backend=3), TypeError, "benchmark: backend must be a backend name or None, got int"),
    (dict(loss_fn="sum"), TypeError, "benchmark: loss_fn must be callable"),
    (dict(loss_fn=lambda out: out), TypeError, r"benchmark: loss_fn must return a tensor with one element, got "
                                               r"Tensor\(4, 3\)"),
    (dict(file=3), TypeError, "benchmark: file must be a text stream or None, got int"),
    (dict(autocast=torch.float64), ValueError, "benchmark: autocast must be None, torch.bfloat16 or torch.float16"),
    (dict(model=small_bn_model().requires_grad_(False)), ValueError,
     "benchmark: model has no parameter that requires grad, so there is no training step to time; pass train=False"),
    (dict(model=nn.Sequential(nn.Linear(3, 3))), ValueError,
     r"benchmark: model \(Sequential\) has no torch.nn normalization layer that normkit.torch.convert replaces"),
    (dict(model=nn.Sequential(nn.Linear(3, 3)).to("meta")), ValueError,
     "benchmark: model has tensors on meta; normkit's kernels run on the CPU only"),
    (dict(example_inputs=(torch.randn(4, 3, 8, 8, device="meta"),)), ValueError,
     "benchmark: example_inputs has tensors on meta"),
])
def test_benchmark_argument_errors(kwargs, exc, match):
    args = dict(model=small_bn_model(), example_inputs=(torch.randn(4, 3, 8, 8),), file=None, **QUICK)
    args.update(kwargs)
    model = args["model"]
    before = snapshot(model) if isinstance(model, nn.Module) and not kwargs.get("model") else None
    with pytest.raises(exc, match=match):
        nt.benchmark(args.pop("model"), args.pop("example_inputs"), **args)
    if before is not None:
        assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_benchmark_under_autocast(dtype):
    """Both copies' forwards run under torch.autocast: the norm layers see 16-bit inputs and the outputs agree to
    within the 16-bit tolerance."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    res = nt.benchmark(small_bn_model(), torch.randn(4, 3, 8, 8), autocast=dtype, file=None, **QUICK)
    assert res.autocast == name and f"under torch.autocast({name})" in res.format()
    assert res.kernels["batchnorm"] == registry.lookup("batchnorm", "forward", name)[0]  # the registry's first
    assert res.agreement["training output"] <= 8 * torch.finfo(getattr(torch, name)).eps


def test_only_benchmark_is_new_in_normkit_torch():
    assert "benchmark" in nt.__all__
    assert nt.benchmark.__module__ == "normkit.torch.model_bench"


# --- the CLI ---------------------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, ["bench", *args])


def test_cli_model_quick():
    result = run("--model", "resnet", "--quick", "--steps", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("[resnet --quick]\nResNet: inputs 4x3x32x32 float32; 2 timed steps after 3 warm-up")
    assert "\ntrain " in out and "\ninfer " in out and "BatchNorm2d" in out
    assert "model  " not in out  # no summary for a single model


def test_cli_model_autocast():
    result = run("--model", "resnet", "--quick", "--steps", "1", "--autocast", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "under torch.autocast(bfloat16)" in result.output


def test_cli_model_fuse():
    """--fuse: the converted copy has its norm + activation pairs fused (the quick unet: its 11 GroupNorm + SiLU),
    and still agrees with the torch.nn copy."""
    result = run("--model", "unet", "--quick", "--steps", "1", "--fuse")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[unet --quick --fuse]") and "fused 11 norm + activation pairs" in result.output


def test_cli_model_control():
    """--control: a torch/torch column in each model's table and in the summary of several."""
    result = run("--model", "all", "--quick", "--steps", "1", "--control")
    assert result.exit_code == 0, result.output
    tables = result.output.split("\n\n")
    assert len(tables) == len(MODELS) + 1
    for table in tables[:-1]:
        assert "normkit/torch  rounds p10-p90  torch/torch" in table
        assert "\ntorch/torch: a second torch.nn copy against the first" in table
    summary = tables[-1].splitlines()
    assert summary[0].split() == ["model", "train:", "torch", "ms", "normkit", "ms", "ratio", "torch/torch",
                                  "infer:", "torch", "ms", "normkit", "ms", "ratio", "torch/torch"]
    assert [line.split()[0] for line in summary[1:]] == list(MODELS)
    assert all(len(line.split()) == 9 for line in summary[1:])


def test_control_is_a_second_torch_copy_timed_in_every_order(monkeypatch):
    """The control is a third contender: a torch.nn copy (no normkit layer in it), made before any step, timed in
    the same rounds, with the three contenders' order going through all six permutations, the first timed round
    taking the first; its own first call comes before the rounds, untimed."""
    model = small_bn_model()
    before = snapshot(model)
    order = []  # the contenders' indices (0 torch, 1 normkit, 2 control), call by call
    real_time = model_bench._time

    def spy(mode, calls, steps, warmup):
        def tagged(i, call):
            def run():
                order.append(i)
                call()
            return run
        return real_time(mode, [tagged(i, c) for i, c in enumerate(calls)], steps, warmup)

    monkeypatch.setattr(model_bench, "_time", spy)
    res = nt.benchmark(model, torch.randn(4, 3, 8, 8), steps=12, warmup=2, train=False, control=True, file=None)
    assert_unchanged(model, before)
    assert order[0] == 2, "the control's untimed first call comes first"
    rounds = [tuple(order[1 + 3 * r: 4 + 3 * r]) for r in range(2 + 12)]
    timed = rounds[2:]
    assert timed[:6] == timed[6:] and sorted(timed[:6]) == sorted(itertools.permutations(range(3)))
    assert timed[0] == (0, 1, 2)
    r = res.infer
    assert len(r.control_times_ms) == 12 and r.control_ms == statistics.median(r.control_times_ms) > 0
    assert r.control_ratio == pytest.approx(r.control_ms / r.torch_ms)
    assert ModeResult("infer", 1.0, 1.0, 1.0, (1.0,), (1.0,)).control_ratio is None  # without control
    assert "torch/torch" not in nt.benchmark(model, torch.randn(4, 3, 8, 8), file=None, **QUICK).format()


def test_the_control_copy_runs_torch_nn_layers(monkeypatch):
    """The control's calls run no normkit layer: counting the converted layers' calls of normkit's batch_norm, a
    run with the control makes as many as one without."""
    model = small_bn_model()
    calls = {"n": 0}
    real_bn = modules.batch_norm

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_bn(*args, **kwargs)

    counts = []
    monkeypatch.setattr(modules, "batch_norm", counted)
    for control in (False, True):
        calls["n"] = 0
        nt.benchmark(model, torch.randn(4, 3, 8, 8), steps=6, warmup=0, train=False, control=control, file=None)
        counts.append(calls["n"])
    assert counts[0] == counts[1] > 0


def test_cli_model_with_a_backend_that_lacks_a_models_op_skips_that_model():
    """A pinned backend without a model's op (here LayerNorm only: no BatchNorm for the ResNet) gave a traceback;
    the model is reported as not timed, the others run, and the exit code says so."""
    from normkit import Backend, reference

    table = {k: v for k, v in reference.KERNELS.items() if k[0] == "layernorm"}
    registry.register_backend(Backend("lnonly", registry.runtime_module(table),
                                      kernels={"layernorm": ("forward", "backward")}, dtypes=("float32",)))
    try:
        result = run("--model", "resnet", "--quick", "--steps", "1", "--backend", "lnonly")
    finally:
        registry.unregister_backend("lnonly")
    assert result.exit_code == 1, result.output
    assert "not timed: batchnorm: backend 'lnonly' does not implement forward" in result.output
    assert "Error: not timed: resnet (above)" in result.output and "Traceback" not in result.output


def test_cli_model_help_names_every_model():
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "(" + ", ".join(MODELS) + ", or all)" in text


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg"], "unknown model 'vgg'; choose from resnet, unet, transformer, transformer_rms, all"),
    (["--quick"], "--quick, --steps, --autocast, --channels-last, --fuse and --control apply to --model only"),
    (["--steps", "3", "--op", "ln"], "--quick, --steps, --autocast, --channels-last, --fuse and --control apply to "
                                     "--model only"),
    (["--control"], "--quick, --steps, --autocast, --channels-last, --fuse and --control apply to --model only"),
    (["--model", "resnet", "--op", "ln", "--repeat", "3"], "--model times whole models; drop --op, --repeat"),
    (["--model", "resnet", "--backend", "reference", "--backend", "numba"], "at most one backend"),
    (["--model", "resnet", "--steps", "0"], "0 is not in the range x>=1"),
])
def test_cli_model_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_gradients_under_autocast_are_held_to_their_float32_values():
    """Two 16-bit gradients may sit far apart; normkit's passes when it is no further from the float32 gradient than
    AUTOCAST_SLACK times torch's, and fails when it is."""
    from normkit.torch import model_bench

    def model_with_grad(values):
        m = nn.Linear(2, 1, bias=False)
        m.weight.grad = torch.tensor([values])
        return m

    exact = {"weight": torch.tensor([[1.0, 0.0]])}
    torch_side = model_with_grad([1.0, 0.3])  # 0.3 from the float32 gradient
    agreement = {}
    model_bench._compare_gradients(torch_side, model_with_grad([1.0, -0.3]), agreement, float32_grads=exact)
    assert agreement["gradients"] == pytest.approx(0.6 / (1.09 ** 0.5))
    with pytest.raises(model_bench.ModelMismatchError, match="under autocast: 0.96 from the float32 gradient"):
        model_bench._compare_gradients(torch_side, model_with_grad([1.0, 1.0]), {}, float32_grads=exact)


# --- models users bring (campaign on the benchmark API) ----------------------------------------------------------

class _TwoOutputs(nn.Module):
    """A norm model returning its output and a second tensor made by ``extra`` from it."""

    def __init__(self, extra, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(dropout))
        self.extra = extra

    def forward(self, x):
        y = self.net(x)
        return y, self.extra(y)


def _bench(model, x, **kw):
    return nt.benchmark(model, (x,), file=None, **QUICK, **kw)


def test_models_with_dropout_16_bit_weights_integer_or_nan_outputs_agree():
    """The agreement check runs both copies under the same random numbers (dropout drew different masks: a false
    ModelMismatchError for every model with dropout, nn.TransformerEncoderLayer's default), holds a 16-bit model to
    its dtype's precision (it held bfloat16 to 1e-3, below one ulp), reports integer outputs as the share of
    elements that differ (it recorded a 0/1 flag as if a relative difference of 1), and NaN in both copies agrees."""
    x = torch.randn(4, 3, 8, 8)
    r = _bench(_TwoOutputs(lambda y: y * 2, dropout=0.5), x)
    assert r.agreement["training output"] < 1e-5
    r = _bench(_TwoOutputs(lambda y: y * 2).bfloat16(), x.bfloat16())
    assert r.agreement["training output"] < 8 * torch.finfo(torch.bfloat16).eps
    r = _bench(_TwoOutputs(lambda y: (y.detach() * 1e5).round().long()), x)
    assert 0 < r.agreement["training output, integer elements differing"] < 0.05
    assert r.agreement["training output"] < 1e-5
    r = _bench(_TwoOutputs(lambda y: torch.full_like(y, float("nan"))), x, loss_fn=lambda out: out[0].sum())
    assert r.agreement["training output"] < 1e-5


def test_benchmark_under_no_grad_parametrized_layers_detached_outputs_and_lazy_layers():
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # the training step turns gradients on (it crashed in backward)
        assert _bench(small_bn_model(), x).train.ratio > 0
    model = small_bn_model()
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", nn.Softplus())
    assert _bench(model, x).layers == {"BatchNorm2d": 1}  # (refused: "has no torch.nn normalization layer")
    with pytest.raises(ValueError, match="benchmark: the training loss does not require grad"):
        _bench(_TwoOutputs(lambda y: y), x, loss_fn=lambda out: out[0].detach().sum())
    lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"benchmark: model has lazy modules whose first forward has not run \(1\)"):
        _bench(lazy, x)


def test_models_that_change_their_input_in_place_and_inputs_that_require_grad():
    """Each copy runs on tensors of its own: an in-place change of the input made the second copy see the first's
    result (a false mismatch), and a backward filled the caller's input's .grad."""
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_bn_model()

        def forward(self, x):
            return self.net(x.mul_(2))

    x = torch.randn(4, 3, 8, 8)
    before = x.clone()
    assert _bench(Doubling(), x).agreement["training output"] < 1e-5
    assert torch.equal(x, before)
    x.requires_grad_()
    _bench(small_bn_model(), x)
    assert x.grad is None
