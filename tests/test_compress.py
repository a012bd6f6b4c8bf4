"""kvcore.compress, tensor level: packing, quantization bounds, fake == decompress(compress),
windows/outliers, sparsify, evict (select_keep), prune, parameter validation, presets."""

from __future__ import annotations

import math

import pytest
import torch

from kvcore.compress import method_schema, parse_method, preset_spec, select_keep
from kvcore.compress.packing import pack_bits, packed_nbytes, unpack_bits
from kvcore.errors import UsageError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def heavy(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Student-t(3) values, a per-channel offset, and two outlier channels scaled x20."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    x = z / (chi2 / 3).sqrt() + torch.randn(shape[-1], generator=g)
    x[..., [3, shape[-1] // 2]] *= 20
    return x.to(dtype).to(device)


def element_scale(method, packed, kind, mid_tokens):
    """The stored scale of each quantized element, [n, h, mid_tokens, d]."""
    scale = packed["scale"].float()
    g = method.group(kind)
    if method.axis(kind) == "token":
        return scale.repeat_interleave(g, dim=-1)
    return scale.repeat_interleave(g, dim=2)[:, :, :mid_tokens]


# ------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_unpack_identity(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n if bits == 8 else bits * math.ceil(n / 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_endian_within_bytes():
    # Documented layout: code j of a block of 8 sits at bit j*bits of the block's word.
    assert pack_bits(torch.tensor([1, 2] + [0] * 6, dtype=torch.uint8), 4).tolist() == [0x21, 0, 0, 0]
    assert pack_bits(torch.tensor([7, 1] + [0] * 6, dtype=torch.uint8), 3).tolist() == [0x0F, 0, 0]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="expected 3 uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, 8)


# ------------------------------------------------------------------------- quant bounds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_round_trip_error_at_most_half_a_scale(bits, axis, symmetric, scale_dtype):
    x = heavy((2, 3, 40, 64), seed=bits)  # 40 tokens: a partial last group per channel
    m = parse_method("q", {"family": "quant", "bits": bits, "group_size": 32, "symmetric": symmetric,
                           "key_axis": axis, "value_axis": axis, "scale_dtype": scale_dtype})
    packed = m.compress(x, "key")
    y = m.decompress(packed, "key")
    err = (y.double() - x.double()).abs()
    s = element_scale(m, packed, "key", 40).double()
    slack = 4 * 2**-23 * (x.double().abs() + s * 2**bits)  # float32 arithmetic
    assert bool((err <= s / 2 + slack).all()), float((err - s / 2).max())
    assert float(err.max()) > 0  # it did quantize


@pytest.mark.parametrize("offset, spread", [(100.0, 0.01), (-3000.0, 0.5), (0.0, 1e-6), (1e-5, 1e-7)])
def test_bound_holds_for_narrow_groups_far_from_zero_and_tiny_values(offset, spread):
    # float16 zeros and scales are coarse here; their rounding must not break the bound.
    x = offset + spread * heavy((1, 2, 16, 64), seed=7) / 20
    for name in ("int4-g64", "int8-g32", "int2-g32-sym", "int3-g32-ch"):
        m = parse_method(name)
        packed = m.compress(x, "key")
        err = (m.decompress(packed, "key").double() - x.double()).abs()
        s = element_scale(m, packed, "key", 16).double()
        assert bool((err <= s / 2 + 4 * 2**-23 * (x.double().abs() + s * 256)).all()), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_bound_in_half_precision(dtype):
    x = heavy((1, 2, 24, 64), dtype=dtype, seed=5)
    m = parse_method("kivi4-g32")
    for kind in ("key", "value"):
        packed = m.compress(x, kind)
        y = m.decompress(packed, kind)
        assert y.dtype == dtype and y.shape == x.shape
        err = (y.double() - x.double()).abs()
        s = element_scale(m, packed, kind, 24).double()
        # plus the final rounding of the result to the tensor's dtype
        ulp = (x.double().abs() + s) * torch.finfo(dtype).eps
        assert bool((err <= s / 2 + ulp).all())


def test_scales_are_stored_in_the_requested_dtype_and_codes_are_packed():
    x = heavy((2, 3, 16, 64))
    for name, sdtype in (("int3-g32", torch.float16), ("int3-g32-f32", torch.float32)):
        packed = parse_method(name).compress(x, "value")
        assert packed["scale"].dtype == packed["zero"].dtype == sdtype
        assert packed["codes"].dtype == torch.uint8
        assert packed["codes"].numel() == 3 * math.ceil(x.numel() / 8)
    assert "zero" not in parse_method("int4-sym").compress(x, "value")


def test_float16_scales_overflow_shows_as_inf_and_float32_scales_fit():
    # keys with their own (longer) groups along the tokens, values per token
    m = parse_method("kivi3-g32-kg128")
    x = heavy((2, 3, 300, 64), seed=3)
    for kind, groups in (("key", 2 * 3 * 3 * 64), ("value", 2 * 3 * 300 * 2)):
        packed = m.compress(x, kind)
        assert packed["scale"].numel() == groups == m.n_groups(x.shape, kind)
        err = (m.decompress(packed, kind).double() - x.double()).abs()
        s = element_scale(m, packed, kind, 300).double()
        assert bool((err <= s / 2 + 4 * 2**-23 * (x.double().abs() + s * 8)).all())

    x = heavy((1, 1, 8, 64)) * 1e4  # beyond float16's 65504; the file level rejects it
    assert not torch.isfinite(parse_method("int4-g64").fake(x, "key")).all()
    y = parse_method("int4-g64-f32").fake(x, "key")
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------- fake == decompress(compress)

METHODS = [
    "baseline", "int2-g32", "int3-g64-sym", "int4-g64", "int8-g128-ch", "int4-g32-ch",
    "kivi2-g32", "kivi4-g64-s3-r5-o0.02", "kivi3-g32-kg64-s1", "int3-g32-sym-s1-r2-o0.01-f32",
    "sparse-0.3", "sparse-0.05", "prune-l2-h1.0",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("seq", [1, 37, 64])
def test_fake_is_decompress_of_compress_bit_for_bit(name, seq, device):
    m = parse_method(name)
    for dtype in (torch.float16, torch.float32):
        x = heavy((2, 3, seq, 64), dtype=dtype, seed=seq, device=device)
        for kind in ("key", "value"):
            packed = m.compress(x, kind, layer=1)
            y = m.decompress(packed, kind)
            f = m.fake(x, kind, layer=1)
            assert f.dtype == y.dtype == dtype and f.shape == x.shape and f.device == x.device
            bits = torch.int16 if dtype == torch.float16 else torch.int32
            assert torch.equal(f.contiguous().view(bits), y.contiguous().view(bits))  # bit for bit


def test_fake_on_a_cache_layer_of_any_length_and_batch():
    m = parse_method("kivi2-g32-r8")
    for seq in (0, 1, 5, 8, 9, 31, 33, 100):
        x = heavy((1, 3, seq, 64), seed=seq) if seq else torch.empty(1, 3, 0, 64)
        y = m.fake(x, "key")
        assert y.shape == x.shape
        assert torch.equal(y, m.decompress(m.compress(x, "key"), "key"))


# ------------------------------------------------------------------------- windows and outliers


def test_windows_and_outliers_are_bit_exact():
    x = heavy((2, 3, 50, 64), dtype=torch.float16, seed=3)
    m = parse_method("kivi2-g32-s4-r7-o0.02")
    for kind in ("key", "value"):
        packed = m.compress(x, kind)
        y = m.decompress(packed, kind)
        assert torch.equal(y[:, :, :4], x[:, :, :4])
        assert torch.equal(y[:, :, -7:], x[:, :, -7:])
        mid, ymid = x[:, :, 4:-7].reshape(-1), y[:, :, 4:-7].reshape(-1)
        idx = packed["outlier_idx"].long()
        assert idx.numel() == math.floor(0.02 * mid.numel())
        assert torch.equal(ymid[idx], mid[idx])
        # they are the largest |x| of the quantized part
        threshold = mid.abs()[idx].min()
        others = torch.ones_like(mid, dtype=torch.bool)
        others[idx] = False
        assert bool((mid.abs()[others] <= threshold).all())


def test_outliers_shrink_the_error_on_heavy_tails():
    x = heavy((2, 3, 32, 64), seed=9)
    plain = parse_method("int3-g64").fake(x, "value")
    dense_sparse = parse_method("int3-g64-o0.01").fake(x, "value")
    assert (dense_sparse - x).pow(2).mean() < 0.8 * (plain - x).pow(2).mean()


def test_everything_in_windows_stores_no_codes():
    x = heavy((1, 2, 6, 64))
    packed = parse_method("int4-s4-r4").compress(x, "key")
    assert "codes" not in packed
    assert torch.equal(parse_method("int4-s4-r4").decompress(packed, "key"), x)


# ------------------------------------------------------------------------- sparsify


def test_sparsify_keeps_the_largest_entries_of_each_vector():
    x = heavy((2, 3, 10, 64), seed=4)
    for fraction, stored in ((0.3, "mask"), (0.05, "idx")):
        m = parse_method(f"sparse-{fraction}")
        packed = m.compress(x, "key")
        assert stored in packed
        y = m.decompress(packed, "key")
        k = math.ceil(fraction * 64)
        assert bool(((y != 0).sum(-1) == k).all())
        kept = y != 0
        assert torch.equal(y[kept], x[kept])
        smallest_kept = x.abs().masked_fill(~kept, math.inf).amin(-1)
        largest_dropped = x.abs().masked_fill(kept, -math.inf).amax(-1)
        assert bool((smallest_kept >= largest_dropped).all())


# ------------------------------------------------------------------------- select_keep / evict


def test_select_keep_uniform_exact_counts_and_windows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 100, generator=g)
    scores[:, :, :4] = -math.inf  # windows win whatever their scores
    scores[:, :, -10:] = -math.inf
    keep = select_keep(scores, 0.3, sink_tokens=4, recent_tokens=10, budget="uniform")
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert bool((keep.sum(-1) == 30).all())
    assert bool(keep[:, :, :4].all() and keep[:, :, -10:].all())
    # the 16 others are the top scores of the middle
    middle, chosen = scores[:, :, 4:-10], keep[:, :, 4:-10]
    assert bool((middle.masked_fill(~chosen, math.inf).amin(-1)
                 >= middle.masked_fill(chosen, -math.inf).amax(-1)).all())


def test_select_keep_global_one_threshold_per_layer():
    scores = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(1))
    scores[:, 0] += 1.0  # head 0 matters more: it should keep more than the others
    keep = select_keep(scores, 0.2, sink_tokens=2, recent_tokens=3, budget="global")
    assert (keep.sum((1, 2)) == 3 * 10).all()
    assert bool(keep[:, :, :2].all() and keep[:, :, -3:].all())
    counts = keep.sum(-1)
    assert bool((counts[:, 0] > counts[:, 1]).all())
    middle, chosen = scores[:, :, 2:-3].reshape(2, -1), keep[:, :, 2:-3].reshape(2, -1)
    assert bool((middle.masked_fill(~chosen, math.inf).amin(-1)
                 >= middle.masked_fill(chosen, -math.inf).amax(-1)).all())


def test_select_keep_edges():
    scores = torch.rand(1, 2, 10)
    assert select_keep(scores, 1.0).all()
    # windows larger than the budget: only the windows
    keep = select_keep(scores, 0.1, sink_tokens=3, recent_tokens=3)
    assert keep.sum().item() == 2 * 6 and keep[..., :3].all() and keep[..., -3:].all()
    assert select_keep(scores, 0.5, sink_tokens=8, recent_tokens=8).all()
    for bad in (dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(keep_ratio=0.5, budget="layer"),
                dict(keep_ratio=0.5, sink_tokens=-1)):
        with pytest.raises(UsageError):
            select_keep(scores, **bad)


def test_evict_storage_zeroes_evicted_and_keeps_the_mask():
    x = heavy((2, 3, 40, 64), dtype=torch.float16)
    m = parse_method("evict-knorm-0.25-s2-r4")
    scores = -x.float().norm(dim=-1)
    keep = m.select(scores)
    with pytest.raises(UsageError, match="needs keep="):
        m.compress(x, "key")
    packed = m.compress(x, "key", keep)
    assert torch.equal(m.keep_mask(packed), keep)
    y = m.decompress(packed, "key")
    assert torch.equal(y[keep], x[keep])
    assert bool((y[~keep] == 0).all())
    assert torch.equal(m.fake(x, "key", keep), y)
    assert sum(t.numel() * t.element_size() for t in packed.values()) == m.packed_nbytes(x.shape, x.dtype)
    with pytest.raises(UsageError, match="bool tensor of shape"):
        m.compress(x, "key", keep[:, :1])


# ------------------------------------------------------------------------- prune


def test_prune_drops_layers_and_heads():
    x = heavy((2, 3, 8, 64))
    m = parse_method("p", {"family": "prune", "layers": [0], "heads": [[1, 2], [1, 0]]})
    assert torch.equal(m.fake(x, "key", layer=0), torch.zeros_like(x))
    y = m.fake(x, "value", layer=1)
    assert bool((y[:, [0, 2]] == 0).all()) and torch.equal(y[:, 1], x[:, 1])
    assert torch.equal(m.fake(x, "key", layer=2), x)
    with pytest.raises(UsageError, match="layer index"):
        m.compress(x, "key")
    with pytest.raises(UsageError, match="KV head outside 0..1"):
        parse_method("p", {"family": "prune", "heads": [[0, 2]]}).compress(x[:, :2], "key", layer=0)


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name, spec, fragment", [
    ("int5", None, "method 'int5': bits must be one of 2, 3, 4, 8 (got 5)"),
    ("q", {"family": "quant", "bits": True}, "bits must be one of"),
    ("q", {"family": "quant", "group_size": 48}, "group_size must be one of 32, 64, 128 (got 48)"),
    ("q", {"family": "quant", "key_axis": "row"}, "key_axis must be one of token, channel (got 'row')"),
    ("q", {"family": "quant", "value_axis": "head"}, "value_axis must be one of token, channel"),
    ("q", {"family": "quant", "bitz": 4}, "unknown key 'bitz' for family quant"),
    ("q", {"family": "quant", "outlier_fraction": 0.9}, "outlier_fraction must be a number in [0.0, 0.5]"),
    ("q", {"family": "quant", "scale_dtype": "bfloat16"}, "scale_dtype must be one of float16, float32"),
    ("q", {"family": "quant", "sink_tokens": -1}, "sink_tokens must be an integer >= 0"),
    ("q", {"family": "zip"}, "family must be one of none, quant, sparsify, evict, prune, compose (got 'zip')"),
    ("q", {"bits": 4}, "missing key 'family'"),
    ("s", {"family": "sparsify", "keep_fraction": 0}, "keep_fraction must be a number in (0.0, 1.0]"),
    ("e", {"family": "evict", "keep_ratio": 0.5}, "missing required key 'scorer'"),
    ("e", {"family": "evict", "scorer": "", "keep_ratio": 0.5}, "scorer must be a non-empty string"),
    ("e", {"family": "evict", "scorer": "h2o", "budget": "layer"}, "budget must be one of uniform, global"),
    ("p", {"family": "prune"}, "needs a non-empty 'layers' or 'heads'"),
    ("p", {"family": "prune", "heads": [[1]]}, "heads must be a list of [layer, head] pairs"),
    ("int4-zz", None, "unknown preset option 'zz'"),
    ("nonsense", None, "not a preset name"),
    ("n", {"family": "none", "bits": 4}, "unknown key 'bits' for family none"),
])
def test_bad_parameters_name_method_and_key(name, spec, fragment):
    with pytest.raises(UsageError) as info:
        parse_method(name, spec)
    assert fragment in str(info.value)
    assert f"method {name!r}" in str(info.value)


def test_group_size_must_divide_head_dim_for_per_token_groups():
    m = parse_method("int4-g128")
    with pytest.raises(UsageError, match="group_size 128 must divide head_dim 64"):
        m.check_shape((1, 3, 10, 64))  # what config validation calls with the model's shape
    with pytest.raises(UsageError, match="group_size 128 must divide head_dim 64"):
        m.compress(heavy((1, 3, 10, 64)), "key")
    # per-channel groups run along tokens, so any head_dim works
    parse_method("int4-g128-ch").check_shape((1, 3, 10, 64))


def test_presets_expand_to_specs():
    assert preset_spec("baseline") == {"family": "none"}
    assert preset_spec("int4-g64") == {"family": "quant", "bits": 4, "group_size": 64}
    assert preset_spec("kivi2-g32-r128") == {"family": "quant", "bits": 2, "key_axis": "channel",
                                             "value_axis": "token", "group_size": 32, "recent_tokens": 128}
    assert preset_spec("int4-g128-ch-s4-o0.01-f32-sym") == {
        "family": "quant", "bits": 4, "group_size": 128, "key_axis": "channel", "value_axis": "channel",
        "sink_tokens": 4, "outlier_fraction": 0.01, "scale_dtype": "float32", "symmetric": True}
    assert preset_spec("sparse-0.5") == {"family": "sparsify", "keep_fraction": 0.5}
    assert preset_spec("evict-knorm-0.5-s4-r64-global") == {
        "family": "evict", "scorer": "knorm", "keep_ratio": 0.5, "sink_tokens": 4,
        "recent_tokens": 64, "budget": "global"}
    assert preset_spec("prune-l0,1-h5.2,6.0") == {"family": "prune", "layers": [0, 1],
                                                  "heads": [[5, 2], [6, 0]]}
    # a config entry without family overrides its preset
    m = parse_method("int4-g64", {"symmetric": True})
    assert m.bits == 4 and m.symmetric and m.spec["family"] == "quant"


def test_method_schema_accepts_specs_and_rejects_bad_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = method_schema()
    for spec in ({"family": "quant", "bits": 2, "key_axis": "channel"}, None, {"symmetric": True},
                 {"family": "prune", "heads": [[0, 1]]}, {"family": "evict", "scorer": "snapkv"}):
        jsonschema.validate(spec, schema)
    for spec in ({"family": "quant", "bits": 5}, {"family": "quant", "bitz": 4}, {"family": "evict"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(spec, schema)


def test_spec_round_trips_through_json():
    import json

    for name in ("kivi2-g32-s4-r16-o0.01", "sparse-0.25", "evict-h2o-0.3-global", "prune-l1-h0.2", "baseline"):
        m = parse_method(name)
        again = parse_method(name, json.loads(json.dumps(m.spec)))
        assert again.spec == m.spec
