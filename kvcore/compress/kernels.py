"""Quantize + pack and unpack + dequantize in one pass each on a GPU (Triton kernels).

`Quant` (kvcore.compress.quant) uses these on CUDA tensors when Triton is importable and no
token padding is involved; everything else runs its torch ops. A kernel computes, per value,
exactly what those torch ops compute on the CPU, so the stored bytes and the decompressed
tensor are bit-identical (tests/test_gpu_paths.py compares them on the device, and on CPU
tensors through Triton's interpreter where Triton is installed):

  ranges     per group: asymmetric zero = the minimum rounded down to the scale dtype
             (Quant._round_down), scale = (max - zero) / (2^b - 1); symmetric scale =
             max|x| / (2^(b-1) - 1); floored at the dtype's smallest normal, rounded to it
             (nearest-even); outliers left out (Quant._ranges)
  quantize   asymmetric: clamp(round_half_even((x - zero) / scale), 0, 2^b - 1), the
             division rounded to nearest (`tl.div_rn`, as IEEE and the CPU do);
             symmetric: clamp(round_half_even(x / scale), -m, m) + 2^(b-1)
  pack       code j of each byte at bit j*b (kvcore.compress.packing's layout, b in 1, 2, 4, 8)
  dequantize asymmetric: fma(q, scale, zero), one rounding, as torch.addcmul on the CPU;
             symmetric: (q - 2^(b-1)) * scale; then rounded to the tensor's dtype (nearest-even)

Groups follow `Quant._groups`: along the token axis each `group` consecutive channels of a
token share a scale (group index = i // group); along the channel axis each channel of
`group` consecutive tokens does (group index = (i // (group * dim)) * dim + i % dim).
"""

from __future__ import annotations

import functools

PACKED_WIDTHS = (1, 2, 4, 8)  # whole codes per byte: one kernel packs them
BLOCK = 1024  # values per program of unpack_dequantize
TILE = 4096  # values per program of quantize_pack
CHANNEL_WARPS = 8  # warps per program along the channel axis: its reduction crosses the tile's rows
# (on an H200, 128x4x1024x64 bfloat16 keys: 0.17 of a copy with Triton's default 4, 0.23 with 8;
# the min/max are exact, so the warps change no bit)


@functools.cache
def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def usable(x, bits: int) -> bool:
    """Whether the kernels serve this tensor: on CUDA with Triton importable, and codes that
    fill whole bytes (the tests also run them on CPU tensors under Triton's interpreter)."""
    return x.is_cuda and bits in PACKED_WIDTHS and available()


@functools.cache
def compiled_kernels():
    from kvcore.compress.triton_kernels import quantize_pack_kernel, unpack_dequantize_kernel

    return quantize_pack_kernel, unpack_dequantize_kernel


def tile(group: int, dim: int, channel: bool) -> tuple[int, int]:
    """(rows, columns) of quantize_pack's tiles, about TILE values each: along the token axis
    whole groups (a row each), along the channel axis the `group` tokens of a block times a
    power-of-two slice of its channels."""
    if channel:
        return group, min(1 << (dim - 1).bit_length(), max(8, TILE // group))  # at most dim's next power of two
    return max(1, TILE // group), group


def packs(dim: int, bits: int, channel: bool) -> bool:
    """Whether quantize_pack's tiles hold whole bytes: along the channel axis a byte's codes
    must lie in one row of the tile (head_dim a multiple of the codes per byte)."""
    return not channel or dim % (8 // bits) == 0


def quantize_pack(x, ignored, bits: int, group: int, channel: bool, symmetric: bool, scale_dtype):
    """x [n, h, T, d] (no padding; `ignored`: the values left out of the ranges, or None)
    -> (codes, scale, zero): what Quant._ranges, _quantize and pack_bits give, in one pass
    (flat uint8 codes; scale and zero shaped as the groups, zero None when symmetric)."""
    import torch

    x = x.contiguous()
    n, h, T, d = x.shape
    n_codes = x.numel()
    codes = torch.empty(n_codes * bits // 8, dtype=torch.uint8, device=x.device)  # N is a multiple of 8 here
    scale = torch.empty((n, h, T // group, d) if channel else (n, h, T, d // group), dtype=scale_dtype,
                        device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    rows, cols = tile(group, d, channel)
    if channel:
        grid = (n_codes // (group * d), -(-d // cols))
    else:
        grid = (max(1, -(-(n_codes // group) // rows)),)
    kernel, _ = compiled_kernels()
    ign = x if ignored is None else ignored.reshape(-1).view(torch.uint8)  # x: a pointer the kernel never reads
    kernel[grid](x, ign, scale, scale if zero is None else zero, codes, n_codes // group, d, ROWS=rows, COLS=cols,
                 CHANNEL=channel, SYM=symmetric, BITS=bits, IGNORE=ignored is not None,
                 HALF=scale_dtype == torch.float16, TINY=torch.finfo(scale_dtype).tiny,
                 num_warps=CHANNEL_WARPS if channel else 4)
    return codes, scale, zero


def unpack_dequantize(packed, scale, zero, shape, dtype, bits: int, group: int, channel: bool):
    """The inverse: packed codes + stored scales/zeros -> the dequantized tensor `shape` in `dtype`."""
    import torch

    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    _, kernel = compiled_kernels()
    s = scale.float().contiguous()
    z = s if zero is None else zero.float().contiguous()
    grid = (max(1, -(-n // BLOCK)),)
    kernel[grid](packed, s, z, out, n, G=group, D=shape[-1], CHANNEL=channel, SYM=zero is None, BITS=bits,
                 BLOCK=BLOCK)
    return out
