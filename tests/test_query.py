"""kvcore query: every verb against numpy on tiny MHA (GPT-2) and GQA (LLaMA) runs, the
read-only sandbox, partition pruning, output formats, the shell, and bad inputs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvcore.cli import main
from kvcore.errors import KvcoreError
from query_fixtures import build_run, load_reference

ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="session")
def grid(tmp_path_factory, tiny_models):
    """results/gpt2/text and results/llama/text, extracted by kvcore from conftest's tiny models."""
    root = tmp_path_factory.mktemp("query")
    runs = {arch: build_run(root, tiny_models[arch]) for arch in ARCHS}
    return root / "results", runs


@pytest.fixture(scope="session")
def refs(grid):
    return {arch: load_reference(path) for arch, path in grid[1].items()}


@pytest.fixture(params=ARCHS)
def case(request, grid, refs):
    """(kvcore Run, numpy Reference) of one architecture."""
    import kvcore

    run = kvcore.open_run(grid[1][request.param])
    yield run, refs[request.param]
    run.close()


def cli(capsys, *argv):
    code = main(["query", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def norm(v):
    return float(np.linalg.norm(v.astype(np.float64)))


# ---- every verb against numpy ------------------------------------------------------------

def test_shapes_match_the_model(case):
    run, ref = case
    info = run.info().iloc[0]
    assert (info.num_layers, info.num_kv_heads, info.num_heads) == (ref.num_layers, ref.num_kv, ref.num_heads)
    assert info.n_tokens == sum(ref.lengths) and info.n_sequences == len(ref.seq_ids)
    assert info.n_kv_rows == sum(ref.lengths) * ref.num_layers * ref.num_kv
    assert run.sql("SELECT count(*) AS n FROM kv").n[0] == info.n_kv_rows
    assert run.sql("SELECT typeof(key) AS t FROM kv LIMIT 1").t[0] == f"FLOAT[{ref.keys[0].shape[-1]}]"


def test_coordinate(case):
    run, ref = case
    for layer in range(ref.num_layers):
        for head in range(ref.num_kv):
            for seq, pos in [(0, 0), (2, 5), (ref.seq_ids[-1], ref.lengths[-1] - 1)]:
                row = run.coordinate(layer, head, pos, seq=seq).iloc[0]
                k, v = ref.vector("key", layer, head, seq, pos), ref.vector("value", layer, head, seq, pos)
                np.testing.assert_array_equal(np.asarray(row.key, np.float32), k)
                np.testing.assert_array_equal(np.asarray(row.value, np.float32), v)
                assert row.key_norm == pytest.approx(norm(k), rel=1e-6)
                assert row.value_norm == pytest.approx(norm(v), rel=1e-6)
                assert row.token == ref.tokens[(seq, pos)] and row.token_id == ref.token_ids[(seq, pos)]


def test_list_tokens(case):
    run, ref = case
    df = run.list_tokens(2)
    assert list(df.pos) == list(range(ref.lengths[2]))
    assert list(df.token) == [ref.tokens[(2, p)] for p in range(ref.lengths[2])]
    assert len(run.list_tokens()) == sum(ref.lengths)


def test_token_search(case):
    run, ref = case
    hits = sorted(k for k, t in ref.tokens.items() if t.strip().lower() == "fox")
    assert hits, "the texts contain 'fox'"
    df = run.token_search(" FOX ")
    assert len(df) == len(hits) * ref.num_layers * ref.num_kv
    assert sorted(set(zip(df.seq_id, df.pos))) == hits
    for r in df.itertuples():
        assert r.key_norm == pytest.approx(norm(ref.vector("key", r.layer, r.head, r.seq_id, r.pos)), rel=1e-6)
        assert r.value_norm == pytest.approx(norm(ref.vector("value", r.layer, r.head, r.seq_id, r.pos)), rel=1e-6)
    one = run.token_search("fox", layer=1, head=0)
    assert len(one) == len(hits) and set(one.layer) == {1} and set(one["head"]) == {0}


def _element_stats(vectors):
    x = np.stack(vectors).astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    return dict(n_vectors=len(x), norm_mean=norms.mean(), norm_std=norms.std(), norm_min=norms.min(),
                norm_max=norms.max(), mean=x.mean(), std=x.std(), min=x.min(), max=x.max())


def _check_stats(row, ref, layer, head):
    for kind in ("key", "value"):
        want = _element_stats([v for *_, v in ref.vectors(kind, layer, head)])
        assert row.n_vectors == want["n_vectors"]
        for stat in ("norm_mean", "norm_std", "norm_min", "norm_max", "mean", "std", "min", "max"):
            assert getattr(row, f"{kind}_{stat}") == pytest.approx(want[stat], rel=1e-4, abs=1e-6), (kind, stat)


def test_layer_summary(case):
    run, ref = case
    layer = ref.num_layers - 1
    df = run.layer_summary(layer)
    assert len(df) == ref.num_kv + 1  # one row per KV head, then all heads (head NULL)
    for head in range(ref.num_kv):
        _check_stats(df[df["head"] == head].iloc[0], ref, layer, head)
    _check_stats(df[df["head"].isna()].iloc[0], ref, layer, None)


def test_head_summary(case):
    run, ref = case
    row = run.head_summary(1, 1).iloc[0]
    _check_stats(row, ref, 1, 1)
    group = ref.num_heads // ref.num_kv  # GQA: query heads 2h, 2h+1 read KV head h
    assert list(row.query_heads) == list(range(group, 2 * group))
    seq, pos, _, _ = max(ref.vectors("key", 1, 1), key=lambda t: norm(t[3]))
    assert (row.key_norm_max_seq_id, row.key_norm_max_pos) == (seq, pos)
    assert row.key_norm_max_token == ref.tokens[(seq, pos)]


def test_token_summary(case):
    run, ref = case
    df = run.token_summary(3, seq=1)
    assert len(df) == ref.num_layers * ref.num_kv
    for r in df.itertuples():
        k = ref.vector("key", r.layer, r.head, 1, 3).astype(np.float64)
        v = ref.vector("value", r.layer, r.head, 1, 3).astype(np.float64)
        assert (r.key_norm, r.value_norm) == pytest.approx((norm(k), norm(v)), rel=1e-6)
        assert (r.key_mean, r.key_std, r.key_min, r.key_max) == pytest.approx(
            (k.mean(), k.std(), k.min(), k.max()), rel=1e-5, abs=1e-7)
        assert (r.value_mean, r.value_std) == pytest.approx((v.mean(), v.std()), rel=1e-5, abs=1e-7)
        assert r.token == ref.tokens[(1, 3)]


@pytest.mark.parametrize("kind", ["key", "value"])
def test_search_norm(case, kind):
    run, ref = case
    all_norms = [norm(v) for layer in range(ref.num_layers) for *_, v in ref.vectors(kind, layer)]
    low, high = np.quantile(all_norms, [0.3, 0.6])
    want = {(layer, h, s, p) for layer in range(ref.num_layers) for s, p, h, v in ref.vectors(kind, layer)
            if low <= norm(v) <= high}
    df = run.search_norm(low, high, kind)
    got = set(zip(df.layer, df["head"], df.seq_id, df.pos))
    # float32 norms at the edges may round across the bounds; nothing else may differ
    edge = {c for c in want ^ got if min(abs(norm(ref.vector(kind, c[0], c[1], c[2], c[3])) - b)
                                         for b in (low, high)) < 1e-5}
    assert want ^ got == edge and len(want) > 10
    assert list(df.token) == [ref.tokens[(s, p)] for s, p in zip(df.seq_id, df.pos)]  # each hit's own text
    filtered = run.search_norm(low, high, kind, layer=1, head=0)
    assert set(zip(filtered.seq_id, filtered.pos)) == {(s, p) for (la, h, s, p) in got if la == 1 and h == 0}


def test_search_norm_on_the_grid_is_each_runs_own(grid):
    """A grid's norm search gives each run's own rows, in (model, dataset) order."""
    import pandas as pd

    import kvcore

    with kvcore.open_run(grid[0]) as run:
        both = run.search_norm(0.5, 5.0, "value")
    alone = []
    for arch in ARCHS:
        with kvcore.open_run(grid[1][arch]) as run:
            alone.append(run.search_norm(0.5, 5.0, "value"))
    want = pd.concat(alone, ignore_index=True)
    assert set(both.model) == set(ARCHS) and len(want) > 10
    pd.testing.assert_frame_equal(both, want)


@pytest.mark.parametrize("block_rows", [4096, 20, 1])  # one block, a few sequences each, one sequence each
@pytest.mark.parametrize("by,metric", [("key", "cosine"), ("value", "l2")])
def test_nearest_equals_brute_force(case, by, metric, block_rows, monkeypatch):
    from kvcore.query import nearest

    monkeypatch.setattr(nearest, "BLOCK_ROWS", block_rows)  # Run.nearest scores block by block
    run, ref = case
    layer, head, seq, pos, k = 1, ref.num_kv - 1, 2, 4, 7
    q = ref.vector(by, layer, head, seq, pos).astype(np.float64)
    cands = [(s, p, v.astype(np.float64)) for s, p, _, v in ref.vectors(by, layer, head) if (s, p) != (seq, pos)]
    if metric == "cosine":
        scores = [c @ q / (np.linalg.norm(c) * np.linalg.norm(q)) for _, _, c in cands]
        order = np.argsort(-np.asarray(scores), kind="stable")
    else:
        scores = [np.linalg.norm(c - q) for _, _, c in cands]
        order = np.argsort(scores, kind="stable")
    column = "cosine_similarity" if metric == "cosine" else "l2_distance"
    # Run.nearest ranks in numpy on vectors loaded once (twice: the second search hits the cache);
    # the verb's SQL (what `kvcore query --nearest` runs) ranks in DuckDB: same rows, same columns
    in_memory = [run.nearest(layer, head, pos, k=k, seq=seq, by=by, metric=metric) for _ in range(2)]
    in_duckdb = run.sql(run.query("nearest", layer, head, pos, k=k, seq=seq, by=by, metric=metric))
    for df in (*in_memory, in_duckdb):
        assert list(df.columns) == list(in_duckdb.columns) and list(df.dtypes) == list(in_duckdb.dtypes)
        assert list(df["rank"]) == list(range(1, k + 1))
        assert list(zip(df.seq_id, df.pos)) == [(cands[i][0], cands[i][1]) for i in order[:k]]
        np.testing.assert_allclose(df[column], [scores[i] for i in order[:k]], rtol=1e-5)
        assert list(df.token) == list(in_duckdb.token) and list(df[f"{by}_norm"]) == list(in_duckdb[f"{by}_norm"])
        assert list(df.token_id) == list(in_duckdb.token_id)


@pytest.mark.parametrize("by", ["key", "value"])
def test_nearest_reads_the_safetensors_as_the_parquet(case, by):
    from kvcore.query.nearest import RunCandidates, matrix, tensor_candidates
    from kvcore.query.verbs import nearest_candidates
    from kvcore.storage import vector_norms

    run, ref = case
    r, layer, head = run.runs[0], 1, ref.num_kv - 1
    tensors = tensor_candidates(r, layer, head, by)  # what Run.nearest reads from an extracted run
    assert tensors is not None
    x = RunCandidates(tensors).vectors()
    table = run.arrow(nearest_candidates(r, layer, head, by))
    i = np.lexsort((table["pos"], table["seq_id"]))
    j = np.lexsort((tensors["pos"], tensors["seq_id"]))
    assert list(zip(table["seq_id"].to_numpy()[i], table["pos"].to_numpy()[i])) == \
        list(zip(tensors["seq_id"][j], tensors["pos"][j]))
    np.testing.assert_array_equal(matrix(table["vector"])[i], x[j])  # bit for bit
    np.testing.assert_array_equal(table["norm"].to_numpy()[i], vector_norms(x)[j])
    # where the safetensors may differ from the Parquet rows, Run.nearest reads the Parquet
    from dataclasses import replace
    for other in (replace(r, meta={**r.meta, "parquet": {"storage_dtype": "float16"}}),
                  replace(r, meta={**r.meta, "parquet": {"parts": "keys" if by == "value" else "values"}}),
                  replace(r, tensor_files={})):
        assert tensor_candidates(other, layer, head, by) is None
    from_parquet, from_tensors = RunCandidates(table=table), RunCandidates(tensors)
    for metric in ("cosine", "l2"):
        (a, sa, na), (b, sb, nb) = from_parquet.top(2, 4, 7, metric), from_tensors.top(2, 4, 7, metric)
        assert [(from_parquet.seq_id[x], from_parquet.pos[x]) for x in a] == \
            [(from_tensors.seq_id[x], from_tensors.pos[x]) for x in b]
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(na, nb)  # the stored norm and the one computed from the safetensors


def test_sequence_blocks_group_whole_sequences(monkeypatch):
    from kvcore.query import nearest

    monkeypatch.setattr(nearest, "BLOCK_ROWS", 10)
    assert nearest.sequence_blocks([4, 6, 3, 12, 2, 2]) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert nearest.sequence_blocks([]) == []


def test_nearest_ties_at_the_cut_go_by_seq_and_pos():
    from kvcore.query.nearest import best_first

    # scores tie across the cut: the lower (seq_id, pos) wins, as ORDER BY score, seq_id, pos LIMIT n
    rank_by = np.array([0.5, 0.1, 0.5, 0.5, np.inf, 0.2])
    seq_ids, pos = np.array([3, 0, 1, 1, 0, 2]), np.array([0, 0, 7, 2, 1, 0])
    assert list(best_first(rank_by, seq_ids, pos, me=1, n=3)) == [5, 3, 2]
    assert list(best_first(rank_by, seq_ids, pos, me=5, n=5)) == [1, 3, 2, 0, 4]  # all but `me`


def test_nearest_on_the_grid_equals_the_sql(grid):
    import kvcore

    with kvcore.open_run(grid[0]) as run:
        ours = run.nearest(1, 0, 3, k=5, seq=1, by="value", arrow=True)
        sql = run.arrow(run.query("nearest", 1, 0, 3, k=5, seq=1, by="value"))
    assert ours.column("model").to_pylist() == ["gpt2"] * 5 + ["llama"] * 5
    assert ours.schema == sql.schema
    for c in ("model", "rank", "seq_id", "pos", "token_id", "token", "value_norm"):
        assert ours.column(c).to_pylist() == sql.column(c).to_pylist(), c
    np.testing.assert_allclose(ours.column("cosine_similarity"), sql.column("cosine_similarity"), rtol=1e-5)


def test_sql_and_arrow(case):
    run, ref = case
    df = run.sql("SELECT layer, avg(key_norm) AS m FROM kv GROUP BY layer ORDER BY layer")
    want = [np.mean([norm(v) for *_, v in ref.vectors("key", layer)]) for layer in range(ref.num_layers)]
    np.testing.assert_allclose(df.m, want, rtol=1e-5)
    table = run.coordinate(0, 0, 0, arrow=True)
    assert table.num_rows == 1 and str(table.schema.field("key").type).startswith("fixed_size_list<")
    per_layer = run.sql("SELECT count(*) AS n, min(layer) AS lo, max(layer) AS hi FROM BY_LAYER.kv_1")
    assert (per_layer.n[0], per_layer.lo[0], per_layer.hi[0]) == (sum(ref.lengths) * ref.num_kv, 1, 1)


# ---- one run or the whole grid -----------------------------------------------------------

def test_grid_spans_runs(grid, refs):
    import kvcore

    results, _ = grid
    with kvcore.open_run(results) as run:
        assert sorted(run.info().model) == ["gpt2", "llama"]
        counts = run.sql("SELECT model, dataset, count(*) AS n FROM kv GROUP BY ALL ORDER BY model")
        assert list(counts.dataset) == ["text", "text"]
        assert list(counts.n) == [sum(refs[a].lengths) * refs[a].num_layers * refs[a].num_kv for a in ARCHS]
        both = run.coordinate(0, 1, 2)
        assert list(both.model) == ["gpt2", "llama"]
    with kvcore.open_run(results, model="llama") as run:
        assert list(run.info().model) == ["llama"]


def test_cli_grid_and_model_filter(grid, capsys):
    results, _ = grid
    code, out, _ = cli(capsys, results, "--sql", "SELECT DISTINCT model FROM kv ORDER BY 1", "--format", "csv")
    assert code == 0 and list(csv.reader(io.StringIO(out))) == [["model"], ["gpt2"], ["llama"]]
    code, _, err = cli(capsys, results, "--model", "gpt3")
    assert code == 2 and "no run matches model=gpt3" in err and "gpt2/text" in err


def test_stats_compress_and_ppl_views(grid, tmp_path):
    import pyarrow as pa

    import kvcore

    run_dir = tmp_path / "results" / "gpt2" / "text"
    shutil.copytree(grid[1]["gpt2"], run_dir)
    (run_dir / "stats").mkdir()
    pq.write_table(pa.table({"layer": [0, 1], "kind": ["key", "key"], "kurtosis": [0.1, 0.2]}),
                   run_dir / "stats" / "layers.parquet")
    pq.write_table(pa.table({"layer": [0], "head": [1], "kind": ["value"], "std": [1.5]}),
                   run_dir / "stats" / "heads.parquet")
    (run_dir / "compress").mkdir()
    (run_dir / "compress" / "int8.json").write_text(json.dumps(
        {"compression_ratio": 4.0, "rmse": 0.01, "quality_level": "EXCELLENT", "violations": []}))
    (run_dir / "compress" / "int2.json").write_text(json.dumps(
        {"compression_ratio": 16.0, "rmse": 0.3, "quality_level": "POOR", "violations": ["snr_db < 10"]}))
    (run_dir / "ppl").mkdir()
    (run_dir / "ppl" / "int8.json").write_text(json.dumps({"baseline_perplexity": 10.0, "delta": 0.1}))
    with kvcore.open_run(tmp_path / "results") as run:
        assert {"stats", "stats_layers", "stats_heads", "compress_metrics", "ppl"} <= set(run.views)
        cm = run.sql("SELECT method, compression_ratio, violations FROM compress_metrics ORDER BY method")
        assert list(cm.method) == ["int2", "int8"] and list(cm.compression_ratio) == [16.0, 4.0]
        assert run.sql("SELECT count(*) AS n FROM stats").n[0] == 3
        assert run.sql("SELECT kurtosis FROM stats_layers WHERE layer = 1")["kurtosis"][0] == pytest.approx(0.2)
        joined = run.sql("SELECT c.method, p.delta FROM compress_metrics c JOIN ppl p USING (model, dataset, method)")
        assert list(joined.method) == ["int8"]


def test_partial_run_reads_complete_shards_only(tmp_path):
    """During an extraction: no metadata.json yet, a shard without its manifest is invisible."""
    import kvcore
    from kvcore.query.synthetic import write_synthetic_run

    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=8, n_sequences=6, seq_len=10,
                        shard_size=2, finalize=False)
    (run_dir / "shards" / "kv-00002.json").unlink()  # shard 2 still being written
    (run_dir / "shards" / "layer=0" / "part-00003.parquet").write_bytes(b"PAR1 half-written")
    with kvcore.open_run(run_dir) as run:
        assert run.sql("SELECT count(*) AS n FROM kv").n[0] == 4 * 10 * 2 * 2
        assert sorted(run.sql("SELECT DISTINCT seq_id FROM tokens").seq_id) == [0, 1, 2, 3]
        assert run.info().finalized[0] == False  # noqa: E712 - numpy bool
        assert len(run.sql("SELECT * FROM predictions")) == 4
        with pytest.raises(kvcore.query.QueryError):  # the half-written file is not even readable
            run.sql(f"SELECT * FROM read_parquet('{run_dir}/shards/layer=0/part-00003.parquet')")


def test_finalize_compacts_each_layer_into_one_file(tmp_path, monkeypatch):
    """The shards' parts, in shard order, become one file per layer; a broken part is one clear
    error and no metadata.json, so the run still reads as unfinished."""
    import pyarrow as pa

    import kvcore
    from kvcore import storage
    from kvcore.query.synthetic import write_synthetic_run

    monkeypatch.setattr(storage, "LAYER_ROW_GROUP_ROWS", 30)
    run_dir = tmp_path / "run"
    n = write_synthetic_run(run_dir, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=8, n_sequences=5,
                            seq_len=10, shard_size=2, finalize=False)["n_shards"]
    parts = {layer: pa.concat_tables([pq.read_table(run_dir / storage.part_file(layer, s)) for s in range(n)])
             for layer in range(2)}
    broken = run_dir / storage.part_file(1, 2)
    good = broken.read_bytes()
    broken.write_bytes(good[:len(good) // 2])
    with pytest.raises(KvcoreError, match="part-00002.parquet: unreadable Parquet part"):
        storage.finalize_run(run_dir, n)
    assert not (run_dir / "metadata.json").exists() and not list((run_dir / "kv" / "layer=1").iterdir())
    broken.write_bytes(good)
    meta = storage.finalize_run(run_dir, n)
    assert meta["files"] == ["kv/layer=0/data.parquet", "kv/layer=1/data.parquet"]
    for layer in range(2):
        compacted = pq.ParquetFile(run_dir / storage.layer_file(layer))
        assert compacted.read().equals(parts[layer])  # same rows, same (seq_id, pos, head) order
        groups = [compacted.metadata.row_group(i).num_rows for i in range(compacted.num_row_groups)]
        assert groups == [30] * 3 + [10]  # 5 sequences x 10 positions x 2 heads
    assert not (run_dir / "shards" / "layer=0").exists()  # the parts are gone, the manifests stay
    with kvcore.open_run(run_dir) as run:
        assert run.info().finalized[0] and run.sql("SELECT count(*) AS n FROM kv").n[0] == 2 * 100


# ---- pruning: a point lookup reads one partition and one row group --------------------------

def test_point_lookup_prunes_partitions_and_row_groups(tmp_path, monkeypatch):
    import kvcore
    from kvcore import storage
    from kvcore.query.synthetic import write_synthetic_run

    from kvcore import tokens

    monkeypatch.setattr(storage, "LAYER_ROW_GROUP_ROWS", 64)  # many row groups per layer file
    monkeypatch.setattr(tokens, "TOKEN_ROW_GROUP_ROWS", 32)  # and per tokens.parquet
    layers = 4
    write_synthetic_run(tmp_path / "run", num_layers=layers, num_kv_heads=2, num_heads=4, head_dim=8,
                        n_sequences=6, seq_len=64, shard_size=2)
    groups_per_file = 6 * 64 * 2 // 64  # the shards' parts compacted into one file per layer
    assert sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*.parquet")
                  if "layer=" in str(p)) == [f"kv/layer={i}/data.parquet" for i in range(layers)]
    with kvcore.open_run(tmp_path / "run") as run:
        # the verb lists the one file of layer 2 and sequence 3's shard, and reads one row group
        (scan,) = [s for s in run.scans(run.query("coordinate", 2, 1, 40, seq=3)) if "key" in s["projections"]]
        assert scan["files_read"] == 1
        assert scan["filenames"] == [str((tmp_path / "run/kv/layer=2/data.parquet").resolve())]
        assert (scan["row_groups_scanned"], scan["row_groups_total"]) == (1, groups_per_file)
        # and the hit's token text from one row group of tokens.parquet
        (scan,) = [s for s in run.scans(run.query("coordinate", 2, 1, 40, seq=3)) if "token" in s["projections"]]
        assert scan["filenames"][0].endswith("tokens.parquet")
        assert (scan["row_groups_scanned"], scan["row_groups_total"]) == (1, 6 * 64 // 32)
        # a layer's verbs read only that layer's files
        scans = run.scans(run.query("head_summary", 3, 0))
        assert {f.split("/")[-2] for s in scans for f in s["filenames"] if "/kv/" in f} == {"layer=3"}
        assert run.coordinate(2, 1, 40, seq=3).pos[0] == 40
        # the kv view prunes partitions by the hive `layer` and row groups by (seq_id, pos) statistics
        sql = "SELECT key FROM kv WHERE layer = 2 AND head = 1 AND seq_id = 3 AND pos = 40"
        (scan,) = [s for s in run.scans(sql) if "key" in s["projections"]]
        assert (scan["files_scanned"], scan["files_total"]) == (1, layers)
        assert (scan["row_groups_scanned"], scan["row_groups_total"]) == (1, groups_per_file)
        # a query that never reads token text does not touch tokens.parquet (join eliminated)
        files = [f for s in run.scans("SELECT avg(key_norm) FROM kv WHERE layer = 1") for f in s["filenames"]]
        assert files and not any(f.endswith("tokens.parquet") for f in files)


# ---- norm search: the norm file sorted by the searched norm, only its groups that can match ----

@pytest.fixture
def normed_run(tmp_path, monkeypatch):
    """A finalized synthetic run of 4 layers (random vectors, (layer, head) scales that make the
    norms spread) whose norm files have 2,048-row groups (DuckDB's smallest)."""
    from kvcore import storage
    from kvcore.query.synthetic import write_synthetic_run

    monkeypatch.setattr(storage, "NORM_FILE_ROW_GROUP_ROWS", 2048)
    run_dir = tmp_path / "run"
    meta = write_synthetic_run(run_dir, num_layers=4, num_kv_heads=2, num_heads=2, head_dim=8, n_sequences=16,
                               seq_len=128, shard_size=4)
    return run_dir, meta


def test_finalize_writes_each_kinds_norm_file_sorted_by_that_norm(normed_run):
    import pyarrow as pa

    from kvcore import storage

    run_dir, meta = normed_run
    assert meta["norm_files"] == storage.NORM_FILES == {"key": "norms/key.parquet", "value": "norms/value.parquet"}
    layers = pa.concat_tables(
        [pq.read_table(run_dir / rel).select(["head", "seq_id", "pos", "token_id", "key_norm", "value_norm"])
         .append_column("layer", pa.array([int(rel.split("=")[1].split("/")[0])] * 16 * 128 * 2, pa.int16()))
         for rel in meta["files"]])
    columns = ["layer", "head", "seq_id", "pos", "token_id", "key_norm", "value_norm"]
    for kind, rel in meta["norm_files"].items():
        f = pq.ParquetFile(run_dir / rel)
        assert f.metadata.num_row_groups == 4 * 16 * 128 * 2 // 2048
        table = f.read()
        assert table.column_names == columns
        by_norm = np.lexsort([table.column(c).to_numpy() for c in ("head", "pos", "seq_id", "layer", f"{kind}_norm")])
        assert (by_norm == np.arange(len(table))).all()  # sorted by the norm, ties by (layer, seq_id, pos, head)
        order = ["layer", "seq_id", "pos", "head"]
        assert table.sort_by([(c, "ascending") for c in order]).equals(
            layers.select(columns).sort_by([(c, "ascending") for c in order]))  # every layer file's rows


def test_norm_files_from_an_unreadable_layer_file_are_one_error_and_nothing_written(normed_run):
    from kvcore import storage
    from kvcore.errors import KvcoreError

    run_dir, meta = normed_run
    for rel in meta["norm_files"].values():
        (run_dir / rel).unlink()
    layer = run_dir / meta["files"][1]
    layer.write_bytes(layer.read_bytes()[:1000])
    with pytest.raises(KvcoreError, match="cannot write the run's norm files") as err:
        storage.write_norm_files(run_dir, meta["files"])
    assert "\n" not in str(err.value)
    assert not list((run_dir / "norms").iterdir()) and not list(run_dir.glob(".norms.tmp-*"))


def _without_norm_files(run_dir):
    path = run_dir / "metadata.json"
    meta = json.loads(path.read_text())
    del meta["norm_files"]  # as a run finalized before they were written
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["key", "value"])
def test_search_norm_reads_only_the_norm_files_groups_that_can_match(normed_run, kind):
    """Ranges that hit nothing, one row's exact norm, a few groups, every row: the same rows as the
    kv view's unindexed SQL and as the same run searched in its layer files; only the norm file
    read, and of it only the groups whose range overlaps."""
    import kvcore

    run_dir, meta = normed_run
    norms = np.sort(pq.read_table(run_dir / meta["norm_files"][kind]).column(f"{kind}_norm").to_numpy())
    n = len(norms)
    cases = {"none": (float(norms[-1]) + 1, float(norms[-1]) + 2), "below all": (0.0, float(norms[0]) / 2),
             "one row's norm": (float(norms[n // 3]), float(norms[n // 3])),
             "a few groups": (float(norms[n // 4]), float(norms[n // 4 + 3000])), "all": (0.0, float("inf"))}
    got = {}
    with kvcore.open_run(run_dir) as run:
        for name, (low, high) in cases.items():
            q = run.query("search_norm", low, high, kind)
            got[name] = run.sql(q)
            unindexed = run.sql(f"SELECT model, dataset, layer, head, seq_id, pos, token_id, token, key_norm, "
                                f"value_norm FROM kv WHERE {kind}_norm BETWEEN ? AND ? "
                                "ORDER BY model, dataset, layer, seq_id, pos, head", [low, high])
            assert got[name].equals(unindexed), name
            assert list(got[name].dtypes) == list(unindexed.dtypes), name
            # the norm file alone (DuckDB drops the scan when its statistics rule out every row)
            scans = [s for s in run.scans(q) if "token" not in s["projections"]]
            assert {f for s in scans for f in s["filenames"]} <= {str(run_dir / meta["norm_files"][kind])}
            groups = int(np.ceil(np.searchsorted(norms, high, "right") / 2048)) - np.searchsorted(norms, low) // 2048
            assert sum(s["row_groups_scanned"] for s in scans) <= max(groups, 0) + 1, name  # ties may straddle
        assert len(got["none"]) == len(got["below all"]) == 0 and len(got["all"]) == n
        assert len(got["one row's norm"]) >= 1 and len(got["a few groups"]) >= 3001
        # a layer's, a head's search: those rows of the same search
        low, high = cases["a few groups"]
        by_layer = run.search_norm(low, high, kind, layer=2, head=1)
        assert len(by_layer) and by_layer.equals(
            got["a few groups"].query("layer == 2 and head == 1").reset_index(drop=True))
        empty = run.search_norm(*cases["none"], kind, layer=2)
        assert len(empty) == 0 and list(empty.columns) == list(by_layer.columns)
    _without_norm_files(run_dir)
    with kvcore.open_run(run_dir) as run:
        assert not run.runs[0].norm_files
        for name, (low, high) in cases.items():
            assert run.search_norm(low, high, kind).equals(got[name]), name
        assert {f.split("/")[-2] for s in run.scans(run.query("search_norm", 0, 1e9, kind))
                for f in s["filenames"] if "/kv/" in f} == {f"layer={i}" for i in range(4)}


def test_search_norm_on_a_run_still_extracting_reads_every_part(tmp_path):
    import kvcore
    from kvcore.query.synthetic import write_synthetic_run

    write_synthetic_run(tmp_path / "run", num_layers=2, num_kv_heads=1, num_heads=1, head_dim=4, n_sequences=4,
                        seq_len=8, shard_size=2, finalize=False)
    with kvcore.open_run(tmp_path / "run") as run:
        assert len(run.search_norm(0, float("inf"), "key")) == 2 * 4 * 8


@pytest.mark.parametrize("entry,why", [([], "must map key and value"), ({"key": 3}, "must map key and value"),
                                       ({"keys": "norms/key.parquet"}, "must map key and value"),
                                       ({"key": "norms/gone.parquet"}, "lists norms/gone.parquet, which is missing"),
                                       ({"key": "../../elsewhere.parquet"}, "leaves the run directory")])
def test_broken_norm_files_entry_is_one_error_line(normed_run, capsys, entry, why):
    run_dir, _ = normed_run
    path = run_dir / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "norm_files": entry}))
    code, out, err = cli(capsys, run_dir, "--search-norm", "0", "1")
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    assert why in err, err


def test_explain_flag_shows_the_scan(grid, capsys):
    code, out, _ = cli(capsys, grid[1]["gpt2"], "--coordinate", 1, 0, 3, "--explain")
    assert code == 0 and "Row Groups Scanned: 1 / 1" in out and "layer=1/data.parquet" in out


# ---- plain duckdb, no kvcore -----------------------------------------------------------------

def test_plain_duckdb_reads_the_tables(grid, refs):
    run_dir = grid[1]["llama"]
    script = f"""
import sys, duckdb
rows = duckdb.sql("SELECT * FROM read_parquet('{run_dir}/kv/*/*.parquet', hive_partitioning=true) "
                  "WHERE layer=1 AND head=1 AND pos=7 ORDER BY seq_id").fetchall()
assert not any(m.startswith('kvcore') for m in sys.modules), 'kvcore was imported'
print(len(rows), rows[0][0], list(rows[0][4])[:3])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    ref = refs["llama"]
    with_pos7 = [s for s, n in zip(ref.seq_ids, ref.lengths) if n > 7]
    assert int(out[0]) == len(with_pos7) and int(out[1]) == with_pos7[0]
    np.testing.assert_allclose([float(x.strip("[],")) for x in out[2:]],
                               ref.vector("key", 1, 1, with_pos7[0], 7)[:3], rtol=1e-6)


# ---- the read-only sandbox -----------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM kv) TO '{run}/leak.csv'",
    "COPY kv TO '{run}/kv/layer=0/data.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "CREATE TABLE t AS SELECT 1",
    "CREATE TEMP VIEW v AS SELECT 1",
    "INSERT INTO kv SELECT * FROM kv",
    "ATTACH '{run}/x.duckdb' AS x",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "INSTALL httpfs",
    "EXPLAIN ANALYZE COPY kv TO '{run}/x.csv'",
    "SELECT 1; DROP VIEW kv",
])
def test_writes_and_outside_reads_are_refused(grid, capsys, sql):
    run_dir = grid[1]["gpt2"]
    code, out, err = cli(capsys, run_dir, "--sql", sql.format(run=run_dir))
    assert code == 1 and out == ""
    assert err.startswith("kvcore: error: ") and err.count("\n") == 1
    assert "read-only" in err or "refused" in err
    assert not (run_dir / "leak.csv").exists() and not (run_dir / "x.duckdb").exists()


def test_other_runs_files_are_outside_a_filtered_grid(grid):
    import kvcore

    results, runs = grid
    with kvcore.open_run(results, model="gpt2") as run, pytest.raises(kvcore.query.QueryError, match="refused"):
        run.sql(f"SELECT count(*) FROM read_parquet('{runs['llama']}/tokens.parquet')")


# ---- output formats and exports ------------------------------------------------------------

def test_formats(grid, capsys):
    run_dir = grid[1]["llama"]
    code, out, _ = cli(capsys, run_dir, "--search-norm", 0, 100, "value", "--layer", 0, "--format", "json")
    records = json.loads(out)
    assert code == 0 and {"layer", "head", "seq_id", "pos", "token", "value_norm"} <= set(records[0])
    code, out, _ = cli(capsys, run_dir, "--coordinate", 1, 1, 2, "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(json.loads(row["key"])) == 16
    code, out, _ = cli(capsys, run_dir, "--list-tokens", "--limit", 3)
    assert code == 0 and out.strip().endswith("(3 rows)") and len(out.strip().splitlines()) == 6
    code, out, _ = cli(capsys, run_dir, "--search-norm", 0, 100)  # 100s of rows: the table is cut at 50
    assert code == 0 and "more exist" in out
    code, out, _ = cli(capsys, run_dir, "--coordinate", 1, 1, 2)  # one record: vectors in full
    assert code == 0 and "key        : [16 values]" in out
    code, out, _ = cli(capsys, run_dir, "--head-summary", 0, 1, "--show-sql")
    assert code == 0 and "FROM by_layer.kv_0" in out and "WHERE head = 1" in out


def test_exports_are_complete_files(grid, capsys, tmp_path):
    import kvcore

    run_dir = grid[1]["gpt2"]
    csv_path, pq_path = tmp_path / "hits.csv", tmp_path / "out" / "hits.parquet"
    code, out, err = cli(capsys, run_dir, "--search-norm", 0.1, 100, "key", "--export-csv", csv_path,
                         "--export-parquet", pq_path)
    with kvcore.open_run(run_dir) as run:
        want = run.search_norm(0.1, 100, "key")
    assert code == 0 and out == "" and f"wrote {len(want)} rows to {csv_path}" in err
    assert len(list(csv.DictReader(csv_path.open()))) == len(want)
    table = pq.read_table(pq_path)
    assert table.num_rows == len(want) and table.column("pos").to_pylist() == list(want.pos)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hits.csv", "hits.parquet", "out"]  # no temp files
    code, _, _ = cli(capsys, run_dir, "--coordinate", 0, 0, 0, "--export-parquet", tmp_path / "c.parquet")
    vec = pq.read_table(tmp_path / "c.parquet").schema.field("key").type
    assert code == 0 and vec.list_size == 16


# ---- the shell -----------------------------------------------------------------------------

def test_shell_reads_statements_from_stdin(grid, refs, capsys, monkeypatch):
    script = """.tables
SELECT layer, count(*) AS n
FROM kv GROUP BY layer ORDER BY layer;
.schema tokens
SELECT nope FROM kv;
CREATE TABLE t AS SELECT 1;
.format csv
SELECT count(*) AS tokens FROM tokens
"""
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = cli(capsys, grid[1]["gpt2"], "--shell")
    assert code == 1  # statements failed: a script's exit code says so
    assert "kv" in out.splitlines()[0] and "tokens(model VARCHAR" in out
    assert "layer    n" in out  # a table, then CSV after .format csv
    assert out.strip().splitlines()[-2:] == ['"tokens"', str(sum(refs["gpt2"].lengths))]
    assert len(err.splitlines()) == 2 and "nope" in err and "read-only" in err


# ---- bad input: one line, exit 2 for usage, 1 for failed queries ------------------------------

@pytest.mark.parametrize("argv,code,message", [
    (["--coordinate", 9, 0, 0], 2, "layer 9 out of range: valid layers 0..1"),
    (["--coordinate", 0, 2, 0], 2, "head 2 out of range: valid KV heads 0..1; heads are KV heads: llama/text "
                                   "has 4 query heads sharing 2 KV heads, query head h reads KV head h // 2"),
    (["--coordinate", 0, 0, 99], 2, "token 99 out of range for seq 0: valid positions 0..9"),
    (["--coordinate", 0, 0, 0, "--seq", 42], 2, "seq 42 not found: valid seq ids 0..4"),
    (["--nearest", 0, 0, 0, "--k", 0], 2, "argument --k: must be an integer from 1 to 1000000"),
    (["--search-norm", 2, 1], 2, "empty norm range"),
    (["--search-norm", 0, 1, "query"], 2, "the norm is of 'key' or 'value'"),
    (["--search-norm", "a", 1], 2, "LOW and HIGH must be numbers"),
    (["--coordinate", 0, 0, 0, "--k", 3], 2, "--k applies to --nearest only"),
    (["--frobnicate"], 2, "unknown argument '--frobnicate'; verbs: --info, --coordinate"),
    (["--coordinate", "x", 0, 0], 2, "argument --coordinate: must be an integer from 0 to 2147483647"),
    (["--format", "xml"], 2, "invalid choice: 'xml'"),
    (["--sql", "SELECT nope FROM kv"], 1, 'Referenced column "nope" not found'),
    (["--sql", "SELECT nope FROM kv"], 1, "(kv columns: model, dataset, layer, seq_id, pos, head, token_id, token, "
                                          "key_norm, value_norm, key, value)"),
    (["--sql", "SELECT * FROM kvv"], 1, "views: runs, tokens, kv_rows, kv, predictions"),
    (["--sql", "SELEC 1"], 1, "Parser Error: syntax error"),
    (["--sql", "  "], 1, "no SQL statement given"),
])
def test_bad_input(grid, capsys, argv, code, message):
    got, out, err = cli(capsys, grid[1]["llama"], *argv)
    assert (got, out) == (code, "")
    assert err.startswith("kvcore: error: ") and err.count("\n") == 1 and message in err, err


def test_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, tmp_path / "empty")
    assert code == 2 and "is not a run directory: no metadata.json or shards/kv-*.json" in err
    code, _, err = cli(capsys, tmp_path / "missing")
    assert code == 2 and "no such directory" in err
    run = tmp_path / "broken"
    (run / "shards").mkdir(parents=True)
    (run / "shards" / "kv-00000.json").write_text(json.dumps(
        {"shard": 0, "seq_ids": [0], "seq_lengths": [3], "files": ["kv/layer=0/part-00000.parquet"],
         "num_layers": 1, "num_kv_heads": 1, "head_dim": 4}))
    code, _, err = cli(capsys, run)
    assert code == 1 and "lists kv/layer=0/part-00000.parquet, which is missing" in err


def test_default_verb_is_info(grid, capsys):
    code, out, _ = cli(capsys, grid[1]["gpt2"])
    assert code == 0 and "num_kv_heads : 4" in out and "views        : [kv, tokens, predictions]" in out


def test_show_sql_runs_as_printed(grid, capsys):
    run_dir = grid[1]["llama"]
    code, sql, _ = cli(capsys, run_dir, "--nearest", 1, 0, 2, "--seq", 1, "--k", 4, "--show-sql")
    assert code == 0
    _, by_verb, _ = cli(capsys, run_dir, "--nearest", 1, 0, 2, "--seq", 1, "--k", 4, "--format", "csv")
    _, by_sql, _ = cli(capsys, run_dir, "--sql", sql, "--format", "csv")
    assert by_verb == by_sql and len(by_verb.splitlines()) == 5


def test_runs_with_the_same_name_are_refused(tmp_path, capsys):
    from kvcore.query.synthetic import write_synthetic_run

    for d in ("a", "b"):
        write_synthetic_run(tmp_path / "results" / d, num_layers=1, num_kv_heads=1, num_heads=1, head_dim=4,
                            n_sequences=1, seq_len=4, shard_size=1)
    code, _, err = cli(capsys, tmp_path / "results")
    assert code == 2 and "two runs are both synthetic/random" in err
    code, _, _ = cli(capsys, tmp_path / "results" / "a")
    assert code == 0


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_on_bf16_safetensors_equals_float64_brute_force(tmp_path, monkeypatch, metric):
    """A bf16 run (the synthetic writer's, as a bf16 model caches): the vectors widened from its
    safetensors, scored block by block, rank as float64 numpy ranks the Parquet's vectors."""
    import kvcore
    from kvcore.query import nearest
    from kvcore.query.synthetic import write_synthetic_run

    monkeypatch.setattr(nearest, "BLOCK_ROWS", 25)  # blocks of two sequences, over three shards
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, n_sequences=6,
                        seq_len=12, shard_size=2, seed=3)
    layer, head, seq, pos, k = 1, 1, 3, 5, 8
    t = pq.read_table(run_dir / "kv/layer=1/data.parquet")
    t = t.filter(t.column("head").to_numpy() == head)
    x = np.stack(t.column("key").to_numpy(zero_copy_only=False)).astype(np.float64)
    ids = list(zip(t.column("seq_id").to_pylist(), t.column("pos").to_pylist()))
    me = ids.index((seq, pos))
    if metric == "cosine":
        scores = x @ x[me] / (np.linalg.norm(x, axis=1) * np.linalg.norm(x[me]))
        order = [i for i in np.lexsort((np.arange(len(ids)), -scores)) if i != me]
    else:
        scores = np.linalg.norm(x - x[me], axis=1)
        order = [i for i in np.lexsort((np.arange(len(ids)), scores)) if i != me]
    with kvcore.open_run(run_dir) as run:
        assert nearest.tensor_candidates(run.runs[0], layer, head, "key") is not None  # read from safetensors
        got = run.nearest(layer, head, pos, k=k, seq=seq, metric=metric)
    assert list(zip(got.seq_id, got.pos)) == [ids[i] for i in order[:k]]
    column = "cosine_similarity" if metric == "cosine" else "l2_distance"
    np.testing.assert_allclose(got[column], scores[order[:k]], rtol=1e-5)
    np.testing.assert_array_equal(got.key_norm, t.column("key_norm").to_numpy()[order[:k]])


def test_token_index_finds_each_position_and_only_those():
    import pyarrow as pa

    from kvcore.query.nearest import TokenIndex

    table = pa.table({"seq_id": pa.array([2, 0, 0, 1], pa.int32()), "pos": pa.array([0, 1, 0, 5], pa.int32()),
                      "token_id": pa.array([7, 8, 9, 10], pa.int32()), "token": ["c", "b", "a", "d"]})
    index = TokenIndex(table)
    assert index.lookup([0, 2, 1, 1, 3], [0, 0, 5, 4, 0]) == ([9, 7, 10, None, None], ["a", "c", "d", None, None])
    assert TokenIndex(table.slice(0, 0)).lookup([0], [0]) == ([None], [None])


def test_an_interrupted_first_search_keeps_no_norms(tmp_path, monkeypatch):
    """Norms are kept for later searches only once every block's are in."""
    from kvcore.query import nearest
    from kvcore.query.discover import load_runs
    from kvcore.query.synthetic import write_synthetic_run

    monkeypatch.setattr(nearest, "BLOCK_ROWS", 10)
    write_synthetic_run(tmp_path / "run", num_layers=1, num_kv_heads=1, num_heads=1, head_dim=8, n_sequences=4,
                        seq_len=10, shard_size=2)
    (r,) = load_runs(tmp_path / "run")
    want = nearest.RunCandidates(nearest.tensor_candidates(r, 0, 0, "key")).top(1, 3, 5, "cosine")
    c = nearest.RunCandidates(nearest.tensor_candidates(r, 0, 0, "key"))
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x)

    real = nearest.vector_norms
    monkeypatch.setattr(nearest, "vector_norms", failing)
    with pytest.raises(KeyboardInterrupt):
        c.top(1, 3, 5, "cosine")
    assert c.norms is None
    monkeypatch.setattr(nearest, "vector_norms", real)
    got = c.top(1, 3, 5, "cosine")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
