"""How many prompt tokens vLLM's prefix cache will reuse for a batch, before it runs.

``sqlinfer explain`` promises a reuse figure the engine then reports, so this follows vLLM's own
rule (``vllm.v1.core.kv_cache_manager``) rather than a string heuristic:

* the KV cache is split into blocks of ``block_size`` tokens, and a block is found again only
  by the hash of its tokens *and of every block before it*: reuse is a run of whole blocks from
  the start of the prompt, and a prompt that shares 60 tokens with another reuses one 32-token
  block, not 60 tokens;
* only full blocks are cached, and at least the prompt's last token is always computed (the
  model needs its logits), so a prompt reuses at most ``(length - 1) // block_size`` blocks;
* prompts are sent together in one order; each one finds the blocks of every prompt before it
  (blocks are registered when they are scheduled, so a prompt in the same engine step finds
  them too).

What this does not model: eviction (the cache holds tens of thousands of tokens here, and the
batch goes in prefix order, so the blocks a prompt needs were used just before it) and other
queries running on the same engine at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PrefixCache:
    """An engine's prefix cache as it is (or will be) configured."""

    enabled: bool
    block_size: int
    source: str  # where the values were read ("the running engine's config", ...)


@dataclass(frozen=True)
class PrefixReuse:
    """The estimate for one batch, in the order it is sent; ``unknown_because`` says why there is
    none (an external provider, prefix caching off, the tokenizer on another machine)."""

    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # whole blocks found in the cache, summed over the prompts
    block_size: int = 0
    longest_shared: int = 0  # the most tokens a prompt shares with the one before it (before rounding to blocks)
    unknown_because: str | None = None

    @property
    def ratio(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self) -> str:
        """One phrase for EXPLAIN: the estimate, or why there is none."""
        if self.unknown_because is not None:
            return f"prefix reuse not estimated: {self.unknown_because}"
        if self.reused_tokens:
            return (f"prefix reuse ~{self.reused_tokens} of {self.prompt_tokens} prompt tokens ({self.ratio:.0%}, "
                    f"{self.block_size}-token KV blocks)")
        if self.prompts < 2:
            return "prefix reuse none: a single prompt has nothing to share with"
        if self.longest_shared < self.block_size:
            return (f"prefix reuse none: the longest prefix two prompts share is {self.longest_shared} tokens, under one "
                    f"{self.block_size}-token KV block (reuse happens in whole blocks)")
        return (f"prefix reuse none: the shared blocks hold each prompt's last token, which the engine always computes "
                f"({self.block_size}-token KV blocks)")


def estimate(prompts: Sequence[Sequence[int]], block_size: int) -> PrefixReuse:
    """Reuse for ``prompts`` (token ids, in the order they are sent) on an engine with
    prefix caching on and KV blocks of ``block_size`` tokens, starting from an empty cache."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    cached: set[int] = set()  # chained block hashes, as vLLM keys its cache
    reused = longest = total = 0
    previous: Sequence[int] | None = None
    for tokens in prompts:
        total += len(tokens)
        if previous is not None:
            # in prefix order the previous prompt is the one sharing the most (sorted text)
            longest = max(longest, _common_prefix(previous, tokens))
        hashes = _block_hashes(tokens, block_size)
        reusable = max(len(tokens) - 1, 0) // block_size
        hits = 0
        while hits < reusable and hashes[hits] in cached:
            hits += 1
        reused += hits * block_size
        cached.update(hashes)
        previous = tokens
    return PrefixReuse(len(prompts), total, reused, block_size, longest)


def _block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block, each chained to the blocks before it."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared
