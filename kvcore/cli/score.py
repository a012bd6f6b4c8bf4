"""`kvcore score`: NLL of a given continuation after a given prompt, with and without a method.

    kvcore score --model smollm2-135m --method int4-g64 \\
                 --prompt "The capital of France is" --continuation " Paris, a city of"

Prompt and continuation are tokenized separately (no special tokens), so the scored tokens
are exactly the continuation's. Every protocol the method has is run (fake-quant: each
cache write compressed; prefill-compress: the prompt's cache compressed once, then the
continuation scored against it; see kvcore.evaluation.score). Prints the continuation's
NLL (nats per token) and perplexity for the baseline and the method, and the change.
"""

from __future__ import annotations

import argparse
import json

from kvcore.cli.options import add_model_options, model_dir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="NLL of a continuation after a prompt, with and without a method",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    p.add_argument("--method", required=True, metavar="NAME", help="preset name or method name (e.g. int4-g64)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set a spec key (repeatable), e.g. --param family=quant --param bits=3")
    p.add_argument("--prompt", required=True, help="the text before the scored continuation")
    p.add_argument("--continuation", required=True, help="the text whose tokens are scored")
    p.add_argument("--protocol", action="append", choices=["fake-quant", "prefill-compress"],
                   help="only this protocol (repeatable; default: every protocol the method has)")
    p.add_argument("--pre-rope", action="store_true", help="quantize keys before RoPE (LLaMA-style models)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", help="auto, float32, float16 or bfloat16 (default float32)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from kvcore.cli.compress import key_values
    from kvcore.errors import UsageError
    from kvcore.evaluation.perplexity import check_protocols
    from kvcore.evaluation.score import score_continuation
    from kvcore.model import load_model

    method, protocols = check_protocols(args.method, key_values(args.param, "--param") or None, args.protocol)
    for option, text in (("--prompt", args.prompt), ("--continuation", args.continuation)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogates
            raise UsageError(f"{option} is not valid UTF-8 text") from None
    model, tokenizer, device = load_model(model_dir(args), args.device, args.dtype, args.attn_implementation)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    continuation = tokenizer(args.continuation, add_special_tokens=False)["input_ids"]
    if not prompt or not continuation:
        raise UsageError(f"--prompt and --continuation must each have at least one token "
                         f"(got {len(prompt)} and {len(continuation)})")
    options = {"pre_rope": True} if args.pre_rope else None
    scores = {p: score_continuation(model, prompt, continuation, {method.name: method}, protocol=p,
                                    tokenizer=tokenizer, device=device, options=options) for p in protocols}
    if args.json:
        print(json.dumps({"method": method.name, "spec": method.spec, "protocols": scores}, indent=2))
        return 0
    first = next(iter(scores.values()))
    print(f"method {method.name}: prompt {first['n_prompt_tokens']} tokens, continuation "
          f"{first['n_continuation_tokens']} tokens scored (NLL in nats per token)")
    print(f"{'protocol':<17} {'baseline NLL':>12} {'ppl':>10} {'method NLL':>11} {'ppl':>10} {'delta %':>8}")
    for protocol, s in scores.items():
        base, comp = s["baseline"], s["methods"][method.name]
        print(f"{protocol:<17} {base['mean_nll']:>12.4f} {base['perplexity']:>10.4g} {comp['mean_nll']:>11.4f} "
              f"{comp['perplexity']:>10.4g} {100 * (comp['perplexity'] / base['perplexity'] - 1):>+8.2f}")
    return 0
