"""A ``sqlinfer serve`` process for benchmarks: started on a free port with an admin token, stopped
with its engine processes (it runs in its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(home: Path, env: dict[str, str] | None = None, quiet: bool = True) -> tuple[subprocess.Popen, str, str]:
    """(process, base URL, admin token) of a server on ``home``, once it answers /health."""
    import httpx

    from serving.control.service import EndpointService

    _, token = EndpointService(home).auth.create_token("bench", is_admin=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen([sys.executable, "-m", "connectors.cli", "serve", "--port", str(port), "--log-level", "warning"],
                               env=os.environ | {"SQLINFER_HOME": str(home)} | (env or {}), start_new_session=True,
                               cwd=str(ROOT), stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, token
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("sqlinfer serve did not start")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its engines too), SIGKILL if it does not end in a minute."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
