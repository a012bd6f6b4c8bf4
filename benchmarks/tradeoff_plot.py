"""The trade-off plot: perplexity change (%) against bits per element (fp16 basis), one point
per method of benchmarks/ppl_bench.py output, the paired per-window 95 % interval as bars;
the public tools' points (transformers' QuantizedCache `quanto…`, kvpress-style KVzip
eviction `evict-kvzip-…` alone) in their own colours.

    .venv/bin/python benchmarks/tradeoff_plot.py results/bench/peers/prefill-compress.json --out docs/tradeoff.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


ISSUE = "kvcore, issue 20 (rotation / levels / clipping / int8 zeros / mixed / composed)"


def kind(name: str, record: dict) -> str:
    if record.get("peer"):
        return "transformers QuantizedCache (quanto)"
    if name.startswith("evict-") and "+" not in name:
        return "eviction alone (kvpress's scorers)"
    options = name.replace("+", "-").split("-")
    new = any(t in ("had", "hadv", "hadk", "nuq", "c", "ck", "cv", "z8", "z8k", "z8v") or t.startswith(("rot", "mx"))
              for t in options)
    if name.startswith("kivi") and not new:
        return "kvcore KIVI (public recipe)"
    return ISSUE


STYLE = {"transformers QuantizedCache (quanto)": ("tab:red", "s"),
         "eviction alone (kvpress's scorers)": ("tab:orange", "^"),
         "kvcore KIVI (public recipe)": ("tab:gray", "o"),
         ISSUE: ("tab:blue", "D")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", type=Path, nargs="+",
                   help="ppl_bench.py JSONs of one protocol on the same token ids (their methods side by side)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--max-delta", type=float, default=8.0, help="leave out points above this Δ %% (off the scale)")
    p.add_argument("--first", type=int, metavar="N", help="only the first N windows of the run")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from ppl_table import load

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvcore.compress.bits import LABEL

    meta, records = load(args.paths[0], args.first)
    for path in args.paths[1:]:
        other_meta, other = load(path, args.first)
        if other_meta["token_ids_sha256"] != meta["token_ids_sha256"] or other_meta["protocol"] != meta["protocol"]:
            raise SystemExit(f"{path}: another text or protocol than {args.paths[0]}")
        records.update({k: v for k, v in other.items() if k != "baseline"})
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen = set()
    for name, r in records.items():
        if name == "baseline" or r.get("bits_per_element") is None or r["delta_percent"] > args.max_delta:
            continue
        k = kind(name, r)
        color, marker = STYLE[k]
        lo, hi = r["paired"]["delta_percent_ci95"]
        d = r["delta_percent"]
        ax.errorbar(r["bits_per_element"], d, yerr=[[d - lo], [hi - d]], fmt=marker, color=color, capsize=3,
                    label=None if k in seen else k, zorder=2 if k == ISSUE else 3)  # the peers on top
        seen.add(k)
        ax.annotate(name, (r["bits_per_element"], d), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel(LABEL)
    ax.set_ylabel("Δ perplexity % (paired per-window 95 % CI)")
    ax.set_title(f"{meta['protocol']}, {Path(meta['dataset']).parent.name}, {meta['n_tokens']} tokens, "
                 f"{records['baseline']['n_windows']} windows, {meta['device']}; points above +{args.max_delta:g} % left out",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
