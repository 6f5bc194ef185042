"""LLVM vector types and CPU intrinsics usable inside @njit code.

Plain Numba loops do not become vpdpbusd, sdot or wide FMAs (../shared/notes/KERNELS.md): integer
products are widened and the loops stay scalar. Here a Numba type wraps an LLVM vector (64 x i8,
16 x i32, 16 x f32), and small @intrinsic functions emit the loads, nibble splits and intrinsic
calls; LLVM inlines them, and cache=True keeps working. Almost everything is plain vector IR that
LLVM lowers for any target; two operations need a CPU's own instruction: the byte dot product
(`dpbusd`) and the 16-entry byte lookup (`shuffle_bytes`). Each has one path per instruction set,
chosen when Numba compiles, by target architecture first and CPU features second (`kernel_path()`):
x86 AVX-512 VNNI (the first target) or AVX2; aarch64 with i8mm (usdot), dotprod (sdot) or plain
ARMv8.0 NEON (widening multiplies; tbl for lookups). LLVM splits the 512-bit vectors into the
registers a target has. An x86 intrinsic never reaches an aarch64 compile, nor the reverse.
"""

from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model


class Vec(types.Type):
    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n
        super().__init__(name=f"vec{n}x{kind}")


_ELEM = {"i8": ir.IntType(8), "i16": ir.IntType(16), "i32": ir.IntType(32), "i64": ir.IntType(64),
         "f32": ir.FloatType()}


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_ELEM[fe_type.kind], fe_type.n))


V64I8, V32I16, V16I32, V16F32 = Vec("i8", 64), Vec("i16", 32), Vec("i32", 16), Vec("f32", 16)


def _ptr(context, builder, arr_ty, arr, offset, vec_ty):
    data = cgutils.create_struct_proxy(arr_ty)(context, builder, value=arr).data
    p = builder.gep(data, [offset])
    return builder.bitcast(p, ir.PointerType(vec_ty))


def _loader(vtype):
    @intrinsic
    def load(typingctx, arr, offset):
        sig = vtype(arr, offset)

        def codegen(context, builder, signature, args):
            llty = context.get_value_type(vtype)
            ptr = _ptr(context, builder, signature.args[0], args[0], args[1], llty)
            return builder.load(ptr, align=1)
        return sig, codegen
    return load


load_i8 = _loader(V64I8)
load_f32 = _loader(V16F32)


_ALIGN = {"i8": 1, "i16": 2, "i32": 4, "i64": 8, "f32": 4}  # an element's size: stores need no more alignment


def _storer(vtype):
    """arr[offset:offset + lanes] = v."""
    @intrinsic
    def store(typingctx, arr, offset, v):
        def codegen(context, builder, signature, args):
            llty = context.get_value_type(vtype)
            ptr = _ptr(context, builder, signature.args[0], args[0], args[1], llty)
            builder.store(args[2], ptr, align=_ALIGN[vtype.kind])
            return context.get_dummy_value()
        return types.none(arr, offset, vtype), codegen
    return store


def _zeros(vtype):
    @intrinsic
    def zeros(typingctx):
        def codegen(context, builder, signature, args):
            return ir.Constant(context.get_value_type(vtype), None)
        return vtype(), codegen
    return zeros




def _bytewise(op: str, constant: int):
    """An elementwise op of 64 bytes with a constant (and_, lshr, ...)."""
    @intrinsic
    def bytewise(typingctx, v):
        def codegen(context, builder, signature, args):
            return getattr(builder, op)(args[0], ir.Constant(ir.VectorType(ir.IntType(8), 64), [constant] * 64))
        return V64I8(V64I8), codegen
    return bytewise


def constant_bytes(values):
    """An intrinsic giving 64 bytes (`values`, 0..255) as a constant vector: a table for
    `shuffle_bytes`, in a register or a load's operand, never rebuilt."""
    signed = [int(v) - 256 if v > 127 else int(v) for v in values]
    assert len(signed) == 64 and all(-128 <= v <= 127 for v in signed)

    @intrinsic
    def constant(typingctx):
        def codegen(context, builder, signature, args):
            return ir.Constant(ir.VectorType(ir.IntType(8), 64), signed)
        return V64I8(), codegen
    return constant


@intrinsic
def broadcast4(typingctx, arr, offset):
    """Bytes arr[offset .. offset + 3] repeated in every 4-byte lane of a 64-byte vector (x86: an
    embedded {1to16} broadcast operand of vpdpbusd): 4 activations against 16 rows' 4 weights."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v16 = ir.VectorType(i32, 16)
        word = builder.load(_ptr(context, builder, signature.args[0], args[0], args[1], i32), align=1)
        one = builder.insert_element(ir.Constant(v16, ir.Undefined), word, i32(0))
        return builder.bitcast(builder.shuffle_vector(one, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16)),
                               ir.VectorType(ir.IntType(8), 64))
    return V64I8(arr, offset), codegen


lo_nibbles = _bytewise("and_", 0x0F)


def _shift_bytes(builder, v, shift: int):
    """Each byte shifted left by `shift` (right when negative), for a caller that then masks each
    byte to bits that came from the same byte. x86 has no byte shift: LLVM's choice for one, with
    GFNI, is vgf2p8affineqb, which takes the pipes the byte dot products run on (Zen 4); a 16-bit
    shift, whose bits crossing into the next byte the mask drops, runs beside them (the 4-bit GEMM
    into float32: +4-5% on one thread, +3-13% on two, bench/RESULTS.md; the 3-, 5- and 6-bit loops
    had 12-13 vgf2p8affineqb each, now none). aarch64 shifts bytes."""
    if shift == 0:
        return v
    if _target()[0] == "aarch64":
        count = ir.Constant(v.type, [abs(shift)] * 64)
        return builder.shl(v, count) if shift > 0 else builder.lshr(v, count)
    w = ir.VectorType(ir.IntType(16), 32)
    count = ir.Constant(w, [abs(shift)] * 32)
    words = builder.bitcast(v, w)
    return builder.bitcast(builder.shl(words, count) if shift > 0 else builder.lshr(words, count), v.type)


@intrinsic
def hi_nibbles(typingctx, v):
    """Each byte's high nibble."""
    def codegen(context, builder, signature, args):
        return builder.and_(_shift_bytes(builder, args[0], -4), ir.Constant(args[0].type, [0x0F] * 64))
    return V64I8(V64I8), codegen


def _with_high_bits(field: int):
    """nibbles | (2-bit field `field` of each byte of `planes`) << 4: 6-bit values (q6.py)."""
    @intrinsic
    def with_high_bits(typingctx, nibbles, planes):
        def codegen(context, builder, signature, args):
            const = lambda k: ir.Constant(ir.VectorType(ir.IntType(8), 64), [k] * 64)  # noqa: E731
            return builder.or_(args[0], builder.and_(_shift_bytes(builder, args[1], 4 - 2 * field), const(0x30)))
        return V64I8(V64I8, V64I8), codegen
    return with_high_bits


high_bits0, high_bits1, high_bits2, high_bits3 = (_with_high_bits(f) for f in range(4))


def _with_high_bit(bit: int, at: int):
    """(low | (bit `bit` of each byte of `plane`) << at) + bias (splat_i8): 5-bit values from
    nibbles (at 4), 3-bit ones from 2-bit fields (at 2) (q6.py), moved by the bias into the 6-bit
    range a signed type's integers have in 6 bits."""
    @intrinsic
    def with_high_bit(typingctx, low, plane, bias):
        def codegen(context, builder, signature, args):
            const = lambda k: ir.Constant(ir.VectorType(ir.IntType(8), 64), [k] * 64)  # noqa: E731
            p = builder.and_(_shift_bytes(builder, args[1], at - bit), const(1 << at))
            return builder.add(builder.or_(args[0], p), args[2])
        return V64I8(V64I8, V64I8, V64I8), codegen
    return with_high_bit


high_bit0, high_bit1, high_bit2, high_bit3, high_bit4, high_bit5, high_bit6, high_bit7 = (
    _with_high_bit(b, 4) for b in range(8))
third_bit0, third_bit1, third_bit2, third_bit3, third_bit4, third_bit5, third_bit6, third_bit7 = (
    _with_high_bit(b, 2) for b in range(8))


def _crumb(field: int):
    """Each byte's 2-bit field `field` (bits 2 field, 2 field + 1), as a byte: the 2- and 3-bit
    widths' low bits (q6.py)."""
    @intrinsic
    def crumb(typingctx, v):
        def codegen(context, builder, signature, args):
            return builder.and_(_shift_bytes(builder, args[0], -2 * field), ir.Constant(args[0].type, [3] * 64))
        return V64I8(V64I8), codegen
    return crumb


crumb0, crumb1, crumb2, crumb3 = (_crumb(f) for f in range(4))


def _dpbusd(small: bool):
    """acc + sum of 4 adjacent u8(a) * s8(b) per i32 lane. x86: vpdpbusd on AVX-512 VNNI; on AVX2,
    vpmaddubsw on bytes a <= 63 (its 16-bit pair sums cannot saturate: 2 * 63 * 128 < 2**15) then
    vpmaddwd against ones, per 32-byte half: `small` a (4- and 6-bit weights) as they are, larger a as
    16 * high nibble + low nibble (vpmaddwd against 16s and ones). aarch64 (per 16-byte
    quarter, whose 4 lanes sum the same bytes): usdot with i8mm; with dotprod, sdot (when `small`, a
    is a signed byte already; otherwise sdot(a - 128, b) + 128 * sum(b), the second term as
    -sdot(-128, b)); on ARMv8.0, 16-bit products of 8 bytes at a time (smull when `small`), saddlp
    (pairs, widened) and addp (pairs of pairs; larger a widened to 16 bits first, 255 * 128 < 2**15).
    Every path gives the exact integer sums."""
    @intrinsic
    def dpbusd(typingctx, acc, a, b):
        def codegen(context, builder, signature, args):
            i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
            v16 = ir.VectorType(i32, 16)
            path = kernel_path()
            if path == "avx512-vnni":
                fnty = ir.FunctionType(v16, [v16, v16, v16])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
                return builder.call(fn, [args[0], builder.bitcast(args[1], v16), builder.bitcast(args[2], v16)])
            if path == "avx2":
                v32x8, v16x16, v8x32 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
                maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16x16, [v32x8, v32x8]),
                                                         "llvm.x86.avx2.pmadd.ub.sw")
                maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8x32, [v16x16, v16x16]),
                                                        "llvm.x86.avx2.pmadd.wd")

                def madd(a, h, weight):  # 32 bytes (half h) of a <= 63 against b, lanes of 4 summed, times weight
                    return builder.call(maddwd, [builder.call(maddubs, [_part(builder, a, h, 32), _part(builder, args[2], h, 32)]),
                                                 ir.Constant(v16x16, [weight] * 16)])
                if small:
                    halves = [madd(args[1], h, 1) for h in range(2)]
                else:  # a = 16 * high nibble + low nibble, each small
                    nibble = ir.Constant(args[1].type, [0x0F] * 64)
                    lo, hi = builder.and_(args[1], nibble), builder.lshr(args[1], ir.Constant(args[1].type, [4] * 64))
                    halves = [builder.add(madd(hi, h, 16), madd(lo, h, 1)) for h in range(2)]
                return builder.add(args[0], _join(builder, halves))
            if path in ("neon-i8mm", "neon-dotprod"):
                v4, b16 = ir.VectorType(i32, 4), ir.VectorType(i8, 16)
                name = "usdot" if path == "neon-i8mm" else "sdot"
                dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v4, [v4, b16, b16]),
                                                     f"llvm.aarch64.neon.{name}.v4i32.v16i8")
                a = args[1]
                if name == "sdot" and not small:  # a - 128 as a signed byte
                    a = builder.xor(a, ir.Constant(a.type, [0x80] * 64))
                quarters = []
                for q in range(4):
                    part = builder.call(dot, [_part(builder, args[0], q, 4), _part(builder, a, q, 16),
                                              _part(builder, args[2], q, 16)])
                    if name == "sdot" and not small:
                        minus = builder.call(dot, [ir.Constant(v4, None), ir.Constant(b16, [-128] * 16),
                                                   _part(builder, args[2], q, 16)])
                        part = builder.sub(part, minus)
                    quarters.append(part)
                return _join(builder, quarters)
            if path == "neon":  # ARMv8.0: 16-bit products of 8 bytes, pair sums widened, then pairs of those
                v4, v8x16, b8 = ir.VectorType(i32, 4), ir.VectorType(i16, 8), ir.VectorType(i8, 8)
                smull = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8x16, [b8, b8]),
                                                       "llvm.aarch64.neon.smull.v8i16")
                saddlp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v4, [v8x16]),
                                                        "llvm.aarch64.neon.saddlp.v4i32.v8i16")
                addp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v4, [v4, v4]),
                                                      "llvm.aarch64.neon.addp.v4i32")
                quarters = []
                for q in range(4):
                    pairs = []
                    for e in range(2):  # bytes 16q + 8e .. + 7
                        a, b = _part(builder, args[1], 2 * q + e, 8), _part(builder, args[2], 2 * q + e, 8)
                        if small:  # a <= 63 is a signed byte too
                            products = builder.call(smull, [a, b])
                        else:
                            products = builder.mul(builder.zext(a, v8x16), builder.sext(b, v8x16))
                        pairs.append(builder.call(saddlp, [products]))
                    quarters.append(builder.add(_part(builder, args[0], q, 4), builder.call(addp, pairs)))
                return _join(builder, quarters)
            raise NotImplementedError(f"the byte dot product on {path}")  # has_kernels() keeps callers away
        return V16I32(V16I32, V64I8, V64I8), codegen
    return dpbusd


def _part(builder, v, index: int, lanes: int):
    """Lanes index * lanes .. (index + 1) * lanes - 1 of v, as a vector of their own."""
    mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [index * lanes + i for i in range(lanes)])
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask)


def _join(builder, parts: list):
    """Equal vectors end to end (2 or 4 of them)."""
    while len(parts) > 1:
        n = 2 * parts[0].type.count
        mask = ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n)))
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], mask) for i in range(0, len(parts), 2)]
    return parts[0]


dpbusd = _dpbusd(small=False)  # any unsigned bytes (8-bit weights + 128)
dpbusd_nibbles = _dpbusd(small=True)  # unsigned bytes <= 63 (4- and 6-bit weights)


@intrinsic
def to_f32(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], ir.VectorType(ir.FloatType(), 16))
    return V16F32(V16I32), codegen


@intrinsic
def fma(typingctx, a, b, c):
    def codegen(context, builder, signature, args):
        v = ir.VectorType(ir.FloatType(), 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v, v, v]), "llvm.fma.v16f32")
        return builder.call(fn, list(args))
    return V16F32(V16F32, V16F32, V16F32), codegen


@intrinsic
def load_floats(typingctx, arr, offset):
    """arr[offset:offset + 16] as 16 float32 lanes: float32 values, fp16 bits stored as uint16
    (widened with vcvtph2ps), or int8 values."""
    half, byte = arr.dtype == types.uint16, arr.dtype == types.int8

    def codegen(context, builder, signature, args):
        elem = ir.IntType(16) if half else ir.IntType(8) if byte else ir.FloatType()
        ptr = _ptr(context, builder, signature.args[0], args[0], args[1], ir.VectorType(elem, 16))
        values = builder.load(ptr, align=2 if half else 1 if byte else 4)
        if half:
            values = builder.fpext(builder.bitcast(values, ir.VectorType(ir.HalfType(), 16)),
                                   ir.VectorType(ir.FloatType(), 16))
        elif byte:
            values = builder.sitofp(values, ir.VectorType(ir.FloatType(), 16))
        return values
    return V16F32(arr, offset), codegen


@intrinsic
def store_floats(typingctx, arr, offset, v):
    """arr[offset:offset + 16] = v: float32, or rounded to fp16 bits (uint16) as vcvtps2ph rounds."""
    half = arr.dtype == types.uint16

    def codegen(context, builder, signature, args):
        value = args[2]
        if half:
            value = builder.bitcast(builder.fptrunc(value, ir.VectorType(ir.HalfType(), 16)),
                                    ir.VectorType(ir.IntType(16), 16))
        ptr = _ptr(context, builder, signature.args[0], args[0], args[1], value.type)
        builder.store(value, ptr, align=2 if half else 4)
        return context.get_dummy_value()
    return types.none(arr, offset, V16F32), codegen


def _binary(op: str):
    """An elementwise op of two float32 vectors (fadd, fsub, fdiv, ...)."""
    @intrinsic
    def binary(typingctx, a, b):
        def codegen(context, builder, signature, args):
            return getattr(builder, op)(args[0], args[1])
        return V16F32(V16F32, V16F32), codegen
    return binary


add = _binary("fadd")
mul = _binary("fmul")
sub = _binary("fsub")
div = _binary("fdiv")


@intrinsic
def neg(typingctx, a):
    def codegen(context, builder, signature, args):
        return builder.fneg(args[0])
    return V16F32(V16F32), codegen


def _broadcast16(builder, x):
    """An LLVM float in all 16 lanes of a vector."""
    v16 = ir.VectorType(ir.FloatType(), 16)
    one = builder.insert_element(ir.Constant(v16, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(v16, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))


@intrinsic
def splat(typingctx, x):
    """A float32 scalar in all 16 lanes."""
    def codegen(context, builder, signature, args):
        return _broadcast16(builder, args[0])
    return V16F32(types.float32), codegen




@intrinsic
def splat_at(typingctx, arr, offset):
    """splat(arr[offset]) for a float32 array of any shape (offset flat, never negative): a
    broadcast from memory, which x86 runs on a load port. Through splat(arr[i]) the float is loaded
    first and broadcast from a register, a shuffle on the port an FMA also needs."""
    def codegen(context, builder, signature, args):
        return _broadcast16(builder, builder.load(_ptr(context, builder, signature.args[0], args[0], args[1],
                                                       ir.FloatType())))
    return V16F32(arr, offset), codegen


@intrinsic
def splat_i8(typingctx, x):
    """An integer scalar (it must fit 8 bits) in all 64 bytes."""
    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        byte = builder.trunc(args[0], i8) if args[0].type.width > 8 else args[0]
        v64 = ir.VectorType(i8, 64)
        one = builder.insert_element(ir.Constant(v64, ir.Undefined), byte, ir.IntType(32)(0))
        return builder.shuffle_vector(one, ir.Constant(v64, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
    return V64I8(x), codegen


@intrinsic
def splat_i32(typingctx, x):
    """An integer scalar in all 16 int32 lanes (it must fit 32 bits)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        word = args[0] if args[0].type.width == 32 else \
            builder.trunc(args[0], i32) if args[0].type.width > 32 else builder.sext(args[0], i32)
        v16 = ir.VectorType(i32, 16)
        one = builder.insert_element(ir.Constant(v16, ir.Undefined), word, i32(0))
        return builder.shuffle_vector(one, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16))
    return V16I32(x), codegen


@intrinsic
def hsum(typingctx, v):
    def codegen(context, builder, signature, args):
        v16 = ir.VectorType(ir.FloatType(), 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), v16]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(ir.FloatType(), 0.0), args[0]], fastmath=("reassoc",))
    return types.float32(V16F32), codegen


@intrinsic
def abs_max(typingctx, a, b):
    """max |lane| of two float32 vectors."""
    def codegen(context, builder, signature, args):
        v = ir.VectorType(ir.FloatType(), 16)
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v]), "llvm.fabs.v16f32")
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v, v]), "llvm.maxnum.v16f32")
        both = builder.call(vmax, [builder.call(fabs, [args[0]]), builder.call(fabs, [args[1]])])
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [v]),
                                                "llvm.vector.reduce.fmax.v16f32")
        return builder.call(reduce, [both])
    return types.float32(V16F32, V16F32), codegen


def _roundeven(builder, v):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]), "llvm.roundeven.v16f32")
    return builder.call(fn, [v])


@intrinsic
def store_rounded_i8(typingctx, arr, offset, v):
    """arr[offset:offset + 16] = round(v) (to nearest even) as int8; |v| <= 127."""
    def codegen(context, builder, signature, args):
        q = builder.trunc(builder.fptosi(_roundeven(builder, args[2]), ir.VectorType(ir.IntType(32), 16)),
                          ir.VectorType(ir.IntType(8), 16))
        builder.store(q, _ptr(context, builder, signature.args[0], args[0], args[1], q.type), align=1)
        return context.get_dummy_value()
    return types.none(arr, offset, V16F32), codegen


@intrinsic
def store_truncated_u8(typingctx, arr, offset, v):
    """arr[offset:offset + 16] = int(v) (toward zero, as Python's int) as uint8; 0 <= v < 256."""
    def codegen(context, builder, signature, args):
        q = builder.trunc(builder.fptoui(args[2], ir.VectorType(ir.IntType(32), 16)), ir.VectorType(ir.IntType(8), 16))
        builder.store(q, _ptr(context, builder, signature.args[0], args[0], args[1], q.type), align=1)
        return context.get_dummy_value()
    return types.none(arr, offset, V16F32), codegen


@intrinsic
def roundeven(typingctx, v):
    """Each float32 lane rounded to the nearest integer, ties to even (numpy's round)."""
    def codegen(context, builder, signature, args):
        return _roundeven(builder, args[0])
    return V16F32(V16F32), codegen


def _lanewise(name: str):
    """An LLVM intrinsic of two float32 vectors, lane by lane (llvm.maxnum, llvm.minnum)."""
    @intrinsic
    def lanewise(typingctx, a, b):
        def codegen(context, builder, signature, args):
            v16 = ir.VectorType(ir.FloatType(), 16)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16]), f"llvm.{name}.v16f32")
            return builder.call(fn, [args[0], args[1]])
        return V16F32(V16F32, V16F32), codegen
    return lanewise


max_f32 = _lanewise("maxnum")  # the larger of each pair of lanes (no NaNs)
min_f32 = _lanewise("minnum")


@intrinsic
def hmax(typingctx, v):
    """The largest of 16 float32 lanes (no NaNs)."""
    def codegen(context, builder, signature, args):
        v16 = ir.VectorType(ir.FloatType(), 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [v16]),
                                            "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, [args[0]], fastmath=("nnan",))
    return types.float32(V16F32), codegen


# aarch64 CPUs (LLVM's names) whose dot product instructions their name implies; a CPU not listed
# gets what NUMBA_CPU_FEATURES (e.g. "+dotprod,+i8mm") or LLVM's host detection says.
_DOTPROD = {"cortex-a55", "cortex-a75", "cortex-a76", "cortex-a76ae", "cortex-a77", "cortex-a78", "cortex-a78c",
            "cortex-x1", "neoverse-n1", "neoverse-e1", "apple-a13", "apple-a14", "apple-m1", "tsv110"}
_I8MM = {"cortex-a710", "cortex-a715", "cortex-a720", "cortex-x2", "cortex-x3", "cortex-x4", "neoverse-n2",
         "neoverse-v1", "neoverse-v2", "neoverse-512tvb", "apple-a15", "apple-a16", "apple-a17", "apple-m2",
         "apple-m3", "ampere1", "ampere1a"}


@lru_cache(maxsize=1)
def _target() -> tuple[str, str, frozenset]:
    """(architecture, CPU name, features) that Numba compiles for: the process's triple, and the host
    CPU unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another (under qemu, LLVM sees a "generic"
    CPU with no features: name one, or only the plain paths are chosen)."""
    from llvmlite import binding
    from numba.core import config

    arch = binding.get_process_triple().split("-")[0]
    name = config.CPU_NAME if config.CPU_NAME not in (None, "host") else binding.get_host_cpu_name()
    if config.CPU_FEATURES is not None:
        features = {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    else:
        features = {f for f, on in binding.get_host_cpu_features().items() if on}
    if arch in ("aarch64", "arm64"):
        arch = "aarch64"
        features |= {"dotprod", "i8mm"} if name in _I8MM else {"dotprod"} if name in _DOTPROD else set()
    return arch, name, frozenset(features)


def kernel_path() -> str | None:
    """Which instructions the 4/8-bit kernels compile to here: "avx512-vnni" or "avx2" (x86),
    "neon-i8mm", "neon-dotprod" or "neon" (aarch64; NEON is part of every aarch64 CPU), or None
    (an x86 CPU older than AVX2, or another architecture: the float32 path runs)."""
    arch, _, f = _target()
    if arch == "x86_64":
        if {"avx512f", "avx512bw", "avx512vnni"} <= f:
            return "avx512-vnni"
        return "avx2" if {"avx2", "fma", "f16c"} <= f else None
    if arch == "aarch64":
        return "neon-i8mm" if "i8mm" in f and "dotprod" in f else "neon-dotprod" if "dotprod" in f else "neon"
    return None


def has_kernels() -> bool:
    """Whether the 4/8-bit kernels run here: see kernel_path()."""
    return kernel_path() is not None


@intrinsic
def prefetch(typingctx, arr, offset):
    """Hint that arr[offset] will be read soon (llvm.prefetch: read, into L2 and outer levels: on x86
    prefetcht1. Into L1 (prefetcht0), the weights' streams kept fewer lines in flight from memory)."""
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()
    return types.none(arr, offset), codegen




# e**r for |r| <= ln(2)/2: Taylor terms up to r**7 (relative error below 1e-8).
_EXP_TERMS = [1 / __import__("math").factorial(k) for k in range(8)]
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * _LN2_HI is exact (Cody-Waite)


@intrinsic
def exp_f32(typingctx, v):
    """e**v in 16 lanes without a vector math library: 2**n * e**r with n = round(v / ln 2),
    r = v - n ln 2 by polynomial; inputs are clamped to +-87 (float32's range)."""
    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        v16, i16 = ir.VectorType(f32, 16), ir.VectorType(i32, 16)

        def const(x, ty=v16):
            return ir.Constant(ty, [x] * 16)

        def call(name, *xs):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * len(xs)), name)
            return builder.call(fn, list(xs))

        x = call("llvm.minnum.v16f32", call("llvm.maxnum.v16f32", args[0], const(-87.0)), const(87.0))
        n = call("llvm.rint.v16f32", builder.fmul(x, const(1.4426950408889634)))
        r = call("llvm.fma.v16f32", n, const(-_LN2_HI), x)
        r = call("llvm.fma.v16f32", n, const(-_LN2_LO), r)
        p = const(_EXP_TERMS[-1])
        for c in reversed(_EXP_TERMS[:-1]):
            p = call("llvm.fma.v16f32", p, r, const(c))
        bits = builder.shl(builder.add(builder.fptosi(n, i16), const(127, i16)), const(23, i16))
        return builder.fmul(p, builder.bitcast(bits, v16))
    return V16F32(V16F32), codegen


@intrinsic
def shuffle_bytes(typingctx, table, index):
    """table[index] per byte within each 16-byte lane: 64 lookups into a 16-entry table repeated in
    the 4 lanes; index bytes must be 0..15. vpshufb (x86: one 512-bit or two 256-bit), tbl (aarch64,
    one per 16-byte lane); elsewhere a plain IR gather of bytes."""
    def codegen(context, builder, signature, args):
        v64 = ir.VectorType(ir.IntType(8), 64)
        path = kernel_path()
        if path == "avx512-vnni":
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64, [v64, v64]),
                                                "llvm.x86.avx512.pshuf.b.512")
            return builder.call(fn, list(args))
        if path == "avx2":
            v32 = ir.VectorType(ir.IntType(8), 32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32, v32]), "llvm.x86.avx2.pshuf.b")
            return _join(builder, [builder.call(fn, [_part(builder, a, h, 32) for a in args]) for h in range(2)])
        if path and path.startswith("neon"):
            v16 = ir.VectorType(ir.IntType(8), 16)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16]), "llvm.aarch64.neon.tbl1.v16i8")
            return _join(builder, [builder.call(fn, [_part(builder, a, q, 16) for a in args]) for q in range(4)])
        raise NotImplementedError(f"shuffle_bytes on {path}")
    return V64I8(V64I8, V64I8), codegen


def _widen(half: int):
    """Bytes 32*half .. 32*half+31 as unsigned 16-bit lanes."""
    @intrinsic
    def widen(typingctx, v):
        def codegen(context, builder, signature, args):
            mask = ir.Constant(ir.VectorType(ir.IntType(32), 32), [32 * half + i for i in range(32)])
            part = builder.shuffle_vector(args[0], ir.Constant(args[0].type, ir.Undefined), mask)
            return builder.zext(part, ir.VectorType(ir.IntType(16), 32))
        return V32I16(V64I8), codegen
    return widen


widen_lo, widen_hi = _widen(0), _widen(1)


@intrinsic
def add_i16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])
    return V32I16(V32I16, V32I16), codegen


@intrinsic
def add_i8(typingctx, a, b):
    """Bytes added lane by lane (wrapping)."""
    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])
    return V64I8(V64I8, V64I8), codegen


store_f32, store_i16 = _storer(V16F32), _storer(V32I16)
zeros_f32, zeros_i32, zeros_i16 = _zeros(V16F32), _zeros(V16I32), _zeros(V32I16)


# --- Fixed point: sums that do not depend on their order ------------------------------------------
# A product whose output is a partial sum over its input columns (o_proj, down_proj: on a cluster
# each node holds some of the columns) rounds each group's term to a multiple of 2**-FIXED_BITS and
# adds those as int64. Integer addition is associative, so one node and any split of the groups over
# nodes give the very same sums. Per group, not per vector: a shard's chunks start at other columns
# than the whole matrix's, its groups at the same ones.
FIXED_BITS = 28  # resolution 3.7e-9, far below a hidden state's last bit; a group's term up to 2**23
FIXED_SCALE = 2.0 ** -FIXED_BITS
_MAGIC = 1.5 * 2.0 ** 52  # x + _MAGIC holds round(x) in its low mantissa bits, for |x| < 2**51
_MAGIC_BITS = 0x4338000000000000

V16I64 = Vec("i64", 16)
zeros_i64 = _zeros(V16I64)
store_i64 = _storer(V16I64)
load_i64 = _loader(V16I64)


def _round_fixed(builder, x):
    """float32 lanes x (a term times 2**FIXED_BITS: scaled exactly, by a power of two) -> int64 lanes
    round(x), to nearest even: vcvtps2qq with AVX-512 DQ; else widened to double (exact) and rounded
    by the 1.5 * 2**52 addition (AVX2 has no vcvtpd2qq). The same integers either way, for
    |x| < 2**51."""
    n = x.type.count
    if kernel_path() == "avx512-vnni" and "avx512dq" in _target()[2]:
        v8, q8 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.IntType(64), 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(q8, [v8, q8, ir.IntType(8), ir.IntType(32)]),
                                            "llvm.x86.avx512.mask.cvtps2qq.512")
        halves = [builder.call(fn, [_part(builder, x, h, 8), ir.Constant(q8, None), ir.Constant(ir.IntType(8), -1),
                                    ir.Constant(ir.IntType(32), 4)])  # 4: the current rounding mode (to nearest even)
                  for h in range(n // 8)]
        return _join(builder, halves)
    wide = builder.fpext(x, ir.VectorType(ir.DoubleType(), n))
    shifted = builder.bitcast(builder.fadd(wide, ir.Constant(wide.type, [_MAGIC] * n)), ir.VectorType(ir.IntType(64), n))
    return builder.sub(shifted, ir.Constant(shifted.type, [_MAGIC_BITS] * n))


def _pair_sums(builder, a, b):
    """Lanes (2i, 2i + 1) of a then b, added: half as many lanes as a and b together."""
    n = a.type.count
    i32 = ir.IntType(32)
    even = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), list(range(1, 2 * n, 2))))
    return builder.fadd(even, odd) if isinstance(a.type.element, ir.FloatType) else builder.add(even, odd)


@intrinsic
def hsum16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """Sixteen vectors' horizontal sums as the lanes of one (lane i: the sum of vi), by a tree of
    pairwise lane sums: 15 shuffle pairs and adds where 16 separate reductions take 64."""
    def codegen(context, builder, signature, args):
        level = list(args)
        while len(level) > 1:
            level = [_pair_sums(builder, level[i], level[i + 1]) for i in range(0, len(level), 2)]
        return level[0]
    return V16F32(*[V16F32] * 16), codegen


@intrinsic
def scaled_to_fixed(typingctx, v):
    """Terms formed in units of 2**-FIXED_BITS (fixed_unit) as fixed point: rounded to int64."""
    def codegen(context, builder, signature, args):
        return _round_fixed(builder, args[0])
    return V16I64(V16F32), codegen


@intrinsic
def add_i64(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])
    return a(a, b), codegen


@intrinsic
def lane(typingctx, v, i):
    """Lane i of a float32 or int64 vector."""
    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32)))
    return (types.float32 if v.kind == "f32" else types.int64)(v, i), codegen


# A kernel's accumulators follow its output array: float32 out -> float lanes; int64 out -> fixed point.


def _zero_accumulator(fixed_zero):
    def zero(out):
        """A zero accumulator for a kernel writing `out`: float32 lanes, or `fixed_zero`'s int64 ones."""

    @overload(zero)
    def _zero(out):
        if out.dtype == types.int64:
            return lambda out: fixed_zero()
        return lambda out: zeros_f32()
    return zero


accumulator = _zero_accumulator(zeros_i64)  # q4, q8: a GEMM pass's 16 rows


def store16(out, offset, acc):
    """out[offset:offset + 16] = an accumulator's lanes (float32, or int64 fixed point)."""


@overload(store16)
def _store16(out, offset, acc):
    if acc == V16I64:
        return lambda out, offset, acc: store_i64(out, offset, acc)
    return lambda out, offset, acc: store_f32(out, offset, acc)


def load16(a, offset):
    """a[offset:offset + 16] as an accumulator's lanes (float32, or int64 fixed point)."""


@overload(load16)
def _load16(a, offset):
    if a.dtype == types.int64:
        return lambda a, offset: load_i64(a, offset)
    return lambda a, offset: load_f32(a, offset)


def accumulate_units(acc, terms):
    """q4, q8: acc + 16 terms formed in fixed_unit's units (float32, or each rounded to fixed point)."""


@overload(accumulate_units)
def _accumulate_units(acc, terms):
    if acc == V16I64:
        return lambda acc, terms: add_i64(acc, scaled_to_fixed(terms))
    return lambda acc, terms: add(acc, terms)


# q4's and q8's accumulators: a row per lane, its groups' (q8: units') terms in 4 running sums by
# index mod 4, added at the end as ((0 + 1) + (2 + 3)): in float32 the very order of the 4-row
# layouts before (so outputs kept their bits); in fixed point one sum (integers add in any order).


def accumulator4(out):
    """q4, q8: zero accumulators for a kernel writing `out` (into0 .. into3 add to them)."""


@overload(accumulator4)
def _accumulator4(out):
    if out.dtype == types.int64:
        return lambda out: zeros_i64()
    return lambda out: (zeros_f32(), zeros_f32(), zeros_f32(), zeros_f32())


def _adder(k: int):
    def into(acc, term):
        """q4, q8: acc + the term of a group (unit) whose index is k mod 4."""

    @overload(into)
    def _into(acc, term):
        if acc == V16I64:
            return lambda acc, term: accumulate_units(acc, term)
        return [lambda acc, term: (add(acc[0], term), acc[1], acc[2], acc[3]),
                lambda acc, term: (acc[0], add(acc[1], term), acc[2], acc[3]),
                lambda acc, term: (acc[0], acc[1], add(acc[2], term), acc[3]),
                lambda acc, term: (acc[0], acc[1], acc[2], add(acc[3], term))][k]
    return into


into0, into1, into2, into3 = (_adder(k) for k in range(4))


def accumulate_product(acc, a, b):
    """q4 (Q4_0): acc + a * b, a group's term as one product, formed in fixed_unit's units: in float32
    one fused multiply-add; in fixed point the product rounded, then added."""


@overload(accumulate_product)
def _accumulate_product(acc, a, b):
    if acc == V16I64:
        return lambda acc, a, b: add_i64(acc, scaled_to_fixed(mul(a, b)))
    return lambda acc, a, b: fma(a, b, acc)


def _product_adder(k: int):
    def into(acc, a, b):
        """q4 (Q4_0): accumulator4's acc + a * b for a group whose index is k mod 4 (accumulate_product)."""

    @overload(into)
    def _into(acc, a, b):
        if acc == V16I64:
            return lambda acc, a, b: accumulate_product(acc, a, b)
        return [lambda acc, a, b: (fma(a, b, acc[0]), acc[1], acc[2], acc[3]),
                lambda acc, a, b: (acc[0], fma(a, b, acc[1]), acc[2], acc[3]),
                lambda acc, a, b: (acc[0], acc[1], fma(a, b, acc[2]), acc[3]),
                lambda acc, a, b: (acc[0], acc[1], acc[2], fma(a, b, acc[3]))][k]
    return into


product_into0, product_into1, product_into2, product_into3 = (_product_adder(k) for k in range(4))


def total4(acc):
    """q4, q8: the rows' sums (16 lanes) from accumulator4's accumulators."""


@overload(total4)
def _total4(acc):
    if acc == V16I64:
        return lambda acc: acc
    return lambda acc: add(add(acc[0], acc[1]), add(acc[2], acc[3]))


def fixed_unit(out):
    """q4, q8: what a term is formed in units of for a kernel writing `out`: 2**FIXED_BITS for fixed
    point (a power of two: the products scale exactly, and the rounding to fixed point needs no
    multiply), 1 for float32 (the very products as before)."""


@overload(fixed_unit)
def _fixed_unit(out):
    if out.dtype == types.int64:
        return lambda out: np.float32(2 ** FIXED_BITS)
    return lambda out: np.float32(1)


def combine4(a, b, c, d):
    """q4, q8: the rows' sums from the 4 sums by index mod 4 (a GEMM's separate passes), as total4 adds them."""


@overload(combine4)
def _combine4(a, b, c, d):
    if a == V16I64:
        return lambda a, b, c, d: add_i64(add_i64(a, b), add_i64(c, d))
    return lambda a, b, c, d: add(add(a, b), add(c, d))


@njit(cache=True)
def _from_fixed(a, out):
    for i in range(a.shape[0]):
        out[i] = np.float32(np.float64(a[i]) * FIXED_SCALE)


def from_fixed(a: np.ndarray) -> np.ndarray:
    """Fixed-point sums (int64) as float32: exact to float64, then rounded once (in one pass: a
    prompt's o_proj and down_proj sums, 512 x 2048 each, took 2-3 ms in numpy's three)."""
    a = np.ascontiguousarray(a, np.int64)
    out = np.empty(a.shape, np.float32)
    _from_fixed(a.reshape(-1), out.reshape(-1))
    return out


def partial_to_float(partial: np.ndarray) -> np.ndarray:
    """A half-layer's output as the float32 vector to add: fixed-point sums (the 4/8-bit path)
    rounded once, float32 partials (the float path) as they are."""
    return from_fixed(partial) if partial.dtype == np.int64 else partial
