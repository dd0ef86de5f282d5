"""The ``sqlinfer`` command line.

It sits at the edge of the project (it may import every package; none imports it)::

    sqlinfer sql "SELECT ai_query('system-smollm2-135m-instruct', review) FROM 'reviews.csv'"
    sqlinfer sql --server http://127.0.0.1:8080 "..."   # AI calls go to a running (warm) sqlinfer serve
    sqlinfer doctor            # CPU, engine build, and the engine settings chosen for them, with reasons
    sqlinfer models            # bundled and local models
    sqlinfer models prepare    # convert the bundled models now instead of on first use
    sqlinfer endpoints list    # endpoints (system and registered)
    sqlinfer serve --port 8080 # the REST API (Databricks Model Serving compatible)
    sqlinfer tokens create --user alice [--admin]
    sqlinfer users entitle alice create-serving-endpoints
    sqlinfer endpoints create -f config.json | get NAME | update-config NAME -f c.json | delete NAME
    sqlinfer secrets create-scope S | put S K | list S | ...

Management commands act on the local registry (``$SQLINFER_HOME/registry.db``) directly, as
the owner of that file (the way ``sqlite3`` does); remote clients use the REST API with a token.

Errors print as one line ``error: <ERROR_CODE>: <message>`` and exit with status 1; a table goes
to stdout, progress and summaries to stderr, so ``sqlinfer sql ... > out.txt`` stays clean.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import nullcontext
from typing import Any, Sequence

from engine.errors import SqlinferError


def _cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from connectors.duckdb import connect, functions, translate_error

    con = connect(args.database, client=_serving_client(args))
    try:
        ai = functions(con)
        if not args.store:
            ai.store = None
        if "sqlinfer_usage" in args.query.lower():
            _register_usage_view(con)
        try:
            with ai.stats.progress(description="ai rows") if args.progress else nullcontext():
                if args.batch_mode:
                    result = _run_batched(con, args, ai)
                elif args.max_cost is not None or args.max_tokens is not None:
                    from ai_functions.explain import Budget
                    from connectors.duckdb import execute_within

                    result = execute_within(con, args.query, Budget(args.max_cost, args.max_tokens), ai)
                else:
                    relation = con.sql(args.query)
                    # A DuckDB 2.0 relation runs again on every call: materialize it exactly once.
                    result = relation.to_arrow_table() if relation is not None else None
        except duckdb.Error as exc:
            raise translate_error(con, exc) from None
        if result is not None and args.format == "jsonl":
            for row in result.to_pylist():
                print(json.dumps(row, default=str, ensure_ascii=False))
        elif result is not None:
            duckdb.from_arrow(result).show(max_rows=args.max_rows, max_width=args.max_width)
        snapshot = ai.stats.snapshot()
        if snapshot.rows:
            print(f"ai functions: {snapshot.summary()}", file=sys.stderr)
    finally:
        con.close()
    return 0


def _run_batched(con: Any, args: argparse.Namespace, ai: Any) -> Any:
    """``sql --batch-mode``: the provider batches' progress as a bar (submitted, in progress,
    completed), their ids on stderr, and --max-cost / --max-tokens checked at batch prices."""
    from ai_functions.explain import Budget
    from connectors.duckdb import execute_batched

    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="provider batches", unit="batch", file=sys.stderr, dynamic_ncols=True)

    def counts(now: Any) -> None:
        if bar is not None:
            bar.total, bar.n = now.submitted, now.completed
            bar.set_postfix_str(f"submitted {now.submitted}, in progress {now.in_progress}, completed {now.completed}")

    budget = Budget(args.max_cost, args.max_tokens) if args.max_cost is not None or args.max_tokens is not None else None
    try:
        return execute_batched(con, args.query, ai, poll_seconds=args.poll_seconds, budget=budget, on_counts=counts,
                               progress=lambda line: print(line, file=sys.stderr) if line.startswith("submitted") else None)
    finally:
        if bar is not None:
            bar.close()


def _serving_client(args: argparse.Namespace):
    """The HTTP client to a running ``sqlinfer serve`` when --server (or SQLINFER_SERVER) names one;
    None: serve in this process (engines start here, ~30-60 s the first time)."""
    url = args.server or os.environ.get("SQLINFER_SERVER")
    if not url:
        return None
    from serving.data.http_client import HttpServingClient

    token = args.token or os.environ.get("SQLINFER_TOKEN") or os.environ.get("DATABRICKS_TOKEN")
    return HttpServingClient(url, token)


def _add_server_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", help="send the AI calls to a running `sqlinfer serve` at this URL, whose engines "
                                          "stay warm between queries (default: $SQLINFER_SERVER; unset: in this process)")
    command.add_argument("--token", help="API token for --server (default: $SQLINFER_TOKEN, then $DATABRICKS_TOKEN)")


def _cmd_doctor(args: argparse.Namespace) -> int:
    from engine.report import EngineReport

    for line in EngineReport.for_this_machine().lines():
        print(line)
    key = _service().secrets.key.status()
    if key.ok:
        print(f"secret key: ok ({key.source}; {key.encrypted_values} encrypted value(s) depend on it)")
    else:
        print(f"secret key: PROBLEM: {key.problem}")
        return 1
    return 0


def _register_usage_view(con) -> None:
    """``sqlinfer_usage``: the usage table as of the query's start (one row per request)."""
    import pyarrow as pa

    from serving.data.usage import COLUMNS, UsageRecorder

    rows = UsageRecorder(_service().db).rows()
    con.register("sqlinfer_usage", pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in COLUMNS}))


def _cmd_models(args: argparse.Namespace) -> int:
    from engine.model_store import BUNDLED_MODELS, list_models, materialize

    if args.action == "register":
        _print_json(_service().register_local_model(_need(args.name, "NAME"), _need(args.path, "PATH")))
        return 0
    if args.action == "prepare":
        for name in BUNDLED_MODELS:
            print(f"{name}: {materialize(name)}")
        return 0
    rows = [("name", "task", "source", "status", "path")]
    rows += [(m.name, m.task, m.source, m.status, m.path) for m in list_models()]
    _print_columns(rows)
    return 0


def _service():
    from serving.control.service import EndpointService

    return EndpointService()


def _read_json(path: str) -> object:
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as exc:
        raise SqlinferError(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        from serving.errors import MalformedRequest

        raise MalformedRequest(f"{path!r} is not valid JSON: {exc}") from None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _cmd_endpoints(args: argparse.Namespace) -> int:
    service = _service().start()  # resumes deployments a restart interrupted
    if args.action == "list":
        rows = [("name", "task", "ready", "config_update")]
        for e in service.list():
            rows.append((e["name"], e.get("task", "-"), e["state"]["ready"], e["state"]["config_update"]))
        _print_columns(rows)
        return 0
    if args.action == "create":
        endpoint = service.create(_read_json(args.file))
    elif args.action == "update-config":
        endpoint = service.update_config(_need(args.name, "NAME"), _read_json(args.file))
    elif args.action == "get":
        endpoint = service.get(_need(args.name, "NAME"))
    else:  # delete
        service.delete(_need(args.name, "NAME"))
        print(f"deleted {args.name}")
        return 0
    if args.wait and endpoint["state"]["config_update"] == "IN_PROGRESS":
        service.wait_for_deployments()
        endpoint = service.get(endpoint["name"])
    _print_json(endpoint)
    return 0


def _need(value: str | None, what: str) -> str:
    if not value:
        raise SqlinferError(f"this command needs {what}")
    return value


def _cmd_sidecar(args: argparse.Namespace) -> int:
    from connectors import sidecar

    if args.action == "stop":
        print("stopped" if sidecar.stop() else "no sidecar was running")
        return 0
    found = sidecar.running()
    print(f"running: pid {found.pid} at {found.url}" if found else "not running")
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    auth = _service().auth
    if args.action in ("entitle", "revoke"):
        auth.entitle(_need(args.user, "a user name"), _need(args.entitlement, "an entitlement"), granted=args.action == "entitle")
    print(f"{args.user}: entitlements {', '.join(auth.entitlements(args.user)) or 'none'}")
    return 0


def _cmd_groups(args: argparse.Namespace) -> int:
    principals = _service().auth.principals
    if args.action == "create":
        principals.create_group(_need(args.group, "a group name"), args.members)
    elif args.action in ("add", "remove"):
        members = _need(args.members, "one or more members (user names or application ids)")
        principals.change_members(_need(args.group, "a group name"), **{args.action: members})
    elif args.action == "delete":
        principals.delete_group(principals.group_named(_need(args.group, "a group name")).id)
        print(f"deleted group {args.group}")
        return 0
    for group in principals.groups() if args.action == "list" else [principals.group_named(args.group)]:
        print(f"{group.name}: {', '.join(group.members) or '(no members)'}")
    return 0


def _cmd_service_principals(args: argparse.Namespace) -> int:
    auth = _service().auth
    if args.action == "create":
        sp = auth.principals.create_service_principal(_need(args.name, "a display name"))
        print(f"{sp.application_id}  {sp.display_name} (id {sp.id})")
    elif args.action == "token":
        sp = auth.principals.service_principal_by_application(_need(args.name, "the application id"))
        _, token = auth.create_token(sp.application_id, comment=f"service principal {sp.display_name}")
        print(token)
        print(f"token for service principal {sp.display_name} ({sp.application_id}); shown only once", file=sys.stderr)
    else:
        for sp in auth.principals.service_principals():
            print(f"{sp.application_id}  {sp.display_name}")
    return 0


def _cmd_tokens(args: argparse.Namespace) -> int:
    auth = _service().auth
    if args.action == "create":
        token_id, token = auth.create_token(_need(args.user, "--user NAME"), is_admin=args.admin, comment=args.comment)
        print(token)
        print(f"token id {token_id} for {args.user}{' (admin)' if args.admin else ''}; the token is shown only once",
              file=sys.stderr)
    elif args.action == "list":
        rows = [("id", "user", "admin", "comment")]
        rows += [(t["id"], t["user_name"], str(t["is_admin"]).lower(), t["comment"] or "") for t in auth.list_tokens()]
        _print_columns(rows)
    else:
        auth.revoke_token(_need(args.token_id, "a token id"))
        print(f"revoked {args.token_id}")
    return 0


def _cmd_secrets(args: argparse.Namespace) -> int:
    secrets = _service().secrets
    action, scope = args.action, args.scope
    if action == "list-scopes":
        _print_columns([("scope",)] + [(s["name"],) for s in secrets.list_scopes()])
    elif action == "create-scope":
        secrets.create_scope(_need(scope, "a scope"))
    elif action == "delete-scope":
        secrets.delete_scope(_need(scope, "a scope"))
    elif action == "put":
        value = args.value if args.value is not None else sys.stdin.read().rstrip("\n")
        secrets.put(_need(scope, "a scope"), _need(args.key, "a key"), value)
    elif action == "list":
        _print_columns([("key", "last_updated_timestamp")] + [(s["key"], str(s["last_updated_timestamp"])) for s in secrets.list(_need(scope, "a scope"))])
    elif action == "acl-put":
        secrets.put_acl(_need(scope, "a scope"), _need(args.key, "a principal"), _need(args.permission, "--permission"))
    elif action == "acl-delete":
        secrets.delete_acl(_need(scope, "a scope"), _need(args.key, "a principal"))
    elif action == "acl-list":
        _print_columns([("principal", "permission")] + [(a["principal"], a["permission"]) for a in secrets.list_acls(_need(scope, "a scope"))])
    else:  # delete
        secrets.delete(_need(scope, "a scope"), _need(args.key, "a key"))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.api.app import create_app

    if args.workers > 1:  # each worker process builds its own app; limits and usage are shared in SQLite
        uvicorn.run("serving.api.app:serve_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                    log_level=args.log_level)
    else:
        uvicorn.run(create_app(_service(), owns_process=True), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import duckdb

    from ai_functions.explain import totals
    from connectors.duckdb import connect, explain, functions, translate_error

    con = connect(args.database, client=_serving_client(args))
    try:
        ai = functions(con)
        if args.batch_mode:  # costed as the providers' batch APIs would charge it
            from ai_functions.stats import prices_from_env

            ai.stats.prices = prices_from_env("SQLINFER_BATCH_PRICES")
        try:
            estimates = explain(con, args.query, ai)
        except duckdb.Error as exc:
            raise translate_error(con, exc) from None
        for estimate in estimates:
            print(estimate.line())
        tokens, cost = totals(estimates)
        print(f"total: {tokens} tokens at most, cost {'%.6f' % cost if cost is not None else 'unknown (no price set)'}; "
              f"no model was called")
    finally:
        con.close()
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from serving.data.result_store import default_store

    store = default_store()
    if store is None:
        print("the result store is off (SQLINFER_RESULT_STORE=off)")
        return 0
    if args.action == "clear":
        removed = store.clear(args.endpoint)
        print(f"removed {removed} stored answers" + (f" of {args.endpoint!r}" if args.endpoint else "") + f" from {store.path}")
    else:
        print(f"{store.count(args.endpoint)} stored answers" + (f" of {args.endpoint!r}" if args.endpoint else "") + f" in {store.path}")
    return 0


def _cmd_batches(args: argparse.Namespace) -> int:
    from ai_functions.batch_mode import batch_provider, default_ledger

    ledger = default_ledger()
    known = {batch["batch_id"]: batch for batch in ledger.batches()}
    if args.action == "list":
        _print_columns([("batch_id", "provider", "endpoint", "requests", "state")] +
                       [(b["batch_id"], b["provider"], b["endpoint"], str(b["requests"]), b["state"]) for b in known.values()])
        return 0
    batch = known.get(_need(args.batch_id, "a batch id"))
    if batch is None:
        raise SqlinferError(f"no batch {args.batch_id!r} in {ledger.path}; `sqlinfer batches list` shows them")
    from serving.data.client import InProcessClient

    found = batch_provider(InProcessClient(), batch["endpoint"], control_only=True)
    if found is None:
        raise SqlinferError(f"endpoint {batch['endpoint']!r} of batch {args.batch_id!r} is no longer an OpenAI or Anthropic endpoint")
    provider = found.provider
    if args.action == "cancel":
        provider.cancel(args.batch_id)
    state = provider.progress(args.batch_id)
    print(f"{args.batch_id}: {state.state}, {state.succeeded} succeeded, {state.failed} failed, {state.total} in all")
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
    sql.add_argument("--format", choices=("table", "jsonl"), default="table",
                     help="table (default) or jsonl: every row as one JSON object per line, for scripts")
    sql.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    sql.add_argument("--no-store", dest="store", action="store_false",
                     help="neither read nor keep answers in the result store for this query")
    sql.add_argument("--max-cost", type=float, help="refuse (before any call) or stop a query that would cost more")
    sql.add_argument("--max-tokens", type=int, help="refuse (before any call) or stop a query that would use more tokens")
    sql.add_argument("--batch-mode", action="store_true",
                     help="send ai_query's calls to OpenAI/Anthropic endpoints through their batch APIs (half price, "
                          "answers within 24 h); a re-run re-attaches to the batches in flight")
    sql.add_argument("--poll-seconds", type=float, default=30.0, help="with --batch-mode: how often to poll (default 30)")
    _add_server_options(sql)

    explain = commands.add_parser("explain", help="what a query's AI calls would send and cost, without calling a model")
    explain.add_argument("query")
    explain.add_argument("--database", default=":memory:", help="DuckDB database file (default: in memory)")
    explain.add_argument("--batch-mode", action="store_true", help="cost it at the batch prices of SQLINFER_BATCH_PRICES")
    _add_server_options(explain)
    explain.set_defaults(handler=_cmd_explain)
    sql.set_defaults(handler=_cmd_sql)

    models = commands.add_parser("models", help="list, prepare or register models")
    models.add_argument("action", nargs="?", choices=("list", "prepare", "register"), default="list")
    models.add_argument("name", nargs="?", help="register: the name entity_name will use")
    models.add_argument("path", nargs="?", help="register: a local Hugging Face model directory")
    models.set_defaults(handler=_cmd_models)

    endpoints = commands.add_parser("endpoints", help="manage serving endpoints (Databricks shapes)")
    endpoints.add_argument("action", nargs="?", choices=("list", "get", "create", "update-config", "delete"), default="list")
    endpoints.add_argument("name", nargs="?", help="the endpoint (get, update-config, delete)")
    endpoints.add_argument("-f", "--file", default="-", help="JSON request body (create, update-config); - for stdin")
    endpoints.add_argument("--no-wait", dest="wait", action="store_false", help="return while the config deploys")
    endpoints.set_defaults(handler=_cmd_endpoints)

    users = commands.add_parser("users", help="entitlements: who may create serving endpoints")
    users.add_argument("action", choices=("show", "entitle", "revoke"))
    users.add_argument("user")
    users.add_argument("entitlement", nargs="?", help="entitle/revoke: create-serving-endpoints")
    users.set_defaults(handler=_cmd_users)

    groups = commands.add_parser("groups", help="groups: permissions and rate limits for several users at once")
    groups.add_argument("action", choices=("list", "show", "create", "add", "remove", "delete"))
    groups.add_argument("group", nargs="?")
    groups.add_argument("members", nargs="*", help="create/add/remove: user names or service principals' application ids")
    groups.set_defaults(handler=_cmd_groups)

    principals = commands.add_parser("service-principals", help="application identities and their tokens")
    principals.add_argument("action", choices=("list", "create", "token"))
    principals.add_argument("name", nargs="?", help="create: a display name; token: the application id")
    principals.set_defaults(handler=_cmd_service_principals)

    tokens = commands.add_parser("tokens", help="API tokens")
    tokens.add_argument("action", choices=("create", "list", "revoke"))
    tokens.add_argument("token_id", nargs="?", help="revoke: the token id")
    tokens.add_argument("--user", help="create: the user the token authenticates")
    tokens.add_argument("--admin", action="store_true", help="create: the user may do everything")
    tokens.add_argument("--comment")
    tokens.set_defaults(handler=_cmd_tokens)

    secrets = commands.add_parser("secrets", help="secret scopes and secrets (values are never printed)")
    secrets.add_argument("action", choices=("list-scopes", "create-scope", "delete-scope", "put", "list", "delete",
                                            "acl-put", "acl-delete", "acl-list"))
    secrets.add_argument("scope", nargs="?")
    secrets.add_argument("key", nargs="?", help="the key; for acl-put and acl-delete: the principal (a user, or 'users')")
    secrets.add_argument("--permission", choices=("READ", "WRITE", "MANAGE"), help="acl-put: the permission to grant")
    secrets.add_argument("--value", help="put: the value (default: read from stdin, so it stays out of shell history)")
    secrets.set_defaults(handler=_cmd_secrets)

    doctor = commands.add_parser("doctor", help="this machine's CPU/GPU, the engine build, and the engine settings "
                                                "chosen for them (dtype, threads), with the reason for each")
    doctor.set_defaults(handler=_cmd_doctor)

    side = commands.add_parser("sidecar", help="this host's sidecar sqlinfer serve (Spark's engines next to the executors)")
    side.add_argument("action", choices=("status", "stop"), nargs="?", default="status")
    side.set_defaults(handler=_cmd_sidecar)

    batches = commands.add_parser("batches", help="provider batches of --batch-mode queries ($SQLINFER_HOME/provider_batches.db)")
    batches.add_argument("action", choices=["list", "status", "cancel"], nargs="?", default="list")
    batches.add_argument("batch_id", nargs="?", help="the batch (status, cancel)")
    batches.set_defaults(handler=_cmd_batches)

    cache = commands.add_parser("cache", help="the durable result store ($SQLINFER_HOME/results.db)")
    cache.add_argument("action", choices=["info", "clear"], nargs="?", default="info")
    cache.add_argument("--endpoint", help="only this endpoint's answers")
    cache.set_defaults(handler=_cmd_cache)

    serve = commands.add_parser("serve", help="run the REST API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes (default 1). Each process loads its own local engines, so use "
                            "more than one for external and custom-model endpoints")
    serve.set_defaults(handler=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # sqlinfer's own notes (an engine's one start line, scale-to-zero) go to stderr as plain lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("engine").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except SqlinferError as exc:
        message = exc.message.removeprefix(f"[{exc.error_code}] ")  # the code is printed once, in front
        print(f"error: {exc.error_code}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
