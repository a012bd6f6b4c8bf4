# Needle / QA accuracy under compression (docs/tasks.md): one job per (model, task,
# method); within a job one prefill per example serves the baseline and every keep ratio.
# Needs the top-level `tasks:` config key; the Snakefile includes this file and adds
# task_outputs() to rule all.

TASKS = (config.get("tasks") or {}).get("suite") or {}
TASK_METHODS = (config.get("tasks") or {}).get("methods") or []
TASK_MODELS = (config.get("tasks") or {}).get("models") or MODELS


def task_filler(wc):
    """The needle task's filler corpus (a dataset of the config); nothing for other types."""
    spec = TASKS[wc.task]
    if spec["type"] != "needle":
        return []
    return rules.download_dataset.output.text.format(dataset=spec.get("dataset", DATASETS[0]))


def task_settings():
    keys = ("keep_ratios", "max_new_tokens", "device", "dtype", "seed", "scorers", "keep_predictions")
    return {k: v for k, v in (config.get("tasks") or {}).items() if k in keys}


def task_outputs():
    """Every task JSON and each (model, task)'s task_accuracy.png (for rule all)."""
    if not TASK_METHODS:
        return []
    return expand("results/{model}/tasks/{task}/{task_method}.json",
                  model=TASK_MODELS, task=list(TASKS), task_method=TASK_METHODS) + expand(
        "results/{model}/tasks/{task}/task_accuracy.png", model=TASK_MODELS, task=list(TASKS))


rule task:
    output:
        result="results/{model}/tasks/{task}/{task_method}.json",
    input:
        model=rules.download_model.output.manifest,
        filler=task_filler,
        code=code("kvcore.tasks.evaluate", "kvcore.tasks.loaders", "kvcore.evaluation.context", "kvcore.model"),
    params:
        task_spec=lambda wc: TASKS[wc.task],
        settings=task_settings(),
        methods=config["methods"],
    wildcard_constraints:
        task="|".join(map(re.escape, TASKS)) or "^$",
        task_method="|".join(map(re.escape, TASK_METHODS)) or "^$",
    resources:
        gpu=1,
    log:
        "logs/tasks/{model}/{task}/{task_method}.log",
    benchmark:
        "logs/benchmarks/tasks/{model}/{task}/{task_method}.tsv"
    script:
        "../scripts/tasks.py"


rule task_plot:
    output:
        png="results/{model}/tasks/{task}/task_accuracy.png",
    input:
        results=lambda wc: expand(rules.task.output.result, model=wc.model, task=wc.task, task_method=TASK_METHODS),
    wildcard_constraints:
        task="|".join(map(re.escape, TASKS)) or "^$",
    log:
        "logs/tasks/{model}/{task}/plot.log",
    script:
        "../scripts/tasks.py"


rule tasks:
    # a target: every task JSON and plot of the config (`snakemake ... tasks`), nothing else
    input:
        task_outputs(),
