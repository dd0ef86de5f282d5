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
         "fastapi": "serving", "mlflow": "serving"}
EDGE = {ROOT / "connectors" / "cli.py"}  # the CLI sits at the edge and may import anything


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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
            if name in OWNED and OWNED[name] != package:
                problems.append(f"{path.relative_to(ROOT)} imports {name}, which only {OWNED[name]}/ may import")
    assert problems == []


def test_importing_the_sql_functions_does_not_load_the_engine():
    code = (
        "import sys, ai_functions.functions, serving.client, connectors.duckdb; "
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert output.stdout.strip() == "[]"
