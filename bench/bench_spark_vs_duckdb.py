"""Spark's ai_query against DuckDB's, on the same rows and the same engine settings, in one run.

Contenders, each over the same 256 distinct review prompts (greedy, 8 tokens) on the bundled chat
model, run one after the other so they never share the CPU:

* DuckDB, in-process (the engine in this process);
* DuckDB through ``sqlinfer serve`` (the HTTP serving client, streamed batches);
* Spark local[2], plain ``spark.sql``, through the same server.

Where the gap goes is measured on the instant ``system-echo`` endpoint (20,000 rows), where the
model costs nothing: DuckDB in-process, DuckDB over HTTP and Spark over HTTP give the per-row cost
of the function itself, of serialisation + HTTP, and of Spark's Arrow hand-off to Python workers.
The ratio reported is Spark rows/s over DuckDB in-process rows/s on the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.vllm_engine  # noqa: E402,F401  (first: it sets vLLM's log level before vLLM loads)
from bench.servers import start_server, stop_server  # noqa: E402

CHAT = "system-smollm2-135m-instruct"
INSTRUCTION = "Classify the sentiment of this product review as positive or negative. Answer with one word."


def reviews(rows: int, tag: str) -> list[str]:
    """Distinct prompts; ``tag`` comes before the review, so that no contender finds another's
    prompts in the engine's prefix cache (only the shared instruction is reused, by everyone)."""
    import duckdb

    texts = [r[0] for r in duckdb.sql(f"SELECT review FROM read_csv('{ROOT / 'examples/data/reviews.csv'}', "
                                      f"allow_quoted_nulls = false) WHERE review IS NOT NULL AND review <> ''").fetchall()]
    return [f"{INSTRUCTION} Review {tag}-{i}: {texts[i % len(texts)]}" for i in range(rows)]


def timed_duckdb(con, prompts: list[str], endpoint: str, parameters: str) -> float:
    import pyarrow as pa

    con.register("rows_in", pa.table({"i": list(range(len(prompts))), "q": prompts}))
    con.execute("CREATE OR REPLACE TABLE t AS SELECT * FROM rows_in")
    started = time.perf_counter()
    answers = con.execute(f"SELECT ai_query('{endpoint}', q{parameters}) FROM t ORDER BY i").fetchall()
    elapsed = time.perf_counter() - started
    assert len(answers) == len(prompts) and all(a[0] is not None for a in answers)
    return elapsed


def timed_spark(spark, prompts: list[str], endpoint: str, parameters: str) -> float:
    frame = spark.createDataFrame([(i, q) for i, q in enumerate(prompts)], ["i", "q"]).repartition(2)
    frame.cache().count()
    frame.createOrReplaceTempView("t")
    started = time.perf_counter()
    answers = spark.sql(f"SELECT i, ai_query('{endpoint}', q{parameters}) AS a FROM t").collect()
    elapsed = time.perf_counter() - started
    assert len(answers) == len(prompts) and all(a["a"] is not None for a in answers)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--echo-rows", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import tempfile

    from connectors.duckdb import connect, functions
    from serving.data.http_client import HttpServingClient

    echo = [f"row {i}" for i in range(args.echo_rows)]
    model = ", modelParameters => {'max_tokens': 8}"  # DuckDB's struct literal
    spark_model = ", modelParameters => named_struct('max_tokens', 8)"  # the same in Spark SQL
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as home:
        server, url, token = start_server(Path(home))
        try:
            local = connect()
            functions(local).client.warm_up(CHAT)
            timed_duckdb(local, reviews(16, "warm"), CHAT, model)  # warm
            results["duckdb in-process, model"] = timed_duckdb(local, reviews(args.rows, "a"), CHAT, model)
            results["duckdb in-process, echo"] = timed_duckdb(local, echo, "system-echo", "")
            local.close()
            engine.vllm_engine.shutdown_all()  # free the CPU and memory for the server's engine

            remote = connect(client=HttpServingClient(url, token))
            timed_duckdb(remote, reviews(16, "warm"), CHAT, model)  # starts and warms the server's engine
            results["duckdb over HTTP, model"] = timed_duckdb(remote, reviews(args.rows, "b"), CHAT, model)
            results["duckdb over HTTP, echo"] = timed_duckdb(remote, echo, "system-echo", "")
            remote.close()

            os.environ["PYSPARK_PYTHON"] = sys.executable
            from pyspark.sql import SparkSession

            from connectors import spark as sqlinfer_spark

            spark = (SparkSession.builder.master("local[2]").appName("sqlinfer-bench").config("spark.ui.enabled", "false")
                     .config("spark.sql.shuffle.partitions", "2").getOrCreate())
            spark.sparkContext.setLogLevel("ERROR")
            sqlinfer_spark.register(spark, url=url, token=token)
            timed_spark(spark, reviews(16, "warm2"), CHAT, spark_model)  # warm the Python workers
            results["spark over HTTP, model"] = timed_spark(spark, reviews(args.rows, "c"), CHAT, spark_model)
            results["spark over HTTP, echo"] = timed_spark(spark, echo, "system-echo", "")
            spark.stop()
        finally:
            stop_server(server)

    ratio = results["duckdb in-process, model"] / results["spark over HTTP, model"]
    report = {
        "benchmark": "Spark ai_query vs DuckDB (same rows, same engine settings)", "rows": args.rows,
        "ratio": ratio, "target": 0.8,
        **{f"{name} rows/s": (args.rows if "model" in name else args.echo_rows) / seconds for name, seconds in results.items()},
        **{f"{name} us/row": 1e6 * seconds / args.echo_rows for name, seconds in results.items() if "echo" in name},
    }
    print(f"{args.rows} review prompts on {CHAT} (8 tokens), and {args.echo_rows} rows on system-echo:")
    for name, seconds in results.items():
        rows = args.rows if "model" in name else args.echo_rows
        extra = f"  {1e6 * seconds / rows:8.1f} us/row" if "echo" in name else ""
        print(f"  {name:28s} {seconds:7.2f} s  {rows / seconds:9.1f} rows/s{extra}")
    print(f"  Spark / DuckDB in-process on the model: {ratio:.2f} (target >= 0.8)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
