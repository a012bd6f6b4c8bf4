"""Every plot is written as a sane PNG and returns exactly the statistics it drew."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvcore import plots, stats
from kvcore.errors import UsageError
from kvcore.storage import shard_files
from test_stats import synthetic_run  # tests/ is on sys.path under pytest

RECORDS = [
    {"method": "baseline", "family": "none", "protocol": "fake-quant", "delta_percent": 0.0},
    {"method": "int4", "family": "quant", "protocol": "fake-quant", "bits_per_element": 4.5, "delta_percent": 0.4,
     "passed": True, "threshold": 0.5, "baseline_perplexity": 20.0},
    {"method": "int4", "family": "quant", "protocol": "prefill-compress", "bits_per_element": 4.5,
     "delta_percent": 0.2, "passed": True},
    {"method": "int2", "family": "quant", "protocol": "fake-quant", "bits_per_element": 2.5, "delta_percent": 12.0,
     "passed": False},
    {"method": "kvzip-50", "family": "evict", "protocol": "prefill-compress", "bits_per_element": 8.3,
     "delta_percent": 0.3, "passed": True},
    {"method": "prune-l1", "family": "prune", "protocol": "prefill-compress", "delta_percent": 5.0,
     "params": {"layers": [1]}},
    {"method": "prune-h0.1", "family": "prune", "protocol": "prefill-compress", "delta_percent": 1.0,
     "params": {"layers": [], "heads": [[0, 1]]}},
    {"method": "prune-h3.0-3.1", "family": "prune", "protocol": "prefill-compress", "delta_percent": 2.0,
     "params": {"heads": [[3, 0], [3, 1]]}},
    {"method": "prune-l0-2", "family": "prune", "protocol": "prefill-compress", "delta_percent": 9.0,
     "params": {"layers": [0, 2]}},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = synthetic_run(tmp_path_factory.mktemp("plots") / "run", n_layers=4, n_kv=2, seq_len=40, dim=8)
    stats.write_stats(shard_files(run_dir), run_dir / "stats", run_dir / "metadata.json")
    return run_dir


@pytest.fixture(scope="module")
def tables(run):
    return stats.read_stats(run / "stats")


@pytest.fixture(scope="module")
def drawn(run, tmp_path_factory):
    """write_plots once over the run, with result records and an attention table: (plots dir, data)."""
    (run / "ppl").mkdir(exist_ok=True)
    for r in RECORDS:
        (run / "ppl" / f"{r['method']}-{r['protocol']}.json").write_text(json.dumps(r))
    attention = pa.table({"layer": [0, 0, 1, 1], "head": [0, 0, 0, 0], "key_pos": [0, 1, 0, 1],
                          "attention": [0.6, 0.4, 0.9, 0.1]})
    (run / "attention").mkdir(exist_ok=True)
    pq.write_table(attention, run / "attention" / "sinks.parquet")
    out = tmp_path_factory.mktemp("drawn") / "plots"
    return out, plots.write_plots(run, out, results=sorted((run / "ppl").glob("*.json")))


def check_png(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", raw[16:24])  # the IHDR chunk
    assert 600 <= width <= 4000 and 400 <= height <= 3000, (path.name, width, height)
    assert len(raw) > 15_000, (path.name, len(raw))
    assert not list(path.parent.glob(".*tmp-*")), "temporary files left behind"


def pandas(tables, name):
    return tables[name].to_pandas()


def test_layer_statistics(tables, drawn):
    data = drawn[1]["layer_statistics"]
    check_png(drawn[0] / "layer_statistics.png")
    layers = pandas(tables, "layers")
    for kind in stats.KINDS:
        rows = layers[layers.kind == kind].sort_values("layer")
        for field in ("sparsity", "std", "mean_abs", "mean", "kurtosis", "outlier_ratio"):
            np.testing.assert_array_equal(data[f"{kind}_{field}"], rows[field].to_numpy())
    np.testing.assert_array_equal(data["kv_correlation"],
                                  layers[layers.kind == "key"].sort_values("layer")["kv_correlation"].to_numpy())


def test_head_sparsity(tables, drawn):
    data = drawn[1]["head_sparsity"]
    check_png(drawn[0] / "head_sparsity.png")
    for row in pandas(tables, "heads").itertuples():
        assert data[row.kind][row.layer, row.head] == pytest.approx(100 * row.sparsity)


def test_weight_magnitude_distribution(tables, drawn):
    data = drawn[1]["weight_magnitude_distribution"]
    check_png(drawn[0] / "weight_magnitude_distribution.png")
    hist = pandas(tables, "histograms")
    heads = pandas(tables, "heads")
    for kind in stats.KINDS:
        exp = hist[hist.kind == kind].groupby("bin")["count"].sum().sort_index().to_numpy()
        np.testing.assert_array_equal(data[f"{kind}_counts"], exp)
        assert data[f"{kind}_counts"].sum() == heads[heads.kind == kind]["n_elements"].sum()
        np.testing.assert_array_equal(np.sort(data[f"{kind}_thresholds"]),
                                      np.sort(heads[heads.kind == kind]["sparsity_threshold"].to_numpy()))
    assert len(data["edges"]) == len(data["key_counts"]) - 1


def test_channel_outliers(tables, drawn):
    data = drawn[1]["channel_outliers"]
    check_png(drawn[0] / "channel_outliers.png")
    ch = pandas(tables, "channels")
    dim = ch["channel"].max() + 1
    for row in ch.itertuples():
        assert data[row.kind][row.layer, row.head * dim + row.channel] == row.mean_abs
    # the synthetic keys carry an outlier channel (channel 1, offset 20 × layer)
    assert data["key_outlier_ratio"].min() > 5
    np.testing.assert_array_equal(data["key_outlier_ratio"], pandas(tables, "layers").query("kind == 'key'")
                                  .sort_values("layer")["outlier_ratio"].to_numpy())


def test_key_norm_by_position(tables, drawn):
    data = drawn[1]["key_norm_by_position"]
    check_png(drawn[0] / "key_norm_by_position.png")
    ps = pandas(tables, "positions")
    exp = ps.groupby(["kind", "layer", "pos"])["norm_mean"].mean()
    for (kind, layer, pos), v in exp.items():
        assert data[kind][layer, pos] == pytest.approx(v)
    edges = data["bin_edges"]
    assert edges[0] == 0 and edges[-1] == data["key"].shape[1]
    np.testing.assert_allclose(data["key_binned"][:, -1], data["key"][:, edges[-2]:].mean(1))


def test_cross_layer_similarity(tables, drawn):
    data = drawn[1]["cross_layer_similarity"]
    check_png(drawn[0] / "cross_layer_similarity.png")
    cross = pandas(tables, "cross_layer").groupby(["kind", "layer_a", "layer_b"])["cosine_mean"].mean()
    for (kind, a, b), v in cross.items():
        assert data[kind][a, b] == pytest.approx(v)
    for row in pandas(tables, "layer_cka").itertuples():
        assert data[f"{row.kind}_cka"][row.layer_a, row.layer_b] == row.cka
    heads = pandas(tables, "layers")
    nxt = heads[(heads.kind == "key") & heads.cos_next_layer.notna()].sort_values("layer")["cos_next_layer"]
    np.testing.assert_allclose(data["key_next_layer"], nxt.to_numpy())


def test_pruning_plots(tables, drawn, tmp_path):
    pot = stats.pruning_potential(tables)
    data = drawn[1]["pruning_heatmap_by_layer_head"]
    check_png(drawn[0] / "pruning_heatmap_by_layer_head.png")
    for layer, head, p in zip(pot["layer"], pot["head"], pot["potential"]):
        assert data["potential"][layer, head] == p
    assert {(tuple(r["layers"]), tuple(r["heads"])) for r in data["measured"]} == \
        {((1,), ()), ((), ((0, 1),)), ((), ((3, 0), (3, 1))), ((0, 2), ())}
    data = drawn[1]["layer_pruning_potential"]
    check_png(drawn[0] / "layer_pruning_potential.png")
    np.testing.assert_array_equal(data["potential"], pot["layer_potential"])
    data = drawn[1]["head_pruning_potential"]
    check_png(drawn[0] / "head_pruning_potential.png")
    assert data["top"][0][2] == pytest.approx(pot["potential"].max())
    np.testing.assert_allclose(data["head_mean"], [pot["potential"][pot["head"] == h].mean() for h in range(2)])
    # without any pruning runs the plots still draw, with nothing measured
    assert plots.plot_layer_pruning_potential(tables, tmp_path / "d.png")["measured"] == []
    check_png(tmp_path / "d.png")


def test_compression_tradeoff(drawn):
    data = drawn[1]["compression_tradeoff"]
    check_png(drawn[0] / "compression_tradeoff.png")
    got = {(p["method"], p["protocol"]): (p["bits_per_element"], p["delta_percent"]) for p in data["points"]}
    assert got == {(r["method"], r["protocol"]): (r["bits_per_element"], r["delta_percent"]) for r in RECORDS
                   if r.get("bits_per_element") is not None and r["family"] != "none"}
    # the fake-quant quant frontier: 2.5 bits / 12 %, then 4.5 bits / 0.4 %
    assert data["frontiers"][("quant", "fake-quant")] == [(2.5, 12.0), (4.5, 0.4)]


def test_compression_tradeoff_without_methods_still_writes_a_plot(tmp_path):
    data = plots.plot_compression_tradeoff(RECORDS[:1], tmp_path / "a.png")
    assert data == {"points": [], "frontiers": {}}
    raw = (tmp_path / "a.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_sinks(tmp_path):
    rows = [(layer, head, pos, (0.5 if pos == 0 else 0.5 / 9) * (1 + head)) for layer in range(3) for head in range(2)
            for pos in range(10)]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("layer", "head", "key_pos", "attention"))})
    data = plots.plot_attention_sinks(table, tmp_path / "a.png")
    check_png(tmp_path / "a.png")
    np.testing.assert_allclose(data["sink_fraction"], 0.5)
    assert data["matrix"][1, 0] == pytest.approx(0.75)


def test_write_plots_draws_every_plot(run, drawn, tmp_path):
    out_dir, out = drawn
    assert set(out) == set(plots.ALL_PLOTS) | {"attention_sinks"}
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{name}.png" for name in out)
    for name in out:
        check_png(out_dir / f"{name}.png")
    assert out["attention_sinks"]["sink_fraction"] == pytest.approx([0.6, 0.9])
    only = plots.write_plots(run, tmp_path / "some", names=["head_sparsity"])
    assert set(only) == {"head_sparsity"} and [p.name for p in (tmp_path / "some").iterdir()] == ["head_sparsity.png"]
    (run / "attention" / "sinks.parquet").rename(run / "attention" / "away.parquet")
    try:  # named but absent: skipped
        assert plots.write_plots(run, tmp_path / "none", names=["attention_sinks"]) == {}
    finally:
        (run / "attention" / "away.parquet").rename(run / "attention" / "sinks.parquet")
    with pytest.raises(UsageError, match="unknown plot"):
        plots.write_plots(run, tmp_path / "x", names=["nope"])
