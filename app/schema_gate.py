"""The schema gate: while the database schema is behind this build's migrations, API requests get a 503 that
says what to do, never a 500 from a table that does not exist yet.

A shared database is not migrated behind the operator's back (unless PREFIXSERVE_MIGRATE_ON_START says so), so
a replica may start before `prefixserve migrate` ran. The gate re-reads the revision at most once every
`recheck_interval_s` while it is behind, in a thread (the event loop never waits on the database), and stops
checking for good once the schema is at head: the request path then costs one attribute read. It is a plain
ASGI middleware so that it holds for every route, whatever dependencies the routes use.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.db.migrate import head, known_revisions, revision_of
from app.errors import error_body

log = logging.getLogger(__name__)

# Probes, metrics and the API docs need no schema: an orchestrator must still see the process alive and why
# it is not ready.
EXEMPT_PATHS = frozenset({"/health", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs",
                          "/docs/oauth2-redirect", "/redoc"})
# The web console's static pages read nothing from the database (they call the API, which says the 503 itself).
EXEMPT_PREFIXES = ("/console",)
RETRY_AFTER_S = 5
ERROR_CODE = "schema_not_ready"


@dataclass(frozen=True)
class SchemaState:
    ok: bool
    revision: str | None
    message: str  # what is wrong and what to do; empty when ok


class SchemaGate:
    """Whether the database schema is at this build's head revision. `read_revision` reads it (blocking)."""

    def __init__(self, read_revision: Callable[[], str | None], *, head: str, known: frozenset[str],
                 recheck_interval_s: float = 1.0) -> None:
        self._read = read_revision
        self.head = head
        self._known = known
        self.recheck_interval_s = recheck_interval_s
        self._state = SchemaState(False, None, "the database schema revision has not been read yet; retry shortly")
        self._checked_at = -float("inf")
        self._lock = threading.Lock()  # one read at a time, from the event loop's thread or /readyz's
        self._in_flight = False  # set on the event loop only: at most one read started by requests

    @property
    def state(self) -> SchemaState:
        return self._state

    @property
    def ok(self) -> bool:
        return self._state.ok

    def check(self) -> SchemaState:
        """Read the revision now unless the schema is already known to be at head. Blocking: call it from a
        thread (the middleware does; /readyz runs in the thread pool)."""
        if self._state.ok:
            return self._state
        with self._lock:
            if self._state.ok:
                return self._state
            try:
                state = self._judge(self._read())
            except sa.exc.SQLAlchemyError as exc:
                state = SchemaState(False, None, "cannot read the database schema revision: the database does "
                                                 f"not answer ({type(exc).__name__}); retry shortly")
            except Exception as exc:  # e.g. several heads in alembic_version: still a 503 that says so, never a 500
                state = SchemaState(False, None, f"cannot read the database schema revision: {exc}")
            if state.ok and self._checked_at > -float("inf"):  # the start-up log reports the first read
                log.info("database schema now at revision %s: serving", state.revision)
            self._checked_at = time.monotonic()
            self._state = state
            return state

    def _judge(self, revision: str | None) -> SchemaState:
        if revision == self.head:
            return SchemaState(True, revision, "")
        if revision is None or revision in self._known:
            return SchemaState(False, revision, (
                f"database at revision {revision or 'none'}, this build needs {self.head}: run `prefixserve "
                "migrate` (or start the server with PREFIXSERVE_MIGRATE_ON_START=true)"))
        # A revision this build does not know was written by a newer release's migrations. Releases migrate
        # before they roll out, so the replicas still running the older build serve on the newer schema.
        log.warning("database at revision %s, newer than this build's %s: serving on it", revision, self.head)
        return SchemaState(True, revision, "")

    async def admit(self) -> bool:
        """True when requests may go through. While behind, re-reads the revision if the last read is older
        than the interval (in a thread; requests arriving meanwhile get the last answer)."""
        if self._state.ok:
            return True
        if not self._in_flight and time.monotonic() - self._checked_at >= self.recheck_interval_s:
            self._in_flight = True
            try:
                await asyncio.to_thread(self.check)
            finally:
                self._in_flight = False
        return self._state.ok


def engine_revision_reader(db: sa.Engine) -> Callable[[], str | None]:
    """Reads the revision through the runtime's own engine (its pool: no new connection per check)."""
    def read() -> str | None:
        with db.connect() as conn:
            return revision_of(conn)

    return read


def open_schema_gate(db: sa.Engine) -> SchemaGate:
    """The gate for `db` against this build's migrations, checked once now."""
    gate = SchemaGate(engine_revision_reader(db), head=head(), known=known_revisions())
    gate.check()
    return gate


def _exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


class SchemaGateMiddleware:
    """503 + Retry-After + the gate's message for every request but the exempt paths while the schema is behind.
    `gate()` finds the runtime's gate (None before the lifespan opened it, or in a runtime without one)."""

    def __init__(self, app: ASGIApp, *, gate: Callable[[], SchemaGate | None]) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate = self.gate() if scope["type"] == "http" and not _exempt(scope["path"]) else None
        if gate is None or await gate.admit():
            await self.app(scope, receive, send)
            return
        response = JSONResponse(error_body(gate.state.message, "service_unavailable", code=ERROR_CODE),
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        await response(scope, receive, send)
