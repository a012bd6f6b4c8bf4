# Config validation, the grid, and helpers shared by every rule (the other .smk files hold
# only rules, as `snakemake --lint` asks).
import json
import math
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import kvcore.jobs.rules as jobs

try:  # a key given twice: Snakemake's YAML reader keeps the last one without a word
    jobs.check_files(workflow.configfiles)
except jobs.UsageError as error:
    raise WorkflowError(str(error)) from None
try:
    validate(config, workflow.source_path("../schemas/config.schema.yaml"))
    jobs.check(config)
except (WorkflowError, jobs.UsageError) as error:
    raise WorkflowError(jobs.explain(config) or str(error)) from None

MODELS = list(config["models"])
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])
# Every method is compressed from the extracted safetensors; eviction by attention also needs
# the model to score the tokens, so it has its own rule (compress_evict) holding a GPU.
COMPRESSIBLE = METHODS
# evict methods (or composed ones evicting first) whose scorer reads attention: choosing their
# tokens runs the model (rule compress_evict)
EVICTING = [m for m in METHODS if jobs.scores_with_model(m, config["methods"][m])]
# The methods of family none: a method's perplexity job takes the first one's per-window NLLs
# instead of running the same baseline forwards again (kvcore.evaluation.perplexity.evaluate_shard).
BASELINES = [m for m in METHODS if jobs.family(m, config["methods"][m]) == "none"]
# `threads:` of every job that runs torch (extract, compress, compress_evict, perplexity, task),
# which it gives torch (kvcore.jobs.run_job): one. torch's default, a thread per core, in jobs that
# share the cores makes every parallel op wait for a descheduled thread: on the shared 2-core box a
# 512-token forward of the default model took 6-13 s with two threads and 3-6 s with one (the
# results are the same bits). On a larger CPU machine: `--set-threads perplexity=8`, per rule.
TORCH_THREADS = 1
RUN = "results/{model}/{dataset}"
ENV = "../envs/kvcore.yaml"  # every rule runs the same Python stack (pyproject.toml)
RUN_CATEGORY = "{model} · {dataset}"  # a run's section of the --report HTML


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    dataset="|".join(map(re.escape, DATASETS)),
    method="|".join(map(re.escape, METHODS)),
    shard=r"\d{5}",


def canonical(value):
    """`value` with every mapping's keys sorted, for `params:`. Snakemake compares params by
    their repr, in which a dict keeps its insertion order: reordering config.yaml's keys must
    not look like a changed setting."""
    return json.loads(json.dumps(value, sort_keys=True))


def gpu_claim(stage):
    """The `gpu` resource of a model job: 0 on a local run with no GPU to use (device cpu, or auto
    on a host without one), so the model jobs share the cores instead of queueing for a GPU that
    is not there (on the 2-core box `make run` ran them one at a time); 1 otherwise. A function:
    Snakemake knows its executor (local or a cluster's) only once it builds the DAG."""
    device = (config.get(stage) or {}).get("device")
    return lambda wildcards: jobs.gpu_resource(device, workflow.local_exec)


def method_spec(wc):
    return canonical(config["methods"][wc.method])


def one_of(names):
    """A wildcard regex matching exactly these names (nothing when there are none)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def code(rule):
    """The kvcore source files a rule's job runs, so editing them reruns exactly that rule. They are
    local() files: with a storage provider (docs/cluster.md) they stay where kvcore is installed."""
    return [local(path) for path in jobs.code_files(rule)]


def n_sequences(dataset):
    """How many sequences a dataset yields: one per document in `documents` mode (capped by
    extract.n_sequences), exactly extract.n_sequences in `chunks` mode."""
    spec, cap = config["datasets"][dataset], config["extract"]["n_sequences"]
    if sequence_mode(dataset) == "chunks":
        return cap
    if spec["source"] == "prompts":
        return min(cap, len(jobs.prompt_list(spec)))
    if spec["source"] == "random":
        return min(cap, spec.get("n_documents", 10))
    raise WorkflowError(f"dataset '{dataset}': sequences: documents needs a prompts or random source")


def sequence_mode(dataset):
    spec = config["datasets"][dataset]
    return spec.get("sequences", "documents" if spec["source"] in ("prompts", "random") else "chunks")


def shards(dataset):
    return [f"{i:05d}" for i in range(math.ceil(n_sequences(dataset) / config["extract"]["shard_size"]))]


def calibration_files(method):
    """The extracted safetensors a method's Lloyd-Max levels or mixed precision are calibrated on
    (its `calibration`): when that is a run of this workflow, its extraction is an input, so it
    is built first (a directory outside the workflow is read as it is)."""
    files = []
    for folder in jobs.calibration_dirs(config["methods"].get(method) or {}):
        for model in MODELS:
            for dataset in DATASETS:
                if Path(folder) == Path(RUN.format(model=model, dataset=dataset)):
                    files += expand(
                        f"{RUN}/kv/part-{{shard}}.safetensors", model=model, dataset=dataset, shard=shards(dataset)
                    )
    return files


def baseline_record(wc):
    """The run's baseline ppl file a method's perplexity job reads (nothing for a baseline itself)."""
    if not BASELINES or wc.method in BASELINES:
        return []
    return [f"{RUN.format(model=wc.model, dataset=wc.dataset)}/ppl/{BASELINES[0]}.json"]


def method_code(rule):
    """A method's rule's code input: the kvcore files its job runs for the job's method."""
    return lambda wc: [local(path) for path in jobs.code_files(rule, wc.method, config["methods"][wc.method])]


def parquet_layers(model):
    """The layers whose Parquet files extraction writes: extract.parquet_layers, else every layer."""
    chosen = config["extract"].get("parquet_layers")
    if chosen is not None:
        return sorted(set(chosen))
    return list(range(jobs.num_layers(model, config["models"][model], f"resources/models/{model}")))


try:
    PARQUET_LAYERS = {model: parquet_layers(model) for model in MODELS}
except jobs.UsageError as error:
    raise WorkflowError(str(error)) from None


def shard_outputs(layers):
    """Every file one extract job writes (DESIGN.md "Data flow"), its Parquet part of each layer included
    (a temp() output of the extract rule: finalize_extraction compacts the parts into layer_outputs)."""
    return dict(
        safetensors=f"{RUN}/kv/part-{{shard}}.safetensors",
        parquet=[f"{RUN}/shards/layer={layer}/part-{{shard}}.parquet" for layer in layers],
        predictions=f"{RUN}/shards/predictions-{{shard}}.parquet",
        manifest=f"{RUN}/shards/kv-{{shard}}.json",
    )


def layer_outputs(layers):
    """The run's Parquet file of each stored layer (kvcore.storage.layer_file), finalize_extraction's outputs."""
    return [f"{RUN}/kv/layer={layer}/data.parquet" for layer in layers]


def norm_outputs(layers):
    """The run's norm files (kvcore.storage.NORM_FILES): finalize_extraction writes them when any layer has Parquet rows."""
    return [f"{RUN}/norms/{kind}.parquet" for kind in ("key", "value")] if layers else []


def shard_files(name):
    """One kind of extract output (safetensors, parquet, manifest, predictions) of every shard of the job's run."""
    return lambda wc: expand(
        shard_outputs(PARQUET_LAYERS[wc.model])[name], shard=shards(wc.dataset), model=wc.model, dataset=wc.dataset
    )


def run_files(folder, methods):
    """Every run's {folder}/{method}.json files, runs and methods in config order (the tables' inputs)."""
    return [
        f"{RUN.format(model=model, dataset=dataset)}/{folder}/{m}.json"
        for model in MODELS
        for dataset in DATASETS
        for m in methods
    ]


def run_results(wc):
    """Every ppl and compress JSON of one run."""
    run = RUN.format(model=wc.model, dataset=wc.dataset)
    return [f"{run}/ppl/{m}.json" for m in METHODS] + [f"{run}/compress/{m}.json" for m in COMPRESSIBLE]


def plot_outputs(names, subcategory):
    """The plots' PNGs, each in the --report HTML with its caption (workflow/report/{name}.rst)."""

    def plot(name):  # not `report(` at the start of a line: snakefmt 2.1 would take it for a directive
        return report(
            f"{RUN}/plots/{name}.png", caption=f"../report/{name}.rst", category=RUN_CATEGORY, subcategory=subcategory
        )

    return [plot(name) for name in names]


# Needle / QA tasks (tasks.smk): the top-level `tasks:` key, when the config has one.
TASKS = (config.get("tasks") or {}).get("suite") or {}
TASK_METHODS = (config.get("tasks") or {}).get("methods") or []
TASK_MODELS = (config.get("tasks") or {}).get("models") or MODELS


def task_filler(wc):
    """The needle task's filler corpus (a dataset of the config); nothing for other types."""
    spec = TASKS[wc.task]
    if spec["type"] != "needle":
        return []
    return f"resources/datasets/{spec.get('dataset', DATASETS[0])}/text.parquet"


def task_settings():
    keys = ("keep_ratios", "max_new_tokens", "device", "dtype", "seed", "scorers", "keep_predictions")
    return canonical({k: v for k, v in (config.get("tasks") or {}).items() if k in keys})


def task_results(model):
    """Every task JSON of one model (what the reports tabulate)."""
    if not TASK_METHODS or model not in TASK_MODELS:
        return []
    return expand(
        "results/{model}/tasks/{task}/{task_method}.json", model=model, task=list(TASKS), task_method=TASK_METHODS
    )


def task_outputs():
    """Every task JSON and each (model, task)'s task_accuracy.png (for rule all)."""
    if not TASK_METHODS:
        return []
    return [f for model in TASK_MODELS for f in task_results(model)] + expand(
        "results/{model}/tasks/{task}/task_accuracy.png", model=TASK_MODELS, task=list(TASKS)
    )


def all_outputs():
    outputs = ["results/report.md", "results/summary.parquet", "results/perplexity.md", "results/compression.md"]
    for model in MODELS:
        for dataset in DATASETS:
            run = RUN.format(model=model, dataset=dataset)
            outputs.append(f"{run}/metadata.json")
            # the stored cache is a deliverable (queried with SQL): a deleted file of it reruns what wrote it
            for name, files in shard_outputs(PARQUET_LAYERS[model]).items():
                if name != "parquet":  # temporary parts, compacted into the layer files
                    outputs += expand(files, shard=shards(dataset), model=model, dataset=dataset)
            outputs += expand(layer_outputs(PARQUET_LAYERS[model]), model=model, dataset=dataset)
            outputs += expand(norm_outputs(PARQUET_LAYERS[model]), model=model, dataset=dataset)
            outputs += [f"{run}/ppl/{method}.json" for method in METHODS]
            outputs += [f"{run}/compress/{method}.json" for method in COMPRESSIBLE]
    return outputs
