# Compress each run's extracted cache with each method: the real stored form and its metrics.
# `compress` packs on the GPU when there is one (device auto) without holding the `gpu`
# resource: a layer at a time, seconds of GPU work. Eviction by attention has its own rule:
# picking the kept tokens prefills each extracted sequence again with the model (kvzip, h2o
# and snapkv read attention), so it takes the model, the tokens and a GPU.


rule compress:
    input:
        shards=shard_files("safetensors"),
        code=method_code("compress"),
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    wildcard_constraints:
        method=one_of([m for m in METHODS if m not in EVICTING]),
    conda:
        ENV
    threads: TORCH_THREADS
    params:
        spec=method_spec,
        device=config["extract"]["device"],
    script:
        "../scripts/compress.py"


rule compress_evict:
    input:
        shards=shard_files("safetensors"),
        model=rules.download_model.output.model,
        tokens=rules.tokenize.output.tokens,
        code=method_code("compress_evict"),
        calibration=lambda wc: calibration_files(wc.method),
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    wildcard_constraints:
        method=one_of(EVICTING),
    conda:
        ENV
    threads: TORCH_THREADS
    resources:
        gpu=gpu_claim("extract"),
    params:
        spec=method_spec,
        # score with the model exactly as it was extracted
        device=config["extract"]["device"],
        dtype=config["extract"]["dtype"],
    script:
        "../scripts/compress_evict.py"


rule compression_table:
    input:
        metrics=run_files("compress", COMPRESSIBLE),
        code=code("compression_table"),
    output:
        md="results/compression.md",
        html=report("results/compression.html", caption="../report/compression_table.rst", category="grid"),
    log:
        "logs/compression_table.log",
    benchmark:
        "logs/benchmarks/compression_table.tsv"
    conda:
        ENV
    script:
        "../scripts/compression_table.py"
