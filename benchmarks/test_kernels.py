"""pytest-benchmark suite: every backend, PyTorch's own kernel and the copy and read ceilings on the cases of
``normkit.cases`` (the same table ``normkit bench --cases reference`` runs and the tests use).

    pytest benchmarks                                  # the reference cases, all installed backends
    pytest benchmarks --benchmark-disable              # every contender once, untimed: a smoke test
    NORMKIT_BENCH_CASES=small pytest benchmarks        # the tiny cases
    NORMKIT_BENCH_BACKENDS=numba,reference pytest benchmarks
    pytest benchmarks --benchmark-autosave; ...; pytest benchmarks --benchmark-compare   # across commits

pytest-benchmark runs one contender after another, so on a busy machine the drift between them lands in the
comparison; ``normkit bench`` interleaves contenders call by call and is the one to read for "which is faster".
This suite is for following one kernel's speed across commits. Each test's ``extra_info`` has the bytes a pass
must move and the GB/s at the median.
"""

from __future__ import annotations

import os

import pytest

from normkit import bench, bench_torch, cases, registry

CASES = cases.case_set(os.environ.get("NORMKIT_BENCH_CASES", "reference"))
_names = os.environ.get("NORMKIT_BENCH_BACKENDS", "")
BACKENDS = [n.strip() for n in _names.split(",") if n.strip()] or bench.default_backends()
CONTENDERS = [*BACKENDS, bench.BASELINE, bench.COPY, bench.READ]

# As in normkit bench: PyTorch allocates its outputs on every call; recycled memory keeps page faults out of it.
bench.recycle_freed_memory()
if bench_torch.available():
    import torch

    torch.set_num_threads(registry.get_num_threads())

_inputs: dict = {}


def inputs_for(case: cases.Case) -> dict:
    """The case's input arrays, shared by its contenders; only the latest case's are kept (they are large)."""
    if case not in _inputs:
        _inputs.clear()
        _inputs[case] = case.make_inputs()
    return _inputs[case]


@pytest.mark.parametrize("name", CONTENDERS)
@pytest.mark.parametrize("direction", bench.DIRECTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel(benchmark, case, direction, name):
    if name == bench.BASELINE and not bench_torch.available():
        pytest.skip("torch is not installed")
    try:
        contender = bench.prepare(case, direction, name, inputs_for(case))
    except (ValueError, TypeError) as exc:  # not installed, failed to load, or lacks this kernel
        pytest.skip(str(exc))
    contender.call()  # the first call compiles (Numba) and touches the buffers: not part of the timing
    nbytes = case.bytes_moved(direction)
    benchmark.group = f"{case.id} {direction}"
    benchmark.extra_info["bytes"] = nbytes
    benchmark(contender.call)
    if not benchmark.disabled:
        benchmark.extra_info["gb_per_s"] = round(bench.gb_per_s(nbytes, benchmark.stats.stats.median), 2)
