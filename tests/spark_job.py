"""A Spark job as a user runs one (its own driver process), for the kill tests in test_spark_resume.py.

    python tests/spark_job.py URL TOKEN ROWS OUT.json
    python tests/spark_job.py sidecar - ROWS OUT.json ENDPOINT

Runs ``SELECT id, ai_query(ENDPOINT, 'row-' || id) FROM range(ROWS)`` (ENDPOINT 'ext' unless
given) in plain ``spark.sql`` on local[2] (tasks may be retried, as on a cluster), against a
server URL or in sidecar mode, and writes the answers to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    url, token, rows, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    endpoint = sys.argv[5] if len(sys.argv) > 5 else "ext"
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    from connectors import spark as sqlinfer_spark

    spark = (SparkSession.builder.master("local[2,4]").appName("sqlinfer-kill-test")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    if url == "sidecar":
        sqlinfer_spark.register(spark, sidecar=True)
    else:
        sqlinfer_spark.register(spark, url=url, token=token)
    print("job started", flush=True)
    answers = spark.sql(f"SELECT id, ai_query('{endpoint}', concat('row-', id), modelParameters => named_struct('max_tokens', 4)) "
                        f"AS a FROM range(0, {rows}, 1, 2)").collect()
    with open(out, "w") as handle:
        json.dump({str(r["id"]): r["a"] for r in answers}, handle)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
