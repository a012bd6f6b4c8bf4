"""Perplexity throughput against the forward-only rate of the same model, in one run.

A random-weight TinyLlama-1.1B-shaped model (22 layers, 32 heads, 4 KV heads, no hub needed)
and random token ids. For each protocol the baseline (the `baseline` method's job) is timed
end to end (wall clock around `evaluate_methods`, so scoring, bookkeeping and host syncs
count) with one window per forward and with the GPU batch (`batched.window_batch`); the
ceiling is the forward alone over the same windows (`model(ids[B, L])`, logits included,
nothing scored), at the same batch. Rates are scored tokens per second; medians of --repeats.

    python benchmarks/ppl_rate_bench.py --device cuda --dtype bfloat16 --tokens 32768

Target (issue 18): baseline tokens/s >= 0.5 of the forward-only rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

TINYLLAMA = {"num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_size": 2048,
             "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048}


def main() -> None:
    import torch

    from kvcore.evaluation.batched import window_batch
    from kvcore.evaluation.protocols import evaluate_methods
    from kvcore.evaluation.timing import sync
    from kvcore.evaluation.windows import layout_windows
    from kvcore.sources.models import random_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=22, help="fewer for a quick CPU check")
    args = ap.parse_args()

    model, _ = random_model({"architecture": "llama", "config": {**TINYLLAMA, "num_hidden_layers": args.layers}})
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = layout_windows(len(ids), args.max_length, args.stride)
    scored = sum(w.target_len for w in windows)
    batch = window_batch(model, args.device, args.max_length)
    dev_ids = torch.tensor([ids], device=args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}; torch {torch.__version__}; {args.layers}-layer TinyLlama shape, {args.dtype}; "
          f"{len(ids)} tokens, {len(windows)} windows of {args.max_length} (stride {args.stride}), "
          f"{scored} scored; GPU batch {batch}; median of {args.repeats}")

    def forward_only(b):
        full = [w for w in windows if w.end - w.begin == args.max_length]
        with torch.inference_mode():
            for i in range(0, len(full), b):
                group = full[i:i + b]
                model(input_ids=torch.cat([dev_ids[:, w.begin:w.end] for w in group]), use_cache=False)
            for w in windows[len(full):]:
                model(input_ids=dev_ids[:, w.begin:w.end], use_cache=False)

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    ceilings = {b: scored / timed(lambda: forward_only(b)) for b in sorted({1, batch})}
    print(f"\n| run | batch | tokens/s | of forward-only (same batch) | of forward-only (batch {batch}) |")
    print("|---|---:|---:|---:|---:|")
    for b, rate in ceilings.items():
        print(f"| forward only | {b} | {rate:,.0f} | 1.00 | {rate / ceilings[batch]:.2f} |")
    for protocol in ("fake-quant", "prefill-compress"):
        for b in sorted({1, batch}):
            run = lambda: evaluate_methods(model, ids, {}, protocol=protocol, max_length=args.max_length,  # noqa: E731
                                           stride=args.stride, device=args.device, batch=b)
            rate = scored / timed(run)
            print(f"| baseline {protocol} | {b} | {rate:,.0f} | {rate / ceilings[b]:.2f} | "
                  f"{rate / ceilings[batch]:.2f} |")
    print("\nbaseline tokens/s are wall clock around evaluate_methods (NLL, syncs and bookkeeping included).")


if __name__ == "__main__":
    main()
