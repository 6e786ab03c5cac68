"""First-call cost of each Numba kernel: compilation with an empty cache, then loading from the cache.

    python benchmarks/numba_first_call.py [--dtype float32] [--op layernorm] [--direction forward] [--json out.json]

For every (op, direction) of the numba backend, in a fresh process each:

1. ``cold``: ``NUMBA_CACHE_DIR`` points at a new empty directory; the process imports normkit, looks the kernel up
   (importing the backend's modules) and calls it once on a small case of the conformance kit with weight and bias.
   The first call is where numba compiles (the kernels are compiled lazily, for the argument types they meet).
2. ``warm``: a second fresh process with the same cache directory does the same; its first call loads the machine
   code that the cold process cached.

Reported per kernel: the import + lookup time and the first call's time, cold and warm, and the cold first call's
CPU time (numba's compiler is single-threaded, so on a busy machine, where the wall time stretches, the CPU time
is what an idle machine's wall time would be).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from normkit import registry, testing
from normkit.contract import HALF_DTYPES, arg_dtype
op, direction, dtype = sys.argv[1:4]
kernel = registry.lookup(op, direction, dtype, "numba")[1]
t1 = time.perf_counter()
cases = testing.cases(op, direction, dtype)
case = next((c for c in cases if c.affine == "weight+bias"), cases[0])
inputs = testing._inputs(case)
storage = lambda t: np.uint16 if t in HALF_DTYPES else t  # 16-bit data as its bit patterns, as kernels take it
outs = {k: None if s is None else np.zeros(s, storage(arg_dtype(direction, k, dtype)))
        for k, s in testing._output_shapes(case, inputs).items()}
args = testing._args(case, {**inputs, **outs})
t2, c2 = time.perf_counter(), time.process_time()
kernel(*args)
t3, c3 = time.perf_counter(), time.process_time()
print(json.dumps({"load_s": t1 - t0, "first_call_s": t3 - t2, "first_call_cpu_s": c3 - c2}))
"""


def kernels(dtype: str, ops=None, directions=None) -> list[tuple[str, str]]:
    from normkit import registry

    table = [b for b in registry.list_backends(load=False) if b.name == "numba"][0].implements
    return [(op, d) for op, d, t in table if t == dtype and (not ops or op in ops)
            and (not directions or d in directions)]


def run_child(op: str, direction: str, dtype: str, cache_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", CHILD, op, direction, dtype], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--direction", action="append", help="only this direction (repeatable)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'op':<14}{'direction':<17}{'cold load s':>12}{'cold call s':>12}{'cold cpu s':>12}{'warm load s':>12}"
          f"{'warm call s':>12}", flush=True)
    for op, direction in kernels(args.dtype, args.op, args.direction):
        with tempfile.TemporaryDirectory(prefix="nk-numba-cache-") as cache:
            cold = run_child(op, direction, args.dtype, cache)
            warm = run_child(op, direction, args.dtype, cache)
        rows.append({"op": op, "direction": direction, "dtype": args.dtype, "cold": cold, "warm": warm})
        print(f"{op:<14}{direction:<17}{cold['load_s']:>12.2f}{cold['first_call_s']:>12.2f}"
              f"{cold['first_call_cpu_s']:>12.2f}{warm['load_s']:>12.2f}{warm['first_call_s']:>12.2f}", flush=True)
    cold_total = sum(r["cold"]["first_call_s"] for r in rows)
    cpu_total = sum(r["cold"]["first_call_cpu_s"] for r in rows)
    print(f"total cold first calls: {cold_total:.1f} s ({cpu_total:.1f} s CPU) over {len(rows)} kernels; "
          f"load average {os.getloadavg()[0]:.2f} at the end", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "load_average_end": os.getloadavg()[0]}, f, indent=2)


if __name__ == "__main__":
    main()
