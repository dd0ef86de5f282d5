"""Models registered in a local MLflow model registry (``catalog.schema.model`` + version).

The registry URI is ``SQLINFER_MLFLOW_REGISTRY_URI``, else ``MLFLOW_REGISTRY_URI``, else a SQLite
registry at ``$SQLINFER_HOME/mlflow.db`` — the local stand-in for Unity Catalog. mlflow is
imported only here, and only when such a model is deployed.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.errors import ResourceDoesNotExist


def registry_uri(home: Path) -> str:
    return os.environ.get("SQLINFER_MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_REGISTRY_URI") or f"sqlite:///{home / 'mlflow.db'}"


def check_model_version(name: str, version: str | None, home: Path) -> str | None:
    """Raise RESOURCE_DOES_NOT_EXIST unless ``name`` version ``version`` is registered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = registry_uri(home)
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, str(version))
    except MlflowException:
        raise ResourceDoesNotExist(
            f"registered model {name!r} version {version!r} was not found in the MLflow registry at {uri}; "
            f"register it with mlflow.register_model or set SQLINFER_MLFLOW_REGISTRY_URI"
        ) from None
    return None
