"""A real sqlinfer REST server on a free loopback port, for tests (uvicorn in a thread)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200 (a server started as a subprocess)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


class RunningServer:
    def __init__(self, service):
        import uvicorn

        from serving.api.app import create_app

        self.service = service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(service)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="info")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_group(command: list[str], **kwargs) -> subprocess.Popen:
    """A server subprocess in its own process group, so that stopping it also stops the vLLM
    EngineCore and worker processes it started (they would outlive a killed parent)."""
    return subprocess.Popen(command, start_new_session=True, **kwargs)


def stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that ignored SIGTERM or lost their parent
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@contextlib.contextmanager
def sqlinfer_serve(env: dict[str, str]) -> Iterator[str]:
    """One ``sqlinfer serve`` in its own process group with ``env``, healthy; its URL. Stopping it
    stops the engines it started."""
    from tests.registry_helpers import SQLINFER

    port = free_port()
    process = start_group([SQLINFER, "serve", "--port", str(port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health")
        yield url
    finally:
        stop_group(process)


@contextlib.contextmanager
def serve_processes(home, count: int = 2) -> Iterator[list[int]]:
    """``count`` ``sqlinfer serve`` processes on one home (one registry database), healthy; their ports."""
    from tests.registry_helpers import SQLINFER

    env = os.environ | {"SQLINFER_HOME": str(home)}
    ports = [free_port() for _ in range(count)]
    servers = [subprocess.Popen([SQLINFER, "serve", "--port", str(p), "--log-level", "warning"], env=env) for p in ports]
    try:
        for port in ports:
            wait_healthy(f"http://127.0.0.1:{port}/health")
        yield ports
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)
