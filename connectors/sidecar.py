"""Engines next to the executors: one ``sqlinfer serve`` per host, shared by that host's Python workers.

Why: with a URL, every Spark executor sends its rows to one central server, so one machine's
engine answers the whole cluster; without one, every Python worker would load its own engine.
In sidecar mode the first worker on a host that needs the serving layer starts a ``sqlinfer
serve`` there (under a file lock, so exactly one per host and ``SQLINFER_HOME``); every other
worker on the host finds it through a state file and uses it over loopback HTTP. Inference then
spreads over the cluster, one engine (and its GPU, where there is one) per node, while batches,
result stores and rate limits work as with any server.

The sidecar keeps running after the job, warm for the next one (its engines scale to zero when
idle, as system endpoints do); ``sqlinfer sidecar stop`` stops it. Its state
(``$SQLINFER_HOME/sidecar/state.json``: pid, port and an admin token for loopback use, mode 0600)
and its log (``sidecar/serve.log``) live in the home.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.errors import TemporarilyUnavailable
from engine.model_store import sqlinfer_home

START_TIMEOUT = 180.0  # the server answers /health in seconds; engines start later, on first use
TOKEN_LIFETIME = 30 * 86400  # the sidecar's loopback admin token; revoked when the sidecar stops


@dataclass(frozen=True)
class Sidecar:
    pid: int
    url: str
    token: str


def directory(home: Path | None = None) -> Path:
    return (home or sqlinfer_home()) / "sidecar"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def running(home: Path | None = None) -> Sidecar | None:
    """This host's sidecar, if its state file names a process that answers."""
    state = directory(home) / "state.json"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    sidecar = Sidecar(int(data["pid"]), data["url"], data["token"])
    if not _alive(sidecar.pid) or not _healthy(sidecar.url):
        return None
    return sidecar


def ensure(home: Path | None = None) -> Sidecar:
    """This host's sidecar, started now if none runs (one per host: the start is under a file lock)."""
    found = running(home)
    if found is not None:
        return found
    folder = directory(home)
    with _locked(folder / "lock"):
        found = running(home)  # another worker started it while we waited for the lock
        if found is not None:
            return found
        return _start(folder, home or sqlinfer_home())


def _start(folder: Path, home: Path) -> Sidecar:
    from serving.control.service import EndpointService

    token_id, token = EndpointService(home).auth.create_token("sidecar", is_admin=True, comment="sqlinfer sidecar (loopback)",
                                                              lifetime_seconds=TOKEN_LIFETIME)
    port = _free_port()
    log = open(folder / "serve.log", "ab")
    environment = os.environ | {"SQLINFER_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-m", "connectors.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                "--log-level", "warning"], stdout=log, stderr=log, env=environment,
                               start_new_session=True)  # its own group: it outlives the worker that started it
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise TemporarilyUnavailable(
                f"the sqlinfer sidecar on this host did not start (exit status {process.poll()}); see {folder / 'serve.log'}")
        time.sleep(0.2)
    state = folder / "state.json"
    staging = folder / "state.json.tmp"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"pid": process.pid, "url": url, "token": token, "token_id": token_id}, handle)
    os.replace(staging, state)
    return Sidecar(process.pid, url, token)


def stop(home: Path | None = None) -> bool:
    """Stop this host's sidecar and the engines it started; False if none was running."""
    found = running(home)
    state = directory(home) / "state.json"
    try:
        token_id = json.loads(state.read_text()).get("token_id")
    except (OSError, ValueError):
        token_id = None
    state.unlink(missing_ok=True)
    if token_id:
        from engine.errors import SqlinferError
        from serving.control.service import EndpointService

        try:
            EndpointService(home or sqlinfer_home()).auth.revoke_token(token_id)
        except SqlinferError:  # revoked already
            pass
    if found is None:
        return False
    try:
        os.killpg(found.pid, signal.SIGTERM)  # the server and its engine processes
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 60
    while _alive(found.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(found.pid):
        os.killpg(found.pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
