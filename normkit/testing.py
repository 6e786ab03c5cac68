"""The conformance kit: run a backend's kernels against the float64 reference on the hard cases.

    import normkit.testing
    report = normkit.testing.check_backend("mybackend")      # a list of Failure; empty means it conforms
    print(report)                                             # one line per failing case: which check, how much
    normkit.testing.assert_backend_conforms("mybackend")     # for a plugin's pytest suite: raises with the report

or ``normkit check mybackend`` on the command line. The kit calls the kernels directly, through the kernel
contract (:mod:`normkit.contract`), for every (op, direction, dtype) the backend declares.

What it checks, for every case:

- the outputs against the NumPy reference run in float64 on the very same (already rounded) inputs, within the
  tolerances below; NaN where the reference has NaN (NaN propagation), finite where the reference is finite;
- every output element was written: outputs are pre-filled with a signalling-NaN sentinel whose bit pattern no
  computation produces, and none was read before (arithmetic on the sentinel, an output added into, leaves its
  payload in a quiet NaN);
- no input was modified (bit-for-bit comparison after the call), and nothing was written just outside any of the
  arrays it was given: every array sits inside a larger buffer whose guard zones are compared after the call;
- the kernel did not raise, and gives bit-identical results when called twice on one case per kernel;
- an address ``forward`` kernel that returns a value returns the largest ``|mean| * rstd`` of its sets
  (:mod:`normkit.contract`).

The cases: several shapes per op, including N=1, C=1, S=1, groups=C and groups=1, odd and longer sets, one case
above the built-in backends' serial limit with sets longer than their tiles (their threaded and blocked paths), and
(but for float64) one set of 2**17 values as a ReLU leaves them, half of them equal, on which a float32 sum taken
one term after another drifts out of tolerance (rstd 3e-4 off); every declared direction (training and inference)
and dtype; no affine, weight only, weight and bias, a bias without a weight; data that is standard normal, offset
(mean 1e4, 1e6, 1e8, std 1), constant, constant with a negative eps (NaN), of small variance next to a large eps, or
holding one NaN or one inf (in ``x`` for forward, in ``dy`` for backward; where a set holds an inf any non-finite
result is right, a finite one is not).
``quick=True`` runs a subset. A backend's
channels-last kernels (``layouts=["nhwc"]``; :mod:`normkit.contract`) run the same cases with ``x``, ``dy``, ``y``
and ``dx`` as (N, S, C) arrays, and their outputs are compared on the NCHW view with the same tolerances. Its
address kernels run the NCHW cases, given the same arrays' addresses.

Tolerances (derived; only the constant in K was checked against real kernels). A correct kernel is backward stable:
its result is the exact result for inputs perturbed by a few roundings, plus the rounding of the result. Perturbing
each x_i of a set by ``eps*|x_i|`` (``eps`` = the dtype's machine epsilon) moves the set's mean by at most
``eps*max|x|`` and its standard deviation by at most ``eps*max|x|`` (the rms of the perturbation), so it moves
``xhat = (x - mean) * rstd`` by at most ``eps * kappa * (1 + |xhat|)`` with ``kappa = max|x| * rstd``: the set's
condition number, about 4 for standard normal data, 1e4 for mean 1e4 and std 1, and ``|x| / sqrt(eps_norm)`` for a
constant set. A float32 kernel cannot do better than this, because rounding the inputs to float32 already perturbs
them that much; a kernel that accumulates in float64 does far better and passes easily. Sums of m terms add
``log2(m)`` roundings when summed pairwise or in blocks (what a fast kernel does; float64 accumulation is better
still), so every bound carries the factor ``K(m) = 4 * (2 + log2(m))``: the 2 counts the elementwise roundings
(subtract, scale, affine), the 4 leaves room for kernels that sum sequentially rather than pairwise. Measured
against it, PyTorch's own CPU kernels (the ``aten`` plugin) reach at most a third of the bound, float32 two-pass
kernels a twentieth; the mistakes below miss it by factors of 5 to 1e7. Per element, in float64:

==================  ====================================================================================
output              tolerance
==================  ====================================================================================
y (forward)         K(m) eps (|w| (1 + kappa)(1 + |xhat|) + |b|)      (w = 1, b = 0 without affine)
mean                K(m) eps max|x|                                    (over the set)
rstd                K(m) eps (1 + kappa) rstd
dx (backward)       K(m) eps rstd max|g| (1 + kappa)(1 + |xhat|)       (g = dy * w, max over the set)
dx (backward_infer) K(1) eps |dy w rstd|
dweight             K(n) eps sum(|dy| (1 + kappa)(1 + |xhat|))         (n terms per weight element)
dbias               K(n) eps sum(|dy|)
==================  ====================================================================================

RMSNorm (not centered) is checked with the same bounds, its mean taken as 0 (kappa = max|x| * rstd, xhat = x * rstd).
The fused residual add of the row ops: ``add_forward`` as forward on h = x + residual (for 16-bit data the sum
rounded once to the format, which the kernel normalizes; for the others the exact sum: the kernel's h is rounded
once, which the bounds absorb), h itself held to ``K(1) eps |h|``; ``add_backward`` as backward on h, plus
``K(1) eps (|dh| + |dx|)`` for the added gradient of h (absent, ``dh=None``, in the cases with a weight only).

The split directions of batchnorm (``stats``, ``apply``, ``backward_reduce``, ``backward_apply``; see
:mod:`normkit.contract`) run on the same shapes and data, with arguments as a BatchNorm training step makes them
(float64 statistics of x ignoring a NaN; coefficients from a weight and bias, computed in float64 and rounded to
the dtype), and tolerances derived the same way: ``mean`` as forward's; ``m2`` by how far perturbing the inputs
moves it, ``K(m) eps (m2 + 2 max|x| sqrt(m m2)) + m (K(m) eps max|x|)^2`` (the last term is all a constant set
allows); ``sum_dy`` / ``sum_dy_xhat`` as ``dbias`` / ``dweight``; ``y`` of apply ``K(1) eps (|x scale| + |shift|)``
and ``dx`` of backward_apply ``K(1) eps (|a dy| + |b x| + |d|)``, the rounding of their own few operations.
E[x^2] - E[x]^2 misses m2's bound at mean 1e4 in float32 (90x) and in float64 (190x).

The fused activations (``act_`` directions) run their plain direction's cases, each case with the next of the
activations in turn (leaky_relu's slope 0.2). Tolerances: the plain direction's with the gradient bounded by the
activations' largest slope (1.2), plus ``K(1) eps |y|`` for the activation's own rounding in forward; in backward,
the error ``dz`` of the recomputed ``z`` (forward's bound for y) moves ``act'(z)`` by at most ``dz`` for the smooth
activations, and for relu / leaky_relu an element whose ``|z| <= dz`` may take either side of the jump at 0; that
change ``dg`` of ``g = dy * act'(z)`` is carried through the plain gradient formulas (to dx, dweight, dbias).

In inference mode (``*_infer``) there is no reduction for y and kappa is per element, ``(|x| + |mean|) * rstd``.
For standard normal float32 data on sets of 1000 this allows about 4e-5 on y (1.2e-4 at the tails, where
|xhat| ~ 3.5). At mean 1e4 it allows about 5e-2: the float32 inputs themselves only resolve 1e4 * 6e-8 = 6e-4 of
a standard deviation. At mean 1e8 it asks for finite outputs and little more: float32's spacing there is 8, so a
float32 computation holds no digit of a unit-variance signal (a kernel accumulating in float64 still gets it
right). The mistakes the kit exists to catch are larger by orders of magnitude: E[x^2] - E[x]^2 in working
precision loses all digits at mean 1e4 in float32 (1e8 in float64); eps outside the square root is off by
eps / var relative (caught with variance below eps, and on constant sets, where rstd should be 1/sqrt(eps)); the
unbiased variance is off by 1/(2m) relative (caught on small sets, and in float64 everywhere); a backward that
forgets the weight is off by a factor of w.

16-bit dtypes (bfloat16, float16; see :mod:`normkit.contract`). Inputs are rounded to the 16-bit type (the data
arrays) or to float32 (everything else), and the kernels get the data arrays as ``np.uint16`` bit patterns. A
16-bit output (y, dx) is allowed the contract's 1 ulp (y) or 2 ulp (dx) of the 16-bit type at the float64
reference, plus the tolerance above computed with float32's eps (the slack of float32 arithmetic, far below an
ulp on well-conditioned data); where the reference rounds to +-inf (overflow), that inf is expected (or a value
within the tolerance). bfloat16's range is float32's, so float32 arithmetic may overflow an intermediate where the
result is finite: there an inf of the right sign is accepted for results within the format's top binade. Float32
outputs (mean, rstd, dweight, dbias, the split directions' sums) get the float32 tolerances. The data kinds differ:
float16 cannot hold means of 1e6 or 1e8 (they are left out; 1e3 is added), an ``overflow`` kind multiplies the
weight so that y and dx leave the 16-bit range where |xhat| is large, and float16's ``tiny`` kind divides it so
that they are subnormal. Since an output rounded towards zero stays within an ulp of every element, the mean of a
16-bit output's signed differences from the reference rounded to nearest even (towards the reference's magnitude,
in ulps) over the values that float32 arithmetic gets right to half an ulp must stay within 0.2 ulp where a case
has 4096 distinct ones (a repeated value is one rounding): rounding to nearest even gives about 0 (the built-in
backends at most 0.03), rounding towards zero about -0.5. The rounded reference, not the reference itself: the
errors of correct rounding need not average 0 (a 16-bit dy times a scale just above a power of two, as dx = dy *
weight * rstd where weight * rstd is 256.05, rounds down every time).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import alloc, half, reference, registry
from .contract import (
    ACTIVATIONS, ADDRESS, DIRECTIONS, DTYPES, HALF_DTYPES, LAYOUTS, NCHW, NHWC, OPS, SPECS, SPLIT_DIRECTIONS, OpSpec,
    arg_dtype, plain_direction, with_addresses,
)

__all__ = ["Case", "Failure", "Report", "assert_backend_conforms", "cases", "check_backend", "tolerance_factor"]

# --- the cases -------------------------------------------------------------------------------------------------

# Per kind of normalized set (OpSpec.sets), so that a new op of a known kind needs no cases of its own:
# (shape as the kernel sees it, num_groups); (N, C, S) for the channel ops, (M, K) for the row ops.
_SHAPES = {
    "channel": [((4, 3, 5), None), ((1, 3, 7), None), ((5, 1, 3), None), ((7, 4, 1), None),
                ((3, 4, 700), None)],
    "instance": [((4, 3, 5), None), ((1, 3, 7), None), ((5, 1, 3), None), ((6, 4, 1), None),
                 ((2, 3, 1000), None)],
    "group": [((2, 6, 5), 3), ((1, 6, 7), 6), ((3, 4, 5), 1), ((2, 1, 9), 1), ((4, 6, 1), 2), ((1, 6, 1), 6),
              ((2, 8, 250), 4)],
    "row": [((5, 7), None), ((1, 9), None), ((6, 1), None), ((33, 16), None), ((3, 1000), None)],
}
# One case per kernel above the built-in backends' serial limit (32768 values: their threaded schedules) with sets
# longer than their tiles (8192 values, rows of 4096), where blocked and merged sums meet.
_LARGE = {
    "channel": ((2, 3, 8200), None),
    "instance": ((2, 3, 8200), None),
    "group": ((2, 4, 4200), 2),
    "row": ((9, 4100), None),
}
# One set per kernel of 2**17 values, of data as a ReLU leaves it (half the values equal): adding the same term over
# and over rounds the same way each time, so a float32 sum taken one term after another drifts far beyond K(m) (a
# 3e-4 relative error in rstd), where blocked or pairwise sums and float64 accumulators stay well inside it. Not for
# float64 kernels: a float64 sum taken one term after another (PyTorch's) is off by 4e-13 there, 2.5x the bound.
_LONG = {
    "channel": ((2, 1, 65536), None),
    "instance": ((1, 1, 131072), None),
    "group": ((1, 2, 65536), 1),
    "row": ((1, 131072), None),
}
_LONG_DATA = "rectified"
# One case per 16-bit kernel whose runs (rows; a channel's S values; a channels-last row of C) of 55 values end in
# tails of 7, 7 and 23 values after vectors of 8, 16 and 32: the run-tail rounding check's values (_TAIL_WIDTHS).
_TAILS = {
    "channel": ((4, 55, 55), None),
    "instance": ((4, 55, 55), None),
    "group": ((4, 55, 55), 5),
    "row": ((220, 55), None),
}
# One case per 16-bit kernel of 16384 values in runs of one value (S = 1: BatchNorm1d's (N, C), and the (N*S, C, 1)
# columns view that channels-last BatchNorm runs on) or rows of 4: a path of their own (a scalar one) that rounds
# towards zero meets the rounding-bias check alone (over _BIAS_VALUES distinct values: 16-bit data of one channel
# has a few thousand), where the small S = 1 cases pooled with the others hid it.
_NARROW = {
    "channel": ((1024, 16, 1), None),
    "instance": ((1024, 16, 1), None),
    "group": ((1024, 16, 1), 4),
    "row": ((4096, 4), None),
}
# The shape the data kinds run on: sets of 65..132 values, small enough to be quick, long enough to accumulate.
_DATA_SHAPE = {
    "channel": ((4, 3, 33), None),
    "instance": ((2, 3, 65), None),
    "group": ((2, 6, 35), 3),
    "row": ((4, 129), None),
}
# data kind -> eps. small_var has variance 1e-4 next to eps 1e-3, where eps dominates rstd; negative_eps is
# constant data with a negative eps (torch takes one), where var + eps < 0 makes every result of the set NaN.
_DATA = {"offset1e4": 1e-5, "offset1e6": 1e-5, "offset1e8": 1e-5, "constant": 1e-5, "small_var": 1e-3,
         "nan": 1e-5, "inf": 1e-5, "negative_eps": -1e-5}
_QUICK_DATA = ("offset1e4", "offset1e8", "constant", "small_var", "nan", "overflow")
# The 16-bit dtypes' data kinds: float16's largest value is 65504, so no offsets beyond 1e4 there (and at 1e4, with
# float16's spacing of 8, std-1 sets are constant; at 1e3 they are not); the weight of the overflow kind (float32)
# makes y and dx exceed the 16-bit range for large |xhat|.
_HALF_DATA = {"bfloat16": {**_DATA, "overflow": 1e-5},
              "float16": {"offset1e3": 1e-5, **{k: v for k, v in {**_DATA, "overflow": 1e-5, "tiny": 1e-5}.items()
                                                if k not in ("offset1e6", "offset1e8")}}}
# the weight of the overflow and tiny kinds (the tiny kind's bias too): float16's tiny one makes y and dx subnormal
# (below 6.1e-5)
_DATA_WEIGHT = {"overflow": {"bfloat16": 1e38, "float16": 3e4}, "tiny": {"float16": 1e-5}}
_BF16_MAX = 3.3895313892515355e38
# ulps of the 16-bit type allowed on its outputs (the contract's bounds)
_HALF_ULPS = {"y": 1, "dx": 2}
# A 16-bit output rounded to nearest even differs from the reference rounded so only where float32 arithmetic put
# it on the other side of a tie, either way, so the mean of the differences over many values (signed towards the
# reference's magnitude, in its ulps) is about 0; rounding towards zero makes it about -0.5, within the ulp bounds
# above at every single element. Checked where a case has this many values; smaller
# cases pool theirs per kernel and output (a kernel may round only its short rows' tails, or every small output).
_BIAS_VALUES = 4096
_BIAS_MAX_ULPS = 0.2
# Vector loops end in a scalar tail, where a rounding of its own hides among the other values: the last n % w values
# of each run (a row, a channel's S values, a channels-last row of C) are pooled apart for these widths, and judged
# from this many values.
_TAIL_WIDTHS = (8, 16, 32)
_TAIL_VALUES = 256
# (quick mode takes the first and the third in turn; "bias", a bias without a weight, as torch's layer_norm(x, shape,
# None, bias) hands the kernels, only for the centered ops: RMSNorm has no bias)
_AFFINE = ("none", "weight", "weight+bias", "bias")
# The split directions take no weight or bias; apply and backward_apply take per-channel coefficients that the kit
# derives from a BatchNorm with weight and bias, the reductions none.
_SPLIT_AFFINE = {"stats": "none", "apply": "weight+bias", "backward_reduce": "none", "backward_apply": "weight+bias"}
_SLOPE = 0.2  # leaky_relu's negative slope in the act_ cases

@dataclass(frozen=True)
class Case:
    op: str
    direction: str
    dtype: str
    shape: tuple[int, ...]
    groups: int | None
    affine: str  # one of _AFFINE
    data: str  # "normal" or a key of _DATA
    eps: float
    repeat: bool = False  # also call twice and compare bit for bit
    layout: str = NCHW  # "nhwc": the channels-last kernel, given (N, S, C) data arrays
    activation: int | None = None  # the act_ directions': an index into ACTIVATIONS
    slope: float = _SLOPE
    calls: str = "arrays"  # "addr": the address kernel, given the arrays' addresses (contract.with_addresses)

    def __str__(self) -> str:
        groups = f" groups={self.groups}" if self.groups else ""
        layout = f" layout={self.layout}" if self.layout != NCHW else ""
        layout += " by address" if self.calls == ADDRESS else ""
        act = "" if self.activation is None else f" activation={ACTIVATIONS[self.activation]}"
        return (f"{self.op} {self.direction} {self.dtype} shape={self.shape}{groups}{layout}{act} "
                f"affine={self.affine} data={self.data} eps={self.eps:g}")

    @property
    def training(self) -> bool:
        return not self.direction.endswith("_infer")


def _allowed(op: str, direction: str, shape: tuple[int, ...]) -> bool:
    """Cases the frontends can produce: training statistics need more than one value per set."""
    spec = SPECS[op]
    return not (spec.running and plain_direction(direction) in ("forward", "backward")) or spec.set_size(shape) > 1


def cases(op: str, direction: str, dtype: str, quick: bool = False, layout: str = NCHW) -> list[Case]:
    """The cases the kit runs for one kernel (of ``layout``: the same cases, shapes given as (N, C, S))."""
    if layout != NCHW:
        return [replace(c, layout=layout) for c in cases(op, direction, dtype, quick)]
    out = []
    shapes = [s for s in _SHAPES[SPECS[op].sets] if _allowed(op, direction, s[0])]
    split = direction in SPLIT_DIRECTIONS
    for i, (shape, groups) in enumerate(shapes):
        affines = (_AFFINE[(i % 2) * 2],) if quick else _AFFINE if SPECS[op].centered else _AFFINE[:3]
        if split:
            affines = (_SPLIT_AFFINE[direction],)
        last = i == len(shapes) - 1
        out += [Case(op, direction, dtype, shape, groups, a, "normal", 1e-5, repeat=last and a == "weight+bias")
                for a in affines]
    if not quick:
        affine = _SPLIT_AFFINE[direction] if split else "weight+bias"
        big = [(_LARGE, "normal")] + ([(_LONG, _LONG_DATA)] if dtype != "float64" else []) + (
            [(_TAILS, "normal"), (_NARROW, "normal")] if dtype in HALF_DTYPES else [])
        out += [Case(op, direction, dtype, *shapes_of[SPECS[op].sets], affine, data, 1e-5) for shapes_of, data in big
                if _allowed(op, direction, shapes_of[SPECS[op].sets][0])]
    shape, groups = _DATA_SHAPE[SPECS[op].sets]
    for data, eps in _HALF_DATA.get(dtype, _DATA).items():
        if quick and data not in _QUICK_DATA:
            continue
        affines = (_SPLIT_AFFINE[direction],) if split else ("weight+bias",) if quick else ("none", "weight+bias")
        if data in _DATA_WEIGHT:  # the weight makes the data kind
            affines = [a for a in affines if a != "none"]
        out += [Case(op, direction, dtype, shape, groups, a, data, eps) for a in affines]
    if direction != plain_direction(direction):  # the activations in turn, so that each meets shapes and data
        out = [replace(c, activation=i % len(ACTIVATIONS)) for i, c in enumerate(out)]
    return out


# --- results ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One failed check: the case, which check, and what was measured."""

    case: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.check}: {self.message}"


class Report(list):
    """The failures of one :func:`check_backend` run (a list of :class:`Failure`; empty when all passed)."""

    def __init__(self, backend: str, failures: Iterable[Failure] = (), cases_run: int = 0):
        super().__init__(failures)
        self.backend = backend
        self.cases_run = cases_run

    def summary(self) -> str:
        if not self.cases_run:
            if self:
                return f"backend {self.backend!r} FAILS: it could not be checked"
            return f"backend {self.backend!r}: nothing to check (it declares none of the selected kernels)"
        if not self:
            return f"backend {self.backend!r} conforms: {self.cases_run} cases passed"
        failed_cases = len({f.case for f in self})
        counts: dict[str, int] = {}
        for f in self:
            counts[f.check] = counts.get(f.check, 0) + 1
        by_check = ", ".join(f"{check} ({n})" for check, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"backend {self.backend!r} FAILS: {failed_cases} of {self.cases_run} cases failed; "
                f"failed checks: {by_check}")

    def format(self, limit: int | None = 40) -> str:
        """The summary, then one line per failure, those with the same check and message as an earlier one (a
        kernel that raises the same error on every case) counted on that one's line instead."""
        groups: dict[tuple[str, str], list[Failure]] = {}
        for f in self:
            groups.setdefault((f.check, f.message), []).append(f)
        lines = [self.summary()]
        firsts = list(groups.values())
        shown = firsts if limit is None else firsts[:limit]
        for same in shown:
            more = f" (and {len(same) - 1} more cases with this message)" if len(same) > 1 else ""
            lines.append(f"  {same[0]}{more}")
        rest = sum(len(same) for same in firsts[len(shown):])
        if rest:
            lines.append(f"  ... and {rest} more failures")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --- arrays in guarded buffers ---------------------------------------------------------------------------------

_GUARD = 16  # elements of sentinel before and after every array
# Signalling NaNs with a payload: arithmetic never produces these bits (it yields quiet NaNs), so an output
# element that still holds them was never written.
_SENTINEL = {"float32": (np.uint32, 0x7F80DEAD), "float64": (np.uint64, 0x7FF00000DEADBEEF),
             "bfloat16": (np.uint16, 0x7F8D), "float16": (np.uint16, 0x7DAD)}
# The guard zones of the inputs hold other signalling NaNs, the i-th input's this plus i, so that an output that
# holds one (as it is or made quiet) names the input the kernel read past
_INPUT_SENTINEL = {"float32": 0x7F80BE00, "float64": 0x7FF00000BEEF0000, "bfloat16": 0x7F90, "float16": 0x7D00}
# The same NaN made quiet, payload kept: what arithmetic on a sentinel gives (an output added into, y += ...)
_QUIET_BIT = {"float32": 0x00400000, "float64": 0x0008000000000000, "bfloat16": 0x0040, "float16": 0x0200}


class _Guarded:
    """An array inside a buffer with sentinel-filled guard zones; remembers the buffer's bits for comparison.
    ``shift``: the array starts that many elements past a 64-byte boundary (the frontends hand kernels views that
    start on any element: the contract promises no more). ``guard``: the guard zones' bits (an input's), else the
    output sentinel."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, value: np.ndarray | None, shift: int = 0,
                 guard: int | None = None):
        self.name, self.dtype = name, dtype
        self.itype, bits = _SENTINEL[dtype]
        bits = bits if guard is None else guard
        n = math.prod(shape)
        self.buf = alloc.aligned_empty(n + 2 * _GUARD + shift, np.uint16 if dtype in HALF_DTYPES else dtype)[shift:]
        self.buf.view(self.itype)[:] = bits
        self.sentinel = bits
        self.array = self.buf[_GUARD:_GUARD + n].reshape(shape)
        if value is not None:
            self.array[...] = value
        self.before = self.buf.view(self.itype).copy()

    def bits(self) -> np.ndarray:
        return self.buf.view(self.itype)

    def outside_writes(self) -> str | None:
        changed = self.bits() != self.before
        head, tail = int(changed[:_GUARD].sum()), int(changed[-_GUARD:].sum())
        if not head and not tail:
            return None
        where = " and ".join(s for s in (f"{head} element(s) just before" if head else "",
                                         f"{tail} element(s) just after" if tail else "") if s)
        return f"wrote {where} the {self.name} array"

    def mutated(self) -> str | None:
        changed = (self.bits() != self.before)[_GUARD:-_GUARD].reshape(self.array.shape)
        if not changed.any():
            return None
        first = tuple(int(i) for i in np.argwhere(changed)[0])
        old = self.before[_GUARD:-_GUARD].view(self.array.dtype).reshape(self.array.shape)[first]
        return (f"input {self.name} was modified: {int(changed.sum())} of {changed.size} elements changed, "
                f"first at {first} ({old:.9g} -> {self.array[first]:.9g})")

    def unwritten(self) -> np.ndarray:
        return (self.bits()[_GUARD:-_GUARD] == self.sentinel).reshape(self.array.shape)

    def read_before_written(self) -> np.ndarray:
        return self.holds(self.sentinel | _QUIET_BIT[self.dtype])

    def holds(self, *patterns: int) -> np.ndarray:
        """Where the array's elements have one of the bit ``patterns``."""
        bits = self.bits()[_GUARD:-_GUARD]
        found = np.zeros(bits.shape, bool)
        for p in patterns:
            found |= bits == p
        return found.reshape(self.array.shape)


# --- per-op geometry: how sets and weights map onto elements ---------------------------------------------------

def _spec(case: Case) -> OpSpec:
    return SPECS[case.op]


def _stat_shape(case: Case) -> tuple[int, ...]:
    return _spec(case).stat_shape(case.shape, case.groups)


def _set_max(case: Case, a: np.ndarray) -> np.ndarray:
    """Per-set maximum of an element-shaped array, ignoring NaN, shaped like the op's statistics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN sets give NaN, which is what we want
        return np.nanmax(_spec(case).as_sets(a, case.groups), axis=-1)


def _per_element(case: Case, stat: np.ndarray) -> np.ndarray:
    """Broadcast per-set values (shaped like the statistics) to the elements of x."""
    return _spec(case).per_element(stat, case.shape)


def _per_channel(case: Case, p: np.ndarray) -> np.ndarray:
    """Broadcast a weight-shaped array (C,) or (K,) to the elements."""
    return _spec(case).per_param(p)


def _param_sum(case: Case, a: np.ndarray) -> np.ndarray:
    return np.nansum(a, axis=_spec(case).param_axes())


def tolerance_factor(m: int) -> float:
    """K(m): roundings allowed for a result that sums m terms (see the module docstring)."""
    return 4.0 * (2.0 + math.log2(max(m, 1)))


# --- inputs ----------------------------------------------------------------------------------------------------

def _to_arg(case: Case, name: str, values) -> np.ndarray:
    """float64 values as the kernel's argument ``name``: rounded once to its dtype (16-bit: as bit patterns)."""
    dtype = arg_dtype(case.direction, name, case.dtype)
    if dtype in HALF_DTYPES:
        return half.narrow(np.asarray(values, np.float64), dtype)
    return np.asarray(values).astype(dtype)


def _f64(case: Case, name: str, a: np.ndarray | None) -> np.ndarray | None:
    """The values of the kernel's argument ``name`` (as :func:`_to_arg` made it, or as a kernel wrote it), in
    float64."""
    if a is None:
        return None
    dtype = arg_dtype(case.direction, name, case.dtype)
    return half.widen(a, dtype) if dtype in HALF_DTYPES else a.astype(np.float64)


def _inputs(case: Case) -> dict[str, np.ndarray | None]:
    """Every input the kernel takes, in the case's dtype (rounded once; the reference sees the same values)."""
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    to = (lambda name, v: _to_arg(case, name, v))
    shape = case.shape
    if case.data in ("normal", "nan", "inf", "overflow", "tiny"):
        x = rng.standard_normal(shape)
    elif case.data.startswith("offset"):
        x = float(case.data[len("offset"):]) + rng.standard_normal(shape)
    elif case.data in ("constant", "negative_eps"):
        x = np.full(shape, 1.1)  # not a binary fraction, so sums of it round
    elif case.data == "small_var":
        x = 1.0 + 0.01 * rng.standard_normal(shape)
    elif case.data == "rectified":
        x = 0.5 + np.maximum(rng.standard_normal(shape), 0.0)
    else:
        raise ValueError(f"unknown data kind {case.data!r}")
    nan_at = tuple(s // 2 for s in shape)
    direction = plain_direction(case.direction)
    reads_dy = direction.startswith("backward") or direction == "add_backward"
    if case.data == "nan" and not reads_dy:
        x[nan_at] = np.nan
    if case.data == "inf" and not reads_dy:
        x[nan_at] = np.inf
    x = to("x", x)
    k = _spec(case).param_shape(shape)
    scale = _DATA_WEIGHT[case.data][case.dtype] if case.data in _DATA_WEIGHT else 1.0
    weight = to("weight", scale * (1.0 + 0.5 * rng.standard_normal(k))) if "weight" in case.affine else None
    bias_scale = scale if case.data == "tiny" else 1.0  # (the overflow kind's bias stays in range)
    bias = to("bias", bias_scale * 0.5 * rng.standard_normal(k)) if "bias" in case.affine else None
    inputs: dict[str, np.ndarray | None] = {"x": x, "weight": weight, "bias": bias}
    x64 = _f64(case, "x", x)
    if _spec(case).running:
        # running statistics near the data's own, as after some training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ch_mean = np.nanmean(x64, axis=(0, 2))
            ch_var = np.nanvar(x64, axis=(0, 2))
        running_mean = to("running_mean", ch_mean + 0.1 * rng.standard_normal(k))
        running_var = to("running_var", ch_var * rng.uniform(0.5, 2.0, k))
        if direction == "forward_infer":
            inputs.update(running_mean=running_mean, running_var=running_var)
        elif direction == "backward_infer":
            with np.errstate(invalid="ignore"):  # (negative_eps: NaN)
                rstd = 1.0 / np.sqrt(running_var.astype(np.float64) + case.eps)
            inputs.update(mean=to("mean", running_mean), rstd=to("rstd", rstd))
    if case.direction == "add_forward":
        inputs["residual"] = to("residual", rng.standard_normal(shape))
    if direction in ("backward", "add_backward"):
        # the statistics a training forward saved: exact ones, rounded to the dtype (an uncentered op's mean is
        # no argument; zeros stand for it in the tolerances)
        y = np.empty(shape)
        mean, rstd = np.zeros(_stat_shape(case)), np.empty(_stat_shape(case))
        fwd = reference.KERNELS[(case.op, "forward", "float64")]
        with np.errstate(all="ignore"):
            fwd(*_args(case, dict(x=x64, y=y, mean=mean, rstd=rstd), "forward"))
        inputs.update(mean=to("mean", mean), rstd=to("rstd", rstd))
    if reads_dy:
        dy = rng.standard_normal(shape)
        if case.data in ("nan", "inf"):
            dy[nan_at] = -np.inf if case.data == "inf" else np.nan
        inputs["dy"] = to("dy", dy)
    if case.direction == "add_backward":
        # h is the normalized input; the gradient flowing into h from its other uses is absent in the cases with
        # a weight only, so that both forms of the kernel run
        inputs["h"] = x
        inputs["dh"] = None if case.affine == "weight" else to("dh", rng.standard_normal(shape))
    if case.direction in SPLIT_DIRECTIONS:
        inputs.update(_split_inputs(case, inputs))
    return inputs


def _split_inputs(case: Case, inputs: dict) -> dict[str, np.ndarray]:
    """The per-channel arguments of the split directions, as a BatchNorm training step makes them: float64
    statistics of x (ignoring a NaN, so that only its own elements turn NaN), and the coefficients of the contract's
    docstring, computed in float64 and rounded to the dtype."""
    if case.direction == "stats":
        return {}
    to = (lambda name, v: _to_arg(case, name, v))
    x64 = _f64(case, "x", inputs["x"])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x64, axis=(0, 2))
        rstd = 1.0 / np.sqrt(np.nanvar(x64, axis=(0, 2)) + case.eps)
        if case.direction == "backward_reduce":
            return {"mean": mean, "rstd": rstd}
        w, b = _f64(case, "weight", inputs["weight"]), _f64(case, "bias", inputs["bias"])
        if case.direction == "apply":
            scale = to("scale", w * rstd)
            return {"scale": scale, "shift": to("shift", b - mean * _f64(case, "scale", scale))}
        if case.direction == "backward_apply":
            dy = _f64(case, "dy", inputs["dy"])
            count = x64.shape[0] * x64.shape[2]
            sum_dy = np.nansum(dy, axis=(0, 2))
            sum_dy_xhat = np.nansum(dy * (x64 - mean[None, :, None]) * rstd[None, :, None], axis=(0, 2))
            a = w * rstd
            bb = to("b", -w * rstd * rstd * sum_dy_xhat / count)
            d = -a * sum_dy / count - _f64(case, "b", bb) * mean
            return {"a": to("a", a), "b": bb, "d": to("d", d)}
    return {}


def _output_shapes(case: Case, inputs) -> dict[str, tuple[int, ...] | None]:
    spec = _spec(case)
    shapes = {"y": case.shape, "h": case.shape, "mean": _stat_shape(case), "rstd": _stat_shape(case),
              "dx": case.shape}
    shapes.update(dict.fromkeys(("m2", "sum_dy", "sum_dy_xhat"), (case.shape[1],)))
    pshape = spec.param_shape(case.shape)
    shapes["dweight"] = pshape if inputs["weight"] is not None else None
    shapes["dbias"] = pshape if inputs["bias"] is not None else None
    return {name: shapes[name] for name in spec.outputs(case.direction)}


def _args(case: Case, a: dict, direction: str | None = None) -> tuple:
    """The positional arguments of the kernel, per the contract, from a dict of named arrays."""
    return _spec(case).kernel_args(direction or case.direction, {**a, "eps": case.eps, "num_groups": case.groups,
                                                                 "activation": case.activation, "slope": case.slope})


# --- expected values and tolerances ----------------------------------------------------------------------------

def _expected(case: Case, inputs: dict, out_shapes: dict) -> dict[str, np.ndarray]:
    named = {k: _f64(case, k, v) for k, v in inputs.items()}
    if case.direction == "add_forward" and case.dtype in HALF_DTYPES:
        named["x"], named["residual"] = _normalized(case, named), np.zeros(case.shape)
    outs = {k: None if s is None else np.empty(s) for k, s in out_shapes.items()}
    with np.errstate(all="ignore"):
        reference.KERNELS[(case.op, case.direction, "float64")](*_args(case, {**named, **outs}))
    return {k: v for k, v in outs.items() if v is not None}


def _normalized(case: Case, f64: dict) -> np.ndarray:
    """The values add_forward normalizes: h = x + residual, rounded once for 16-bit data (see the contract)."""
    if case.dtype in HALF_DTYPES:
        return half.rounded_sum(f64["x"], f64["residual"], case.dtype)
    return f64["x"] + f64["residual"]


def _tolerances(case: Case, inputs: dict, expected: dict) -> dict[str, np.ndarray]:
    tol = _working_tolerances(case, inputs, expected)
    if case.dtype in HALF_DTYPES:
        for name, ulps in _HALF_ULPS.items():
            if name in tol:
                tol[name] = tol[name] + ulps * half.ulp(expected[name], case.dtype)
    return tol


def _working_tolerances(case: Case, inputs: dict, expected: dict) -> dict[str, np.ndarray]:
    """The tolerances of the module docstring, with the eps of the arithmetic (float32 for 16-bit dtypes)."""
    if case.activation is not None:
        return _act_tolerances(case, inputs, expected)
    eps = float(np.finfo(np.float32 if case.dtype in HALF_DTYPES else case.dtype).eps)
    f64 = {k: _f64(case, k, v) for k, v in inputs.items()}
    x = f64["x"]
    if case.direction == "add_forward":
        x = _normalized(case, f64)
    ones = np.ones(case.shape[1])
    w = _per_channel(case, np.abs(f64["weight"]) if f64["weight"] is not None else ones)
    b = _per_channel(case, np.abs(f64["bias"]) if f64["bias"] is not None else 0 * ones)
    m = _spec(case).set_size(case.shape, case.groups)
    tol = {}
    with np.errstate(all="ignore"):
        if case.direction in SPLIT_DIRECTIONS:
            return _split_tolerances(case, f64, expected, m, eps)
        if case.direction in ("forward", "add_forward"):
            mean, rstd = expected.get("mean", np.zeros(_stat_shape(case))), expected["rstd"]
            absmax = _set_max(case, np.abs(x))
            kappa = absmax * rstd
            xhat = (x - _per_element(case, mean)) * _per_element(case, rstd)
            k = tolerance_factor(m) * eps
            tol["y"] = k * (w * (1 + _per_element(case, kappa)) * (1 + np.abs(xhat)) + b)
            tol["mean"] = k * absmax
            tol["rstd"] = k * (1 + kappa) * rstd
            # h: the sum rounded once to the storage (a 16-bit dtype's own epsilon, where the arithmetic's is float32)
            tol["h"] = tolerance_factor(1) * {"bfloat16": 2.0**-7, "float16": 2.0**-10}.get(case.dtype, eps) * np.abs(x)
            return tol
        if case.direction == "forward_infer":
            mean, r = f64["running_mean"], 1.0 / np.sqrt(f64["running_var"] + case.eps)
            mean, r = _per_channel(case, mean), _per_channel(case, r)
            kappa = (np.abs(x) + np.abs(mean)) * r
            tol["y"] = tolerance_factor(1) * eps * (w * (1 + kappa) * (1 + np.abs((x - mean) * r)) + b)
            return tol
        dy = np.abs(f64["dy"])
        training = case.direction in ("backward", "add_backward")
        expand = (lambda s: _per_element(case, s)) if training else (lambda s: _per_channel(case, s))
        mean, rstd = expand(f64["mean"]), expand(f64["rstd"])
        xhat = np.abs((x - mean) * rstd)
        if training:
            kappa = _per_element(case, _set_max(case, np.abs(x)) * f64["rstd"])
            g = _per_element(case, _set_max(case, dy * w))
            tol["dx"] = tolerance_factor(m) * eps * rstd * g * (1 + kappa) * (1 + xhat)
            if f64.get("dh") is not None:  # add_backward: plus dh, one more rounding
                tol["dx"] = tol["dx"] + tolerance_factor(1) * eps * (np.abs(f64["dh"]) + np.abs(expected["dx"]))
        else:
            kappa = (np.abs(x) + np.abs(mean)) * rstd
            tol["dx"] = tolerance_factor(1) * eps * dy * w * rstd
        kn = tolerance_factor(_spec(case).param_count(case.shape)) * eps
        tol["dweight"] = kn * _param_sum(case, dy * (1 + kappa) * (1 + xhat))
        tol["dbias"] = kn * _param_sum(case, dy)
        return tol


# the largest |act'(z)| of the activations: gelu's is 1.13, silu's 1.10 (leaky_relu's the slope, when above)
_ACT_SLOPE_MAX = 1.2
_JUMPS = {"relu": 0.0, "leaky_relu": None}  # derivatives that jump at 0 from 1 to this (None: the case's slope)


def _act_tolerances(case: Case, inputs: dict, expected: dict) -> dict[str, np.ndarray]:
    """An act_ direction's tolerances: its plain direction's, with the gradient bounded by the activation's largest
    slope, plus the activation's own rounding (forward) and, in backward, how far the error of the recomputed z
    moves act'(z): by its Lipschitz bound (1 for the smooth ones), or across the jump of relu / leaky_relu at 0 for
    elements whose z is within its error of 0 (either side is then right)."""
    plain = replace(case, direction=plain_direction(case.direction), activation=None)
    eps = float(np.finfo(np.float32 if case.dtype in HALF_DTYPES else case.dtype).eps)
    name = ACTIVATIONS[case.activation]
    a = max(_ACT_SLOPE_MAX, abs(case.slope))
    f64 = {k: _f64(case, k, v) for k, v in inputs.items()}
    if "forward" in plain.direction:
        tol = _working_tolerances(plain, inputs, expected)
        with np.errstate(all="ignore"):
            tol["y"] = a * tol["y"] + tolerance_factor(1) * eps * np.nan_to_num(np.abs(expected["y"]))
        return tol
    tol = _working_tolerances(plain, dict(inputs, dy=_to_arg(case, "dy", a * f64["dy"])), expected)
    x, dy = f64["x"], np.abs(f64["dy"])
    w_signed = _per_channel(case, f64["weight"]) if f64["weight"] is not None else 1.0
    b_signed = _per_channel(case, f64["bias"]) if f64["bias"] is not None else 0.0
    w, b = np.abs(w_signed), np.abs(b_signed)
    expand = (lambda s: _per_element(case, s)) if plain.training else (lambda s: _per_channel(case, s))
    mean, rstd = expand(f64["mean"]), expand(f64["rstd"])
    with np.errstate(all="ignore"):
        xhat = (x - mean) * rstd
        z = xhat * w_signed + b_signed
        if plain.training:  # the error of z: that of forward's y
            m = _spec(case).set_size(case.shape, case.groups)
            kappa = _per_element(case, _set_max(case, np.abs(x)) * f64["rstd"])
            dz = tolerance_factor(m) * eps * (w * (1 + kappa) * (1 + np.abs(xhat)) + b)
        else:
            kappa = (np.abs(x) + np.abs(mean)) * rstd
            dz = tolerance_factor(1) * eps * (w * (1 + kappa) * (1 + np.abs(xhat)) + b)
        if name in _JUMPS:
            low = case.slope if _JUMPS[name] is None else _JUMPS[name]
            dg = dy * np.where(np.abs(z) <= dz, abs(1.0 - low), 0.0)
        else:
            dg = dy * dz
        wdg, ax = w * dg, np.abs(xhat)
        if plain.training:  # dx = rstd * (w g - mean(w g) - xhat * mean(w g xhat)) over the set
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                set_mean = (lambda v: _per_element(case, np.nanmean(_spec(case).as_sets(v, case.groups), axis=-1)))
                tol["dx"] = tol["dx"] + rstd * (wdg + set_mean(wdg) + ax * set_mean(wdg * ax))
        else:
            tol["dx"] = tol["dx"] + rstd * wdg
        tol["dweight"] = tol["dweight"] + _param_sum(case, dg * ax)
        tol["dbias"] = tol["dbias"] + _param_sum(case, dg)
    return tol


def _split_tolerances(case: Case, f64: dict, expected: dict, m: int, eps: float) -> dict[str, np.ndarray]:
    """Tolerances of the split directions, derived as the others (module docstring) from perturbing the inputs by
    the dtype's rounding: statistics and sums as the fused kernels' (m2 by its first- and second-order change),
    the elementwise passes by the rounding of their own few operations."""
    x = f64["x"]
    k1 = tolerance_factor(1) * eps
    per = (lambda v: v[None, :, None])
    if case.direction == "stats":
        k = tolerance_factor(m) * eps
        absmax = _set_max(case, np.abs(x))
        m2 = expected["m2"]
        # perturbing each x_i by k|x_i| moves m2 by 2 sum((x_i - mean) k|x_i|) <= 2 k max|x| sqrt(m m2), plus
        # m (k max|x|)^2 at second order (all of it for a constant set)
        return {"mean": k * absmax, "m2": k * (m2 + 2 * absmax * np.sqrt(m * m2)) + m * (k * absmax) ** 2}
    if case.direction == "apply":
        return {"y": k1 * (np.abs(x * per(f64["scale"])) + np.abs(per(f64["shift"])))}
    if case.direction == "backward_apply":
        return {"dx": k1 * (np.abs(per(f64["a"]) * f64["dy"]) + np.abs(per(f64["b"]) * x) + np.abs(per(f64["d"])))}
    # backward_reduce: as the fused backward's dbias and dweight
    dy = np.abs(f64["dy"])
    rstd = f64["rstd"]
    kappa = per(_set_max(case, np.abs(x)) * rstd)
    xhat = np.abs((x - per(f64["mean"])) * per(rstd))
    kn = tolerance_factor(m) * eps
    return {"sum_dy": kn * _param_sum(case, dy), "sum_dy_xhat": kn * _param_sum(case, dy * (1 + kappa) * (1 + xhat))}


# --- comparing -------------------------------------------------------------------------------------------------

def _index(flat: int, shape) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _compare(case: Case, name: str, got: np.ndarray, ref: np.ndarray, tol: np.ndarray,
             pool: dict | None = None) -> list[Failure]:
    """``got`` against the reference within ``tol``; ``pool``: where a small 16-bit case's rounding errors go (see
    :func:`_rounding_errors`)."""
    got64 = _f64(case, name, got)
    tol = np.broadcast_to(tol, ref.shape)
    # a 16-bit output may round a finite reference to +-inf: then that inf is right
    dtype = arg_dtype(case.direction, name, case.dtype)
    limit = half.widen(half.narrow(ref, dtype), dtype) if dtype in HALF_DTYPES else ref
    if dtype == "bfloat16":  # its range is float32's: float32 intermediates may overflow within its top binade
        top = (np.abs(ref) >= _BF16_MAX / 2) & np.isinf(got64) & (np.sign(got64) == np.sign(ref))
        limit = np.where(top, got64, limit)
    failures = []
    if case.data == "inf":
        # where a set holds an inf, inf - inf and 0 * inf make NaN or inf of either sign by the order of operations:
        # any non-finite value is right where the reference's is, a finite one is not
        must, swallowed, what = ~np.isfinite(ref), np.isfinite(got64), "inf propagation"
    else:
        must, swallowed, what = np.isnan(ref), ~np.isnan(got64), "NaN propagation"
    swallowed &= must
    if swallowed.any():
        i = _index(np.flatnonzero(swallowed)[0], ref.shape)
        kind = "non-finite (their set holds an inf)" if case.data == "inf" else "NaN (their set holds a NaN)"
        failures.append(Failure(str(case), f"{what} ({name})",
                                f"{int(swallowed.sum())} of {int(must.sum())} elements that must be {kind} are "
                                f"not, e.g. {name}{list(i)} = {got64[i]:.9g}"))
    check = ~must
    nonfinite = check & ~np.isfinite(got64) & (np.isfinite(ref) | np.isinf(limit)) & (got64 != limit)
    with np.errstate(all="ignore"):
        err = np.where(check & np.isfinite(got64), np.abs(got64 - ref), 0.0)
        over = err > tol
        ratio = np.where(over, err / np.where(tol > 0, tol, np.finfo(np.float64).tiny), 0.0)
    if nonfinite.any():
        i = _index(np.flatnonzero(nonfinite)[0], ref.shape)
        failures.append(Failure(str(case), name,
                                f"{int(nonfinite.sum())} non-finite values where the reference is finite, "
                                f"e.g. {name}{list(i)} = {got64[i]} (expected {limit[i]:.9g})"))
    if dtype in HALF_DTYPES and name in _HALF_ULPS and not over.any():  # (a kernel whose values miss: that alone)
        errors = _rounding_errors(name, got64, ref, tol, dtype)
        if errors.size >= _BIAS_VALUES:
            failures += _rounding_bias(str(case), name, errors)
        elif pool is not None:
            pool.setdefault((name, None), []).append(errors)
        if pool is not None:
            for w in _TAIL_WIDTHS:
                tail = _run_tails(case, ref.shape, w)
                if tail is not None:
                    pool.setdefault((name, w), []).append(
                        _rounding_errors(name, got64[tail], ref[tail], tol[tail], dtype))
    if over.any():
        i = _index(int(np.argmax(ratio)), ref.shape)
        rel = err[i] / abs(ref[i]) if ref[i] else math.inf
        failures.append(Failure(
            str(case), name,
            f"error {err[i]:.3g} (relative {rel:.3g}) at {name}{list(i)}: got {got64[i]:.9g}, expected "
            f"{ref[i]:.9g}; tolerance there {tol[i]:.3g}, exceeded {ratio[i]:.3g}x; "
            f"{int(over.sum())} of {over.size} elements out of tolerance"))
    return failures


def _offset(case: Case, returned, expected: dict) -> list[Failure]:
    """An address forward kernel's return value: the largest |mean| * rstd over the sets, NaN ones left out (the
    statistics' own float32 rounding is far inside the 1e-3 allowed: the value only decides whether backward
    recentres the data)."""
    with np.errstate(all="ignore"):
        want = float(np.fmax.reduce(np.abs(expected["mean"]) * expected["rstd"], axis=None, initial=0.0))
    if isinstance(returned, numbers.Real) and not isinstance(returned, bool) and (
            returned == want or abs(float(returned) - want) <= 1e-3 * want):
        return []
    return [Failure(str(case), "returned offset",
                    f"the forward address kernel returned {returned!r}, where the largest |mean| * rstd over the "
                    f"sets is {want:.9g} (or it returns None)")]


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rounding_errors(name: str, got64: np.ndarray, ref: np.ndarray, tol: np.ndarray, dtype: str) -> np.ndarray:
    """A 16-bit output's differences from the reference rounded to nearest even, in ulps of the reference, signed
    towards its magnitude: one per distinct reference value (a value repeated, as data a ReLU leaves, is one
    rounding, whose error has the same sign every time), among the values that the arithmetic before the rounding
    must get right to a small part of an ulp."""
    with np.errstate(invalid="ignore"):
        u = half.ulp(ref, dtype)
        nearest = half.widen(half.narrow(ref, dtype), dtype)
        ok = (np.isfinite(ref) & np.isfinite(got64) & np.isfinite(nearest) & (ref != 0)
              & (tol - _HALF_ULPS[name] * u <= 0.5 * u))
    r, first = np.unique(ref[ok], return_index=True)
    return (got64[ok][first] - nearest[ok][first]) * np.sign(r) / u[ok][first]


def _rounding_bias(label: str, name: str, errors: np.ndarray) -> list[Failure]:
    bias = float(np.mean(errors)) if errors.size else 0.0
    if abs(bias) <= _BIAS_MAX_ULPS:
        return []
    return [Failure(label, f"rounding ({name})",
                    f"{name} is {abs(bias):.2f} ulp {'smaller' if bias < 0 else 'larger'} in magnitude than the "
                    f"reference rounded to nearest even on average over {errors.size} distinct values, where "
                    f"rounding to nearest even gives about 0 (rounded towards {'zero' if bias < 0 else 'infinity'}?)")]


def _pooled_rounding(label: str, pool: dict) -> list[Failure]:
    """The rounding check on one kernel's pooled errors, keyed (output, None) for its small cases' and (output,
    width) for every case's run tails (see :func:`_run_tails`)."""
    failures = []
    for (name, width), parts in pool.items():
        errors = np.concatenate(parts)
        if width is None and errors.size >= _BIAS_VALUES:
            failures += _rounding_bias(f"{label} ({len(parts)} smaller cases pooled)", name, errors)
        elif width is not None and errors.size >= _TAIL_VALUES:
            failures += _rounding_bias(f"{label} ({len(parts)} cases' run tails pooled)",
                                       f"{name} at the last n % {width} of each run", errors)
    return failures


def _run_tails(case: Case, shape: tuple[int, ...], width: int) -> np.ndarray | None:
    """A mask of the last n % width values of each run of an output of ``shape`` (in the kit's NCHW view), a run
    being what a kernel's inner loop walks: the last axis (a row, a channel's S values), or for channels-last
    data the channel axis; None where no run has a tail."""
    axis = 1 if case.layout == NHWC else len(shape) - 1
    n = shape[axis]
    if n % width == 0 or n < width:  # (runs shorter than a vector are all tail: the whole pool judges them)
        return None
    at = [1] * len(shape)
    at[axis] = n
    return np.broadcast_to((np.arange(n) >= n - n % width).reshape(at), shape)


_DATA_ARRAYS = ("x", "y", "dy", "dx")


def _in_layout(case: Case, name: str, a: np.ndarray) -> np.ndarray:
    """An (N, C, S) data array as the kernel of the case's layout takes it ((N, S, C) for nhwc; a view)."""
    return a.transpose(0, 2, 1) if case.layout == NHWC and name in _DATA_ARRAYS else a


def _layout_shape(case: Case, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[1]) if case.layout == NHWC and name in _DATA_ARRAYS else shape


def _run_case(case: Case, kernel, failures: list[Failure], pool: dict | None = None) -> None:
    inputs = _inputs(case)
    out_shapes = _output_shapes(case, inputs)
    expected = _expected(case, inputs, out_shapes)
    dtype_of = (lambda name: arg_dtype(case.direction, name, case.dtype))
    label = str(case)
    given = [k for k, v in inputs.items() if v is not None]
    # every other array starts one element past a 64-byte boundary, which case by case
    shifts = itertools.count(zlib.crc32(label.encode()) % 2)
    guarded_in = {k: _Guarded(k, _layout_shape(case, k, inputs[k].shape), dtype_of(k), _in_layout(case, k, inputs[k]),
                              next(shifts) % 2, _INPUT_SENTINEL[dtype_of(k)] + i) for i, k in enumerate(given)}
    outs = {k: None if s is None else _Guarded(k, _layout_shape(case, k, s), dtype_of(k), None, next(shifts) % 2)
            for k, s in out_shapes.items()}
    named = {k: None for k in inputs} | {k: g.array for k, g in guarded_in.items()}
    named |= {k: None if g is None else g.array for k, g in outs.items()}
    args = _args(case, named)
    already = len(failures)
    try:
        with np.errstate(all="ignore"):
            returned = kernel(*args)
    except (Exception, SystemExit) as exc:  # a failing kernel is a finding, not a crash of the kit (nor its end)
        failures.append(Failure(label, "raised", f"{type(exc).__name__}: {exc}"))
        return
    if returned is not None:
        if case.calls == ADDRESS and case.direction == "forward" and _spec(case).centered:
            failures.extend(_offset(case, returned, expected))
        else:  # the contract's kernels return nothing: a value here is one the frontends drop
            failures.append(Failure(label, "returned a value",
                                    f"the kernel returned {_short_repr(returned)}, where kernels write their outputs "
                                    f"and return None (only a centered op's forward address kernel may return its "
                                    f"largest |mean| * rstd)"))
    for g in [*guarded_in.values(), *(g for g in outs.values() if g is not None)]:
        msg = g.outside_writes()
        if msg:
            failures.append(Failure(label, "write outside buffers", msg))
    for g in guarded_in.values():
        msg = g.mutated()
        if msg:
            failures.append(Failure(label, "input mutation", msg))
    tolerances = _tolerances(case, inputs, expected)
    for name, g in outs.items():
        if g is None:
            continue
        past = [k for k, i in guarded_in.items() if i.dtype == g.dtype
                and _in_layout(case, name, g.holds(i.sentinel, i.sentinel | _QUIET_BIT[g.dtype])).any()]
        if past:
            failures.append(Failure(label, "read outside inputs",
                                    f"{name} holds the NaN of the guard zone around {' and '.join(past)}: the kernel "
                                    f"read before or past the end of that input"))
            continue
        unwritten = _in_layout(case, name, g.unwritten())  # (N, C, S) again: (N, S, C) transposed back
        if unwritten.any():
            i = tuple(int(j) for j in np.argwhere(unwritten)[0])
            failures.append(Failure(label, "unwritten output",
                                    f"{int(unwritten.sum())} of {unwritten.size} elements of {name} were never "
                                    f"written, first at {name}{list(i)}"))
            continue
        stale = _in_layout(case, name, g.read_before_written())
        if stale.any():
            i = tuple(int(j) for j in np.argwhere(stale)[0])
            failures.append(Failure(label, "output read before written",
                                    f"{int(stale.sum())} of {stale.size} elements of {name} hold the kit's NaN "
                                    f"sentinel made quiet, first at {name}{list(i)}: the kernel computed with the "
                                    f"output's old contents (added into it?) where it must only write it"))
            continue
        failures.extend(_compare(case, name, _in_layout(case, name, g.array), expected[name], tolerances[name],
                                 pool))
    if case.repeat and len(failures) == already:  # a kernel that changed its inputs cannot be rerun on them
        again = {k: None if s is None else _Guarded(k, _layout_shape(case, k, s), dtype_of(k), None,
                                                    next(shifts) % 2).array for k, s in out_shapes.items()}
        try:
            with np.errstate(all="ignore"):
                kernel(*_args(case, named | again))
        except Exception as exc:
            failures.append(Failure(label, "raised", f"on the second call: {type(exc).__name__}: {exc}"))
            return
        for name, g in outs.items():
            if g is not None and g.array.tobytes() != again[name].tobytes():
                diff = int((g.array.view(g.itype) != again[name].view(g.itype)).sum())
                failures.append(Failure(label, "not deterministic",
                                        f"a second call on the same inputs changed {diff} elements of {name}"))


# --- entry points ----------------------------------------------------------------------------------------------

def _select(values: Sequence[str] | None, known: Sequence[str], what: str,
            names: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``values`` (each once, by ``names``: alias -> name), or every known one for None."""
    if values is None:
        return tuple(known)
    if isinstance(values, str):
        values = [values]
    names = names or {k: k for k in known}
    bad = [v for v in values if v not in names]
    if bad:
        raise ValueError(f"check_backend: unknown {what} {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names[v] for v in values))


def check_backend(name: str, ops: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
                  quick: bool = False, layouts: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None, crashed: Mapping[str, str] | None = None,
                  only: str | None = None) -> Report:
    """Run backend ``name`` against the reference on the hard cases; returns the failures (empty: conforms).

    Only what the backend declares is checked, restricted to ``ops`` (names or aliases) / ``dtypes`` /
    ``layouts`` ("nchw", "nhwc": its channels-last kernels, on the same cases, compared with the reference on the
    NCHW view) when given, each once. A backend that fails to load yields a single ``load`` failure. Raises
    :class:`normkit.UnknownBackendError` for a name that is not installed. ``progress`` is called with each
    case's label before the case runs (``normkit check`` names the case a crashing kernel died in with it).
    ``crashed`` maps the labels of cases that ended an earlier run's process to what happened: those cases are
    not run again, each is a ``crashed`` failure with that message. ``only``: the label of the one case to run.
    """
    ops = _select(ops, OPS, "op(s)", {alias: op for op in OPS for alias in (op, *SPECS[op].aliases)})
    dtypes = _select(dtypes, DTYPES, "dtype(s)")
    layouts = _select(layouts, LAYOUTS, "layout(s)")
    rows = {row.name: row for row in registry.list_backends(load=False)}
    if name not in rows:
        registry._entry(name)  # raises UnknownBackendError listing the installed backends
    row = rows[name]
    report = Report(name)
    if row.error:
        report.append(Failure(f"backend {name}", "load", row.error))
        return report
    declared = set(row.implements) | set(row.channels_last)
    for op in ops:
        for direction in DIRECTIONS[op]:
            for dtype in dtypes:
                for layout in layouts:
                    key = (op, direction, dtype) if layout == NCHW else (op, direction, dtype, layout)
                    if key not in declared:
                        continue
                    try:
                        _, kernel = registry.lookup(op, direction, dtype, backend=name, layout=layout)
                    except ValueError as exc:  # failed to load its kernels module
                        report.append(Failure(f"backend {name}", "load", str(exc)))
                        return report
                    label = f"{op} {direction} {dtype}" + ("" if layout == NCHW else f" {layout}")
                    pool: dict = {}
                    for case in cases(op, direction, dtype, quick=quick, layout=layout):
                        _run_checked(case, kernel, report, pool, progress, crashed, only)
                    report.extend(_pooled_rounding(label, pool))
                    if layout == NCHW and (op, direction, dtype, ADDRESS) in row.addresses:
                        kernel = with_addresses(SPECS[op], direction,
                                                registry.lookup_address(op, direction, dtype, backend=name))
                        pool = {}
                        for case in cases(op, direction, dtype, quick=quick):
                            _run_checked(replace(case, calls=ADDRESS), kernel, report, pool, progress, crashed, only)
                        report.extend(_pooled_rounding(f"{label} by address", pool))
    return report


def _run_checked(case: Case, kernel, report: Report, pool: dict, progress: Callable[[str], None] | None,
                 crashed: Mapping[str, str] | None, only: str | None) -> None:
    """One case of :func:`check_backend`: its label to ``progress`` first, then the case, unless it crashed an
    earlier run (then its failure) or is not the ``only`` one."""
    label = str(case)
    if only is not None and label != only:
        return
    report.cases_run += 1
    if crashed and label in crashed:
        report.append(Failure(label, "crashed", crashed[label]))
        return
    if progress is not None:
        progress(label)
    _run_case(case, kernel, report, pool)


def assert_backend_conforms(name: str, ops: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
                            quick: bool = False, layouts: Sequence[str] | None = None) -> None:
    """For a plugin's test suite: raise AssertionError with the full report unless the backend conforms."""
    report = check_backend(name, ops=ops, dtypes=dtypes, quick=quick, layouts=layouts)
    if report:
        raise AssertionError(report.format(limit=None))
