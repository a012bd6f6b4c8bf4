"""`kvcore validate`: perplexity of one method against the baseline, outside the workflow.

    kvcore validate --method int4-g64 --model smollm2-135m \\
                    --dataset resources/datasets/lee-news/text.parquet [--out ppl.json]
    kvcore validate --method evict-kvzip-0.5-s4-model --quick

Runs every protocol that makes sense for the method (fake-quant and prefill-compress for
quantization and sparsification, prefill-compress for eviction and pruning; see
kvcore.evaluation.protocols), prints baseline and compressed perplexity, delta, bits per element,
latency and pass/fail, and exits 1 when the primary protocol's delta is not below the
threshold. `--quick` needs no download: a tiny random-weight LLaMA and random tokens,
built on the spot (it checks the pipeline, not the method's quality).
"""

from __future__ import annotations

import argparse
import json
import sys

from kvcore.cli.options import MAX_LENGTH, MAX_TOKENS, add_model_options, float_in, int_in, model_dir
from kvcore.errors import UsageError

QUICK = {"tokens": 512, "max_length": 128, "stride": 64}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "validate", help="perplexity of one method vs the baseline (both protocols)",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", required=True, metavar="NAME", help="preset name or method name (e.g. kivi2-g32)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a spec key (repeatable), e.g. --param family=quant --param bits=3")
    add_model_options(p, required=False)
    p.add_argument("--dataset", metavar="PARQUET", help="dataset text.parquet (resources/datasets/NAME/text.parquet)")
    p.add_argument("--quick", action="store_true", help="tiny random model and random tokens: no download")
    p.add_argument("--protocol", action="append", choices=["fake-quant", "prefill-compress"],
                   help="only this protocol (repeatable; default: every protocol the method has)")
    p.add_argument("--max-tokens", type=int_in(2, MAX_TOKENS), default=8192,
                   help="evaluate the first N tokens (default 8192)")
    p.add_argument("--max-length", type=int_in(2, MAX_LENGTH), default=1024, help="window length (default 1024)")
    p.add_argument("--stride", type=int_in(1, MAX_LENGTH), default=512,
                   help="scored tokens per window, at most --max-length (default 512)")
    p.add_argument("--layout", choices=["sliding", "chunks"], default="sliding",
                   help="sliding: the HF guide's windows (default); chunks: disjoint windows (kvpress)")
    p.add_argument("--threshold", type=float_in(0, low_open=True), default=0.5,
                   help="pass when the perplexity rises by less (0.5)")
    p.add_argument("--pre-rope", action="store_true", help="quantize keys before RoPE (LLaMA-style models)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", help="auto, float32, float16 or bfloat16 (default float32)")
    p.add_argument("--out", metavar="JSON", help="also write the ppl record (ppl/{method}.json format)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=run_validate)


def _spec(args):
    from kvcore.cli.compress import key_values

    return key_values(args.param, "--param") or None


def run_validate(args) -> int:
    import tempfile
    from pathlib import Path

    from kvcore.atomic import check_output, write_json
    from kvcore.compress import parse_method
    from kvcore.evaluation.perplexity import validate_method

    if args.stride > args.max_length:
        raise UsageError(f"--stride ({args.stride}) must not exceed --max-length ({args.max_length})")
    spec = _spec(args)
    parse_method(args.method, spec)  # a bad method fails before any model loads
    if args.out:
        check_output(args.out, "--out", inputs=[p for p in (args.model, args.dataset) if p])
    settings = {"max_length": args.max_length, "stride": args.stride, "max_tokens": args.max_tokens,
                "threshold": args.threshold, "device": args.device, "dtype": args.dtype, "layout": args.layout,
                "attn_implementation": args.attn_implementation}
    options = {"pre_rope": True} if args.pre_rope else None
    if args.quick:
        if args.model or args.dataset:
            raise UsageError("--quick builds its own tiny model and tokens; leave out --model and --dataset")
        import torch

        from kvcore.sources import prepare_model

        settings.update(max_length=QUICK["max_length"], stride=QUICK["stride"], device="cpu")
        with tempfile.TemporaryDirectory() as tmp:
            quick_model = prepare_model("quick", {"source": "random-init", "architecture": "llama",
                                                "config": {"head_dim": 64, "hidden_size": 128}}, Path(tmp) / "m")
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 400, (QUICK["tokens"],), generator=g).tolist()
            record = validate_method(quick_model, ids, args.method, spec, settings, options, args.protocol)
    else:
        if not args.model or not args.dataset:
            raise UsageError("validate needs --model MODEL and --dataset PARQUET (or --quick for a synthetic check)")
        from kvcore.sources.datasets import joined_text

        if not Path(args.dataset).is_file():
            raise UsageError(f"--dataset {args.dataset}: no such file (expected resources/datasets/NAME/text.parquet)")
        record = validate_method(model_dir(args), joined_text(args.dataset), args.method, spec, settings, options,
                                 args.protocol)
    if args.out:
        write_json(args.out, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        _print(record)
    if not record["passed"]:
        print(f"kvcore: {args.method} did not pass: perplexity +{record['delta']:.4f} "
              f"(threshold {record['threshold']})", file=sys.stderr)
        return 1
    return 0


def _print(record: dict) -> None:
    def f(x, spec):
        return "–" if x is None else format(x, spec)

    print(f"method {record['method']}  ({record['n_windows']} windows of {record['max_length']}, "
          f"stride {record['stride']}, {record['layout']}, {record['dtype']}; bits16 = bits per element, "
          f"fp16 basis)")
    head = (f"{'protocol':<17} {'baseline':>10} {'compressed':>11} {'delta':>9} {'delta %':>8} {'bits16':>6} "
            f"{'ratio':>6} {'latency':>8} {'quality':<10} passed")
    print(head)
    for name, r in record["protocols"].items():
        print(f"{name:<17} {r['baseline_perplexity']:>10.4f} {r['compressed_perplexity']:>11.4f} "
              f"{r['delta']:>+9.4f} {r['delta_percent']:>+8.2f} {f(r['bits_per_element'], '.2f'):>6} "
              f"{f(r['compression_ratio'], '.2f'):>6} {f(r.get('latency_ratio'), '.2f') + 'x':>8} "
              f"{r['quality_level']:<10} {r['passed']}")
    ci = record["paired"].get("delta_percent_ci95")
    if ci:
        print(f"paired per-window delta % ({record['protocol']}): 95% CI {ci[0]:+.2f} .. {ci[1]:+.2f}, "
              f"worse in {record['paired']['windows_worse']}/{record['paired']['n_windows']} windows")
