"""`kvcore query RUN VERB`: SQL over an extracted KV cache (one run or a results/ grid).

Every verb is one SQL query over read-only DuckDB views (kv, tokens, predictions, stats,
compress_metrics, ppl, runs); --show-sql prints it, --explain profiles it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcore.cli.options import int_in
from kvcore.errors import UsageError

# positions, layers, heads and sequence ids are INT32 in the tables
INDEX, K, COUNT = int_in(0, 2**31 - 1), int_in(1, 1_000_000), int_in(0, 2**63 - 1)
FORMATS = ("table", "json", "csv")  # kvcore.query.output.FORMATS, without importing it here

# verb flag -> (verb name, metavar); order is the order of --help
VERB_FLAGS = {
    "--info": ("info", None),
    "--coordinate": ("coordinate", ("LAYER", "HEAD", "TOKEN")),
    "--list-tokens": ("list_tokens", None),
    "--token-search": ("token_search", "TEXT"),
    "--layer-summary": ("layer_summary", "LAYER"),
    "--head-summary": ("head_summary", ("LAYER", "HEAD")),
    "--token-summary": ("token_summary", "TOKEN"),
    "--search-norm": ("search_norm", "LOW HIGH [key|value]"),
    "--nearest": ("nearest", ("LAYER", "HEAD", "TOKEN")),
    "--sql": ("sql", "QUERY"),
    "--shell": ("shell", None),
}
# option -> verbs it applies to
OPTION_VERBS = {
    "seq": ("coordinate", "list_tokens", "token_summary", "nearest"),
    "layer": ("token_search", "search_norm"),
    "head": ("token_search", "search_norm"),
    "k": ("nearest",), "by": ("nearest",), "metric": ("nearest",),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows --search-norm as LOW HIGH [key|value] (argparse has no 2-or-3 nargs)."""

    def _format_args(self, action, default_metavar):
        if action.dest == "search_norm":
            return "LOW HIGH [key|value]"
        return super()._format_args(action, default_metavar)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "query", help="SQL over extracted KV caches (DuckDB, read-only)",
        usage="kvcore query RUN [VERB] [options]", description=__doc__,
        epilog="Examples:\n"
               "  kvcore query results/smollm2-135m/enwiki-sample --coordinate 5 2 17 --seq 0\n"
               "  kvcore query RUN --search-norm 0.5 1.0 key --layer 3 --export-csv hits.csv\n"
               "  kvcore query results/ --sql 'SELECT model, layer, avg(key_norm) FROM kv GROUP BY ALL'",
        formatter_class=_Formatter)
    p.add_argument("path", metavar="RUN", help="run directory (results/MODEL/DATASET) or results/ for every run; "
                   "or a bucket prefix, s3://BUCKET/PREFIX, read in place (endpoint and credentials from "
                   "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; docs/cluster.md)")
    verbs = p.add_argument_group("verbs (one; --info when none is given)").add_mutually_exclusive_group()
    verbs.add_argument("--info", action="store_true", help="shape, sizes and views of each run")
    verbs.add_argument("--coordinate", nargs=3, type=INDEX, metavar=("LAYER", "HEAD", "TOKEN"),
                       help="key, value and norms at one (layer, KV head, token position); --seq picks the sequence")
    verbs.add_argument("--list-tokens", action="store_true", help="the tokens (of --seq S, else of every sequence)")
    verbs.add_argument("--token-search", metavar="TEXT",
                       help="positions whose token is TEXT (case and surrounding spaces ignored), with K/V norms")
    verbs.add_argument("--layer-summary", type=INDEX, metavar="LAYER", help="statistics per KV head of a layer")
    verbs.add_argument("--head-summary", nargs=2, type=INDEX, metavar=("LAYER", "HEAD"),
                       help="statistics of one KV head, its query heads, where its norms peak")
    verbs.add_argument("--token-summary", type=INDEX, metavar="TOKEN", help="one position across all layers and heads")
    verbs.add_argument("--search-norm", nargs="+",
                       help="vectors whose L2 norm is in [LOW, HIGH] (key norms unless 'value')")
    verbs.add_argument("--nearest", nargs=3, type=INDEX, metavar=("LAYER", "HEAD", "TOKEN"),
                       help="the --k nearest vectors in the same (layer, head): exact brute force")
    verbs.add_argument("--sql", metavar="QUERY", help="any read-only SQL over the views")
    verbs.add_argument("--shell", action="store_true", help="an SQL prompt (reads statements from stdin)")
    opts = p.add_argument_group("verb options")
    opts.add_argument("--seq", type=INDEX, help="sequence id (default 0 for --coordinate/--token-summary/--nearest)")
    opts.add_argument("--layer", type=INDEX, help="only this layer (--search-norm, --token-search)")
    opts.add_argument("--head", type=INDEX, help="only this KV head (--search-norm, --token-search)")
    opts.add_argument("--k", type=K, help="neighbours to return (--nearest, default 10)")
    opts.add_argument("--by", choices=("key", "value"), help="compare keys or values (--nearest, default key)")
    opts.add_argument("--metric", choices=("cosine", "l2"), help="similarity (--nearest, default cosine)")
    sel = p.add_argument_group("which runs (under a results/ grid)")
    sel.add_argument("--model", help="only runs of this model")
    sel.add_argument("--dataset", help="only runs of this dataset")
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS, default="table", help="stdout format (default table)")
    out.add_argument("--limit", type=COUNT, metavar="N", help="at most N rows (a table shows 50 unless given)")
    out.add_argument("--export-csv", metavar="FILE", help="write all rows to FILE as CSV instead of printing")
    out.add_argument("--export-parquet", metavar="FILE", help="write all rows to FILE as Parquet")
    out.add_argument("--show-sql", action="store_true", help="print the verb's SQL (runnable in the shell) and stop")
    out.add_argument("--explain", action="store_true",
                     help="run the verb under EXPLAIN ANALYZE: files, row groups and rows scanned")
    lim = p.add_argument_group("limits (each query)")
    lim.add_argument("--threads", type=int, metavar="N", help="DuckDB threads, at most the cores (default: all cores)")
    lim.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop a query that runs longer (default 300); Ctrl-C stops one at once")
    lim.add_argument("--memory-limit", metavar="SIZE",
                     help="DuckDB memory, e.g. 4GB or 25%% (default half the RAM); past it, "
                          "DuckDB spills to a private temporary directory")
    p.set_defaults(func=run)
    _list_verbs_on_unknown_options(p)


def _list_verbs_on_unknown_options(parser) -> None:
    """argparse reports stray options from the top-level parser without naming the verbs; do it here."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = parse_known(args, namespace)
        if extra:
            raise UsageError(f"kvcore query: unknown argument {extra[0]!r}; verbs: {', '.join(VERB_FLAGS)} "
                             "(kvcore query --help lists the options)")
        return ns, extra

    parser.parse_known_args = parse_known_args


def chosen_verb(args) -> str:
    for flag, (name, _) in VERB_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value is not False:  # `--layer-summary 0` is a verb too
            return name
    return "info"


def verb_arguments(verb: str, args) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the verb; options meant for other verbs are errors."""
    for option, owners in OPTION_VERBS.items():
        if getattr(args, option) is not None and verb not in owners:
            flags = ", ".join(f for f, (n, _) in VERB_FLAGS.items() if n in owners)
            raise UsageError(f"--{option} applies to {flags} only")
    seq = args.seq if args.seq is not None else 0
    if verb == "coordinate":
        return (*args.coordinate, seq), {}
    if verb == "list_tokens":
        return (args.seq,), {}
    if verb == "token_search":
        return (args.token_search, args.layer, args.head), {}
    if verb == "layer_summary":
        return (args.layer_summary,), {}
    if verb == "head_summary":
        return tuple(args.head_summary), {}
    if verb == "token_summary":
        return (args.token_summary, seq), {}
    if verb == "search_norm":
        return (*_norm_range(args.search_norm), args.layer, args.head), {}
    if verb == "nearest":
        return (*args.nearest,), dict(k=10 if args.k is None else args.k, seq=seq, by=args.by or "key",
                                      metric=args.metric or "cosine")
    return (), {}


def _norm_range(values: list[str]) -> tuple[float, float, str]:
    usage = "--search-norm takes LOW HIGH [key|value], e.g. --search-norm 0.5 1.0 key"
    if len(values) not in (2, 3):
        raise UsageError(f"{usage} (got {len(values)} values)")
    try:
        low, high = float(values[0]), float(values[1])
    except ValueError:
        raise UsageError(f"{usage}; LOW and HIGH must be numbers (got {values[0]!r} {values[1]!r})") from None
    kind = values[2] if len(values) == 3 else "key"
    if kind not in ("key", "value"):
        raise UsageError(f"{usage}; the norm is of 'key' or 'value' (got {kind!r})")
    return low, high, kind


def run(args) -> int:
    from kvcore.atomic import check_output
    from kvcore.query import Query, open_run
    from kvcore.query.limits import check_threads, check_timeout, memory_limit_bytes
    from kvcore.query.printing import export, show, single_select
    from kvcore.query.views import literal

    verb = chosen_verb(args)
    positional, keywords = verb_arguments(verb, args)
    if verb == "shell" and (args.export_csv or args.export_parquet or args.show_sql or args.explain):
        raise UsageError("--shell takes no --export-*, --show-sql or --explain; use SQL at the prompt")
    check_threads(args.threads, "--threads")  # checked here too, to name the option
    check_timeout(args.timeout, "--timeout")
    memory_limit_bytes(args.memory_limit, "--memory-limit")
    with open_run(args.path, args.model, args.dataset, args.threads, args.timeout, args.memory_limit) as r:
        if verb == "shell":
            from kvcore.query.shell import Shell

            return Shell(r, args.format, args.limit).loop()
        query = Query(args.sql) if verb == "sql" else r.query(verb, *positional, **keywords)
        if args.show_sql:
            sql = query.sql
            for p in query.params:  # inline the parameters so the SQL runs as printed
                sql = sql.replace("?", literal(p), 1)
            print(sql.strip() + ";")
            return 0
        if args.explain:
            print(r.explain(query))
            return 0
        select = single_select(query.sql) if args.limit is not None else None
        if select:
            query = Query(select, query.params, query.vertical).limited(args.limit)
        exports = [(f, "csv") for f in [args.export_csv] if f] + [(f, "parquet") for f in [args.export_parquet] if f]
        for path, fmt in exports:  # every check before the first row is written
            check_output(path, f"--export-{fmt}", protected=[run.path for run in r.runs if isinstance(run.path, Path)])
        if len({str(Path(path).resolve()) for path, _ in exports}) < len(exports):
            raise UsageError("--export-csv and --export-parquet name the same file; give two paths")
        for path, fmt in exports:
            n = export(r, query, path, fmt)
            print(f"kvcore: wrote {n} rows to {path}", file=sys.stderr)
        if not exports:
            show(r, query, args.format, args.limit)
    return 0

