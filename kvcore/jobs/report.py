"""The report rules' jobs: the plots of a run, its report, the grid's report, summary and tables."""

from __future__ import annotations

from pathlib import Path


def plots(pngs, methods: dict | None = None, results=()) -> None:
    """Draw the plots named by `pngs` (results/{model}/{dataset}/plots/{name}.png). plots_cache passes
    neither methods nor results: it draws the statistics only."""
    from kvcore.plots import write_plots

    out = Path(pngs[0]).parent
    write_plots(out.parent, out, names=[Path(p).stem for p in pngs], methods=methods, results=list(results))


def run_report(md, methods: dict, results, tasks) -> None:
    from kvcore.report import write_run_report

    write_run_report(Path(md).parent, md, methods=methods, results=list(results), tasks=list(tasks))


def grid_report(reports, results, tasks, methods: dict, md, summary, summary_html) -> None:
    """results/report.md, results/summary.parquet (and its HTML table) from exactly these run reports and
    result files."""
    from kvcore.report import write_grid_report, write_summary

    write_summary(list(results), summary, methods, summary_html)
    write_grid_report([Path(r).parent for r in reports], md, list(results), methods, list(tasks))


def perplexity_table(ppl, md, html) -> None:
    """results/perplexity.md and the same tables in HTML (for the --report page)."""
    from kvcore.report import run_labels, write_perplexity_table

    write_perplexity_table(run_labels(ppl), md, html)


def compression_table(metrics, md, html) -> None:
    """results/compression.md and the same tables in HTML (for the --report page)."""
    from kvcore.report import run_labels, write_compression_table

    write_compression_table(run_labels(metrics), md, html)
