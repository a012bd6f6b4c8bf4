# Tokenize, extract the KV cache shard by shard (GPU when present), then compact each layer and merge metadata.


rule tokenize:
    input:
        model=rules.download_model.output.model,
        text=rules.download_dataset.output.text,
        code=code("tokenize"),
    output:
        tokens=f"{RUN}/tokens.parquet",
    log:
        "logs/tokenize/{model}/{dataset}.log",
    benchmark:
        "logs/benchmarks/tokenize/{model}/{dataset}.tsv"
    conda:
        ENV
    params:
        seq_len=config["extract"]["seq_len"],
        n_sequences=lambda wc: n_sequences(wc.dataset),
        mode=lambda wc: sequence_mode(wc.dataset),
    script:
        "../scripts/tokenize.py"


# Every file an extract job writes is a declared output, its Parquet part of each stored layer included
# (temp(): finalize_extraction compacts each layer's parts into one file, then Snakemake removes them),
# so storage plugins upload them, --delete-all-output removes them and deleting one reruns its job.
# The layer count is known before the model is downloaded (kvcore.sources.models.num_layers);
# models with different layer lists get one extract and one finalize rule each (outputs cannot
# vary with a wildcard).
# What an extract job computes with: config `extract:` and its defaults (seq_len and n_sequences reach it
# through tokens.parquet, so they stay out of its params).
EXTRACT_SETTINGS = canonical(
    {
        "parquet_layers": None,
        "parquet_heads": None,
        "parts": "both",
        "storage_dtype": "float32",
        **{k: v for k, v in config["extract"].items() if k not in ("seq_len", "n_sequences")},
    }
)
LAYER_GROUPS = {}
for model, layers in PARQUET_LAYERS.items():
    LAYER_GROUPS.setdefault(tuple(layers), []).append(model)

for group, (layers, models) in enumerate(LAYER_GROUPS.items()):

    rule:
        name:
            "extract" if group == 0 else f"extract_{group}"
        input:
            model=rules.download_model.output.model,
            tokens=rules.tokenize.output.tokens,
            code=code("extract"),
        output:
            **{**shard_outputs(layers), "parquet": temp(shard_outputs(layers)["parquet"])},
        log:
            "logs/extract/{model}/{dataset}/{shard}.log",
        benchmark:
            "logs/benchmarks/extract/{model}/{dataset}/{shard}.tsv"
        wildcard_constraints:
            model=one_of(models),
        conda:
            ENV
        threads: TORCH_THREADS
        resources:
            gpu=gpu_claim("extract"),
        params:
            settings=EXTRACT_SETTINGS,
        script:
            "../scripts/extract.py"

    rule:
        name:
            "finalize_extraction" if group == 0 else f"finalize_extraction_{group}"
        input:
            manifests=shard_files("manifest"),
            predictions=shard_files("predictions"),
            parts=shard_files("parquet"),
            code=code("finalize_extraction"),
        output:
            metadata=f"{RUN}/metadata.json",
            predictions=f"{RUN}/predictions.parquet",
            layers=layer_outputs(layers),
            norms=norm_outputs(layers),
        log:
            "logs/finalize_extraction/{model}/{dataset}.log",
        benchmark:
            "logs/benchmarks/finalize_extraction/{model}/{dataset}.tsv"
        wildcard_constraints:
            model=one_of(models),
        conda:
            ENV
        script:
            "../scripts/finalize_extraction.py"
