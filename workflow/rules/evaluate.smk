# Perplexity under each method (DESIGN.md "Perplexity protocols"; kvcore.evaluation.protocols).
# One job per (model, dataset, method): every protocol that makes sense for its family runs in
# the same job. Its baseline is the run's baseline job's per-window NLLs (ppl/baseline.json, an
# input) where those are the same bits (one window per forward: the CPU); on a GPU, where the
# baseline job batches windows, the method's job runs its own baseline beside the method.
# With perplexity.shards = N > 1 each method's windows are cut into N contiguous blocks, one
# perplexity_shard job each, and `perplexity` merges them (kvcore.jobs.perplexity.merge_shard_files)
# into the same ppl/{method}.json one job writes.
PPL_SHARDS = config["perplexity"].get("shards", 1)
# What a perplexity job computes with; `shards` only says how the work is split, so it stays
# out of the params (changing it must not look like a changed setting to one-job runs).
PPL_SETTINGS = canonical({k: v for k, v in config["perplexity"].items() if k != "shards"})


if PPL_SHARDS == 1:

    rule perplexity:
        input:
            model=rules.download_model.output.model,
            text=rules.download_dataset.output.text,
            code=method_code("perplexity"),
            calibration=lambda wc: calibration_files(wc.method),
            baseline=baseline_record,
        output:
            result=f"{RUN}/ppl/{{method}}.json",
        log:
            "logs/perplexity/{model}/{dataset}/{method}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}.tsv"
        conda:
            ENV
        threads: TORCH_THREADS
        resources:
            gpu=gpu_claim("perplexity"),
        params:
            spec=method_spec,
            settings=PPL_SETTINGS,
        script:
            "../scripts/perplexity.py"

else:

    rule perplexity_shard:
        input:
            model=rules.download_model.output.model,
            text=rules.download_dataset.output.text,
            code=method_code("perplexity_shard"),
            calibration=lambda wc: calibration_files(wc.method),
        output:
            result=f"{RUN}/ppl/shards/{{method}}-{{shard}}.json",
        log:
            "logs/perplexity/{model}/{dataset}/{method}-{shard}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}-{shard}.tsv"
        conda:
            ENV
        threads: TORCH_THREADS
        resources:
            gpu=gpu_claim("perplexity"),
        params:
            spec=method_spec,
            settings=PPL_SETTINGS,
            shards=PPL_SHARDS,
        script:
            "../scripts/perplexity_shard.py"

    rule perplexity:
        input:
            shards=expand(
                f"{RUN}/ppl/shards/{{method}}-{{shard}}.json",
                shard=[f"{i:05d}" for i in range(PPL_SHARDS)],
                allow_missing=True,
            ),
            code=code("perplexity_merge"),
        output:
            result=f"{RUN}/ppl/{{method}}.json",
        log:
            "logs/perplexity/{model}/{dataset}/{method}.log",
        benchmark:
            "logs/benchmarks/perplexity/{model}/{dataset}/{method}.tsv"
        conda:
            ENV
        script:
            "../scripts/perplexity_merge.py"
