"""Markdown tables from benchmarks/ppl_bench.py output: one row per method and protocol.

    .venv/bin/python benchmarks/ppl_table.py results/bench/lee/*.json [--versus A:B ...]

`--versus A:B` adds the paired per-window difference between two methods of the same
file (A minus B, as a perplexity change in %, with its 95 % interval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def first_windows(records: dict, n: int) -> dict:
    """The records over their first `n` windows only (perplexities, Δ and the paired interval
    recomputed from the per-window NLL sums; bits stay the pooled ones): a 32-window run's
    8-window table."""
    import math

    from kvcore.evaluation.nll import paired_differences

    out = {}
    for name, r in records.items():
        w = r["windows"][:n]
        scored = sum(x["n_scored"] for x in w)
        base, comp = (math.exp(sum(x[k] for x in w) / scored) for k in ("baseline_nll_sum", "nll_sum"))
        out[name] = {**r, "windows": w, "paired": paired_differences(w), "baseline_perplexity": base,
                     "compressed_perplexity": comp, "delta_percent": 100 * (comp - base) / base,
                     "n_windows": len(w), "n_tokens": scored}
    return out


def load(path: Path, first: int | None = None) -> tuple[dict, dict]:
    """(meta, records) of a ppl_bench.py JSON, cut to its first `first` windows when given."""
    data = json.loads(path.read_text())
    records = first_windows(data["records"], first) if first else data["records"]
    return data["meta"], records


def unfinished(meta: dict) -> str:
    """' of N (unfinished)' for a ppl_bench.py file whose run has not done all its windows yet."""
    done, total = meta.get("n_windows_done"), meta.get("n_windows_total")
    return f" of {total} (unfinished: continue it with ppl_bench.py --resume)" if done and done < total else ""


def rows(path: Path, first: int | None = None) -> tuple[dict, list[str]]:
    from kvcore.compress.bits import LABEL

    meta, records = load(path, first)
    base = records["baseline"]
    out = [f"**{meta['protocol']}**, {Path(meta['dataset']).parent.name}, {meta['n_tokens']} tokens, "
           f"{meta['layout']} {meta['max_length']}/{meta['stride']}, {base['n_windows']} windows{unfinished(meta)}"
           f"{' (the first of the run)' if first else ''}, {base['n_tokens']} scored, {meta['dtype']} on {meta['device']}; baseline perplexity "
           f"{base['baseline_perplexity']:.4f}; {meta['seconds'] / 60:.1f} min", "",
           f"| method | {LABEL} | ratio | perplexity | Δ % | paired Δ % (95% CI) | windows worse | "
           "latency vs baseline | quality |",
           "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, r in records.items():
        if name == "baseline":
            continue
        paired = r.get("paired", {})
        ci = paired.get("delta_percent_ci95")
        ci_text = f"{ci[0]:+.2f} … {ci[1]:+.2f}" if ci else "–"
        worse = f"{paired.get('windows_worse', 0)}/{paired.get('n_windows', 0)}"
        quality = "(peer)" if r.get("peer") else r.get("quality_level", "")
        out.append(f"| {name} | {fmt(r.get('bits_per_element'))} | {fmt(r.get('compression_ratio'))}x | "
                   f"{r['compressed_perplexity']:.4f} | {r['delta_percent']:+.2f} | {ci_text} | {worse} | "
                   f"{fmt(r.get('latency_ratio'), '.2f')}x | {quality} |")
    return meta, out


def versus(records: dict, a: str, b: str) -> str:
    import math

    x = [(p["nll_sum"] - q["nll_sum"]) / p["n_scored"] for p, q in zip(records[a]["windows"], records[b]["windows"])]
    m = sum(x) / len(x)
    se = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x)) if len(x) > 1 else 0.0
    pct = lambda v: 100 * math.expm1(v)  # noqa: E731
    return (f"| {a} vs {b} | {pct(m):+.2f} | {pct(m - 1.96 * se):+.2f} … {pct(m + 1.96 * se):+.2f} | "
            f"{sum(v < 0 for v in x)}/{len(x)} |")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--versus", action="append", default=[], metavar="A:B")
    p.add_argument("--first", type=int, metavar="N", help="only the first N windows of each run")
    args = p.parse_args(argv)
    for path in args.paths:
        meta, lines = rows(path, args.first)
        print("\n".join(lines))
        records = load(path, args.first)[1]
        pairs = [v.split(":", 1) for v in args.versus if all(n in records for n in v.split(":", 1))]
        if pairs:
            print("\n| paired, per window | Δ % | 95% CI | windows lower |\n|---|---:|---|---:|")
            for a, b in pairs:
                print(versus(records, a, b))
        print(f"\n`{meta['command']}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
