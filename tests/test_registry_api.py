"""The endpoint registry over a real REST server: Databricks shapes, state machine, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path


from serving.control.db import MIGRATIONS
from serving.control.service import EndpointService
from tests.registry_helpers import CREATE_EXAMPLE, SECRET_VALUE, local_entity, wait_until_settled

ROOT = Path(__file__).resolve().parent.parent
def test_the_documented_create_example_returns_the_documented_shape(admin, gate):
    gate.clear()  # hold the deployment so the state right after create can be checked
    response = admin.post("/api/2.0/serving-endpoints", json=CREATE_EXAMPLE)
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["state"] == {"ready": "NOT_READY", "config_update": "IN_PROGRESS"}
    assert "config" not in created and created["pending_config"]["config_version"] == 1
    gate.set()
    endpoint = wait_until_settled(admin, "openai_endpoint")
    assert endpoint["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert set(endpoint) >= {"name", "creator", "creation_timestamp", "last_updated_timestamp", "state", "config",
                             "tags", "id", "permission_level", "route_optimized"}
    assert endpoint["creator"] == "admin@example.com" and endpoint["permission_level"] == "CAN_MANAGE"
    assert len(endpoint["id"]) == 32 and endpoint["route_optimized"] is False
    [entity] = endpoint["config"]["served_entities"]
    assert entity["external_model"]["openai_config"] == {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}
    assert entity["state"] == {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
    assert entity["creator"] == "admin@example.com" and isinstance(entity["creation_timestamp"], int)
    assert endpoint["config"]["traffic_config"] == {"routes": [{"served_model_name": "openai_embeddings", "traffic_percentage": 100}]}
    assert endpoint["config"]["config_version"] == 1
    assert endpoint["tags"] == [{"key": "team", "value": "gen-ai"}]
    assert endpoint["rate_limits"] == [{"calls": 100, "key": "user", "renewal_period": "minute"}]
    listed = admin.get("/api/2.0/serving-endpoints").json()["endpoints"]
    assert "openai_endpoint" in [e["name"] for e in listed]


def test_system_endpoints_are_listed_ready_and_cannot_be_deleted(admin):
    listed = {e["name"]: e for e in admin.get("/api/2.0/serving-endpoints").json()["endpoints"]}
    system = listed["system-smollm2-135m-instruct"]
    assert system["state"]["ready"] == "READY" and system["task"] == "llm/v1/chat"
    assert listed["system-all-minilm-l6-v2"]["task"] == "llm/v1/embeddings"
    response = admin.delete("/api/2.0/serving-endpoints/system-smollm2-135m-instruct")
    assert response.status_code == 400 and "system endpoints are provisioned by sqlinfer" in response.json()["message"]


def test_update_keeps_the_old_config_serving_until_the_new_one_is_ready(admin, gate):
    admin.post("/api/2.0/serving-endpoints", json={"name": "chat", "config": local_entity()}).raise_for_status()
    assert wait_until_settled(admin, "chat")["state"]["ready"] == "READY"

    gate.clear()  # hold the next deployment so its in-between states can be seen
    new_config = local_entity("system.ai.smollm2-135m-instruct", name="smol-v2", workload_size="Small")
    updating = admin.put("/api/2.0/serving-endpoints/chat/config", json=new_config).json()
    assert updating["state"] == {"ready": "READY", "config_update": "IN_PROGRESS"}
    assert updating["config"]["config_version"] == 1
    assert updating["config"]["served_entities"][0]["name"] == "smollm2-135m-instruct"
    assert updating["pending_config"]["config_version"] == 2
    assert updating["pending_config"]["served_entities"][0]["state"]["deployment"] == "DEPLOYMENT_CREATING"

    conflict = admin.put("/api/2.0/serving-endpoints/chat/config", json=local_entity())
    assert conflict.status_code == 409 and conflict.json()["error_code"] == "RESOURCE_CONFLICT"

    gate.set()
    done = wait_until_settled(admin, "chat")
    assert done["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert done["config"]["config_version"] == 2 and "pending_config" not in done
    assert done["config"]["served_entities"][0]["name"] == "smol-v2"


def test_a_failed_update_ends_update_failed_with_the_old_config_serving(admin, server, tmp_path):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    server.service.register_local_model("tiny", str(model_dir))
    admin.post("/api/2.0/serving-endpoints", json={"name": "local", "config": local_entity("tiny")}).raise_for_status()
    assert wait_until_settled(admin, "local")["state"]["ready"] == "READY"

    (model_dir / "config.json").write_text("{ this is not json")  # the model breaks after registration
    admin.put("/api/2.0/serving-endpoints/local/config", json=local_entity("tiny", name="tiny-again")).raise_for_status()
    failed = wait_until_settled(admin, "local")
    assert failed["state"] == {"ready": "READY", "config_update": "UPDATE_FAILED"}
    assert failed["config"]["config_version"] == 1 and failed["config"]["served_entities"][0]["name"] == "tiny"
    pending_entity = failed["pending_config"]["served_entities"][0]
    assert pending_entity["state"]["deployment"] == "DEPLOYMENT_FAILED"
    assert "JSONDecodeError" in pending_entity["state"]["deployment_state_message"]

    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    admin.put("/api/2.0/serving-endpoints/local/config", json=local_entity("tiny", name="fixed")).raise_for_status()
    fixed = wait_until_settled(admin, "local")
    assert fixed["config"]["config_version"] == 3 and fixed["state"]["config_update"] == "NOT_UPDATING"


def test_tags_rate_limits_ai_gateway_and_optimization_info(admin):
    admin.post("/api/2.0/serving-endpoints", json={"name": "tagged", "config": local_entity(),
                                                   "tags": [{"key": "a", "value": "1"}]}).raise_for_status()
    tags = admin.patch("/api/2.0/serving-endpoints/tagged/tags",
                       json={"add_tags": [{"key": "b", "value": "2"}], "delete_tags": ["a"]}).json()
    assert tags == {"tags": [{"key": "b", "value": "2"}]}
    limits = admin.put("/api/2.0/serving-endpoints/tagged/rate-limits",
                       json={"rate_limits": [{"calls": 10, "key": "user", "renewal_period": "minute"}]}).json()
    assert limits == {"rate_limits": [{"calls": 10, "key": "user", "renewal_period": "minute"}]}
    gateway = {"rate_limits": [{"calls": 5, "tokens": 1000, "key": "endpoint", "renewal_period": "minute"}],
               "usage_tracking_config": {"enabled": True}, "fallback_config": {"enabled": False},
               "inference_table_config": {"catalog_name": "main", "schema_name": "logs", "table_name_prefix": "t", "enabled": True}}
    assert admin.put("/api/2.0/serving-endpoints/tagged/ai-gateway", json=gateway).json() == gateway
    endpoint = admin.get("/api/2.0/serving-endpoints/tagged").json()
    assert endpoint["ai_gateway"] == gateway and endpoint["tags"] == [{"key": "b", "value": "2"}]
    info = admin.get("/api/2.0/serving-endpoints/get-model-optimization-info/system.ai.all-minilm-l6-v2/1").json()
    assert info == {"optimizable": False, "model_type": "bert"}  # chat models: tests/test_provisioned.py (measured)


def test_everything_survives_a_restart(tmp_path, gate):
    home = tmp_path / "home"
    first = EndpointService(home)
    first.secrets.create_scope("s")
    first.secrets.put("s", "k", SECRET_VALUE)
    first.create({"name": "kept", "config": local_entity(), "tags": [{"key": "t", "value": "v"}]})
    first.wait_for_deployments()
    _, token = first.auth.create_token("bob")

    again = EndpointService(home)
    endpoint = again.get("kept")
    assert endpoint["state"]["ready"] == "READY" and endpoint["tags"] == [{"key": "t", "value": "v"}]
    assert again.secrets.resolve("{{secrets/s/k}}") == SECRET_VALUE
    assert again.auth.authenticate(f"Bearer {token}").user_name == "bob"
    assert again.db.schema_version == len(MIGRATIONS)


def test_an_older_registry_is_migrated_in_place_and_keeps_its_data(tmp_path):
    import json
    import sqlite3

    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "registry.db") as con:  # the registry as version 1 wrote it
        con.executescript(MIGRATIONS[0])
        config = {"served_entities": [{"name": "smollm2-135m-instruct", "entity_name": "smollm2-135m-instruct",
                                       "state": {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}}],
                  "traffic_config": {"routes": [{"served_model_name": "smollm2-135m-instruct", "traffic_percentage": 100}]},
                  "_task": "llm/v1/chat"}
        con.execute("INSERT INTO endpoints (id, name, creator, creation_timestamp, last_updated_timestamp, state_ready, "
                    "state_config_update, config_json, config_version) VALUES ('id1', 'from-v1', 'old', 1, 1, 'READY', "
                    "'NOT_UPDATING', ?, 1)", (json.dumps(config),))
        con.execute("PRAGMA user_version = 1")
    upgraded = EndpointService(home)
    assert upgraded.db.schema_version == len(MIGRATIONS)
    endpoint = upgraded.get("from-v1")
    assert endpoint["state"]["ready"] == "READY" and endpoint["task"] == "llm/v1/chat"
    upgraded.db.read().execute("SELECT count(*) FROM rate_usage").fetchone()  # a later table exists
    upgraded.db.read().execute("SELECT count(*) FROM entity_logs").fetchone()


def test_an_interrupted_deployment_resumes_when_the_registry_opens_again(tmp_path):
    held = threading.Event()  # never set: this process "dies" before deploying
    EndpointService(tmp_path / "home", deploy_gate=held).create({"name": "resumed", "config": local_entity()})
    reopened = EndpointService(tmp_path / "home")
    assert reopened.get("resumed")["state"]["config_update"] == "IN_PROGRESS"  # constructing starts no thread
    reopened.start()
    reopened.wait_for_deployments()
    assert reopened.get("resumed")["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}


WRITER = """
import sys
from serving.control.db import MIGRATIONS
from serving.control.service import EndpointService
service = EndpointService(sys.argv[1])
for i in range(5):
    service.create({"name": f"w{sys.argv[2]}-{i}", "config": {"served_entities": [{"entity_name": "smollm2-135m-instruct"}]}})
service.wait_for_deployments()
"""


def test_several_processes_writing_at_once_are_safe(tmp_path):
    home = tmp_path / "home"
    EndpointService(home)  # create the schema once, as a first server start would
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(n)], cwd=ROOT) for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    names = {e["name"] for e in EndpointService(home).list()}
    assert {f"w{n}-{i}" for n in range(4) for i in range(5)} <= names
    ready = [e for e in EndpointService(home).list() if e["name"].startswith("w")]
    assert all(e["state"]["ready"] == "READY" for e in ready)


def test_health_metrics_and_openapi(server, admin):
    with server.client(None) as anonymous:
        assert anonymous.get("/health").json()["status"] == "ok"
        assert "sqlinfer_http_requests_total" in anonymous.get("/metrics").text
        paths = anonymous.get("/openapi.json").json()["paths"]
        assert "/api/2.0/serving-endpoints/{name}/config" in paths
        probe = anonymous.get("/.well-known/databricks-config")  # databricks-sdk asks before sending a token
        assert probe.status_code == 200 and probe.json() == {}
