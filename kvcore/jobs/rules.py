"""What the rule files need while Snakemake reads them: the config check, the grid's sizes,
the names of tables and plots, and each rule's code inputs.

A rule's code inputs are the kvcore files its job runs, so that editing one reruns exactly
the jobs it changes (Snakemake does not see edits to an imported package): the rule's
kvcore.jobs module (the glue: which file goes where) and the library modules its job calls,
with everything they import (kvcore.codedeps), plus for a method's job the modules its method
loads lazily.
"""

from __future__ import annotations

from kvcore.codedeps import PACKAGE_DIR, method_modules, module_files
from kvcore.compress.params import canonical_spec
from kvcore.config import check, check_files, explain
from kvcore.errors import UsageError
from kvcore.eviction import needs_model
from kvcore.gpus import visible_gpus
from kvcore.plots import RESULT_PLOTS, STAT_PLOTS
from kvcore.sources.datasets import prompt_list
from kvcore.sources.layers import num_layers
from kvcore.stats import STATS_TABLES

__all__ = [
    "RESULT_PLOTS", "STATS_TABLES", "STAT_PLOTS", "UsageError", "calibration_dirs", "check", "check_files",
    "code_files", "code_modules", "explain", "family", "gpu_resource", "num_layers", "prompt_list", "scores_with_model",
]

PERPLEXITY = ["kvcore.evaluation.perplexity", "kvcore.evaluation.protocols", "kvcore.model", "kvcore.sources.datasets"]
# rule -> (its kvcore.jobs module, the library modules its job calls)
JOBS = {
    "download_model": ("data", ["kvcore.sources.models"]),
    "download_dataset": ("data", ["kvcore.sources.datasets"]),
    "tokenize": ("extract", ["kvcore.tokens", "kvcore.model"]),
    "extract": ("extract", ["kvcore.extract"]),
    "finalize_extraction": ("extract", ["kvcore.storage"]),
    "compress": ("compress", ["kvcore.compress.run"]),
    "compress_evict": ("compress", ["kvcore.evaluation.extracted"]),
    "perplexity": ("perplexity", PERPLEXITY),
    "perplexity_shard": ("perplexity", PERPLEXITY),
    "perplexity_merge": ("perplexity", ["kvcore.evaluation.perplexity"]),
    "stats": ("stats", ["kvcore.stats"]),
    # kvcore.plots imports its plot modules when it draws (no import statement names them)
    "plots_cache": ("report", ["kvcore.plots", "kvcore.plots.cache", "kvcore.stats"]),
    "plots_results": ("report", ["kvcore.plots", "kvcore.plots.pruning", "kvcore.plots.results", "kvcore.report",
                                 "kvcore.stats"]),
    "run_report": ("report", ["kvcore.report"]),
    "grid_report": ("report", ["kvcore.report"]),
    "perplexity_table": ("report", ["kvcore.report"]),
    "compression_table": ("report", ["kvcore.report"]),
    "task": ("tasks", ["kvcore.tasks.evaluate", "kvcore.tasks.loaders", "kvcore.evaluation.context", "kvcore.model"]),
    "task_plot": ("tasks", ["kvcore.plots_tasks"]),
}


def scores_with_model(name: str, spec: dict | None) -> bool:
    """Whether a method chooses its tokens by running the model (an evict method, or a composed
    one evicting first, whose scorer reads attention: rule compress_evict)."""
    spec = canonical_spec(name, spec)
    if spec["family"] == "compose":
        spec = spec["first"]
    return spec["family"] == "evict" and needs_model(spec["scorer"])


def family(name: str, spec: dict | None) -> str:
    """A method's family from its config spec (or its preset's)."""
    return canonical_spec(name, spec)["family"]


def gpu_resource(device: str | None, local_run: bool) -> int:
    """The `gpu` resource a model job declares: 1, except on a local run that can only use the
    CPU (device cpu, or auto on a host where no GPU is visible), where holding it would run the
    model jobs one at a time with no GPU to share. A cluster run keeps 1 for auto: the job's node,
    not the submitting one, has the GPU."""
    if (device or "auto") == "cpu":
        return 0
    return 1 if not local_run or visible_gpus() else 0


def calibration_dirs(spec) -> list[str]:
    """Every non-empty `calibration` run (kvcore.compress.levels) a method spec names, the nested
    parts of a composed method included."""
    if isinstance(spec, dict):
        found = [spec["calibration"]] if spec.get("calibration") else []
        return found + [d for key, v in spec.items() if key != "calibration" for d in calibration_dirs(v)]
    return []


def code_modules(rule: str, method: str | None = None, spec: dict | None = None) -> list[str]:
    """The library modules the job of `rule` calls (for a method's job, `method` with its config
    `spec`: the modules the method loads lazily too)."""
    modules = [*JOBS[rule][1], *(method_modules(method, spec) if method else [])]
    if rule == "compress" and any(m.startswith("kvcore.eviction.") for m in modules):
        modules.append("kvcore.evaluation.extracted")  # where an evict method's tokens are chosen
    return modules


def code_files(rule: str, method: str | None = None, spec: dict | None = None) -> list[str]:
    """The job's code inputs: its kvcore.jobs module and the files of `code_modules`, transitively."""
    glue = str(PACKAGE_DIR / "jobs" / f"{JOBS[rule][0]}.py")
    return sorted({glue, *module_files(*code_modules(rule, method, spec))})
