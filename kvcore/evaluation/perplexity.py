"""A method's perplexity: its windows in shards and their merge (kvcore.jobs.perplexity runs them).

The evaluated text is the dataset's documents joined by blank lines, tokenized once (no
special tokens). A job evaluates a contiguous block of windows (`evaluate_shard`) and keeps
every window's NLL sum, latency and compression sums; `merge_shards` pools them in window
order into ppl/{method}.json, with the method's primary protocol at top level and every
protocol under `protocols`. One job is the one-shard case of the same code, so N shards give
exactly its numbers.
"""

from __future__ import annotations

from kvcore.errors import KvcoreError, UsageError
from kvcore.evaluation.options import method_protocols
from kvcore.evaluation.records import protocol_record, run_from_windows
from kvcore.evaluation.windows import layout_windows, shard_windows

SHARD_FORMAT = "kvcore-perplexity-shard/2"
SHARD_KEYS = ("format", "method", "spec", "family", "shards", "n_windows_total", "max_length", "stride",
              "threshold", "dtype", "token_ids_sha256")


def eval_token_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    from kvcore.tokens import encode_joined

    ids, _ = encode_joined(tokenizer, [text], max_tokens)
    return ids


def check_protocols(method: str, spec: dict | None, protocols: list[str] | None):
    """(Method, protocols): the family's protocols, or the chosen ones if they fit it."""
    from kvcore.compress import parse_method

    m = parse_method(method, spec)
    allowed = method_protocols(m)
    protocols = list(protocols or allowed)
    bad = [p for p in protocols if p not in allowed]
    if bad:
        raise UsageError(f"method {method!r}: family {m.family} has no {bad[0]} protocol (valid: {', '.join(allowed)})")
    return m, protocols


def evaluate_shard(model_dir, text_or_ids, method: str, spec: dict | None, settings: dict,
                   options: dict | None = None, protocols: list[str] | None = None, loaded=None,
                   shard: int = 0, shards: int = 1, baseline: dict | None = None) -> dict:
    """Per-window results of one method under its protocols over shard `shard` of `shards`.

    `baseline`: the ppl record of the run's baseline (a `none` method's job, same text and
    settings). Where that job ran one window per forward, as a method's job does (the CPU:
    `batched.window_batch`), its per-window NLLs are this job's baseline bit for bit, so they
    are taken instead of running the baseline's forwards again; its seconds stay the baseline's."""
    from pathlib import Path

    from kvcore.evaluation.batched import window_batch
    from kvcore.evaluation.nll import token_ids_sha256
    from kvcore.evaluation.protocols import evaluate_methods
    from kvcore.model import load_model

    m, protocols = check_protocols(method, spec, protocols)
    if loaded is None:  # (model, tokenizer, device) from load_model, to reuse a loaded model
        loaded = load_model(Path(model_dir), settings.get("device", "auto"), settings.get("dtype", "float32"),
                            settings.get("attn_implementation"))
    model, tokenizer, device = loaded
    ids = (eval_token_ids(tokenizer, text_or_ids, settings.get("max_tokens")) if isinstance(text_or_ids, str)
           else list(text_or_ids))
    layout = settings.get("layout", "sliding")
    n_windows = len(layout_windows(len(ids), settings["max_length"], settings["stride"], layout))
    selected = list(shard_windows(n_windows, shard, shards))
    methods = {} if m.family == "none" else {method: m}
    dtype = str(model.dtype).replace("torch.", "")
    reuse = (baseline is not None and bool(methods) and shards == 1
             and window_batch(model, device, settings["max_length"]) == 1)
    runs = {}
    for protocol in protocols:
        out = {"protocol": protocol, "layout": layout, "baseline": {"windows": []},
               "methods": {name: {"windows": [], "metric_parts": []} for name in methods}}
        known = baseline_windows(baseline, protocol, token_ids_sha256(ids), n_windows, settings, layout, dtype) \
            if reuse else None
        if selected:  # more shards than windows leaves some empty
            run = evaluate_methods(model, ids, methods, protocol=protocol, max_length=settings["max_length"],
                                   stride=settings["stride"], layout=layout, tokenizer=tokenizer, device=device,
                                   selected=selected, options=options, progress=f"{method} {protocol}",
                                   baseline=known)
            out["baseline"]["windows"] = run["baseline"]["windows"]
            if known is not None:
                record = baseline["protocols"][protocol]
                out["baseline"]["timing"] = {"seconds": record["seconds"],
                                             "scored_seconds": record.get("scored_forward_seconds")}
            for name in methods:
                out["methods"][name] = {"windows": run["methods"][name]["windows"],
                                        "metric_parts": run["methods"][name]["metric_parts"]}
        runs[protocol] = out
    return {"format": SHARD_FORMAT, "method": method, "spec": m.spec, "family": m.family, "shard": shard,
            "shards": shards, "n_windows_total": n_windows, "max_length": settings["max_length"],
            "stride": settings["stride"], "threshold": settings.get("threshold", 0.5),
            "dtype": dtype, "token_ids_sha256": token_ids_sha256(ids), "protocols": runs}


def baseline_windows(record: dict, protocol: str, ids_sha256: str, n_windows: int, settings: dict, layout: str,
                     dtype: str) -> dict:
    """window index -> (NLL sum, scored count) of `protocol` in the baseline's ppl `record`,
    checked to be of the same token ids, windows and dtype (`evaluate_shard`'s `baseline`)."""
    run = (record.get("protocols") or {}).get(protocol) or {}
    expected = {"token_ids_sha256": ids_sha256, "max_length": settings["max_length"], "stride": settings["stride"],
                "layout": layout, "dtype": dtype, "n_windows": n_windows}
    wrong = [key for key, value in expected.items() if run.get(key) != value]
    if wrong:
        raise KvcoreError(f"the baseline's perplexity record does not fit this evaluation ({protocol}: "
                          f"{wrong[0]} {run.get(wrong[0])!r}, expected {expected[wrong[0]]!r}); rerun its job")
    try:
        known = {w["index"]: (float(w["nll_sum"]), int(w["n_scored"])) for w in run["windows"]}
    except (KeyError, TypeError, ValueError):
        known = {}
    if sorted(known) != list(range(n_windows)):
        raise KvcoreError(f"the baseline's perplexity record ({protocol}) does not hold windows 0..{n_windows - 1}; "
                          "rerun its job")
    return known


def merge_shards(shards: list[dict]) -> dict:
    """The ppl/{method}.json record of a method from all of its shards (any order)."""
    if not shards:
        raise KvcoreError("no perplexity shards to merge")
    first = shards[0]
    for shard in shards:
        for key in SHARD_KEYS:
            if shard.get(key) != first.get(key):
                raise KvcoreError(f"perplexity shards of {first.get('method')!r} disagree on {key} "
                                  f"({shard.get(key)!r} vs {first.get(key)!r}); rerun the perplexity_shard jobs")
    ids = sorted(s["shard"] for s in shards)
    if ids != list(range(first["shards"])):
        raise KvcoreError(f"perplexity shards of {first['method']!r}: expected shards 0..{first['shards'] - 1}, "
                          f"got {ids}")
    method, family, n_total = first["method"], first["family"], first["n_windows_total"]
    settings = {"max_length": first["max_length"], "stride": first["stride"], "dtype": first["dtype"],
                "threshold": first["threshold"]}
    name = None if family == "none" else method
    records = {}
    for protocol, head in first["protocols"].items():
        parts = [s["protocols"][protocol] for s in shards]
        base = [w for p in parts for w in p["baseline"]["windows"]]
        if sorted(w["index"] for w in base) != list(range(n_total)):
            raise KvcoreError(f"perplexity shards of {method!r} ({protocol}) do not cover windows 0..{n_total - 1} "
                              f"exactly once")
        run = run_from_windows(protocol, head["layout"], first["token_ids_sha256"], base, {
            m: ([w for p in parts for w in p["methods"][m]["windows"]],
                [x for p in parts for x in p["methods"][m]["metric_parts"]]) for m in head["methods"]},
            baseline_timing=head["baseline"].get("timing"))  # windows taken from the baseline's job: its seconds
        records[protocol] = protocol_record(run, name, method=method, **settings)
        if family == "none":
            records[protocol]["bits_per_element"] = 16.0  # an uncompressed cache, under the fp16 convention
    top = dict(next(iter(records.values())))
    top["spec"] = first["spec"]
    top["protocols"] = records
    return top


def read_shard(path) -> dict:
    """A perplexity_shard job's file, read by the project's one JSON reader (kvcore.inputs.read_json)."""
    from kvcore.inputs import read_json

    try:
        shard = read_json(path, "perplexity shard")
    except KvcoreError as error:
        raise KvcoreError(f"{error}; rerun its perplexity_shard job") from None
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        raise KvcoreError(f"{path}: not a perplexity shard (format {SHARD_FORMAT} expected); "
                          "rerun its perplexity_shard job")
    return shard


def validate_method(model_dir, text_or_ids, method: str, spec: dict | None, settings: dict,
                    options: dict | None = None, protocols: list[str] | None = None, loaded=None,
                    baseline: dict | None = None) -> dict:
    """Baseline and compressed perplexity of one method under its protocols: the ppl record
    (`baseline`: the run's baseline record, see `evaluate_shard`)."""
    return merge_shards([evaluate_shard(model_dir, text_or_ids, method, spec, settings, options=options,
                                        protocols=protocols, loaded=loaded, baseline=baseline)])
