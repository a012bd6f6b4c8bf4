"""Bit packing of small unsigned integer codes into bytes (1, 2, 3, 4 or 8 bits each).

One layout for every width: codes are taken eight at a time (the flat tensor is
zero-padded to a multiple of 8), code j of a block sits at bit j*b of the block's
8*b-bit little-endian word, written as b bytes. So N codes take exactly
`b * ceil(N / 8)` bytes; 8-bit codes are stored as they are. For 1, 2 and 4 bits that
layout is simply "code j of a byte at bit j*b", computed with uint8 shifts; 3 bits go
through a 24-bit word. Vectorised torch, any device.
"""

from __future__ import annotations

import torch

WIDTHS = (1, 2, 3, 4, 8)


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes that `pack_bits` produces for `n_codes` codes of `bits` bits."""
    if bits == 8:
        return n_codes
    return bits * -(-n_codes // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of codes in [0, 2**bits) into a flat uint8 tensor (row-major order)."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be one of {WIDTHS} (got {bits})")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if 8 % bits == 0:
        # 1, 2, 4 bits: whole codes per byte, so plain uint8 shifts (the fast path).
        per_byte = flat.view(-1, 8 // bits)
        out = per_byte[:, 0].clone()
        for j in range(1, 8 // bits):
            out |= per_byte[:, j] << (bits * j)
        return out
    # 3 bits: eight codes -> one 24-bit word -> three bytes (the same layout).
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device, dtype=torch.int32)
    words = (flat.view(-1, 8).to(torch.int32) << shifts).sum(-1, dtype=torch.int32)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def check_packed(packed: torch.Tensor, bits: int, n_codes: int) -> None:
    """Raise ValueError unless `packed` is what pack_bits makes of `n_codes` codes of `bits` bits."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be one of {WIDTHS} (got {bits})")
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(
            f"packed codes hold {packed.numel()} {packed.dtype} values, "
            f"expected {packed_nbytes(n_codes, bits)} uint8 for {n_codes} {bits}-bit codes"
        )


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n_codes` codes as a flat uint8 tensor."""
    check_packed(packed, bits, n_codes)
    packed = packed.reshape(-1)
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(-1)[:n_codes]
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=torch.int32)
    words = (packed.view(-1, bits).to(torch.int32) << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:n_codes]
