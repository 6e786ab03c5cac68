"""Train a small CNN on two CPU processes with DistributedDataParallel and normkit's SyncBatchNorm.

    python examples/ddp_syncbn.py [--steps 5] [--batch 16] [--size 16] [--quick]

Two processes join a gloo group on 127.0.0.1 (a free port), started with torch.multiprocessing.spawn. The model's
BatchNorm layers become normkit.torch.SyncBatchNorm with convert_sync_batchnorm, so each step normalizes with the
statistics of both processes' batches (one all_gather in forward, one all_reduce in backward per layer). Rank 0
prints the loss of each step (averaged over the processes); at the end every process reports its running
statistics and rank 0 checks they agree. ``--quick`` runs two tiny steps (for the tests).
"""

import argparse
import gc
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkit
import normkit.torch as nt

WORLD = 2


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: one thread each, for torch and normkit
    normkit.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        model = nt.convert_sync_batchnorm(SmallCNN())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1000 + rank)  # each process its own data
        for step in range(args.steps):
            x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
            # a learnable target: which of the three channels have a positive mean (8 classes)
            target = ((x.mean(dim=(2, 3)) > 0).long() * torch.tensor([1, 2, 4])).sum(1)
            loss = nn.functional.cross_entropy(ddp(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step}: loss {mean_loss.item() / WORLD:.4f}", flush=True)

        stats = torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                           if isinstance(m, nt.SyncBatchNorm)])
        gathered = [torch.empty_like(stats) for _ in range(WORLD)]
        dist.all_gather(gathered, stats)
        if rank == 0:
            diff = max((g - gathered[0]).abs().max().item() for g in gathered)
            for r, g in enumerate(gathered):
                print(f"rank {r}: running statistics sum {g.sum().item():.10f}")
            verdict = "running statistics agree" if diff == 0 else f"running statistics DIFFER by {diff:g}"
            print(f"{verdict} across {WORLD} processes", flush=True)
            if diff:
                raise SystemExit(1)
        dist.barrier()  # leave together: a process tearing down while its peer is mid-collective fails the peer
        # DDP's reducer holds gloo work objects: freed while the group and the interpreter live, since gloo's threads
        # releasing them during the interpreter's teardown abort the process (this script failed so 3 runs in 12)
        del ddp, opt
        gc.collect()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="per process")
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--quick", action="store_true", help="two steps on tiny batches")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.size = 2, 4, 8
    mp.spawn(worker, args=(free_port(), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
