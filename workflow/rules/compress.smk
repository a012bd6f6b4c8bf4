# Compress each run's extracted cache with each method: the real stored form and its metrics.
# Eviction has its own rule: picking the kept tokens prefills each extracted sequence again
# with the model (the scorers read attention), so it takes the model, the tokens and a GPU.
from kvcore.compress.run import code_modules as compress_code_modules


rule compress:
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    input:
        shards=shard_files("safetensors"),
        code=method_code(compress_code_modules),
        calibration=lambda wc: calibration_files(wc.method),
    params:
        spec=method_spec,
    wildcard_constraints:
        method=one_of([m for m in METHODS if m not in EVICTING]),
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    conda:
        ENV
    script:
        "../scripts/compress.py"


rule compress_evict:
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    input:
        shards=shard_files("safetensors"),
        model=rules.download_model.output.model,
        tokens=rules.tokenize.output.tokens,
        code=method_code(compress_code_modules),
        calibration=lambda wc: calibration_files(wc.method),
    params:
        spec=method_spec,
        # score with the model exactly as it was extracted
        device=config["extract"]["device"],
        dtype=config["extract"]["dtype"],
    wildcard_constraints:
        method=one_of(EVICTING),
    resources:
        gpu=1,
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    conda:
        ENV
    script:
        "../scripts/compress.py"


rule compression_table:
    output:
        md="results/compression.md",
    input:
        metrics=run_files("compress", COMPRESSIBLE),
        code=code("kvcore.report"),
    log:
        "logs/compression_table.log",
    benchmark:
        "logs/benchmarks/compression_table.tsv"
    conda:
        ENV
    script:
        "../scripts/compression_table.py"
