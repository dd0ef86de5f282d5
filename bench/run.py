"""``make bench``: every benchmark, each in its own process, then one summary of the ratios.

Benchmarks report ratios against a baseline measured in the same run (the machines are shared
and noisy); they are never timed tests. Each script also prints its own detailed report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = [
    ("local engine vs HF generate, % of the CPU's limit", ["bench_cpu_engine.py"]),
    ("local engine, chat", ["bench_local_engine.py", "--which", "chat", "--rows", "256"]),
    ("local engine, embeddings", ["bench_local_engine.py", "--which", "embed", "--rows", "512"]),
    ("gateway overhead and external dispatch", ["bench_gateway.py"]),
    ("SQL function overhead (DuckDB, Spark)", ["bench_sql_functions.py"]),
    ("Spark vs DuckDB on the same engine", ["bench_spark_vs_duckdb.py"]),
    ("prefix-aware ordering", ["bench_prefix_order.py"]),
    ("prefix reuse on public short-row tables", ["bench_prefix_tables.py"]),
    ("provisioned throughput under a pay-per-token flood", ["bench_provisioned.py"]),
    ("task functions vs ai_query; quality, joins, aggregates", ["bench_ai_functions.py"]),
]


def main() -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, command) in enumerate(BENCHMARKS):
            out = Path(tmp) / f"{index}.json"
            print(f"== {name}", flush=True)
            completed = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:], "--json", str(out)])
            if completed.returncode != 0 or not out.exists():
                print(f"benchmark {name!r} failed with exit status {completed.returncode}", file=sys.stderr)
                return 1
            reported = json.loads(out.read_text())  # one result, or a list when a script checks several targets
            results.extend(reported if isinstance(reported, list) else [reported])
    print("\nSummary (ratio = sqlinfer throughput / baseline throughput, same run):")
    for result in results:
        verdict = "ok" if result["ratio"] >= result["target"] else "BELOW TARGET"
        print(f"  {result['benchmark']:45s} ratio {result['ratio']:.3f}  target >= {result['target']}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
