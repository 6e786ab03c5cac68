"""The 16-bit storage formats, bfloat16 and float16, for kernels written once for every dtype: ``widen(x[i])``
loads a value as the dtype the kernel computes in and ``y[i] = narrow(y, v)`` stores one. For float32 and float64
arrays both are the identity (the compiled code is that of a plain load and store); the 16-bit formats arrive as
arrays of their bit patterns (normkit.contract), and the kernel's dtype decides the numba type of those arrays:
bfloat16 as ``uint16``, float16 as ``int16`` (the wrappers in kernels.py view them so), which picks the format at
compile time with no flag to pass along. A 16-bit value widens exactly to float32; float32 narrows by one
round-to-nearest-even, NaN stays a (quiet) NaN with its sign and leading payload bits, beyond the range is +-inf.

The conversions are LLVM IR of their own, not numba code. The kernels' fastmath flags still reach their
floating-point instructions once numba inlines them into a kernel (it sets the flags on everything it compiles);
that can matter only for float16's subnormal scaling on the path without F16C, and tests/test_numba16.py checks
that both paths give the same bits for every pattern. bfloat16 is integer work only. float16 is LLVM's
``fpext``/``fptrunc`` to ``half`` where the compile target has F16C (one vcvtph2ps / vcvtps2ph per vector), else the
bit-exact integer conversion below; both give the same bits (tests/test_numba16.py compares them on every
pattern). The AVX512-BF16 conversion is not used: it flushes subnormals to zero.
"""

from __future__ import annotations

import llvmlite.binding as ll
from llvmlite import ir
from numba.core import config, types
from numba.extending import intrinsic, overload

_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _target_has_f16c() -> bool:
    """Whether numba compiles for a CPU with F16C (its target, which NUMBA_CPU_NAME / NUMBA_CPU_FEATURES can make
    other than this machine's): without it, LLVM would turn ``half`` conversions into library calls that numba's
    JIT may not resolve."""
    if config.CPU_FEATURES:
        return "+f16c" in str(config.CPU_FEATURES).split(",")
    if config.CPU_NAME and config.CPU_NAME != "host":
        return False
    try:
        return bool(ll.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


F16C = _target_has_f16c()


def _c(v):
    return _I32(v)


# --- the conversions, as IR on i16 bit patterns and float32 values ---------------------------------------------

def _bf16_to_f32(builder, h):
    return builder.bitcast(builder.shl(builder.zext(h, _I32), _c(16)), _F32)


def _f32_to_bf16(builder, f):
    u = builder.bitcast(f, _I32)
    lsb = builder.and_(builder.lshr(u, _c(16)), _c(1))
    rounded = builder.lshr(builder.add(builder.add(u, _c(0x7FFF)), lsb), _c(16))
    quiet = builder.or_(builder.lshr(u, _c(16)), _c(0x0040))
    is_nan = builder.icmp_unsigned(">", builder.and_(u, _c(0x7FFFFFFF)), _c(0x7F800000))
    return builder.trunc(builder.select(is_nan, quiet, rounded), _I16)


def _f16_to_f32_soft(builder, h):
    h = builder.zext(h, _I32)
    sign = builder.shl(builder.and_(h, _c(0x8000)), _c(16))
    mag = builder.shl(builder.and_(h, _c(0x7FFF)), _c(13))  # exponent and mantissa in float32's places
    exp = builder.and_(h, _c(0x7C00))
    normal = builder.add(mag, _c(112 << 23))  # rebias 15 -> 127
    # inf; NaN made quiet, with its payload (what vcvtph2ps gives)
    quiet = builder.select(builder.icmp_unsigned("!=", builder.and_(h, _c(0x3FF)), _c(0)), _c(0x400000), _c(0))
    special = builder.or_(builder.or_(mag, _c(0x7F800000)), quiet)
    # subnormal: mantissa * 2**-24, both steps exact
    sub = builder.fmul(builder.uitofp(builder.and_(h, _c(0x3FF)), _F32), ir.Constant(_F32, 2.0 ** -24))
    sub = builder.bitcast(sub, _I32)
    out = builder.select(builder.icmp_unsigned("==", exp, _c(0x7C00)), special,
                         builder.select(builder.icmp_unsigned("==", exp, _c(0)), sub, normal))
    return builder.bitcast(builder.or_(out, sign), _F32)


def _f32_to_f16_soft(builder, f):
    u = builder.bitcast(f, _I32)
    sign = builder.and_(builder.lshr(u, _c(16)), _c(0x8000))
    a = builder.and_(u, _c(0x7FFFFFFF))
    # NaN: quiet, with the leading payload bits (what vcvtps2ph gives)
    nan = builder.or_(builder.and_(builder.lshr(a, _c(13)), _c(0x3FF)), _c(0x7E00))
    # normal range: rebias and round the 13 dropped bits to nearest even; past 65504 this reaches 0x7C00 (inf)
    lsb = builder.and_(builder.lshr(a, _c(13)), _c(1))
    normal = builder.lshr(builder.add(builder.add(builder.sub(a, _c(112 << 23)), _c(0xFFF)), lsb), _c(13))
    normal = builder.select(builder.icmp_unsigned(">", normal, _c(0x7C00)), _c(0x7C00), normal)
    # subnormal range (below 2**-14): the mantissa with its implicit bit, shifted right by s with nearest even
    m = builder.or_(builder.and_(a, _c(0x7FFFFF)), _c(0x800000))
    s = builder.sub(_c(126), builder.lshr(a, _c(23)))
    s = builder.select(builder.icmp_unsigned(">", s, _c(31)), _c(31), s)
    r = builder.lshr(m, s)
    rem = builder.and_(m, builder.sub(builder.shl(_c(1), s), _c(1)))
    half = builder.shl(_c(1), builder.sub(s, _c(1)))
    up = builder.or_(builder.icmp_unsigned(">", rem, half),
                     builder.and_(builder.icmp_unsigned("==", rem, half),
                                  builder.icmp_unsigned("!=", builder.and_(r, _c(1)), _c(0))))
    sub = builder.add(r, builder.zext(up, _I32))
    out = builder.select(builder.icmp_unsigned(">", a, _c(0x7F800000)), nan,
                         builder.select(builder.icmp_unsigned("<", a, _c(0x38800000)), sub, normal))
    return builder.trunc(builder.or_(out, sign), _I16)


def _f16_to_f32_f16c(builder, h):
    return builder.fpext(builder.bitcast(h, ir.HalfType()), _F32)


def _f32_to_f16_f16c(builder, f):
    return builder.bitcast(builder.fptrunc(f, ir.HalfType()), _I16)


def _widening(convert):
    """An intrinsic: a 16-bit pattern (any 16-bit integer type) -> float32."""
    @intrinsic
    def widen16(typingctx, h):
        if not (isinstance(h, types.Integer) and h.bitwidth == 16):
            return None

        def codegen(context, builder, signature, args):
            return convert(builder, args[0])
        return types.float32(h), codegen
    return widen16


def _narrowing(convert, result):
    """An intrinsic: a float (cast to float32 first, as the arithmetic is float32) -> a 16-bit pattern of type
    ``result``."""
    @intrinsic
    def narrow16(typingctx, v):
        if not isinstance(v, (types.Float, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            f = context.cast(builder, args[0], signature.args[0], types.float32)
            return convert(builder, f)
        return result(v), codegen
    return narrow16


bf16_to_f32 = _widening(_bf16_to_f32)
f32_to_bf16 = _narrowing(_f32_to_bf16, types.uint16)
f16_to_f32_soft = _widening(_f16_to_f32_soft)
f32_to_f16_soft = _narrowing(_f32_to_f16_soft, types.int16)
f16_to_f32_f16c = _widening(_f16_to_f32_f16c)
f32_to_f16_f16c = _narrowing(_f32_to_f16_f16c, types.int16)
f16_to_f32 = f16_to_f32_f16c if F16C else f16_to_f32_soft
f32_to_f16 = f32_to_f16_f16c if F16C else f32_to_f16_soft


# --- what the kernels call --------------------------------------------------------------------------------------

def widen(v):
    """An element loaded from a data array, as the kernel's working dtype (float32 for the 16-bit formats)."""
    raise NotImplementedError("for numba-compiled code only")


def narrow(a, v):
    """``v`` as an element of array ``a`` (one rounding to a 16-bit format; for float arrays, ``v`` itself)."""
    raise NotImplementedError("for numba-compiled code only")


@overload(widen)
def _widen(v):
    if v == types.uint16:
        return lambda v: bf16_to_f32(v)
    if v == types.int16:
        return lambda v: f16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v
    return None


@overload(narrow)
def _narrow(a, v):
    if not isinstance(a, types.Array):
        return None
    if a.dtype == types.uint16:
        return lambda a, v: f32_to_bf16(v)
    if a.dtype == types.int16:
        return lambda a, v: f32_to_f16(v)
    if isinstance(a.dtype, types.Float):
        return lambda a, v: v
    return None
