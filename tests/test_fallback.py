"""fallback_config: a 5xx/429 from one entity goes to the next entity in order; if all fail, the last error."""

from __future__ import annotations

import json

import pytest

from connectors.duckdb import connect
from serving.data.client import InProcessClient
from serving.data.directory import directory_for
from tests.registry_helpers import wait_until_settled

pytestmark = pytest.mark.engine


@pytest.fixture
def unloadable_model(tmp_path, service):
    """A registered model whose config passes the deployment check but whose weights are missing."""
    directory = tmp_path / "no-weights"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    service.register_local_model("no-weights", str(directory))
    return "no-weights"


def config(first: str, second: str) -> dict:
    return {"served_entities": [{"entity_name": first, "name": "primary"}, {"entity_name": second, "name": "backup"}],
            "traffic_config": {"routes": [{"served_model_name": "primary", "traffic_percentage": 100},
                                          {"served_model_name": "backup", "traffic_percentage": 0}]}}


def test_a_failing_entity_falls_back_to_the_next_one(server, admin, unloadable_model, chat_engine):
    admin.post("/api/2.0/serving-endpoints", json={"name": "fb", "config": config(unloadable_model, "smollm2-135m-instruct")}).raise_for_status()
    wait_until_settled(admin, "fb")
    ask = {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "max_tokens": 8, "temperature": 0}

    without = admin.post("/serving-endpoints/fb/invocations", json=ask)
    assert without.status_code == 503 and "could not start the local engine" in without.json()["message"]
    assert without.json()["error_code"] == "ENGINE_UNAVAILABLE" and without.headers.get("connection") != "close"

    admin.put("/api/2.0/serving-endpoints/fb/ai-gateway", json={"fallback_config": {"enabled": True}}).raise_for_status()
    answered = admin.post("/serving-endpoints/fb/invocations", json=ask)
    assert answered.status_code == 200, answered.text
    assert answered.headers["served-model-name"] == "backup"
    assert "Paris" in answered.json()["choices"][0]["message"]["content"]

    con = connect(client=InProcessClient(directory_for(server.service)))
    try:
        rows = con.execute("SELECT ai_query('fb', 'Say hi.', modelParameters => {'max_tokens': 2})").fetchall()
    finally:
        con.close()
    assert rows[0][0]


def test_when_every_entity_fails_the_last_error_stands(server, admin, unloadable_model):
    admin.post("/api/2.0/serving-endpoints", json={"name": "all-bad", "config": config(unloadable_model, unloadable_model),
                                                   "ai_gateway": {"fallback_config": {"enabled": True}}}).raise_for_status()
    wait_until_settled(admin, "all-bad")
    response = admin.post("/serving-endpoints/all-bad/invocations", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503 and "could not start the local engine" in response.json()["message"]
    assert response.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
