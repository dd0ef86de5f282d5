"""Usage tracking: every query, REST or SQL, leaves a row; /metrics and sqlinfer_usage read them."""

from __future__ import annotations

import json
import os
import subprocess


from connectors.duckdb import connect
from serving.data.client import InProcessClient
from serving.data.directory import directory_for
from serving.data.usage import UsageRecorder
from tests.registry_helpers import SQLINFER, external_endpoint
from tests.test_rate_limits import start_of_a_window





def test_rest_and_sql_queries_are_recorded_and_summarised(server, admin, upstream):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("tracked", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    admin.put("/api/2.0/serving-endpoints/tracked/ai-gateway", json={
        "inference_table_config": {"enabled": True}, "rate_limits": [{"calls": 3, "key": "endpoint", "renewal_period": "minute"}]})

    start_of_a_window()
    ok = admin.post("/serving-endpoints/tracked/invocations", json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
        "client_request_id": "req-42", "usage_context": {"team": "search"}})
    assert ok.status_code == 200
    con = connect(client=InProcessClient(directory_for(server.service)))
    try:
        con.execute("SELECT ai_query('tracked', r) FROM (VALUES ('a'), ('b')) t(r)").fetchall()
    finally:
        con.close()
    refused = admin.post("/serving-endpoints/tracked/invocations", json={"messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 429

    rows = UsageRecorder(server.service.db).rows("tracked")
    assert [(r["source"], r["status_code"]) for r in rows] == [("rest", 200), ("sql", 200), ("sql", 200), ("rest", 429)]
    rest = rows[0]
    assert rest["requester"] == "admin@example.com" and rest["client_request_id"] == "req-42"
    assert json.loads(rest["usage_context"]) == {"team": "search"}
    assert rest["served_entity"] == "model-x" and rest["input_tokens"] == 3 and rest["output_tokens"] == 2
    assert rows[1]["requester"] == "embedded" and rows[1]["latency_ms"] > 0
    payloads = server.service.db.read().execute("SELECT request_json, response_json FROM inference_payloads").fetchall()
    assert json.loads(payloads[0]["request_json"]) == [{"role": "user", "content": "hello"}]
    assert json.loads(payloads[0]["response_json"])["choices"] == ["hello"]

    metrics = admin.get("/serving-endpoints/tracked/metrics")
    assert metrics.status_code == 200
    assert 'sqlinfer_endpoint_requests_total{endpoint="tracked",served_entity="model-x",source="sql",status="200"} 2' in metrics.text
    assert 'source="rest",status="429"} 1' in metrics.text


def test_the_usage_table_is_queryable_from_sql(tmp_path, upstream):
    env = os.environ | {"SQLINFER_HOME": str(tmp_path / "home")}
    from serving.control.service import EndpointService

    service = EndpointService(tmp_path / "home")
    service.create(external_endpoint("cli-tracked", upstream.url))
    service.wait_for_deployments()
    first = subprocess.run([SQLINFER, "sql", "SELECT ai_query('cli-tracked', 'hi there')", "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    summary = subprocess.run([SQLINFER, "sql", "SELECT endpoint_name, source, sum(output_tokens) AS out, count(*) AS n "
                              "FROM sqlinfer_usage GROUP BY ALL", "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "cli-tracked" in summary.stdout and "sql" in summary.stdout
