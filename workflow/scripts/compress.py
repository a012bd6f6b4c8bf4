from pathlib import Path

from kvcore.evaluation.extracted import compress_extracted
from kvcore.jobs import run_job

i, o, p = snakemake.input, snakemake.output, snakemake.params
# rule compress_evict also hands over the model and tokens (to score tokens) and claims a GPU
# for the model; rule compress packs on p.device without a claim (it holds no `gpu` resource)
evict = "tokens" in i.keys()
scoring = {"model_dir": Path(i.model), "tokens": i.tokens, "model_device": p.device,
           "model_dtype": p.dtype} if evict else {}
run_job(snakemake.log[0], lambda: compress_extracted(
    i.shards, o.safetensors, o.metrics, snakemake.wildcards.method, p.spec, p.device, **scoring),
        p.device if evict else "cpu")
