"""Non-temporal stores in the Cython kernels: where do they win? (the threshold in
src/normkit_kernels/cython/kernels.py)

    python benchmarks/nt_stores.py [--threads 2] [--direction forward|backward] [--ops gn,ln,bn,in]
                                   [--layout nchw|nhwc]

Each kernel runs with its outputs written by ordinary stores and by non-temporal ones (``set_stream_min_bytes``
at 2**62 and at 0: the same kernel, same results), interleaved call by call in shuffled rounds, medians; and each
followed by a two-thread read of its output, as a model's next layer reads it: a non-temporal store leaves the
output in memory, not in the cache, so a small output that the next layer would have found in cache costs a trip
to memory instead. Outputs from 2 to 51 MB, float32, 64-byte-aligned arrays. ``--layout nhwc``: the channels-last
kernels, on (N, H*W, C) data (LayerNorm has none).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import normkit
from normkit import bench, ceiling, registry
from normkit.alloc import aligned_empty
from normkit.contract import NCHW, NHWC

SHAPES = [(8, 64, 32, 32), (8, 128, 32, 32), (16, 128, 32, 32), (8, 256, 32, 32), (16, 256, 32, 32),
          (8, 256, 56, 56), (32, 64, 56, 56), (32, 128, 56, 56)]
OPS = {"gn": "groupnorm", "ln": "layernorm", "bn": "batchnorm", "in": "instancenorm"}


def _kernel_shape(op: str, shape: tuple, layout: str) -> tuple:
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    if op == "layernorm":
        return (n, c * s)
    return (n, c, s) if layout == NCHW else (n, s, c)


def _calls(op: str, shape: tuple, direction: str, layout: str):
    """(kernel, its arguments, its data output) on random data of ``shape``."""
    rng = np.random.default_rng(0)
    groups = 32 if op == "groupnorm" else None
    kshape = _kernel_shape(op, shape, layout)
    c = kshape[1] if op == "layernorm" else shape[1]  # LayerNorm's parameters: one per value of a row
    stat = {"layernorm": (shape[0],), "groupnorm": (shape[0], groups), "batchnorm": (c,),
            "instancenorm": (shape[0], c)}[op]

    def data():
        a = aligned_empty(kshape, np.float32)
        a[...] = rng.standard_normal(kshape, dtype=np.float32)
        return a
    x, out = data(), data()
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    mean, rstd = np.empty(stat, np.float32), np.empty(stat, np.float32)
    grouped = (groups,) if groups else ()
    forward = registry.lookup(op, "forward", "float32", "cython", layout)[1]
    args = (x, *grouped, w, b, 1e-5, out, mean, rstd)
    if direction == "forward":
        return forward, args, out
    forward(*args)
    backward = registry.lookup(op, "backward", "float32", "cython", layout)[1]
    return backward, (data(), x, *grouped, mean, rstd, w, out, np.empty(c, np.float32), np.empty(c, np.float32)), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=normkit.get_num_threads())
    parser.add_argument("--direction", choices=["forward", "backward"], default="forward")
    parser.add_argument("--ops", default=None, help="default: gn,ln,bn, or gn,in,bn with --layout nhwc")
    parser.add_argument("--layout", choices=[NCHW, NHWC], default=NCHW)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    if args.ops is None:
        args.ops = "gn,in,bn" if args.layout == NHWC else "gn,ln,bn"
    unknown = sorted(set(args.ops.split(",")) - set(OPS))
    if unknown:
        parser.error(f"--ops: {', '.join(unknown)} not among {', '.join(OPS)} (the kernels that have streaming loops)")
    if args.layout == NHWC and "ln" in args.ops.split(","):
        parser.error("--ops: ln has no channels-last kernel (--layout nhwc)")
    from normkit_kernels.cython import kernels

    normkit.set_num_threads(args.threads)
    ceiling.set_threads(args.threads)
    bench.recycle_freed_memory()
    print(f"threads {args.threads}, {args.direction}, {args.layout}; median ms of {args.rounds} rounds; last-level "
          f"cache {kernels.last_level_cache_bytes()} bytes; default threshold {kernels.default_stream_min_bytes()} "
          "bytes")
    print("| op | shape | output MB | ordinary | streamed | ratio | + read: ordinary | streamed | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for shape in SHAPES:
            for name in args.ops.split(","):
                op = OPS[name]
                kernel, kargs, out = _calls(op, shape, args.direction, args.layout)
                words = out.reshape(-1).view(np.uint64)

                def run(stream, consume, kernel=kernel, kargs=kargs, words=words):
                    kernels.set_stream_min_bytes(0 if stream else 1 << 62)
                    kernel(*kargs)
                    if consume:
                        ceiling.read(words)
                keys = [(s, c) for s in (False, True) for c in (False, True)]
                times = bench._measure([lambda k=k: run(*k) for k in keys], args.rounds, 0, lambda f: None)
                med = {k: float(np.median(t)) * 1e3 for k, t in zip(keys, times)}
                ratio = med[True, False] / med[False, False]
                print(f"| {name} | {'x'.join(map(str, shape))} | {out.nbytes / 1e6:.1f} | "
                      f"{med[False, False]:.3f} | {med[True, False]:.3f} | {ratio:.2f} | "
                      f"{med[False, True]:.3f} | {med[True, True]:.3f} | {med[True, True] / med[False, True]:.2f} |",
                      flush=True)
    finally:
        kernels.set_stream_min_bytes(None)


if __name__ == "__main__":
    main()
