# kvcore workflow: download -> tokenize -> extract -> compress -> perplexity -> stats, plots, reports.
from snakemake.utils import min_version

min_version("8.20")


# The embedded default, unless the user names their own run: `--configfile` replaces it
# (Snakemake would otherwise merge the two, adding the default's models and datasets).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tasks.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs() + task_outputs(),
