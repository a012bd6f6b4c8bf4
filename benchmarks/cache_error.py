"""Where a quantizer's error sits: relative squared error sum((x' - x)^2) / sum(x^2) of each
method's reconstruction per layer and kind, on an extracted cache (no model, no text), and the
share of it on each sequence's first token (the attention sink).

    .venv/bin/python benchmarks/cache_error.py results/smollm2-135m/enwiki-sample --methods int4-g64-had,kivi4-g64
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory of an extracted cache (kv/part-*.safetensors)")
    p.add_argument("--methods", required=True, help="presets, comma-separated")
    p.add_argument("--calibration", help="run directory the -nuq / -mx presets are calibrated on (another corpus)")
    p.add_argument("--sequences", type=int, default=4, help="first N sequences of the run")
    p.add_argument("--by-layer", action="store_true", help="one line per layer, not only the means")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from ppl_bench import calibrated

    from kvcore.compress.levels import calibration_cache
    from kvcore.errors import UsageError

    cache = calibration_cache(args.run)
    layers = sorted({layer for layer, _ in cache})
    print(f"{'method':<40} {'kind':<6} {'mean':>7} {'min':>7} {'max':>7} {'token 0':>8}")
    for name in args.methods.split(","):
        try:
            method = calibrated(name, args.calibration)
        except UsageError as exc:
            raise SystemExit(f"cache_error: {exc}") from None
        for kind in ("key", "value"):
            errors, first = [], []
            for layer in layers:
                x = cache[(layer, kind)][: args.sequences].double()
                e = (method.fake(x.float(), kind, layer=layer).double() - x).square().sum(-1)  # [n, h, T]
                errors.append(float(e.sum() / x.square().sum()))
                first.append(float(e[:, :, 0].sum() / e.sum()))
                if args.by_layer:
                    print(f"{name:<40} {kind:<6} layer {layer:>2}: {errors[-1]:.4f} (token 0: {first[-1]:.3f})")
            print(f"{name:<40} {kind:<6} {sum(errors) / len(errors):>7.4f} {min(errors):>7.4f} {max(errors):>7.4f} "
                  f"{sum(first) / len(first):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
