"""Rotation, Lloyd-Max levels, mixed precision and composition (issue 20): exact round trips,
true sizes, the math against float64 references, and the evaluation paths."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kvcore.compress import parse_method, preset_spec
from kvcore.compress.levels import calibration_cache, fit_levels, nearest_level
from kvcore.compress.packing import unpack_bits
from kvcore.compress.rotation import rotation_matrix
from kvcore.errors import UsageError

LAYERS = 2


def heavy(shape, seed=0):
    """Gaussian data with two outlier channels (what makes low-bit keys hard)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 12
    x[..., 40] += 6
    return x


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """An extracted run of 'another corpus': kv/part-00000.safetensors of 2 layers."""
    run = tmp_path_factory.mktemp("calib")
    (run / "kv").mkdir()
    tensors = {f"layer_{i}_{kind}": heavy((2, 2, 64, 64), seed=10 + 2 * i + (kind == "value"))
               for i in range(LAYERS) for kind in ("key", "value")}
    save_file(tensors, str(run / "kv" / "part-00000.safetensors"))
    calibration_cache.cache_clear()
    return str(run)


def stored_bytes(packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def methods(calibration):
    return {
        "int2-g32-had": None, "kivi3-g64-rot7-s2-o0.01": None, "int4-g64-had-nuq": {"calibration": calibration},
        "kivi2-g64-nuq-s1": {"calibration": calibration}, "int2-g64-had-mx3": {"calibration": calibration},
        "sparse-0.5+int4-g32-had": None, "evict-knorm-0.5-s2+int3-g64-rot1": None,
        "kivi2-g64-s1-hadv-cv-o0.01": None, "kivi3-g64-kg32-z8-s1-hadv-cv-o0.01": None,
        "kivi2-g64-z8-nuq": {"calibration": calibration}, "int3-g32-z8k-had": None,
        "int4-v3-g64-hadv": None, "kivi4-v2-g64-z8v-s1-hadv-cv": None, "evict-knorm-0.5-s2+int4-v3-g64-had": None,
        "evict-knorm-0.5-s2+int4-v2-g64-had-nuq": {
            "family": "compose", "first": "evict-knorm-0.5-s2",
            "then": {**preset_spec("int4-v2-g64-had-nuq"), "calibration": calibration}},
        "evict-knorm-0.5-s2+int3-g64-had-nuq-c": {
            "family": "compose", "first": "evict-knorm-0.5-s2",
            "then": {**preset_spec("int3-g64-had-nuq-c"), "calibration": calibration}},
        "evict-knorm-0.4-s2-global+kivi2-g64-hadv-nuq": {
            "family": "compose", "first": "evict-knorm-0.4-s2-global",
            "then": {**preset_spec("kivi2-g64-hadv-nuq"), "calibration": calibration}},
    }


def test_round_trip_is_exact_and_sizes_are_true(calibration):
    for name, spec in methods(calibration).items():
        m = parse_method(name, spec)
        for dtype in (torch.float32, torch.float16):
            x = heavy((2, 2, 70, 64), seed=1).to(dtype)
            for layer in range(LAYERS):
                for kind in ("key", "value"):
                    keep = m.select(-x.float().norm(dim=-1)) if m.needs_scores else None
                    packed = m.compress(x, kind, keep, layer=layer)
                    y = m.decompress(packed, kind)
                    assert torch.equal(y, m.fake(x, kind, keep, layer=layer)), (name, dtype, kind)
                    assert y.dtype == dtype and y.shape == x.shape
                    assert stored_bytes(packed) == m.packed_nbytes(x.shape, dtype, kind, layer=layer, keep=keep)
                    kept_x, kept_y = (x, y) if keep is None else (x[keep], y[keep])  # evicted: zeros
                    assert float((kept_y.float() - kept_x.float()).norm() / kept_x.float().norm()) < 0.9, name


def test_rotations_are_orthogonal_seeded_and_not_stored():
    for rotation, seed in (("hadamard", 0), ("random", 3)):
        r = rotation_matrix(rotation, 64, seed, "key", "cpu").double()
        assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    key, value = (rotation_matrix("random", 64, 3, k, "cpu") for k in ("key", "value"))
    assert not torch.allclose(key, value)  # keys and values rotate separately
    assert torch.equal(key, rotation_matrix.__wrapped__("random", 64, 3, "key", "cpu"))  # regenerated, same
    h = rotation_matrix("hadamard", 8, 0, "key", "cpu").double() * 8 ** 0.5
    assert torch.allclose(h.abs(), torch.ones(8, 8, dtype=torch.float64)) and torch.equal(h[0].sign(), torch.ones(8))
    x = heavy((1, 2, 64, 64))
    packed = parse_method("int2-g32-had").compress(x, "key")
    assert set(packed) == set(parse_method("int2-g32").compress(x, "key"))  # no matrix in the stored form
    with pytest.raises(UsageError, match="power of two"):
        parse_method("int4-g32-had").check_shape((1, 2, 4, 96))


def test_rotation_removes_channel_outliers_for_per_token_groups():
    x = heavy((1, 2, 256, 64), seed=2)

    def err(name):
        return float(((parse_method(name).fake(x, "key") - x) ** 2).mean())

    assert err("int2-g32-had") < 0.5 * err("int2-g32")
    assert err("int3-g64-rot5") < 0.5 * err("int3-g64")


def test_lloyd_levels_beat_uniform_and_keep_the_ends():
    g = torch.Generator().manual_seed(0)
    u = (torch.randn(50_000, generator=g).clamp(-3, 3) + 3) / 6 * 3  # bell-shaped in [0, 3]
    levels = fit_levels(u, 3)
    assert levels[0] == 0 and levels[-1] == 3 and bool((levels.diff() > 0).all())

    def mse(table):
        return float(((table[nearest_level(u, table)] - u).double() ** 2).mean())

    assert mse(levels) < 0.9 * mse(torch.arange(4.0))
    ref = torch.arange(4.0, dtype=torch.float64)  # nearest level against a float64 argmin
    assert torch.equal(nearest_level(u, ref.float()), (u.double()[:, None] - ref).abs().argmin(1))


def test_levels_are_calibrated_on_the_calibration_run_and_stored(calibration):
    m = parse_method("kivi3-g64-nuq", {"calibration": calibration})
    x = heavy((1, 2, 128, 64), seed=5)
    packed = m.compress(x, "value", layer=1)
    assert packed["levels"].shape == (8,) and torch.equal(packed["levels"], m.level_table(1, "value", 3, "cpu"))
    other = parse_method("kivi3-g64-nuq", {"calibration": calibration})
    assert torch.equal(other.compress(x, "value", layer=1)["levels"], packed["levels"])  # deterministic
    assert parse_method("kivi3-g64").packed_nbytes(x.shape, x.dtype, "value") + 32 == \
        m.packed_nbytes(x.shape, x.dtype, "value", layer=1)
    with pytest.raises(UsageError, match="needs calibration"):
        parse_method("kivi3-g64-nuq")
    with pytest.raises(UsageError, match="no extracted cache"):
        parse_method("kivi3-g64-nuq", {"calibration": "/nonexistent"}).compress(x, "key", layer=0)


def test_clipped_ranges_cut_the_error_and_store_nothing_more():
    x = heavy((1, 2, 256, 64), seed=6)
    for bits in (2, 3):
        plain, clipped = parse_method(f"kivi{bits}-g64"), parse_method(f"kivi{bits}-g64-cv")
        p, c = plain.compress(x, "value"), clipped.compress(x, "value")
        assert set(p) == set(c) and stored_bytes(p) == stored_bytes(c)
        assert torch.equal(clipped.fake(x, "key"), plain.fake(x, "key"))  # keys untouched

        def err(m):
            return float(((m.fake(x, "value").double() - x.double()) ** 2).sum())

        assert err(clipped) < (0.75 if bits == 2 else 0.9) * err(plain)
    with pytest.raises(UsageError, match="asymmetric"):
        parse_method("int2-g64-sym-c")


def test_int8_zero_points_keep_the_half_step_bound_in_24_bits_per_group():
    x = heavy((2, 2, 128, 64), seed=7)
    x[0, 0, :, 7] = 50 + 0.01 * x[0, 0, :, 7]  # a channel far from 0 next to its spread: the widened scale
    for name in ("kivi3-g64-z8", "int2-g32-z8", "kivi4-g64-z8-cv", "int8-g64-z8"):
        m, plain = parse_method(name), parse_method(name.replace("-z8", ""))
        for kind in ("key", "value"):
            packed = m.compress(x, kind)
            assert packed["zero"].dtype == torch.int8 and packed["zero"].shape == packed["scale"].shape
            n_groups = packed["scale"].numel()
            assert plain.packed_nbytes(x.shape, x.dtype, kind) - m.packed_nbytes(x.shape, x.dtype, kind) == n_groups
            assert stored_bytes(packed) == m.packed_nbytes(x.shape, x.dtype, kind)
            # float64 reference: x' = (q + z) * scale from the stored fields, within half a step of x
            n, h, T, d = x.shape
            codes = unpack_bits(packed["codes"], m.bits, x.numel()).double()
            g, dim = m.group(kind), (-2 if m.axis(kind) == "channel" else -1)
            groups = codes.view(n, h, T // g, g, d) if dim == -2 else codes.view(n, h, T, d // g, g)
            s, z = packed["scale"].double().unsqueeze(dim), packed["zero"].double().unsqueeze(dim)
            ref = ((groups + z) * s).reshape(x.shape)
            y = m.decompress(packed, kind)
            assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6), (name, kind)
            half_step = (s / 2).expand_as(groups).reshape(x.shape)
            if m.clip not in ("both", kind):  # clipped ranges leave the values beyond them
                assert bool(((y.double() - x.double()).abs() <= half_step * (1 + 1e-5)).all()), (name, kind)

            def err(method):
                return float(((method.fake(x, kind).double() - x.double()) ** 2).sum())

            assert err(m) < 1.3 * err(plain), (name, kind)  # the grid's shift costs little
    one_kind, plain = parse_method("kivi3-g64-z8v-s1"), parse_method("kivi3-g64-s1")  # values only
    assert one_kind.compress(x, "value")["zero"].dtype == torch.int8
    assert all(torch.equal(a, b) for a, b in zip(one_kind.compress(x, "key").values(), plain.compress(x, "key").values()))
    with pytest.raises(UsageError, match="asymmetric"):
        parse_method("int4-g64-sym-z8")


def test_values_own_bits_store_values_at_their_width_and_keys_at_bits(tmp_path):
    x = heavy((2, 2, 96, 64), seed=8)
    for name, keys, values in (("int4-v3-g64-hadv", "int4-g64-hadv", "int3-g64-hadv"),
                               ("kivi4-v2-g64-z8v-s1-cv", "kivi4-g64-z8v-s1-cv", "kivi2-g64-z8v-s1-cv"),
                               ("int3-v4-g32-had", "int3-g32-had", "int4-g32-had")):
        m = parse_method(name)
        for kind, same in (("key", parse_method(keys)), ("value", parse_method(values))):
            packed, want = m.compress(x, kind), same.compress(x, kind)
            assert set(packed) == set(want) and all(torch.equal(packed[k], want[k]) for k in want), (name, kind)
            assert m.packed_nbytes(x.shape, x.dtype, kind) == same.packed_nbytes(x.shape, x.dtype, kind)
            assert torch.equal(m.decompress(packed, kind), same.fake(x, kind))
    both = parse_method("evict-knorm-0.5-s2+int4-v3-g64-had")  # composed: the kept values at 3 bits
    keep = both.select(-x.norm(dim=-1))
    kept = x[keep].reshape(1, 1, -1, 64)
    y = both.decompress(both.compress(x, "value", keep), "value")
    assert torch.equal(y[keep], parse_method("int3-g64-had").fake(kept, "value").reshape(-1, 64))
    k8 = both.packed_nbytes(x.shape, torch.float16, "key", keep=keep)
    assert k8 - both.packed_nbytes(x.shape, torch.float16, "value", keep=keep) == kept.numel() // 8  # 1 bit each
    assert preset_spec("int4-v3-g64")["value_bits"] == 3 and parse_method("int4-g64").value_bits == 0
    with pytest.raises(UsageError, match="value_bits must be one of"):
        parse_method("int4-v5-g64")
    with pytest.raises(UsageError, match="value_bits and mixed_bits"):
        parse_method("int2-v3-g64-mx3", {"calibration": str(tmp_path)})


def test_values_own_bits_in_the_generation_cache(tmp_path):
    import kvcore
    from kvcore.model import load_model
    from kvcore.sources import prepare_model

    model_dir = prepare_model("tiny64", {"source": "random-init", "architecture": "llama",
                                         "config": {"head_dim": 64, "hidden_size": 128}}, tmp_path / "m")
    model, _, _ = load_model(model_dir, "cpu", "float32")
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    method = parse_method("int4-v2-g32-hadv")
    with torch.inference_mode():
        plain = model(ids, use_cache=True).past_key_values
        cache = model(ids, past_key_values=kvcore.compressed_cache(model, method), use_cache=True).past_key_values
    a, b = plain.layers[0], cache.layers[0]  # the first layer's input is the same with and without
    assert torch.equal(b.keys, method.fake(a.keys, "key", layer=0))
    assert torch.equal(b.values, method.fake(a.values, "value", layer=0))
    assert torch.equal(b.values, parse_method("int2-g32-hadv").fake(a.values, "value"))


def test_level_tables_are_shared_saved_and_loaded(calibration, tmp_path):
    from kvcore.compress import levels

    x = heavy((1, 2, 128, 64), seed=7)
    a = parse_method("int3-g64-had-nuq", {"calibration": calibration})
    b = parse_method("evict-knorm-0.5-s2+int3-g64-had-nuq", {
        "family": "compose", "first": "evict-knorm-0.5-s2",
        "then": {**preset_spec("int3-g64-had-nuq"), "calibration": calibration}})
    assert a.level_table(0, "key", 3, "cpu") is b.inner.level_table(0, "key", 3, "cpu")  # fitted once
    assert not torch.equal(a.level_table(0, "key", 3, "cpu"),
                           parse_method("int3-g64-nuq", {"calibration": calibration}).level_table(0, "key", 3, "cpu"))
    want = a.compress(x, "key", layer=0)
    n = levels.save_levels(tmp_path / "levels.safetensors")
    saved = dict(levels.FITTED)
    levels.FITTED.clear()
    assert levels.load_levels(tmp_path / "levels.safetensors") == n and set(levels.FITTED) == set(saved)
    moved = parse_method("int3-g64-had-nuq", {"calibration": calibration})
    calibration_cache.cache_clear()
    from unittest import mock
    with mock.patch.object(levels, "calibration_cache", side_effect=AssertionError("fitted again")):
        got = moved.compress(x, "key", layer=0)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mixed_precision_meets_its_budget(calibration):
    x = heavy((2, 2, 64, 64), seed=3)
    for target in (2.5, 3.0, 3.6):
        m = parse_method(f"int2-g64-had-mx{target}", {"calibration": calibration})
        plan = [m.bits_for(layer, kind) for layer in range(LAYERS) for kind in ("key", "value")]
        bits = [8 * m.packed_nbytes(x.shape, torch.float16, kind, layer=layer) / x.numel()
                for layer in range(LAYERS) for kind in ("key", "value")]
        assert sum(bits) / len(bits) <= target + 0.05  # + header and 1-byte width of a small tensor
        assert set(plan) <= {2, 3, 4} and (max(plan) > 2) == (target >= 3.0)


def test_compose_stores_positions_and_quantized_kept_values():
    evict = parse_method("evict-knorm-0.5-s2")
    both = parse_method("evict-knorm-0.5-s2+int4-g64")
    assert preset_spec("evict-knorm-0.5-s2+int4-g64")["family"] == "compose"
    x = heavy((1, 2, 96, 64), seed=4)
    keep = evict.select(-x.norm(dim=-1))
    assert torch.equal(both.select(-x.norm(dim=-1)), keep)
    y = both.decompress(both.compress(x, "key", keep), "key")
    assert bool((y[~keep] == 0).all())
    q = parse_method("int4-g64").fake(x[keep].reshape(1, 1, -1, 64), "key").reshape(-1, 64)
    assert torch.equal(y[keep], q)  # the kept vectors, each quantized on its own
    nbytes = both.packed_nbytes(x.shape, torch.float16, "key", keep=keep)
    assert nbytes < 0.6 * evict.packed_nbytes(x.shape, torch.float16, "key", keep=keep)
    with pytest.raises(UsageError, match="no sink_tokens"):
        parse_method("evict-knorm-0.5+kivi4-g64-s4")
    with pytest.raises(UsageError, match="kept entries"):
        parse_method("sparse-0.25+int4-g32").check_shape((1, 2, 8, 64))
    with pytest.raises(UsageError, match="family quant"):
        parse_method("x", {"family": "compose", "first": "evict-knorm-0.5", "then": "sparse-0.5"})


def test_compose_through_the_evaluation_paths(tmp_path):
    from kvcore.evaluation.context import compress_context
    from kvcore.evaluation.options import check_options
    from kvcore.evaluation.prefill import make_scorers, prefill_context
    from kvcore.evaluation.protocols import evaluate_methods
    from kvcore.evaluation.records import Recorder
    from kvcore.model import load_model
    from kvcore.sources import prepare_model

    model_dir = prepare_model("tiny64", {"source": "random-init", "architecture": "llama",
                                         "config": {"head_dim": 64, "hidden_size": 128}}, tmp_path / "m")
    model, tokenizer, _ = load_model(model_dir, "cpu", "float32")
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    method = parse_method("evict-knorm-0.5-s2-global+int4-g32-had")
    opts = check_options(None)
    scorers = make_scorers([method], opts, tokenizer)
    with torch.inference_mode():
        pre = prefill_context(model, ids, scorers, opts, tokenizer)
        recorder = Recorder()
        out = compress_context(method, pre, scorers, opts, recorder=recorder)
        plain = compress_context(method.outer, pre, scorers, opts)
    want = Recorder()  # the errors are measured on the compose method's dense reconstruction
    for i, (k, v, mask) in enumerate(zip(pre.keys, pre.values, out.keep)):
        want.add(method, k, method.fake(k, "key", mask, layer=i), "key", i, mask)
        want.add(method, v, method.fake(v, "value", mask, layer=i), "value", i, mask)
    assert recorder.raw() == want.raw()
    for i, (k, mask) in enumerate(zip(pre.keys, out.keep)):
        assert torch.equal(mask, plain.keep[i])  # the same tokens as eviction alone
        stored = method.decompress(method.compress(k, "key", mask, layer=i), "key")
        kept = out.keys[i] if i not in out.hidden else out.keys[i][~out.hidden[i]]
        want = stored[mask].reshape(kept.shape) if i not in out.hidden else stored[mask]
        assert torch.equal(kept.reshape(want.shape), want)  # the cache holds exactly the stored values
    from kvcore.evaluation.cache import Rope
    from kvcore.evaluation.protocols import method_ropes

    rope = method_ropes(model, {"c": method, "e": method.outer}, True)
    assert isinstance(rope["c"], Rope) and rope["e"] is None  # compose quantizes, eviction alone does not
    with torch.inference_mode():
        pre_rope = compress_context(method, pre, scorers, opts, rope=rope["c"])
    for i, (k, mask) in enumerate(zip(pre.keys, out.keep)):  # kept keys quantized before RoPE, re-rotated
        want = rope["c"].quantize(method, k, 0, i, mask)[mask]
        kept = pre_rope.keys[i] if i not in pre_rope.hidden else pre_rope.keys[i][~pre_rope.hidden[i]]
        assert torch.equal(kept.reshape(want.shape), want) and not torch.equal(want, method.fake(k, "key", mask)[mask])
    with pytest.raises(UsageError, match="no fake-quant protocol"):
        evaluate_methods(model, ids[0].tolist(), {"c": method}, protocol="fake-quant", max_length=48, stride=16)
    run = evaluate_methods(model, ids[0].tolist(), {"s": parse_method("sparse-0.5+int4-g32-had")},
                           protocol="fake-quant", max_length=48, stride=16, layout="chunks")
    assert run["methods"]["s"]["metrics"]["bits_per_element"] < 5


def test_stored_files_decompress_to_fake(tmp_path, calibration):
    from safetensors.torch import load_file

    from kvcore.compress import compress_file, decompress_file

    tensors = {f"layer_{i}_{kind}": heavy((2, 2, 40, 64), seed=20 + 2 * i + (kind == "value")).half()
               for i in range(LAYERS) for kind in ("key", "value")}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"num_layers": str(LAYERS), "seq_ids": "[0, 1]"})
    for name in ("evict-knorm-0.5-s2+kivi3-g64-hadv-nuq", "kivi2-g64-s1-had-mx3"):
        spec = preset_spec(name)
        (spec["then"] if spec["family"] == "compose" else spec)["calibration"] = calibration
        method = parse_method(name, spec)
        scores = (lambda layer, k, v: -k.float().norm(dim=-1)) if method.needs_scores else None
        metrics = compress_file(tmp_path / "x.safetensors", tmp_path / "c.safetensors", method, scores)
        decompress_file(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
        out = load_file(tmp_path / "d.safetensors")
        for i in range(LAYERS):
            keep = method.select(-tensors[f"layer_{i}_key"].float().norm(dim=-1)) if method.needs_scores else None
            for kind in ("key", "value"):
                x = tensors[f"layer_{i}_{kind}"]
                assert torch.equal(out[f"layer_{i}_{kind}"], method.fake(x, kind, keep, layer=i)), (name, i, kind)
        assert metrics["bits_per_element"] < 3.5  # short tensors: the exact sink token weighs 0.4 bits
