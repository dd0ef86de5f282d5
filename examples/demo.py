"""The main job, end to end on one machine: sentiment and embeddings for product reviews in SQL.

Run it with ``make demo`` (sets everything up first) or ``.venv/bin/python examples/demo.py``.
One DuckDB query calls ``ai_query`` on the bundled chat model and ``ai_embed`` on the bundled
embedding model for every review in ``examples/data/reviews.csv``; then plain SQL reads the
results: a table of the first rows, how often the model agrees with the star rating, and a
semantic search over the embeddings.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from connectors.duckdb import connect, functions

DATA = Path(__file__).parent / "data" / "reviews.csv"
CHAT = "system-smollm2-135m-instruct"
EMBED = "system-all-minilm-l6-v2"

# The instruction comes first and the review last: every prompt then shares the same prefix,
# which vLLM's prefix cache computes once (prefill dominates on CPU).
SCORE_REVIEWS = f"""
CREATE TABLE scored AS
SELECT review_id, product, rating, review,
       ai_query('{CHAT}',
                'Classify the sentiment of this product review as positive or negative. '
                || 'Answer with one word.' || chr(10) || chr(10) || 'Review: ' || review,
                modelParameters => {{'max_tokens': 8}}) AS answer,
       ai_embed('{EMBED}', review) AS embedding
FROM read_csv('{DATA}', allow_quoted_nulls = false)
"""

LABELLED = """
SELECT *, CASE WHEN answer ILIKE '%negative%' THEN 'negative'
               WHEN answer ILIKE '%positive%' THEN 'positive'
               WHEN answer IS NULL THEN NULL ELSE 'unclear' END AS sentiment
FROM scored
"""


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("engine").setLevel(logging.INFO)  # each engine's one start line: build, dtype, threads, why
    con = connect()
    ai = functions(con)
    print(f"Starting the local engines ({CHAT}, {EMBED}); the first start takes about a minute...", file=sys.stderr)
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # each engine starts on its own loop: both at once
        list(pool.map(ai.client.warm_up, (CHAT, EMBED)))
    print(f"Engines ready in {time.perf_counter() - started:.0f} s.", file=sys.stderr)

    rows = con.execute(f"SELECT count(*) FROM read_csv('{DATA}', allow_quoted_nulls = false)").fetchone()[0]
    started = time.perf_counter()
    with ai.stats.progress(total=2 * rows, description="ai_query + ai_embed rows"):
        con.execute(SCORE_REVIEWS)
    wall = time.perf_counter() - started
    stats = ai.stats.snapshot()  # before the queries below add their own calls
    con.execute(f"CREATE VIEW labelled AS {LABELLED}")

    print("\nFirst reviews, the model's answer, and the first 3 of 384 embedding dimensions:")
    con.sql(
        "SELECT review_id AS id, rating, left(review, 60) AS review, sentiment, left(answer, 40) AS answer, "
        "embedding[1:3] AS embedding FROM labelled ORDER BY review_id LIMIT 12"
    ).show(max_width=180)

    print("Sentiment against star rating (1-2 stars negative, 4-5 positive, 3 mixed):")
    con.sql(
        "SELECT CASE WHEN rating <= 2 THEN '1-2 stars' WHEN rating = 3 THEN '3 stars' ELSE '4-5 stars' END AS rating, "
        "count(*) FILTER (WHERE sentiment = 'positive') AS positive, "
        "count(*) FILTER (WHERE sentiment = 'negative') AS negative, "
        "count(*) FILTER (WHERE sentiment = 'unclear') AS unclear, "
        "count(*) FILTER (WHERE sentiment IS NULL) AS no_text "
        "FROM labelled GROUP BY ALL ORDER BY 1"
    ).show()

    query = "the battery died far too soon"
    print(f"Reviews closest in meaning to {query!r} (ai_embed + array_cosine_similarity):")
    con.sql(
        f"SELECT round(array_cosine_similarity(embedding, ai_embed('{EMBED}', '{query}')), 3) AS similarity, "
        f"product, left(review, 90) AS review FROM scored WHERE embedding IS NOT NULL "
        f"ORDER BY similarity DESC LIMIT 5"
    ).show(max_width=180)

    print(
        f"Summary: {rows} rows, {stats.requests} model requests ({stats.deduplicated} duplicates and "
        f"{stats.null_rows} NULLs not sent), {stats.completion_tokens} generated tokens, "
        f"{rows / wall:.1f} rows/s, {wall:.1f} s wall time for the scoring query."
    )
    con.close()
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a child process: keep the guard
    sys.exit(main())
