# Statistics of each cache, analysis plots, and the reports (per run and across the grid).
# Each job reads exactly its inputs: a file left by a removed method or an earlier, larger run
# never reaches a table, a plot or a report.
from kvcore.plots import RESULT_PLOTS, STAT_PLOTS
from kvcore.stats import STATS_TABLES


rule stats:
    output:
        tables=expand(f"{RUN}/stats/{{table}}.parquet", table=STATS_TABLES, allow_missing=True),
    input:
        metadata=rules.finalize_extraction.output.metadata,
        shards=shard_files("safetensors"),
        code=code("kvcore.stats"),
    params:
        # the sums run on the GPU when there is one, without the `gpu` resource (seconds of work)
        device=config["extract"]["device"],
    threads: 1
    log:
        "logs/stats/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/stats/{model}/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/stats.py"


# The cache plots draw only the statistics: no method setting reaches them.
rule plots_cache:
    output:
        plot_outputs(STAT_PLOTS, "cache"),
    input:
        tables=rules.stats.output.tables,
        code=code("kvcore.plots", "kvcore.stats"),
    log:
        "logs/plots_cache/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/plots_cache/{model}/{dataset}.tsv"
    conda:
        ENV
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
        methods=canonical(config["methods"]),
    log:
        "logs/plots_results/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/plots_results/{model}/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/plots.py"


rule run_report:
    output:
        md=report(f"{RUN}/report.md", caption="../report/run_report.rst", category="{model} · {dataset}"),
    input:
        rules.plots_cache.output,
        rules.plots_results.output,
        metadata=rules.finalize_extraction.output.metadata,
        results=run_results,
        tasks=lambda wc: task_results(wc.model),
        code=code("kvcore.report"),
    params:
        methods=canonical(config["methods"]),
    log:
        "logs/run_report/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/run_report/{model}/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/run_report.py"


rule grid_report:
    output:
        md=report("results/report.md", caption="../report/grid_report.rst", category="grid"),
        summary="results/summary.parquet",
    input:
        reports=expand(rules.run_report.output.md, model=MODELS, dataset=DATASETS),
        results=run_files("ppl", METHODS) + run_files("compress", COMPRESSIBLE),
        tasks=[f for model in MODELS for f in task_results(model)],
        code=code("kvcore.report"),
    params:
        methods=canonical(config["methods"]),
    log:
        "logs/grid_report.log",
    benchmark:
        "logs/benchmarks/grid_report.tsv"
    conda:
        ENV
    script:
        "../scripts/grid_report.py"


rule perplexity_table:
    output:
        md="results/perplexity.md",
    input:
        ppl=run_files("ppl", METHODS),
        code=code("kvcore.report"),
    log:
        "logs/perplexity_table.log",
    benchmark:
        "logs/benchmarks/perplexity_table.tsv"
    conda:
        ENV
    script:
        "../scripts/perplexity_table.py"
