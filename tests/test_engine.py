"""The local vLLM engine with the bundled models: answers, batching, concurrency, embeddings."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest

from engine.errors import InvalidParameterValue
from engine.types import SamplingOptions
from tests.conftest import GREEDY

pytestmark = pytest.mark.engine


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_capital_of_france(chat_engine):
    [result] = chat_engine.chat([ask("What is the capital of France? Answer in one word.")], GREEDY)
    assert result.error is None
    assert "Paris" in result.text
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.choices[0].finish_reason in ("stop", "length")


PROMPTS = [
    "Name a fruit.",
    "What is 2+2?",
    "Write a haiku about rain.",
    "Describe a cat in one sentence.",
    "Is this review positive or negative? 'The blender broke after a week.'",
    "Translate 'good morning' to Spanish.",
]


def test_the_engine_runs_with_what_the_hardware_rule_picks(chat_engine, embed_engine):
    import psutil

    from engine.config import EngineConfig

    chosen = EngineConfig.for_this_machine()
    settings = chat_engine.settings()  # read back from vLLM's own config
    assert settings["dtype"] == chosen.dtype == chat_engine.config.dtype
    assert settings["block_size"] == chosen.block_size
    assert settings["enable_prefix_caching"] is True
    assert embed_engine.settings()["dtype"] == chosen.dtype
    # Every engine worker of this process computes on the cores the rule bound it to.
    bind = chosen.cpu_threads_bind
    if bind in (None, "auto", "nobind") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        pytest.skip(f"vLLM chooses the binding itself here ({bind!r})")
    workers = [p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::Worker"]
    assert len(workers) >= 2  # the chat and the embedding engine
    from engine.hardware import _parse_id_list

    cores = set(_parse_id_list(bind))
    for worker in workers:
        # OpenMP pins one thread per bound core (vLLM's auto binding here would pin only core 0).
        pinned = set()
        for thread in worker.threads():
            affinity = os.sched_getaffinity(thread.id)
            if len(affinity) == 1:
                pinned |= affinity
        assert pinned == cores, f"worker {worker.pid} computes on CPUs {sorted(pinned)}, not {sorted(cores)}"


def test_doctor_says_what_the_engine_runs_with():
    import subprocess

    from engine.config import EngineConfig
    from engine.hardware import read_cpu_facts
    from tests.registry_helpers import SQLINFER

    result = subprocess.run([SQLINFER, "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    chosen = EngineConfig.for_this_machine()
    assert f"dtype: {chosen.dtype} ({chosen.reasons()['dtype']})" in lines
    assert lines[0].startswith(f"CPU: {read_cpu_facts().model_name} (")
    assert any(line.startswith("engine build: vllm") for line in lines)
    assert any(line.startswith("threads: ") for line in lines) and any(line.startswith("GPU: ") for line in lines)


def test_batched_equals_one_at_a_time(float32_chat_engine):
    # vLLM promises no batch invariance; in float32 on CPU it holds, in bfloat16 on AMX it does not
    # (the batched greedy answer to one prompt differed), so this runs on a float32 engine on every
    # CPU. The property that holds in every dtype is checked by the next test, on the session's
    # engine: each caller gets its own prompt's answer.
    engine = float32_chat_engine
    conversations = [ask(p) for p in PROMPTS]
    batched = [r.text for r in engine.chat(conversations * 4, GREEDY)]
    alone = [engine.chat([c], GREEDY)[0].text for c in conversations]
    assert batched == alone * 4


def test_fifty_concurrent_callers_share_one_batch_and_get_their_own_answer(chat_engine):
    # Each prompt's greedy continuation repeats its own number, so a caller can tell its answer
    # from everyone else's whatever batch it lands in. (Comparing with a batched reference would
    # also assert batch invariance, which vLLM does not promise for staggered arrivals.)
    numbers = list(range(1000, 1050))
    options = SamplingOptions(temperature=0.0, max_tokens=6)
    answers: dict[int, str] = {}
    barrier = threading.Barrier(len(numbers))
    chat_engine.peak_in_flight = 0

    def caller(n: int) -> None:
        barrier.wait()
        answers[n] = chat_engine.complete([f"{n}, {n}, {n}, {n}, {n},"], options)[0].text

    threads = [threading.Thread(target=caller, args=(n,)) for n in numbers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    own = [n for n in numbers if answers[n].strip().startswith(str(n))]
    assert len(own) >= 48, {n: answers[n] for n in numbers if n not in own}  # a mix-up would score ~0
    assert chat_engine.peak_in_flight > 1, "concurrent callers were served one at a time"


def test_sampling_parameters(chat_engine):
    question = [ask("Count from one to twenty in words, separated by commas.")]
    [short] = chat_engine.chat(question, SamplingOptions(temperature=0.0, max_tokens=3))
    assert short.completion_tokens == 3 and short.choices[0].finish_reason == "length"

    [free] = chat_engine.chat([ask("Tell me about Paris.")], SamplingOptions(temperature=0.0, max_tokens=30))
    stop_word = free.text.split()[3]  # a stop string the greedy answer is known to reach
    [stopped] = chat_engine.chat([ask("Tell me about Paris.")], SamplingOptions(temperature=0.0, max_tokens=30, stop=[stop_word]))
    assert stopped.text == free.text[: free.text.index(stop_word)]
    assert stopped.choices[0].finish_reason == "stop"

    seeded = SamplingOptions(temperature=1.0, seed=7, max_tokens=12)
    first, second = (chat_engine.chat([ask("Tell me a story.")], seeded)[0].text for _ in range(2))
    assert first == second

    [several] = chat_engine.chat([ask("Say a word.")], SamplingOptions(temperature=1.0, n=3, max_tokens=4, seed=1))
    assert len(several.choices) == 3

    [with_logprobs] = chat_engine.chat(question, SamplingOptions(temperature=0.0, max_tokens=3, logprobs=2))
    positions = with_logprobs.choices[0].logprobs
    assert len(positions) == 3
    assert all(p.logprob <= 0.0 and 1 <= len(p.top_logprobs) <= 3 for p in positions)
    assert "".join(p.token for p in positions) == with_logprobs.text


def test_completions_take_raw_prompts(chat_engine):
    [result] = chat_engine.complete(["The capital of France is"], SamplingOptions(temperature=0.0, max_tokens=4))
    assert "Paris" in result.text


def test_json_schema_structured_output(chat_engine):
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
        "required": ["sentiment"],
    }
    [result] = chat_engine.chat(
        [ask("Review: 'Broke after one day, awful.' What is the sentiment? Answer in JSON.")],
        SamplingOptions(temperature=0.0, max_tokens=40, json_schema=schema),
    )
    assert json.loads(result.text)["sentiment"] in ("positive", "negative")


def test_a_failing_row_does_not_fail_its_batch(chat_engine):
    too_long = "word " * 5000  # beyond max_model_len (2048)
    results = chat_engine.chat([ask("Say hi."), ask(too_long), ask("Say bye.")], GREEDY)
    assert results[0].error is None and results[2].error is None
    assert results[1].error and results[1].text is None


def test_chat_on_an_embedding_model_is_refused(embed_engine):
    with pytest.raises(InvalidParameterValue, match="serves llm/v1/embeddings, not chat"):
        embed_engine.chat([ask("hi")], GREEDY)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_are_unit_norm_and_meaningful(embed_engine):
    texts = [
        "The cat sat on the mat.",
        "A kitten was sitting on the rug.",
        "Quarterly revenue grew by eight percent.",
        "",
    ]
    results = embed_engine.embed(texts)
    assert all(r.error is None for r in results)
    assert all(len(r.vector) == 384 for r in results)
    for r in results:
        assert math.sqrt(sum(x * x for x in r.vector)) == pytest.approx(1.0, abs=1e-2)
    cat, kitten, revenue = (r.vector for r in results[:3])
    assert cosine(cat, kitten) > cosine(cat, revenue) + 0.2


def test_long_text_is_truncated_not_failed(embed_engine):
    [result] = embed_engine.embed(["long " * 2000])
    assert result.error is None and len(result.vector) == 384
