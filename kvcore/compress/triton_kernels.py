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
def quantize_pack_kernel(x_ptr, s_ptr, z_ptr, out_ptr, n, n_bytes, G: tl.constexpr, D: tl.constexpr,
                         CHANNEL: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK output bytes: the 8 // BITS codes of each, quantized and shifted into place."""
    PER: tl.constexpr = 8 // BITS
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    byte = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(PER):
        offs = j * PER + k
        mask = offs < n  # beyond the last code: 0, as pack_bits pads
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gi = group_index(offs, G, D, CHANNEL)
        s = tl.load(s_ptr + gi, mask=mask, other=1.0)
        if SYM:
            m = (1 << (BITS - 1)) - 1
            q = round_half_even(tl.div_rn(x, s))
            q = tl.minimum(tl.maximum(q, -m), m) + (1 << (BITS - 1))
        else:
            z = tl.load(z_ptr + gi, mask=mask, other=0.0)
            q = round_half_even(tl.div_rn(x - z, s))
            q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1)
        byte = byte | (tl.where(mask, q.to(tl.int32), 0) << (k * BITS))
    tl.store(out_ptr + j, byte.to(tl.uint8), mask=j < n_bytes)


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
