"""The architecture rules of design.md, checked on the source so they cannot silently erode.

Dependencies point one way: connectors -> ai_functions -> serving -> engine. Heavy imports live
only in the package that owns them (vllm/torch/transformers in engine, duckdb/pyspark in
connectors), and ``import ai_functions`` must not load vLLM or torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["connectors", "ai_functions", "serving", "engine"]  # each may import only those after it
OWNED = {"vllm": "engine", "torch": "engine", "transformers": "engine", "duckdb": "connectors", "pyspark": "connectors",
         "fastapi": "serving/api", "starlette": "serving/api", "uvicorn": "serving/api", "mlflow": "serving"}
# Inside serving: the control plane reads nothing of the data plane or the REST edge; the data
# plane may read the control plane's store but never the edge.
PLANES = {"serving/control": ("serving.data", "serving.api"), "serving/data": ("serving.api",)}
# The CLI, the REST route of the SQL functions, the endpoint insights (costs from
# ai_functions.stats' prices) and the SQL statements (connectors.sql_session) sit at the edge and
# may import anything.
EDGE = {ROOT / "connectors" / "cli.py", ROOT / "serving" / "api" / "ai_functions.py", ROOT / "serving" / "api" / "insights.py",
        ROOT / "serving" / "api" / "statements.py"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


@pytest.mark.parametrize("package", LAYERS)
def test_dependencies_point_one_way_and_heavy_imports_stay_home(package):
    forbidden_layers = set(LAYERS[: LAYERS.index(package)])
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path in EDGE:
            continue
        for name in imported_top_levels(path):
            if name in forbidden_layers:
                problems.append(f"{path.relative_to(ROOT)} imports {name} (a layer above {package})")
            if name in OWNED and not path.relative_to(ROOT).as_posix().startswith(OWNED[name] + "/"):
                problems.append(f"{path.relative_to(ROOT)} imports {name}, which only {OWNED[name]}/ may import")
    assert problems == []


def test_importing_the_sql_functions_does_not_load_the_engine():
    code = (
        "import sys, ai_functions.functions, serving.data.client, connectors.duckdb; "
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert output.stdout.strip() == "[]"


@pytest.mark.parametrize("plane", sorted(PLANES))
def test_the_control_plane_reads_no_data_plane_and_no_plane_reads_the_edge(plane):
    problems = []
    for path in sorted((ROOT / plane).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(PLANES[plane]):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert problems == []
