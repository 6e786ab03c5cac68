"""Per-call overhead: what a call costs on top of its kernel, at the small shapes where it shows.

    pytest benchmarks/test_overhead.py                 # pytest-benchmark, one contender after another
    python benchmarks/test_overhead.py [--threads N]   # interleaved, call by call: the tables in the README

Contenders per shape: the raw kernel (positional call, preallocated outputs), normkit's NumPy frontend,
``registry.lookup`` alone; PyTorch's ``torch.nn.functional`` and ``normkit.torch``, forward under ``no_grad`` and
forward + backward.

The last table times the PyTorch calls as a model makes them: each right after a convolution (a linear layer for
the row ops) that leaves the caches full of its own data, so the Python between the call and its kernel runs
cold, several times slower than in a loop of calls. The contenders run in a fresh random order each round (the
call before a call changes its time, so a fixed rotation would favour one side).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pytest

import normkit
from normkit import registry
from normkit.contract import SPECS

# (op, shape, extra): LN over the last dim, GN with 8 groups. The NumPy rows are the small shapes; the torch
# rows add the shapes of a transformer layer.
NUMPY_SHAPES = [("layernorm", (1, 4096)), ("batchnorm", (2, 8, 4, 4)), ("groupnorm", (2, 8, 4, 4)),
                ("instancenorm", (2, 8, 4, 4))]
TORCH_SHAPES = [("layernorm", (1, 128, 768)), ("layernorm", (16, 128, 256)), ("groupnorm", (1, 32, 16, 16)),
                ("batchnorm", (8, 64, 8, 8)), ("instancenorm", (4, 16, 16, 16))]
# BatchNorm as its module calls it in training: with running statistics, which the call updates
RUNNING = "batchnorm+running"
TORCH_SHAPES.append((RUNNING, (8, 64, 8, 8)))
GROUPS = 8


def _numpy_calls(op: str, shape: tuple) -> dict:
    """name -> zero-argument call, for the raw kernel, the NumPy frontend and the lookup."""
    spec = SPECS[op]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1] if spec.sets == "row" else shape[1]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    kw = {"normalized_shape": (c,)} if spec.sets == "row" else {}
    if spec.grouped:
        kw["num_groups"] = GROUPS
    if spec.running:
        kw[spec.training_flag] = True
    front = normkit.get(op)
    _, saved = front.forward(x, weight=w, bias=b, **kw)
    kshape = (x.size // c, c) if spec.sets == "row" else (shape[0], shape[1], x.size // (shape[0] * shape[1]))
    kernel = registry.lookup(op, "forward", "float32")[1]
    args = spec.kernel_args("forward", dict(x=x.reshape(kshape), num_groups=GROUPS, weight=w, bias=b, eps=1e-5,
                                            y=np.empty(kshape, np.float32), mean=np.empty_like(saved.mean),
                                            rstd=np.empty_like(saved.rstd)))
    return {
        "kernel": lambda: kernel(*args),
        "numpy frontend": lambda: front(x, weight=w, bias=b, **kw),
        "lookup": lambda: registry.lookup(op, "forward", "float32"),
    }


def _torch_calls(op: str, shape: tuple) -> dict:
    import torch

    import normkit.torch as nkt

    spec = SPECS["batchnorm" if op == RUNNING else op]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    c = shape[-1] if spec.sets == "row" else shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    w, b = torch.ones(c), torch.zeros(c)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(shape, generator=g)
    fn = {"layernorm": lambda m, x, w, b: m.layer_norm(x, (c,), w, b),
          "groupnorm": lambda m, x, w, b: m.group_norm(x, GROUPS, w, b),
          "batchnorm": lambda m, x, w, b: m.batch_norm(x, None, None, w, b, True),
          RUNNING: lambda m, x, w, b: m.batch_norm(x, rm, rv, w, b, True),
          "instancenorm": lambda m, x, w, b: m.instance_norm(x, None, None, w, b)}[op]
    F = torch.nn.functional

    def no_grad(m):
        def call():
            with torch.no_grad():
                fn(m, x, w, b)
        return call

    def train(m):
        def call():
            fn(m, xg, wg, bg).backward(dy)
        return call

    return {"torch no_grad": no_grad(F), "normkit no_grad": no_grad(nkt),
            "torch fwd+bwd": train(F), "normkit fwd+bwd": train(nkt)}


# (name, op, shape): shapes of the model benchmark's layers (normkit.torch.models)
MODEL_CONTEXT = [("BatchNorm2d", "batchnorm", (32, 128, 7, 7)), ("BatchNorm2d", "batchnorm", (32, 32, 28, 28)),
                 ("GroupNorm", "groupnorm", (8, 128, 16, 16)), ("LayerNorm", "layernorm", (16, 128, 256)),
                 ("RMSNorm", "rmsnorm", (16, 128, 256))]


def _model_context(op: str, shape: tuple, rounds: int) -> dict:
    """Median µs of torch.nn's and normkit's module, eval (no_grad) and training forward + backward, each call
    right after the layer before it (not timed), the four contenders in a new random order every round."""
    import random

    import torch

    import normkit.torch as nkt

    torch.manual_seed(0)
    nn = torch.nn
    channel = op in ("batchnorm", "groupnorm")
    c = shape[1] if channel else shape[-1]
    make = {"batchnorm": lambda: nn.BatchNorm2d(c), "groupnorm": lambda: nn.GroupNorm(32, c),
            "layernorm": lambda: nn.LayerNorm(c), "rmsnorm": lambda: nn.RMSNorm(c)}[op]
    before = nn.Conv2d(c, c, 3, padding=1) if channel else nn.Linear(c, c)
    x0, dy = torch.randn(shape), torch.randn(shape)
    mods = {"torch": make(), "normkit": nkt.convert(nn.Sequential(make()))[0]}

    def eval_call(m):
        def call():
            m.eval()
            with torch.no_grad():
                x = before(x0)
                t = time.perf_counter()
                m(x)
                return time.perf_counter() - t
        return call

    def train_call(m):
        def call():
            m.train()
            with torch.no_grad():
                x = before(x0)
            x.requires_grad_()
            t = time.perf_counter()
            m(x).backward(dy)
            return time.perf_counter() - t
        return call

    calls = {f"{side} {mode}": (eval_call if mode == "eval" else train_call)(m)
             for side, m in mods.items() for mode in ("eval", "train")}
    order = list(calls)
    rng = random.Random(0)
    times = {name: [] for name in calls}
    for r in range(rounds + 5):
        rng.shuffle(order)
        for name in order:
            t = calls[name]()
            if r >= 5:
                times[name].append(t * 1e6)
    return {name: float(np.median(v)) for name, v in times.items()}


def _interleaved(calls: dict, rounds: int = 200, per_round: int = 20) -> dict:
    """Median per-call µs of each contender, the contenders taking turns round by round."""
    for call in calls.values():
        for _ in range(per_round):
            call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for _ in range(per_round):
                call()
            times[name].append((time.perf_counter() - t) / per_round * 1e6)
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=normkit.get_num_threads())
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    normkit.set_num_threads(args.threads)
    print(f"threads: {args.threads}; medians of {args.rounds} interleaved rounds, µs per call")
    print("| NumPy | raw kernel | frontend | frontend - kernel | lookup |")
    print("|---|---|---|---|---|")
    for op, shape in NUMPY_SHAPES:
        t = _interleaved(_numpy_calls(op, shape), args.rounds)
        print(f"| {op} {shape} | {t['kernel']:.1f} | {t['numpy frontend']:.1f} | "
              f"{t['numpy frontend'] - t['kernel']:.1f} | {t['lookup']:.2f} |")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(args.threads)
    print("\n| PyTorch | F no_grad | normkit no_grad | ratio | F fwd+bwd | normkit fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for op, shape in TORCH_SHAPES:
        t = _interleaved(_torch_calls(op, shape), max(args.rounds // 2, 1), per_round=5)
        print(f"| {op} {shape} | {t['torch no_grad']:.1f} | {t['normkit no_grad']:.1f} | "
              f"{t['normkit no_grad'] / t['torch no_grad']:.2f} | {t['torch fwd+bwd']:.1f} | "
              f"{t['normkit fwd+bwd']:.1f} | {t['normkit fwd+bwd'] / t['torch fwd+bwd']:.2f} |")
    print("\nIn a model's context: the module right after the layer before it (convolution / linear), "
          "random order")
    print("| module | torch eval | normkit eval | ratio | torch train fwd+bwd | normkit train fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, op, shape in MODEL_CONTEXT:
        t = _model_context(op, shape, args.rounds)
        print(f"| {name} {shape} | {t['torch eval']:.1f} | {t['normkit eval']:.1f} | "
              f"{t['normkit eval'] / t['torch eval']:.2f} | {t['torch train']:.1f} | {t['normkit train']:.1f} | "
              f"{t['normkit train'] / t['torch train']:.2f} |")


@pytest.mark.parametrize("op,shape", NUMPY_SHAPES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in NUMPY_SHAPES])
@pytest.mark.parametrize("contender", ["kernel", "numpy frontend", "lookup"])
def test_numpy_overhead(benchmark, op, shape, contender):
    benchmark(_numpy_calls(op, shape)[contender])


@pytest.mark.parametrize("op,shape", TORCH_SHAPES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in TORCH_SHAPES])
@pytest.mark.parametrize("contender", ["torch no_grad", "normkit no_grad", "torch fwd+bwd", "normkit fwd+bwd"])
def test_torch_overhead(benchmark, op, shape, contender):
    pytest.importorskip("torch")
    benchmark(_torch_calls(op, shape)[contender])


if __name__ == "__main__":
    main(sys.argv[1:])
