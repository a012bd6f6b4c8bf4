"""Where the eviction compress job's host memory goes: its phases' peak RSS, anonymous and file-backed.

Runs `kvcore.jobs.compress.compress_evict` as the rule runs it (`run_job`: the model code imported,
then the GPU claimed) on a finished run's extracted shards, model and tokens.parquet, reading this
process's /proc/self/status every `--sample` seconds, and prints each phase's peak VmRSS, RssAnon
and RssFile (MB) and the kernel's VmHWM at the end: imports, loading the model, scoring the
sequences, after scoring (the model dropped), compressing; and the sha256 of the file it wrote,
which must be the workflow's (`results/.../compress/{method}.safetensors`). Writes to a temporary
directory. `--transformers-load` loads the model as kvcore did before reading the weights itself
(transformers' `from_pretrained(model_dir, device_map=device)`), for the comparison.

    python benchmarks/evict_rss_bench.py --workdir /tmp/wf --config configs/gpu-bench.yaml --method kvzip-0.5
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(m[1]) / 1024 for k in FIELDS if (m := re.search(rf"^{k}:\s+(\d+) kB", text, re.M))}


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks, self.order, self.done = interval, "start", {}, [], False

    def mark(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        s = status()
        if self.phase not in self.peaks:
            self.peaks[self.phase] = {k: 0.0 for k in FIELDS}
            self.order.append(self.phase)
        peak = self.peaks[self.phase]
        for k, v in s.items():
            peak[k] = max(peak[k], v)

    def run(self):
        while not self.done:
            self.sample()
            time.sleep(self.interval)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a finished run's directory (results/, resources/)")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--sample", type=float, default=0.01)
    ap.add_argument("--transformers-load", action="store_true", help="load the model the way before read_weights")
    args = ap.parse_args()

    import yaml

    cfg = yaml.safe_load(args.config.read_text())
    model, dataset = next(iter(cfg["models"])), next(iter(cfg["datasets"]))
    run = args.workdir / "results" / model / dataset
    shards = sorted((run / "kv").glob("part-*.safetensors"))
    spec = {k: v for k, v in cfg["methods"][args.method].items()}
    device, dtype = cfg["extract"]["device"], cfg["extract"]["dtype"]

    sampler = Sampler(args.sample)
    sampler.start()
    sampler.mark("imports")
    from kvcore.model import import_model_code

    import_model_code()
    import torch

    import kvcore.compress.files as files
    import kvcore.evaluation.extracted as extracted
    import kvcore.model as kmodel
    from kvcore.jobs.compress import compress_evict

    sampler.mark("cuda init")
    if torch.cuda.is_available():
        (torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")).sum().item()

    def phase(name, fn, after=None):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            if sampler.phase != name:
                sampler.mark(name)
            out = fn(*a, **kw)
            if after:
                sampler.mark(after)
            return out
        return wrapped

    if args.transformers_load:
        def from_pretrained(model_dir, device, torch_dtype, attention):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, use_safetensors=True,
                                                        attn_implementation=attention, device_map=device)
        kmodel.model_from_weights = from_pretrained
    kmodel.load_model = phase("load model", kmodel.load_model, after="score")
    files.compress_file = phase("compress", files.compress_file)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compress_evict(shards, Path(tmp) / "m.safetensors", Path(tmp) / "m.json", args.method, spec,
                       args.workdir / "resources" / "models" / model, run / "tokens.parquet", device, dtype)
        wall = time.perf_counter() - start
        sampler.mark("end")
        digest = sha256(Path(tmp) / "m.safetensors")
    workflow = run / "compress" / f"{args.method}.safetensors"
    sampler.done = True
    print(f"{args.method}: compress_evict {wall:.1f} s; peak MB per phase (sampled every {args.sample} s); "
          f"VmHWM at the end {status().get('VmHWM', 0):.0f} MB; "
          f"{'transformers load' if args.transformers_load else 'read_weights'}")
    print(f"sha256 {digest}: {'the workflow' + chr(39) + 's bytes' if workflow.is_file() and sha256(workflow) == digest else 'DIFFERS from ' + str(workflow)}")
    print("| phase | VmRSS | RssAnon | RssFile | RssShmem |\n|---|---:|---:|---:|---:|")
    for name in sampler.order:
        p = sampler.peaks[name]
        print(f"| {name} | {p['VmRSS']:.0f} | {p['RssAnon']:.0f} | {p['RssFile']:.0f} | {p['RssShmem']:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
