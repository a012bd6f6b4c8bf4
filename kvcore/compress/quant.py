"""Family `quant`: group-wise integer quantization (KIVI / KVQuant style).

Axis, as KIVI names it (what gets its own scale):
- `token`: per-token. Each token's head_dim vector is cut into groups of
  `group_size` consecutive channels; group_size must divide head_dim.
- `channel`: per-channel. Each channel is quantized over groups of `group_size`
  consecutive tokens. When the token count is not a multiple of group_size, the last
  group is partial and gets its own scale over the tokens it has (so any length works,
  one token at a time included).
KIVI's recipe is keys per channel, values per token. `key_group_size` gives keys
their own group size (e.g. 128 tokens per channel group, beside value groups of 64
channels): fewer scales where keys' per-channel ranges are steady.

Asymmetric: q = clamp(round((x - zero) / scale), 0, 2^b - 1), x' = q * scale + zero,
with zero = the group minimum (a float offset, so min and max are reachable) and
scale = (max - zero) / (2^b - 1). Symmetric: q = clamp(round(x / scale), -m, m) with
m = 2^(b-1) - 1, scale = max|x| / m, stored offset by 2^(b-1); no zero is stored
(2-bit symmetric has only the levels -scale, 0, +scale).

Scales and zeros are rounded to `scale_dtype` *before* the codes are computed: the
zero downwards (so no value falls below code 0), the scale to nearest (a float16 scale
is off by at most 2^-11 relative, so the top value lands within qmax * 2^-11 < 1/2 step
of code qmax). Hence |x - x'| <= stored scale / 2 for every value, up to float32
arithmetic and the final rounding to the tensor's dtype.

Integer zero points (`int_zero`: both, key or value; as GPTQ and AWQ store them): the zero
is an int8 code z in units of the scale, x' = (q + z) * scale, so a group costs 16 + 8 bits
instead of 16 + 16 (g64: 0.375 bits per element instead of 0.5). The scale is rounded *up* and
z = round(min / scale): the grid then starts within half a step of the group's minimum and,
one step per code, ends at or beyond (max - half a step), so |x - x'| <= scale / 2 still.
A group further than 127 steps from 0 (|min| > 127 * scale) gets the wider scale |min| / 127.

float16 scales hold |x| up to 65504; beyond, the scale overflows to inf (not checked
here, to keep cache updates free of device syncs; `compress_file` and `measure` reject
it): use scale_dtype float32 for such data.

Windows: the first `sink_tokens` and the last `recent_tokens` tokens of the tensor
given are stored untouched (bit-exact, original dtype); only the tokens between are
quantized. Outliers (dense-and-sparse, as KVQuant): the floor(outlier_fraction * N)
values of largest |x| among the N quantized values of the tensor are stored exactly
(flat int32 index, int64 beyond 2^31 elements, + original-dtype value), and are left
out of the group ranges so they stop stretching the scales.

Rotation (`rotation`, kvcore.compress.rotation): the quantized tokens are multiplied by
an orthogonal [dim, dim] matrix (Hadamard or seeded random) before grouping, and by its
transpose after dequantization; outliers are then picked (and stored) in the rotated
domain. Nothing of the rotation is stored. `rotated` limits it to keys or values (keys
quantized per channel already have a scale per channel: a rotation only mixes their
outlier channels into the others).

Values' own width (`value_bits`, e.g. 4-bit keys with 3-bit values): values' codes take
`value_bits` bits, keys' `bits`; nothing more is stored (the width is the spec's).

Non-uniform levels (`levels: lloyd`, kvcore.compress.levels): codes index 2^b levels
fitted per layer and kind on the extracted cache named by `calibration`; the table is
stored with each tensor. Mixed precision (`mixed_bits`, kvcore.compress.mixed): each
(layer, kind) gets 2, 3 or 4 bits, chosen on `calibration` so that the bits per element
average to at most `mixed_bits`; each tensor stores its width (1 byte). Clipping (`clip`,
kvcore.compress.clipping): the group ranges of keys, values or both are shrunk to least
squared error before the scale and zero are stored (so the |x - x'| <= scale / 2 bound above
holds only for values inside the clipped range; the others take the end codes).

On a GPU, 1/2/4/8-bit codes without token padding, rotation, fitted levels or int8 zero
points are quantized and packed, and unpacked and dequantized, by kvcore.compress.kernels
(one pass each, the same bits as these torch ops).

Stored fields: codes (uint8, bit-packed, b * ceil(N / 8) bytes), scale and zero
(scale_dtype, one per group; the zero int8 where `int_zero` covers the kind), sink / recent
(original dtype), outlier_idx / outlier_val, levels (float32 [2^b], lloyd only), bits
(uint8 [1], mixed only). Fields that would be empty are not stored.
"""

from __future__ import annotations

import math

import torch

from kvcore.compress import kernels
from kvcore.compress.base import HEADER_NBYTES, Method
from kvcore.compress.clipping import clipped_range
from kvcore.compress.levels import calibration_tensor, fit_levels, fitted_levels, level_key, nearest_level
from kvcore.compress.mixed import plan_bits
from kvcore.compress.packing import check_packed, pack_bits, packed_nbytes, unpack_bits
from kvcore.compress.params import PARAMS
from kvcore.compress.rotation import is_power_of_two, rotate, rotation_matrix, unrotate

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in `dtype`, never above v: nudged down by 2^-10 relative (twice float16's rounding
    error) plus 2^-24 (float16's subnormal step) before rounding to nearest."""
    if dtype == torch.float32:
        return v
    return torch.sub(v, v.abs(), alpha=2**-10).sub_(2**-24).to(dtype)


def _round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in `dtype`, never below v (the mirror of _round_down)."""
    return v if dtype == torch.float32 else _round_down(-v, dtype).neg_()


def zero_value(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 zero point of each group: stored as a float, or as an int8 code in units of
    the scale (one IEEE product, the same on every device; exact for float16 scales)."""
    return zero.float() if zero.is_floating_point() else zero.float() * scale.float()


def largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest values of the flat `a`, ties at the k-th value broken by
    the lower index, so every device picks the same ones (torch.topk's choice among ties is its
    own, and the CPU and CUDA differ, e.g. on float16 data). `nonzero` waits for the device:
    outliers cost a sync per tensor."""
    kth = a.topk(k).values[-1]
    above = (a > kth).nonzero().squeeze(1)
    tied = (a == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def _divide(v: torch.Tensor, levels: int) -> torch.Tensor:
    """v / levels rounded as IEEE division on every device: CUDA divides by a Python number
    as a multiplication by its reciprocal, which can differ in the last bit, so the divisor
    is a tensor on v's device (filled there: no host-to-device copy, no sync)."""
    return v / v.new_full((), float(levels))


class Quant(Method):
    family = "quant"
    params = PARAMS["quant"]

    def setup(self):
        # fitted once per method instance, on first use
        self._tables: dict = {}  # (layer, kind, bits, device) -> fitted levels
        self._plan: dict | None = None  # (layer, kind) -> bits (mixed_bits)

    def at_bits(self, bits: int) -> "Quant":
        """This method with every tensor at `bits` (mixed precision's candidates)."""
        return Quant(self.name, {**self.spec, "bits": bits, "value_bits": 0, "mixed_bits": 0.0})

    def width(self, kind: str) -> int:
        """The bits per code of keys or values without mixed precision (`value_bits`: the values' own)."""
        return (self.value_bits or self.bits) if kind == "value" else self.bits

    def bits_for(self, layer, kind: str) -> int:
        if not self.mixed_bits:
            return self.width(kind)
        if layer is None:
            raise self.error("mixed_bits needs the layer index (compress(x, kind, layer=L))")
        if self._plan is None:
            self._plan = plan_bits(self)
        if (layer, kind) not in self._plan:
            raise self.error(f"mixed_bits: calibration {self.calibration!r} has no layer {layer} {kind}")
        return self._plan[(layer, kind)]

    def level_table(self, layer, kind: str, bits: int, device) -> torch.Tensor:
        """The Lloyd-Max levels of (layer, kind) at `bits`, in code units [0, 2^bits - 1]."""
        if layer is None:
            raise self.error("levels lloyd needs the layer index (compress(x, kind, layer=L))")
        key = (layer, kind, bits, str(device))
        if key not in self._tables:
            normalisation = {k: getattr(self, k) for k in self.params
                             if k not in ("bits", "value_bits", "mixed_bits", "levels", "calibration")}

            def fit():
                x = calibration_tensor(self.calibration, layer, kind).to(device)  # fitted where it is used
                self.check_shape(tuple(x.shape))
                uniform = Quant(self.name, {**normalisation, "bits": bits})
                return fit_levels(uniform.normalized(x, kind, layer), 2**bits - 1)

            table = fitted_levels(level_key(self.calibration, normalisation, layer, kind, bits), fit)
            self._tables[key] = table.to(device)
        return self._tables[key]

    # ---- geometry -------------------------------------------------------------------

    def axis(self, kind: str) -> str:
        return self.key_axis if kind == "key" else self.value_axis

    def group(self, kind: str) -> int:
        """Group size for keys or values (keys per channel can afford longer groups)."""
        return self.key_group_size or self.group_size if kind == "key" else self.group_size

    def window(self, seq: int) -> tuple[int, int]:
        """[start, stop) of the quantized tokens; the rest are the sink/recent windows."""
        start = min(self.sink_tokens, seq)
        stop = seq - min(self.recent_tokens, seq - start)
        return start, stop

    def n_outliers(self, n_values: int) -> int:
        return math.floor(self.outlier_fraction * n_values + 1e-9)

    def check_shape(self, shape, layer=None):
        dim = shape[-1]
        if self.rotation == "hadamard" and not is_power_of_two(dim):
            raise self.error(f"rotation hadamard needs head_dim a power of two (got {dim}; use rotation random)")
        for kind in ("key", "value"):
            if self.axis(kind) == "token" and dim % self.group(kind):
                key = "key_group_size" if kind == "key" and self.key_group_size else "group_size"
                valid = [g for g in (32, 64, 128) if dim % g == 0]
                hint = f"use {key} {' or '.join(map(str, valid))}" if valid else "use axis 'channel'"
                raise self.error(
                    f"{key} {self.group(kind)} must divide head_dim {dim} when {kind}_axis is 'token' ({hint})"
                )

    def _groups(self, t: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
        """[n, h, T, d] -> a view with one group along the returned dim (T padded for 'channel').

        No transpose: reducing over dim -2 of [n, h, T/G, G, d] keeps memory order.
        """
        n, h, T, d = t.shape
        g = self.group(kind)
        if self.axis(kind) == "token":
            return t.reshape(n, h, T, d // g, g), -1
        return t.reshape(n, h, T // g, g, d), -2

    def _pad(self, t: torch.Tensor, kind: str, value) -> torch.Tensor:
        """Pad the token axis to a multiple of group_size ('channel' axis only)."""
        pad = -t.shape[2] % self.group(kind) if self.axis(kind) == "channel" else 0
        if not pad:
            return t
        n, h, _, d = t.shape
        return torch.cat([t, t.new_full((n, h, pad, d), value)], dim=2)

    # ---- encode / decode ------------------------------------------------------------

    def _rotation(self, kind: str, dim: int, device) -> torch.Tensor | None:
        if self.rotation == "none" or self.rotated not in ("both", kind):
            return None
        return rotation_matrix(self.rotation, dim, self.rotation_seed, kind, str(device))

    def _grouped(self, x, kind):
        """Windows, outliers and the groups of the quantized tokens of x (rotated first).

        Returns (fields, groups, ignored, dim, (padded shape, quantized tokens)), or
        (fields, None, None, None, None) when no token is quantized; `ignored` marks values
        left out of the group ranges (outliers and padding)."""
        start, stop = self.window(x.shape[2])
        fields = {}
        if start:
            fields["sink"] = x[:, :, :start].clone()
        if stop < x.shape[2]:
            fields["recent"] = x[:, :, stop:].clone()
        mid = x[:, :, start:stop]
        if mid.numel() == 0:
            return fields, None, None, None, None
        r = self._rotation(kind, x.shape[-1], x.device)
        # Without outliers or rotation the groups are read in x's own dtype (its float32
        # values: the same arithmetic, one pass less).
        xf = mid if r is None else rotate(mid, r)

        ignore = None
        k = self.n_outliers(mid.numel())
        if k:
            xf = xf.float()
            idx = largest(xf.abs().reshape(-1), k)
            fields["outlier_idx"] = idx.to(torch.int32 if mid.numel() < 2**31 else torch.int64)
            fields["outlier_val"] = (mid if r is None else xf).reshape(-1)[idx].to(x.dtype)
            ignore = torch.zeros(xf.shape, dtype=torch.bool, device=x.device)
            ignore.view(-1)[idx] = True
        padded = self._pad(xf, kind, 0.0)
        if padded.shape != xf.shape and ignore is None:
            ignore = torch.zeros(xf.shape, dtype=torch.bool, device=x.device)
        groups, dim = self._groups(padded, kind)
        ignored = None if ignore is None else self._groups(self._pad(ignore, kind, True), kind)[0]
        return fields, groups, ignored, dim, (padded.shape, mid.shape[2])

    def normalized(self, x, kind, layer=None) -> torch.Tensor:
        """(x - zero) / scale of every quantized, non-outlier value (flat float32): what the
        codes round; the calibration set of the Lloyd-Max levels."""
        _, groups, ignored, dim, _ = self._grouped(x, kind)
        if groups is None:
            return torch.empty(0, device=x.device)
        _, _, scale32, zero32 = self._ranges(groups, ignored, dim, self.bits_for(layer, kind), kind)
        u = (groups - zero32.unsqueeze(dim)) / scale32.unsqueeze(dim)
        return u.reshape(-1) if ignored is None else u[~ignored]

    def _encode(self, x, kind, keep, layer):
        bits = self.bits_for(layer, kind)
        fields, groups, ignored, dim, shapes = self._grouped(x, kind)
        if self.mixed_bits:
            fields["bits"] = torch.tensor([bits], dtype=torch.uint8, device=x.device)
        if groups is None:
            return fields
        padded_shape, n_mid = shapes
        table = self.level_table(layer, kind, bits, x.device) if self.levels == "lloyd" else None
        channel = self.axis(kind) == "channel"
        clipped = self.clip in ("both", kind)  # the kernel computes the full ranges, not clipped ones
        if (self._kernel_case(x, kind, bits, n_mid, table is None) and not clipped
                and kernels.packs(x.shape[-1], bits, channel)):
            # one pass: the ranges, the codes and their packing (the same bits as the torch ops below)
            start, stop = self.window(x.shape[2])
            fields["codes"], scale, zero = kernels.quantize_pack(
                x[:, :, start:stop], ignored, bits, self.group(kind), channel, self.symmetric,
                _SCALE_DTYPES[self.scale_dtype])
        else:
            scale, zero, scale32, zero32 = self._ranges(groups, ignored, dim, bits, kind)
            codes = self._quantize(groups, scale32, zero32, dim, bits, table)
            fields["codes"] = codes.reshape(padded_shape)[:, :, :n_mid]
        fields["scale"] = scale
        if zero is not None:
            fields["zero"] = zero
        if table is not None:
            fields["levels"] = table
        return fields

    def _ranges(self, groups: torch.Tensor, ignored: torch.Tensor | None, dim: int, bits: int, kind: str):
        """Per-group stored scale and zero (zero None if symmetric), and their float32 values;
        the range clipped to least squared error where `clip` covers `kind`.

        No device sync here (this runs inside cache updates): a float16 overflow shows up
        as an infinite scale, which the file level rejects.
        """
        sdtype = _SCALE_DTYPES[self.scale_dtype]
        tiny = torch.finfo(sdtype).tiny  # a floor so constant groups do not divide by 0
        if self.symmetric:
            amax = groups.abs() if ignored is None else groups.abs().masked_fill(ignored, 0.0)
            scale = _divide(amax.amax(dim).float(), 2 ** (bits - 1) - 1).clamp_min_(tiny).to(sdtype)
            return scale, None, scale.float(), None
        if ignored is None:
            lo, hi = (t.float() for t in torch.aminmax(groups, dim=dim))  # exact in any float dtype
        else:
            lo = groups.masked_fill(ignored, math.inf).amin(dim)
            hi = groups.masked_fill(ignored, -math.inf).amax(dim)
            empty = torch.isinf(lo)  # a group made only of outliers/padding
            lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)

        def grid(lo, hi):  # the stored (scale, zero) of the range [lo, hi]
            if self.int_zero in ("both", kind):
                lo, hi = lo.float(), hi.float()
                step = torch.maximum(_divide(hi - lo, 2**bits - 1), _divide(lo.abs(), 127))
                scale = _round_up(step.clamp_min_(tiny), sdtype)
                return scale, (lo / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
            zero = _round_down(lo, sdtype)
            return _divide(hi - zero.float(), 2**bits - 1).clamp_min_(tiny).to(sdtype), zero

        def values(scale, zero):
            return scale.float(), zero_value(zero, scale)

        if self.clip in ("both", kind):
            lo, hi = clipped_range(groups, ignored, dim, lo, hi, 2**bits - 1, lambda lo, hi: values(*grid(lo, hi)))
        scale, zero = grid(lo, hi)
        return scale, zero, *values(scale, zero)

    def _quantize(self, groups, scale32, zero32, dim, bits, table=None) -> torch.Tensor:
        s = scale32.unsqueeze(dim)
        if self.symmetric:
            m = 2 ** (bits - 1) - 1
            q = (groups / s).round_().clamp_(-m, m).add_(2 ** (bits - 1))
        elif table is not None:  # the nearest non-uniform level
            q = nearest_level((groups - zero32.unsqueeze(dim)).div_(s), table)
        else:
            q = (groups - zero32.unsqueeze(dim)).div_(s).round_().clamp_(0, 2**bits - 1)
        return q.to(torch.uint8)

    def _dequantize(self, codes, scale, zero, dim, bits, table=None) -> torch.Tensor:
        q = codes.float() if table is None else table[codes.long()]
        s = scale.float().unsqueeze(dim)
        if self.symmetric:
            return q.sub_(2 ** (bits - 1)).mul_(s)
        return torch.addcmul(zero_value(zero, scale).unsqueeze(dim), q, s)  # zero + q * s, one kernel

    def _stored_bits(self, fields, kind: str) -> int:
        return int(fields["bits"][0]) if "bits" in fields else self.width(kind)

    def _decode(self, fields, shape, dtype, device, kind):
        n, h, seq, d = shape
        start, stop = self.window(seq)
        parts = []
        if "sink" in fields:
            parts.append(fields["sink"])
        if stop > start:
            codes = fields["codes"]
            r = self._rotation(kind, d, device)
            if codes.dim() == 1:  # still packed (_kernel_case): unpacked and dequantized in one pass
                mid = kernels.unpack_dequantize(codes, fields["scale"], fields.get("zero"), (n, h, stop - start, d),
                                                dtype, self._stored_bits(fields, kind), self.group(kind),
                                                self.axis(kind) == "channel")
            else:
                padded = self._pad(codes, kind, 0)
                groups, dim = self._groups(padded, kind)
                mid = self._dequantize(groups, fields["scale"], fields.get("zero"), dim, self._stored_bits(fields, kind),
                                       fields.get("levels"))
                mid = mid.reshape(padded.shape)[:, :, : stop - start]
                # with a rotation the outliers were stored rotated: put back before rotating back
                mid = (mid.to(dtype) if r is None else mid).contiguous()
            if "outlier_idx" in fields:
                mid.view(-1)[fields["outlier_idx"].long()] = fields["outlier_val"].to(mid.dtype)
            if r is not None:
                mid = unrotate(mid, r).to(dtype)
            parts.append(mid)
        if "recent" in fields:
            parts.append(fields["recent"])
        if not parts:
            return torch.empty(shape, dtype=dtype, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    # ---- storage --------------------------------------------------------------------

    def _kernel_case(self, t, kind, bits, n_tokens, uniform) -> bool:
        """Whether the one-pass GPU kernels (kvcore.compress.kernels) handle a tensor whose data
        is `t` (the values, or their packed codes): uniform levels, float zero points, no rotation
        and no token padding in the groups."""
        rotated = self.rotation != "none" and self.rotated in ("both", kind)
        return (uniform and not rotated and self.int_zero not in ("both", kind)
                and (self.axis(kind) == "token" or n_tokens % self.group(kind) == 0)
                and kernels.usable(t, bits))

    def _pack(self, fields, shape, kind):
        if "codes" in fields and fields["codes"].dim() != 1:  # 1-D: packed by the kernel already
            fields = {**fields, "codes": pack_bits(fields["codes"], self._stored_bits(fields, kind))}
        return fields

    def _unpack(self, packed, shape, kind):
        n, h, seq, d = shape
        start, stop = self.window(seq)
        if stop > start:
            n_codes, bits = n * h * (stop - start) * d, self._stored_bits(packed, kind)
            if self._kernel_case(packed["codes"], kind, bits, stop - start, "levels" not in packed):
                check_packed(packed["codes"], bits, n_codes)  # _decode unpacks in its one pass
                for name in ("scale", "zero"):  # the kernel indexes them: a damaged file must not
                    if name in packed and packed[name].numel() != self.n_groups(shape, kind):
                        raise ValueError(f"{name} holds {packed[name].numel()} values, expected "
                                         f"{self.n_groups(shape, kind)}")
            else:
                codes = unpack_bits(packed["codes"], bits, n_codes)
                packed = {**packed, "codes": codes.view(n, h, stop - start, d)}
        return packed

    def n_groups(self, shape, kind) -> int:
        n, h, seq, d = shape
        start, stop = self.window(seq)
        g = self.group(kind)
        if self.axis(kind) == "token":
            return n * h * (stop - start) * (d // g)
        return n * h * -(-(stop - start) // g) * d

    def packed_nbytes(self, shape, dtype, kind="key", *, layer=None, keep=None):
        """header + b*ceil(N/8) codes + groups*(scale bytes + zero bytes: none if symmetric, 1 if
        int8) + windows + outliers (+ 4 * 2^b levels for lloyd, + 1 byte of bit width for mixed_bits)."""
        n, h, seq, d = shape
        start, stop = self.window(seq)
        n_quant = n * h * (stop - start) * d
        bits = self.bits_for(layer, kind)
        size = HEADER_NBYTES + (seq - (stop - start)) * n * h * d * dtype.itemsize + (1 if self.mixed_bits else 0)
        if n_quant:
            scale_nbytes = _SCALE_DTYPES[self.scale_dtype].itemsize
            zero_nbytes = 0 if self.symmetric else 1 if self.int_zero in ("both", kind) else scale_nbytes
            per_group = scale_nbytes + zero_nbytes
            size += packed_nbytes(n_quant, bits) + self.n_groups(shape, kind) * per_group
            size += 4 * 2**bits if self.levels == "lloyd" else 0
            k = self.n_outliers(n_quant)
            size += k * ((4 if n_quant < 2**31 else 8) + dtype.itemsize)
        return size
