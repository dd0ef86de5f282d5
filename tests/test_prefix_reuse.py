"""Prefix reuse on short rows: the engine's block size, EXPLAIN's estimate against what the engine
reports, and answers unchanged by the ordering.

The tables are public ones with short rows (``bench/public_tables.py``: cars and Seattle weather
from the vega_datasets package), sent as a user writes the query: a one-line instruction and the
columns as a STRUCT request.
"""

from __future__ import annotations

import pytest

from bench.public_tables import CARS, WEATHER
from engine.prefix_reuse import PrefixReuse, estimate
from tests.registry_helpers import duckdb_on

CHAT_MODEL = "smollm2-135m-instruct"


# -- the estimate follows vLLM's rule (no engine) ----------------------------------------------

def test_reuse_is_counted_in_whole_blocks_chained_from_the_start():
    shared = list(range(70))  # 70 shared tokens: two whole 32-token blocks, then 6 tokens that are not cached
    first, second = shared + [1000, 1001], shared + [2000, 2001]
    reuse = estimate([first, second], block_size=32)
    assert (reuse.reused_tokens, reuse.prompt_tokens, reuse.longest_shared) == (64, 144, 70)
    # a different first token changes every block's hash after it: nothing is found again
    assert estimate([first, [-1] + shared[1:] + [2000]], block_size=32).reused_tokens == 0
    # the same prompt again reuses all but its last block: the last token is always computed
    assert estimate([shared[:64], shared[:64]], block_size=32).reused_tokens == 32


def test_no_reuse_says_why():
    short = estimate([[1, 2, 3] + [10 + i for i in range(40)], [1, 2, 3] + [100 + i for i in range(40)]], block_size=32)
    assert short.reused_tokens == 0
    assert short.describe() == ("prefix reuse none: the longest prefix two prompts share is 3 tokens, under one "
                                "32-token KV block (reuse happens in whole blocks)")
    assert PrefixReuse(unknown_because="prefix caching is off").describe() == "prefix reuse not estimated: prefix caching is off"


def test_an_external_endpoint_explains_why_reuse_is_not_estimated():
    from connectors.duckdb import explain
    from serving.data.backends import EchoBackend

    with duckdb_on("echo", EchoBackend()) as con:
        [line] = explain(con, "SELECT ai_query('echo', {'instruction': 'Say yes.', 'x': x}) FROM range(5) t(x)")
    assert line.prefix_reuse is not None and line.prefix_reuse.unknown_because.startswith(
        "the endpoint's model does not run on a local engine here")
    assert "prefix reuse not estimated: the endpoint's model does not run on a local engine" in line.line()


# -- on the engine --------------------------------------------------------------------------------

@pytest.fixture
def float32_chat(float32_chat_engine):
    """A backend on the float32 chat engine (batch-invariant: answers do not depend on batch order)."""
    from serving.data.backends import LocalEngineBackend

    backend = LocalEngineBackend(CHAT_MODEL, "llm/v1/chat")
    backend._engine = float32_chat_engine
    return backend


@pytest.mark.engine
def test_the_engine_runs_with_the_block_size_the_hardware_rule_chose(float32_chat):
    from engine.hardware import choose_block_size, read_cpu_facts

    engine = float32_chat.engine
    settings = engine.settings()  # vLLM's own cache config of the running engine
    assert settings["block_size"] == choose_block_size(read_cpu_facts()).value == 32
    assert settings["enable_prefix_caching"] is True
    cache = engine.prefix_cache()
    assert (cache.block_size, cache.enabled, cache.source) == (32, True, "the running engine's config")


def _query(table, rows: int, max_tokens: int = 4) -> str:
    return (f"SELECT i, ai_query('chat', {table.struct_sql()}, modelParameters => {{'max_tokens': {max_tokens}, "
            f"'temperature': 0}}) FROM t WHERE i < {rows} ORDER BY i")


@pytest.mark.engine
@pytest.mark.parametrize("table,rows", [(CARS, 80), (WEATHER, 120)], ids=["cars-9-columns", "weather-6-columns"])
def test_explain_estimates_the_reuse_the_engine_then_reports(float32_chat, table, rows):
    from connectors.duckdb import explain, functions

    with duckdb_on("chat", float32_chat) as con:
        table.load(con)
        query = _query(table, rows)
        [planned] = explain(con, query)
        reuse = planned.prefix_reuse
        assert reuse.unknown_because is None and reuse.block_size == 32 and reuse.prompts == rows
        assert reuse.reused_tokens > 0, reuse.describe()
        assert float32_chat.engine.reset_prefix_cache()
        ai = functions(con)
        answers = con.execute(query).fetchall()
        measured = ai.stats.snapshot()
    assert len(answers) == rows
    assert measured.prompt_tokens == reuse.prompt_tokens  # the estimate counted the prompts the engine computed
    assert measured.cached_prompt_tokens > 0
    assert abs(reuse.reused_tokens - measured.cached_prompt_tokens) <= 0.2 * measured.cached_prompt_tokens, (
        reuse.describe(), measured.cached_prompt_tokens)
    assert f"({measured.cached_prompt_tokens} prompt tokens reused from the prefix cache)" in measured.summary()


@pytest.mark.engine
def test_answers_come_back_in_input_order_unchanged_by_the_ordering(float32_chat):
    import dataclasses

    from ai_functions.ordering import plan_prompts
    from engine.types import SamplingOptions

    cars = dataclasses.replace(CARS, instruction="Describe this car in a few words.")  # answers that differ row to row
    with duckdb_on("chat", float32_chat) as con:
        cars.load(con)
        requests = cars.requests(con)[:60]
        assert float32_chat.engine.reset_prefix_cache()
        answered = con.execute(_query(cars, 60, max_tokens=10)).fetchall()
    plan = plan_prompts(requests)
    assert plan.order != list(range(60))  # the batch really was reordered
    # the same prompts, one at a time in input order, from an empty cache: what each row must get
    assert float32_chat.engine.reset_prefix_cache()
    options = SamplingOptions(max_tokens=10, temperature=0)
    alone = [float32_chat.engine.chat([[{"role": "user", "content": text}]], options)[0].text for text in plan.texts]
    assert len(set(alone)) >= 20  # the rows' answers really differ, so a shifted answer shows
    assert [i for i, _ in answered] == list(range(60))
    assert [answer for _, answer in answered] == alone
