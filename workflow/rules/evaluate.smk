# Perplexity under each method (DESIGN.md "Perplexity protocols"; kvcore.evaluation.protocols).
# One job per (model, dataset, method): the method's baseline and every protocol that makes
# sense for its family run in the same job, on the same device, so latencies compare.
# With perplexity.shards = N > 1 each method's windows are cut into N contiguous blocks, one
# perplexity_shard job each, and `perplexity` merges them (kvcore.evaluation.perplexity.merge_shards)
# into the same ppl/{method}.json one job writes.
from kvcore.evaluation.perplexity import code_modules

PPL_SHARDS = config["perplexity"].get("shards", 1)
# What a perplexity job computes with; `shards` only says how the work is split, so it stays
# out of the params (changing it must not look like a changed setting to one-job runs).
PPL_SETTINGS = canonical({k: v for k, v in config["perplexity"].items() if k != "shards"})


if PPL_SHARDS == 1:

    rule perplexity:
        output:
            result=f"{RUN}/ppl/{{method}}.json",
        input:
            model=rules.download_model.output.model,
            text=rules.download_dataset.output.text,
            code=method_code(code_modules),
            calibration=lambda wc: calibration_files(wc.method),
        params:
            spec=method_spec,
            settings=PPL_SETTINGS,
        resources:
            gpu=1,
        log:
            "logs/perplexity/{model}/{dataset}/{method}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}.tsv"
        conda:
            ENV
        script:
            "../scripts/perplexity.py"

else:

    rule perplexity_shard:
        output:
            result=f"{RUN}/ppl/shards/{{method}}-{{shard}}.json",
        input:
            model=rules.download_model.output.model,
            text=rules.download_dataset.output.text,
            code=method_code(code_modules),
            calibration=lambda wc: calibration_files(wc.method),
        params:
            spec=method_spec,
            settings=PPL_SETTINGS,
            shards=PPL_SHARDS,
        resources:
            gpu=1,
        log:
            "logs/perplexity/{model}/{dataset}/{method}-{shard}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}-{shard}.tsv"
        conda:
            ENV
        script:
            "../scripts/perplexity.py"

    rule perplexity:
        output:
            result=f"{RUN}/ppl/{{method}}.json",
        input:
            shards=expand(rules.perplexity_shard.output.result, shard=[f"{i:05d}" for i in range(PPL_SHARDS)],
                          allow_missing=True),
            code=code("kvcore.evaluation.perplexity"),
        log:
            "logs/perplexity/{model}/{dataset}/{method}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}.tsv"
        conda:
            ENV
        script:
            "../scripts/perplexity.py"
