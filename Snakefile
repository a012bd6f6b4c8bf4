# kvcore workflow: download -> tokenize -> extract -> perplexity (see README.md).
from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
