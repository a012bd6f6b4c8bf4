"""Quantize + pack and unpack + dequantize in one pass each on a GPU (Triton kernels).

`Quant` (kvcore.compress.quant) uses these on CUDA tensors when Triton is importable and no
token padding is involved; everything else runs its torch ops. A kernel computes, per value,
exactly what those torch ops compute on the CPU, so the stored bytes and the decompressed
tensor are bit-identical (tests/test_gpu_paths.py compares them on the device, and on CPU
tensors through Triton's interpreter where Triton is installed):

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
BLOCK = 1024


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


def quantize_pack(x, scale32, zero32, bits: int, group: int, channel: bool):
    """x [n, h, T, d] (no padding) and its float32 group scales/zeros (zero32 None: symmetric)
    -> the packed codes, flat uint8, as pack_bits(Quant._quantize(...)) gives them."""
    import torch

    from kvcore.compress.packing import packed_nbytes

    x = x.contiguous()
    n = x.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=x.device)
    n_bytes = out.numel()
    kernel, _ = compiled_kernels()
    s = scale32.contiguous()
    z = s if zero32 is None else zero32.contiguous()
    grid = (max(1, -(-n_bytes // BLOCK)),)
    kernel[grid](x, s, z, out, n, n_bytes, G=group, D=x.shape[-1], CHANNEL=channel, SYM=zero32 is None,
                 BITS=bits, BLOCK=BLOCK)
    return out


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
