"""Run and grid reports, the summary table, and the snakemake --report captions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvcore import plots, report, stats
from kvcore.errors import KvcoreError
from kvcore.storage import shard_files

ROOT = Path(__file__).resolve().parents[1]
BASE = 20.0


def ppl(method, family, protocol, delta, **extra):
    return {"method": method, "family": family, "protocol": protocol, "baseline_perplexity": BASE,
            "compressed_perplexity": BASE + delta, "delta": delta, "delta_percent": 100 * delta / BASE,
            "passed": delta < 0.5, "threshold": 0.5, "seconds": 1.5, "tokens_per_second": 1000.0, **extra}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """results/ with one extracted run carrying results, and one run that has only a baseline."""
    from kvcore.extract import Extractor
    from kvcore.sources.models import prepare_model

    root = tmp_path_factory.mktemp("grid")
    model = prepare_model("tiny-llama", {"source": "random-init", "architecture": "llama"}, root / "tiny-llama")
    run = root / "results" / "tiny-llama" / "prompts"
    Extractor(model, device="cpu", dtype="float32").extract_to_run(
        ["The quick brown fox jumps over the lazy dog.", "A key and a value are stored for every token."], run,
        dataset_name="prompts")
    stats.write_stats(shard_files(run), run / "stats", run / "metadata.json")
    (run / "ppl").mkdir()
    (run / "compress").mkdir()
    (run / "ppl" / "baseline.json").write_text(json.dumps(ppl("baseline", "none", "fake-quant", 0.0)))
    # kvcore.evaluation.perplexity's layout: the primary protocol's record on top, every protocol under `protocols`
    fq, pc = ppl("int4-g64", None, "fake-quant", 0.1), ppl("int4-g64", None, "prefill-compress", 0.05)
    (run / "ppl" / "int4-g64.json").write_text(json.dumps({**fq, "spec": {"family": "quant", "bits": 4},
                                                           "protocols": {"fake-quant": fq, "prefill-compress": pc}}))
    (run / "ppl" / "int2-g64.json").write_text(json.dumps([ppl("int2-g64", None, "fake-quant", 2.0)]))
    (run / "ppl" / "drop-l1.json").write_text(json.dumps(ppl("drop-l1", "prune", "prefill-compress", 0.3)))
    for name, bits in (("int4-g64", 4.5), ("int2-g64", 2.5)):
        (run / "compress" / f"{name}.json").write_text(json.dumps({
            "method": name, "family": "quant", "compression_ratio": 16 / bits, "bits_per_element": bits,
            "original_size_bytes": 1000, "compressed_size_bytes": int(1000 * bits / 16), "rmse": 0.01,
            "snr_db": 30.0, "cosine_similarity": 0.999, "max_error": 0.05, "quality_level": "GOOD", "passed": True}))
    (run / "compress" / "topk-10.json").write_text(json.dumps({  # compressed, not evaluated yet
        "method": "topk-10", "family": "sparsify", "bits_per_element": 3.9, "compression_ratio": 4.1,
        "compressed_size_bytes": 10, "quality_level": "POOR", "passed": False}))
    other = root / "results" / "tiny-llama" / "other"
    (other / "ppl").mkdir(parents=True)
    (other / "ppl" / "baseline.json").write_text(json.dumps(ppl("baseline", "none", "fake-quant", 0.0)))
    methods = {"baseline": {"family": "none"}, "int2-g64": {"family": "quant", "bits": 2},
               "drop-l1": {"family": "prune", "layers": [1]}}
    return root / "results", run, methods


def results_of(run):
    """The fixture's result files of one run (the rules name theirs from the config)."""
    return sorted((run / "ppl").glob("*.json")) + sorted((run / "compress").glob("*.json"))


def all_results(results):
    return [p for run in ("prompts", "other") for p in results_of(results / "tiny-llama" / run)]


def test_only_the_named_files_are_read(grid):
    _, run, methods = grid
    named = [run / "ppl" / "baseline.json", run / "compress" / "int4-g64.json"]
    assert {r["method"] for r in report.collect_results(named, methods)} == {"baseline", "int4-g64"}
    rows = report.summary_table(named, methods).to_pylist()
    assert {(r["model"], r["dataset"], r["method"]) for r in rows} == {("tiny-llama", "prompts", "baseline"),
                                                                      ("tiny-llama", "prompts", "int4-g64")}


def test_the_tasks_section_shows_the_named_task_files_only(grid, tmp_path):
    results, run, _ = grid
    needle = results / "tiny-llama" / "tasks" / "needle"
    needle.mkdir(parents=True, exist_ok=True)
    (needle / "snapkv.json").write_text(json.dumps({"accuracy": 0.75}))
    (needle / "removed.json").write_text(json.dumps({"accuracy": 0.5}))  # a method no longer configured
    text = report.write_run_report(run, tmp_path / "r.md", tasks=[needle / "snapkv.json"]).read_text()
    assert "## Tasks" in text and "| needle | snapkv | 0.75 |" in text and "removed" not in text
    grid_md = report.write_grid_report([run], tmp_path / "g.md", tasks=[needle / "snapkv.json"]).read_text()
    assert "| needle | snapkv | 0.75 |" in grid_md and "removed" not in grid_md
    assert "## Tasks" not in report.write_run_report(run, tmp_path / "none.md").read_text()


def test_collect_results(grid):
    _, run, methods = grid
    records = {(r["method"], r["protocol"]): r for r in report.collect_results(results_of(run), methods)}
    assert set(records) == {("baseline", "fake-quant"), ("int4-g64", "fake-quant"), ("int4-g64", "prefill-compress"),
                            ("int2-g64", "fake-quant"), ("drop-l1", "prefill-compress"), ("topk-10", None)}
    r = records[("int4-g64", "prefill-compress")]
    assert r["bits_per_element"] == 4.5 and r["delta_percent"] == pytest.approx(0.25) and r["compress_passed"]
    assert records[("int2-g64", "fake-quant")]["family"] == "quant"  # from compress json / config
    assert records[("drop-l1", "prefill-compress")]["params"] == {"layers": [1]}  # from the config
    assert records[("int4-g64", "fake-quant")]["params"] == {"bits": 4}  # from the ppl file's spec
    assert records[("int4-g64", "fake-quant")]["family"] == "quant"
    assert records[("topk-10", None)]["compressed_perplexity"] is None


def test_run_report(grid, tmp_path):
    results, run, methods = grid
    plots.write_plots(run, names=["layer_statistics", "compression_tradeoff", "layer_pruning_potential"],
                      methods=methods, results=results_of(run))
    out = report.write_run_report(run, methods=methods, results=results_of(run))
    text = out.read_text()
    assert out == run / "report.md"
    assert text.startswith("# KV cache report: tiny-llama on prompts")
    # every linked image exists, relative to the report; plots not drawn are not linked
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).stem for link in links) == ["compression_tradeoff", "layer_pruning_potential",
                                                         "layer_statistics"]
    for link in links:
        assert (out.parent / link).is_file() and not Path(link).is_absolute()
    for caption in (report.CAPTIONS["layer_statistics"], report.CAPTIONS["compression_tradeoff"]):
        assert caption in text
    # tables: perplexity (one row per method × protocol), compression (one per compressed method), statistics
    section = lambda name: text.split(f"## {name}")[1].split("\n## ")[0]  # noqa: E731
    ppl_rows = [line for line in section("Perplexity").splitlines() if line.startswith("| ") and "---" not in line]
    assert len(ppl_rows) == 1 + 5 and any("int4-g64 | quant | prefill-compress | 4.5" in r for r in ppl_rows)
    assert "+0.25" in section("Perplexity") and "❌" in section("Perplexity")
    comp = [line for line in section("Compression").splitlines() if line.startswith("| ") and "---" not in line]
    assert len(comp) == 1 + 3 and any("topk-10 | sparsify" in r and "POOR" in r for r in comp)
    meta = json.loads((run / "metadata.json").read_text())
    stat_rows = [line for line in section("Statistics per layer").splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(stat_rows) == meta["num_layers"]
    layers = stats.read_stats(run / "stats")["layers"].to_pandas()
    std0 = layers[(layers.kind == "key") & (layers.layer == 0)]["std"].iloc[0]
    assert stat_rows[0].split(" | ")[1] == f"{std0:.3g}"
    assert "[All runs](../../report.md)" in text


def test_report_of_an_unextracted_run(grid, tmp_path):
    results, _, _ = grid
    text = report.write_run_report(results / "tiny-llama" / "other", tmp_path / "r.md").read_text()
    assert "Not extracted yet" in text and "No compression methods configured." in text
    assert "## Plots" not in text and "## Statistics per layer" not in text


def test_summary_parquet(grid, tmp_path):
    results, run, methods = grid
    path = report.write_summary(all_results(results), tmp_path / "summary.parquet", methods)
    table = pq.read_table(path)
    assert table.column_names == [name for name, _ in report.SUMMARY_COLUMNS]
    df = table.to_pandas()
    assert len(df) == 6 + 1  # the run's six records + the other run's baseline
    row = df[(df.method == "int4-g64") & (df.protocol == "fake-quant")].iloc[0]
    assert (row.model, row.dataset, row.bits_per_element, row.quality_level) == ("tiny-llama", "prompts", 4.5, "GOOD")
    assert row.delta == pytest.approx(0.1) and bool(row.passed)
    empty = pq.read_table(report.write_summary([], tmp_path / "empty.parquet"))
    assert empty.num_rows == 0 and empty.schema == table.schema


def test_grid_report(grid, tmp_path):
    results, run, methods = grid
    report.write_run_report(run, methods=methods, results=results_of(run))
    runs = [results / "tiny-llama" / "prompts", results / "tiny-llama" / "other"]
    out = report.write_grid_report(runs, results / "report.md", all_results(results), methods)
    text = out.read_text()
    assert out == results / "report.md"
    assert "| tiny-llama | prompts |" in text and "| tiny-llama | other |" in text
    assert "int4-g64 (4.5 bits, +0.25%)" in text  # fewest bits that passed
    for link in re.findall(r"\]\(([^)]+\.(?:md|png))\)", text):
        assert (out.parent / link).is_file(), link
    assert "2 run(s)" in text
    empty = report.write_grid_report([], tmp_path / "none.md").read_text()
    assert "No runs" in empty


def test_bad_result_json_is_a_clear_error(tmp_path):
    (tmp_path / "ppl").mkdir()
    (tmp_path / "ppl" / "x.json").write_text("{not json")
    with pytest.raises(KvcoreError, match="x.json: not a readable JSON result"):
        report.collect_results([tmp_path / "ppl" / "x.json"])


def test_every_plot_has_a_caption_and_a_report_rst():
    import docutils.core
    import io

    figures = list(plots.ALL_PLOTS) + ["attention_sinks"]
    assert all(name in report.CAPTIONS for name in figures)
    for name in figures + ["perplexity_table", "compression_table", "summary"]:  # + the --report tables
        rst = ROOT / "workflow" / "report" / f"{name}.rst"
        assert rst.is_file(), rst
        text = rst.read_text().replace("{{ snakemake.wildcards.model }}", "m").replace(
            "{{ snakemake.wildcards.dataset }}", "d")
        errors = io.StringIO()
        docutils.core.publish_string(text, writer="html",
                                     settings_overrides={"warning_stream": errors, "report_level": 2})
        assert not errors.getvalue(), (name, errors.getvalue())


def test_the_html_tables_hold_the_markdown_tables_rows(grid, tmp_path):
    """perplexity.html / summary.html (for `snakemake --report`): the same rows as the markdown page and
    the Parquet file, cell for cell."""
    import html

    results, run, methods = grid
    ppl_files = [run / "ppl" / f"{m}.json" for m in ("baseline", "int4-g64", "drop-l1")]
    md = report.write_perplexity_table({"tiny": ppl_files}, tmp_path / "p.md", tmp_path / "p.html").read_text()
    page = (tmp_path / "p.html").read_text()
    md_rows = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
               for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    html_rows = [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", line)]
                 for line in page.splitlines() if line.startswith("<tr>")]
    assert len(md_rows) == 3 and html_rows == md_rows  # the header, int4-g64 under each of its two protocols
    report.write_summary(all_results(results), tmp_path / "s.parquet", methods, tmp_path / "s.html")
    summary = (tmp_path / "s.html").read_text()
    assert summary.count("<tr") == 1 + pq.read_table(tmp_path / "s.parquet").num_rows and "int4-g64" in summary
