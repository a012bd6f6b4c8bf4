"""Needle retrieval under the issue-20 methods beside eviction alone, one prefill per example.

`kvcore tasks needle` with presets whose Lloyd-Max levels or mixed precision need a
calibration run (`--calibration`, an extraction of another corpus than the filler):

    .venv/bin/python benchmarks/needle_bench.py --method kvzip --method evict-kvzip-0.5-s4-model+int3-g64-had \\
        --keep 0.5 --lengths 1024 --calibration results/smollm2-135m/enwiki-sample --out-dir results/bench/needle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resources/models/smollm2-135m")
    p.add_argument("--dataset", default="resources/datasets/lee-news/text.parquet", help="filler corpus")
    p.add_argument("--method", action="append", required=True, help="scorer name or preset (repeatable)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5], help="keep ratios of the eviction-only methods")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--n", type=int, default=2, help="examples per (length, depth) cell")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calibration", help="extracted run of another corpus (methods with -nuq / -mx)")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from ppl_bench import calibrated_spec

    from kvcore.cli.tasks import format_tables
    from kvcore.eviction import SCORERS
    from kvcore.tasks.evaluate import method_result, run_task

    names = list(dict.fromkeys(args.method))
    specs = {n: calibrated_spec(n, args.calibration) for n in names if n.split("-")[0] not in SCORERS}
    settings = {"keep_ratios": args.keep, "max_new_tokens": 8, "device": args.device, "dtype": "float32", "seed": 0}
    task = {"type": "needle", "context_lengths": args.lengths, "depths": args.depths, "n_per_cell": args.n, "seed": 0}
    outputs = {n: str(Path(args.out_dir) / f"{n}.json") for n in names}
    run = run_task(args.model, "needle", task, names, settings, outputs, filler_parquet=args.dataset,
                   config_methods=specs)
    docs = [method_result(run, n, task="needle", task_type="needle", model=Path(args.model).name) for n in names]
    print(format_tables(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
