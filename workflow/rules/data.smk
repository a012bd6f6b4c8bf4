# Models and datasets from their sources into resources/ (checked by sha256).


rule download_model:
    input:
        code=code("download_model"),
    output:
        # the whole Hugging Face directory (its files depend on the source), manifest.json inside
        model=directory("resources/models/{model}"),
    log:
        "logs/download_model/{model}.log",
    benchmark:
        "logs/benchmarks/download_model/{model}.tsv"
    conda:
        ENV
    params:
        spec=lambda wc: canonical(config["models"][wc.model]),
    script:
        "../scripts/download_model.py"


rule download_dataset:
    input:
        code=code("download_dataset"),
    output:
        text="resources/datasets/{dataset}/text.parquet",
        manifest="resources/datasets/{dataset}/manifest.json",
    log:
        "logs/download_dataset/{dataset}.log",
    benchmark:
        "logs/benchmarks/download_dataset/{dataset}.tsv"
    conda:
        ENV
    params:
        spec=lambda wc: canonical(config["datasets"][wc.dataset]),
    script:
        "../scripts/download_dataset.py"
