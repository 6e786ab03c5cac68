"""Train a small CNN with torch.nn's norm layers and with normkit's, and time one training step of each.

    python examples/torch_cnn.py [--batch 32] [--size 32] [--reps 30] [--backend numba] [--threads 1] [--quick]

Both models start from the same weights; normkit.torch.convert swaps the norm layers in place. Steps of the two
models are interleaved (alternating which goes first) and the medians reported, so that load from other processes
hits both alike.
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import normkit
import normkit.torch as nt
from normkit.torch.models import SmallCNN


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--backend", default=None, help="pin normkit's layers to one backend (default: registry order)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and normkit (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tiny batch and 3 steps: seconds (tests run this)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.reps = 8, 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
        normkit.set_num_threads(args.threads)

    torch.manual_seed(0)
    models = {"torch.nn": SmallCNN()}
    models["normkit"] = nt.convert(copy.deepcopy(models["torch.nn"]), backend=args.backend)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step():
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        return step

    steps = {name: make_step(model) for name, model in models.items()}
    losses = {name: [step() for _ in range(3)] for name, step in steps.items()}  # warm-up (JIT, caches)
    times = {name: [] for name in steps}
    for rep in range(args.reps):
        for name in (list(steps) if rep % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            losses[name].append(steps[name]())
            times[name].append(time.perf_counter() - t0)

    used = {op: normkit.registry.lookup(op, direction, "float32", args.backend)[0]
            for op in ("batchnorm", "groupnorm", "layernorm") for direction in ("forward",)}
    print(f"batch {args.batch}x3x{args.size}x{args.size}, {args.reps} interleaved steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"normkit {normkit.get_num_threads()} threads, normkit kernels: "
          + ", ".join(f"{op}={name}" for op, name in used.items()))
    for name in steps:
        print(f"  {name:9s} median step {1e3 * statistics.median(times[name]):8.2f} ms   "
              f"(min {1e3 * min(times[name]):.2f} ms)   loss {losses[name][0]:.5f} -> {losses[name][-1]:.5f}")


if __name__ == "__main__":
    main()
