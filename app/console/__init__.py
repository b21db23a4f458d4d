"""The web console: static pages served at `/console` (switch off with PREFIXSERVE_CONSOLE=false).

The server only serves files here. Every page calls the public API from the browser (`fetch` with the
`Authorization` header, the key kept in the tab's sessionStorage), so the console sees exactly what the key
may see, and nothing of its own reaches the database. No build step: plain ES modules under static/.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
MOUNT_PATH = "/console"

# The pages run only their own scripts and talk only to this origin: an injected script could read the key
# from sessionStorage, so nothing inline or foreign may run. No referrer leaves the console; it is never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load (ETag): a new release's files are picked up at once.
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the console at /console/ (`/console` redirects there; index.html for the directory)."""
    app.mount(MOUNT_PATH, ConsoleFiles(directory=STATIC_DIR, html=True), name="console")
