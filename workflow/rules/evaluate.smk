# Perplexity under each method (sliding window, DESIGN.md "Perplexity protocols").


rule perplexity:
    output:
        result=f"{RUN}/ppl/{{method}}.json",
    input:
        model=rules.download_model.output.manifest,
        text=rules.download_dataset.output.text,
        code=code("kvcore.perplexity", "kvcore.model"),
    params:
        spec=lambda wc: config["methods"][wc.method],
        settings=config["perplexity"],
    resources:
        gpu=1,
    log:
        "logs/perplexity/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/perplexity/{model}/{dataset}/{method}.tsv"
    script:
        "../scripts/perplexity.py"
