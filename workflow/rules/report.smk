# Statistics of each cache, analysis plots, and the reports (per run and across the grid).
# Each job reads exactly its inputs: a file left by a removed method or an earlier, larger run
# never reaches a table, a plot or a report.


rule stats:
    input:
        metadata=rules.finalize_extraction.output.metadata,
        shards=shard_files("safetensors"),
        code=code("stats"),
    output:
        tables=expand(f"{RUN}/stats/{{table}}.parquet", table=jobs.STATS_TABLES, allow_missing=True),
    log:
        "logs/stats/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/stats/{model}/{dataset}.tsv"
    conda:
        ENV
    threads: TORCH_THREADS
    params:
        # the sums run on the GPU when there is one, without the `gpu` resource (seconds of work)
        device=config["extract"]["device"],
    script:
        "../scripts/stats.py"


# The cache plots draw only the statistics: no method setting reaches them.
rule plots_cache:
    input:
        tables=rules.stats.output.tables,
        code=code("plots_cache"),
    output:
        plot_outputs(jobs.STAT_PLOTS, "cache"),
    log:
        "logs/plots_cache/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/plots_cache/{model}/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/plots_cache.py"


rule plots_results:
    input:
        tables=rules.stats.output.tables,
        results=run_results,
        code=code("plots_results"),
    output:
        plot_outputs(jobs.RESULT_PLOTS, "compression"),
    log:
        "logs/plots_results/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/plots_results/{model}/{dataset}.tsv"
    conda:
        ENV
    params:
        methods=canonical(config["methods"]),
    script:
        "../scripts/plots_results.py"


rule run_report:
    input:
        rules.plots_cache.output,
        rules.plots_results.output,
        metadata=rules.finalize_extraction.output.metadata,
        results=run_results,
        tasks=lambda wc: task_results(wc.model),
        code=code("run_report"),
    output:
        md=report(f"{RUN}/report.md", caption="../report/run_report.rst", category=RUN_CATEGORY),
    log:
        "logs/run_report/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/run_report/{model}/{dataset}.tsv"
    conda:
        ENV
    params:
        methods=canonical(config["methods"]),
    script:
        "../scripts/run_report.py"


rule grid_report:
    input:
        reports=expand(f"{RUN}/report.md", model=MODELS, dataset=DATASETS),
        results=run_files("ppl", METHODS) + run_files("compress", COMPRESSIBLE),
        tasks=[f for model in MODELS for f in task_results(model)],
        code=code("grid_report"),
    output:
        md=report("results/report.md", caption="../report/grid_report.rst", category="grid"),
        summary="results/summary.parquet",
        summary_html=report("results/summary.html", caption="../report/summary.rst", category="grid"),
    log:
        "logs/grid_report.log",
    benchmark:
        "logs/benchmarks/grid_report.tsv"
    conda:
        ENV
    params:
        methods=canonical(config["methods"]),
    script:
        "../scripts/grid_report.py"


rule perplexity_table:
    input:
        ppl=run_files("ppl", METHODS),
        code=code("perplexity_table"),
    output:
        md="results/perplexity.md",
        html=report("results/perplexity.html", caption="../report/perplexity_table.rst", category="grid"),
    log:
        "logs/perplexity_table.log",
    benchmark:
        "logs/benchmarks/perplexity_table.tsv"
    conda:
        ENV
    script:
        "../scripts/perplexity_table.py"
