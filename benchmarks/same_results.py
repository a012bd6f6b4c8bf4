"""Whether two workflow runs of one config gave the same results: every ppl and compress JSON
equal in every field and number, bit for bit, timings aside, and every compress and kv
safetensors file equal byte for byte. Exit 1 when any differs or is missing.

    python benchmarks/same_results.py /tmp/before /tmp/after     # two directories `make run` ran in
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path


def is_timing(key: str) -> bool:
    return key == "seconds" or key.endswith(("_seconds", "per_second", "_ms")) or key == "latency_ratio"


def differences(a, b, where: str) -> list[str]:
    """Where two JSON values differ (floats bit for bit, NaN equal to NaN), timings aside."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where}: keys differ"]
        return [d for key in a if not is_timing(key) for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and math.isnan(a):
        return [] if isinstance(b, float) and math.isnan(b) else [where]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} != {b!r}"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    patterns = ("results/*/*/ppl/*.json", "results/*/*/compress/*.json", "results/*/*/compress/*.safetensors",
                "results/*/*/kv/*.safetensors")
    files = sorted(f.relative_to(args.before) for p in patterns for f in args.before.glob(p))
    if not files:
        sys.exit(f"same_results: error: no results under {args.before / 'results'}")
    bad = 0
    for rel in files:
        other = args.after / rel
        if not other.is_file():
            found = ["missing"]
        elif rel.suffix == ".json":
            found = differences(json.loads((args.before / rel).read_text()), json.loads(other.read_text()), "")
        else:
            found = [] if digest(args.before / rel) == digest(other) else ["bytes differ"]
        bad += bool(found)
        print(f"{'same' if not found else 'DIFFERENT'}  {rel}  {'; '.join(found[:3])}")
    print(f"{len(files)} files, {bad} different")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
