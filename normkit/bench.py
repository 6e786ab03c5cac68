"""``normkit bench`` as a library function: time the training forward and backward of the normalization ops for
every selected backend, against PyTorch's own CPU kernels (and, with ``compile=True``, ``torch.compile``'d
``torch.nn.functional`` calls), and against the memory ceiling: a copy and a pure read of the same bytes on the
same number of threads (:mod:`normkit.ceiling`).

How the measurement stays honest on a noisy machine:

- every kernel is called directly (``registry.lookup``) on arrays allocated once, in the positional layout of
  :mod:`normkit.contract`; PyTorch's kernels are called directly too (:mod:`normkit.bench_torch`);
- the first call of each contender (JIT compilation, first touch of its buffers) is timed on its own and
  reported apart; a few more untimed warm-up calls follow;
- contenders are interleaved call by call: every round calls each once, in a freshly shuffled order, so drift in
  clock speed or in other processes' load hits all of them alike, and no contender always runs right after the
  same neighbour (whose leftover threads or cache contents could help or hurt it);
- each row reports the median and the p10-p90 spread over rounds; the ratio to PyTorch is taken within each
  round and then the median of those ratios, and so are the ratio to the better of PyTorch and torch.compile and
  the percentages of the copy and read ceilings;
- glibc is told to recycle freed memory (:func:`recycle_freed_memory`) so that PyTorch, which allocates its
  outputs on every call, is not charged for page faults that have nothing to do with its kernel.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Callable, Sequence

import numpy as np

from . import alloc, bench_torch, registry
from .cases import Case, select_cases
from .contract import LAYOUTS, NCHW, NHWC

BASELINE = "pytorch"
COMPILED = "torch.compile"
COPY = "copy"
READ = "read"
CEILINGS = ("copy", "read")  # the kinds of the ceiling contenders
DIRECTIONS = ("forward", "backward")
SCHEMA = "normkit.bench/2"
DEFAULT_MIN_TIME = 1.0  # seconds of interleaved rounds per case and direction
MIN_ROUNDS = 5
MAX_ROUNDS = 1000
WARMUP_ROUNDS = 2
# Sanity check of every backend's output against PyTorch's (relative to max(1, max |torch|)); the test suite
# holds the backends to much tighter bounds against the float64 reference.
CHECK_TOL = {("float32", "forward"): 1e-4, ("float32", "backward"): 1e-3,
             ("float64", "forward"): 1e-9, ("float64", "backward"): 1e-8,
             # a few ulps of the 16-bit types (PyTorch's 16-bit kernels are themselves off by an ulp or two)
             ("bfloat16", "forward"): 2e-2, ("bfloat16", "backward"): 4e-2,
             ("float16", "forward"): 3e-3, ("float16", "backward"): 6e-3}


class BenchError(RuntimeError):
    """Nothing could be benchmarked (e.g. no selected backend loads)."""


# --- contenders ------------------------------------------------------------------------------------------------

@dataclass
class Contender:
    """One thing to time: ``call()`` runs one pass; ``output()`` runs one and returns what it computed of
    :data:`CHECKED` (kernel shapes, as the kernels store them)."""

    name: str
    kind: str  # "backend", "baseline" (PyTorch), "peer" (torch.compile), "copy" or "read"
    call: Callable[[], object]
    output: Callable[[], dict[str, np.ndarray]] | None = None
    load_s: float = 0.0


# the outputs of a pass that are compared with PyTorch's (the statistics follow other conventions in torch)
CHECKED = {"forward": ("y", "h"), "backward": ("dx", "dweight", "dbias")}


def _nhwc(a: np.ndarray, near=()) -> np.ndarray:
    """(N, C, S) -> the same values as a C-contiguous (N, S, C) array, 64-byte aligned (and placed beside ``near``)
    as the NCHW arrays are."""
    return alloc.aligned_copy(a.transpose(0, 2, 1), near)


def prepare(case: Case, direction: str, name: str, inputs: dict | None = None, layout: str = NCHW) -> Contender:
    """A ready-to-time contender: a backend's kernel with preallocated outputs, PyTorch's kernel
    (``name="pytorch"``), torch.compile's (``name="torch.compile"``; its compilation is ``load_s``), or a ceiling:
    ``"copy"`` (read half of the pass's bytes, write the other half) or ``"read"`` (read all of them), on the
    thread count of :func:`normkit.get_num_threads`. ``layout="nhwc"``: the channels-last kernel on (N, S, C)
    data, PyTorch's on a channels-last tensor; ``output()`` still gives the (N, C, S) values.

    Raises what :func:`normkit.registry.lookup` raises when a backend is missing, failed to load, or lacks the
    kernel (ValueError when it has no channels-last kernel), and :class:`normkit.bench_torch.CompileUnavailable`
    when torch.compile cannot run.
    """
    inputs = case.make_inputs() if inputs is None else inputs
    if name in CEILINGS:
        from . import ceiling

        ceiling.set_threads(registry.get_num_threads())
        nbytes = case.bytes_moved(direction)
        if name == COPY:
            src, dst = ceiling.words(nbytes // 2), ceiling.words(nbytes // 2)
            return Contender(COPY, "copy", lambda: ceiling.copy(src, dst))
        src = ceiling.words(nbytes)
        return Contender(READ, "read", lambda: ceiling.read(src))
    if name == BASELINE:
        call, output = bench_torch.prepare(case, direction, inputs, layout)
        return Contender(BASELINE, "baseline", call, output)
    if name == COMPILED:
        call, output, compile_s = bench_torch.prepare_compiled(case, direction, inputs, layout)
        return Contender(COMPILED, "peer", call, output, compile_s)
    start = time.perf_counter()
    if layout == NHWC:
        found = [registry.lookup(case.op, case.kernel_direction(d), case.dtype, name, NHWC)
                 for d in ("forward", direction)]
        if None in found:
            raise ValueError(f"backend {name!r} has no channels-last {case.op} kernel")
        forward, kernel = found[0][1], found[1][1]
        inputs = {**inputs, "x": _nhwc(inputs["x"]), "dy": _nhwc(inputs["dy"])}
    else:
        _, forward = registry.lookup(case.op, case.kernel_direction("forward"), case.dtype, name)
        kernel = forward if direction == "forward" else \
            registry.lookup(case.op, case.kernel_direction("backward"), case.dtype, name)[1]
    load_s = time.perf_counter() - start
    # the outputs beside the inputs that their pass reads, as the NumPy frontend allocates them
    near = tuple(inputs[arg] for arg in (("x", "residual") if direction == "forward" else ("x", "dy", "dh"))
                 if arg in inputs)
    out = case.empty_outputs(direction, near)
    data = "y" if direction == "forward" else "dx"
    if layout == NHWC:
        out[data] = _nhwc(out[data], near)
    if direction == "forward":
        args, result = case.forward_args(inputs, out), out["y"]
    else:
        # backward takes the statistics of this backend's own training forward, as in a training step
        stats = case.empty_outputs("forward", near[:1])  # h, for the fused add, beside x
        if layout == NHWC:
            stats["y"] = _nhwc(stats["y"], near[:1])
        forward(*case.forward_args(inputs, stats))
        del stats["y"]
        args, result = case.backward_args(inputs, stats, out), out["dx"]

    def call():
        kernel(*args)

    def output():
        kernel(*args)
        named = {k: out[k] for k in CHECKED[direction] if k in out and k in case.spec.args(case.kernel_direction(
            direction))}
        if layout == NHWC:
            named[data] = result.transpose(0, 2, 1)
        return named

    return Contender(name, "backend", call, output, load_s)


# --- statistics ------------------------------------------------------------------------------------------------

def spread(times) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    p10, med, p90 = np.percentile(np.asarray(times, np.float64), [10, 50, 90])
    return float(p10), float(med), float(p90)


def paired_ratio(times, base) -> tuple[float, float, float]:
    """Per-round ratios times[r] / base[r], summarized as (p10, median, p90): the rounds pair calls made moments
    apart, so a slow patch of the machine cancels out of each ratio."""
    return spread(np.asarray(times, np.float64) / np.asarray(base, np.float64))


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --- the machine -----------------------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults of the two
_recycling = False  # recycle_freed_memory is in effect


def recycle_freed_memory() -> str | None:
    """Make glibc keep freed memory and hand it out again instead of returning it to the kernel.

    By default glibc serves large blocks (above a dynamic threshold of at most 32 MB) with a fresh ``mmap`` and
    unmaps them on ``free``, so a large output allocated on every call is page-faulted in again on every call:
    about 10 ms per 25 MB on a typical machine, charged to whatever allocated it. PyTorch allocates its outputs on
    every call (the out= variants of most of these ops are generated wrappers that compute into a temporary and
    copy, which would charge it an extra pass instead), so we switch ``mmap`` off (``M_MMAP_MAX=0``) and trimming
    off (``M_TRIM_THRESHOLD`` at its maximum): a freed block then returns at the next call with its pages still
    mapped. This is process-wide and stays until :func:`release_freed_memory`. Returns the glibc version, or None
    where the C library is not glibc (then PyTorch's rows include those page faults).
    """
    global _recycling
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return None
    _recycling = _recycling or ok
    return f"glibc {version}" if ok else None


def release_freed_memory() -> None:
    """Undo :func:`recycle_freed_memory`: glibc's default limits again, and the freed memory it kept goes back to
    the kernel (``malloc_trim``). glibc's threshold for serving a block by ``mmap`` then stays where it is instead
    of adapting, as after any ``mallopt``."""
    global _recycling
    if not _recycling:
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _recycling = False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on this platform
        return None


def machine_info(threads: int, allocator: str | None) -> dict:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average": _load_average(),  # 1-minute, when the run began: other processes' demand for the CPUs
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("normkit", "numpy", "numba", "torch")},
        "allocator": (f"{allocator}, freed memory recycled (mmap and trimming off)" if allocator
                      else "system default; PyTorch's rows include page faults of its per-call allocations"),
    }


def machine_line(machine: dict) -> str:
    versions = ", ".join(f"{p} {v}" for p, v in machine["versions"].items() if v)
    load = "" if machine["load_average"] is None else f" | load average {machine['load_average']}"
    threads = f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}"
    return (f"{machine['cpu']}, {threads} ({machine['cpus']} CPUs) | {versions} | "
            f"Python {machine['python']}{load}")


# --- results ---------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One contender on one case and direction. Times in seconds; ratios are per-round medians."""

    case: str
    label: str
    op: str
    shape: list[int]
    dtype: str
    groups: int | None
    normalized_shape: list[int] | None
    direction: str
    name: str
    kind: str
    rounds: int
    median_s: float
    p10_s: float
    p90_s: float
    bytes: int
    gb_per_s: float
    pct_of_copy: float  # of the copy ceiling's speed, same bytes, same threads (per-round median)
    pct_of_read: float  # of the pure read's speed
    ratio_to_torch: float | None
    ratio_to_torch_p10: float | None
    ratio_to_torch_p90: float | None
    ratio_to_best: float | None  # to the faster of PyTorch and torch.compile in each round (with --compile)
    first_call_s: float
    load_s: float
    check: str  # "ok", "MISMATCH ..." or "-" (no PyTorch to compare with)
    layout: str = NCHW  # of this row's kernel: "nhwc" (channels-last) or "nchw"


def shown_name(row: Row, channels_last: bool) -> str:
    """A row's contender as the report and the plot name it: a backend's with its kernel's layout in a table that
    has channels-last rows (``channels_last``), where each backend's NCHW kernel runs alongside."""
    return f"{row.name} {row.layout}" if channels_last and row.kind == "backend" else row.name


@dataclass
class BenchResult:
    machine: dict
    settings: dict
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "machine": self.machine, "settings": self.settings, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows]}

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def format(self) -> str:
        """The report: machine line, one table per case and direction, warm-up costs, notes."""
        threads = self.machine["threads"]
        best = any(r.ratio_to_best is not None for r in self.rows)
        lines = [f"normkit bench | {machine_line(self.machine)}",
                 "median and p10-p90 of interleaved rounds; GB/s counts the bytes that must move (x, y forward; "
                 "x, dy, dx backward; the fused add: x, residual, y, h forward, dy, dh, h, dx backward);",
                 f"% copy, % read: share of the speed of a copy (read half the bytes, write half) and of a pure read "
                 f"of the same bytes, on {threads} thread{'s' if threads != 1 else ''}, in the same rounds;",
                 "time/torch: per-round ratio to PyTorch's kernel (< 1 is faster)"
                 + ("; time/best: to the faster of PyTorch and torch.compile in each round" if best else "")
                 if any(r.kind == "baseline" for r in self.rows) else "time/torch: - (no PyTorch baseline in this run)"]
        for (label, direction), rows in _groups(self.rows):
            layout = ", channels-last" if any(r.layout == NHWC for r in rows) else ""
            lines += ["", f"{label}{layout}, {direction}: {rows[0].bytes / 1e6:.1f} MB moved, {rows[0].rounds} rounds",
                      f"  {'backend':<14}{'median ms':>11}{'p10-p90 ms':>21}{'GB/s':>9}{'% copy':>8}{'% read':>8}   "
                      f"{'time/torch':<20}" + (f"{'time/best':<11}" if best else "") + "check"]
            for r in rows:
                if r.kind == "baseline":
                    ratio = "1 (baseline)"
                elif r.ratio_to_torch is None or r.kind in CEILINGS:
                    ratio = "-"
                else:
                    ratio = f"{r.ratio_to_torch:.2f} [{r.ratio_to_torch_p10:.2f}-{r.ratio_to_torch_p90:.2f}]"
                to_best = "-" if r.ratio_to_best is None or r.kind in CEILINGS else f"{r.ratio_to_best:.2f}"
                p1090 = f"{_ms(r.p10_s)} - {_ms(r.p90_s)}"
                check = "" if r.kind in CEILINGS else r.check
                name = shown_name(r, bool(layout))
                lines.append(f"  {name:<14}{_ms(r.median_s):>11}{p1090:>21}{r.gb_per_s:>9.1f}"
                             f"{r.pct_of_copy:>7.0f}%{r.pct_of_read:>7.0f}%   {ratio:<20}"
                             + (f"{to_best:<11}" if best else "") + check)
                lines[-1] = lines[-1].rstrip()
        first: dict[str, float] = {}
        load: dict[str, float] = {}
        compiling: float = 0.0
        for r in self.rows:
            if r.kind == "peer":
                compiling += r.load_s
            if r.kind not in CEILINGS:
                first[r.name] = first.get(r.name, 0.0) + r.first_call_s
            if r.kind == "backend":
                load[r.name] = max(load.get(r.name, 0.0), r.load_s)
        if first:
            lines += ["", "first calls (JIT compilation, first touch of buffers; not in the timings): "
                      + ", ".join(f"{n} {t:.2f} s" for n, t in first.items())]
            loads = [f"{n} {t:.2f} s" for n, t in load.items() if t >= 0.005]
            if loads:
                lines.append("backend loading (imports, cached compilation): " + ", ".join(loads))
            if compiling:
                lines.append(f"torch.compile: {compiling:.1f} s compiling and warming up (not in the timings)")
        if self.notes:
            lines += ["", "notes:"] + [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.4g}" if ms < 1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def _groups(rows: Sequence[Row]):
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.label, r.direction), []).append(r)
    return groups.items()


# --- the run ---------------------------------------------------------------------------------------------------

def default_backends() -> list[str]:
    """Every installed backend in dispatch order, except the slow NumPy reference."""
    return [n for n in registry.get_backend_order() if n != registry.REFERENCE]


def _check_backends(names: Sequence[str]) -> list[str]:
    installed = registry.get_backend_order()
    unknown = [n for n in names if n not in installed]
    if unknown:
        hint = " (PyTorch's kernels are the baseline and run unless turned off)" if BASELINE in unknown else ""
        raise registry.UnknownBackendError(
            f"unknown backend(s) {', '.join(map(repr, unknown))}{hint}; installed backends: {', '.join(installed)}")
    return list(dict.fromkeys(names))


def _directions(direction) -> tuple[str, ...]:
    if direction in (None, "both"):
        return DIRECTIONS
    chosen = (direction,) if isinstance(direction, str) else tuple(direction)
    bad = [d for d in chosen if d not in DIRECTIONS]
    if bad or not chosen:
        raise ValueError(f"direction must be forward, backward or both, got {direction!r}")
    return chosen


def bench(op: str = "all", *, shape=None, groups: int | None = None, dtype: str | None = None, cases=None,
          backends: Sequence[str] | None = None, direction="both", threads: int | None = None,
          repeat: int | None = None, min_time: float = DEFAULT_MIN_TIME, baseline: bool = True,
          compile: bool = False, recycle_memory: bool = True, seed: int = 0, layout: str = NCHW,
          progress: Callable[[float, int, str], None] | None = None) -> BenchResult:
    """Benchmark the training forward and/or backward of ``op`` (a name, an alias or ``"all"``).

    Cases come from :func:`normkit.cases.select_cases` (``shape``, ``groups``, ``dtype``, or a named ``cases``
    set such as ``"reference"``). ``backends`` defaults to :func:`default_backends`; a backend that fails to
    load or lacks a kernel is skipped with a note. ``baseline`` adds PyTorch's CPU kernels when torch is
    installed; ``compile`` adds ``torch.compile``'d ``torch.nn.functional`` calls (compiled before timing; left
    out with a note where torch.compile cannot run). Each case and direction runs ``repeat`` interleaved rounds,
    or rounds until ``min_time`` seconds have passed (at least 5, at most 1000). ``threads`` calls
    :func:`normkit.set_num_threads`; PyTorch runs with the same thread count during the run. ``recycle_memory``
    calls :func:`recycle_freed_memory` for the run (and :func:`release_freed_memory` after it, unless recycling
    was on before), so that no contender pays for page faults of memory freed by the call before.
    ``progress(done, total, label)`` is called as the run advances (``done`` counts case-directions, with
    fractions). ``layout="nhwc"``: the channels-last kernels of the channel ops (the row ops' cases are left out,
    and groupnorm's with one spatial dim, where torch has no channels-last format) against PyTorch on channels-last
    tensors, each backend's NCHW kernel timed alongside for comparison.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    selected = select_cases(op, shape=shape, groups=groups, dtype=dtype, cases=cases)
    if layout == NHWC:
        # (torch's group_norm takes channels-last input in its memory formats only: 4-D and 5-D)
        selected = [c for c in selected if c.spec.sets != "row" and len(c.shape) > (3 if c.spec.grouped else 2)]
        if not selected:
            raise ValueError("--layout nhwc applies to batchnorm and instancenorm on inputs with spatial dims, and "
                             "to groupnorm on inputs with 2 or 3 (torch has channels-last formats for those only)")
    directions = _directions(direction)
    names = _check_backends(default_backends() if backends is None else backends)
    if not names:
        raise BenchError("no backend selected")
    if repeat is not None and (isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1):
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    if not min_time >= 0:
        raise ValueError(f"min_time must be >= 0 seconds, got {min_time!r}")
    if threads is not None:
        registry.set_num_threads(threads)
    n_threads = registry.get_num_threads()
    notes: list[str] = []
    if baseline and not bench_torch.available():
        baseline = False
        notes.append("PyTorch is not installed, so there is no baseline column (pip install 'normkit[torch]')")
    if compile and not bench_torch.available():
        compile = False
        notes.append("PyTorch is not installed, so there is no torch.compile column (pip install 'normkit[torch]')")
    elif compile:
        try:
            bench_torch.check_compiler()
        except bench_torch.CompileUnavailable as exc:
            compile = False
            notes.append(f"no torch.compile column: {exc}")
    recycled_here = recycle_memory and not _recycling
    allocator = recycle_freed_memory() if recycle_memory else None
    torch_threads = None
    try:
        settings = {"directions": list(directions), "repeat": repeat, "min_time": None if repeat else min_time,
                    "warmup_rounds": WARMUP_ROUNDS, "baseline": baseline, "compile": compile, "backends": names,
                    "layout": layout,
                    "cases": [c.id for c in selected]}
        result = BenchResult(machine_info(n_threads, allocator), settings, notes=notes)
        load = result.machine["load_average"]
        if load is not None and load > 0.5:
            notes.append(f"the machine was busy when the run began (load average {load} on {os.cpu_count()} CPUs): a "
                         f"parallel kernel waits for its slowest thread, and a preempted thread costs milliseconds, so "
                         f"timings are noisy and pessimistic; rerun on an idle machine, or with fewer threads "
                         f"(--threads 1)")
        tasks = [(case, d) for case in selected for d in directions]
        active = _load(names, notes)

        if baseline or compile:
            import torch

            torch_threads = torch.get_num_threads()
            torch.set_num_threads(n_threads)
        for i, (case, d) in enumerate(tasks):
            def tick(fraction, i=i, label=f"{case.label} {d}"):
                if progress is not None:
                    progress(i + min(fraction, 1.0), len(tasks), label)

            tick(0.0)
            result.rows += _run_task(case, d, active, baseline, compile, repeat, min_time, seed, notes, tick, layout)
    finally:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        if recycled_here:
            release_freed_memory()
    if not any(r.kind == "backend" for r in result.rows):
        raise BenchError("no selected backend could run: " + "; ".join(n for n in notes if n.startswith("backend ")))
    return result


def _load(names: Sequence[str], notes: list[str]) -> list[str]:
    """The backends whose kernels load; each one that fails becomes a note (instead of a warning) and is left out."""
    loaded = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="normkit: backend", category=RuntimeWarning)
        for info in registry.list_backends(load=False):
            if info.name not in names:
                continue
            if info.implements and info.status != "failed":
                try:
                    registry.lookup(*info.implements[0], backend=info.name)  # imports its kernels module
                    loaded.append(info.name)
                    continue
                except (ValueError, TypeError):
                    info = {b.name: b for b in registry.list_backends(load=False)}[info.name]
            why = info.error or "it implements nothing"
            _note(notes, f"backend {info.name!r} failed to load and was skipped: {why}")
    return [n for n in names if n in loaded]


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def _first_call(contender) -> float:
    """The contender's first call (a Numba kernel's includes its compilation or cache load), in seconds."""
    start = time.perf_counter()
    contender.call()
    return time.perf_counter() - start


def _run_task(case, direction, names, baseline, compile, repeat, min_time, seed, notes, tick,
              layout=NCHW) -> list[Row]:
    inputs = case.make_inputs(seed)
    contenders, layouts, first = [], [], []
    for name in names:
        # channels-last: each backend's NCHW kernel runs alongside, for the ratio of the two
        for lay in (NHWC, NCHW) if layout == NHWC else (NCHW,):
            try:
                c = prepare(case, direction, name, inputs, lay)
                first.append(_first_call(c))
            except Exception as exc:  # it lacks this op, direction, dtype or layout, or (a plugin's) its kernel raised
                which = f" ({lay})" if layout == NHWC else ""
                why = str(exc) if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"
                _note(notes, f"backend {name!r} skipped for {case.label} {direction}{which}: {why}")
                continue
            contenders.append(c)
            layouts.append(lay)
    if not contenders:
        return []
    if baseline:
        contenders.append(prepare(case, direction, BASELINE, inputs, layout))
    if compile:
        try:
            contenders.append(prepare(case, direction, COMPILED, inputs, layout))
        except bench_torch.CompileUnavailable as exc:
            _note(notes, f"no torch.compile row for {case.label} {direction}: {exc}")
    contenders += [prepare(case, direction, COPY, inputs), prepare(case, direction, READ, inputs)]

    first += [_first_call(c) for c in contenders[len(first):]]
    for _ in range(WARMUP_ROUNDS):
        for c in contenders:
            c.call()
    checks = _check_outputs(case, direction, contenders, notes)
    times = _measure([c.call for c in contenders], repeat, min_time, tick, seed)

    by_kind = {c.kind: t for c, t in zip(contenders, times) if c.kind != "backend"}
    base_t = by_kind.get("baseline")
    best_t = np.minimum(base_t, by_kind["peer"]) if base_t is not None and "peer" in by_kind else None
    rows = []
    layouts += [layout] * (len(contenders) - len(layouts))
    for c, t, first_s, check, lay in zip(contenders, times, first, checks, layouts):
        p10, med, p90 = spread(t)
        ratio = paired_ratio(t, base_t) if base_t is not None else (None, None, None)
        nbytes = case.bytes_moved(direction)
        rows.append(Row(
            case=case.id, label=case.label, op=case.op, shape=list(case.shape), dtype=case.dtype,
            groups=case.groups, normalized_shape=list(case.normalized_shape) if case.normalized_shape else None,
            direction=direction, name=c.name, kind=c.kind, rounds=len(t), median_s=med, p10_s=p10, p90_s=p90,
            bytes=nbytes, gb_per_s=gb_per_s(nbytes, med), pct_of_copy=100.0 * paired_ratio(by_kind["copy"], t)[1],
            pct_of_read=100.0 * paired_ratio(by_kind["read"], t)[1],
            ratio_to_torch=ratio[1], ratio_to_torch_p10=ratio[0], ratio_to_torch_p90=ratio[2],
            ratio_to_best=None if best_t is None else paired_ratio(t, best_t)[1],
            first_call_s=first_s, load_s=c.load_s, check=check, layout=lay,
        ))
    if layout == NHWC:
        for name in names:
            pair = [i for i, c in enumerate(contenders) if c.name == name and c.kind == "backend"]
            if len(pair) == 2:  # (nhwc, nchw)
                ratio = paired_ratio(times[pair[0]], times[pair[1]])[1]
                _note(notes, f"{name}: {case.label} {direction}: channels-last / NCHW time {ratio:.2f}")
    return rows


def _check_outputs(case, direction, contenders, notes) -> list[str]:
    """Compare each backend's outputs (:data:`CHECKED`: y and the fused add's h, or dx, dweight and dbias) with
    PyTorch's once, so that a fast but wrong kernel, or one that skips an output, cannot pass unseen. Each output
    is held to the tolerance relative to its own largest magnitude (at least 1)."""
    base = next((c for c in contenders if c.kind == "baseline"), None)
    if base is None:
        return ["-"] * len(contenders)
    expected = {k: case.values(k, a) for k, a in base.output().items()}
    tol = CHECK_TOL[(case.dtype, direction)]
    checks = []
    for c in contenders:
        if c.kind not in ("backend", "peer"):
            checks.append("-")
            continue
        got = c.output()
        errors = {k: (float(np.abs(case.values(k, got[k]) - e).max()) / max(1.0, float(np.abs(e).max()))
                      if k in got else math.inf) for k, e in expected.items()}
        wrong = {k: err for k, err in errors.items() if not err <= tol}  # (NaN too)
        if not wrong:
            checks.append("ok")
            continue
        worst = max(wrong, key=lambda k: wrong[k] if not math.isnan(wrong[k]) else math.inf)
        checks.append(f"MISMATCH {wrong[worst]:.1e} ({worst})")
        _note(notes, f"{c.name}: {case.label} {direction} differs from PyTorch by "
                     + ", ".join(f"{err:.1e} in {k}" for k, err in wrong.items())
                     + f" (relative), more than {tol:.0e}")
    return checks


def _measure(calls: Sequence[Callable], repeat: int | None, min_time: float, tick, seed: int = 0) -> np.ndarray:
    """Seconds per call, shape (contenders, rounds). Each round calls every contender once, in a shuffled order."""
    k = len(calls)
    shuffle = np.random.default_rng(seed)
    rounds: list[list[int]] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        while True:
            r = len(rounds)
            ns = [0] * k
            for i in shuffle.permutation(k).tolist():
                t0 = time.perf_counter_ns()
                calls[i]()
                ns[i] = time.perf_counter_ns() - t0
            rounds.append(ns)
            r += 1
            elapsed = time.perf_counter() - start
            if repeat is not None:
                tick(r / repeat)
                if r >= repeat:
                    break
            else:
                tick(max(min(elapsed / min_time, 1.0) if min_time else 1.0, r / MAX_ROUNDS) * min(1.0, r / MIN_ROUNDS))
                if (r >= MIN_ROUNDS and elapsed >= min_time) or r >= MAX_ROUNDS:
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return np.array(rounds, np.float64).T * 1e-9
