"""The local inference engine: a vLLM wrapper with continuous batching and the model store.

Importing this package is cheap: vLLM and torch load only when an engine starts
(``engine.vllm_engine``). See ``engine.model_store`` for where models come from.
"""
