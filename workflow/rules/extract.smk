# Tokenize, extract the KV cache shard by shard (GPU when present), then compact each layer and merge metadata.


rule tokenize:
    output:
        tokens=f"{RUN}/tokens.parquet",
    input:
        model=rules.download_model.output.model,
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
    conda:
        ENV
    script:
        "../scripts/tokenize.py"


# Every file an extract job writes is a declared output, its Parquet part of each stored layer included
# (temp(): finalize_extraction compacts each layer's parts into one file, then Snakemake removes them),
# so storage plugins upload them, --delete-all-output removes them and deleting one reruns its job.
# The layer count is known before the model is downloaded (kvcore.sources.models.num_layers);
# models with different layer lists get one extract and one finalize rule each (outputs cannot
# vary with a wildcard).
LAYER_GROUPS = {}
for model, layers in PARQUET_LAYERS.items():
    LAYER_GROUPS.setdefault(tuple(layers), []).append(model)

for group, (layers, models) in enumerate(LAYER_GROUPS.items()):

    rule:
        name:
            "extract" if group == 0 else f"extract_{group}"
        output:
            **{**shard_outputs(layers), "parquet": temp(shard_outputs(layers)["parquet"])},
        input:
            model=rules.download_model.output.model,
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
        wildcard_constraints:
            model=one_of(models),
        resources:
            gpu=1,
        log:
            "logs/extract/{model}/{dataset}/{shard}.log",
        benchmark:
            "logs/benchmarks/extract/{model}/{dataset}/{shard}.tsv"
        conda:
            ENV
        script:
            "../scripts/extract.py"

    rule:
        name:
            "finalize_extraction" if group == 0 else f"finalize_extraction_{group}"
        output:
            metadata=f"{RUN}/metadata.json",
            predictions=f"{RUN}/predictions.parquet",
            layers=layer_outputs(layers),
        input:
            manifests=shard_files("manifest"),
            predictions=shard_files("predictions"),
            parts=shard_files("parquet"),
            code=code("kvcore.storage"),
        wildcard_constraints:
            model=one_of(models),
        log:
            "logs/finalize_extraction/{model}/{dataset}.log",
        benchmark:
            "logs/benchmarks/finalize_extraction/{model}/{dataset}.tsv"
        conda:
            ENV
        script:
            "../scripts/finalize_extraction.py"
