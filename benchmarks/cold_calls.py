"""What a call costs when it runs as it does in a model, right after a large matmul ("cold"), against the same call
in a loop ("warm"), for normkit's LayerNorm, torch's, and the pieces a normkit.torch call is made of.

    python benchmarks/cold_calls.py [--rounds 100] [--threads 2]

The input is tiny (1, 4, 256), so the kernels' own work is a few µs and what is left is the price of the call path:
in a model every norm call follows a convolution or matmul that has evicted that path's code and data (caches, TLB,
branch predictors), so what a call costs there grows with how much it touches, not with its instruction count. An
empty ``autograd.Function`` (forward returns ``empty_like``, backward the gradient) is the floor of any eager
Python op with its own backward. Every contender runs after its own matmul, in a new random order each round;
medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import normkit
import normkit.torch as nkt
from normkit import registry


class _Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    normkit.set_num_threads(args.threads)
    x = torch.randn(1, 4, 256, requires_grad=True)
    w, b = torch.randn(256, requires_grad=True), torch.randn(256, requires_grad=True)
    xd = x.detach()
    a, m = torch.randn(2048, 1024), torch.randn(1024, 1024)

    def no_grad(f):
        def call():
            with torch.no_grad():
                f()
        return call

    calls = {
        "F.layer_norm, grad": lambda: F.layer_norm(x, (256,), w, b),
        "normkit layer_norm, grad": lambda: nkt.layer_norm(x, (256,), w, b),
        "F.layer_norm, no_grad": no_grad(lambda: F.layer_norm(x, (256,), w, b)),
        "normkit layer_norm, no_grad": no_grad(lambda: nkt.layer_norm(x, (256,), w, b)),
        "empty autograd.Function": lambda: _Empty.apply(x, w, b),
        "torch.empty_like": lambda: torch.empty_like(xd),
        "np.empty (4,)": lambda: np.empty(4, np.float32),
        "registry.lookup": lambda: registry.lookup("layernorm", "forward", "float32", None),
        "a Python no-op": lambda: None,
    }
    times: dict[str, dict[str, list[float]]] = {"warm": {n: [] for n in calls}, "cold": {n: [] for n in calls}}
    names = list(calls)
    for f in calls.values():  # first calls (imports, caches) out of the timings
        f()
    for _ in range(args.rounds):
        random.shuffle(names)
        for n in names:
            for state in ("warm", "cold"):
                if state == "cold":
                    torch.mm(a, m)
                else:
                    calls[n]()
                t0 = time.perf_counter_ns()
                calls[n]()
                times[state][n].append((time.perf_counter_ns() - t0) / 1e3)
    print(f"threads {args.threads}; medians of {args.rounds} rounds, µs per call; cold: right after a "
          "(2048, 1024) x (1024, 1024) torch.mm")
    print("| call | warm | cold | cold − warm |")
    print("|---|---|---|---|")
    for n in calls:
        warm, cold = statistics.median(times["warm"][n]), statistics.median(times["cold"][n])
        print(f"| {n} | {warm:.1f} | {cold:.1f} | {cold - warm:.1f} |")


if __name__ == "__main__":
    main()
