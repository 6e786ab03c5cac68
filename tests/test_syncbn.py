"""normkit.torch.SyncBatchNorm: process groups of 2 and 3 on 127.0.0.1 (gloo) against single-process BatchNorm
on the whole batch, plus the single-process behaviours (fallback, device check, conversion) and the example.

The groups run tests/syncbn_worker.py as subprocesses, each bounded by a timeout and killed on expiry; each group
is launched once per module and its results are checked by several tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import normkit.torch as nkt  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import syncbn_worker as W  # noqa: E402

TIMEOUT = 90  # seconds for a whole group, start-up included; a healthy run takes a few
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    return env


def run_group(world: int, outdir: Path) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "syncbn_worker.py"), str(world), str(r), str(port),
                               str(outdir)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a process group of {world} did not finish in {TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{out[-4000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def group(request, tmp_path_factory):
    world = request.param
    return world, run_group(world, tmp_path_factory.mktemp(f"syncbn{world}"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the error relative to the reference's scale)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    scale = b.abs().max().item() if b.numel() else 1.0
    return (a - b).abs().max().item() / scale if a.numel() else 0.0


def torch_bn(shape):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[len(shape) + 1]


def reference(name, shape, dtype, kwargs, n):
    """torch.nn.BatchNorm on the whole batch, run as the workers run SyncBatchNorm; for the "offset" cases (float32
    data far from zero, where torch's float32 BatchNorm loses 4e-4 of y's scale) in float64, rounded to dtype."""
    computed = torch.float64 if name.startswith("offset") else dtype
    module = W.make_module(torch_bn(shape), shape, computed, kwargs, name, n)
    out = W.run_module(module, name, shape, computed, 0, n, n)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}


@pytest.mark.parametrize("case", W.cases(), ids=[c[0] for c in W.cases()])
def test_matches_single_process(group, case):
    world, results = group
    name, shape, dtype, kwargs = case
    n = sum(W.SIZES[world])
    ref = reference(name, shape, dtype, kwargs, n)
    tol = TOL[dtype]
    got = [res[name] for res in results]
    for key in ("y", "dx", "eval_y"):
        whole = torch.cat([g[key] for g in got])
        if key == "eval_y" and "running_mean" not in ref:
            # no running statistics: eval normalizes each process's batch by its own statistics, without
            # communicating (torch.nn.SyncBatchNorm synchronizes in training mode only)
            x = W.data(name, shape, dtype, n, W.STEPS)[0]
            bn = W.make_module(torch_bn(shape), shape, dtype, kwargs, name, n).eval()
            parts = [bn(x[slice(*W.bounds(world, r))]) if W.SIZES[world][r] else x[:0] for r in range(world)]
            assert rel(whole, torch.cat(parts)) < tol
            continue
        assert rel(whole, ref[key]) < tol, (key, rel(whole, ref[key]))
    for r, g in enumerate(got):
        lo, hi = W.bounds(world, r)
        assert g["y"].shape == ref["y"][lo:hi].shape  # the empty batch gets an empty output
    if "dweight" in ref:  # torch's convention: local sums, which DDP then reduces
        for key in ("dweight", "dbias"):
            total = sum(g[key] for g in got)
            assert rel(total, ref[key]) < tol, (key, rel(total, ref[key]))
    if "running_mean" in ref:
        for g in got:  # identical on every process, and equal to the whole batch's
            assert torch.equal(g["running_mean"], got[0]["running_mean"])
            assert torch.equal(g["running_var"], got[0]["running_var"])
            assert torch.equal(g["num_batches_tracked"], ref["num_batches_tracked"])
            for key in ("running_mean", "running_var"):
                assert rel(g[key], ref[key]) < tol, (key, rel(g[key], ref[key]))
    else:
        assert not any("running_mean" in g for g in got)


def test_two_collectives_per_step_none_in_eval(group):
    world, results = group
    for name, _, _, kwargs in W.cases():
        for res in results:
            # STEPS training steps of one all_gather and one all_reduce each; the eval forward adds none (with
            # track_running_stats=False eval uses the local batch's statistics without communicating, as torch)
            assert res[name]["collectives"] == {"all_gather": W.STEPS, "all_reduce": W.STEPS}, name


def _whole_batch_step(world: int, case: str):
    """torch.nn.BatchNorm's first training step of the worker's ``case`` on the whole batch: (module, x, y, dtype),
    x's and the parameters' gradients filled."""
    name, shape, dtype, kwargs = next(c for c in W.cases() if c[0] == case)
    n = sum(W.SIZES[world])
    bn = W.make_module(torch_bn(shape), shape, dtype, kwargs, name, n)
    x, dy, _, _ = W.data(name, shape, dtype, n, 0)
    x = x.requires_grad_()
    y = bn(x)
    y.backward(dy)
    return bn, x, y.detach(), dtype


def test_no_input_grad_skips_the_backward_all_reduce(group):
    world, results = group
    got = [res["no-input-grad"] for res in results]
    bn, _, _, dtype = _whole_batch_step(world, got[0]["case"])
    for g in got:
        assert g["collectives"] == {"all_gather": 1, "all_reduce": 0}
    for key, ref in (("dweight", bn.weight.grad), ("dbias", bn.bias.grad)):
        assert rel(sum(g[key] for g in got), ref) < TOL[dtype]


def test_channels_last_input_gives_channels_last_results(group):
    world, results = group
    got = [res["channels-last"] for res in results]
    _, x, y, dtype = _whole_batch_step(world, got[0]["case"])
    for r, g in enumerate(got):
        lo, hi = W.bounds(world, r)
        assert g["layouts"] == [True, True] or hi == lo  # (an empty batch is contiguous in every format)
        assert rel(g["y"], y[lo:hi]) < TOL[dtype] and rel(g["dx"], x.grad[lo:hi]) < TOL[dtype]


def test_bfloat16_input_to_a_float32_layer(group):
    """Autocast's case: bfloat16 data, float32 parameters and statistics. It was refused in a process group (it ran
    on one process); now computed in float32 as torch does: y and dx bfloat16 within two of its ulps of the float64
    result on the same bfloat16 values, the parameter gradients and running statistics float32."""
    world, results = group
    got = [res["bfloat16"] for res in results]
    name = got[0]["case"]
    _, shape, _, kwargs = next(c for c in W.cases() if c[0] == name)
    n = sum(W.SIZES[world])
    x, dy, _, _ = W.data(name, shape, torch.float32, n, 0)
    module = W.make_module(torch_bn(shape), shape, torch.float32, kwargs, name, n).double()
    xb = x.to(torch.bfloat16).double().requires_grad_()
    y = module(xb)
    y.backward(dy.to(torch.bfloat16).double())
    for key, want in (("y", y.detach()), ("dx", xb.grad)):
        whole = torch.cat([g[key] for g in got])
        assert whole.dtype == torch.bfloat16
        assert ((whole.double() - want).abs() <= 2 * 2.0 ** -8 * want.abs() + 1e-6 * want.abs().max()).all(), key
    for key, want in (("dweight", module.weight.grad), ("dbias", module.bias.grad)):
        total = sum(g[key] for g in got)
        assert total.dtype == torch.float32 and rel(total.double(), want) < 1e-2, key
    for g in got:
        assert g["running_mean"].dtype == torch.float32 and torch.equal(g["running_mean"], got[0]["running_mean"])
        assert rel(g["running_mean"].double(), module.running_mean) < 1e-5


def test_gradients_of_gradients_are_a_clear_error(group):
    world, results = group
    for res in results:
        assert "gradients of its gradients (create_graph=True) are not supported" in res["create_graph"]


def test_torch_func_is_a_clear_error(group):
    world, results = group
    for res in results:
        assert res["func"].startswith("SyncBatchNorm: torch.func transforms (grad, vmap, jacrev, ...) are not "
                                      "supported")


def test_torch_compile_runs_the_synchronized_step_as_eager(group):
    world, results = group
    for res in results:
        for name in (W.cases()[2][0], W.cases()[6][0]):
            eager, compiled = res[name], res["compiled-" + name]
            assert eager.keys() - {"collectives"} == compiled.keys()
            for key in compiled:
                assert torch.equal(compiled[key], eager[key]), (name, key)
        assert "normkit's SyncBatchNorm layers, in a process group of more than one process, run NumPy code" in \
            res["fullgraph"]


def test_ddp_step(group):
    world, results = group
    n = sum(W.SIZES[world])
    ref_model = W.ddp_model()
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1 / world)  # DDP averages the processes' gradients
    loss = ref_model(W.ddp_data(n)).pow(2).sum()
    loss.backward()
    ref_grads = {k: p.grad.clone() / world for k, p in ref_model.named_parameters()}
    opt.step()
    for res in results:
        ddp = res["ddp"]
        assert "normkit.torch.sync.SyncBatchNorm" in ddp["types"]
        for k, g in ref_grads.items():
            assert rel(ddp["grads"][k], g) < 1e-10, k
        for k, v in ref_model.state_dict().items():
            if v.is_floating_point():
                assert rel(ddp["state"][k], v) < 1e-10, k
            else:
                assert torch.equal(ddp["state"][k], v), k


# --- one process ------------------------------------------------------------------------------------------------

def test_fallback_without_init_warns_and_is_batchnorm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) + 5
    sbn = nkt.SyncBatchNorm(3).double()
    bn = torch.nn.BatchNorm2d(3).double()
    with pytest.warns(RuntimeWarning, match="not initialized"):
        y = sbn(x)
    assert torch.allclose(y, bn(x), rtol=0, atol=1e-12)
    assert torch.allclose(sbn.running_var, bn.running_var, rtol=1e-14, atol=0)
    sbn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval needs no synchronization: no warning
        sbn(x)


def test_non_cpu_input_is_a_clear_error():
    sbn = nkt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="CPU only.*meta"):
        sbn(torch.empty(4, 3, 2, device="meta"))


def test_input_dims():
    sbn = nkt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2D"):
        sbn(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for shape in [(4, 3), (4, 3, 2), (4, 3, 2, 2), (4, 3, 2, 2, 2)]:
            assert sbn(torch.randn(shape)).shape == shape


def test_state_dict_and_repr_are_torchs():
    ours, theirs = nkt.SyncBatchNorm(4, momentum=None), torch.nn.SyncBatchNorm(4, momentum=None)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    # not a torch.nn.SyncBatchNorm: DistributedDataParallel refuses those in CPU modules
    assert not isinstance(ours, torch.nn.SyncBatchNorm)
    ours.load_state_dict(theirs.state_dict())


def test_convert_sync_batchnorm():
    inner = torch.nn.Sequential(nkt.BatchNorm1d(3), torch.nn.BatchNorm3d(2, affine=False))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.BatchNorm2d(4, momentum=None), inner)
    model[1].eval()
    bn2 = model[1]
    before = {id(t) for t in (bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, bn2.num_batches_tracked)}
    out = nkt.convert_sync_batchnorm(model, process_group=None)
    assert out is model
    for m in (out[1], out[2][0], out[2][1]):
        assert type(m) is nkt.SyncBatchNorm
    assert type(out[0]) is torch.nn.Conv2d
    s = out[1]
    assert {id(t) for t in (s.weight, s.bias, s.running_mean, s.running_var, s.num_batches_tracked)} == before
    assert s.momentum is None and not s.training and s.num_features == 4
    assert out[2][1].weight is None and out[2][1].num_features == 2
    single = nkt.convert_sync_batchnorm(torch.nn.BatchNorm1d(5))
    assert type(single) is nkt.SyncBatchNorm


def test_convert_sync_batchnorm_keeps_a_sync_layers_own_process_group():
    """A SyncBatchNorm's subgroup was replaced by the function's default (None: every process), silently; it is
    kept unless process_group is given."""
    subgroup, other = object(), object()  # (stand-ins: the layer only stores its group)
    for layer in (torch.nn.SyncBatchNorm(3, process_group=subgroup), nkt.SyncBatchNorm(3, process_group=subgroup)):
        assert nkt.convert_sync_batchnorm(layer).process_group is subgroup
        assert nkt.convert_sync_batchnorm(layer, process_group=other).process_group is other
    assert nkt.convert_sync_batchnorm(torch.nn.BatchNorm2d(3)).process_group is None



def test_revert_makes_torchs_sync_batchnorm_again():
    """revert left normkit's SyncBatchNorm layers as they were: they become torch.nn.SyncBatchNorm, with the same
    parameter and buffer objects and process group, and without normkit's backend attribute."""
    subgroup = object()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.SyncBatchNorm(3, process_group=subgroup))
    nkt.convert_sync_batchnorm(model, process_group=None)
    layer = model[1]
    layer.backend = "numba"
    tensors = [id(t) for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert nkt.revert(model) is model
    assert type(model[1]) is torch.nn.SyncBatchNorm and model[1] is layer
    assert model[1].process_group is subgroup and "backend" not in model[1].__dict__
    assert [id(t) for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var)] == tensors
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval()
    x = torch.randn(2, 1, 4, 4)
    ref = torch.nn.functional.batch_norm(model[0](x), layer.running_mean, layer.running_var, layer.weight, layer.bias)
    torch.testing.assert_close(model(x), ref)

def test_example_quick():
    proc = subprocess.run([sys.executable, str(HERE.parent / "examples" / "ddp_syncbn.py"), "--quick"],
                          env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout:\n{proc.stdout}"
    assert "running statistics agree" in proc.stdout
