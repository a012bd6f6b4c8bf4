# Compress each run's extracted cache with each method: the real stored form and its metrics.
# Eviction has its own rule: picking the kept tokens prefills each extracted sequence again
# with the model (the scorers read attention), so it takes the model, the tokens and a GPU.
from kvcore.compress.run import code_modules as compress_code_modules


def one_of(names):
    """A wildcard regex matching exactly these names (nothing when there are none)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def compress_code(wc):
    return code(*compress_code_modules(wc.method, config["methods"][wc.method]))


rule compress:
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    input:
        shards=lambda wc: expand(rules.extract.output.safetensors, shard=shards(wc.dataset), allow_missing=True),
        code=compress_code,
    params:
        spec=lambda wc: config["methods"][wc.method],
    wildcard_constraints:
        method=one_of([m for m in METHODS if m not in EVICTING]),
    log:
        "logs/compress/{model}/{dataset}/{method}.log",
    benchmark:
        "logs/benchmarks/compress/{model}/{dataset}/{method}.tsv"
    script:
        "../scripts/compress.py"


rule compress_evict:
    output:
        safetensors=f"{RUN}/compress/{{method}}.safetensors",
        metrics=f"{RUN}/compress/{{method}}.json",
    input:
        shards=lambda wc: expand(rules.extract.output.safetensors, shard=shards(wc.dataset), allow_missing=True),
        model=rules.download_model.output.manifest,
        tokens=rules.tokenize.output.tokens,
        code=compress_code,
    params:
        spec=lambda wc: config["methods"][wc.method],
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
    script:
        "../scripts/compress.py"


rule compression_table:
    output:
        md="results/compression.md",
    input:
        metrics=[path for paths in run_files("compress", COMPRESSIBLE).values() for path in paths],
        code=code("kvcore.report"),
    params:
        runs=run_files("compress", COMPRESSIBLE),
    log:
        "logs/compression_table.log",
    script:
        "../scripts/compression_table.py"
