"""`kvcore compress`, `kvcore decompress` and `kvcore metrics`: one shard, one method.

    kvcore compress IN OUT --method int4-g64 [--param symmetric=true] [--metrics M.json]
    kvcore decompress IN OUT
    kvcore metrics IN --method kivi2-g32-r128 [--json]

IN is an extracted shard (`kv/part-*.safetensors`). A method is a preset name, or any
name plus `--param family=quant --param bits=4 ...`; `--param` values are YAML
(true, 4, 0.5, [0, 1], [[0, 1]]) and override the preset's keys.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvcore.errors import UsageError

_ROWS = [
    ("method", "{}"), ("family", "{}"),
    ("compression_ratio", "{:.3f}x"), ("compression_ratio_vs_fp16", "{:.3f}x"),
    ("original_size_bytes", "{:,}"), ("compressed_size_bytes", "{:,}"),
    ("bits_per_element", "{:.3f}"), ("rmse", "{:.6g}"), ("snr_db", "{:.2f}"),
    ("cosine_similarity", "{:.6f}"), ("max_error", "{:.6g}"), ("quality_level", "{}"),
    ("processing_time_ms", "{:.1f}"), ("passed", "{}"),
]


def register(subparsers) -> None:
    epilog = "presets:\n  " + _grammar().replace("\n", "\n  ")
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "compress", help="compress an extracted shard with one method",
        description="Compress an extracted KV shard (safetensors) and print its metrics.",
        epilog=epilog, formatter_class=fmt,
    )
    p.add_argument("input", metavar="IN", help="extracted shard (.safetensors)")
    p.add_argument("output", metavar="OUT", help="compressed file to write (.safetensors)")
    _method_args(p)
    p.add_argument("--metrics", metavar="JSON", help="also write the metrics to this JSON file")
    p.set_defaults(func=run_compress)

    d = subparsers.add_parser(
        "decompress", help="turn a compressed file back into an extracted shard",
        description="Decompress a file written by `kvcore compress` (the method is read from it).",
    )
    d.add_argument("input", metavar="IN", help="compressed file (.safetensors)")
    d.add_argument("output", metavar="OUT", help="extracted-format shard to write (.safetensors)")
    d.add_argument("--device", default="cpu", help="torch device (default cpu)")
    d.set_defaults(func=run_decompress)

    m = subparsers.add_parser(
        "metrics", help="print a method's compression metrics without writing",
        description="Compress an extracted shard in memory and print the metrics.",
        epilog=epilog, formatter_class=fmt,
    )
    m.add_argument("input", metavar="IN", help="extracted shard (.safetensors)")
    _method_args(m)
    m.set_defaults(func=run_metrics)


def _grammar() -> str:
    from kvcore.compress.presets import GRAMMAR  # no torch import

    return GRAMMAR


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, metavar="NAME", help="preset name or method name")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a spec key (repeatable), e.g. --param bits=3")
    p.add_argument("--threshold", action="append", default=[], metavar="KEY=VALUE",
                   help="pass/fail bound, e.g. --threshold min_snr_db=20 (keys: min_snr_db, "
                        "min_cosine_similarity, max_rmse, max_error, min_compression_ratio)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when the metrics do not pass")


def key_values(items: list[str], option: str) -> dict:
    import yaml

    from kvcore.inputs import parse_yaml

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} expects KEY=VALUE (got {item!r})")
        try:
            out[key] = parse_yaml(text, f"{option} {key}")
        except yaml.YAMLError:
            out[key] = text
    return out


def _method(args):
    from kvcore.compress import parse_method

    params = key_values(args.param, "--param")
    method = parse_method(args.method, params or None)
    if method.needs_scores:
        raise UsageError(
            f"method {method.name!r}: eviction needs token scores from the model (scorer "
            f"{method.scorer!r}); run it through the workflow, or call "
            f"kvcore.compress.compress_file(..., scores=...) from Python"
        )
    return method


def _report(args, metrics: dict) -> int:
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, fmt in _ROWS:
            value = metrics[key]
            text = "null (lossless)" if value is None else fmt.format(value)
            print(f"{key:<27} {text}")
        for v in metrics["violations"]:
            print(f"{'violation':<27} {v}")
    if args.strict and not metrics["passed"]:
        print(f"kvcore: {metrics['method']} did not pass: {'; '.join(metrics['violations'])}", file=sys.stderr)
        return 1
    return 0


def run_compress(args) -> int:
    from kvcore.atomic import check_output, write_json
    from kvcore.compress import compress_file

    method = _method(args)
    if args.metrics:
        check_output(args.metrics, "--metrics", inputs=[args.input, args.output])
    thresholds = key_values(args.threshold, "--threshold") or None
    metrics = compress_file(args.input, args.output, method, device=args.device, thresholds=thresholds)
    if args.metrics:
        write_json(args.metrics, metrics)
    return _report(args, metrics)


def run_metrics(args) -> int:
    from kvcore.compress import measure

    method = _method(args)
    thresholds = key_values(args.threshold, "--threshold") or None
    return _report(args, measure(args.input, method, device=args.device, thresholds=thresholds))


def run_decompress(args) -> int:
    from kvcore.compress import decompress_file

    info = decompress_file(args.input, args.output, device=args.device)
    print(
        f"{info['method']} ({info['family']}): {info['compressed_size_bytes']:,} -> "
        f"{info['decompressed_size_bytes']:,} bytes in {info['processing_time_ms']:.1f} ms -> {args.output}"
    )
    return 0
