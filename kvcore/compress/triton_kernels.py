"""The Triton kernels behind kvcore.compress.kernels (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def round_half_even(v):
    """torch.round of float32 values (ties to even) from floor alone: v - floor(v) is exact."""
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def group_index(offs, G: tl.constexpr, D: tl.constexpr, CHANNEL: tl.constexpr):
    if CHANNEL:
        gi = (offs // (G * D)) * D + offs % D
    else:
        gi = offs // G
    return gi


@triton.jit
def group_reduce(v, CHANNEL: tl.constexpr, MAX: tl.constexpr):
    """min or max of each group of a [ROWS, COLS // PER, PER] tile, shaped to broadcast back:
    along the channel axis a group is a column (reduced over the rows), else a row."""
    if CHANNEL:
        if MAX:
            m = tl.max(v, axis=0)[None, :, :]
        else:
            m = tl.min(v, axis=0)[None, :, :]
    else:
        if MAX:
            m = tl.max(tl.max(v, axis=2), axis=1)[:, None, None]
        else:
            m = tl.min(tl.min(v, axis=2), axis=1)[:, None, None]
    return m


@triton.jit
def quantize_pack_kernel(x_ptr, ign_ptr, s_ptr, z_ptr, out_ptr, n_rows, D, ROWS: tl.constexpr, COLS: tl.constexpr,
                         CHANNEL: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, IGNORE: tl.constexpr,
                         HALF: tl.constexpr, TINY: tl.constexpr):
    """One [ROWS, COLS] tile of x: its groups' ranges, their stored scale (and zero), the codes,
    packed. Along the token axis the tile is ROWS groups of COLS (= group) consecutive values,
    a group per row; along the channel axis it is the ROWS (= group) tokens of one block of
    ROWS * D values, channels program_id(1) * COLS onwards, a group per column. The tile is
    held as [ROWS, COLS // PER, PER]: the PER codes of a byte on the last axis."""
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1 if not SYM else (1 << (BITS - 1)) - 1
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)[:, None, None]
    c = tl.arange(0, COLS // PER)[None, :, None] * PER + tl.arange(0, PER)[None, None, :]
    if CHANNEL:
        c = c + tl.program_id(1) * COLS
        offs = pid * ROWS * D + r * D + c
        valid = (r < ROWS) & (c < D)  # (r < ROWS: the mask in the tile's full shape)
        gi = pid * D + c  # the group of each column
        gmask = c < D
    else:
        row = pid * ROWS + r
        offs = row * COLS + c
        valid = (row < n_rows) & (c < COLS)
        gi = row
        gmask = row < n_rows
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # exact in every input dtype
    counted = valid
    if IGNORE:  # outliers: left out of the ranges (their codes are clamped like any value's)
        counted = valid & (tl.load(ign_ptr + offs, mask=valid, other=1) == 0)

    # Quant._ranges, value for value
    if SYM:
        amax = group_reduce(tl.where(counted, tl.abs(x), 0.0), CHANNEL, True)
        scale = tl.div_rn(amax, tl.full(amax.shape, LEVELS, tl.float32))
    else:
        lo = group_reduce(tl.where(counted, x, float("inf")), CHANNEL, False)
        hi = group_reduce(tl.where(counted, x, float("-inf")), CHANNEL, True)
        if IGNORE:  # a group made only of outliers
            empty = tl.abs(lo) == float("inf")
            lo = tl.where(empty, 0.0, lo)
            hi = tl.where(empty, 0.0, hi)
        if HALF:  # _round_down: nudged down by 2^-10 relative plus 2^-24, then to nearest
            zero = (lo - tl.abs(lo) * 0.0009765625 - 5.960464477539063e-08).to(tl.float16, fp_downcast_rounding="rtne")
        else:
            zero = lo
        zero32 = zero.to(tl.float32)
        tl.store(z_ptr + gi, zero, mask=gmask)
        scale = tl.div_rn(hi - zero32, tl.full(hi.shape, LEVELS, tl.float32))
    scale = tl.where(scale < TINY, TINY, scale)  # clamp_min (a NaN stays NaN)
    if HALF:
        scale = scale.to(tl.float16, fp_downcast_rounding="rtne")
    tl.store(s_ptr + gi, scale, mask=gmask)
    scale32 = scale.to(tl.float32)

    # Quant._quantize, then pack_bits: code k of a byte at bit k * BITS
    if SYM:
        m = (1 << (BITS - 1)) - 1
        q = round_half_even(tl.div_rn(x, scale32))
        q = tl.minimum(tl.maximum(q, -m), m) + (1 << (BITS - 1))
    else:
        q = round_half_even(tl.div_rn(x - zero32, scale32))
        q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1)
    shift = (tl.arange(0, PER) * BITS)[None, None, :]
    byte = tl.sum(tl.where(valid, q.to(tl.int32), 0) << shift, axis=2)  # disjoint bits: the sum is their OR
    r2 = tl.arange(0, ROWS)[:, None]
    b2 = tl.arange(0, COLS // PER)[None, :]
    if CHANNEL:
        col = tl.program_id(1) * COLS + b2 * PER
        tl.store(out_ptr + (pid * ROWS * D + r2 * D + col) // PER, byte.to(tl.uint8), mask=(r2 < ROWS) & (col < D))
    else:
        row2 = pid * ROWS + r2
        tl.store(out_ptr + row2 * (COLS // PER) + b2, byte.to(tl.uint8), mask=(row2 < n_rows) & (b2 < COLS // PER))


@triton.jit
def unpack_dequantize_kernel(p_ptr, s_ptr, z_ptr, out_ptr, n, G: tl.constexpr, D: tl.constexpr,
                             CHANNEL: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(p_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
    q = ((byte >> ((offs % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)).to(tl.float32)
    gi = group_index(offs, G, D, CHANNEL)
    s = tl.load(s_ptr + gi, mask=mask, other=1.0)
    if SYM:
        y = (q - (1 << (BITS - 1))) * s
    else:
        z = tl.load(z_ptr + gi, mask=mask, other=0.0)
        y = tl.fma(q, s, z)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
