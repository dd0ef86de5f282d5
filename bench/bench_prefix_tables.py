"""Prefix reuse on public tables with short rows, against raw vLLM on the original order.

The tables ship in a PyPI package (``bench/public_tables.py``): cars (406 rows, 9 columns),
Seattle weather (1,000 rows, 6 columns) and airports (1,000 rows, 4 columns unique per row: no
sharing beyond the instruction). Each row asks the bundled chat model a one-line question with the
row's columns as a STRUCT request, greedy, at most 4 tokens: prompts of 60-150 tokens.

Both sides run in one process on engines with identical arguments (the hardware rule's, KV
blocks included), and each run starts from an empty prefix cache:

* raw: ``LLM.chat`` on the fields in the user's order ("field: value" lines, as sqlinfer renders
  them) and the rows in table order;
* sqlinfer: ``SELECT ai_query(endpoint, {'instruction': ..., col: col, ...}) FROM t``: fields per
  row by GGR, the batch in prefix order, answers back in input order.

A third side is a diagnostic: raw ``LLM.chat`` sent sqlinfer's prompts in sqlinfer's order. Its
time against sqlinfer's is what the path around the engine adds or saves; against raw in the
original order, what the ordering alone gains.

Reported per table: end-to-end time (median of alternating rounds), prompt tokens and the tokens
the engine reported reusing from its prefix cache, EXPLAIN's reuse estimate for the query, and a
last point for the block size: raw vLLM completing the airports' bare columns (unique code first,
no chat template: no two prompts share a block) with 32-token blocks against vLLM's CPU default
of 128, i.e. what a smaller block costs when nothing is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine.vllm_engine  # noqa: E402,F401  (sets vLLM's log level first)
from public_tables import AIRPORTS, TABLES, PublicTable  # noqa: E402

CHAT_ENDPOINT = "system-smollm2-135m-instruct"
MAX_TOKENS = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per table (median kept)")
    parser.add_argument("--tables", default=",".join(t.name for t in TABLES))
    parser.add_argument("--json", dest="json_out")
    options = parser.parse_args()

    from vllm import LLM, SamplingParams

    from ai_functions.ordering import plan_prompts, render
    from connectors.duckdb import connect, explain, functions
    from engine.config import EngineConfig
    from engine.hardware import read_cpu_facts
    from engine.model_store import resolve_model
    from engine.vllm_engine import get_engine

    config = EngineConfig.for_this_machine()
    # the same CPU binding as sqlinfer's engine (vLLM's own keeps a core of two for its scheduler)
    os.environ.update(config.process_env())
    args = config.engine_args("", "generate")
    args.pop("model"), args.pop("disable_log_stats")
    model_dir = str(resolve_model("smollm2-135m-instruct").path)
    raw = LLM(model=model_dir, **args)
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    con = connect()
    ai = functions(con)
    ai.client.warm_up(CHAT_ENDPOINT)
    ours_engine = get_engine("smollm2-135m-instruct")
    settings = ours_engine.settings()
    assert settings["block_size"] == raw.llm_engine.vllm_config.cache_config.block_size, "both engines must match"

    def run_raw(llm, requests, texts: list[str] | None = None) -> dict[str, float]:
        """``texts``: prompts to send instead of the rows in the user's field and row order."""
        llm.reset_prefix_cache()
        texts = texts if texts is not None else [render(r, list(r)) for r in requests]
        started = time.perf_counter()
        outputs = llm.chat([[{"role": "user", "content": t}] for t in texts], sampling, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return {"seconds": elapsed, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}

    def run_ours(query: str, rows: int) -> dict[str, float]:
        assert ours_engine.reset_prefix_cache(), "the engine refused to reset its prefix cache"
        before = ai.stats.snapshot()
        started = time.perf_counter()
        answers = con.execute(query).fetchall()
        elapsed = time.perf_counter() - started
        after = ai.stats.snapshot()
        assert len(answers) == rows and all(a[0] is not None for a in answers)
        return {"seconds": elapsed, "prompt_tokens": after.prompt_tokens - before.prompt_tokens,
                "cached_tokens": after.cached_prompt_tokens - before.cached_prompt_tokens,
                "generated_tokens": after.completion_tokens - before.completion_tokens}

    chosen = [t for t in TABLES if t.name in options.tables.split(",")]
    for table in chosen:  # warm both sides on a few rows of each table (first-call costs out of the timing)
        table.load(con, rows=16)
        run_raw(raw, table.requests(con))
        run_ours(f"SELECT ai_query('{CHAT_ENDPOINT}', {table.struct_sql()}, modelParameters => {{'max_tokens': {MAX_TOKENS}}}) FROM t", 16)

    results = []
    for table in chosen:
        table.load(con)
        requests = table.requests(con)
        query = (f"SELECT ai_query('{CHAT_ENDPOINT}', {table.struct_sql()}, modelParameters => {{'max_tokens': {MAX_TOKENS}}}) "
                 f"FROM t ORDER BY i")
        [estimate] = explain(con, query, ai)
        # a diagnostic third side: raw vLLM sent sqlinfer's prompts in sqlinfer's order, which tells
        # the ordering's gain from what the path around the engine adds or costs
        ordered = plan_prompts(requests).sent()
        raws, ours, raws_ordered = [], [], []
        for round_ in range(options.rounds):
            order = (("raw", "ours", "raw-ordered") if round_ % 2 == 0 else ("raw-ordered", "ours", "raw"))
            for side in order:
                if side == "raw":
                    raws.append(run_raw(raw, requests))
                elif side == "raw-ordered":
                    raws_ordered.append(run_raw(raw, requests, ordered))
                else:
                    ours.append(run_ours(query, len(requests)))
        report = _report(table, raws, ours, estimate.prefix_reuse)
        report["raw_ordered_seconds"] = statistics.median(r["seconds"] for r in raws_ordered)
        report["raw_ordered_cached"] = raws_ordered[-1]["cached_tokens"]
        results.append(report)

    block_point = None
    if AIRPORTS in chosen:  # what a 32-token block costs against 128 when rows share nothing
        default_block = LLM(model=model_dir, **(args | {"block_size": 128}))
        AIRPORTS.load(con)
        # completions of the bare columns, unique code first: no two prompts share a whole block,
        # so only the block size differs (prefix caching stays on, as it runs)
        prompts = [render(r, list(AIRPORTS.columns)) for r in AIRPORTS.requests(con)]

        def run_alone(llm) -> float:
            llm.reset_prefix_cache()
            started = time.perf_counter()
            outputs = llm.generate(prompts, sampling, use_tqdm=False)
            elapsed = time.perf_counter() - started
            assert sum(o.num_cached_tokens or 0 for o in outputs) == 0, "these prompts must share nothing"
            return elapsed

        run_alone(default_block)
        small, large = [], []
        for round_ in range(options.rounds):
            for llm, into in ((raw, small), (default_block, large)) if round_ % 2 == 0 else ((default_block, large), (raw, small)):
                into.append(run_alone(llm))
        block_point = {"block_32_seconds": statistics.median(small), "block_128_seconds": statistics.median(large)}
        block_point["ratio_32_over_128"] = block_point["block_128_seconds"] / block_point["block_32_seconds"]
    cpu = read_cpu_facts()
    print(f"\nprefix reuse on public short-row tables; {cpu.model_name}, {settings['dtype']}, KV block {settings['block_size']}, "
          f"max_tokens {MAX_TOKENS}, median of {options.rounds} rounds:")
    for r in results:
        print(f"  {r['table']:8s} {r['rows']:5d} rows  raw {r['raw_seconds']:6.2f} s (reused {r['raw_cached']}/{r['raw_prompt']})  "
              f"sqlinfer {r['ours_seconds']:6.2f} s (reused {r['ours_cached']}/{r['ours_prompt']}, explain said "
              f"{r['explain_reuse']})  ratio {r['ratio']:.2f}x; generated tokens raw {r['raw_generated']}, "
              f"sqlinfer {r['ours_generated']}; raw vLLM on sqlinfer's prompts and order {r['raw_ordered_seconds']:.2f} s "
              f"(reused {r['raw_ordered_cached']})")
    if block_point is not None:
        print(f"  block size, nothing shared (airports' bare columns as completions, raw vLLM): 32-token blocks {block_point['block_32_seconds']:.2f} s, "
              f"128-token blocks {block_point['block_128_seconds']:.2f} s: 32 runs at {block_point['ratio_32_over_128']:.2f}x")
    shared = [r for r in results if r["table"] != AIRPORTS.name]
    alone = [r for r in results if r["table"] == AIRPORTS.name]
    facts = {"cpu": cpu.model_name, "dtype": settings["dtype"], "block_size": settings["block_size"], "tables": results,
             "block_size_point": block_point}
    summary = []  # bench/run.py lists each target on its own line
    if shared:
        summary.append({"benchmark": "prefix reuse, short-row public tables (min)",
                        "ratio": min(r["ratio"] for r in shared), "target": 1.5, **facts})
    if alone:
        summary.append({"benchmark": "prefix reuse, a table sharing nothing", "ratio": alone[0]["ratio"], "target": 0.97, **facts})
    if options.json_out:
        Path(options.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def _report(table: PublicTable, raws: list[dict], ours: list[dict], reuse) -> dict:
    raw_seconds = statistics.median(r["seconds"] for r in raws)
    our_seconds = statistics.median(r["seconds"] for r in ours)
    return {"table": table.name, "rows": table.rows, "raw_seconds": raw_seconds, "ours_seconds": our_seconds,
            "ratio": raw_seconds / our_seconds, "raw_prompt": raws[-1]["prompt_tokens"], "raw_cached": raws[-1]["cached_tokens"],
            "ours_prompt": ours[-1]["prompt_tokens"], "ours_cached": ours[-1]["cached_tokens"],
            "raw_generated": raws[-1]["generated_tokens"], "ours_generated": ours[-1]["generated_tokens"],
            "explain_reuse": reuse.reused_tokens if reuse is not None and reuse.unknown_because is None else None,
            "all_rounds": {"raw": raws, "ours": ours}}


if __name__ == "__main__":
    sys.exit(main())
