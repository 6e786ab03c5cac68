"""Do the kernels lose speed on arrays that are not 64-byte aligned?

    python benchmarks/alignment.py [--threads 2] [--rounds 60]

For LayerNorm (8192, 1024) backward and GroupNorm (8, 256, 56, 56) G=32 forward, each built-in compiled backend
runs on the same data placed three ways, interleaved call by call (shuffled rounds, as ``normkit bench``):

- ``all 64``: inputs and outputs start on a 64-byte boundary (what normkit's frontends and torch allocate);
- ``in 16``: the inputs (x, and dy backward) start 16 bytes past a 64-byte boundary (where NumPy's large
  allocations usually land), the outputs at 64;
- ``all 16``: inputs and outputs at 16 past a boundary.

Printed: median and minimum ms per layout, the per-round ratio of each layout to ``all 64`` (median and p10-p90)
and the ratio of the minima (on a busy machine the minimum is the least disturbed call).
"""

from __future__ import annotations

import argparse
import ctypes
import os

import numpy as np

import normkit
from normkit import bench, registry
from normkit.cases import Case

CASES = [(Case("ln", (8192, 1024), ln_dims=1), "backward"), (Case("gn", (8, 256, 56, 56), groups=32), "forward")]
LAYOUTS = {"all 64": (0, 0), "in 16": (16, 0), "all 16": (16, 16)}  # (inputs' offset, outputs' offset)


def placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` starting ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 64 + offset
    out = np.ndarray(a.shape, a.dtype, raw, start)
    out[...] = a
    return out


def contender(case: Case, direction: str, backend: str, in_off: int, out_off: int):
    inputs = {k: placed(v, in_off if k in ("x", "dy") else 0) for k, v in case.make_inputs().items()}
    forward = registry.lookup(case.op, "forward", case.dtype, backend)[1]
    stats = case.empty_outputs("forward")
    stats["y"] = placed(stats["y"], out_off)
    if direction == "forward":
        args = case.forward_args(inputs, stats)
        kernel = forward
    else:
        forward(*case.forward_args(inputs, stats))
        del stats["y"]
        out = case.empty_outputs("backward")
        out["dx"] = placed(out["dx"], out_off)
        args = case.backward_args(inputs, stats, out)
        kernel = registry.lookup(case.op, "backward", case.dtype, backend)[1]
    return lambda: kernel(*args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--backend", action="append", help="[default: numba and cython]")
    args = parser.parse_args(argv)
    normkit.set_num_threads(args.threads)
    backends = args.backend or ["numba", "cython"]
    print(f"{args.threads} threads, {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}")
    for case, direction in CASES:
        names, calls = [], []
        for b in backends:
            for layout, (i, o) in LAYOUTS.items():
                names.append((b, layout))
                calls.append(contender(case, direction, b, i, o))
        for call in calls:  # compile, first touch
            call()
            call()
        times = bench._measure(calls, args.rounds, 0.0, lambda f: None)
        print(f"\n{case.label} {direction}")
        for (b, layout), t in zip(names, times):
            base = times[names.index((b, "all 64"))]
            p10, med, p90 = bench.paired_ratio(t, base)
            print(f"  {b:<8}{layout:<8}{np.median(t) * 1e3:9.3f} ms (min {t.min() * 1e3:.3f})   vs all 64: "
                  f"{med:.3f} [{p10:.3f}-{p90:.3f}], min/min {t.min() / base.min():.3f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
