"""ai_query in provider batch mode (issue 19, parts 1-2): a DuckDB query's calls to OpenAI and
Anthropic endpoints go through their batch APIs (loopback servers speaking both protocols,
tests/fake_batch_providers.py), come back in input order, and a killed run re-attaches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ai_functions.batch_mode import BatchLedger
from connectors.duckdb import connect, execute_batched, functions
from serving.data.client import InProcessClient
from serving.data.directory import directory_for
from tests.fake_batch_providers import BatchProviderServer

QUERY = "SELECT i, ai_query('{endpoint}', 'row ' || i {extra}) AS answer FROM range({rows}) t(i) ORDER BY i"


@pytest.fixture
def provider(monkeypatch):
    server = BatchProviderServer(polls_to_finish=3)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    yield server
    server.stop()


@pytest.fixture
def endpoints(service, provider):
    service.create({"name": "oa-batch", "config": {"served_entities": [{"external_model": {
        "name": "gpt-x", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": "sk-test", "openai_api_base": provider.url + "/v1"}}}]}})
    service.create({"name": "claude-batch", "config": {"served_entities": [{"external_model": {
        "name": "claude-x", "provider": "anthropic", "task": "llm/v1/chat",
        "anthropic_config": {"anthropic_api_key_plaintext": "sk-ant-test"}}}]}})
    service.wait_for_deployments()
    return service


@pytest.mark.parametrize("endpoint,kind", [("oa-batch", "openai"), ("claude-batch", "anthropic")])
def test_a_thousand_row_query_goes_through_the_providers_batch_api(endpoints, provider, tmp_path, endpoint, kind):
    con = connect(client=InProcessClient(directory_for(endpoints)))
    ledger = BatchLedger(tmp_path / "ledger.db")
    table = execute_batched(con, QUERY.format(endpoint=endpoint, rows=1000, extra=""), poll_seconds=0.01, ledger=ledger)
    assert table.column("answer").to_pylist() == [f"row {i}" for i in range(1000)]
    assert provider.creates[kind] == 1
    report = functions(con).batch_report
    assert len(report.submitted) == 1 and report.requests == 1000 and report.sent_online == 0
    [batch] = ledger.batches()
    assert batch["provider"] == kind and batch["requests"] == 1000 and batch["state"] == "ended"
    again = execute_batched(con, QUERY.format(endpoint=endpoint, rows=1000, extra=""), poll_seconds=0.01, ledger=ledger)
    assert again.column("answer").to_pylist() == [f"row {i}" for i in range(1000)] and provider.creates[kind] == 1


def test_failed_lines_follow_fail_on_error_exactly_as_online(endpoints, provider, tmp_path):
    con = connect(client=InProcessClient(directory_for(endpoints)))
    ledger = BatchLedger(tmp_path / "ledger.db")
    failing = ("SELECT i, ai_query('oa-batch', CASE WHEN i = 3 THEN 'FAIL ' ELSE 'row ' END || i{extra}) AS answer "
               "FROM range(6) t(i) ORDER BY i")
    with pytest.raises(Exception, match="scripted failure"):
        execute_batched(con, failing.format(extra=""), poll_seconds=0.01, ledger=ledger)
    table = execute_batched(con, failing.format(extra=", failOnError => false"), poll_seconds=0.01, ledger=ledger)
    rows = table.column("answer").to_pylist()
    assert rows[0] == {"result": "row 0", "errorMessage": None}
    assert rows[3]["result"] is None and "scripted failure" in rows[3]["errorMessage"]
    # the second run re-used the first run's answers and sent only the failed request again, as online
    assert provider.creates["openai"] == 2 and [b["requests"] for b in ledger.batches()] == [6, 1]


def test_a_killed_run_re_attaches_to_its_batch_and_pays_nothing_twice(endpoints, provider, tmp_path):
    """The first run is SIGKILLed while it polls (the provider never finishes); the second
    run finds the batch in the ledger, waits for it, and creates nothing."""
    provider.polls_to_finish = 10**9
    ledger_path = tmp_path / "ledger.db"
    script = textwrap.dedent(f"""
        import os
        from ai_functions.batch_mode import BatchLedger
        from connectors.duckdb import connect, execute_batched, functions
        from serving.control.service import EndpointService
        from serving.data.client import InProcessClient
        from serving.data.directory import directory_for
        con = connect(client=InProcessClient(directory_for(EndpointService({str(endpoints.home)!r}))))
        execute_batched(con, {QUERY.format(endpoint='oa-batch', rows=1000, extra='')!r}, poll_seconds=0.05,
                        ledger=BatchLedger({str(ledger_path)!r}))
    """)
    env = os.environ | {"ANTHROPIC_BASE_URL": provider.url}
    run = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.monotonic() + 120
    while not any(b["polls"] >= 2 for b in provider.openai.values()):  # created, committed, and polling
        assert run.poll() is None and time.monotonic() < deadline, "the first run ended or never polled"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert provider.creates["openai"] == 1

    provider.polls_to_finish = 3
    con = connect(client=InProcessClient(directory_for(endpoints)))
    table = execute_batched(con, QUERY.format(endpoint="oa-batch", rows=1000, extra=""), poll_seconds=0.01,
                            ledger=BatchLedger(ledger_path))
    assert table.column("answer").to_pylist() == [f"row {i}" for i in range(1000)]
    assert provider.creates["openai"] == 1  # re-attached: no batch created twice
    report = functions(con).batch_report
    assert report.submitted == [] and len(report.reattached) == 1 and report.sent_online == 0


def test_the_cli_runs_a_query_in_batch_mode_and_lists_its_batches(endpoints, provider):
    from tests.registry_helpers import SQLINFER

    env = os.environ | {"SQLINFER_HOME": str(endpoints.home), "ANTHROPIC_BASE_URL": provider.url}
    done = subprocess.run([SQLINFER, "sql", "--batch-mode", "--poll-seconds", "0.01", "--format", "jsonl", "--no-progress",
                           "SELECT ai_query('claude-batch', 'row ' || i) AS a FROM range(5) t(i) ORDER BY i"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines()] == [f'{{"a": "row {i}"}}' for i in range(5)]
    assert "submitted msgbatch_" in done.stderr and provider.creates["anthropic"] == 1
    listed = subprocess.run([SQLINFER, "batches", "list"], env=env, capture_output=True, text=True, timeout=60)
    [batch_id] = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert "claude-batch" in listed.stdout and "ended" in listed.stdout
    status = subprocess.run([SQLINFER, "batches", "status", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"{batch_id}: ended, 5 succeeded, 0 failed, 5 in all" in status.stdout
    priced = env | {"SQLINFER_PRICES": "claude-batch=2/2", "SQLINFER_BATCH_PRICES": "claude-batch=1/1"}
    query = "SELECT ai_query('claude-batch', 'row ' || i || ' again', modelParameters => {'max_tokens': 10}) FROM range(4) t(i)"
    online = subprocess.run([SQLINFER, "explain", query], env=priced, capture_output=True, text=True, timeout=60)
    batched = subprocess.run([SQLINFER, "explain", "--batch-mode", query], env=priced, capture_output=True, text=True, timeout=60)
    cost = lambda out: float(out.split("cost ")[-1].split(";")[0])  # noqa: E731  (the total line)
    assert cost(batched.stdout) > 0 and cost(online.stdout) == pytest.approx(2 * cost(batched.stdout))


def test_batch_prices_budgets_usage_rows_and_progress(endpoints, provider, tmp_path, monkeypatch):
    """Budgets are checked at batch prices before any batch exists; every answered request leaves
    a usage row naming its batch; the progress callback ends with every batch completed."""
    from ai_functions.errors import BudgetExceeded
    from ai_functions.explain import Budget
    from serving.data.usage import flush_all

    monkeypatch.setenv("SQLINFER_PRICES", "oa-batch=100/100")  # online: would break the budget
    monkeypatch.setenv("SQLINFER_BATCH_PRICES", "oa-batch=0.5/0.5")
    con = connect(client=InProcessClient(directory_for(endpoints)))
    ledger = BatchLedger(tmp_path / "ledger.db")
    query = QUERY.format(endpoint="oa-batch", rows=200, extra=", modelParameters => {'max_tokens': 8}")
    with pytest.raises(BudgetExceeded, match="at batch prices"):
        execute_batched(con, query, poll_seconds=0.01, ledger=ledger, budget=Budget(max_cost=0.0001))
    assert provider.creates["openai"] == 0  # refused before anything was submitted
    counts = []
    table = execute_batched(con, query, poll_seconds=0.01, ledger=ledger, budget=Budget(max_cost=0.01), on_counts=counts.append)
    assert table.num_rows == 200 and provider.creates["openai"] == 1
    assert (counts[0].submitted, counts[0].in_progress) == (1, 1) and (counts[-1].in_progress, counts[-1].completed) == (0, 1)
    snapshot = functions(con).stats.snapshot()
    assert snapshot.cost == pytest.approx((200 * 3 + 200 * 2) * 0.5 / 1e6)  # the provider's usage, at batch prices
    flush_all()
    [batch] = ledger.batches()
    rows = endpoints.db.read().execute("SELECT source, ai_function, usage_context, client_request_id, status_code, input_tokens "
                                       "FROM usage WHERE endpoint_name = 'oa-batch'").fetchall()
    assert len(rows) == 200 and {r["source"] for r in rows} == {"sql"} and {r["ai_function"] for r in rows} == {"ai_query"}
    assert {r["usage_context"] for r in rows} == {f'{{"provider_batch": "{batch["batch_id"]}"}}'}
    assert {r["status_code"] for r in rows} == {200} and sum(r["input_tokens"] for r in rows) == 600
    assert len({r["client_request_id"] for r in rows}) == 200


def test_sqlinfer_batches_cancel_stops_a_batch_the_query_waits_for(endpoints, provider):
    import threading

    from tests.registry_helpers import SQLINFER

    provider.polls_to_finish = 10**9
    ledger = BatchLedger(endpoints.home / "provider_batches.db")  # where the CLI looks, with SQLINFER_HOME
    con = connect(client=InProcessClient(directory_for(endpoints)))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["table"] = execute_batched(con, QUERY.format(endpoint="oa-batch", rows=10, extra=", failOnError => false"),
                                               poll_seconds=0.05, ledger=ledger)
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = exc

    waiting = threading.Thread(target=run)
    waiting.start()
    deadline = time.monotonic() + 60
    while not ledger.batches():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [batch] = ledger.batches()
    env = os.environ | {"SQLINFER_HOME": str(endpoints.home), "ANTHROPIC_BASE_URL": provider.url}
    cancelled = subprocess.run([SQLINFER, "batches", "cancel", batch["batch_id"]], env=env, capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    waiting.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    answers = outcome["table"].column("answer").to_pylist()
    assert len(answers) == 10 and all(a["result"] is None and "batch_cancelled" in a["errorMessage"] for a in answers)
    assert ledger.batches()[0]["state"] == "cancelled" and provider.creates["openai"] == 1


def test_the_egress_allow_list_holds_for_batches(endpoints, provider, tmp_path, monkeypatch):
    monkeypatch.setenv("SQLINFER_EGRESS_ALLOW", "api.openai.com")
    con = connect(client=InProcessClient(directory_for(endpoints)))
    with pytest.raises(Exception, match="egress allow-list"):
        execute_batched(con, QUERY.format(endpoint="oa-batch", rows=3, extra=""), poll_seconds=0.01,
                        ledger=BatchLedger(tmp_path / "ledger.db"))
    assert provider.creates["openai"] == 0


def test_an_endpoint_with_guardrails_is_refused_rather_than_unguarded(endpoints, provider, tmp_path):
    endpoints.put_ai_gateway("oa-batch", {"guardrails": {"input": {"pii": {"behavior": "BLOCK"}}}})
    con = connect(client=InProcessClient(directory_for(endpoints)))
    with pytest.raises(Exception, match="guardrails, which batch mode does not apply"):
        execute_batched(con, QUERY.format(endpoint="oa-batch", rows=3, extra=""), poll_seconds=0.01,
                        ledger=BatchLedger(tmp_path / "ledger.db"))
    assert provider.creates["openai"] == 0


def test_only_a_select_runs_in_batch_mode(endpoints, provider, tmp_path):
    con = connect(client=InProcessClient(directory_for(endpoints)))
    with pytest.raises(Exception, match="batch mode runs one SELECT"):
        execute_batched(con, "CREATE TABLE t AS " + QUERY.format(endpoint="oa-batch", rows=3, extra=""), poll_seconds=0.01,
                        ledger=BatchLedger(tmp_path / "ledger.db"))
    assert provider.creates["openai"] == 0 and "t" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
