# Needle / QA accuracy under compression (docs/tasks.md): one job per (model, task,
# method); within a job one prefill per example serves the baseline and every keep ratio.
# Needs the top-level `tasks:` config key; the Snakefile includes this file and adds
# task_outputs() to rule all.


rule task:
    input:
        model=rules.download_model.output.model,
        filler=task_filler,
        calibration=lambda wc: calibration_files(wc.task_method),
        code=code("task"),
    output:
        result="results/{model}/tasks/{task}/{task_method}.json",
    log:
        "logs/tasks/{model}/{task}/{task_method}.log",
    benchmark:
        "logs/benchmarks/tasks/{model}/{task}/{task_method}.tsv"
    wildcard_constraints:
        task="|".join(map(re.escape, TASKS)) or "^$",
        task_method="|".join(map(re.escape, TASK_METHODS)) or "^$",
    conda:
        ENV
    threads: TORCH_THREADS
    resources:
        gpu=gpu_claim("tasks"),
    params:
        task_spec=lambda wc: canonical(TASKS[wc.task]),
        settings=task_settings(),
        methods=canonical(config["methods"]),
    script:
        "../scripts/task.py"


rule task_plot:
    input:
        results=lambda wc: expand(
            "results/{model}/tasks/{task}/{task_method}.json", model=wc.model, task=wc.task, task_method=TASK_METHODS
        ),
        code=code("task_plot"),
    output:
        png="results/{model}/tasks/{task}/task_accuracy.png",
    log:
        "logs/tasks/{model}/{task}/plot.log",
    benchmark:
        "logs/benchmarks/tasks/{model}/{task}/plot.tsv"
    wildcard_constraints:
        task="|".join(map(re.escape, TASKS)) or "^$",
    conda:
        ENV
    script:
        "../scripts/task_plot.py"


rule tasks:
    # a target: every task JSON and plot of the config (`snakemake ... tasks`), nothing else
    input:
        task_outputs(),
