"""Shared fixtures.

One real vLLM engine per bundled model per test session (they are process-wide singletons in
``engine.vllm_engine``; the fixtures just start them once and hand them out). Fakes, where a test
wants one, go through the real registry (``echo_client``), never around it.
"""

from __future__ import annotations

import pytest

from engine.types import SamplingOptions
from serving.backends import EchoBackend
from serving.client import InProcessClient
from serving.registry import EndpointRegistry

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
def embed_engine():
    from engine.vllm_engine import get_engine

    engine = get_engine(EMBED_MODEL)
    engine.start()
    return engine


@pytest.fixture
def echo_registry() -> EndpointRegistry:
    registry = EndpointRegistry()
    registry.register("echo", "llm/v1/chat", EchoBackend(fail_on="FAIL"))
    registry.register("echo-vectors", "llm/v1/embeddings", EchoBackend("llm/v1/embeddings", dimension=4, fail_on="FAIL"))
    return registry


@pytest.fixture
def echo_client(echo_registry) -> InProcessClient:
    return InProcessClient(echo_registry)
