"""The workflow's compress job on a run-sized cache: wall time and host peak RSS per method.

Writes `--shards` extracted-format shards of a TinyLlama-1.1B-shaped cache (22 layers x 4 KV
heads x head_dim 64, `--seqs` sequences x `--seq-len` tokens in all, bfloat16, random values)
under --workdir, then runs `kvcore.evaluation.extracted.compress_extracted` once per method,
each in a fresh process, on `--device`, and prints its wall time and peak RSS (ru_maxrss of
that process). Issue 18's target: every compress job <= 2 GB of host memory.

    python benchmarks/compress_job_bench.py --workdir /tmp/cjb --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"baseline": {"family": "none"},
           "kivi4-g64": {"family": "quant", "bits": 4, "group_size": 64, "key_axis": "channel", "value_axis": "token"},
           "streamingllm-0.5": {"family": "evict", "scorer": "streamingllm", "keep_ratio": 0.5, "sink_tokens": 4}}


def make_shards(workdir: Path, n_shards: int, seqs: int, seq_len: int) -> list[Path]:
    import torch

    from kvcore.tensorfile import save_tensors

    g = torch.Generator().manual_seed(0)
    per = seqs // n_shards
    paths = []
    for s in range(n_shards):
        path = workdir / f"part-{s:05d}.safetensors"
        tensors = {f"layer_{i}_{k}": torch.randn(per, 4, seq_len, 64, generator=g).bfloat16()
                   for i in range(22) for k in ("key", "value")}
        save_tensors(tensors, path, metadata={"num_layers": "22", "seq_ids": json.dumps(list(range(s * per, (s + 1) * per))),
                                              "seq_lengths": json.dumps([seq_len] * per), "seq_len": str(seq_len)})
        paths.append(path)
        del tensors
    return paths


def child(shards: list[str], out: str, name: str, device: str) -> None:
    from kvcore.evaluation.extracted import compress_extracted

    start = time.perf_counter()
    metrics = compress_extracted(shards, out + ".safetensors", out + ".json", name, METHODS[name], device,
                                 model_device=device)
    print(json.dumps({"seconds": time.perf_counter() - start, "ratio": metrics["compression_ratio"],
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shards, out, name, device = args.child
        return child(shards.split(","), out, name, device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.workdir, args.shards, args.seqs, args.seq_len)
    size = sum(p.stat().st_size for p in shards) / 1e9
    print(f"{len(shards)} shards, {size:.2f} GB (bfloat16 TinyLlama shape, {args.seqs} x {args.seq_len}); "
          f"device {args.device}\n\n| method | seconds | peak RSS MB | compression ratio |\n|---|---:|---:|---:|")
    for name in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--child",
                               ",".join(map(str, shards)), str(args.workdir / name), name, args.device],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['seconds']:.1f} | {r['rss_mb']:.0f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
