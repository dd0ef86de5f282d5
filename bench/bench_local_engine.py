"""ai_query / ai_embed in DuckDB against raw vLLM on the same prompts, in one run.

What it measures: the cost of the whole sqlinfer path (DuckDB Arrow UDF -> ai_functions ->
serving client -> AsyncLLM on a background loop) relative to vLLM's own offline ``LLM.chat`` /
``LLM.embed`` on identical prompts and sampling settings. Both engines live in this process with
identical engine arguments and the repetitions alternate (raw, ours, raw, ours, ...) so machine
noise hits both sides alike; medians are reported. Prompts are distinct (no dedupe advantage) and
each repetition uses a fresh set, so neither side answers from a cache the other filled.

Target (issue 2): ratio >= 0.95 of raw vLLM for both chat and embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Benchmarks measure the engine and the functions, not the result store: every round computes.
os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.vllm_engine  # noqa: E402,F401  (first: it sets vLLM's log level before vLLM loads)

CHAT_ENDPOINT = "system-smollm2-135m-instruct"
EMBED_ENDPOINT = "system-all-minilm-l6-v2"
INSTRUCTION = "Classify the sentiment of this product review as positive or negative. Answer with one word.\n\nReview: "


def review_texts() -> list[str]:
    import duckdb

    rows = duckdb.sql(
        f"SELECT review FROM read_csv('{ROOT / 'examples/data/reviews.csv'}') WHERE review IS NOT NULL AND review <> ''"
    ).fetchall()
    return [r[0] for r in rows]


def prompt_sets(rows: int, repetitions: int) -> list[list[str]]:
    """``repetitions`` sets of ``rows`` distinct prompts; no prompt appears in two sets."""
    reviews = review_texts()
    return [
        [f"{INSTRUCTION}{reviews[i % len(reviews)]} (order {rep}-{i})" for i in range(rows)]
        for rep in range(repetitions + 1)  # set 0 warms both engines up
    ]


def engine_kwargs(runner: str) -> dict:
    from engine.config import EngineConfig

    args = EngineConfig.for_this_machine().engine_args("", runner)
    args.pop("model"), args.pop("disable_log_stats")
    return args


def bench_chat(rows: int, repetitions: int, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from connectors.duckdb import connect, functions
    from engine.model_store import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    raw = LLM(model=str(model.path), **engine_kwargs("generate"))
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    con = connect()
    ai = functions(con)
    ai.client.warm_up(CHAT_ENDPOINT)
    query = (
        f"SELECT ai_query('{CHAT_ENDPOINT}', prompt, modelParameters => {{'max_tokens': {max_tokens}}}) "
        f"FROM prompts ORDER BY i"
    )

    def run_raw(prompts: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        outputs = raw.chat([[{"role": "user", "content": p}] for p in prompts], sampling, use_tqdm=False)
        return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)

    def run_ours(prompts: list[str]) -> tuple[float, int]:
        import pyarrow as pa

        con.register("prompt_rows", pa.table({"i": list(range(len(prompts))), "prompt": prompts}))
        con.execute("CREATE OR REPLACE TABLE prompts AS SELECT * FROM prompt_rows")
        before = ai.stats.snapshot().completion_tokens
        started = time.perf_counter()
        answers = con.execute(query).fetchall()
        elapsed = time.perf_counter() - started
        assert len(answers) == len(prompts) and all(a[0] is not None for a in answers)
        return elapsed, ai.stats.snapshot().completion_tokens - before

    try:
        return _alternate("chat (ai_query vs LLM.chat)", rows, prompt_sets(rows, repetitions), run_raw, run_ours)
    finally:
        _shutdown(raw)
        con.close()


def bench_embed(rows: int, repetitions: int) -> dict:
    from vllm import LLM

    from connectors.duckdb import connect
    from engine.model_store import resolve_model

    model = resolve_model("all-minilm-l6-v2")
    raw = LLM(model=str(model.path), **engine_kwargs("pooling"))
    con = connect()

    def run_raw(texts: list[str]) -> tuple[float, int]:
        started = time.perf_counter()
        outputs = raw.embed(texts, use_tqdm=False)
        assert len(outputs) == len(texts)
        return time.perf_counter() - started, 0

    def run_ours(texts: list[str]) -> tuple[float, int]:
        import pyarrow as pa

        con.register("text_rows", pa.table({"i": list(range(len(texts))), "text": texts}))
        con.execute("CREATE OR REPLACE TABLE texts AS SELECT * FROM text_rows")
        started = time.perf_counter()
        vectors = con.execute(f"SELECT ai_embed('{EMBED_ENDPOINT}', text) FROM texts ORDER BY i").fetchall()
        elapsed = time.perf_counter() - started
        assert len(vectors) == len(texts) and all(len(v[0]) == 384 for v in vectors)
        return elapsed, 0

    sets = [[p[len(INSTRUCTION):] for p in s] for s in prompt_sets(rows, repetitions)]
    try:
        return _alternate("embeddings (ai_embed vs LLM.embed)", rows, sets, run_raw, run_ours)
    finally:
        _shutdown(raw)
        con.close()


def _shutdown(raw) -> None:
    """Stop the raw engine's child process now; left to interpreter exit, it can abort the run."""
    raw.llm_engine.engine_core.shutdown()


def _alternate(name: str, rows: int, sets: list[list[str]], run_raw, run_ours) -> dict:
    run_raw(sets[0][: max(8, rows // 8)])  # warm-up: first-batch costs hit neither measurement
    run_ours(sets[0][: max(8, rows // 8)])
    raw_runs, our_runs = [], []
    for index, prompts in enumerate(sets[1:]):
        # Alternate who goes first so a slow patch of the machine does not favour one side.
        order = [("raw", run_raw), ("ours", run_ours)] if index % 2 == 0 else [("ours", run_ours), ("raw", run_raw)]
        for label, runner in order:
            (raw_runs if label == "raw" else our_runs).append(runner(prompts))
    raw_s = statistics.median(t for t, _ in raw_runs)
    our_s = statistics.median(t for t, _ in our_runs)
    raw_tokens = statistics.median(n for _, n in raw_runs)
    our_tokens = statistics.median(n for _, n in our_runs)
    return {
        "benchmark": name,
        "rows": rows,
        "repetitions": len(raw_runs),
        "raw_rows_per_s": rows / raw_s,
        "ours_rows_per_s": rows / our_s,
        "raw_tokens_per_s": raw_tokens / raw_s if raw_tokens else None,
        "ours_tokens_per_s": our_tokens / our_s if our_tokens else None,
        "ratio": raw_s / our_s,
        "target": 0.95,
    }


def report(result: dict) -> str:
    lines = [f"{result['benchmark']}: {result['rows']} rows, median of {result['repetitions']} alternating runs"]
    lines.append(f"  raw vLLM : {result['raw_rows_per_s']:8.1f} rows/s" + (
        f"  {result['raw_tokens_per_s']:8.1f} generated tok/s" if result["raw_tokens_per_s"] else ""))
    lines.append(f"  sqlinfer : {result['ours_rows_per_s']:8.1f} rows/s" + (
        f"  {result['ours_tokens_per_s']:8.1f} generated tok/s" if result["ours_tokens_per_s"] else ""))
    verdict = "meets" if result["ratio"] >= result["target"] else "MISSES"
    lines.append(f"  ratio sqlinfer/raw = {result['ratio']:.3f} ({verdict} target >= {result['target']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", choices=("chat", "embed"), required=True)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.which == "chat":
        result = bench_chat(args.rows, args.repetitions, args.max_tokens)
    else:
        result = bench_embed(args.rows, args.repetitions)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
