"""Argument checks on metadata (shape tuples, dtype names, numbers), shared by the NumPy and PyTorch frontends so
that both accept and reject the same arguments with the same messages.

Every message names the op, the argument, what was expected and what came. The PyTorch frontend accepts
everything ``torch.nn.functional`` accepts (empty batches, negative ``eps``, any ``momentum``); the NumPy
frontend is stricter where a value can only be a mistake (``strict=True``).
"""

from __future__ import annotations

import math
import numbers
import operator
import sys

import numpy as np

from .contract import DTYPES, HALF_DTYPES


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value: a ValueError, and a RuntimeError as well, the class torch raises for most of the same
    mistakes (a weight of the wrong shape, channels that num_groups does not divide), so that code written against
    ``torch.nn`` and catching RuntimeError still catches it (as NumPy's AxisError is both a ValueError and an
    IndexError)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype: a TypeError, and a RuntimeError as torch raises for mixed dtypes."""


class UnsupportedInputError(TypeError, NotImplementedError):
    """An input that no kernel computes on, for its dtype (integers, bool, complex) or its layout (sparse, nested):
    a TypeError, and a NotImplementedError (a RuntimeError) as torch raises for an op "not implemented for
    'Long'" or a tensor of a backend it has no kernel for."""


def unmasked(op: str, name: str, a) -> None:
    """A masked array's mask would be dropped (its hidden values counted in the statistics): refused."""
    if isinstance(a, np.ma.MaskedArray):
        raise UnsupportedInputError(f"{op}: {name} is a masked array, whose mask normkit cannot honour; pass its "
                                    f"values (a.filled(...) or a.data) or leave out the masked ones")


def describe(a) -> str:
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(a).__name__} of shape {tuple(shape)} and dtype {dtype}"
    return type(a).__name__


def dtype(op: str, name: str, dtype_name: str) -> None:
    if dtype_name not in DTYPES:
        raise UnsupportedInputError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got dtype "
                                    f"{dtype_name}")


def shape(op: str, name: str, shape_: tuple, min_ndim: int = 2, strict: bool = True) -> None:
    if len(shape_) < min_ndim:
        want = "(N, C) or (N, C, *spatial)" if min_ndim == 2 else f"at least {min_ndim} dims"
        raise ArgumentError(f"{op}: {name} must have shape {want}, got shape {tuple(shape_)}")
    if strict and math.prod(shape_) == 0:
        raise ArgumentError(f"{op}: {name} is empty (shape {tuple(shape_)}); there is nothing to normalize")


def param(op: str, name: str, shape_: tuple, dtype_, want_shape: tuple, want_dtype) -> None:
    """weight / bias: exactly ``want_shape``, and the input's dtype (or float32 for a 16-bit input, as PyTorch's CPU
    kernels take them)."""
    if str(dtype_) != str(want_dtype) and not (str(want_dtype) in HALF_DTYPES and str(dtype_) == "float32"):
        also = " or float32" if str(want_dtype) in HALF_DTYPES else ""
        raise ArgumentTypeError(f"{op}: {name} must have the input's dtype {want_dtype}{also}, got {dtype_}")
    if tuple(shape_) != tuple(want_shape):
        raise ArgumentError(f"{op}: {name} must have shape {tuple(want_shape)}, got {tuple(shape_)}")


def half_params(op: str, dtype_name: str, given: dict) -> None:
    """For a 16-bit input, as PyTorch's CPU kernels require: the weight, bias and running statistics given (name ->
    dtype name) share one dtype, float32 or the input's."""
    if dtype_name not in HALF_DTYPES:
        return
    for name, d in given.items():
        if d not in ("float32", dtype_name):
            raise ArgumentTypeError(f"{op}: {name} must have the input's dtype {dtype_name} or float32, got {d}")
    if len(set(given.values())) > 1:
        named = ", ".join(f"{n} {d}" for n, d in given.items())
        raise ArgumentTypeError(f"{op}: with a {dtype_name} input, weight, bias and running statistics must share "
                                f"one dtype (float32 or {dtype_name}), got {named}")


def running(op: str, name: str, shape_: tuple, is_float: bool, dtype_, c: int) -> None:
    """running_mean / running_var: a float vector of the input's C channels (any float dtype for a float32 /
    float64 input; a 16-bit input's: :func:`half_params`)."""
    if not is_float:
        raise ArgumentTypeError(f"{op}: {name} must be a float array, got dtype {dtype_}")
    if tuple(shape_) != (c,):
        raise ArgumentError(f"{op}: {name} must have shape ({c},) to match the input's {c} channels, "
                            f"got {tuple(shape_)}")


def running_pair(op: str, running_mean, running_var) -> bool:
    """Whether running statistics were given: both or neither."""
    if (running_mean is None) != (running_var is None):
        raise ArgumentError(f"{op}: pass both running_mean and running_var, or neither")
    return running_mean is not None


def missing_running(op: str, flag: str) -> ArgumentError:
    return ArgumentError(f"{op}: {flag}=False normalizes with running_mean and running_var, and none were given; "
                         f"pass them, or {flag}=True to use the input's statistics")


def stats_count(op: str, shape_: tuple, per_instance: bool) -> int:
    """How many values each batch statistic is computed from (batchnorm: N*S, instancenorm: S); more than one,
    as torch.nn.functional requires (an empty input has nothing to compute and passes)."""
    spatial = math.prod(shape_[2:])
    count = spatial if per_instance else shape_[0] * spatial
    if count == 1:
        if per_instance:
            raise ArgumentError(f"{op}: expected more than 1 spatial element when using input statistics, got "
                                f"input of shape {tuple(shape_)}")
        raise ArgumentError(f"{op}: expected more than 1 value per channel when training, got input of shape "
                            f"{tuple(shape_)}")
    return count


def flag(op: str, name: str, value, also: tuple = ()) -> bool:
    """``training`` / ``use_input_stats``: a bool (or one of the types ``also``: the NumPy frontend takes NumPy's
    bool), as torch's functions take it; a truthy string or None, read as a bool, would pick the mode silently."""
    if not isinstance(value, (bool, *also)):
        raise ArgumentTypeError(f"{op}: {name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def group_count(op: str, shape_: tuple, groups: int) -> None:
    """torch.nn.functional.group_norm refuses a batch whose groups hold one value in all (N * (C / G) * S == 1)."""
    if len(shape_) >= 2 and shape_[0] * (shape_[1] // groups) * math.prod(shape_[2:]) == 1:
        raise ArgumentError(f"{op}: expected more than 1 value per group in the batch, got input of shape "
                            f"{tuple(shape_)} with num_groups={groups}")


def batchnorm_eps(op: str, value, training) -> None:
    """torch.nn.functional.batch_norm (torch 2.13) refuses eps <= 0 in training and eps < 0 otherwise."""
    value = eps(op, value, strict=False)
    if training and value <= 0.0:
        raise ArgumentError(f"{op}: eps must be positive in training, got {value!r}")
    if value < 0.0:
        raise ArgumentError(f"{op}: eps must be >= 0, got {value!r}")


def _index(value) -> int:
    """``operator.index(value)`` (ints of any kind, a 0-d integer array or tensor), refusing a bool, which is an int
    to Python and not to torch: TypeError. A torch.SymInt (a size under torch.compile or torch.export) is returned as
    it is: its index() would fix the size to its current value in the compiled graph."""
    if isinstance(value, bool):
        raise TypeError(value)
    if type(value) is int:  # (torch.compile's tracing sees a SymInt as an int)
        return value
    torch = sys.modules.get("torch")  # (normkit does not import torch; a SymInt exists only where torch was)
    if torch is not None and isinstance(value, torch.SymInt):
        return value
    return operator.index(value)


def num_groups(op: str, groups, c: int) -> int:
    try:
        groups = _index(groups)
    except TypeError:
        raise ArgumentTypeError(f"{op}: num_groups must be a positive int, got {describe(groups)}") from None
    if groups < 1:
        raise ArgumentError(f"{op}: num_groups must be a positive int, got {groups!r}")
    if c % groups:
        raise ArgumentError(f"{op}: num_groups={groups} must divide the number of channels C={c}")
    return int(groups)


def normalized_shape(op: str, value) -> tuple:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        value = tuple(value)
        value = tuple(_index(d) for d in value)  # integers only: int() would truncate 5.9 to 5
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{op}: normalized_shape must be an int or a tuple of ints, "
                                f"got {describe(value)}") from None
    if not value or min(value) < 0:
        raise ArgumentError(f"{op}: normalized_shape must be a non-empty tuple of ints >= 0, got {value}")
    return value


def ends_with(shape_: tuple, normalized) -> bool:
    """Whether ``normalized`` is what a module passes, a non-empty tuple of ints that ``shape_`` ends with: the
    frontends' short path, which skips :func:`normalized_shape` and :func:`trailing` (a float equals the int it
    holds, so (5.0,) would pass the comparison alone)."""
    return type(normalized) is tuple and normalized and shape_[-len(normalized):] == normalized \
        and _INT.issuperset(map(type, normalized))  # (a third of all()'s time over a generator)


_INT = frozenset((int,))


def trailing(op: str, shape_: tuple, normalized: tuple) -> None:
    if len(shape_) < len(normalized) or tuple(shape_[len(shape_) - len(normalized):]) != normalized:
        raise ArgumentError(f"{op}: input of shape {tuple(shape_)} does not end with normalized_shape {normalized}")


def eps(op: str, value, strict: bool = True) -> float:
    """``strict``: finite and >= 0 (the NumPy frontend); otherwise any real number, as torch takes it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{op}: eps must be a number, got {describe(value)}")
    if strict and (not math.isfinite(value) or value < 0):
        raise ArgumentError(f"{op}: eps must be a finite number >= 0, got {value!r}")
    return float(value)


def momentum(op: str, value, strict: bool = True) -> float:
    """``strict``: in [0, 1] (the NumPy frontend); otherwise any real number, as torch takes it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{op}: momentum must be a number, got {describe(value)}")
    if strict and not 0.0 <= value <= 1.0:
        raise ArgumentError(f"{op}: momentum must be a number in [0, 1], got {value!r}")
    return float(value)
