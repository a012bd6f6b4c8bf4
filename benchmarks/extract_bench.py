"""Extraction throughput against the forward pass alone, side by side in one run.

    python benchmarks/extract_bench.py --shape tinyllama --device cuda --batch 8 --seq-len 512 --batches 6

Random-weight models built from a config (no hub): `gpt2` (GPT-2 small) and `tinyllama`
(TinyLlama-1.1B shape). Prints medians over repeats, tokens/s, and ratios to forward-only.
Modes: forward only (the ceiling); kvcore's extraction (safetensors + Parquet, the
workflow's writer); a naive extractor (forward, .cpu(), one pyarrow table written per batch).

    python benchmarks/extract_bench.py --codecs --shape tinyllama --batch 8 --seq-len 512

writes one layer's rows of that batch with each Parquet codec/encoding tried (no model) and
prints write speed, file size and a point lookup's time: the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
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
}


class IdTokenizer:
    """Predictions need token text; random ids have none, so use the id itself."""

    def batch_decode(self, ids):
        return [str(i[0]) for i in ids]


def build(shape: str, device: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


CODECS = [("zstd (default level)", dict(compression="zstd")),
          ("zstd level 1", dict(compression="zstd", compression_level=1)),
          ("zstd level 1 + byte_stream_split", dict(compression="zstd", compression_level=1,
                                                    use_byte_stream_split=["key.list.element",
                                                                           "value.list.element"])),
          ("lz4", dict(compression="lz4")),
          ("snappy", dict(compression="snappy")),
          ("none", dict(compression="none"))]


def codec_table(args):
    """One layer's rows (random normal K/V as a model writes them) per codec: write MB/s, size, lookup ms."""
    import numpy as np
    import pyarrow.parquet as pq

    from kvcore.storage import ROW_GROUP_ROWS, layer_table

    cfg = SHAPES[args.shape]
    n_kv = cfg.get("num_key_value_heads", cfg.get("n_head"))
    dim = (cfg.get("hidden_size") or cfg["n_embd"]) // (cfg.get("num_attention_heads") or cfg["n_head"])
    n_seq = args.batch * args.batches
    rng = np.random.default_rng(0)
    k = rng.standard_normal((n_seq, n_kv, args.seq_len, dim), dtype=np.float32)
    v = rng.standard_normal((n_seq, n_kv, args.seq_len, dim), dtype=np.float32)
    table = layer_table(k, v, list(range(n_seq)), rng.integers(0, 30000, (n_seq, args.seq_len)).tolist())
    raw = table.nbytes
    print(f"{args.shape}: one layer, {table.num_rows} rows, {raw / 1e6:.1f} MB in Arrow, row groups of {ROW_GROUP_ROWS}")
    print(f"{'codec':36s} {'write MB/s':>10s} {'size MB':>8s} {'ratio':>6s} {'lookup ms':>9s}")
    with tempfile.TemporaryDirectory(dir=".") as d:
        for name, opts in CODECS:
            path = f"{d}/t.parquet"
            w = timed(lambda: pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, write_statistics=True,
                                             **opts), "cpu", args.repeats)
            size = Path(path).stat().st_size
            look = timed(lambda: pq.read_table(path, filters=[("seq_id", "=", n_seq // 2), ("pos", "=", 7),
                                                              ("head", "=", 1)]), "cpu", args.repeats)
            print(f"{name:36s} {raw / w / 1e6:10.0f} {size / 1e6:8.1f} {raw / size:6.2f} {look * 1e3:9.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, default=4, help="batches per extraction run (one shard)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codecs", action="store_true", help="only the Parquet codec table (no model)")
    args = ap.parse_args()
    if args.codecs:
        return codec_table(args)

    from kvcore.extract import extract_sequences, forward_cache, run_meta
    from kvcore.storage import ShardWriter, layer_table

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                            else torch.float32)
    model = build(args.shape, args.device, dtype)
    n_seq = args.batch * args.batches
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_seq, args.seq_len), generator=g)
    sequences = {i: ids[i].tolist() for i in range(n_seq)}
    tokens = n_seq * args.seq_len
    meta = run_meta(model, args.shape, "random", args.seq_len)

    def forward_only():
        for b in range(args.batches):
            forward_cache(model, ids[b * args.batch:(b + 1) * args.batch].to(args.device))

    def ours():
        with tempfile.TemporaryDirectory(dir=".") as d:
            writer = ShardWriter(Path(d), 0, meta)
            extract_sequences(model, IdTokenizer(), sequences, writer, args.batch, 10, args.device)
            writer.close()

    def naive():
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory(dir=".") as d:
            for b in range(args.batches):
                rows = [sequences[s] for s in range(b * args.batch, (b + 1) * args.batch)]
                _, keys, values = forward_cache(model, ids[b * args.batch:(b + 1) * args.batch].to(args.device))
                for layer, (k, v) in enumerate(zip(keys, values)):
                    table = layer_table(k.float().cpu().numpy(), v.float().cpu().numpy(),
                                        list(range(len(rows))), rows)
                    pq.write_table(table, f"{d}/l{layer}-b{b}.parquet")

    forward_only()  # warm-up (CUDA kernels, allocator)
    results = {}
    for name, fn in [("forward only", forward_only), ("kvcore extract (safetensors+parquet)", ours),
                     ("naive (.cpu(), pyarrow per batch)", naive)]:
        results[name] = tokens / timed(fn, args.device, args.repeats)
    kv_bytes_per_token = 2 * meta["num_layers"] * meta["num_kv_heads"] * meta["head_dim"] * model.dtype.itemsize
    name_dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{args.shape} on {name_dev}, {model.dtype}, batch {args.batch} x {args.seq_len}, "
          f"{tokens} tokens per run, median of {args.repeats}")
    ceiling = results["forward only"]
    print(f"{'mode':40s} {'tokens/s':>12s} {'KV GB/s':>9s} {'vs forward':>11s}")
    for name, tps in results.items():
        print(f"{name:40s} {tps:12.0f} {tps * kv_bytes_per_token / 1e9:9.3f} {tps / ceiling:11.3f}")


if __name__ == "__main__":
    main()
