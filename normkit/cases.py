"""The case table: the op/shape/dtype combinations that ``normkit bench``, ``benchmarks/`` and the tests share.

A :class:`Case` is one workload: an op on one input shape (plus GroupNorm's groups or LayerNorm's normalized
dims), with an affine weight and bias, in training mode. It knows the kernel-level view of itself (the (N, C, S)
or (M, K) shape handed to kernels, the statistics' shape), how many bytes a pass must move, how to make its
input arrays (64-byte aligned, as are the outputs it preallocates), and how to lay out the positional arguments
of :mod:`normkit.contract` for them.

Named sets of cases live in :data:`CASE_SETS`; ``"reference"`` is the table behind the README's Performance
section (``normkit bench --cases reference``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from . import half
from .alloc import aligned_copy
from .contract import (
    ACT_PREFIX, ACTIVATIONS, DTYPES, HALF_DTYPES, OPS, SPECS, OpSpec, arg_dtype, kernel_shape, storage_dtype,
)
from .ops import get as get_op

EPS = 1e-5
NEGATIVE_SLOPE = 0.01  # leaky_relu's, torch's default
DEFAULT_SHAPE = (8, 256, 56, 56)
DEFAULT_GROUPS = 32

# Bytes a pass must move through memory, in units of one input array: forward reads x and writes y; backward
# reads x and dy and writes dx. Weights, biases and statistics are per-channel and too small to count.
ARRAYS_MOVED = {"forward": 2, "backward": 3}
# The fused residual add: forward reads x and residual and writes y and h; backward reads dy, dh and h and writes dx.
ADD_ARRAYS_MOVED = {"forward": 4, "backward": 4}


@dataclass(frozen=True)
class Case:
    """One workload. ``groups`` is GroupNorm's only; ``ln_dims`` is how many trailing dims a row op (LayerNorm,
    RMSNorm) normalizes over (default: all but the first). ``add``: the row op's fused residual add (h = x +
    residual, y = norm(h); backward with a gradient flowing into h too). ``activation``: a fused activation (one
    of :data:`normkit.contract.ACTIVATIONS`; leaky_relu with slope :data:`NEGATIVE_SLOPE`) after the norm."""

    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    groups: int | None = None
    ln_dims: int | None = None
    add: bool = False
    activation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", get_op(self.op).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        check_shape(self.shape)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        spec = SPECS[self.op]
        if spec.grouped:
            if self.groups is None:
                object.__setattr__(self, "groups", default_groups(self.shape[1]))
            check_groups(self.groups, self.shape[1])
        elif self.groups is not None:
            raise ValueError(f"{self.op}: groups applies to groupnorm only, got groups={self.groups}")
        if spec.sets == "row":
            if self.ln_dims is None:
                object.__setattr__(self, "ln_dims", len(self.shape) - 1)
            if not 1 <= self.ln_dims <= len(self.shape) - 1:
                raise ValueError(f"layernorm: ln_dims must be in 1..{len(self.shape) - 1} for shape {self.shape}, "
                                 f"got {self.ln_dims}")
        elif self.ln_dims is not None:
            raise ValueError(f"{self.op}: ln_dims applies to the row ops only, got ln_dims={self.ln_dims}")
        if self.add and not spec.fused_add:
            raise ValueError(f"{self.op}: add (the fused residual add) applies to the row ops only")
        if self.activation is not None:
            if not spec.activation:
                raise ValueError(f"{self.op}: has no fused activation")
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
            if self.add:
                raise ValueError(f"{self.op}: a case is either a fused add or a fused activation")
        if spec.running and spec.set_size(self.kernel_shape, self.groups) < 2:
            raise ValueError(f"{self.op}: training needs more than 1 value per normalized set, shape {self.shape} "
                             f"has 1")

    # --- what the case is -----------------------------------------------------------------------------------

    @property
    def normalized_shape(self) -> tuple[int, ...] | None:
        return self.shape[len(self.shape) - self.ln_dims:] if self.spec.sets == "row" else None

    @property
    def id(self) -> str:
        """A stable name without spaces, e.g. ``groupnorm-8x256x56x56-g32-float32`` (pytest ids, JSON)."""
        extra = f"-g{self.groups}" if self.op == "groupnorm" else ""
        if self.spec.sets == "row":
            extra = f"-over{_dims(self.normalized_shape)}"
        act = f"-{self.activation}" if self.activation else ""
        return f"{'add-' if self.add else ''}{self.op}{act}-{_dims(self.shape)}{extra}-{self.dtype}"

    @property
    def label(self) -> str:
        """For people, e.g. ``groupnorm 8x256x56x56 G=32 float32``."""
        extra = f" G={self.groups}" if self.op == "groupnorm" else ""
        if self.spec.sets == "row":
            extra = f" over {_dims(self.normalized_shape)}"
        act = f"+{self.activation}" if self.activation else ""
        return f"{'add+' if self.add else ''}{self.op}{act} {_dims(self.shape)}{extra} {self.dtype}"

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape kernels see: (N, C, S), or (M, K) for layernorm."""
        return kernel_shape(self.spec, self.shape, self.ln_dims)

    @property
    def spec(self) -> OpSpec:
        return SPECS[self.op]

    @property
    def stat_shape(self) -> tuple[int, ...]:
        """Shape of the saved mean / rstd."""
        return self.spec.stat_shape(self.kernel_shape, self.groups)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of weight / bias as kernels see them."""
        return self.spec.param_shape(self.kernel_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of one input-sized array."""
        return math.prod(self.shape) * storage_dtype("forward", "x", self.dtype).itemsize

    def bytes_moved(self, direction: str) -> int:
        """Bytes a pass must move at the least: x and y forward; x, dy and dx backward (see ADD_ARRAYS_MOVED)."""
        return (ADD_ARRAYS_MOVED if self.add else ARRAYS_MOVED)[direction] * self.nbytes

    def kernel_direction(self, direction: str) -> str:
        """The kernel direction that times ``direction`` ("forward" or "backward")."""
        if self.activation:
            return ACT_PREFIX + direction
        return f"add_{direction}" if self.add else direction

    def with_dtype(self, dtype: str) -> Case:
        return replace(self, dtype=dtype)

    # --- arrays and kernel arguments ------------------------------------------------------------------------

    def make_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """x, dy, weight, bias in kernel shapes and storage (16-bit data as uint16 patterns, float32 parameters):
        standard-normal data, weights near 1 and biases near 0."""
        rng = np.random.default_rng(seed)
        data_dt = np.float32 if self.dtype in HALF_DTYPES else np.dtype(self.dtype)
        values = {
            "x": rng.standard_normal(self.kernel_shape, dtype=data_dt),
            "dy": rng.standard_normal(self.kernel_shape, dtype=data_dt),
            "weight": 1.0 + 0.1 * rng.standard_normal(self.param_shape),
            "bias": 0.1 * rng.standard_normal(self.param_shape),
        }
        if self.add:  # the residual, and the gradient flowing into h (data arrays, stored as x is)
            values.update(residual=rng.standard_normal(self.kernel_shape, dtype=data_dt),
                          dh=rng.standard_normal(self.kernel_shape, dtype=data_dt))
        return {name: aligned_copy(self._stored("x" if name in ("residual", "dh") else name, v))
                for name, v in values.items()}

    def _stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` as the kernels take argument ``name`` (:func:`normkit.contract.storage_dtype`)."""
        if storage_dtype("forward", name, self.dtype) == np.uint16:
            return half.narrow(values, self.dtype)
        return values.astype(arg_dtype("forward", name, self.dtype))

    def empty_outputs(self, direction: str, near=()) -> dict[str, np.ndarray]:
        """Preallocated outputs of one pass, already touched so that no timed call pays for first-touch; the data
        outputs placed beside the inputs ``near`` as the NumPy frontend places them (:mod:`normkit.alloc`)."""
        if direction == "forward":
            names = {"y": self.kernel_shape, "mean": self.stat_shape, "rstd": self.stat_shape}
            if self.add:
                names["h"] = self.kernel_shape
        else:
            names = {"dx": self.kernel_shape, "dweight": self.param_shape, "dbias": self.param_shape}
        return {name: aligned_copy(np.zeros(shape, storage_dtype(direction, name, self.dtype)),
                                   near if name in ("y", "h", "dx") else ())
                for name, shape in names.items()}

    def values(self, name: str, a: np.ndarray) -> np.ndarray:
        """The float64 values of a kernel argument ``name`` as stored (16-bit patterns widened)."""
        if storage_dtype("forward", name, self.dtype) == np.uint16:
            return half.widen(a, self.dtype)
        return a.astype(np.float64)

    def forward_args(self, inputs: dict, out: dict) -> tuple:
        """Positional arguments of the training forward kernel (see :mod:`normkit.contract`)."""
        return self.spec.kernel_args(self.kernel_direction("forward"),
                                     {**inputs, **out, **self._act_args(), "eps": EPS, "num_groups": self.groups})

    def backward_args(self, inputs: dict, stats: dict, out: dict) -> tuple:
        """Positional arguments of the training backward kernel; ``stats`` holds the forward's mean and rstd (and
        h, for the fused add)."""
        return self.spec.kernel_args(self.kernel_direction("backward"),
                                     {**inputs, **stats, **out, **self._act_args(), "num_groups": self.groups})

    def _act_args(self) -> dict:
        if self.activation is None:
            return {}
        return {"activation": ACTIVATIONS.index(self.activation), "slope": NEGATIVE_SLOPE}


def _dims(shape) -> str:
    return "x".join(map(str, shape))


# --- building cases from user options --------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,256,56,56"``, ``"8x256x56x56"``, ``"(8, 256, 56, 56)"`` -> ``(8, 256, 56, 56)``: digits only between
    the separators (``int()`` would take ``2_0`` as 20), none of them empty."""
    parts = re.split(r"\s*[,x]\s*|\s+", text.strip().strip("()[]").strip())
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"shape must be integers separated by commas, like 8,256,56,56; got {text!r}")
    shape = tuple(int(p) for p in parts)
    check_shape(shape)
    return shape


def check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C) or (N, C, *spatial) with positive sizes, got {shape}")


def divisors(c: int) -> list[int]:
    return [d for d in range(1, c + 1) if c % d == 0]


def default_groups(c: int) -> int:
    """32 when it divides C, else the largest divisor of C below 32."""
    return max(d for d in divisors(c) if d <= DEFAULT_GROUPS)


def check_groups(groups: int, c: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"groupnorm: groups={groups!r} must divide the C={c} channels; valid groups: "
                         f"{', '.join(map(str, divisors(c)))}")


def select_cases(op: str = "all", shape=None, groups: int | None = None, dtype: str | None = None,
                 cases=None) -> list[Case]:
    """The cases a benchmark run covers.

    ``cases`` (a set name from :data:`CASE_SETS` or a sequence of :class:`Case`) is filtered by ``op``;
    otherwise every op selected by ``op`` (a name, an alias, or ``"all"``) runs on ``shape`` (default
    :data:`DEFAULT_SHAPE`), GroupNorm with ``groups`` (default :func:`default_groups`) and LayerNorm over all
    dims but the first. ``dtype`` (default float32) overrides the cases' own.
    """
    ops = OPS if op == "all" else (get_op(op).name,)
    if cases is not None:
        if shape is not None or groups is not None:
            raise ValueError("a case set fixes shapes and groups; do not combine it with shape or groups")
        chosen = [c for c in (case_set(cases) if isinstance(cases, str) else cases) if c.op in ops]
        if not chosen:
            raise ValueError(f"the case set has no case for {op}")
        return [c.with_dtype(dtype) if dtype else c for c in chosen]
    if groups is not None and "groupnorm" not in ops:
        raise ValueError(f"groups applies to groupnorm only, and the op is {ops[0]}")
    shape = DEFAULT_SHAPE if shape is None else tuple(shape)
    return [Case(o, shape, dtype or "float32", groups=groups if o == "groupnorm" else None) for o in ops]


# --- the tables ------------------------------------------------------------------------------------------------

REFERENCE = (
    Case("batchnorm", (32, 64, 56, 56)),
    Case("batchnorm", (64, 256, 14, 14)),
    Case("batchnorm", (256, 1024)),
    Case("groupnorm", (8, 256, 56, 56), groups=32),
    Case("groupnorm", (32, 64, 56, 56), groups=16),
    Case("layernorm", (32, 64, 56, 56), ln_dims=3),
    Case("layernorm", (8192, 1024), ln_dims=1),
    Case("instancenorm", (32, 64, 56, 56)),
)

# Tiny versions of every kind of case (2-D and N-D inputs, partial layernorm dims): fast enough for tests.
SMALL = (
    Case("batchnorm", (4, 8, 5, 5)),
    Case("batchnorm", (16, 8)),
    Case("groupnorm", (2, 8, 4, 4), groups=4),
    Case("layernorm", (3, 8, 5), ln_dims=2),
    Case("layernorm", (6, 16), ln_dims=1),
    Case("instancenorm", (2, 4, 3, 3)),
)

# RMSNorm and the fused residual add (issue 17), next to LayerNorm at the same shapes: a transformer's hidden
# states, batch of tokens by width.
TRANSFORMER = tuple(
    Case(op, shape, ln_dims=1, add=add)
    for shape in ((8192, 1024), (1, 128, 4096))
    for op, add in (("layernorm", False), ("rmsnorm", False), ("layernorm", True), ("rmsnorm", True))
)

# Norm then activation (issue 17): a ResNet's BatchNorm + ReLU, a diffusion UNet's GroupNorm + SiLU, at the reference
# shapes and at a UNet block's.
FUSED = (
    Case("batchnorm", (32, 64, 56, 56), activation="relu"),
    Case("batchnorm", (64, 256, 14, 14), activation="relu"),
    Case("groupnorm", (8, 256, 56, 56), groups=32, activation="silu"),
    Case("groupnorm", (32, 64, 56, 56), groups=16, activation="silu"),
    Case("groupnorm", (8, 128, 32, 32), groups=32, activation="silu"),
)

CASE_SETS = {"reference": REFERENCE, "small": SMALL, "transformer": TRANSFORMER, "fused": FUSED}


def case_set(name: str) -> tuple[Case, ...]:
    try:
        return CASE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown case set {name!r}; known: {', '.join(CASE_SETS)}") from None
