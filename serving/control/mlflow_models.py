"""Models registered in a local MLflow model registry (``catalog.schema.model`` + version).

The registry URI is ``SQLINFER_MLFLOW_REGISTRY_URI``, else ``MLFLOW_REGISTRY_URI``, else a SQLite
registry at ``$SQLINFER_HOME/mlflow.db`` — the local stand-in for Unity Catalog. mlflow is
imported only here (and in :mod:`serving.data.custom_models`), and only when such a model is deployed.

Deploying a version copies its artifacts once to ``$SQLINFER_HOME/mlflow-models/<name>/<version>``
(staged in a temporary directory and renamed, so a crash never leaves half a model), then decides
how it is served:

* a **transformers** model logged with ``task="llm/v1/chat" | "llm/v1/completions" |
  "llm/v1/embeddings"`` runs on the local vLLM engine: its weights (``model/``) and tokenizer
  (``components/tokenizer/``) are linked into one Hugging Face directory, ``hf/``;
* any other model with a ``python_function`` flavor (scikit-learn, a custom ``PythonModel``...) is
  a **custom model**, answering ``{"predictions": ...}`` (see :mod:`serving.data.custom_models`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.types import CUSTOM_TASK, LLM_TASKS
from serving.errors import InvalidParameterValue, ResourceDoesNotExist


def registry_uri(home: Path) -> str:
    return os.environ.get("SQLINFER_MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_REGISTRY_URI") or f"sqlite:///{home / 'mlflow.db'}"


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_model_version(name: str, version: str | None, home: Path) -> None:
    """Raise RESOURCE_DOES_NOT_EXIST unless ``name`` version ``version`` is registered."""
    from mlflow.exceptions import MlflowException

    uri = registry_uri(home)
    try:
        _client(uri).get_model_version(name, str(version))
    except MlflowException:
        raise ResourceDoesNotExist(
            f"registered model {name!r} version {version!r} was not found in the MLflow registry at {uri}; "
            f"register it with mlflow.register_model or set SQLINFER_MLFLOW_REGISTRY_URI"
        ) from None


def prepare_model_version(name: str, version: str | None, home: Path) -> dict[str, str]:
    """Copy a registered version locally and say how it is served: {"task", "path"}.

    ``task`` is an ``llm/v1/*`` task (``path`` is a Hugging Face directory for the engine) or
    ``"custom"`` (``path`` is the MLflow model directory for pyfunc).
    """
    from mlflow.models import Model

    check_model_version(name, version, home)
    target = home / "mlflow-models" / re.sub(r"[^A-Za-z0-9_.-]", "_", name) / str(version)
    if not (target / "MLmodel").exists():
        _download(name, str(version), registry_uri(home), target)
    model = Model.load(str(target))
    flavors = model.flavors
    task = (model.metadata or {}).get("task")
    if "transformers" in flavors and task in LLM_TASKS:
        return {"task": task, "path": str(_hugging_face_directory(target, flavors["transformers"]))}
    if "transformers" in flavors and task:
        raise InvalidParameterValue(
            f"MLflow model {name!r} version {version} was logged with task {task!r}; log it with one of "
            f"{', '.join(LLM_TASKS)} to serve it on the local engine"
        )
    if "python_function" not in flavors:
        raise InvalidParameterValue(
            f"MLflow model {name!r} version {version} has no python_function flavor (flavors: "
            f"{', '.join(sorted(flavors))}), so it cannot be served; log it with an MLflow flavor that provides pyfunc"
        )
    return {"task": CUSTOM_TASK, "path": str(target)}


def _download(name: str, version: str, uri: str, target: Path) -> None:
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar in a server log
    source = _client(uri).get_model_version_download_uri(name, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=uri))
        if not (local / "MLmodel").exists():
            raise InvalidParameterValue(f"the artifacts of MLflow model {name!r} version {version} at {source} have no MLmodel file")
        try:
            local.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hugging_face_directory(model_dir: Path, flavor: dict[str, Any]) -> Path:
    """One directory holding the weights and the tokenizer, as vLLM expects (symlinks, no copies)."""
    weights = model_dir / flavor.get("model_binary", "model")
    if not (weights / "config.json").exists():
        raise InvalidParameterValue(
            f"{str(weights)!r} has no config.json: log the transformers model with save_pretrained=True so its weights are stored"
        )
    merged = model_dir / "hf"
    merged.mkdir(exist_ok=True)
    for source in (weights, model_dir / "components" / "tokenizer"):
        if source.is_dir():
            for item in source.iterdir():
                link = merged / item.name
                if not link.exists():  # relative, so SQLINFER_HOME can move
                    link.symlink_to(os.path.relpath(item, merged))
    return merged
