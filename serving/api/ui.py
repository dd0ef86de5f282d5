"""The Serving UI's files: ``/`` is its page, ``/ui/...`` its script and style.

The UI is static: plain HTML, CSS and JavaScript modules in ``serving/ui/`` (no framework, no build
step, nothing fetched from the internet). Once signed in with an API token, the page calls the
same public REST API as every other client, with that token, so it can do exactly what the token
can. These files hold no data, so they are public (``guard.PUBLIC_PATHS``/``PUBLIC_PREFIXES``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
# The page may load only its own files and talk only to this server: an injected script (say, a
# model's answer mistaken for HTML) could not load code from elsewhere or send a token away.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


class _UIFiles(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(UI_DIR / "index.html", headers=HEADERS)

    app.mount("/ui", _UIFiles(directory=UI_DIR), name="ui")
