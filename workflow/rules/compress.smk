# Compress each run's extracted cache with each method: the real stored form and its metrics.


rule compress:
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    input:
        shards=lambda wc: expand(rules.extract.output.safetensors, shard=shards(wc.dataset), allow_missing=True),
        code=code("kvcore.compress.run"),
    params:
        spec=lambda wc: config["methods"][wc.method],
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    script:
        "../scripts/compress.py"
