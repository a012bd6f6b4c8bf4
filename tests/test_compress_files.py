"""kvcore.compress, file level and CLI: stored format, sizes on disk, metrics, errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvcore.cli import main
from kvcore.compress import compress_file, decompress_file, measure, parse_method
from kvcore.errors import KvcoreError, UsageError


def heavy(shape, dtype=torch.float32, seed=0):
    """Student-t(3) values, a per-channel offset, and two outlier channels scaled x20."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    x = z / (chi2 / 3).sqrt() + torch.randn(shape[-1], generator=g)
    x[..., [3, shape[-1] // 2]] *= 20
    return x.to(dtype)

N_LAYERS, SHAPE = 3, (2, 3, 40, 64)  # under torch's 32k-element parallel grain: fast on busy CPUs


def make_shard(path, dtype=torch.float16, shape=SHAPE, layers=N_LAYERS):
    tensors = {}
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            tensors[f"layer_{i}_{kind}"] = heavy(shape, dtype=dtype, seed=10 * i + j)
    meta = {"model": "tiny", "dataset": "toy", "num_layers": str(layers), "num_kv_heads": str(shape[1]),
            "num_heads": str(3 * shape[1]), "head_dim": str(shape[3]), "seq_len": str(shape[2]),
            "dtype": str(dtype).removeprefix("torch."), "seq_ids": "[0, 1]", "kvcore_version": "0.1.0"}
    save_file(tensors, str(path), metadata=meta)
    return tensors, meta


def header_len(path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "part-0.safetensors"
    tensors, meta = make_shard(path)
    return path, tensors, meta


def knorm(layer, keys, values):  # a model-free scorer for tests: small key norm = keep
    return -keys.float().norm(dim=-1)


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["baseline", "int4-g64", "kivi2-g32-s2-r8-o0.01", "int3-g32-sym-ch", "kivi3-g32-kg128",
                                  "sparse-0.25", "prune-l1-h0.2", "evict-knorm-0.4-s2-r4-global"])
def test_compress_decompress_file_equals_fake(tmp_path, shard, name):
    path, tensors, meta = shard
    method = parse_method(name)
    scores = knorm if method.needs_scores else None
    metrics = compress_file(path, tmp_path / "c.safetensors", method, scores)
    info = decompress_file(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    assert info["method"] == name
    out = load_file(tmp_path / "d.safetensors")
    assert set(out) == set(tensors)
    for i in range(N_LAYERS):
        keys, values = tensors[f"layer_{i}_key"], tensors[f"layer_{i}_value"]
        keep = method.select(knorm(i, keys, values)) if method.needs_scores else None
        for kind, x in (("key", keys), ("value", values)):
            assert torch.equal(out[f"layer_{i}_{kind}"], method.fake(x, kind, keep, layer=i))
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata() == meta  # a plain extracted shard again
    assert metrics["method"] == name and metrics["compressed_size_bytes"] == (tmp_path / "c.safetensors").stat().st_size


def test_compressed_file_is_self_describing(tmp_path, shard):
    path, _, meta = shard
    method = parse_method("mine", {"family": "quant", "bits": 3, "key_axis": "channel", "recent_tokens": 5})
    compress_file(path, tmp_path / "c.safetensors", method)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        stored = f.metadata()
        names = set(f.keys())
    assert json.loads(stored["compress_spec"]) == method.spec
    assert stored["compress_method"] == "mine" and stored["model"] == meta["model"]
    assert {"layer_0_key.codes", "layer_0_key.scale", "layer_0_key.zero", "layer_0_key.recent",
            "layer_0_key.header"} <= names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_dtypes_round_trip(tmp_path, dtype):
    make_shard(tmp_path / "in.safetensors", dtype=dtype, layers=1)
    compress_file(tmp_path / "in.safetensors", tmp_path / "c.safetensors", parse_method("int8"))
    decompress_file(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    out = load_file(tmp_path / "d.safetensors")
    assert out["layer_0_key"].dtype == dtype


# ------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", ["baseline", "int2-g32", "int3-g64-s3-r5-o0.02", "int4-g32-ch-r3", "kivi4-g32",
                                  "int8-sym-f32", "sparse-0.5", "sparse-0.05", "prune-l0-h2.1",
                                  "evict-knorm-0.3-s1-r2", "evict-knorm-0.3-global"])
def test_size_on_disk_equals_the_formula(tmp_path, shard, name):
    path, tensors, _ = shard
    method = parse_method(name)
    out = tmp_path / "c.safetensors"
    metrics = compress_file(path, out, method, knorm if method.needs_scores else None)
    payload = sum(
        method.packed_nbytes(tensors[f"layer_{i}_{kind}"].shape, torch.float16, kind, layer=i)
        for i in range(N_LAYERS) for kind in ("key", "value")
    )
    assert out.stat().st_size == 8 + header_len(out) + payload == metrics["compressed_size_bytes"]
    n = N_LAYERS * 2 * 2 * 3 * 40 * 64
    assert metrics["written_bits_per_element"] == pytest.approx(8 * out.stat().st_size / n)
    keep = [method.select(knorm(i, tensors[f"layer_{i}_key"], None)) if method.needs_scores else None
            for i in range(N_LAYERS)]
    counted = sum(method.packed_nbytes(tensors[f"layer_{i}_{kind}"].shape, torch.float16, kind, layer=i,
                                       keep=keep[i]) for i in range(N_LAYERS) for kind in ("key", "value"))
    assert metrics["bits_per_element"] == pytest.approx(8 * counted / n) and metrics["bits_basis"] == "fp16"


def test_bits_per_element_do_not_depend_on_the_extracted_dtype(tmp_path):
    """The one convention: full-precision parts count 16 bits, so a float32 extraction and a
    float16 one give the same bits (the bytes written differ)."""
    for dtype in (torch.float16, torch.float32):
        make_shard(tmp_path / f"{dtype}.safetensors", shape=(2, 3, 64, 64), layers=2, dtype=dtype)
    for name in ("kivi4-g64", "int2-g32-s4", "baseline"):
        f16, f32 = (measure(tmp_path / f"{d}.safetensors", parse_method(name)) for d in (torch.float16, torch.float32))
        assert f16["bits_per_element"] == pytest.approx(f32["bits_per_element"])
        if name != "kivi4-g64":  # exact sinks / the whole cache: written in the extraction's dtype
            assert f32["written_bits_per_element"] > f16["written_bits_per_element"]


def test_int4_g64_ratio_on_float16(tmp_path):
    # 64 fp16 values = 128 bytes -> 32 bytes of codes + scale and zero.
    make_shard(tmp_path / "in.safetensors", shape=(4, 3, 64, 64), layers=2)
    n = 2 * 2 * 4 * 3 * 64 * 64
    fp16 = measure(tmp_path / "in.safetensors", parse_method("int4-g64"))  # float16 scale + zero: 36 B
    assert 3.2 <= fp16["compression_ratio"] <= 3.8
    assert fp16["compression_ratio"] == pytest.approx(128 / 36, rel=0.03)
    f32 = parse_method("int4-g64-f32")  # float32 scale + zero: 40 B, exactly 3.2x before the header
    assert n * 2 / (2 * 2 * f32.packed_nbytes((4, 3, 64, 64), torch.float16) - 2 * 2 * 40) == pytest.approx(3.2)
    assert measure(tmp_path / "in.safetensors", f32)["compression_ratio"] == pytest.approx(3.2, rel=0.03)


def test_measure_matches_compress_file_without_writing(tmp_path, shard):
    path, _, _ = shard
    method = parse_method("kivi2-g32-r8")
    before = set(tmp_path.iterdir())
    measured = measure(path, method)
    assert set(tmp_path.iterdir()) == before
    written = compress_file(path, tmp_path / "c.safetensors", method)
    for key in ("compressed_size_bytes", "compression_ratio", "bits_per_element", "rmse", "snr_db",
                "cosine_similarity", "max_error", "quality_level", "passed", "violations"):
        assert measured[key] == written[key], key


# ------------------------------------------------------------------------- metrics


def test_metrics_fields_and_levels(shard):
    path, _, _ = shard
    base = measure(path, parse_method("baseline"))
    assert set(base) == {
        "method", "family", "compression_ratio", "compression_ratio_vs_fp16", "original_size_bytes",
        "compressed_size_bytes", "bits_per_element", "bits_basis", "written_bits_per_element", "rmse", "snr_db",
        "cosine_similarity", "max_error", "quality_level", "processing_time_ms", "passed", "violations"}
    assert base["rmse"] == 0 and base["snr_db"] is None and base["quality_level"] == "EXCELLENT"
    assert base["passed"] and base["violations"] == []
    assert 0.98 < base["compression_ratio"] <= 1.0  # same bytes, a slightly longer header
    int8 = measure(path, parse_method("int8-g32"))
    assert int8["quality_level"] == "EXCELLENT" and int8["snr_db"] > 30
    int2 = measure(path, parse_method("int2-g64"))
    assert int2["quality_level"] == "POOR" and not int2["passed"]
    assert any(v.startswith("snr_db") for v in int2["violations"])
    assert int8["rmse"] < int2["rmse"] and int8["cosine_similarity"] > int2["cosine_similarity"]
    json.dumps(int2, allow_nan=False)  # JSON-safe


def test_metrics_are_float64_reference_values(tmp_path):
    make_shard(tmp_path / "in.safetensors", dtype=torch.float32, layers=1)
    method = parse_method("int3-g32")
    got = measure(tmp_path / "in.safetensors", method)
    x = load_file(tmp_path / "in.safetensors")
    xs = [x["layer_0_key"].double(), x["layer_0_value"].double()]
    ys = [method.fake(x["layer_0_key"], "key").double(), method.fake(x["layer_0_value"], "value").double()]
    err = torch.cat([(y - a).reshape(-1) for a, y in zip(xs, ys)])
    ref = torch.cat([a.reshape(-1) for a in xs])
    assert got["rmse"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-9)
    assert got["snr_db"] == pytest.approx(float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum())), rel=1e-9)
    assert got["max_error"] == pytest.approx(float(err.abs().max()), rel=1e-12)
    cos = torch.cat([torch.nn.functional.cosine_similarity(a, y, dim=-1).reshape(-1) for a, y in zip(xs, ys)])
    assert got["cosine_similarity"] == pytest.approx(float(cos.mean()), rel=1e-9)


def test_thresholds(shard):
    path, _, _ = shard
    strict = measure(path, parse_method("int4-g64"), thresholds={"min_snr_db": 60, "min_compression_ratio": 10})
    assert not strict["passed"] and len(strict["violations"]) == 2
    with pytest.raises(UsageError, match="unknown threshold 'snr'"):
        measure(path, parse_method("int4-g64"), thresholds={"snr": 1})


# ------------------------------------------------------------------------- file errors


def test_file_errors(tmp_path, shard):
    path, tensors, _ = shard
    with pytest.raises(UsageError, match="needs token scores"):
        measure(path, parse_method("evict-knorm-0.5"))
    with pytest.raises(UsageError, match="input file not found"):
        measure(tmp_path / "missing.safetensors", parse_method("int4"))
    with pytest.raises(UsageError, match="layer 7 does not exist"):
        measure(path, parse_method("prune-l7"))
    with pytest.raises(KvcoreError, match="not a kvcore compressed file"):
        decompress_file(path, tmp_path / "d.safetensors")
    compress_file(path, tmp_path / "c.safetensors", parse_method("int4"))
    with pytest.raises(UsageError, match="already compressed"):
        measure(tmp_path / "c.safetensors", parse_method("int4"))
    # a truncated file is a KvcoreError, not a traceback
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:500])
    with pytest.raises(KvcoreError):
        decompress_file(tmp_path / "t.safetensors", tmp_path / "d.safetensors")
    broken = dict(tensors)
    broken["layer_0_key"] = broken["layer_0_key"].clone()
    broken["layer_0_key"][0, 0, 0, 0] = float("nan")
    save_file(broken, str(tmp_path / "nan.safetensors"))
    with pytest.raises(KvcoreError, match="NaN"):
        measure(tmp_path / "nan.safetensors", parse_method("int4"))
    assert not (tmp_path / "d.safetensors").exists()
    big = {k: v.float() * 1e4 for k, v in tensors.items()}  # overflows float16 scales
    save_file(big, str(tmp_path / "big.safetensors"))
    with pytest.raises(KvcoreError, match="scale_dtype: float32"):
        compress_file(tmp_path / "big.safetensors", tmp_path / "o.safetensors", parse_method("int4"))
    assert not (tmp_path / "o.safetensors").exists()
    measure(tmp_path / "big.safetensors", parse_method("int4-f32"))


# ------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, shard, capsys):
    path, tensors, _ = shard
    out, back, mjson = tmp_path / "c.safetensors", tmp_path / "d.safetensors", tmp_path / "m.json"
    assert main(["compress", str(path), str(out), "--method", "int4-g64", "--param", "symmetric=true",
                 "--metrics", str(mjson)]) == 0
    printed = capsys.readouterr().out
    assert "compression_ratio" in printed and "quality_level" in printed
    metrics = json.loads(mjson.read_text())
    assert metrics["compressed_size_bytes"] == out.stat().st_size
    assert main(["decompress", str(out), str(back)]) == 0
    method = parse_method("int4-g64", {"symmetric": True})
    assert torch.equal(load_file(back)["layer_2_value"], method.fake(tensors["layer_2_value"], "value"))
    capsys.readouterr()
    assert main(["metrics", str(path), "--method", "kivi4-g64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "quant"
    custom = ["metrics", str(path), "--method", "mine", "--param", "family=sparsify", "--param", "keep_fraction=0.5"]
    assert main(custom) == 0
    assert main(["metrics", str(path), "--method", "int2", "--strict"]) == 1


@pytest.mark.parametrize("args, fragment", [
    (["compress", "{in}", "{out}", "--method", "int5"], "bits must be one of 2, 3, 4, 8 (got 5)"),
    (["compress", "{in}", "{out}", "--method", "int4-g128"], "group_size 128 must divide head_dim 64"),
    (["compress", "{in}", "{out}", "--method", "int4", "--param", "key_axis=row"], "key_axis must be one of"),
    (["compress", "{in}", "{out}", "--method", "x", "--param", "family=zip"], "family must be one of"),
    (["compress", "{in}", "{out}", "--method", "int4", "--param", "bitz=4"], "unknown key 'bitz'"),
    (["compress", "{in}", "{out}", "--method", "int4", "--param", "bits"], "--param expects KEY=VALUE"),
    (["compress", "{in}", "{out}", "--method", "evict-knorm-0.5"], "needs token scores"),
    (["compress", "{in}", "{out}"], "--method"),
    (["compress", "{in}", "{in}", "--method", "int4"], "would overwrite the input"),
    (["compress", "{missing}", "{out}", "--method", "int4"], "input file not found"),
    (["metrics", "{in}", "--method", "int4", "--device", "cuda:99"], "device"),
])
def test_cli_bad_input_is_one_line_exit_2_and_no_output(tmp_path, shard, capsys, args, fragment):
    path, _, _ = shard
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    out = tmp_path / "c.safetensors"
    argv = [a.format(**{"in": path, "out": out, "missing": tmp_path / "missing.safetensors"}) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvcore: error:") and "Traceback" not in err
    assert fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written, no temp debris


def test_cli_corrupt_file_exits_1(tmp_path, shard, capsys):
    path, _, _ = shard
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:64])
    assert main(["decompress", str(bad), str(tmp_path / "d.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "d.safetensors").exists()
