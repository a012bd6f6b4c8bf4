# Needle / QA accuracy under compression (docs/tasks.md): one job per (model, task,
# method); within a job one prefill per example serves the baseline and every keep ratio.
# Needs the top-level `tasks:` config key; the Snakefile includes this file and adds
# task_outputs() to rule all.

rule task:
    output:
        result="results/{model}/tasks/{task}/{task_method}.json",
    input:
        model=rules.download_model.output.model,
        filler=task_filler,
        calibration=lambda wc: calibration_files(wc.task_method),
        code=code("kvcore.tasks.evaluate", "kvcore.tasks.loaders", "kvcore.evaluation.context", "kvcore.model"),
    params:
        task_spec=lambda wc: canonical(TASKS[wc.task]),
        settings=task_settings(),
        methods=canonical(config["methods"]),
    wildcard_constraints:
        task="|".join(map(re.escape, TASKS)) or "^$",
        task_method="|".join(map(re.escape, TASK_METHODS)) or "^$",
    resources:
        gpu=1,
    log:
        "logs/tasks/{model}/{task}/{task_method}.log",
    benchmark:
        "logs/benchmarks/tasks/{model}/{task}/{task_method}.tsv"
    conda:
        ENV
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
    benchmark:
        "logs/benchmarks/tasks/{model}/{task}/plot.tsv"
    conda:
        ENV
    script:
        "../scripts/tasks.py"


rule tasks:
    # a target: every task JSON and plot of the config (`snakemake ... tasks`), nothing else
    input:
        task_outputs(),
