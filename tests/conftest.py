"""Shared fixtures.

One real vLLM engine per bundled model per test session (they are process-wide singletons in
``engine.vllm_engine``; the fixtures just start them once and hand them out). Fakes, where a test
wants one, go through the real registry (``echo_client``), never around it.
"""

from __future__ import annotations

import os
import threading

import pytest

from engine.types import SamplingOptions
from serving.data.backends import EchoBackend
from serving.data.client import InProcessClient
from serving.data.directory import EndpointDirectory
from tests.registry_helpers import SECRET_VALUE

# Answers are not kept between tests (or in the user's $SQLINFER_HOME): a test that wants the
# result store turns it on with its own path (tests/test_result_store.py).
os.environ["SQLINFER_RESULT_STORE"] = "off"

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
CHAT_ENDPOINT = "system-smollm2-135m-instruct"
EMBED_ENDPOINT = "system-all-minilm-l6-v2"
GREEDY = SamplingOptions(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="session")
def chat_engine():
    from engine.vllm_engine import get_engine

    engine = get_engine(CHAT_MODEL)
    engine.start()
    return engine


@pytest.fixture(scope="session")
def float32_chat_engine(request):
    """The chat model on a float32 engine, whatever this CPU's rule picks: float32 on CPU is
    batch-invariant (an answer does not depend on what else is in the batch), bfloat16 is not.
    The session's chat engine when the rule already picks float32, else one of its own."""
    from engine.config import EngineConfig
    from engine.model_store import resolve_model
    from engine.vllm_engine import LocalEngine

    if EngineConfig.for_this_machine().dtype == "float32":
        yield request.getfixturevalue("chat_engine")
        return
    engine = LocalEngine(resolve_model(CHAT_MODEL), EngineConfig.for_this_machine(dtype="float32"))
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def embed_engine():
    from engine.vllm_engine import get_engine

    engine = get_engine(EMBED_MODEL)
    engine.start()
    return engine


@pytest.fixture
def echo_registry() -> EndpointDirectory:
    registry = EndpointDirectory()
    registry.register("echo", "llm/v1/chat", EchoBackend(fail_on="FAIL"))
    registry.register("echo-vectors", "llm/v1/embeddings", EchoBackend("llm/v1/embeddings", dimension=4, fail_on="FAIL"))
    return registry


@pytest.fixture
def echo_client(echo_registry) -> InProcessClient:
    return InProcessClient(echo_registry)


# -- the endpoint registry behind a real REST server ---------------------------------------------


@pytest.fixture
def gate():
    event = threading.Event()
    event.set()
    return event


@pytest.fixture
def service(tmp_path, gate):
    from serving.control.service import EndpointService

    return EndpointService(tmp_path / "home", deploy_gate=gate)


@pytest.fixture
def server(service):
    from tests.rest_server import RunningServer

    running = RunningServer(service)
    yield running
    running.stop()


@pytest.fixture
def admin(server):
    _, token = server.service.auth.create_token("admin@example.com", is_admin=True)
    with server.client(token) as client:
        client.post("/api/2.0/secrets/scopes/create", json={"scope": "my_scope"}).raise_for_status()
        client.post("/api/2.0/secrets/put", json={"scope": "my_scope", "key": "my_openai_api_key",
                                                  "string_value": SECRET_VALUE}).raise_for_status()
        yield client


# -- a real external provider: vLLM's own OpenAI-compatible server on the bundled model ------------


@pytest.fixture(scope="session")
def vllm_openai_server():
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (about a minute to start)."""
    import subprocess
    import sys
    import time

    import httpx

    from engine.config import EngineConfig
    from engine.model_store import resolve_model
    from tests.rest_server import free_port, start_group, stop_group

    port = free_port()
    model = resolve_model(CHAT_MODEL).path
    config = EngineConfig.for_this_machine()  # the dtype and threads the hardware rule picks, as our engine uses
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "smollm2", "--enforce-eager", "--max-model-len", "2048",
               "--kv-cache-memory-bytes", str(1024**3), "--disable-log-stats", "--dtype", config.dtype]
    process = start_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | config.process_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM's OpenAI server exited with status {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM's OpenAI server did not become healthy in 300 s")
            time.sleep(1)
        yield url
    finally:
        stop_group(process, timeout=30)  # vLLM's server and its EngineCore


@pytest.fixture
def upstream():
    """A scripted OpenAI/Anthropic-protocol provider on 127.0.0.1 (tests/fake_providers.py)."""
    from tests.fake_providers import ScriptedOpenAIServer

    server = ScriptedOpenAIServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def sqlinfer_server(tmp_path_factory, mlflow_registry):
    """`sqlinfer serve` as a subprocess hosting the local engines (started on first use), an iris custom
    model and the echo endpoints; shared by the Spark and the CLI --server tests. Yields (url, admin token)."""
    from serving.control.service import EndpointService

    home = tmp_path_factory.mktemp("serve-home")
    env = os.environ | {"SQLINFER_HOME": str(home), "SQLINFER_MLFLOW_REGISTRY_URI": mlflow_registry}
    service = EndpointService(home)
    _, token = service.auth.create_token("spark-job", is_admin=True)
    os.environ["SQLINFER_MLFLOW_REGISTRY_URI"] = mlflow_registry
    try:
        service.create({"name": "iris", "config": {"served_entities": [{"entity_name": "main.default.iris", "entity_version": "1"}]}})
        service.wait_for_deployments()
    finally:
        del os.environ["SQLINFER_MLFLOW_REGISTRY_URI"]
    from tests.rest_server import sqlinfer_serve

    with sqlinfer_serve(env) as url:  # stopped with the engine processes it started
        yield url, token
