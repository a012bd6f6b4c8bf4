# Statistics of each cache, analysis plots, and the reports (per run and across the grid).
from kvcore.plots import RESULT_PLOTS, STAT_PLOTS
from kvcore.stats import STATS_TABLES


def run_results(wc):
    """Every ppl and compress JSON of one run."""
    run = RUN.format(model=wc.model, dataset=wc.dataset)
    return [f"{run}/ppl/{m}.json" for m in METHODS] + [f"{run}/compress/{m}.json" for m in COMPRESSIBLE]


def plot_outputs(names, subcategory):
    return [report(f"{RUN}/plots/{name}.png", caption=f"../report/{name}.rst", category="{model} · {dataset}",
                   subcategory=subcategory) for name in names]


rule stats:
    output:
        tables=expand(f"{RUN}/stats/{{table}}.parquet", table=STATS_TABLES, allow_missing=True),
    input:
        metadata=rules.finalize_extraction.output.metadata,
        shards=lambda wc: expand(rules.extract.output.safetensors, shard=shards(wc.dataset), allow_missing=True),
        code=code("kvcore.stats"),
    threads: 1
    log:
        "logs/stats/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/stats/{model}/{dataset}.tsv"
    script:
        "../scripts/stats.py"


rule plots_cache:
    output:
        plot_outputs(STAT_PLOTS, "cache"),
    input:
        tables=rules.stats.output.tables,
        code=code("kvcore.plots", "kvcore.stats"),
    params:
        methods=config["methods"],
    log:
        "logs/plots_cache/{model}/{dataset}.log",
    script:
        "../scripts/plots.py"


rule plots_results:
    output:
        plot_outputs(RESULT_PLOTS, "compression"),
    input:
        tables=rules.stats.output.tables,
        results=run_results,
        code=code("kvcore.plots", "kvcore.report", "kvcore.stats"),
    params:
        methods=config["methods"],
    log:
        "logs/plots_results/{model}/{dataset}.log",
    script:
        "../scripts/plots.py"


rule run_report:
    output:
        md=report(f"{RUN}/report.md", caption="../report/run_report.rst", category="{model} · {dataset}"),
    input:
        rules.plots_cache.output,
        rules.plots_results.output,
        results=run_results,
        code=code("kvcore.report"),
    params:
        methods=config["methods"],
    log:
        "logs/run_report/{model}/{dataset}.log",
    script:
        "../scripts/run_report.py"


rule grid_report:
    output:
        md=report("results/report.md", caption="../report/grid_report.rst", category="grid"),
        summary="results/summary.parquet",
    input:
        reports=expand(rules.run_report.output.md, model=MODELS, dataset=DATASETS),
        code=code("kvcore.report"),
    params:
        methods=config["methods"],
    log:
        "logs/grid_report.log",
    script:
        "../scripts/grid_report.py"


rule perplexity_table:
    output:
        md="results/perplexity.md",
    input:
        ppl=[path for paths in run_files("ppl", METHODS).values() for path in paths],
        code=code("kvcore.report"),
    params:
        runs=run_files("ppl", METHODS),
    log:
        "logs/perplexity_table.log",
    script:
        "../scripts/perplexity_table.py"
