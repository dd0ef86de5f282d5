"""A process that used the engine exits cleanly: status 0, no abort noise, no child left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import psutil
    from engine.types import SamplingOptions
    from engine.vllm_engine import get_engine

    if __name__ == "__main__":
        engine = get_engine("smollm2-135m-instruct")
        [result] = engine.chat([[{"role": "user", "content": "Say hi."}]], SamplingOptions(max_tokens=2))
        assert result.error is None
        print("CHILDREN", " ".join(str(p.pid) for p in psutil.Process().children(recursive=True)))
    """
)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.engine
def test_interpreter_exit_stops_the_engine_quietly(tmp_path):
    script = tmp_path / "use_engine.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    (tmp_path / "stderr.txt").write_text(result.stderr)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("CHILDREN")]
    children = [int(pid) for pid in line.split()[1:]]
    assert children, "the engine should have run in a child process"
    deadline = time.monotonic() + 15
    while not all(gone(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in children if not gone(pid)] == []
    for noise in ("Traceback", "Exception ignored", "Aborted", "terminate called", "leaked", "force killing"):
        assert noise not in result.stderr
