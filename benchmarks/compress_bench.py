"""Throughput of kvcore.compress against the ceiling of a plain tensor copy.

For a SmolLM2-135M-sized cache (per layer [8 seq, 3 KV heads, 1024 tokens, 64] float16,
K and V, a few layers) this times, per method, medians over repeats:
  compress    quantize + bit-pack        (Method.compress)
  decompress  unpack + dequantize        (Method.decompress)
  fake        the fused simulation       (Method.fake, what perplexity runs)
and two ceilings over the same tensors in the same run: `x.clone()` (allocates) and a
device-to-device copy into preallocated buffers (`dst.copy_(x)`, the memory-speed floor of
any pass that reads the tensor and writes one the same size). GB/s counts the bytes of the
uncompressed tensors in the model dtype, for every column alike; x/copy is against the copy.
On CUDA, int2/int4/int8 go through the Triton kernels (kvcore.compress.kernels).

    python benchmarks/compress_bench.py --device cpu
    python benchmarks/compress_bench.py --device cuda --layers 8 --repeats 20
    # a TinyLlama-1.1B-shaped layer of the issue-18 run (128 sequences x 4 KV heads x 1024 tokens)
    python benchmarks/compress_bench.py --device cuda --shape 128,4,1024,64 --dtype bfloat16 --layers 4 \
        --methods kivi4-g64,int4-g64,kivi2-g32,int8 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from kvcore.compress import kernels, parse_method

usable = kernels.usable

DEFAULT_METHODS = "int8,int4-g64,int4-g64-sym,int3-g64,int2-g32,kivi4-g64,kivi2-g32-r128,int4-g64-o0.01,sparse-0.5"


def heavy(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) / torch.randn(shape, generator=g).abs().clamp_min(0.3).sqrt()
    x[..., [3, 40]] *= 20  # outlier channels, as real keys have
    return x.to(dtype).to(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats`, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated preset names")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", default="8,3,1024,64", help="per-layer n_seq,n_kv,seq,dim")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", metavar="METHOD", help="also print torch.profiler's top ops for one method")
    ap.add_argument("--torch-ops", action="store_true",
                    help="also time each method with the Triton kernels off (its torch ops alone)")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    tensors = [(kind, heavy(shape, dtype, device, 2 * i + j))
               for i in range(args.layers) for j, kind in enumerate(("key", "value"))]
    nbytes = sum(x.numel() * x.element_size() for _, x in tensors)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")
    print(f"device: {where}; torch {torch.__version__}")
    print(f"data: {args.layers} layers x K,V x {list(shape)} {args.dtype} = {nbytes / 1e6:.1f} MB; "
          f"median of {args.repeats}")

    clone_gbs = nbytes / timed(lambda: [x.clone() for _, x in tensors], device, args.repeats) / 1e9
    targets = [torch.empty_like(x) for _, x in tensors]
    copy_gbs = nbytes / timed(lambda: [t.copy_(x) for t, (_, x) in zip(targets, tensors)], device, args.repeats) / 1e9
    del targets
    print(f"ceilings: x.clone() {clone_gbs:.2f} GB/s; device-to-device copy_ {copy_gbs:.2f} GB/s "
          f"(= {2 * copy_gbs:.0f} GB/s read + written)\n")

    head = f"{'method':<18}{'bits/el':>8}{'compress':>10}{'decomp':>10}{'fake':>10}{'c/copy':>9}{'d/copy':>9}{'f/copy':>9}"
    print(head + "\n" + "-" * len(head))
    runs = [(name, False) for name in args.methods.split(",")]
    if args.torch_ops:
        runs = [run for name, _ in runs for run in ((name, False), (name, True))]
    for name, torch_ops in runs:
        method = parse_method(name)
        kernels.usable = (lambda x, bits: False) if torch_ops else usable
        label = f"{name} (torch)" if torch_ops else name
        packed = [(kind, method.compress(x, kind)) for kind, x in tensors]
        stored = sum(t.numel() * t.element_size() for _, p in packed for t in p.values())
        bits = 8 * stored / sum(x.numel() for _, x in tensors)
        c = nbytes / timed(lambda: [method.compress(x, k) for k, x in tensors], device, args.repeats) / 1e9
        d = nbytes / timed(lambda: [method.decompress(p, k) for k, p in packed], device, args.repeats) / 1e9
        f = nbytes / timed(lambda: [method.fake(x, k) for k, x in tensors], device, args.repeats) / 1e9
        print(f"{label:<18}{bits:>8.3f}{c:>10.2f}{d:>10.2f}{f:>10.2f}"
              f"{c / copy_gbs:>9.3f}{d / copy_gbs:>9.3f}{f / copy_gbs:>9.3f}")
    kernels.usable = usable
    print("\nGB/s of uncompressed bytes; x/copy = fraction of the copy_ ceiling.")
    if args.profile:
        profile(parse_method(args.profile), tensors, device)


def profile(method, tensors, device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    packed = [(k, method.compress(x, k)) for k, x in tensors]
    for label, fn in (("compress", lambda: [method.compress(x, k) for k, x in tensors]),
                      ("decompress", lambda: [method.decompress(p, k) for k, p in packed]),
                      ("fake", lambda: [method.fake(x, k) for k, x in tensors])):
        fn()
        with torch_profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"\n{method.name} {label}, one pass over all tensors:")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


if __name__ == "__main__":
    main()
