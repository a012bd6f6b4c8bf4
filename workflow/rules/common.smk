# Config validation, the grid, and helpers shared by every rule.
import math
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import kvcore.config
from kvcore.codedeps import module_files
from kvcore.errors import UsageError

try:  # a key given twice: Snakemake's YAML reader keeps the last one without a word
    kvcore.config.check_files(workflow.configfiles)
except UsageError as error:
    raise WorkflowError(str(error)) from None
try:
    validate(config, workflow.source_path("../schemas/config.schema.yaml"))
    kvcore.config.check(config)
except (WorkflowError, UsageError) as error:
    raise WorkflowError(kvcore.config.explain(config) or str(error)) from None

MODELS = list(config["models"])
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])
# Every method is compressed from the extracted safetensors; eviction also needs the model
# to score the tokens, so it has its own rule (compress_evict).
COMPRESSIBLE = METHODS
EVICTING = [m for m in METHODS if (config["methods"][m] or {}).get("family") == "evict"]
RUN = "results/{model}/{dataset}"


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    method="|".join(map(re.escape, METHODS)),
    shard=r"\d{5}",


def code(*modules):
    """The kvcore source files a rule runs, so editing them reruns exactly that rule."""
    return list(module_files(*modules))


def n_sequences(dataset):
    """How many sequences a dataset yields: one per document in `documents` mode (capped by
    extract.n_sequences), exactly extract.n_sequences in `chunks` mode."""
    spec, cap = config["datasets"][dataset], config["extract"]["n_sequences"]
    if sequence_mode(dataset) == "chunks":
        return cap
    if spec["source"] == "prompts":
        from kvcore.sources.datasets import prompt_list

        return min(cap, len(prompt_list(spec)))
    if spec["source"] == "random":
        return min(cap, spec.get("n_documents", 10))
    raise WorkflowError(f"dataset '{dataset}': sequences: documents needs a prompts or random source")


def sequence_mode(dataset):
    spec = config["datasets"][dataset]
    return spec.get("sequences", "documents" if spec["source"] in ("prompts", "random") else "chunks")


def shards(dataset):
    return [f"{i:05d}" for i in range(math.ceil(n_sequences(dataset) / config["extract"]["shard_size"]))]


def run_files(folder, methods):
    """"model · dataset" -> that run's {folder}/{method}.json files, in config order (the tables' inputs)."""
    return {f"{model} · {dataset}": [f"{RUN.format(model=model, dataset=dataset)}/{folder}/{m}.json" for m in methods]
            for model in MODELS for dataset in DATASETS}


def all_outputs():
    outputs = ["results/report.md", "results/summary.parquet", "results/perplexity.md", "results/compression.md"]
    for model in MODELS:
        for dataset in DATASETS:
            run = RUN.format(model=model, dataset=dataset)
            outputs.append(f"{run}/metadata.json")
            outputs += [f"{run}/ppl/{method}.json" for method in METHODS]
            outputs += [f"{run}/compress/{method}.json" for method in COMPRESSIBLE]
    return outputs
