"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.api.deps import RuntimeDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


# Out of the OpenAPI document: an alias of /healthz, under the name vLLM, TGI and llama.cpp's server answer on
# (benchmark tools such as guidellm probe it before a run).
@router.get("/health", response_model=Health, include_in_schema=False)
def health() -> dict[str, str]:
    """The process is alive and serving HTTP (as /healthz)."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool] = Field(description="model, database, schema, object_store, cache (with Redis)")
    details: dict[str, str] = Field(description="per check: what was checked; when it failed, why and what to do")
    message: str = Field(description="the failed checks' details, joined; `ready` when none failed")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready: `message` says what is missing"}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready when everything serving needs is there: the model loaded (its engine thread running), the
    database answering with its schema at this build's revision, the object store taking a write, Redis (when
    configured) answering. 503 otherwise, naming what is missing and what to do. A sync route: the checks
    block (each bounded), so they run in the thread pool."""
    checks = runtime.readiness()
    failed = [f"{name}: {check.detail}" for name, check in checks.items() if not check.ok]
    return JSONResponse(
        status_code=503 if failed else 200,
        content={"status": "not ready" if failed else "ready",
                 "checks": {name: check.ok for name, check in checks.items()},
                 "details": {name: check.detail for name, check in checks.items()},
                 "message": "; ".join(failed) or "ready"},
    )
