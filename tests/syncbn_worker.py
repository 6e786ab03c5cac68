"""One process of tests/test_syncbn.py's process groups (not a test module itself).

    python tests/syncbn_worker.py WORLD RANK PORT OUTDIR

joins a gloo group on 127.0.0.1:PORT, runs every case of :func:`cases` on its slice of the batch with normkit's
SyncBatchNorm, counts the collectives, runs one DistributedDataParallel step, and saves what it got to
OUTDIR/rankRANK.pt for the test to compare with single-process BatchNorm on the whole batch.
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta

import numpy as np
import torch

#: the batch sizes of the processes, by group size: uneven, and one process of three gets an empty batch
SIZES = {2: [5, 2], 3: [4, 0, 3]}
#: the (C, *spatial) of a 2D, 3D, 4D and 5D input
SHAPES = [(5,), (4, 6), (3, 4, 5), (2, 3, 2, 4)]
DTYPES = [torch.float64, torch.float32]
STEPS = 2


def cases():
    """(name, shape, dtype, module keyword arguments) of every comparison."""
    out = []
    for dtype in DTYPES:
        for shape in SHAPES:
            out.append((f"{len(shape) + 1}d-{str(dtype)[6:]}", shape, dtype, {}))
    out.append(("cumulative-float64", (3, 4, 5), torch.float64, {"momentum": None}))
    out.append(("noaffine-norunning-float64", (3, 4, 5), torch.float64,
                {"affine": False, "track_running_stats": False}))
    out.append(("offset-float32", (4, 6), torch.float32, {}))  # mean 1e4, compared with float64 BatchNorm
    return out


def data(name: str, shape, dtype, n: int, step: int):
    """The whole batch (x, dy) and the affine parameters of one case and step: channels with std 1 and mean 1e4
    in float64, mean 10 in float32; the "offset" cases' mean 1e4 and every value a float32 one (the same values in
    float64, for the reference)."""
    rng = np.random.default_rng([sum(map(ord, name)), step])
    offset = name.startswith("offset")
    mean = 1e4 if dtype == torch.float64 or offset else 10.0
    c = shape[0]
    arrays = (rng.standard_normal((n, *shape)) + mean, rng.standard_normal((n, *shape)), rng.uniform(0.5, 1.5, c),
              rng.standard_normal(c))
    return tuple(torch.from_numpy(a.astype(np.float32) if offset else a).to(dtype) for a in arrays)


def bounds(world: int, rank: int) -> tuple[int, int]:
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def run_module(module, name, shape, dtype, lo, hi, n):
    """STEPS training steps (forward, backward with dy) on the rows lo:hi, then one eval forward. Returns the last
    step's y and gradients, the running statistics and the eval output."""
    out = {}
    for step in range(STEPS):
        x, dy, _, _ = data(name, shape, dtype, n, step)
        xl = x[lo:hi].clone().requires_grad_(True)
        for p in module.parameters():
            p.grad = None
        y = module(xl)
        y.backward(dy[lo:hi])
        out.update(y=y.detach(), dx=xl.grad)
        if module.weight is not None:
            out.update(dweight=module.weight.grad, dbias=module.bias.grad)
    if module.running_mean is not None:
        out.update(running_mean=module.running_mean.clone(), running_var=module.running_var.clone(),
                   num_batches_tracked=module.num_batches_tracked.clone())
    module.eval()
    x, _, _, _ = data(name, shape, dtype, n, STEPS)
    with torch.no_grad():
        out["eval_y"] = module(x[lo:hi])
    module.train()
    return out


def make_module(cls, shape, dtype, kwargs, name, n):
    module = cls(shape[0], **kwargs).to(dtype)
    if module.weight is not None:
        _, _, weight, bias = data(name, shape, dtype, n, 0)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    return module


def ddp_model():
    # no bias in the convolution: BatchNorm cancels it, and its gradient is zero up to rounding
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 2)).double()


def ddp_data(n: int):
    rng = np.random.default_rng(7)
    return torch.from_numpy(rng.standard_normal((n, 3, 5, 5)) * 2 + 3)


def main(world: int, rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    import normkit.torch as nkt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    calls = {"all_gather": 0, "all_reduce": 0}
    for fn in list(calls):
        real = getattr(dist, fn)

        def counted(*args, _real=real, _fn=fn, **kwargs):
            calls[_fn] += 1
            return _real(*args, **kwargs)
        setattr(dist, fn, counted)

    n = sum(SIZES[world])
    lo, hi = bounds(world, rank)
    results = {}
    for name, shape, dtype, kwargs in cases():
        module = make_module(nkt.SyncBatchNorm, shape, dtype, kwargs, name, n)
        before = dict(calls)
        res = run_module(module, name, shape, dtype, lo, hi, n)
        res["collectives"] = {k: calls[k] - before[k] for k in calls}
        results[name] = res

    # input that needs no gradient: as in torch, backward skips its all_reduce (every process alike), and the
    # weight and bias gradients are still the local sums
    name, shape, dtype, kwargs = cases()[2]
    module = make_module(nkt.SyncBatchNorm, shape, dtype, kwargs, name, n)
    x, dy, _, _ = data(name, shape, dtype, n, 0)
    before = dict(calls)
    module(x[lo:hi]).backward(dy[lo:hi])
    results["no-input-grad"] = {"case": name, "dweight": module.weight.grad, "dbias": module.bias.grad,
                                "collectives": {k: calls[k] - before[k] for k in calls}}

    # channels-last input: output and input gradient come back channels-last, with the contiguous run's values
    module = make_module(nkt.SyncBatchNorm, shape, dtype, kwargs, name, n)
    xc = x[lo:hi].contiguous(memory_format=torch.channels_last).requires_grad_()
    y = module(xc)
    y.backward(dy[lo:hi])
    results["channels-last"] = {"case": name, "y": y.detach(), "dx": xc.grad,
                                "layouts": [t.is_contiguous(memory_format=torch.channels_last) for t in (y, xc.grad)]}

    # bfloat16 input to a float32 layer (autocast's case): computed in float32, as torch's SyncBatchNorm does
    module = make_module(nkt.SyncBatchNorm, shape, torch.float32, kwargs, name, n)
    xf, dyf, _, _ = data(name, shape, torch.float32, n, 0)  # (mean 10: bfloat16 resolves 1e4 to 64)
    xb = xf[lo:hi].to(torch.bfloat16).requires_grad_()
    y = module(xb)
    y.backward(dyf[lo:hi].to(torch.bfloat16))
    results["bfloat16"] = {"case": name, "y": y.detach(), "dx": xb.grad, "dweight": module.weight.grad,
                           "dbias": module.bias.grad, "running_mean": module.running_mean.clone(),
                           "running_var": module.running_var.clone()}

    # gradients of gradients: a clear error (raised before the backward's all_reduce, on every process alike)
    module = make_module(nkt.SyncBatchNorm, shape, dtype, kwargs, name, n)
    xg = x[lo:hi].clone().requires_grad_()
    try:
        torch.autograd.grad(module(xg).pow(3).sum(), xg, create_graph=True)
        results["create_graph"] = None
    except RuntimeError as e:
        results["create_graph"] = str(e)

    # torch.func's transforms: a clear error (raised before any collective, on every process alike); without
    # running statistics, whose in-place update is torch's own error under them
    module = make_module(nkt.SyncBatchNorm, shape, dtype, {"track_running_stats": False}, name, n)
    try:
        torch.func.grad(lambda xi: module(xi).pow(3).sum())(x[lo:hi].clone())
        results["func"] = None
    except RuntimeError as e:
        results["func"] = str(e)

    # torch.compile: the synchronized step runs outside the graph (traced, dynamo guarded its NumPy code on per-call
    # objects and once ran a float64 kernel on float32 data), so results equal eager's, float64 then float32;
    # fullgraph=True says the layer cannot be captured whole
    for case in (cases()[2], cases()[6]):
        module = make_module(nkt.SyncBatchNorm, *case[1:], case[0], n)
        results["compiled-" + case[0]] = run_module(torch.compile(module, backend="eager"), *case[:3], lo, hi, n)
    try:
        torch.compile(make_module(nkt.SyncBatchNorm, shape, dtype, kwargs, name, n), backend="eager",
                      fullgraph=True)(x[lo:hi])
        results["fullgraph"] = None
    except Exception as e:  # torch._dynamo's Unsupported
        results["fullgraph"] = str(e)

    # one DistributedDataParallel step of a small CNN converted with convert_sync_batchnorm
    model = nkt.convert_sync_batchnorm(ddp_model())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = ddp_data(n)[lo:hi]
    loss = ddp(x).pow(2).sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    results["ddp"] = {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()},
                      "types": [type(m).__module__ + "." + type(m).__name__ for m in model.modules()]}

    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    # DDP's reducer holds gloo work objects: freed while the group and the interpreter live, since gloo's threads
    # releasing them during the interpreter's teardown abort the process (examples/ddp_syncbn.py failed so 3 in 12)
    del ddp, opt, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
