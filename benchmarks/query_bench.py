"""How fast `kvcore query` answers, on a synthetic SmolLM2-shaped run, against plain DuckDB.

For each size (KV rows; 30 layers x 3 KV heads x 64 dims, seq_len 512, 8 sequences per
shard as config.yaml extracts them) this writes a run with kvcore's own writer
(`layer_table` + `write_parquet` per shard, then `finalize_run` compacting each layer's parts
into one file, kvcore/query/synthetic.py) and the same rows "the naive way" (one file, pyarrow
defaults: snappy, 1Mi-row groups, a `layer` column, rows in extraction order), then reports
medians over repeats, warm (files in the page cache), side by side in one process:

  lookup     --coordinate (one row) via kvcore.open_run, vs plain duckdb on the naive file
             and plain duckdb on kvcore's files with the DESIGN.md glob query;
  norm       --search-norm 0.5 1.0 key over every row (the result joined to token text), and a
             wide one: the key norms' 45th to 55th percentile (a tenth of the rows);
  layer      --layer-summary over one layer (norm and element statistics, reads the vectors);
  nearest    --k 10 over one (layer, head): the verb's SQL in DuckDB (what `kvcore query
             --nearest` runs), `Run.nearest` (numpy on the head's rows mapped in the shards'
             safetensors, scored block by block; a first search in a (layer, head) also norms
             them, later ones reuse the norms), its load + ranking alone side by side with the
             way before (one float32 matrix, then norms, then scores), the same ranking on
             vectors read from the layer's Parquet, numpy reading the Parquet with pyarrow;
  sharded    (--sharded) the same queries on the run before compaction (one file per layer per
             shard: what queries read while an extraction runs);
  layout     (--layout) one layer rewritten with other row-group sizes: lookup and scan.

Throughput: rows/s counts the rows the question is about (every row for norm, the layer's
rows for layer), GB/s the same rows times the in-memory width of the columns the query reads
(norm: seq_id, pos, head, token_id, key_norm, value_norm = 22 B; layer: head, norms, key,
value = 522 B), so kvcore and naive are divided by the same work.

    python benchmarks/query_bench.py --quick                    # ~1 minute: 0.2M and 1M rows
    nice python benchmarks/query_bench.py --sizes 2e6,2e7 --threads 2 --keep --dir DIR       # build once (~20 min)
    nice python benchmarks/query_bench.py --sizes 2e6,2e7 --threads 2 --reuse --dir DIR \
        --norm-variants --repeats 9                              # docs/query.md (~7 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LAYERS, KV_HEADS, HEADS, DIM, SEQ_LEN, SHARD_SIZE = 30, 3, 9, 64, 512, 8
NORM_BYTES = 4 + 4 + 2 + 4 + 4 + 4
LAYER_BYTES = 2 + 4 + 4 + DIM * 4 * 2


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def side_by_side(fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn, the calls alternating (a, b, a, b, ...) after one warmup each,
    so that a load that changes over the run (a shared box) weighs on both alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def median_over(fn, args: list, warmup: int = 2) -> float:
    """Median seconds of fn(*a) over a list of argument tuples (each a different lookup)."""
    for a in args[:warmup]:
        fn(*a)
    times = []
    for a in args:
        t = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- building the data ----------------------------------------------------------------------

def n_sequences(rows: int) -> int:
    return max(SHARD_SIZE, round(rows / (LAYERS * KV_HEADS * SEQ_LEN)))


def lookups(n_seq: int, args) -> list[tuple[int, int, int, int]]:
    """Random (layer, head, pos, seq) coordinates, the same for every layout."""
    rng = np.random.default_rng(args.seed)
    return [(int(rng.integers(LAYERS)), int(rng.integers(KV_HEADS)), int(rng.integers(SEQ_LEN)),
             int(rng.integers(n_seq))) for _ in range(args.lookups)]


def build(root: Path, rows: int, args) -> tuple[Path, Path, dict]:
    """The run's shard parts, the naive file from them, (--sharded) the queries on the parts
    as an extraction in progress sees them, then `finalize_run` compacting them."""
    from kvcore.query.synthetic import write_synthetic_run
    from kvcore.storage import finalize_run

    n_seq = n_sequences(rows)
    run_dir, naive = root / "run", root / "naive.parquet"
    t = time.perf_counter()
    n_shards = write_synthetic_run(
        run_dir, num_layers=LAYERS, num_kv_heads=KV_HEADS, num_heads=HEADS, head_dim=DIM, n_sequences=n_seq,
        seq_len=SEQ_LEN, shard_size=SHARD_SIZE, seed=args.seed, finalize=False,
        progress=lambda i, n: log(f"  kvcore layout: shard {i}/{n}") if i % 10 == 0 else None)["n_shards"]
    res = {"build_parts_s": time.perf_counter() - t}
    t = time.perf_counter()
    write_naive(run_dir, naive)
    res["build_naive_s"] = time.perf_counter() - t
    if args.sharded:
        import kvcore

        with kvcore.open_run(run_dir, threads=args.threads) as run:
            res["sharded"] = {"files": len(run.runs[0].kv_files), **measure(run, lookups(n_seq, args), args,
                                                                            {"norm": (0.5, 1.0)})}
        log(f"  sharded (before finalize): {res['sharded']}")
    t = time.perf_counter()
    finalize_run(run_dir, n_shards)
    res["finalize_s"] = time.perf_counter() - t
    return run_dir, naive, res


def add_norm_files(run_dir: Path) -> None:
    """A run built before finalize wrote the norm files gets them, as finalize writes them
    (`storage.write_norm_files`), so a reused run is timed as a new one would be."""
    from kvcore.atomic import write_json
    from kvcore.storage import write_norm_files

    meta = json.loads((run_dir / "metadata.json").read_text())
    if "norm_files" not in meta:
        t = time.perf_counter()
        meta["norm_files"] = write_norm_files(run_dir, meta["files"])
        size = sum((run_dir / rel).stat().st_size for rel in meta["norm_files"].values())
        write_json(run_dir / "metadata.json", meta)
        log(f"  wrote the run's norm files ({time.perf_counter() - t:.1f} s, {size / 1e6:.0f} MB), listed in "
            f"{run_dir / 'metadata.json'}")


def write_naive(run_dir: Path, out: Path, group: int = 1 << 20) -> None:
    """Every shard's layers concatenated into one file with pyarrow's defaults (1Mi-row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kvcore.query.synthetic import manifest_files

    files = manifest_files(run_dir)
    writer, pending, n_pending = None, [], 0
    for f in files:  # manifest order: shard by shard, layer by layer, as extraction produces them
        t = pq.read_table(f)
        layer = int(f.parent.name.split("=")[1])
        t = t.add_column(0, "layer", pa.array(np.full(t.num_rows, layer, np.int32)))
        if writer is None:
            writer = pq.ParquetWriter(out, t.schema)  # pyarrow defaults: snappy, dictionary, statistics
        pending.append(t)
        n_pending += t.num_rows
        while n_pending >= group:  # whole 1Mi-row groups, as pq.write_table(all_rows) would cut them
            big = pa.concat_tables(pending)
            writer.write_table(big.slice(0, group))
            pending, n_pending = [big.slice(group)], big.num_rows - group
    if n_pending:
        writer.write_table(pa.concat_tables(pending))
    writer.close()


# ---- the measurements -------------------------------------------------------------------------

def plain(threads: int | None):
    import duckdb

    return duckdb.connect(config={"threads": threads} if threads else {})


def measure(run, coords, args, searches: dict, naive: dict | None = None) -> dict:
    """The verbs through kvcore.open_run, whatever the layout under it; `searches` {"norm": (low,
    high), ...}: the key norm searches; `naive` {"norm": fn, ..., "layer": fn}: the naive file's
    same questions, timed side by side (norm_naive_s, ...)."""
    res = {"lookup_ms": 1e3 * median_over(lambda la, h, p, s: run.coordinate(la, h, p, s, arrow=True), coords)}
    queries = {name: run.query("search_norm", *span, "key") for name, span in searches.items()}
    for name, q in (*queries.items(), ("layer", run.query("layer_summary", 5))):
        if naive is None:
            res[f"{name}_s"] = timed(lambda: run.arrow(q), args.repeats)
        else:
            res[f"{name}_s"], res[f"{name}_naive_s"] = side_by_side([lambda: run.arrow(q), naive[name]], args.repeats)
    la, h, p, s = coords[0]
    q = run.query("nearest", la, h, p, k=10, seq=s)
    res["nearest_duckdb_ms"] = 1e3 * timed(lambda: run.arrow(q), args.repeats)
    return res


def bench_size(root: Path, rows: int, args) -> dict:
    import kvcore
    from kvcore.query.nearest import RunCandidates, best_first, tensor_candidates
    from kvcore.query.verbs import nearest_candidates, stats_columns
    from kvcore.storage import vector_norms

    root.mkdir(parents=True, exist_ok=True)
    if args.reuse and (root / "run" / "metadata.json").is_file() and (root / "naive.parquet").is_file():
        log(f"reusing {root}")
        run_dir, naive, built = root / "run", root / "naive.parquet", {}
        add_norm_files(run_dir)
    else:
        log(f"building {rows:,} rows under {root}")
        run_dir, naive, built = build(root, rows, args)
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    run = kvcore.open_run(run_dir, threads=args.threads)
    t_open = time.perf_counter() - t
    info = run.info().iloc[0]
    n_rows, n_seq = int(info.n_kv_rows), int(info.n_sequences)
    res = {"rows": n_rows, "sequences": n_seq, "shards": int(info.n_shards), "files": len(run.runs[0].kv_files),
           "kvcore_bytes": sum(f.stat().st_size for f in run.runs[0].kv_files), "naive_bytes": naive.stat().st_size,
           **built,
           "open_run_ms": 1e3 * t_open}
    log(f"  built: {res}")
    coords = lookups(n_seq, args)
    con = plain(args.threads)
    tokens = str(run_dir / "tokens.parquet")

    # the same questions of the naive file, checked to give the same answers
    wide = con.execute(f"SELECT quantile_disc(key_norm, [0.45, 0.55]) FROM read_parquet('{naive}')").fetchall()[0][0]
    searches = {"norm": (0.5, 1.0), "norm_wide": tuple(float(x) for x in wide)}
    naive_fns = {}
    for name, (low, high) in searches.items():
        q = run.query("search_norm", low, high, "key")
        res[f"{name}_hits"] = run.arrow(q).num_rows
        res[f"{name}_groups"] = " / ".join(f"{s['row_groups_scanned']} of {s['row_groups_total']}"
                                           for s in run.scans(q) if "token" not in s["projections"])
        naive_sql = f"""SELECT k.layer, k.head, k.seq_id, k.pos, k.token_id, t.token, k.key_norm, k.value_norm
FROM read_parquet('{naive}') k JOIN read_parquet('{tokens}') t ON k.seq_id = t.seq_id AND k.pos = t.pos
WHERE k.key_norm BETWEEN {low!r} AND {high!r} ORDER BY k.layer, k.seq_id, k.pos, k.head"""
        assert con.sql(naive_sql).to_arrow_table().num_rows == res[f"{name}_hits"]
        naive_fns[name] = lambda sql=naive_sql: con.sql(sql).to_arrow_table()
    layer = 5
    naive_layer = f"""SELECT layer, head, {stats_columns()} FROM read_parquet('{naive}') WHERE layer = {layer}
GROUP BY GROUPING SETS ((layer, head), (layer)) ORDER BY head NULLS LAST"""
    want = run.arrow(run.query("layer_summary", layer)).column("key_mean").to_pylist()
    got = con.sql(naive_layer).to_arrow_table().column("key_mean").to_pylist()
    assert np.allclose(want, got, rtol=1e-6), (want, got)

    # lookup, norm search and layer summary (side by side with the naive file), nearest in SQL
    naive_fns["layer"] = lambda: con.sql(naive_layer).to_arrow_table()
    names = {"lookup_ms": "lookup_kvcore_ms", "norm_s": "norm_kvcore_s", "norm_wide_s": "norm_wide_kvcore_s",
             "layer_s": "layer_kvcore_s"}
    res.update({names.get(k, k): v for k, v in measure(run, coords, args, searches, naive_fns).items()})
    layer_rows = n_rows // LAYERS
    for side in ("kvcore", "naive"):
        for q in searches:
            res[f"{q}_{side}_rows_per_s"] = n_rows / res[f"{q}_{side}_s"]
            res[f"{q}_{side}_GBps"] = n_rows * NORM_BYTES / res[f"{q}_{side}_s"] / 1e9
        res[f"layer_{side}_rows_per_s"] = layer_rows / res[f"layer_{side}_s"]
        res[f"layer_{side}_GBps"] = layer_rows * LAYER_BYTES / res[f"layer_{side}_s"] / 1e9
    log(f"  norm: {res['norm_kvcore_s']:.3f} s kvcore, {res['norm_naive_s']:.3f} s naive; wide: "
        f"{res['norm_wide_kvcore_s']:.3f} s kvcore, {res['norm_wide_naive_s']:.3f} s naive")
    log(f"  layer: {res['layer_kvcore_s']:.3f} s kvcore, {res['layer_naive_s']:.3f} s naive")

    # lookup: the other ways
    res["lookup_kvcore_pandas_ms"] = 1e3 * median_over(lambda la, h, p, s: run.coordinate(la, h, p, s), coords)
    naive_sql = f"SELECT * FROM read_parquet('{naive}') WHERE layer = ? AND head = ? AND pos = ? AND seq_id = ?"
    res["lookup_naive_ms"] = 1e3 * median_over(
        lambda *c: con.sql(naive_sql, params=list(c)).to_arrow_table(), coords[: max(5, args.lookups // 3)])
    glob_sql = (f"SELECT * FROM read_parquet('{run_dir}/kv/*/*.parquet', hive_partitioning=true) "
                "WHERE layer = ? AND head = ? AND pos = ? AND seq_id = ?")
    res["lookup_plain_glob_ms"] = 1e3 * median_over(
        lambda *c: con.sql(glob_sql, params=list(c)).to_arrow_table(), coords[: max(5, args.lookups // 3)])
    scan = [s for s in run.scans(run.query("coordinate", *coords[0])) if "key" in s["projections"]][0]
    res["lookup_files"] = f"{scan['files_read']}/{len(run.runs[0].kv_files)}"
    res["lookup_row_groups"] = f"{scan['row_groups_scanned']}/{scan['row_groups_total']}"
    log(f"  lookup: {res['lookup_kvcore_ms']:.1f} ms kvcore, {res['lookup_naive_ms']:.1f} ms naive")

    # nearest neighbours in one (layer, head): the SQL verb was timed by measure()
    la, h, p, s = coords[0]
    res["nearest_candidates"] = n_rows // (LAYERS * KV_HEADS)
    # Run.nearest, first search of a (layer, head): each repeat a (layer, head) not loaded yet
    firsts = list(dict.fromkeys((c[0], c[1]) for c in coords[1:] if (c[0], c[1]) != (la, h)))[:args.repeats]
    r = run.runs[0]
    res["nearest_source"] = "safetensors" if tensor_candidates(r, la, h, "key") is not None else "Parquet"
    for a, b in firsts:  # warm, as every file the bench reads: these heads' bytes in the page cache
        RunCandidates(tensor_candidates(r, a, b, "key")).vectors()
    cpu = []

    def first(a, b):
        t = time.process_time()
        run.nearest(a, b, p, k=10, seq=s, arrow=True)
        cpu.append(time.process_time() - t)

    def whole_matrix(a, b):
        """The load + ranking before, side by side: the (layer, head) widened into one new float32
        matrix, then read again for the norms and again for the scores."""
        c = RunCandidates(tensor_candidates(r, a, b, "key"))
        x = c.vectors()
        norms = vector_norms(x)
        me = int(np.flatnonzero((c.seq_id == s) & (c.pos == p))[0])
        best_first(-(x @ x[me] / (norms * norms[me])), c.seq_id, c.pos, me, 10)

    fns = {"nearest_first_ms": first, "nearest_first_matrix_ms": whole_matrix,  # alternating, which first
           "nearest_first_blocks_ms": lambda a, b: RunCandidates(tensor_candidates(r, a, b, "key")).top(
               s, p, 10, "cosine")}  # the load + ranking Run.nearest does now, without the token join
    walls = {name: [] for name in fns}
    for i, (a, b) in enumerate(firsts):
        for name in list(fns)[i % 3:] + list(fns)[:i % 3]:
            t = time.perf_counter()
            fns[name](a, b)
            walls[name].append(time.perf_counter() - t)
    res.update({name: 1e3 * statistics.median(w) for name, w in walls.items()})
    res["nearest_first_cpu_ms"] = 1e3 * statistics.median(cpu)  # every thread of the process
    # the same ranking on the vectors read from the layer's Parquet instead (what a run without
    # its safetensors, in a bucket or with float16 storage, loads)
    res["nearest_first_parquet_ms"] = 1e3 * median_over(
        lambda a, b: RunCandidates(table=run.arrow(nearest_candidates(r, a, b, "key"))).top(s, p, 10, "cosine"),
        firsts, warmup=0)
    # ... and later searches in the same (layer, head), other tokens
    again = [(la, h, c[2], c[3]) for c in coords]
    run.nearest(la, h, p, k=10, seq=s, arrow=True)
    res["nearest_cached_ms"] = 1e3 * median_over(lambda a, b, t, q: run.nearest(a, b, t, k=10, seq=q, arrow=True),
                                                 again)
    files = run.runs[0].layer_files(la)
    res["nearest_numpy_e2e_ms"] = 1e3 * timed(lambda: numpy_nearest(files, h, s, p, 10), args.repeats)
    keys, ids = load_head(files, h)
    res["nearest_numpy_inmem_ms"] = 1e3 * timed(lambda: top_k(keys, ids, s, p, 10), args.repeats)
    duck = run.arrow(run.query("nearest", la, h, p, k=10, seq=s))
    ours = run.nearest(la, h, p, k=10, seq=s, arrow=True)
    for name, table in (("numpy", None), ("Run.nearest", ours)):
        got = numpy_nearest(files, h, s, p, 10) if table is None else \
            list(zip(table.column("seq_id").to_pylist(), table.column("pos").to_pylist()))
        assert list(zip(duck.column("seq_id").to_pylist(), duck.column("pos").to_pylist())) == got, \
            f"DuckDB and {name} disagree"
    log(f"  nearest: {res['nearest_duckdb_ms']:.1f} ms duckdb, {res['nearest_first_ms']:.1f} ms first / "
        f"{res['nearest_cached_ms']:.1f} ms later Run.nearest")

    if args.layout:
        res["layout"] = layout_experiment(root, files, coords, args)
    if args.norm_variants and rows == min(args.size_list):
        res["norm_variants"] = norm_variants(root, run, naive, con, args, searches)
    run.close()
    res["load_avg"] = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    return res


def load_head(files, head: int):
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    t = ds.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["seq_id", "pos", "key"], filter=pc.field("head") == head)
    keys = t.column("key").combine_chunks().values.to_numpy().reshape(-1, DIM)
    ids = np.stack([t.column("seq_id").to_numpy(), t.column("pos").to_numpy()], axis=1)
    return keys, ids


def top_k(keys: np.ndarray, ids: np.ndarray, seq: int, pos: int, k: int) -> list[tuple[int, int]]:
    me = np.flatnonzero((ids[:, 0] == seq) & (ids[:, 1] == pos))[0]
    q = keys[me]
    sims = keys @ q / (np.linalg.norm(keys, axis=1) * np.linalg.norm(q))
    sims[me] = -np.inf
    best = np.argpartition(-sims, k)[:k]
    best = best[np.lexsort((ids[best, 1], ids[best, 0], -sims[best]))]
    return [(int(ids[i, 0]), int(ids[i, 1])) for i in best]


def numpy_nearest(files, head, seq, pos, k):
    keys, ids = load_head(files, head)
    return top_k(keys, ids, seq, pos, k)


def norm_variants(root: Path, run, naive: Path, con, args, searches: dict) -> dict:
    """Where a norm search's time goes: for each of `searches` and one matching every row, the
    verb against the same question asked other ways, timed side by side (alternating), medians;
    the norm file rewritten with other row-group sizes under `root`, removed after."""
    import dataclasses

    from kvcore.query.verbs import search_norm
    from kvcore.storage import NORM_FILE_COLUMNS, NORM_FILE_ROW_GROUP_ROWS, PARQUET_COMPRESSION

    r = run.runs[0]
    tokens, index = r.tokens, r.norm_files["key"]
    cols = "k.layer, k.head, k.seq_id, k.pos, k.token_id, t.token, k.key_norm, k.value_norm"
    rewritten = {}
    for group in (16384, 262144):
        out = root / f"norm-variant-{group}.parquet"
        con.execute(f"COPY (SELECT {NORM_FILE_COLUMNS} FROM read_parquet('{index}') ORDER BY key_norm, layer, seq_id, "
                    f"pos, head) TO '{out}' (FORMAT parquet, COMPRESSION {PARQUET_COMPRESSION}, ROW_GROUP_SIZE {group})"
                    ).fetchall()
        rewritten[group] = out
    layer_files_only = [dataclasses.replace(r, norm_files={})]  # a run finalized before the norm files
    out = {}
    for label, (low, high) in {**searches, "every row": (0.0, float("inf"))}.items():
        def plain_sql(src, low=low, high=high):
            sql = (f"SELECT {cols} FROM {src} k JOIN read_parquet('{tokens}') t ON k.seq_id = t.seq_id "
                   f"AND k.pos = t.pos WHERE k.key_norm BETWEEN ? AND ? ORDER BY k.layer, k.seq_id, k.pos, k.head")
            return lambda: con.sql(sql, params=[low, high]).to_arrow_table()

        verb, before = run.query("search_norm", low, high, "key"), search_norm(layer_files_only, low, high, "key")
        fns = {"kvcore: the verb (norms/key.parquet, then tokens for the hits)": lambda q=verb: run.arrow(q),
               "kvcore: the verb on the layer files (a run without norm files)": lambda q=before: run.arrow(q),
               f"plain duckdb: norms/key.parquet ({NORM_FILE_ROW_GROUP_ROWS:,}-row groups) + tokens":
                   plain_sql(f"read_parquet('{index}')")}
        for group, path in rewritten.items():
            fns[f"  the same rows in {group:,}-row groups + tokens"] = plain_sql(f"read_parquet('{path}')")
        fns["naive file + tokens (the baseline)"] = plain_sql(f"read_parquet('{naive}')")
        times = side_by_side(list(fns.values()), args.repeats)
        out.update({f"{label}: {name}": t for name, t in zip(fns, times)})
    for path in rewritten.values():
        path.unlink()
    log(f"  norm variants: {out}")
    return out


def layout_experiment(root: Path, files, coords, args) -> list[dict]:
    """One layer's rows rewritten with other row-group sizes (zstd as kvcore writes), then the
    same point lookup and layer scan through plain duckdb."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kvcore.query.verbs import stats_columns

    table = pa.concat_tables([pq.read_table(f) for f in files])
    layer = int(files[0].parent.name.split("=")[1])
    out = []
    for group in args.row_groups:
        path = root / f"layout-{group}.parquet"
        pq.write_table(table, path, row_group_size=group, compression="zstd", write_statistics=True)
        con = plain(args.threads)
        con.execute("SET parquet_metadata_cache = true")
        points = [(h, p, s) for la, h, p, s in coords]
        sql = f"SELECT * FROM read_parquet('{path}') WHERE head = ? AND pos = ? AND seq_id = ?"
        lookup = median_over(lambda *c: con.sql(sql, params=list(c)).to_arrow_table(), points)
        scan_sql = f"SELECT head, {stats_columns()} FROM read_parquet('{path}') GROUP BY head"
        scan = timed(lambda: con.sql(scan_sql).to_arrow_table(), args.repeats)
        out.append({"row_group_rows": group, "bytes": path.stat().st_size, "lookup_ms": 1e3 * lookup,
                    "layer_scan_s": scan, "layer_scan_GBps": table.num_rows * LAYER_BYTES / scan / 1e9})
        log(f"  layout layer {layer}, row groups of {group}: {out[-1]}")
        path.unlink()
    return out


# ---- report ---------------------------------------------------------------------------------

ROWS = [  # (label, format, key) of the results table
    ("load average (1 min) before -> after", "{}", "load_avg"),
    ("shards / Parquet files", "{}", "shards_files"), ("open_run (ms)", "{:.0f}", "open_run_ms"),
    ("build: shard parts / finalize (compaction) / naive file (s)", "{}", "build_times"),
    ("kvcore Parquet files on disk (GB)", "{:.2f}", "kvcore_gb"), ("naive file on disk (GB)", "{:.2f}", "naive_gb"),
    ("coordinate lookup, kvcore.open_run, Arrow (ms)", "{:.1f}", "lookup_kvcore_ms"),
    ("coordinate lookup, kvcore.open_run, pandas (ms)", "{:.1f}", "lookup_kvcore_pandas_ms"),
    ("  read: files / row groups", "{}", "lookup_scan"),
    ("coordinate lookup, plain duckdb, naive file (ms)", "{:.1f}", "lookup_naive_ms"),
    ("coordinate lookup, plain duckdb, kvcore files via glob (ms)", "{:.1f}", "lookup_plain_glob_ms"),
    ("norm search 0.5-1.0 key: hits", "{:,}", "norm_hits"),
    ("  row groups read of norms/key.parquet", "{}", "norm_groups"),
    ("  kvcore (s)", "{:.3f}", "norm_kvcore_s"), ("  naive (s)", "{:.3f}", "norm_naive_s"),
    ("  kvcore / naive", "{:.2f}x", "norm_ratio"),
    ("  kvcore Mrows/s, GB/s", "{}", "norm_kvcore_tp"), ("  naive Mrows/s, GB/s", "{}", "norm_naive_tp"),
    ("norm search, key norms' 45th-55th percentile: hits", "{:,}", "norm_wide_hits"),
    ("  row groups read of norms/key.parquet", "{}", "norm_wide_groups"),
    ("  kvcore (s)", "{:.3f}", "norm_wide_kvcore_s"), ("  naive (s)", "{:.3f}", "norm_wide_naive_s"),
    ("  kvcore / naive", "{:.2f}x", "norm_wide_ratio"),
    ("layer summary: rows in the layer", "{:,}", "layer_rows"),
    ("  kvcore (s)", "{:.3f}", "layer_kvcore_s"), ("  naive (s)", "{:.3f}", "layer_naive_s"),
    ("  kvcore / naive", "{:.2f}x", "layer_ratio"),
    ("  kvcore Mrows/s, GB/s", "{}", "layer_kvcore_tp"), ("  naive Mrows/s, GB/s", "{}", "layer_naive_tp"),
    ("nearest k=10 in one (layer, head): candidates", "{:,}", "nearest_candidates"),
    ("  DuckDB brute force, the verb's SQL (ms)", "{:.1f}", "nearest_duckdb_ms"),
    ("  Run.nearest, first search of the (layer, head): load + numpy (ms); CPU (ms); read from", "{}",
     "nearest_first"),
    ("  Run.nearest, later searches (ms)", "{:.1f}", "nearest_cached_ms"),
    ("  first search's load + ranking alone, block by block (Run.nearest now) / one float32 matrix, then norms, "
     "then scores (before) (ms)", "{}", "nearest_load_rank"),
    ("  Run.nearest's load + ranking, vectors from the layer's Parquet via DuckDB (ms)", "{:.1f}",
     "nearest_first_parquet_ms"),
    ("  numpy, reading the layer's Parquet with pyarrow (ms)", "{:.1f}", "nearest_numpy_e2e_ms"),
    ("  numpy top-k alone, vectors in memory (ms)", "{:.1f}", "nearest_numpy_inmem_ms"),
]
SHARDED_ROWS = [  # the same verbs before finalize (--sharded)
    ("before finalize: Parquet files", "{:,}", "files"), ("  coordinate lookup (ms)", "{:.1f}", "lookup_ms"),
    ("  norm search (s)", "{:.3f}", "norm_s"), ("  layer summary (s)", "{:.3f}", "layer_s"),
    ("  nearest, DuckDB (ms)", "{:.1f}", "nearest_duckdb_ms"),
]


def report(results: list[dict]) -> str:
    """A Markdown table, one column per size."""
    for r in results:
        r["shards_files"] = f"{r['shards']} / {r['files']}"
        r["build_times"] = " / ".join(f"{r[k]:.0f}" if k in r else "reused"
                                      for k in ("build_parts_s", "finalize_s", "build_naive_s"))
        r["layer_rows"] = r["rows"] // LAYERS
        r["kvcore_gb"], r["naive_gb"] = r["kvcore_bytes"] / 1e9, r["naive_bytes"] / 1e9
        r["lookup_scan"] = f"{r['lookup_files']} / {r['lookup_row_groups']}"
        r["nearest_first"] = f"{r['nearest_first_ms']:.1f}; {r['nearest_first_cpu_ms']:.1f}; {r['nearest_source']}"
        r["nearest_load_rank"] = f"{r['nearest_first_blocks_ms']:.1f} / {r['nearest_first_matrix_ms']:.1f}"
        for q in ("norm", "norm_wide", "layer"):
            r[f"{q}_ratio"] = r[f"{q}_kvcore_s"] / r[f"{q}_naive_s"]
            for side in ("kvcore", "naive"):
                r[f"{q}_{side}_tp"] = f"{r[f'{q}_{side}_rows_per_s'] / 1e6:.1f}, {r[f'{q}_{side}_GBps']:.2f}"
    lines = ["| | " + " | ".join(f"{r['rows'] / 1e6:.1f}M rows" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    lines += [f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results) + " |" for label, fmt, key in ROWS]
    if any("sharded" in r for r in results):
        lines += [f"| {label} | " + " | ".join(fmt.format(r["sharded"][key]) if "sharded" in r else "-"
                                               for r in results) + " |" for label, fmt, key in SHARDED_ROWS]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2e6,2e7", help="KV rows per run, comma separated (default 2e6,2e7)")
    p.add_argument("--quick", action="store_true", help="sizes 2e5,1e6 and fewer repeats (about a minute)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/kvcore-query-bench"), help="scratch directory")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lookups", type=int, default=30, help="random coordinates per lookup median")
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    p.add_argument("--sharded", action="store_true",
                   help="also time the verbs on the shard parts before finalize compacts them (not with --reuse)")
    p.add_argument("--layout", action="store_true", help="also time one layer at other row-group sizes")
    p.add_argument("--norm-variants", action="store_true",
                   help="also time the norm searches asked other ways (the layer files, other row groups, "
                        "plain duckdb), side by side, at the smallest size")
    p.add_argument("--row-groups", default="4096,8192,16384,32768,131072")
    p.add_argument("--keep", action="store_true", help="keep the data under --dir")
    p.add_argument("--reuse", action="store_true", help="reuse (and keep) data left under --dir by an earlier --keep run")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats, args.lookups = "2e5,1e6", 3, 15
    args.row_groups = [int(x) for x in args.row_groups.split(",")]
    results = []
    args.size_list = [int(float(s)) for s in args.sizes.split(",")]
    for size in args.size_list:
        root = args.dir / f"rows-{size}"
        if not args.reuse:
            shutil.rmtree(root, ignore_errors=True)
        try:
            res = bench_size(root, size, args)
        finally:
            if not (args.keep or args.reuse):
                shutil.rmtree(root, ignore_errors=True)
        results.append(res)
    print(f"duckdb threads: {args.threads or os.cpu_count()}, cpu cores: {os.cpu_count()}, repeats: {args.repeats}, "
          f"lookups: {args.lookups}")
    print(report(results))
    for r in results:
        for name, t in r.get("norm_variants", {}).items():
            print(f"norm search variant ({r['rows'] / 1e6:.1f}M rows): {name}: {1e3 * t:.1f} ms")
    for r in results:
        for lay in r.get("layout", []):
            print(f"layout ({r['rows'] / 1e6:.1f}M rows, one layer): row groups {lay['row_group_rows']:>6}: "
                  f"{lay['bytes'] / 1e6:.0f} MB, lookup {lay['lookup_ms']:.1f} ms, layer scan {lay['layer_scan_s']:.3f} s "
                  f"({lay['layer_scan_GBps']:.2f} GB/s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
