"""Markdown tables from benchmarks/ppl_bench.py output: one row per method and protocol.

    .venv/bin/python benchmarks/ppl_table.py results/bench/lee/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def rows(path: Path) -> tuple[dict, list[str]]:
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["records"]
    base = records["baseline"]
    out = [f"**{meta['protocol']}**, {Path(meta['dataset']).parent.name}, {meta['n_tokens']} tokens, "
           f"{meta['layout']} {meta['max_length']}/{meta['stride']}, {base['n_windows']} windows, "
           f"{base['n_tokens']} scored, {meta['dtype']} on {meta['device']}; baseline perplexity "
           f"{base['baseline_perplexity']:.4f}; {meta['seconds'] / 60:.1f} min", "",
           "| method | bits/elem | ratio | perplexity | Δ % | paired Δ % (95% CI) | windows worse | "
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


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: ppl_table.py RESULT.json ...", file=sys.stderr)
        return 2
    for path in paths:
        meta, lines = rows(path)
        print("\n".join(lines))
        print(f"\n`{meta['command']}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
