# Perplexity under each method (DESIGN.md "Perplexity protocols"; kvcore.protocols).
# One job per (model, dataset, method): the method's baseline and every protocol that makes
# sense for its family run in the same job, on the same device, so latencies compare.
from kvcore.perplexity import code_modules


rule perplexity:
    output:
        result=f"{RUN}/ppl/{{method}}.json",
    input:
        model=rules.download_model.output.manifest,
        text=rules.download_dataset.output.text,
        code=lambda wc: code(*code_modules(wc.method, config["methods"][wc.method])),
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
