"""The GPU code paths, checked on the CPU against the paths they replace (and on CUDA when present):
batched perplexity windows, the streamed compress output, the merged-shards reader, the
cache-only eviction scorers, the fused quantize+pack, stats on the device."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest
import torch

from kvcore.compress import parse_method
from kvcore.errors import KvcoreError
from kvcore.model import load_model
from kvcore.tensorfile import SpooledTensorFile, save_tensors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_built_from_streamed_weights_is_transformers_own_load(tiny_model_dir, device, dtype):
    """load_model on a GPU builds the model from weights read one tensor at a time (host RSS):
    the same parameters, buffers and settings, bit for bit, as from_pretrained(device_map=device)."""
    from transformers import AutoModelForCausalLM

    from kvcore.model import model_from_weights

    ours = model_from_weights(tiny_model_dir, device, dtype, None)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype, use_safetensors=True,
                                                  device_map=device)
    for own, other in ((ours.state_dict(), theirs.state_dict()),
                       (dict(ours.named_buffers()), dict(theirs.named_buffers()))):
        assert own.keys() == other.keys()
        for name, tensor in own.items():
            assert tensor.dtype == other[name].dtype and tensor.device == other[name].device, name
            assert torch.equal(tensor, other[name]), name
    assert type(ours) is type(theirs) and ours.config.to_dict() == theirs.config.to_dict()
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()


@pytest.fixture
def loaded(tiny_model_dir):
    model, tokenizer, _ = load_model(tiny_model_dir, "cpu", "float32")
    ids = torch.randint(0, model.config.vocab_size, (230,), generator=torch.Generator().manual_seed(5)).tolist()
    return model, tokenizer, ids


@pytest.mark.parametrize("protocol", ["fake-quant", "prefill-compress"])
def test_batched_windows_give_the_one_window_numbers(loaded, protocol):
    from kvcore.evaluation.protocols import evaluate_methods

    model, tokenizer, ids = loaded
    runs = [evaluate_methods(model, ids, {}, protocol=protocol, max_length=64, stride=32, batch=batch)
            for batch in (1, 3)]
    one, batched = ([(w["index"], w["n_scored"], w["nll_sum"]) for w in r["baseline"]["windows"]] for r in runs)
    assert [w[:2] for w in one] == [w[:2] for w in batched]
    assert [w[2] for w in batched] == pytest.approx([w[2] for w in one], rel=1e-5, abs=1e-4)
    # with a method every window runs alone (baseline beside it): the numbers are the same bits
    method = {"int4-g32-ch": parse_method("int4-g32-ch")}
    runs = [evaluate_methods(model, ids, method, protocol=protocol, max_length=64, stride=32, batch=batch)
            for batch in (1, 3)]
    for name in (None, "int4-g32-ch"):
        summary = [r["baseline"] if name is None else r["methods"][name] for r in runs]
        assert [w["nll_sum"] for w in summary[0]["windows"]] == [w["nll_sum"] for w in summary[1]["windows"]]


def test_spooled_file_has_the_bytes_of_save_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"layer_0_key.codes": torch.randint(0, 255, (37,), generator=g, dtype=torch.uint8),
               "layer_0_key.scale": torch.randn(5, generator=g).half(),
               "layer_0_key.header": torch.tensor([1, 2, 3, 4, 2]),
               "layer_1_value.data": torch.randn(2, 3, generator=g).bfloat16(),
               "layer_1_value.keep": torch.rand(6, generator=g) > 0.5,
               "layer_1_value.values": torch.randn(0, 4),
               "a": torch.randn(3, generator=g)}
    meta = {"model": "m", "z": "1", "compress_spec": json.dumps({"bits": 4})}
    save_tensors(tensors, tmp_path / "ref.safetensors", metadata=meta)
    writer = SpooledTensorFile(tmp_path / "out.safetensors")
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish(meta)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]  # no spool left


def test_merged_shards_read_as_the_merged_file(tmp_path):
    from kvcore.compress.shards import MergedShards

    g = torch.Generator().manual_seed(1)
    parts, paths = [], []
    for s, (n, width) in enumerate([(2, 9), (3, 7)]):
        t = {f"layer_{i}_{k}": torch.randn(n, 2, width, 4, generator=g) for i in range(2) for k in ("key", "value")}
        path = tmp_path / f"part-{s}.safetensors"
        save_tensors(t, path, metadata={"seq_ids": json.dumps(list(range(s * 5, s * 5 + n))),
                                        "seq_lengths": json.dumps([width] * n), "seq_len": str(width)})
        parts.append(t)
        paths.append(path)
    merged = {name: torch.cat([torch.nn.functional.pad(p[name], (0, 0, 0, 9 - p[name].shape[2])) for p in parts])
              for name in parts[0]}
    meta = {"seq_ids": json.dumps([0, 1, 5, 6, 7]), "seq_lengths": json.dumps([9, 9, 7, 7, 7]), "seq_len": "9"}
    save_tensors(merged, tmp_path / "merged.safetensors", metadata=meta)
    with MergedShards(paths) as run:
        assert run.metadata() == meta
        assert run.nbytes == (tmp_path / "merged.safetensors").stat().st_size
        assert run.header() == (tmp_path / "merged.safetensors").read_bytes()[:len(run.header())]
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for name, x in merged.items():
            assert torch.equal(run.get_tensor(name), x)
            for device in devices:  # built on the device slice by slice, the same values
                got = run.get_tensor(name, device)
                assert got.device.type == device and torch.equal(got.cpu(), x)
    # a shard of another dtype is refused, not cast
    save_tensors({name: t.half() for name, t in parts[1].items()}, paths[1],
                 metadata={"seq_ids": "[5, 6, 7]", "seq_lengths": "[7, 7, 7]", "seq_len": "7"})
    with pytest.raises(KvcoreError, match="float16 but .* float32|F16 but .* F32"):
        MergedShards(paths)
    # and one of another n_kv (a shard of another model) too
    save_tensors({name: t[:, :1].contiguous() for name, t in parts[1].items()}, paths[1],
                 metadata={"seq_ids": "[5, 6, 7]", "seq_lengths": "[7, 7, 7]", "seq_len": "7"})
    with pytest.raises(KvcoreError, match=r"layer_0_key is \[3, 1, 7, 4\], not .*\(\[2, 2, 9, 4\]\)"):
        MergedShards(paths)


def test_cache_only_scorers_load_no_model(tmp_path, monkeypatch):
    """streamingllm and random choose from the extracted cache alone: no model, no tokens."""
    import kvcore.model
    from kvcore.evaluation.extracted import compress_extracted

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvcore.model, "load_model", refuse)
    g = torch.Generator().manual_seed(2)
    t = {f"layer_{i}_{k}": torch.randn(2, 2, 12, 8, generator=g) for i in range(2) for k in ("key", "value")}
    save_tensors(t, tmp_path / "part-0.safetensors", metadata={"seq_ids": "[0, 1]", "seq_lengths": "[12, 10]",
                                                               "num_layers": "2"})
    spec = {"family": "evict", "scorer": "streamingllm", "keep_ratio": 0.5, "sink_tokens": 2}
    metrics = compress_extracted([tmp_path / "part-0.safetensors"], tmp_path / "s.safetensors", tmp_path / "s.json",
                                 "streaming", spec, model_device="cpu")
    method = parse_method("streaming", spec)
    from safetensors.torch import load_file

    packed = load_file(tmp_path / "s.safetensors")
    keep = method.keep_mask({k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("layer_0_key.")})
    # sinks plus the most recent tokens of each sequence at its own length, never its padding
    assert keep[0, :, [0, 1, 8, 9, 10, 11]].all() and not keep[0, :, 2:8].any()
    assert keep[1, :, [0, 1, 7, 8, 9]].all() and not keep[1, :, 10:].any()
    assert metrics["kept_fraction"] == pytest.approx(0.5)


@CUDA
def test_stats_on_the_gpu_match_the_cpu(tmp_path):
    from kvcore.stats import compute_stats

    g = torch.Generator().manual_seed(3)
    t = {f"layer_{i}_{k}": torch.randn(3, 2, 40, 16, generator=g) * (i + 1) for i in range(3) for k in ("key", "value")}
    save_tensors(t, tmp_path / "part-0.safetensors", metadata={"seq_lengths": "[40, 31, 17]"})
    cpu, gpu = (compute_stats([tmp_path / "part-0.safetensors"], device=d) for d in ("cpu", "cuda"))
    for name in cpu:
        for column in cpu[name].column_names:
            a, b = cpu[name][column].to_pylist(), gpu[name][column].to_pylist()
            if isinstance(a[0], float):
                assert b == pytest.approx(a, rel=1e-9, abs=1e-12, nan_ok=True), (name, column)
            else:
                assert a == b, (name, column)


KERNEL_SPECS = {  # what the kernels serve, and the cases that fall back to torch (3 bits, padded groups)
    "kivi4": {"family": "quant", "bits": 4, "group_size": 64, "key_axis": "channel", "value_axis": "token"},
    "kivi2-s4-r8": {"family": "quant", "bits": 2, "group_size": 32, "key_axis": "channel", "value_axis": "token",
                    "sink_tokens": 4, "recent_tokens": 8},
    "int8-f32": {"family": "quant", "bits": 8, "group_size": 32, "scale_dtype": "float32"},
    "sym4-ch": {"family": "quant", "bits": 4, "group_size": 32, "symmetric": True, "key_axis": "channel"},
    "int4-o": {"family": "quant", "bits": 4, "group_size": 64, "outlier_fraction": 0.01},
    "int3": {"family": "quant", "bits": 3, "group_size": 64},
    # clipped ranges (compress/clipping.py) take the torch path on any device: the same bits too
    "kivi4-cv": {"family": "quant", "bits": 4, "group_size": 64, "key_axis": "channel", "value_axis": "token",
                 "clip": "value"},
    "int2-c": {"family": "quant", "bits": 2, "group_size": 32, "clip": "both"},
    # int8 zero points (quant.py) take the torch path on any device
    "kivi3-z8": {"family": "quant", "bits": 3, "group_size": 64, "key_axis": "channel", "value_axis": "token",
                 "int_zero": "both"},
    "int4-z8": {"family": "quant", "bits": 4, "group_size": 32, "int_zero": "both"},
}


def kernel_cases(device):
    """(method, kind, x on `device`, x on the CPU) over the specs, dtypes and token counts."""
    g = torch.Generator().manual_seed(11)
    for name, spec in KERNEL_SPECS.items():
        method = parse_method(name, spec)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for seq in (128, 77):  # 77: channel groups padded (torch path)
                x = (torch.randn(2, 3, seq, 64, generator=g) * torch.rand(64, generator=g) * 4).to(dtype)
                for kind in ("key", "value"):
                    yield method, kind, x.to(device), x


def same_bits(a, b) -> bool:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(view), b.cpu().view(view))


def check_kernels(device, use=lambda on: contextlib.nullcontext(), interpreted: bool = False):
    """The kernels' path (`use(True)`, on `device`) against torch's on the CPU (`use(False)`).
    `interpreted`: Triton's CPU interpreter rounds twice where the GPU rounds once (bfloat16
    outputs truncated, fma not fused), so there decompression is compared only where that
    cannot matter (float16 scales: q * scale is exact; float16/float32 outputs)."""
    for method, kind, x, x_cpu in kernel_cases(device):
        with use(False):
            ref = method.compress(x_cpu, kind)
            out_ref = method.decompress(ref, kind)
        with use(True):
            packed = method.compress(x, kind)
            out, fake = method.decompress(packed, kind), method.fake(x, kind)
        case = (method.name, kind, x.dtype, tuple(x.shape))
        assert packed.keys() == ref.keys(), case
        for field in ref:
            assert same_bits(packed[field], ref[field]), (*case, field)
        if not interpreted or (x.dtype != torch.bfloat16 and method.scale_dtype == "float16"):
            assert same_bits(out, out_ref) and same_bits(fake, out_ref), case


@CUDA
def test_kernels_on_the_gpu_give_the_cpu_bytes():
    check_kernels("cuda")


def test_kernels_on_cpu_tensors_give_the_torch_bytes(monkeypatch):
    """The kernels themselves on CPU tensors, through Triton's interpreter (where Triton is installed)."""
    from kvcore.compress import kernels

    if not kernels.available():
        pytest.skip("Triton is not installed")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before TRITON_INTERPRET could be set")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when Triton and the kernels are defined
    monkeypatch.delitem(sys.modules, "kvcore.compress.triton_kernels", raising=False)
    kernels.compiled_kernels.cache_clear()
    calls = []

    @contextlib.contextmanager
    def use(on):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernels, "usable", lambda x, bits: calls.append(on) or (on and bits in kernels.PACKED_WIDTHS))
            yield

    try:
        check_kernels("cpu", use, interpreted=True)
        assert True in calls
    finally:
        kernels.compiled_kernels.cache_clear()
        sys.modules.pop("kvcore.compress.triton_kernels", None)


# CUDA reads CUDA_VISIBLE_DEVICES once, when it starts (cuInit): prints how many devices it sees after
# `setup` ran and the variable was emptied; 0 unless `setup` had started CUDA.
DEVICES_AFTER = """
import ctypes, os, sys
import torch
from kvcore.model import import_model_code
{setup}
os.environ["CUDA_VISIBLE_DEVICES"] = ""
cuda = ctypes.CDLL("libcuda.so.1")
count = ctypes.c_int(0)
cuda.cuInit(0)
cuda.cuDeviceGetCount(ctypes.byref(count))
print(count.value)
"""


@CUDA
def test_importing_the_model_code_starts_no_cuda():
    """A GPU job imports its model code before it claims a GPU (kvcore.jobs.run_job), and the
    claim sets CUDA_VISIBLE_DEVICES: the imports must leave CUDA unstarted, or the job would see
    every GPU of the host."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}

    def devices_after(setup):
        out = subprocess.run([sys.executable, "-c", DEVICES_AFTER.format(setup=setup)], env=env, text=True,
                             capture_output=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert devices_after("torch.cuda.is_available()") >= 1  # CUDA started first: the check can tell
    assert devices_after("import_model_code()") == 0


@CUDA
def test_cuda_headers_are_fresh_tensors():
    """The header of a CUDA compress is a copy of one kept per shape: each packed form owns its own."""
    method = parse_method("int4-g64")
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    a, b = method.compress(x, "key")["header"], method.compress(x, "key")["header"]
    assert a.is_cuda and a.tolist() == [2, 3, 64, 64, 2] and a.data_ptr() != b.data_ptr()
    a.zero_()
    assert b.tolist() == [2, 3, 64, 64, 2] and method.compress(x, "key")["header"].tolist() == [2, 3, 64, 64, 2]
