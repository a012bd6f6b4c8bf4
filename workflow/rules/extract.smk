# Tokenize, extract the KV cache shard by shard (GPU when present), then merge metadata.


rule tokenize:
    output:
        tokens=f"{RUN}/tokens.parquet",
    input:
        model=rules.download_model.output.manifest,
        text=rules.download_dataset.output.text,
        code=code("kvcore.tokens", "kvcore.model"),
    params:
        seq_len=config["extract"]["seq_len"],
        n_sequences=lambda wc: n_sequences(wc.dataset),
        mode=lambda wc: sequence_mode(wc.dataset),
    log:
        "logs/tokenize/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/tokenize/{model}/{dataset}.tsv"
    script:
        "../scripts/tokenize.py"


rule extract:
    output:
        safetensors=f"{RUN}/kv/part-{{shard}}.safetensors",
        manifest=f"{RUN}/shards/kv-{{shard}}.json",
        predictions=f"{RUN}/shards/predictions-{{shard}}.parquet",
    input:
        model=rules.download_model.output.manifest,
        tokens=rules.tokenize.output.tokens,
        code=code("kvcore.extract"),
    params:
        shard_size=config["extract"]["shard_size"],
        batch_size=config["extract"]["batch_size"],
        dtype=config["extract"]["dtype"],
        device=config["extract"]["device"],
        top_k=config["extract"]["top_k"],
        parquet_layers=config["extract"].get("parquet_layers"),
        parquet_heads=config["extract"].get("parquet_heads"),
        parts=config["extract"].get("parts", "both"),
        storage_dtype=config["extract"].get("storage_dtype", "float32"),
    resources:
        gpu=1,
    log:
        "logs/extract/{model}/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/extract/{model}/{dataset}/{shard}.tsv"
    script:
        "../scripts/extract.py"


rule finalize_extraction:
    output:
        metadata=f"{RUN}/metadata.json",
        predictions=f"{RUN}/predictions.parquet",
    input:
        manifests=lambda wc: expand(rules.extract.output.manifest, shard=shards(wc.dataset), allow_missing=True),
        code=code("kvcore.storage"),
    log:
        "logs/finalize_extraction/{model}/{dataset}.log",
    script:
        "../scripts/finalize_extraction.py"
