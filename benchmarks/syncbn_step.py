"""One BatchNorm training step (forward + backward) synchronized over 2 processes against local BatchNorm.

    python benchmarks/syncbn_step.py [--shape 32 64 56 56] [--reps 30] [--dtype float32] [--backend NAME]

Two processes on 127.0.0.1 (gloo, torch.multiprocessing spawn, 1 thread each) each take half of the batch and
time, interleaved, a step on their half of: normkit.torch.SyncBatchNorm; the same with its two collectives
stubbed out (each process uses its own statistics: the split kernels' compute alone); and normkit.torch.BatchNorm2d
(the fused kernels, no communication). A barrier starts each step, so both processes enter it together. The two
collectives are timed inside the step (wrapping torch.distributed.all_gather / all_reduce; this includes waiting
for the other process). Rank 0 prints medians (each the mean of the two ranks' medians): the steps, the
collectives' time and its share of the synchronized step, and the two collectives' latency alone (after a
barrier, without computation in between).
"""

import argparse
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(1)
    import normkit
    import normkit.torch as nt

    normkit.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    comm = []
    stub = [False]
    real = {fn: getattr(dist, fn) for fn in ("all_gather", "all_reduce")}

    def all_gather(out, t, *a, **k):
        if stub[0]:  # every "process" sent this one's statistics
            for o in out:
                o.copy_(t)
            return None
        t0 = time.perf_counter()
        r = real["all_gather"](out, t, *a, **k)
        comm.append(time.perf_counter() - t0)
        return r

    def all_reduce(t, *a, **k):
        if stub[0]:
            return None
        t0 = time.perf_counter()
        r = real["all_reduce"](t, *a, **k)
        comm.append(time.perf_counter() - t0)
        return r
    dist.all_gather, dist.all_reduce = all_gather, all_reduce

    dtype = getattr(torch, args.dtype)
    n, c, *spatial = args.shape
    local_n = n // WORLD
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(local_n, c, *spatial, generator=gen, dtype=dtype).requires_grad_(True)
    dy = torch.randn(local_n, c, *spatial, generator=gen, dtype=dtype)
    sync = nt.SyncBatchNorm(c).to(dtype)
    local = nt.BatchNorm2d(c).to(dtype)
    for m in (sync, local):
        m.backend = args.backend

    def step(module):
        x.grad = None
        module.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        module(x).backward(dy)
        return time.perf_counter() - t0

    times = {"sync": [], "stub": [], "local": [], "comm": []}
    variants = ["sync", "stub", "local"]
    for i in range(args.warmup + args.reps):
        for name in variants[i % 3:] + variants[:i % 3]:  # rotate the order
            del comm[:]
            stub[0] = name == "stub"
            t = step(local if name == "local" else sync)
            if i >= args.warmup:
                times[name].append(t)
                if name == "sync":
                    times["comm"].append(sum(comm))
    # the collectives' own latency: the same two calls on (2C+1,) and (2C,) float64 right after a barrier, so
    # that neither process waits for the other's computation
    times["latency"] = []
    send, rows, both = torch.zeros(2 * c + 1, dtype=torch.float64), None, torch.zeros(2 * c, dtype=torch.float64)
    rows = [torch.empty_like(send) for _ in range(WORLD)]
    for i in range(args.warmup + args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        real["all_gather"](rows, send)
        real["all_reduce"](both)
        if i >= args.warmup:
            times["latency"].append(time.perf_counter() - t0)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, {k: statistics.median(v) for k, v in times.items()})
    if rank == 0:
        med = {k: statistics.median(g[k] for g in gathered) * 1e3 for k in times}  # the median rank's median
        print(f"shape {tuple(args.shape)} {args.dtype} split over {WORLD} processes of 1 thread, "
              f"{args.reps} interleaved steps (medians, ms; each value the mean of the ranks' medians)")
        print(f"  local BatchNorm step (fused kernels)            {med['local']:8.2f}")
        print(f"  SyncBatchNorm step, collectives stubbed out     {med['stub']:8.2f}")
        print(f"  SyncBatchNorm step                              {med['sync']:8.2f}")
        print(f"    of which the 2 collectives                    {med['comm']:8.2f}   "
              f"({100 * med['comm'] / med['sync']:.1f}% of the synchronized step)")
        print(f"  sync - stubbed                                  {med['sync'] - med['stub']:8.2f}")
        print(f"  the 2 collectives alone, after a barrier        {med['latency']:8.2f}   (latency; the rest of "
              f"their time in the step is waiting for the other process)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    mp.spawn(worker, args=(free_port(), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
