"""The perplexity rules' jobs: one method's ppl/{method}.json in one job, or in shards and their merge."""

from __future__ import annotations

from kvcore.atomic import write_json
from kvcore.evaluation.perplexity import evaluate_shard, merge_shards, read_shard, validate_method


def job_inputs(text_parquet, settings: dict, options: dict | None):
    """(evaluated text, evaluator options) of a perplexity job."""
    from kvcore.sources.datasets import joined_text

    options = options if options is not None else settings.get("options")  # perplexity.options, if any
    return joined_text(text_parquet), options


def run_perplexity(model_dir, text_parquet, method: str, spec: dict, settings: dict, out_path,
                   options: dict | None = None, baseline=None) -> dict:
    """Evaluate one method on a dataset and write ppl/{method}.json (rule perplexity).

    Every protocol that fits the method's family runs (options.FAMILY_PROTOCOLS); the first
    is the primary: its record is the file's top level, `protocols` holds each one's record.
    `baseline`: the run's baseline ppl/{name}.json, whose windows the method's job takes
    instead of running them again where they are bit-identical (evaluate_shard).
    """
    text, options = job_inputs(text_parquet, settings, options)
    record = validate_method(model_dir, text, method, spec, settings, options=options,
                             baseline=read_record(baseline) if baseline else None)
    write_json(out_path, record)
    return record


def run_perplexity_shard(model_dir, text_parquet, method: str, spec: dict, settings: dict, shard: int,
                         shards: int, out_path, options: dict | None = None) -> dict:
    """Evaluate shard `shard` of `shards` of one method and write ppl/shards/{method}-{shard}.json."""
    text, options = job_inputs(text_parquet, settings, options)
    result = evaluate_shard(model_dir, text, method, spec, settings, options=options, shard=shard, shards=shards)
    write_json(out_path, result)
    return result


def read_record(path) -> dict:
    """A ppl/{method}.json record, read by the project's one JSON reader (kvcore.inputs.read_json)."""
    from kvcore.errors import KvcoreError
    from kvcore.inputs import read_json

    try:
        record = read_json(path, "perplexity record")
    except KvcoreError as error:
        raise KvcoreError(f"{error}; rerun its perplexity job") from None
    if not isinstance(record, dict):
        raise KvcoreError(f"{path}: not a perplexity record; rerun its perplexity job")
    return record


def merge_shard_files(paths: list, out_path) -> dict:
    """Merge a method's shard files into ppl/{method}.json (the same record as one job's)."""
    record = merge_shards([read_shard(p) for p in paths])
    write_json(out_path, record)
    return record
