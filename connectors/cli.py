"""The ``sqlinfer`` command line.

It sits at the edge of the project (it may import every package; none imports it)::

    sqlinfer sql "SELECT ai_query('system-smollm2-135m-instruct', review) FROM 'reviews.csv'"
    sqlinfer models            # bundled and local models
    sqlinfer models prepare    # convert the bundled models now instead of on first use
    sqlinfer endpoints list    # endpoints the SQL functions can call

Errors print as one line ``error: <ERROR_CODE>: <message>`` and exit with status 1; a table goes
to stdout, progress and summaries to stderr, so ``sqlinfer sql ... > out.txt`` stays clean.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import Sequence

from engine.errors import SqlinferError


def _cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from connectors.duckdb import connect, functions

    con = connect(args.database)
    try:
        ai = functions(con)
        try:
            with ai.stats.progress(description="ai rows") if args.progress else nullcontext():
                relation = con.sql(args.query)
                # A DuckDB 2.0 relation runs again on every call: materialize it exactly once.
                result = relation.to_arrow_table() if relation is not None else None
        except duckdb.Error as exc:
            raise SqlinferError(_strip_udf_prefix(str(exc))) from None
        if result is not None:
            duckdb.from_arrow(result).show(max_rows=args.max_rows, max_width=args.max_width)
        snapshot = ai.stats.snapshot()
        if snapshot.rows:
            print(f"ai functions: {snapshot.summary()}", file=sys.stderr)
    finally:
        con.close()
    return 0


def _strip_udf_prefix(message: str) -> str:
    """DuckDB wraps our errors in 'Python exception occurred while executing the UDF: X: msg'."""
    marker = "Python exception occurred while executing the UDF: "
    return message.split(marker, 1)[1] if marker in message else message


def _cmd_models(args: argparse.Namespace) -> int:
    from engine.model_store import BUNDLED_MODELS, list_models, materialize

    if args.action == "prepare":
        for name in BUNDLED_MODELS:
            print(f"{name}: {materialize(name)}")
        return 0
    rows = [("name", "task", "source", "status", "path")]
    rows += [(m.name, m.task, m.source, m.status, m.path) for m in list_models()]
    _print_columns(rows)
    return 0


def _cmd_endpoints(args: argparse.Namespace) -> int:
    from serving.registry import default_registry

    rows = [("name", "task", "description")]
    rows += [(e.name, e.task, e.description) for e in default_registry().endpoints()]
    _print_columns(rows)
    return 0


def _print_columns(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqlinfer", description="Run LLMs over tables from SQL.")
    commands = parser.add_subparsers(dest="command", required=True)

    sql = commands.add_parser("sql", help="run DuckDB SQL with ai_query/ai_embed and print the result")
    sql.add_argument("query", help="the SQL; CSV/Parquet paths are read as DuckDB reads them ('data.csv')")
    sql.add_argument("--database", default=":memory:", help="DuckDB database file (default: in memory)")
    sql.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")
    sql.add_argument("--max-width", type=int, default=160, help="table width in characters")
    sql.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    sql.set_defaults(handler=_cmd_sql)

    models = commands.add_parser("models", help="list bundled and local models, or prepare them")
    models.add_argument("action", nargs="?", choices=("list", "prepare"), default="list")
    models.set_defaults(handler=_cmd_models)

    endpoints = commands.add_parser("endpoints", help="list endpoints")
    endpoints.add_argument("action", nargs="?", choices=("list",), default="list")
    endpoints.set_defaults(handler=_cmd_endpoints)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SqlinferError as exc:
        print(f"error: {exc.error_code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
