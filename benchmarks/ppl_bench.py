"""Perplexity under compression, side by side: our methods, eviction scorers and transformers'
QuantizedCache (quanto backend), on one model and corpus, in one process.

One prefill per window serves every method (kvcore.evaluation.protocols.evaluate_methods), so the
baseline, ours and the peers are timed on the same device in the same job. Writes one JSON
per protocol under --out, rewritten after every window with the per-window numbers so far (the
summary is computed from those alone), so `--resume` continues a run that was stopped;
benchmarks/ppl_table.py turns them into the markdown table.

    .venv/bin/python benchmarks/ppl_bench.py --max-tokens 8192 --out results/bench/lee
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RATIOS = (0.5, 0.25)
# kvpress's settings: KVzip 4 sinks and one threshold over all layers and heads (budget
# model); SnapKV protects its 64-token window; StreamingLLM and the random floor keep 4 sinks.
EVICTION = {
    "kvzip": "evict-kvzip-{r}-s4-model",
    "snapkv": "evict-snapkv-{r}",
    "h2o": "evict-h2o-{r}",
    "streamingllm": "evict-streamingllm-{r}-s4",
    "knorm": "evict-knorm-{r}",
    "random": "evict-random-{r}-s4",
}
EVICTION_EXTRA = ["evict-kvzip-{r}-s4"]  # ablation: a uniform per-head budget
# KIVI-style: keys per channel, values per token, min-max asymmetric, float16 scale + zero
QUANT = ["kivi4-g64", "kivi4-g32", "kivi3-g64", "kivi2-g32", "kivi2-g64"]
# levers: sinks kept exact, a dense-and-sparse outlier store, keys quantized before RoPE
LEVERS = ["kivi2-g64-s4", "kivi2-g64-o0.005", "kivi2-g64-s4-o0.005", "kivi3-g64-s4", "kivi2-g32-s4",
          "kivi3-g64-s1", "kivi2-g64-s1"]
PRE_ROPE = ["kivi2-g64-s4", "kivi3-g64-s4", "kivi4-g64", "kivi3-g64-s1", "kivi2-g64-s1", "kivi2-g64-s4-o0.005"]  # also run with pre-RoPE keys, named +prerope


class QuantoPeer:
    """transformers' QuantizedCache (quanto backend) holding the prefilled context.

    It quantizes every context token, as our methods do (prefill-compress prefills the whole
    context: 512 tokens x 3 KV heads divide every group size used here), and its size is
    counted under our one bits convention through the kvcore method that stores the same
    thing (`size_method`: codes + a float16 scale and zero per group)."""

    def __init__(self, bits: int, group: int, axis_key: int, axis_value: int):
        from kvcore.compress import parse_method

        self.bits, self.group, self.axis_key, self.axis_value = bits, group, axis_key, axis_value
        axes = "" if (axis_key, axis_value) == (-1, 0) else "-tok"
        self.size_method = parse_method(f"{'kivi' if not axes else 'int'}{bits}-g{group}{axes}")

    def build_cache(self, model, keys, values, recorder):
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model.config, nbits=self.bits, axis_key=self.axis_key,
                               axis_value=self.axis_value, q_group_size=self.group,
                               # the scored forward reads what update() returns before any
                               # re-quantization: a long residual keeps quanto from re-grouping
                               residual_length=1 << 30)
        for i, (k, v) in enumerate(zip(keys, values)):
            if (k.shape[1] * k.shape[2]) % self.group and self.axis_key != 0:
                raise ValueError(f"quanto groups keys over (head, token): {k.shape[1]} x {k.shape[2]} tokens "
                                 f"do not divide into groups of {self.group}")
            cache.update(k, v, i)  # the prefill: quantized whole
            layer = cache.layers[i]
            # what the scored forward will read back (quanto's own dequantization)
            recorder.add(self.size_method, k, layer._dequantize(layer._quantized_keys), "key", i)
            recorder.add(self.size_method, v, layer._dequantize(layer._quantized_values), "value", i)
        return cache


def calibrated_spec(name: str, calibration: str | None) -> dict:
    """The spec of preset `name`, its Lloyd-Max levels / mixed precision calibrated on the
    extracted run `calibration` (another corpus's); other presets' specs unchanged."""
    from kvcore.compress import preset_spec

    spec = preset_spec(name)
    quant = spec["then"] if spec["family"] == "compose" else spec
    if quant.get("levels") == "lloyd" or quant.get("mixed_bits"):
        if not calibration:
            raise SystemExit(f"method {name!r} needs --calibration (an extracted run of another corpus)")
        quant["calibration"] = calibration
    return spec


def calibrated(name: str, calibration: str | None):
    from kvcore.compress import parse_method

    return parse_method(name, calibrated_spec(name, calibration))


def quanto_unpack(packed, bits: int):
    """quanto's default (pure-torch) unpack, as in optimum/quanto/library/unpack.py (whose decorated
    name is not importable): value i of each byte is (byte & mask_i) >> (bits * i), the parts
    concatenated along dim 0."""
    import torch

    parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)


def quanto_torch_unpack() -> None:
    """On CUDA, quanto unpacks its 2/4-bit codes with a C++/CUDA extension that it compiles on first
    use (nvcc over all its Marlin and AWQ kernels too: minutes on a fresh machine); its own
    pure-torch algorithm (the same integers) serves instead, so a GPU visit spends no time compiling."""
    import types

    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if is_extension_available("quanto_cuda"):
        get_extension("quanto_cuda")._lib = types.SimpleNamespace(unpack=quanto_unpack)


def quanto_peers() -> dict:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        print("optimum-quanto is not installed: no QuantizedCache peers", file=sys.stderr)
        return {}
    quanto_torch_unpack()
    peers = {f"quanto{b}-g{g}": QuantoPeer(b, g, -1, 0) for b, g in ((4, 64), (4, 32), (2, 32), (2, 64))}
    peers.update({f"quanto{b}-g64-tok": QuantoPeer(b, 64, 0, 0) for b in (4, 2)})  # default axes: per token
    return peers


def latency(model, tokenizer, ids, max_length, stride, repeats, device) -> dict:
    """Median time of the scored forward (stride tokens against a compressed context) per cache
    variant, run interleaved `repeats` times on the first window: steadier than per-window
    timings on a shared machine. Eviction with a uniform budget and whole-layer pruning
    shrink the cache physically; a global budget pads and masks; quantization keeps the size."""
    import statistics

    import torch

    from kvcore.compress import parse_method
    from kvcore.evaluation.attention import PassState, attention_pass
    from kvcore.evaluation.cache import cache_from
    from kvcore.evaluation.context import compress_context
    from kvcore.evaluation.options import check_options
    from kvcore.evaluation.prefill import make_scorers, prefill_context
    from kvcore.evaluation.timing import Timer
    from kvcore.model import kv_shape

    window = torch.tensor([ids[:max_length]], device=device)
    n_ctx = max_length - stride
    ctx, feed = window[:, :n_ctx], window[:, n_ctx:max_length - 1]
    pos = torch.arange(n_ctx, n_ctx + feed.shape[1], device=device)[None]
    opts = check_options(None)
    layers = kv_shape(model.config)["num_layers"]
    names = ["none", "kivi4-g64", "evict-kvzip-0.5-s4", "evict-kvzip-0.25-s4", "evict-kvzip-0.5-s4-model",
             f"prune-l{','.join(str(i) for i in range(0, layers, 2))}"]
    methods = {name: parse_method(name) for name in names}
    scorers = make_scorers(methods.values(), opts, tokenizer)
    with torch.inference_mode():
        pre = prefill_context(model, ctx, scorers, opts, tokenizer)
    variants, scores = {}, {}
    for name, method in methods.items():
        variants[name] = compress_context(method, pre, scorers, opts, scores=scores)
    times = {name: [] for name in ["none (transformers sdpa)", *names]}
    with torch.inference_mode():
        for _ in range(repeats):
            for name in times:
                if name.startswith("none (transformers"):
                    c = cache_from(model, pre.keys, pre.values)
                    with Timer(device) as t:
                        model(input_ids=feed, past_key_values=c, use_cache=True, position_ids=pos)
                else:
                    c = variants[name].cache(model)
                    with Timer(device) as t, attention_pass(model, PassState(hidden=variants[name].hidden)):
                        model(input_ids=feed, past_key_values=c, use_cache=True, position_ids=pos)
                times[name].append(t.seconds)
    base = statistics.median(times["none"])
    return {name: {"median_seconds": statistics.median(ts), "vs_baseline": statistics.median(ts) / base,
                   "cached_tokens": (sum(int(k.shape[2]) for k in variants[name].keys) / layers
                                     if name in variants else n_ctx), "all_seconds": ts}
            for name, ts in times.items()}


# what a file continued with --resume must share with the run continuing it
RESUME_KEYS = ("model", "dataset", "n_tokens", "token_ids_sha256", "protocol", "layout", "max_length", "stride",
               "n_windows_total", "methods", "dtype", "device")


def save_levels(path) -> int:
    """levels.save_levels under a temporary name: a run killed while writing leaves the old file."""
    from kvcore.atomic import atomic_path
    from kvcore.compress import levels

    with atomic_path(path) as tmp:
        count = levels.save_levels(tmp)
    return count


def done_windows(path: Path, meta: dict, resume: bool) -> dict:
    """window index -> its numbers, from the file a run before this one left at `path`."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        old = data["meta"]
        windows = {w["index"]: w for w in data["windows"]} if resume else {}
        unfinished = old.get("n_windows_done", 0) < old.get("n_windows_total", 0)
    except (OSError, ValueError, KeyError, TypeError) as error:
        if not resume:
            return {}  # not a file of this bench's unfinished runs: written over, as before
        raise SystemExit(f"kvcore: error: --resume: {path} is not a ppl_bench.py result with per-window numbers "
                         f"({error!r}); name another --out or --suffix") from None
    if not resume:
        if unfinished:
            raise SystemExit(f"kvcore: error: {path} holds {old['n_windows_done']} of {old['n_windows_total']} "
                             "windows of an unfinished run: pass --resume to continue it, or remove it")
        return {}  # a finished run's file: measured again, as before
    wrong = [key for key in RESUME_KEYS if old.get(key) != meta[key]]
    if wrong:
        raise SystemExit(f"kvcore: error: --resume: {path} was run with another {wrong[0]} "
                         f"({old.get(wrong[0])!r}, this run {meta[wrong[0]]!r}); name another --out or --suffix")
    return windows


def window_numbers(run: dict, index: int, seconds: float) -> dict:
    """What one window of `evaluate_methods` leaves for the summary: every NLL sum, time and metric part."""
    return {"index": index, "seconds": seconds, "baseline": run["baseline"]["windows"][0],
            "methods": {name: {"window": r["windows"][0], "metric_parts": r["metric_parts"]}
                        for name, r in run["methods"].items()}}


def bench_result(meta: dict, windows: list[dict], peers: set, settings: dict) -> dict:
    """The JSON of a protocol from its per-window numbers alone (an interrupted and resumed run
    gives the same records as one uninterrupted run): records as kvcore.evaluation.records."""
    from kvcore.evaluation.records import protocol_record, run_from_windows

    run = run_from_windows(meta["protocol"], meta["layout"], meta["token_ids_sha256"], [w["baseline"] for w in windows],
                           {name: ([w["methods"][name]["window"] for w in windows],
                                   [p for w in windows for p in w["methods"][name]["metric_parts"]])
                            for name in meta["methods"]})
    records = {"baseline": protocol_record(run, None, method="baseline", **settings)}
    for name in meta["methods"]:
        records[name] = protocol_record(run, name, method=name, **settings)
        if name in peers:
            records[name]["peer"] = "transformers QuantizedCache (optimum-quanto)"
    meta = meta | {"seconds": sum(w["seconds"] for w in windows), "n_windows_done": len(windows)}
    return {"meta": meta, "records": records, "windows": windows}


def run_protocol(path: Path, meta: dict, methods: dict, args, settings: dict, evaluate) -> None:
    """Evaluate the windows not yet in `path` one at a time (`evaluate([i])`), rewriting `path`
    after each, so a run killed at its time limit keeps every finished window."""
    from kvcore.atomic import write_json
    from kvcore.compress import levels
    from kvcore.evaluation.windows import layout_windows

    n_windows = len(layout_windows(meta["n_tokens"], args.max_length, args.stride, args.layout))
    meta = meta | {"n_windows_total": n_windows}
    done = done_windows(path, meta, args.resume)
    todo = [i for i in range(n_windows) if i not in done][:args.stop_after]
    peers = {name for name, m in methods.items() if isinstance(m, QuantoPeer)}
    saved_levels = len(levels.FITTED)
    for i in todo:
        started = time.perf_counter()
        done[i] = window_numbers(evaluate([i]), i, time.perf_counter() - started)
        write_json(path, bench_result(meta, [done[j] for j in sorted(done)], peers, settings))
        if args.levels and len(levels.FITTED) > saved_levels:  # fitted once: a resumed run need not refit
            saved_levels = save_levels(args.levels)
        print(f"{path}: window {i + 1} of {n_windows} ({done[i]['seconds']:.0f} s), {len(done)} done",
              file=sys.stderr)
    if not todo:
        print(f"{path}: all {n_windows} windows already done", file=sys.stderr)
    elif len(done) == n_windows:
        print(f"wrote {path} ({sum(w['seconds'] for w in done.values()):.0f} s)", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resources/models/smollm2-135m")
    p.add_argument("--dataset", default="resources/datasets/lee-news/text.parquet")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--layout", default="chunks", choices=["chunks", "sliding"])
    p.add_argument("--protocols", default="prefill-compress,fake-quant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="only kvzip/streamingllm/random and 2 quant methods")
    p.add_argument("--methods", help="only these presets, comma-separated (NAME+prerope: keys quantized before "
                                     "RoPE; quanto{B}-g{G}[-tok]: a QuantizedCache peer)")
    p.add_argument("--calibration", help="run directory of an extracted cache of ANOTHER corpus: calibrates "
                                          "the methods with Lloyd-Max levels (-nuq) or mixed precision (-mx)")
    p.add_argument("--levels", metavar="FILE",
                   help="fitted Lloyd-Max tables (kvcore.compress.levels.save_levels): read from FILE when it "
                        "exists, so they are not fitted again (the calibration cache need not be there), and "
                        "written back with any fitted in this run")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="instead: time the scored forward of the first window N times per cache variant")
    p.add_argument("--out", required=True, help="folder for {protocol}{suffix}.json")
    p.add_argument("--suffix", default="", help="appended to the output file names, e.g. -levers")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished {protocol}{suffix}.json files under --out (written after every "
                        "window): their windows are not run again; refused where their settings differ")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop each protocol after N more windows (its file is continued with --resume)")
    args = p.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        p.error("--stop-after must be at least 1")

    import torch

    from kvcore.compress import levels, parse_method
    from kvcore.model import load_model
    from kvcore.compress.bits import LABEL
    from kvcore.evaluation.perplexity import eval_token_ids
    from kvcore.evaluation.nll import token_ids_sha256
    from kvcore.evaluation.protocols import evaluate_methods
    from kvcore.sources.datasets import joined_text

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.levels and Path(args.levels).exists():
        print(f"{levels.load_levels(args.levels)} level tables from {args.levels}", file=sys.stderr)
    model, tokenizer, device = load_model(args.model, args.device, args.dtype)
    ids = eval_token_ids(tokenizer, joined_text(args.dataset), args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = str(model.dtype).replace("torch.", "")
    settings = dict(max_length=args.max_length, stride=args.stride, dtype=dtype, threshold=0.5)

    if args.latency:
        result = {"meta": {"model": args.model, "device": device, "dtype": dtype, "max_length": args.max_length,
                           "stride": args.stride, "repeats": args.latency, "torch_threads": torch.get_num_threads(),
                           "command": " ".join([sys.executable.split("/")[-1], *sys.argv])},
                  "variants": latency(model, tokenizer, ids, args.max_length, args.stride, args.latency, device)}
        path = out / f"latency{args.suffix}.json"
        path.write_text(json.dumps(result, indent=1))
        for name, r in result["variants"].items():
            print(f"{name:<28} {r['cached_tokens']:>7.1f} cached  {r['median_seconds'] * 1000:>9.1f} ms  "
                  f"{r['vs_baseline']:.2f}x")
        return 0

    evict = {}
    scorers = ["kvzip", "streamingllm", "random"] if args.quick else list(EVICTION)
    for r in RATIOS:
        evict.update({EVICTION[s].format(r=r): parse_method(EVICTION[s].format(r=r)) for s in scorers})
        if not args.quick:
            evict.update({m.format(r=r): parse_method(m.format(r=r)) for m in EVICTION_EXTRA})
    quant_names = QUANT[:1] + QUANT[3:4] if args.quick else QUANT + LEVERS
    quant = {n: parse_method(n) for n in quant_names}
    if not args.quick:
        quant.update({f"{n}+prerope": parse_method(n) for n in PRE_ROPE})
    pre_rope = [f"{n}+prerope" for n in PRE_ROPE]

    if args.methods:
        names = args.methods.split(",")
        pre_rope = [n for n in names if n.endswith("+prerope")]
        peers = quanto_peers()
        chosen = {n: peers[n] if n in peers else calibrated(n.removesuffix("+prerope"), args.calibration)
                  for n in names}

    for protocol in args.protocols.split(","):
        methods = dict(quant)
        if args.methods:
            methods = {n: m for n, m in chosen.items() if protocol == "prefill-compress" or n not in peers}
        elif protocol == "prefill-compress":
            peers = quanto_peers()
            methods = {**evict, **methods, **peers}
        meta = {"model": args.model, "dataset": args.dataset, "n_tokens": len(ids), "protocol": protocol,
                "layout": args.layout, "max_length": args.max_length, "stride": args.stride, "device": device,
                "dtype": dtype, "methods": list(methods), "torch_threads": torch.get_num_threads(), "bits": LABEL,
                "token_ids_sha256": token_ids_sha256(ids),
                "command": " ".join([sys.executable.split("/")[-1], *sys.argv])}
        run_protocol(out / f"{protocol}{args.suffix}.json", meta, methods, args, settings,
                     lambda selected: evaluate_methods(
                         model, ids, methods, protocol=protocol, max_length=args.max_length, stride=args.stride,
                         layout=args.layout, tokenizer=tokenizer, device=device, selected=selected,
                         options={"pre_rope": pre_rope}))
    if args.levels and levels.FITTED:
        print(f"{save_levels(args.levels)} level tables in {args.levels}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
