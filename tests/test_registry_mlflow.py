"""Served entities that name MLflow-registered models (the local stand-in for Unity Catalog)."""

from __future__ import annotations

import pytest

from serving.control.service import EndpointService
from tests.registry_helpers import wait_until_settled


def test_an_mlflow_registered_model_deploys_and_a_missing_version_fails(tmp_path, mlflow_registry, monkeypatch):
    monkeypatch.setenv("SQLINFER_MLFLOW_REGISTRY_URI", mlflow_registry)
    service = EndpointService(tmp_path / "home")
    created = service.create({"name": "iris", "config": {"served_entities": [
        {"entity_name": "main.default.iris", "entity_version": 1, "workload_size": "Small", "scale_to_zero_enabled": True}]}})
    assert created["pending_config"]["served_entities"][0]["name"] == "iris-1"  # Databricks' default name
    service.wait_for_deployments()
    assert service.get("iris")["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}

    service.update_config("iris", {"served_entities": [{"entity_name": "main.default.iris", "entity_version": "7"}]})
    service.wait_for_deployments()
    failed = service.get("iris")
    assert failed["state"]["config_update"] == "UPDATE_FAILED"
    message = failed["pending_config"]["served_entities"][0]["state"]["deployment_state_message"]
    assert "registered model 'main.default.iris' version '7' was not found" in message
    assert failed["config"]["served_entities"][0]["entity_version"] == "1"  # the old version still serves


def test_an_mlflow_model_needs_a_version(tmp_path):
    from serving.errors import InvalidParameterValue

    with pytest.raises(InvalidParameterValue, match=r"config.served_entities\[0\].entity_version is required"):
        EndpointService(tmp_path / "home").create({"name": "x", "config": {"served_entities": [{"entity_name": "main.default.iris"}]}})


# -- custom models: querying a scikit-learn model through every scoring format -------------------


@pytest.fixture
def iris_endpoint(server, admin, mlflow_registry, monkeypatch):
    monkeypatch.setenv("SQLINFER_MLFLOW_REGISTRY_URI", mlflow_registry)
    admin.post("/api/2.0/serving-endpoints", json={"name": "iris", "config": {"served_entities": [
        {"entity_name": "main.default.iris", "entity_version": "1", "workload_size": "Small",
         "scale_to_zero_enabled": True}]}}).raise_for_status()
    endpoint = wait_until_settled(admin, "iris")
    assert endpoint["state"]["ready"] == "READY", endpoint
    return admin


def _expected_iris(mlflow_registry, frame):
    import mlflow.pyfunc

    from mlflow import MlflowClient

    source = MlflowClient(tracking_uri=mlflow_registry, registry_uri=mlflow_registry).get_model_version_download_uri("main.default.iris", "1")
    return mlflow.pyfunc.load_model(source).predict(frame).tolist()


def test_a_custom_model_answers_every_scoring_format(iris_endpoint, mlflow_registry, server):
    from sklearn.datasets import load_iris

    from serving.data import custom_models

    features, _ = load_iris(return_X_y=True, as_frame=True)
    sample = features.iloc[[0, 60, 120, 7]]
    expected = _expected_iris(mlflow_registry, sample)
    assert len(set(expected)) == 3  # the sample covers three classes, so order mistakes show
    columns, rows = list(sample.columns), sample.values.tolist()
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": rows}},
        "dataframe_records": {"dataframe_records": sample.to_dict(orient="records")},
        "instances": {"instances": sample.to_dict(orient="records")},
        "inputs": {"inputs": {c: sample[c].tolist() for c in columns}},
    }
    for kind, body in bodies.items():
        response = iris_endpoint.post("/serving-endpoints/iris/invocations", json=body)
        assert response.status_code == 200, (kind, response.text)
        assert response.json() == {"predictions": expected}, kind
        assert response.headers["served-model-name"] == "iris-1"
    assert custom_models.loaded_count() >= 1
    loaded = custom_models.loaded_count()
    iris_endpoint.post("/serving-endpoints/iris/invocations", json=bodies["dataframe_split"]).raise_for_status()
    assert custom_models.loaded_count() == loaded  # loaded once per process, not per request

    from serving.data.usage import UsageRecorder

    usage = UsageRecorder(server.service.db).rows("iris")
    assert len(usage) == 5 * 4 and all(r["status_code"] == 200 and r["served_entity"] == "iris-1" for r in usage)


def test_the_mlflow_client_predicts_with_a_custom_model(iris_endpoint, mlflow_registry, server, monkeypatch):
    from mlflow.deployments import get_deploy_client
    from sklearn.datasets import load_iris

    _, token = server.service.auth.create_token("mlflow-user", is_admin=True)
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    features, _ = load_iris(return_X_y=True, as_frame=True)
    sample = features.iloc[[3, 80]]
    answer = get_deploy_client("databricks").predict(
        endpoint="iris", inputs={"dataframe_split": sample.to_dict(orient="split")})
    assert answer["predictions"] == _expected_iris(mlflow_registry, sample)


def test_bad_custom_model_input_is_named_and_a_bad_row_fails_alone(iris_endpoint, mlflow_registry, server):
    from sklearn.datasets import load_iris

    from engine.types import SamplingOptions
    from serving.data.client import InProcessClient
    from serving.data.directory import directory_for

    both = iris_endpoint.post("/serving-endpoints/iris/invocations", json={"dataframe_records": [], "instances": []})
    assert both.status_code == 400 and "exactly one of dataframe_split" in both.json()["message"]
    chat_shaped = iris_endpoint.post("/serving-endpoints/iris/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat_shaped.status_code == 400 and "'messages'" in chat_shaped.json()["message"]

    features, _ = load_iris(return_X_y=True, as_frame=True)
    records = features.iloc[[0, 1, 2]].to_dict(orient="records")
    records[1] = dict(records[1], **{"sepal length (cm)": "not a number"})
    rejected = iris_endpoint.post("/serving-endpoints/iris/invocations", json={"dataframe_records": records})
    assert rejected.status_code == 400 and "row 1" in rejected.json()["message"]

    # The SQL path sees the rows one by one: the bad row fails, its neighbours are answered.
    results = InProcessClient(directory_for(server.service)).predict("iris", records)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[0].value == _expected_iris(mlflow_registry, features.iloc[[0]])[0]
    with pytest.raises(Exception, match="custom-model|not chat"):
        InProcessClient(directory_for(server.service)).chat("iris", [[{"role": "user", "content": "x"}]], SamplingOptions())


# -- a transformers model logged with an llm/v1 task runs on the local engine, and scales to zero ---


@pytest.fixture(scope="module")
def mlflow_chat_model(mlflow_registry):
    """The bundled SmolLM2 logged with ``mlflow.transformers.log_model(task="llm/v1/chat")``."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model_store import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    with mlflow.start_run():
        mlflow.transformers.log_model(
            transformers_model={"model": AutoModelForCausalLM.from_pretrained(path), "tokenizer": AutoTokenizer.from_pretrained(path)},
            name="model", task="llm/v1/chat", registered_model_name="main.default.smollm2",
            pip_requirements=["transformers", "torch"])  # skip requirement inference (it imports torchvision)
    return "main.default.smollm2"


@pytest.mark.engine
@pytest.mark.slow  # ~110 s on 2 cores (an engine of its own, started twice): make test-slow, which CI runs
def test_an_mlflow_transformers_model_is_served_by_the_engine_and_scales_to_zero(
        server, admin, mlflow_registry, mlflow_chat_model, monkeypatch):
    import time

    from openai import OpenAI

    from engine import vllm_engine

    monkeypatch.setenv("SQLINFER_MLFLOW_REGISTRY_URI", mlflow_registry)
    monkeypatch.setenv("SQLINFER_SCALE_TO_ZERO_IDLE_SECONDS", "2")
    admin.post("/api/2.0/serving-endpoints", json={"name": "uc-chat", "config": {"served_entities": [
        {"entity_name": mlflow_chat_model, "entity_version": "1", "scale_to_zero_enabled": True}]}}).raise_for_status()
    endpoint = wait_until_settled(admin, "uc-chat")
    assert endpoint["state"]["ready"] == "READY" and endpoint["task"] == "llm/v1/chat", endpoint

    _, token = server.service.auth.create_token("sdk-user", is_admin=True)
    client = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0, timeout=300)

    def ask() -> str:
        answer = client.chat.completions.create(model="uc-chat", messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=8, temperature=0)
        return answer.choices[0].message.content

    assert "Paris" in ask()
    [engine] = [e for (path, _), e in vllm_engine._ENGINES.items() if "mlflow-models" in path]
    assert engine.state == "RUNNING"

    deadline = time.monotonic() + 60
    while engine.state != "SCALED_TO_ZERO" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.state == "SCALED_TO_ZERO"
    entity = admin.get("/api/2.0/serving-endpoints/uc-chat").json()["config"]["served_entities"][0]
    assert entity["state"]["deployment"] == "DEPLOYMENT_READY"
    assert entity["state"]["deployment_state_message"].startswith("Scaled to zero")

    assert "Paris" in ask()  # the next request starts the engine again
    assert engine.scaled_to_zero_count == 1
    engine.close()  # free its memory for the rest of the session
