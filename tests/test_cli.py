"""The ``sqlinfer`` command, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.registry_helpers import SQLINFER
from tests.conftest import CHAT_ENDPOINT



def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([SQLINFER, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_models_lists_the_bundled_models():
    result = run("models")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct" in result.stdout and "all-minilm-l6-v2" in result.stdout
    assert "llm/v1/embeddings" in result.stdout


def test_endpoints_lists_the_system_endpoints():
    result = run("endpoints", "list")
    assert result.returncode == 0, result.stderr
    assert CHAT_ENDPOINT in result.stdout and "system-all-minilm-l6-v2" in result.stdout


def test_sql_error_is_one_clear_line_and_exit_status_1():
    result = run("sql", "SELECT ai_query('no-such-endpoint', 'hi')", "--no-progress")
    assert result.returncode == 1
    assert "error: " in result.stderr and "endpoint 'no-such-endpoint' does not exist; known endpoints:" in result.stderr
    assert "Traceback" not in result.stderr


def test_sql_reads_csv_files_without_models(tmp_path):
    csv = tmp_path / "items.csv"
    csv.write_text("id,name\n1,apple\n2,pear\n")
    result = run("sql", f"SELECT count(*) AS n, max(name) AS last FROM '{csv}'", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "pear" in result.stdout and "2" in result.stdout


@pytest.mark.engine
def test_sql_runs_ai_query_on_the_local_model(tmp_path):
    csv = tmp_path / "questions.csv"
    csv.write_text("question\nWhat is the capital of France? Answer in one word.\n")
    query = f"SELECT ai_query('{CHAT_ENDPOINT}', question, modelParameters => {{'max_tokens': 8}}) AS answer FROM '{csv}'"
    result = run("sql", query)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "ai functions: 1 rows" in result.stderr  # summary on stderr, table on stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
