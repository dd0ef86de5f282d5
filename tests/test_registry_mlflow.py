"""Served entities that name MLflow-registered models (the local stand-in for Unity Catalog)."""

from __future__ import annotations

import pytest

from serving.endpoints import EndpointService


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory):
    """A real local MLflow registry (SQLite) holding main.default.iris version 1 (scikit-learn)."""
    import mlflow
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # artifacts under the test's temporary directory, never ./mlruns in the repository
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("iris", artifact_location=(root / "artifacts").as_uri()))
    features, labels = load_iris(return_X_y=True, as_frame=True)
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression(max_iter=200).fit(features, labels), name="model",
                                 registered_model_name="main.default.iris", input_example=features.head(2))
    return uri


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
