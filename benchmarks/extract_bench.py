"""Extraction throughput against the forward pass and the disk, side by side in one run.

    python benchmarks/extract_bench.py --shape gpt2 tinyllama --device cuda --batch 8 --seq-len 512 --batches 4

Random-weight models built from a config (no hub): `gpt2` (GPT-2 small), `tinyllama`
(TinyLlama-1.1B shape), `smollm2`, `tiny` (smoke tests only). Each mode runs in a fresh subprocess (so its peak host
RSS is its own) once per repeat, the modes taking turns (a load change on a shared machine
hits them alike); medians over `--repeats` are printed as tokens/s and GB/s:

  1  forward only: the ceiling (the cache is made, nothing leaves the device)
  2  kvcore extraction to safetensors only (`ParquetSelection(layers=())`)
  3  kvcore extraction, safetensors + Parquet: what the workflow runs
  3o kvcore before the streaming writer: the same, safetensors held in memory until close()
  3d kvcore with pyarrow's default Parquet options (before the codec table's choice)
  3t kvcore with torch's CPU threads left as they are (no `host_threads_for_writers`)
  4  naive: forward, .cpu(), one pyarrow table written per batch and layer, main thread
  5  the old extractor's nested JSON lists, one sequence at a time (`--json-seqs` only)

plus ratios 2/1, 3/1, 3/4, 3/5; peak RSS of `--rss-modes` (one repeat each) at two sizes, `--rss-batches`
(default 2x and 4x `--batches`), which shows whether host memory grows with the data. Both
should be past the first full Parquet row group (ROW_GROUP_ROWS rows held back per layer
file, a fixed bound) so that the comparison shows growth, not that bound filling. Also the
sequential write speed of the disk under `--dir` (numpy tofile + fsync, same run); and
the limit L = min(forward tok/s, disk bytes/s / bytes written per token) for modes 2 and 3.
`--json PATH` writes every number.

    python benchmarks/extract_bench.py --codecs --shape tinyllama --batch 8 --seq-len 512

writes one layer's rows of that batch with each Parquet codec/encoding tried (no model) and
prints write and read speed, file size and a point lookup's time: the table in benchmarks/README.md.

    python benchmarks/extract_bench.py --writer-scaling --shape tinyllama --device cuda --workers 1 2 4 8 16

the storage path alone: Parquet encoding on 1, 2, 4, ... threads, then ShardWriter fed random
K/V per writer count (`--max-pending` batches in flight), with and without one torch thread.

    python benchmarks/extract_bench.py --e2e 300000 --shape tinyllama --device cuda

a corpus of that many tokens extracted as the workflow's extract job does, timed end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "tinyllama": dict(model_type="llama", num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      hidden_size=2048, intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "smollm2": dict(model_type="llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    hidden_size=576, intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048),
    # for the smoke test (tests/test_benchmarks.py), not for numbers
    "tiny": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=64, intermediate_size=128, vocab_size=512, max_position_embeddings=256),
}
MODES = {
    "forward": "1 forward only (ceiling)",
    "safetensors": "2 kvcore -> safetensors only",
    "kvcore": "3 kvcore -> safetensors + Parquet",
    "held": "3o kvcore before (tensors held to close)",
    "defaults": "3d kvcore, pyarrow's default Parquet options",
    "threads": "3t kvcore, torch's CPU threads left as they are",
    "naive": "4 naive (.cpu(), pyarrow per batch)",
    "json": "5 old nested JSON",
}
REPO = Path(__file__).resolve().parent.parent


class IdTokenizer:
    """Predictions need token text; random ids have none, so use the id itself."""

    def batch_decode(self, ids):
        return [str(i[0]) for i in ids]


def shape_config(shape: str):
    from transformers import AutoConfig

    params = dict(SHAPES[shape])
    return AutoConfig.for_model(params.pop("model_type"), **params)


def kv_geometry(shape: str) -> dict:
    """num_layers, num_kv_heads, head_dim, ... of a shape, without building its model."""
    from kvcore.model import kv_shape

    return kv_shape(shape_config(shape))


def build(shape: str, device: str, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device itself: seconds, not minutes, for 1B on a GPU
        return AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats, workdir=None):
    """Median seconds of fn(), or of fn(d) with a fresh directory d under `workdir`, made and
    removed outside the timed part (deleting gigabytes takes a while)."""
    times = []
    for _ in range(repeats):
        d = tempfile.mkdtemp(prefix="extract-bench-", dir=workdir) if workdir else None
        try:
            sync(device)
            start = time.perf_counter()
            fn(d) if d else fn()
            sync(device)
            times.append(time.perf_counter() - start)
        finally:
            if d:
                shutil.rmtree(d, ignore_errors=True)
    return statistics.median(times)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- one mode, in its own process ----------------------------------------------------------------

def child(args) -> dict:
    """Run one mode `args.repeats` times; print times, bytes written and peak RSS as JSON."""
    import pyarrow.parquet as pq

    from kvcore.extract import Extraction, extract_sequences, forward_cache, run_meta
    from kvcore.storage import ParquetSelection, ShardWriter, layer_table

    dtype = getattr(torch, args.dtype)
    model = build(args.shape, args.device, dtype)
    n_seq = args.batch * args.batches
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_seq, args.seq_len), generator=g)
    sequences = {i: ids[i].tolist() for i in range(n_seq)}
    plan = {i: args.seq_len for i in range(n_seq)}
    meta = run_meta(model, args.shape, "random", args.seq_len)
    tokens = n_seq * args.seq_len

    def batch_ids(b):
        return ids[b * args.batch:(b + 1) * args.batch].to(args.device)

    def forward_only(d):
        for b in range(args.batches):
            forward_cache(model, batch_ids(b))

    def extraction(selection, streamed):
        def run(d):
            writer = ShardWriter(d, 0, meta, seq_lengths=plan if streamed else None, selection=selection)
            extract_sequences(model, IdTokenizer(), sequences, writer, args.batch, 10, args.device)
            writer.close()
        return run

    def naive(d):
        for b in range(args.naive_batches):
            rows = [sequences[s] for s in range(b * args.batch, (b + 1) * args.batch)]
            _, keys, values = forward_cache(model, batch_ids(b))
            for layer, (k, v) in enumerate(zip(keys, values)):
                table = layer_table(k.float().cpu().numpy(), v.float().cpu().numpy(), list(range(len(rows))), rows)
                pq.write_table(table, f"{d}/l{layer}-b{b}.parquet")

    def old_json(d):
        # the old extractor: one text per call, the cache as nested lists in one JSON document
        for s in range(args.json_seqs):
            _, keys, values = forward_cache(model, ids[s:s + 1].to(args.device))
            ex = Extraction(tokens=[str(t) for t in sequences[s]], token_ids=sequences[s],
                            keys=[k[0].cpu() for k in keys], values=[v[0].cpu() for v in values],
                            prediction={}, meta=meta)
            with open(f"{d}/seq-{s}.json", "w") as fh:
                json.dump(ex.to_dict(max_elements=1 << 40), fh)

    workflow = extraction(ParquetSelection(), True)  # 3, and 3d / 3t with the patches below
    fns = {"forward": forward_only, "safetensors": extraction(ParquetSelection(layers=()), True),
           "kvcore": workflow, "held": extraction(ParquetSelection(), False), "defaults": workflow,
           "threads": workflow, "naive": naive, "json": old_json}
    if args.child == "defaults":  # the pipeline with the Parquet options kvcore used before issue 9's codec table
        import kvcore.storage

        kvcore.storage.parquet_options = lambda schema: dict(compression="zstd", write_statistics=True)
    if args.child == "threads":  # the pipeline without `host_threads_for_writers`
        import contextlib

        import kvcore.extract

        kvcore.extract.host_threads_for_writers = lambda device: contextlib.nullcontext()
    if args.child == "json":
        tokens = args.json_seqs * args.seq_len
    if args.child == "naive":
        tokens = args.batch * args.naive_batches * args.seq_len
    forward_cache(model, batch_ids(0))  # warm-up (kernels, allocator)
    sync(args.device)
    rss_before = peak_rss_mb()
    times, written = [], 0
    for r in range(args.repeats):
        d = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=args.dir))
        try:
            sync(args.device)
            start = time.perf_counter()
            fns[args.child](d)
            sync(args.device)
            times.append(time.perf_counter() - start)
            written = tree_bytes(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return {"mode": args.child, "tokens": tokens, "seconds": times, "median_s": statistics.median(times),
            "bytes_written": written, "rss_before_mb": rss_before, "rss_peak_mb": peak_rss_mb(),
            "kv_bytes_per_token": 2 * meta["num_layers"] * meta["num_kv_heads"] * meta["head_dim"]
            * torch.empty((), dtype=dtype).element_size(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
            "dtype": args.dtype}


def run_child(args, shape: str, mode: str, batches: int, repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--shape", shape, "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--batches",
           str(batches), "--repeats", str(repeats), "--json-seqs", str(args.json_seqs), "--dir", args.dir,
           "--naive-batches", str(min(args.naive_batches, batches))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{shape}/{mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # progress, and every raw result kept as it comes: a run cut short still leaves its numbers
    print(f"  [{shape}] {mode}, {batches} batches: median {result['median_s']:.2f} s, "
          f"{result['tokens'] / result['median_s']:.0f} tok/s, peak RSS {result['rss_peak_mb']:.0f} MB",
          file=sys.stderr, flush=True)
    RAW.append({"shape": shape, "batches": batches, **result})
    if args.json:
        Path(args.json + ".partial").write_text(json.dumps(RAW, indent=1) + "\n")
    return result


RAW: list[dict] = []


# ---- the disk ------------------------------------------------------------------------------------

def disk_write_speed(directory: str, megabytes: int, repeats: int) -> float:
    """Sequential write bytes/s of `megabytes` of random data (numpy tofile + fsync), median."""
    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, megabytes << 20, dtype=np.uint8)
    speeds = []
    for _ in range(repeats):
        fd, path = tempfile.mkstemp(prefix="extract-bench-disk-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                start = time.perf_counter()
                data.tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
                speeds.append(data.nbytes / (time.perf_counter() - start))
        finally:
            os.unlink(path)
    return statistics.median(speeds)


# ---- the Parquet codec table ---------------------------------------------------------------------

SCALARS = ["seq_id", "pos", "token_id", "head"]
VECTORS = ["key.list.element", "value.list.element"]
CODECS = [("pyarrow defaults (zstd)", dict(compression="zstd")),
          ("zstd level 1", dict(compression="zstd", compression_level=1)),
          ("zstd level 1, no vector dictionary", dict(compression="zstd", compression_level=1,
                                                      use_dictionary=SCALARS)),
          ("zstd, no vector dictionary, bss", dict(compression="zstd", use_dictionary=SCALARS,
                                                   use_byte_stream_split=VECTORS)),
          ("zstd level 1, no vector dictionary, bss", dict(compression="zstd", compression_level=1,
                                                           use_dictionary=SCALARS, use_byte_stream_split=VECTORS)),
          ("lz4, no vector dictionary, bss", dict(compression="lz4", use_dictionary=SCALARS,
                                                  use_byte_stream_split=VECTORS)),
          ("none, no vector dictionary", dict(compression="none", use_dictionary=SCALARS))]


def codec_table(args):
    """One layer's rows per codec/encoding: write MB/s, size, full read MB/s, a point lookup's ms.

    Two kinds of data: random normal float32 (a float32 model's cache, near incompressible)
    and the same rounded to bfloat16 (what a bf16 model's cache is, stored as float32: two
    zero bytes per value), plus float16 storage. The last row of each block is what
    `kvcore.storage.parquet_options` writes.
    """
    import pyarrow.parquet as pq

    from kvcore.storage import ROW_GROUP_ROWS, layer_table, parquet_options

    shape = args.shape[0]
    geo = kv_geometry(shape)
    n_kv, dim = geo["num_kv_heads"], geo["head_dim"]
    n_seq = args.batch * args.batches
    g = torch.Generator().manual_seed(0)
    k32, v32 = (torch.randn((n_seq, n_kv, args.seq_len, dim), generator=g) for _ in range(2))
    token_ids = torch.randint(0, 30000, (n_seq, args.seq_len), generator=g).tolist()
    # building the rows from a bf16 host batch: kvcore's one strided widening copy, against
    # torch's .float() followed by the rows' transpose copy
    kb, vb, seq_ids = k32.bfloat16(), v32.bfloat16(), list(range(n_seq))
    ours = timed(lambda: layer_table(kb, vb, seq_ids, token_ids), "cpu", args.repeats)
    torchs = timed(lambda: layer_table(kb.float().numpy(), vb.float().numpy(), seq_ids, token_ids), "cpu",
                   args.repeats)
    print(f"rows from bf16 host tensors: {ours * 1e3:.1f} ms (kvcore), {torchs * 1e3:.1f} ms (.float() first)")
    print(f"{shape}: one layer, {n_seq * n_kv * args.seq_len} rows, row groups of {ROW_GROUP_ROWS}; "
          f"write and read MB/s of the Arrow table's bytes, median of {args.repeats}")
    print(f"{'data':22s} {'codec':42s} {'write MB/s':>10s} {'size MB':>8s} {'ratio':>6s} {'read MB/s':>9s} "
          f"{'lookup ms':>9s}")
    blocks = [("float32 random", k32, v32, "float32"),
              ("bf16 values, float32", k32.bfloat16().float(), v32.bfloat16().float(), "float32"),
              ("bf16 values, float16", k32.bfloat16().float(), v32.bfloat16().float(), "float16")]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for label, k, v, storage in blocks:
            table = layer_table(k.numpy(), v.numpy(), list(range(n_seq)), token_ids, storage_dtype=storage)
            raw = table.nbytes
            codecs = [c for c in CODECS if storage == "float32" or "use_byte_stream_split" not in c[1]]
            for name, opts in codecs + [("kvcore (parquet_options)", parquet_options(table.schema))]:
                opts = {"write_statistics": True, **opts}
                path = f"{d}/t.parquet"
                w = timed(lambda: pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **opts), "cpu",
                          args.repeats)
                size = Path(path).stat().st_size
                r = timed(lambda: pq.read_table(path), "cpu", args.repeats)
                look = timed(lambda: pq.read_table(path, filters=[("seq_id", "=", n_seq // 2), ("pos", "=", 7),
                                                                  ("head", "=", 1)]), "cpu", args.repeats)
                print(f"{label:22s} {name:42s} {raw / w / 1e6:10.0f} {size / 1e6:8.1f} {raw / size:6.2f} "
                      f"{raw / r / 1e6:9.0f} {look * 1e3:9.1f}", flush=True)


# ---- the storage path alone, and a corpus end to end ---------------------------------------------

def encode_scaling(args, geo: dict) -> None:
    """N threads, each building and writing one layer's Parquet rows (6 times): does encoding scale?"""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    from kvcore.storage import layer_table, parquet_options

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn((args.batch, geo["num_kv_heads"], args.seq_len, geo["head_dim"]), generator=g)
            .to(getattr(torch, args.dtype)) for _ in range(2))
    ids = [list(range(args.seq_len))] * args.batch

    def table():
        return layer_table(k, v, list(range(args.batch)), ids)

    nbytes = table().nbytes
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        def job(i):
            for _ in range(6):
                t = table()
                pq.write_table(t, f"{d}/{i}.parquet", row_group_size=32768, **parquet_options(t.schema))
        print(f"{'encoding threads':>16s} {'MB/s of Arrow rows':>19s} {'per thread':>10s}")
        for n in args.workers:
            with ThreadPoolExecutor(n) as pool:
                start = time.perf_counter()
                list(pool.map(job, range(n)))
                seconds = time.perf_counter() - start
            print(f"{n:16d} {n * 6 * nbytes / seconds / 1e6:19.0f} {6 * nbytes / seconds / 1e6:10.0f}", flush=True)


def writer_scaling(args):
    """The storage path alone (no model): Parquet encoding with 1, 2, 4, ... threads, then ShardWriter
    fed one batch of random K/V on the device again and again, per writer count and batches in
    flight, with torch's CPU threads as extraction sets them and as they were."""
    import contextlib

    import pyarrow as pa

    from kvcore.extract import host_threads_for_writers
    from kvcore.storage import ParquetSelection, ShardWriter

    shape = args.shape[0]
    geo = kv_geometry(shape)
    print(f"{shape}, {args.dtype}, batch {args.batch} x {args.seq_len}; {os.cpu_count()} CPU cores")
    encode_scaling(args, geo)
    meta = {"model": shape, "dataset": "random", "seq_len": args.seq_len, "dtype": args.dtype, **geo}
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn((args.batch, geo["num_kv_heads"], args.seq_len, geo["head_dim"]), generator=g)
          .to(getattr(torch, args.dtype)).to(args.device) for _ in range(2 * geo["num_layers"])]
    keys, values = kv[::2], kv[1::2]
    ids = [[1] * args.seq_len] * args.batch
    n_seq = args.batch * args.batches
    plan = {i: args.seq_len for i in range(n_seq)}
    pred = pa.table({"seq_id": pa.array([0], pa.int32())})
    tokens = n_seq * args.seq_len
    print(f"\nShardWriter alone, K/V on {args.device}, {args.batches} batches, median of {args.repeats}")
    print(f"{'what':24s} {'torch threads':>13s} {'workers':>7s} {'pending':>7s} {'tok/s':>10s}")
    both, st_only, most = ParquetSelection(), ParquetSelection(layers=()), max(args.workers)
    configs = [("safetensors + Parquet", both, n, p, True) for n in args.workers for p in args.max_pending]
    configs += [("safetensors + Parquet", both, most, args.max_pending[0], False),
                ("safetensors only", st_only, most, args.max_pending[0], True)]
    for label, selection, workers, pending, as_extraction in configs:
        def run(d):
            threads = host_threads_for_writers(args.device) if as_extraction else contextlib.nullcontext()
            with threads:
                writer = ShardWriter(d, 0, meta, workers=workers, max_pending=pending, seq_lengths=plan,
                                     selection=selection)
                for b in range(args.batches):
                    writer.add(list(range(b * args.batch, (b + 1) * args.batch)), ids, keys, values, pred)
                writer.close()
        seconds = timed(run, args.device, args.repeats, args.dir)
        where = "as extraction" if as_extraction else "as they were"
        print(f"{label:24s} {where:>13s} {workers:7d} {pending:7d} {tokens / seconds:10.0f}", flush=True)


def end_to_end(args):
    """A corpus of `--e2e` tokens extracted as the workflow's extract job does (`extract_shard`:
    model loaded from disk, tokens.parquet read, one shard written, then `finalize_run`)."""
    import numpy as np
    import pyarrow.parquet as pq

    from kvcore.extract import extract_shard
    from kvcore.sources.models import build_tokenizer
    from kvcore.storage import finalize_run
    from kvcore.tokens import tokens_table

    shape = args.shape[0]
    n_seq = -(-args.e2e // args.seq_len)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        model_dir, run_dir = Path(d) / "model", Path(d) / "run"
        tokenizer = build_tokenizer()
        build(shape, args.device, getattr(torch, args.dtype)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the model built to be saved: extract_shard loads its own
        ids = np.random.default_rng(0).integers(0, len(tokenizer), (n_seq, args.seq_len)).tolist()
        pq.write_table(tokens_table(tokenizer, [(row, [0] * len(row)) for row in ids]), Path(d) / "tokens.parquet")
        start = time.perf_counter()
        extract_shard(model_dir, Path(d) / "tokens.parquet", run_dir, 0, n_seq, batch_size=args.batch,
                      device=args.device, dtype=args.dtype)
        finalize_run(run_dir, 1)
        seconds = time.perf_counter() - start
        written = tree_bytes(run_dir)
    tokens = n_seq * args.seq_len
    print(f"{shape} ({args.dtype}, {args.device}): {tokens} tokens ({n_seq} x {args.seq_len}, batch {args.batch}) "
          f"end to end in {seconds:.1f} s = {tokens / seconds:.0f} tok/s; {written / 1e9:.2f} GB written "
          f"({written / tokens:.0f} B/token, safetensors + Parquet)")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "tokens": tokens, "seconds": seconds,
                                               "bytes_written": written, "device": args.device}) + "\n")


# ---- the side-by-side table ----------------------------------------------------------------------

def bench_shape(args, shape: str, disk_bps: float) -> dict:
    # Repeats round-robin over the modes, each a fresh process: a load change on a shared machine
    # hits every mode alike instead of one mode's whole block.
    runs = {m: [] for m in args.modes}
    for _ in range(args.repeats):
        for m in args.modes:
            runs[m].append(run_child(args, shape, m, args.batches, 1))
    small = {}
    for m, rs in runs.items():
        times = [r["median_s"] for r in rs]
        small[m] = {**rs[0], "seconds": times, "median_s": statistics.median(times),
                    "rss_peak_mb": max(r["rss_peak_mb"] for r in rs)}
    rss = {n: {m: run_child(args, shape, m, n, 1)["rss_peak_mb"] for m in args.rss_modes}
           for n in args.rss_batches}
    out = {"shape": shape, "batches": args.batches, "rss_batches": args.rss_batches, "modes": {}}
    for m, r in small.items():
        tps = r["tokens"] / r["median_s"]
        out["modes"][m] = {"tokens_per_s": tps, "kv_gb_per_s": tps * r["kv_bytes_per_token"] / 1e9,
                           "written_bytes_per_token": r["bytes_written"] / r["tokens"],
                           "written_gb_per_s": r["bytes_written"] / r["median_s"] / 1e9,
                           "rss_peak_mb_timed_run": r["rss_peak_mb"], "rss_before_mb": r["rss_before_mb"],
                           "rss_peak_mb_by_batches": {n: rss[n].get(m) for n in args.rss_batches},
                           "tokens": r["tokens"], "seconds": r["seconds"]}
    t = {m: v["tokens_per_s"] for m, v in out["modes"].items()}
    pairs = {"2/1": ("safetensors", "forward"), "3/1": ("kvcore", "forward"), "3/4": ("kvcore", "naive"),
             "3/5": ("kvcore", "json"), "3/3o": ("kvcore", "held"), "3/3d": ("kvcore", "defaults"),
             "3/3t": ("kvcore", "threads")}
    out["ratios"] = {k: t[a] / t[b] for k, (a, b) in pairs.items() if a in t and b in t}
    out["limits"] = {}
    for m in [m for m in ("safetensors", "kvcore") if m in t and "forward" in t]:
        per_token = out["modes"][m]["written_bytes_per_token"]
        limit = min(t["forward"], disk_bps / per_token)
        out["limits"][m] = {"bytes_per_token": per_token, "disk_tokens_per_s": disk_bps / per_token,
                            "L_tokens_per_s": limit, "achieved_over_L": t[m] / limit}
    first = next(iter(small.values()))
    out.update(device=first["device"], dtype=first["dtype"], kv_bytes_per_token=first["kv_bytes_per_token"])
    return out


def print_shape(args, r: dict, disk_bps: float) -> None:
    print(f"\n{r['shape']} on {r['device']}, {r['dtype']}, batch {args.batch} x {args.seq_len}, "
          f"{args.batch * args.batches * args.seq_len} tokens per run ({args.json_seqs} sequences for mode 5), "
          f"median of {args.repeats}; peak RSS (MB) of runs of {' and '.join(map(str, r['rss_batches']))} batches")
    print(f"{'mode':46s} {'tok/s':>10s} {'KV GB/s':>8s} {'disk GB/s':>9s} {'B/token':>8s} "
          + " ".join(f"{'RSS @' + str(n):>9s}" for n in r["rss_batches"]))
    for m, v in r["modes"].items():
        cells = " ".join(f"{x:9.0f}" if x is not None else f"{'-':>9s}" for x in v["rss_peak_mb_by_batches"].values())
        print(f"{MODES[m]:46s} {v['tokens_per_s']:10.0f} {v['kv_gb_per_s']:8.3f} {v['written_gb_per_s']:9.3f} "
              f"{v['written_bytes_per_token']:8.0f} {cells}")
    print("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in r["ratios"].items()))
    for m, lim in r["limits"].items():
        print(f"limit for {MODES[m][:1]} ({m}): L = min(forward {r['modes']['forward']['tokens_per_s']:.0f}, "
              f"disk {disk_bps / 1e6:.0f} MB/s / {lim['bytes_per_token']:.0f} B/token = "
              f"{lim['disk_tokens_per_s']:.0f}) = {lim['L_tokens_per_s']:.0f} tok/s; "
              f"{MODES[m][:1]}/L = {lim['achieved_over_L']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", choices=SHAPES, default=["gpt2", "tinyllama"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, default=4, help="batches per extraction run (one shard)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-batches", type=int, nargs=2, metavar=("N", "M"),
                    help="the two run sizes (batches) whose peak RSS is compared (default: 2x and 4x --batches)")
    ap.add_argument("--naive-batches", type=int,
                    help="batches run by mode 4 (slow; default --batches: fewer flatter it, its writes then "
                         "stay in the page cache)")
    ap.add_argument("--json-seqs", type=int, default=2, help="sequences written by mode 5 (nested JSON is huge)")
    ap.add_argument("--disk-mb", type=int, default=1024, help="MB written to measure the disk")
    ap.add_argument("--dir", default=".", help="where outputs (and the disk test) are written")
    ap.add_argument("--json", metavar="PATH", help="write every number here")
    ap.add_argument("--codecs", action="store_true", help="only the Parquet codec table (no model)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=[m for m in MODES if m != "held"],
                    help="modes to time (default: all but 3o)")
    ap.add_argument("--rss-modes", nargs="*", choices=MODES, default=["safetensors", "kvcore"],
                    help="modes whose peak RSS is measured at the two --rss-batches sizes")
    ap.add_argument("--writer-scaling", action="store_true",
                    help="only the storage path alone (no model): encoding threads, then ShardWriter configurations")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="encoding threads / writer threads tried by --writer-scaling")
    ap.add_argument("--max-pending", type=int, nargs="+", default=[2],
                    help="batches in flight tried by --writer-scaling")
    ap.add_argument("--e2e", type=int, metavar="TOKENS",
                    help="only: a corpus of TOKENS tokens extracted end to end as the workflow's extract job does")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.rss_batches = args.rss_batches or [2 * args.batches, 4 * args.batches]
    args.naive_batches = args.naive_batches or args.batches
    if args.codecs:
        return codec_table(args)
    if args.writer_scaling:
        return writer_scaling(args)
    if args.e2e:
        return end_to_end(args)
    if args.child:
        args.shape = args.shape[0]
        print(json.dumps(child(args)))
        return
    disk_bps = disk_write_speed(args.dir, args.disk_mb, args.repeats)
    print(f"disk under {Path(args.dir).resolve()}: {disk_bps / 1e6:.0f} MB/s sequential write "
          f"({args.disk_mb} MB, numpy tofile + fsync, median of {args.repeats}); {os.cpu_count()} CPU cores")
    results = []
    for shape in args.shape:
        r = bench_shape(args, shape, disk_bps)
        print_shape(args, r, disk_bps)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "disk_bytes_per_s": disk_bps,
                                               "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                               "shapes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
