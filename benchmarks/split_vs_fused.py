"""The split BatchNorm training step (stats + apply, backward_reduce + backward_apply) against the fused kernels,
interleaved call by call as ``normkit bench`` does, so that the machine's drift cancels out of each ratio.

    python benchmarks/split_vs_fused.py                       # cython and numba, the two shapes, 2 threads
    python benchmarks/split_vs_fused.py --backends numba --threads 1 --min-time 5

The split pass is timed as a training step runs it: both kernels plus the per-channel coefficients computed in
NumPy between them (rstd, scale/shift or a/b/d; microseconds), on preallocated outputs. The fused pass is the
kernel alone, as in ``normkit bench``. Printed per case: each median in ms and the median of the per-round ratios
split / fused with its 10th and 90th percentiles.
"""

from __future__ import annotations

import argparse

import numpy as np

import normkit
from normkit import bench, cases, registry, split

SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14))
EPS = cases.EPS


def contenders(case: cases.Case, backend: str, direction: str):
    """(fused call, split call) for one case; the split backward uses the split forward's float64 statistics."""
    inputs = case.make_inputs()
    fused = bench.prepare(case, direction, backend, inputs)
    x, dy, w, b = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"]
    c = x.shape[1]
    count = x.shape[0] * x.shape[2]
    k = {d: registry.lookup("batchnorm", d, case.dtype, backend)[1]
         for d in ("stats", "apply", "backward_reduce", "backward_apply")}
    mean, m2 = np.zeros(c), np.zeros(c)
    y = np.zeros_like(x)
    if direction == "forward":
        def call():
            k["stats"](x, mean, m2)
            rstd = 1.0 / np.sqrt(m2 / count + EPS)
            scale, shift = split.apply_coefficients(mean, rstd, w, b, x.dtype)
            k["apply"](x, scale, shift, y)
        return fused.call, call
    k["stats"](x, mean, m2)
    rstd = 1.0 / np.sqrt(m2 / count + EPS)
    sum_dy, sum_dy_xhat = np.zeros(c), np.zeros(c)
    dx = np.zeros_like(x)

    def call():
        k["backward_reduce"](dy, x, mean, rstd, sum_dy, sum_dy_xhat)
        a, bb, d = split.backward_coefficients(mean, rstd, w, sum_dy, sum_dy_xhat, count, x.dtype)
        k["backward_apply"](dy, x, a, bb, d, dx)
    return fused.call, call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="cython,numba")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of interleaved rounds per pair")
    args = parser.parse_args()
    normkit.set_num_threads(args.threads)
    bench.recycle_freed_memory()
    print(f"threads={args.threads}; {bench.machine_line(bench.machine_info(args.threads, None))}")
    print(f"{'backend':8} {'case':34} {'direction':9} {'fused ms':>9} {'split ms':>9} {'split/fused (p10-p90)':>24}")
    for backend in args.backends.split(","):
        for shape in SHAPES:
            case = cases.Case("batchnorm", shape, "float32")
            for direction in ("forward", "backward"):
                fused, splitted = contenders(case, backend, direction)
                fused(), splitted()  # compile (numba) and touch every buffer
                times = bench._measure([fused, splitted], None, args.min_time, lambda _: None)
                p10, med, p90 = bench.paired_ratio(times[1], times[0])
                print(f"{backend:8} {case.label:34} {direction:9} {np.median(times[0]) * 1e3:9.3f} "
                      f"{np.median(times[1]) * 1e3:9.3f} {med:10.2f} ({p10:.2f}-{p90:.2f})", flush=True)


if __name__ == "__main__":
    main()
