"""File level: compress an extracted shard, decompress it back, or only measure.

Compressed file: safetensors with tensors `layer_{i}_{kind}.{field}` (the packed form
of `Method.compress`, fields such as codes, scale, zero, sink, recent, outlier_idx,
outlier_val, values, keep, mask, idx, heads, data, header) and the input's string
metadata plus `compress_method` (name), `compress_spec` (the full spec as JSON) and
`compress_format` ("1"), so `decompress_file` needs no flags.

Sizes (all in bytes, measured, never estimated):
- original_size_bytes: the input file on disk (a run's shards: the merged file they stand
  for, `MergedShards.nbytes`, the size the merged copy had when one was written).
- compressed_size_bytes: the output file on disk (for `measure`, the same file
  serialised in memory by safetensors.torch.save). It equals
  8 + header_json_len + sum over tensors of `Method.packed_nbytes`.
- compression_ratio = original / compressed; compression_ratio_vs_fp16 = the same
  input stored as float16 (8 + its header + 2 bytes per element) / compressed.
- bits_per_element: the one convention of kvcore.compress.bits (full-precision parts
  counted as 16 bits, codes, scales, zeros, indices and masks as stored), so a float32
  extraction and a float16 one report the same bits; `bits_basis` names it.
  written_bits_per_element = 8 * compressed_size_bytes / (K and V elements): what this
  file spends per original value, in the extraction's dtype.
- processing_time_ms: time inside `Method.compress` over all tensors (device
  synchronised), not reading, writing or measuring.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from kvcore.tensorfile import save_tensors

from kvcore.atomic import atomic_path, check_output
from kvcore.compress.base import KINDS, Method
from kvcore.compress.bits import BASIS, bits_per_element, counted_nbytes
from kvcore.compress.metrics import ErrorStats, all_finite, check_thresholds, quality_level, violations
from kvcore.compress.shards import MergedShards
from kvcore.errors import KvcoreError, UsageError
from kvcore.progress import each

FORMAT = "1"
_COMPRESS_KEYS = ("compress_method", "compress_spec", "compress_format")
_KV_NAME = re.compile(r"layer_(\d+)_(key|value)")
_PACKED_NAME = re.compile(r"layer_(\d+)_(key|value)\.(\w+)")

Scores = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def compress_file(in_path, out_path, method: Method, scores: Scores | None = None, *,
                  device: str | None = None, thresholds: dict | None = None) -> dict:
    """Compress an extracted shard (a path, or a run's `MergedShards`) into `out_path`; return
    the metrics dict. One layer at a time: each packed tensor goes to disk as it is made."""
    from kvcore.tensorfile import SpooledTensorFile

    _check_paths(in_path, out_path)
    thresholds = check_thresholds(thresholds)
    with atomic_path(out_path) as tmp:
        writer = SpooledTensorFile(tmp)
        try:
            metadata, partial = _compress_all(in_path, method, scores, device, writer.add)
            writer.finish(metadata)
        finally:
            writer.close()
        size = os.path.getsize(tmp)
    return _finish(partial, size, method, thresholds)


def measure(in_path, method: Method, scores: Scores | None = None, *,
            device: str | None = None, thresholds: dict | None = None) -> dict:
    """The metrics of `compress_file` without writing anything."""
    _check_paths(in_path, None)
    thresholds = check_thresholds(thresholds)
    tensors: dict[str, torch.Tensor] = {}
    metadata, partial = _compress_all(in_path, method, scores, device,
                                      lambda name, t: tensors.__setitem__(name, t.cpu()))
    size = len(save(tensors, metadata=metadata))
    return _finish(partial, size, method, thresholds)


def read_packed(in_path, device: str | None = None) -> tuple[Method, dict, dict]:
    """(method, metadata, {(layer, kind): packed tensors}) of a compressed file, on `device`."""
    from kvcore.compress import parse_method

    dev = _device(device)
    with _open(in_path) as f:
        meta = f.metadata() or {}
        if "compress_spec" not in meta:
            raise KvcoreError(f"{in_path} is not a kvcore compressed file (no compress_spec metadata)")
        try:
            spec = json.loads(meta["compress_spec"])
        except json.JSONDecodeError as exc:
            raise KvcoreError(f"{in_path}: corrupt compress_spec metadata ({exc})") from None
        try:
            method = parse_method(meta.get("compress_method", "stored"), spec)
        except UsageError as exc:
            raise KvcoreError(f"{in_path}: the stored method is invalid ({exc})") from None
        groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for tname in f.keys():
            m = _PACKED_NAME.fullmatch(tname)
            if m:
                groups.setdefault((int(m[1]), m[2]), {})[m[3]] = _get(f, in_path, tname).to(dev)
    if not groups:
        raise KvcoreError(f"{in_path} holds no compressed layer_{{i}}_{{key,value}} tensors")
    return method, meta, dict(sorted(groups.items()))


def unpack(in_path, method: Method, packed: dict, layer: int, kind: str) -> torch.Tensor:
    """`method.decompress` of one stored tensor; a damaged one is a one-line KvcoreError."""
    try:
        return method.decompress(packed, kind)
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:  # damaged file
        raise KvcoreError(f"{in_path}: cannot decompress layer_{layer}_{kind} ({exc})") from None


def decompress_file(in_path, out_path, *, device: str | None = None) -> dict:
    """Write the extracted-format safetensors that a compressed file stands for."""
    _check_paths(in_path, out_path)
    start = time.perf_counter()
    method, meta, groups = read_packed(in_path, device)
    out = {f"layer_{layer}_{kind}": unpack(in_path, method, packed, layer, kind).cpu()
           for (layer, kind), packed in groups.items()}
    metadata = {k: v for k, v in meta.items() if k not in _COMPRESS_KEYS}
    with atomic_path(out_path) as tmp:
        save_tensors(out, tmp, metadata=metadata)
        size = os.path.getsize(tmp)
    return {
        "method": method.name,
        "family": method.family,
        "compressed_size_bytes": os.path.getsize(in_path),
        "decompressed_size_bytes": size,
        "processing_time_ms": 1000 * (time.perf_counter() - start),
    }


# ------------------------------------------------------------------------- internals


def _check_paths(in_path, out_path) -> None:
    inputs = in_path.paths if isinstance(in_path, MergedShards) else [in_path]
    for path in inputs:
        if not Path(path).is_file():
            raise UsageError(f"input file not found: {path}")
    if out_path is not None:
        check_output(out_path, "output", inputs=inputs)


def _device(device: str | None) -> torch.device:
    """None: the CPU; "auto": CUDA when there is a GPU (the workflow's default), else the CPU."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r} (valid: cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available (use cpu)")
    return dev


def _open(path):
    if isinstance(path, MergedShards):
        return contextlib.nullcontext(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise KvcoreError(f"cannot read {path} as safetensors: {exc}") from None


def _header_len(path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layers(path, names) -> list[int]:
    found: dict[int, set] = {}
    for tname in names:
        m = _KV_NAME.fullmatch(tname)
        if m:
            found.setdefault(int(m[1]), set()).add(m[2])
    if not found:
        raise KvcoreError(f"{path} holds no layer_{{i}}_key / layer_{{i}}_value tensors (not an extracted shard)")
    for layer, kinds in found.items():
        if kinds != set(KINDS):
            missing = (set(KINDS) - kinds).pop()
            raise KvcoreError(f"{path}: layer_{layer}_{missing} is missing")
    return sorted(found)


def _get(f, path, tname, device=None) -> torch.Tensor:
    try:
        if isinstance(f, MergedShards):  # built on the device: no whole layer in host memory
            return f.get_tensor(tname, device)
        return f.get_tensor(tname)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise KvcoreError(f"cannot read {tname} from {path}: {exc}") from None


def _load(f, path, tname, device) -> torch.Tensor:
    x = _get(f, path, tname, device)
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KvcoreError(
            f"{path}: {tname} must be float32/float16/bfloat16 [n_seq, n_kv, seq, dim] "
            f"(got {x.dtype} {tuple(x.shape)})"
        )
    x = x.to(device)
    if not all_finite(x):
        raise KvcoreError(f"{path}: {tname} contains NaN or infinite values")
    return x


def _sizes(in_path) -> tuple[int, int]:
    """(file size, JSON header length) of the input (for a run: of its merged file)."""
    if isinstance(in_path, MergedShards):
        return in_path.nbytes, in_path.header_len
    return os.path.getsize(in_path), _header_len(in_path)


def _compress_all(in_path, method: Method, scores, device, sink: Callable[[str, torch.Tensor], None]):
    """Compress layer by layer, handing each packed tensor to `sink(name, tensor)`;
    return (the output's metadata, the partial metrics)."""
    dev = _device(device)
    if method.needs_scores and scores is None:
        raise UsageError(
            f"method {method.name!r} (family {method.family}) needs token scores from a scorer "
            f"({method.scorer!r}); pass scores=callable(layer, keys, values)"
        )
    with _open(in_path) as f:
        meta = f.metadata() or {}
        if "compress_spec" in meta:
            raise UsageError(f"{in_path} is already compressed ({meta.get('compress_method')}); decompress it first")
        layers = _layers(in_path, f.keys())
        if hasattr(method, "check_layers"):  # prune: every named layer must exist
            stated = meta.get("num_layers", "")
            method.check_layers(int(stated) if stated.isdigit() else max(layers) + 1)
        stats = ErrorStats()
        seconds = 0.0
        n_elements = 0
        counted = 0  # bytes under the bits convention
        warmed = False
        for layer in each(layers, f"compress {method.name}", "layers", jobs_only=True):
            k = _load(f, in_path, f"layer_{layer}_key", dev)
            v = _load(f, in_path, f"layer_{layer}_value", dev)
            if k.shape != v.shape:
                raise KvcoreError(f"{in_path}: layer {layer} key {tuple(k.shape)} and value {tuple(v.shape)} differ")
            keep = method.select(scores(layer, k, v).to(dev)) if method.needs_scores else None
            for kind, x in (("key", k), ("value", v)):
                if not warmed:  # the first call pays torch's one-time set-up; time steady state
                    method.compress(x, kind, keep, layer=layer)
                    warmed = True
                _sync(dev)
                start = time.perf_counter()
                packed = method.compress(x, kind, keep, layer=layer)
                _sync(dev)
                seconds += time.perf_counter() - start
                before = stats.nonfinite
                stats.update(x, method.decompress(packed, kind))
                if stats.nonfinite > before:  # finite input, so the stored form overflowed
                    raise KvcoreError(
                        f"{in_path}: layer {layer} {kind} does not fit method {method.name!r} "
                        f"({stats.nonfinite - before} values decompress to inf/NaN; for quant, "
                        f"values beyond float16 need scale_dtype: float32)"
                    )
                n_elements += x.numel()
                counted += counted_nbytes(method, x.shape, kind, layer=layer, keep=keep)
                for field, t in packed.items():
                    sink(f"layer_{layer}_{kind}.{field}", t)
    metadata = {
        **meta,
        "compress_method": method.name,
        "compress_spec": json.dumps(method.spec),
        "compress_format": FORMAT,
    }
    in_size, header_len = _sizes(in_path)
    partial = {
        **stats.result(),
        "original_size_bytes": in_size,
        "fp16_size_bytes": 8 + header_len + 2 * n_elements,
        "n_elements": n_elements,
        "counted_nbytes": counted,
        "seconds": seconds,
    }
    return metadata, partial


def _finish(partial: dict, size: int, method: Method, thresholds: dict) -> dict:
    metrics = {
        "method": method.name,
        "family": method.family,
        "compression_ratio": partial["original_size_bytes"] / size,
        "compression_ratio_vs_fp16": partial["fp16_size_bytes"] / size,
        "original_size_bytes": partial["original_size_bytes"],
        "compressed_size_bytes": size,
        "bits_per_element": bits_per_element(partial["counted_nbytes"], partial["n_elements"]),
        "bits_basis": BASIS,
        "written_bits_per_element": 8 * size / partial["n_elements"],
        "rmse": partial["rmse"],
        "snr_db": partial["snr_db"],
        "cosine_similarity": partial["cosine_similarity"],
        "max_error": partial["max_error"],
        "quality_level": quality_level(partial["snr_db"], partial["cosine_similarity"]),
        "processing_time_ms": 1000 * partial["seconds"],
    }
    found = violations({**metrics, "nonfinite": partial["nonfinite"]}, thresholds)
    metrics["passed"] = not found
    metrics["violations"] = found
    # JSON has no inf/nan: a non-finite measure is reported as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
