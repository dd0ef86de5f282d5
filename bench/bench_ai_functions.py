"""The task functions on the bundled models: quality on real labels, wrapper cost, joins, aggregates.

All in one DuckDB connection on the local engine (result store off, so every round computes):

* **Quality**: ``ai_analyze_sentiment(review)`` and ``ai_classify(review, ['positive',
  'negative'])`` on the 1-, 2-, 4- and 5-star reviews with text of ``examples/data/reviews.csv``
  against the stars (4-5 positive, 1-2 negative); each next to an unconstrained ``ai_query``
  with the same prompt, whose answers outside the label set are counted as invalid. The
  hand-written prompt of ``make demo`` is measured too, as the baseline.
* **Wrapper cost**: each task function against the hand-written ``ai_query`` sending the same
  prompt with the same modelParameters and constraint, over the same rows (after one warm-up of
  both, two alternating rounds each, the faster kept). Ratio = ai_query time / function time;
  target >= 0.95.
* **Join**: ``JOIN ... ON ai_filter(...)`` of 50 reviews x 50 statements: model calls and time,
  against a nested loop of single ai_query calls (measured on the first 60 pairs, extrapolated).
* **Aggregate**: ``ai_agg`` over one group whose text is 5x the model's context: rounds, calls, time.

Run: ``python bench/bench_ai_functions.py [--json FILE]`` (about 20 minutes on 2 cores);
``--functions ai_extract,ai_mask [--rounds 4]`` re-measures only those functions' wrapper cost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT / "examples" / "data" / "reviews.csv"
CHAT = "system-smollm2-135m-instruct"
THROUGHPUT_ROWS = 32
JOIN_SIDE = 50
NESTED_SAMPLE = 60


def _timed(con, query: str):
    started = time.perf_counter()
    rows = con.execute(query).fetchall()
    return rows, time.perf_counter() - started


def quality(con) -> dict:
    from ai_functions.tasks import compile_task

    con.execute(f"CREATE TEMP TABLE labelled AS SELECT review_id, review, CASE WHEN rating >= 4 THEN 'positive' ELSE "
                f"'negative' END AS truth FROM read_csv('{DATA}', allow_quoted_nulls = false) "
                f"WHERE rating <> 3 AND review IS NOT NULL AND trim(review) <> ''")
    total = con.execute("SELECT count(*) FROM labelled").fetchone()[0]
    report = {"rows": total}
    cases = {
        "ai_analyze_sentiment": ("ai_analyze_sentiment(review)", compile_task("ai_analyze_sentiment")),
        "ai_classify": ("ai_classify(review, ['positive', 'negative'])",
                        compile_task("ai_classify", {"labels": ["positive", "negative"]})),
    }
    for name, (call, plan) in cases.items():
        rows, seconds = _timed(con, f"SELECT truth, {call} FROM labelled")
        invalid = sum(1 for _, answer in rows if answer not in plan.labels)
        agree = sum(1 for truth, answer in rows if answer == truth)
        prompt = plan.instruction.replace("'", "''")
        free, free_seconds = _timed(con, f"SELECT truth, ai_query('{CHAT}', '{prompt}' || review, modelParameters => "
                                         f"{{'max_tokens': {plan.max_tokens}}}) FROM labelled")
        free_answers = [(truth, (answer or "").strip()) for truth, answer in free]
        report[name] = {"agree": agree, "accuracy": agree / total, "invalid": invalid, "seconds": seconds,
                        "unconstrained_agree": sum(1 for t, a in free_answers if a.lower() == t),
                        "unconstrained_invalid": sum(1 for _, a in free_answers if a not in plan.labels),
                        "unconstrained_invalid_case_insensitive": sum(1 for _, a in free_answers if a.lower() not in plan.labels),
                        "unconstrained_seconds": free_seconds}
    demo, _ = _timed(con, f"SELECT truth, ai_query('{CHAT}', 'Classify the sentiment of this product review as positive "
                          f"or negative. Answer with one word.' || chr(10) || chr(10) || 'Review: ' || review, "
                          f"modelParameters => {{'max_tokens': 8}}) FROM labelled")
    demo_label = [(t, "negative" if "negative" in (a or "").lower() else "positive" if "positive" in (a or "").lower() else "unclear")
                  for t, a in demo]
    report["demo_prompt_agree"] = sum(1 for t, a in demo_label if a == t)
    return report


# function call (SQL), the plan's arguments
THROUGHPUT = {
    "ai_analyze_sentiment": ("ai_analyze_sentiment(review)", {}),
    "ai_classify": ("ai_classify(review, ['bug', 'praise', 'question', 'complaint'])",
                    {"labels": ["bug", "praise", "question", "complaint"]}),
    "ai_extract": ("ai_extract(review, ['product', 'problem'])", {"labels": ["product", "problem"]}),
    "ai_summarize": ("ai_summarize(review, 15)", {"max_words": 15}),
    "ai_translate": ("ai_translate(review, 'es')", {"to_lang": "es"}),
    "ai_fix_grammar": ("ai_fix_grammar(review)", {}),
    "ai_mask": ("ai_mask(review, ['product'])", {"labels": ["product"]}),
    "ai_filter": ("ai_filter('The review ''{0}'' is positive.', review)", {}),
}


def wrapper_cost(con, names: list[str] | None = None, rounds: int = 2) -> dict:
    """Each function against ai_query sending what it sends (prompt, max_tokens, constraint)."""
    from ai_functions.tasks import compile_task
    from connectors.duckdb import functions

    ai = functions(con)
    con.execute(f"CREATE TEMP TABLE sample AS SELECT review FROM read_csv('{DATA}', allow_quoted_nulls = false) "
                f"WHERE review IS NOT NULL ORDER BY review_id LIMIT {THROUGHPUT_ROWS}")
    reviews = [r for (r,) in con.execute("SELECT review FROM sample").fetchall()]
    report = {}
    for name, (call, arguments) in THROUGHPUT.items():
        if names and name not in names:
            continue
        plan = compile_task(name, arguments)

        def by_function():
            return _timed(con, f"SELECT {call} FROM sample")[1]

        def by_ai_query():
            from ai_functions.functions import ai_query_values

            prompts = [plan.prompt([r] if name != "ai_filter" else ["The review '{0}' is positive.", r]) for r in reviews]
            started = time.perf_counter()
            ai_query_values(ai.client, CHAT, prompts, plan.parameters, plan.spec, None, None)
            return time.perf_counter() - started

        by_function(), by_ai_query()  # warm-up: the engine's prefix cache holds every prompt for both
        function_times, query_times = [], []
        for _ in range(rounds):
            function_times.append(by_function())
            query_times.append(by_ai_query())
        report[name] = {"function_seconds": min(function_times), "ai_query_seconds": min(query_times),
                        "ratio": min(query_times) / min(function_times)}
        print(f"  {name:22s} function {min(function_times):6.2f} s   ai_query {min(query_times):6.2f} s   "
              f"ratio {report[name]['ratio']:.3f}", flush=True)
    return report


def join(con) -> dict:
    from connectors.duckdb import functions

    ai = functions(con)
    con.execute(f"CREATE TEMP TABLE r AS SELECT review_id, review FROM read_csv('{DATA}', allow_quoted_nulls = false) "
                f"WHERE review IS NOT NULL ORDER BY review_id LIMIT {JOIN_SIDE}")
    topics = [r for (r,) in con.execute(f"SELECT DISTINCT product FROM read_csv('{DATA}') ORDER BY 1").fetchall()]
    aspects = ["the battery", "the price", "the delivery", "customer support"]
    statements = [f"complains about {a}" for a in aspects] + [f"is about a {t}" for t in topics]
    statements = (statements * 5)[:JOIN_SIDE]
    statements = [f"{s} (#{i})" if statements.index(s) != i else s for i, s in enumerate(statements)]
    con.execute("CREATE TEMP TABLE s(statement VARCHAR)")
    con.executemany("INSERT INTO s VALUES (?)", [[x] for x in statements])
    query = "SELECT r.review_id, s.statement FROM r JOIN s ON ai_filter('The review ''{0}'' {1}.', r.review, s.statement)"
    ai.stats.reset()
    matched, seconds = _timed(con, query)
    calls = ai.stats.snapshot().requests
    pairs = con.execute("SELECT r.review, s.statement FROM r, s LIMIT ?", [NESTED_SAMPLE]).fetchall()
    from ai_functions.tasks import compile_task

    plan = compile_task("ai_filter")
    started = time.perf_counter()
    for review, statement in pairs:  # one ai_query per pair, as a nested loop would call it
        con.execute(f"SELECT ai_query('{CHAT}', ?, modelParameters => {{'max_tokens': 4}})",
                    [plan.prompt(["The review '{0}' {1}.", review, statement])]).fetchall()
    per_pair = (time.perf_counter() - started) / len(pairs)
    nested = per_pair * JOIN_SIDE * JOIN_SIDE
    return {"pairs": JOIN_SIDE * JOIN_SIDE, "matched": len(matched), "model_calls": calls, "seconds": seconds,
            "nested_loop_seconds_extrapolated": nested, "nested_sample_pairs": len(pairs), "speedup": nested / seconds}


def aggregate(con) -> dict:
    from connectors.duckdb import functions

    ai = functions(con)
    reviews = [r for (r,) in con.execute(f"SELECT review FROM read_csv('{DATA}', allow_quoted_nulls = false) "
                                         f"WHERE review IS NOT NULL ORDER BY review_id").fetchall()]
    tokens = sum(ai.client.count_tokens(CHAT, reviews, "complete"))
    copies = -(-5 * 2048 // tokens)
    con.execute("CREATE TEMP TABLE big(review VARCHAR)")
    con.executemany("INSERT INTO big VALUES (?)", [[r] for r in reviews * copies])
    total_tokens = tokens * copies
    ai.stats.reset()
    (answer,), seconds = (lambda rows_time: (rows_time[0][0], rows_time[1]))(
        _timed(con, "SELECT ai_agg(review, 'List the three most common complaints.') FROM big"))
    snap = ai.stats.snapshot()
    return {"group_tokens": total_tokens, "context_tokens": 2048, "times_context": total_tokens / 2048,
            "rounds": snap.aggregate_rounds, "calls": snap.requests, "seconds": seconds, "answer": answer[:300]}


def main() -> int:
    from connectors.duckdb import connect, functions

    con = connect()
    functions(con).client.warm_up(CHAT)
    if "--functions" in sys.argv:  # re-measure only the wrapper cost of some functions, with more rounds
        names = sys.argv[sys.argv.index("--functions") + 1].split(",")
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 4
        print(json.dumps(wrapper_cost(con, names, rounds), indent=2))
        return 0
    print("== quality on the star ratings", flush=True)
    q = quality(con)
    print(json.dumps(q, indent=2), flush=True)
    print("== wrapper cost: each task function vs the same prompt through ai_query", flush=True)
    w = wrapper_cost(con)
    print("== JOIN ... ON ai_filter, 50 x 50", flush=True)
    j = join(con)
    print(json.dumps(j, indent=2), flush=True)
    print("== ai_agg over 5x the context", flush=True)
    a = aggregate(con)
    print(json.dumps(a, indent=2), flush=True)
    worst = min(v["ratio"] for v in w.values())
    results = {"benchmark": "task functions vs ai_query (worst ratio)", "ratio": worst, "target": 0.95,
               "quality": q, "wrapper": w, "join": j, "aggregate": a}
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
