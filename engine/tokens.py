"""Counting tokens with a model's own tokenizer, without starting its engine.

``sqlinfer explain`` needs input token counts before anything runs: the chat template applied
exactly as the engine applies it (``LocalEngine.chat``), raw prompts encoded as the engine
encodes them, texts truncated to the model's length as ``LocalEngine.embed`` does. Only the
tokenizer files are loaded (transformers, ~1 s), once per model directory per process.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Sequence

_LOCK = threading.Lock()


@lru_cache(maxsize=16)
def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    with _LOCK:
        return AutoTokenizer.from_pretrained(model_dir)


def count_tokens(model_dir: str, requests: Sequence[Any], kind: str) -> list[int]:
    """Input tokens of each request: ``kind`` is chat (the user message's text, or a conversation:
    a list of messages), complete or embed."""
    if kind == "embed":
        tokenizer = _tokenizer(model_dir)
        limit = getattr(tokenizer, "model_max_length", None) or 512
        return [len(tokenizer(request, truncation=True, max_length=min(limit, 100_000))["input_ids"]) for request in requests]
    return [len(ids) for ids in prompt_token_ids(model_dir, requests, kind)]


def prompt_token_ids(model_dir: str, requests: Sequence[Any], kind: str) -> list[list[int]]:
    """The token ids the engine computes for each chat or completion request (what its prefix
    cache sees): ``kind`` is chat (the user message's text, or a conversation) or complete."""
    tokenizer = _tokenizer(model_dir)
    ids = []
    for request in requests:
        if kind == "chat":
            # a user message's text (explain), or a whole conversation (what the engine is sent)
            messages = [{"role": m.get("role", "user"), "content": m.get("content") if isinstance(m.get("content"), str) else ""}
                        for m in request] if isinstance(request, list) else [{"role": "user", "content": request}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            ids.append(tokenizer.encode(request))
    return ids
