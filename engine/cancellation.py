"""Cancelling work whose caller has gone away: one event per call, carried in a context variable.

Why: a Spark driver killed mid-job leaves ``sqlinfer serve`` answering its batch; every request
still sent is paid for and lost. The server sets :data:`CANCEL` (a ``threading.Event``) in the
thread that runs a batch and sets the event when the client disconnects; the local engine aborts
its requests inside vLLM and provider backends stop starting new ones. It lives at the bottom
layer so the engine and every backend can read it without importing the server.
"""

from __future__ import annotations

import contextvars
import threading

CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("sqlinfer_cancel", default=None)


def current() -> threading.Event | None:
    """The cancel event of the call this thread is making, if its caller can go away."""
    return CANCEL.get()
