"""Prefix-aware ordering against raw vLLM on the original order, both with prefix caching on.

Workload (in the spirit of Liu et al., "Optimizing LLM Queries in Relational Workloads"): every
row asks the bundled chat model about a product review; the request has a long shared
instruction and several fields: a unique review, a product description (8 distinct values) and
a category guideline (3 distinct values), given in that original order. Both sides see the same
rows, fields and sampling (greedy, 4 tokens) on engines with identical arguments in one process:

* raw: ``LLM.chat`` on prompts built in the original field order and row order;
* sqlinfer: ``ai_query(endpoint, {'instruction': ..., 'review': ..., ...})`` (a STRUCT request): fields per row by GGR, the batch in prefix
  order (``ai_functions/ordering.py``), answers back in input order.

Reports end-to-end time (median of 3 alternating rounds, fresh row sets each round so no answer
repeats) and the prefix-cache hit rate (cached prompt tokens / prompt tokens). Target >= 1.5x.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.vllm_engine  # noqa: E402,F401  (sets vLLM's log level first)

CHAT_ENDPOINT = "system-smollm2-135m-instruct"
INSTRUCTION = ("You are a careful analyst of customer feedback for an online store. Read the product description, the "
               "category guideline and the customer review below. Decide whether the customer is satisfied with the "
               "product. Consider only the review text when judging satisfaction; the description and guideline give "
               "context about what the product is and what customers in this category usually care about. Do not "
               "explain your reasoning. Answer with exactly one word: yes or no. ") * 2
CATEGORIES = {
    name: f"Guideline for {name}: " + " ".join(f"customers in {name} care about {topic} and often mention it." for topic in topics)
    for name, topics in {
        "kitchen": ["durability", "cleaning", "heat", "noise", "size", "safety"],
        "audio": ["battery life", "sound quality", "comfort", "connection", "noise cancelling", "case"],
        "home": ["suction", "filters", "battery", "weight", "attachments", "loudness"],
    }.items()
}
PRODUCTS = [(f"Product {i}: " + ("a well made device with a long warranty, several colours, a detailed manual, "
                                  f"and model number X{i}00 sold since 20{10 + i}. ") * 2, list(CATEGORIES)[i % 3])
            for i in range(8)]


def make_rows(count: int, seed: int, reviews: list[str]) -> list[dict[str, str]]:
    rng = random.Random(seed)
    made = []
    for i in range(count):
        product, category = rng.choice(PRODUCTS)
        made.append({"instruction": INSTRUCTION, "review": f"{rng.choice(reviews)} (ticket {seed}-{i})",
                     "product": product, "category": CATEGORIES[category]})
    return made


def original_prompt(row: dict[str, str]) -> str:
    """The fields in the order the user wrote them — what a plain ``||`` concatenation gives."""
    return "\n".join(f"{field}: {row[field]}" for field in ("instruction", "review", "product", "category"))


def main() -> int:
    import duckdb
    import pyarrow as pa
    from vllm import LLM, SamplingParams

    from connectors.duckdb import connect, functions
    from engine.config import EngineConfig
    from engine.model_store import resolve_model

    count = int(os.environ.get("SQLINFER_BENCH_ROWS", "96"))
    reviews = [r[0] for r in duckdb.sql(
        f"SELECT review FROM read_csv('{ROOT / 'examples/data/reviews.csv'}') WHERE review IS NOT NULL AND review <> ''").fetchall()]
    config = EngineConfig.for_this_machine()
    os.environ.update(config.process_env())  # the same CPU binding as sqlinfer's engine
    args = config.engine_args("", "generate")
    args.pop("model"), args.pop("disable_log_stats")
    args["enable_prefix_caching"] = True
    raw = LLM(model=str(resolve_model("smollm2-135m-instruct").path), **args)
    sampling = SamplingParams(temperature=0.0, max_tokens=4)
    con = connect()
    ai = functions(con)
    ai.client.warm_up(CHAT_ENDPOINT)
    query = (f"SELECT ai_query('{CHAT_ENDPOINT}', {{'instruction': instruction, 'review': review, 'product': product, "
             f"'category': category}}, modelParameters => {{'max_tokens': 4}}) FROM t ORDER BY i")

    def run_raw(batch: list[dict[str, str]]) -> tuple[float, float]:
        started = time.perf_counter()
        outputs = raw.chat([[{"role": "user", "content": original_prompt(r)}] for r in batch], sampling, use_tqdm=False)
        elapsed = time.perf_counter() - started
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        return elapsed, cached / prompt

    def run_ours(batch: list[dict[str, str]]) -> tuple[float, float]:
        con.register("rows_in", pa.Table.from_pylist([dict(r, i=i) for i, r in enumerate(batch)]))
        con.execute("CREATE OR REPLACE TABLE t AS SELECT * FROM rows_in")
        before = ai.stats.snapshot()
        started = time.perf_counter()
        answers = con.execute(query).fetchall()
        elapsed = time.perf_counter() - started
        after = ai.stats.snapshot()
        assert len(answers) == len(batch) and all(a[0] is not None for a in answers)
        return elapsed, (after.cached_prompt_tokens - before.cached_prompt_tokens) / (after.prompt_tokens - before.prompt_tokens)

    run_raw(make_rows(16, 999, reviews)), run_ours(make_rows(16, 998, reviews))  # warm both
    raw_times, our_times, raw_hits, our_hits = [], [], [], []
    for round_ in range(3):
        for name, runner in (("raw", run_raw), ("ours", run_ours)) if round_ % 2 == 0 else (("ours", run_ours), ("raw", run_raw)):
            elapsed, hit = runner(make_rows(count, 100 * round_ + (1 if name == "ours" else 2), reviews))
            (raw_times if name == "raw" else our_times).append(elapsed)
            (raw_hits if name == "raw" else our_hits).append(hit)
    con.close()
    raw_time, our_time = statistics.median(raw_times), statistics.median(our_times)
    speedup = raw_time / our_time
    print(f"prefix-aware ordering, {count} rows, 4 fields (shared instruction, unique review, 8 products, 3 categories):")
    print(f"  raw vLLM, original order : {raw_time:.2f} s, prefix cache hit rate {statistics.median(raw_hits):.0%}")
    print(f"  ai_query, GGR + sorted   : {our_time:.2f} s, prefix cache hit rate {statistics.median(our_hits):.0%}")
    print(f"  speedup {speedup:.2f}x ({'meets' if speedup >= 1.5 else 'MISSES'} target >= 1.5x)")
    results = {"benchmark": "prefix-aware ordering vs raw vLLM", "ratio": speedup, "target": 1.5, "raw_seconds": raw_time,
               "ours_seconds": our_time, "raw_hit_rate": statistics.median(raw_hits), "ours_hit_rate": statistics.median(our_hits)}
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
