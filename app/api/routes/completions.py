"""`POST /v1/completions` (OpenAI-compatible; SSE when `stream` is true)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse

from app.api.deps import EngineClientDep, GenerationDep, ServedFingerprintDep, runtime_of
from app.api.routes.streaming import receive_disconnect, respond
from app.protocol.completions import CompletionRequest
from app.services.completions import serve_completion
from app.services.generation import ClientDisconnected

router = APIRouter(tags=["inference"])


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, access: GenerationDep,
                            engine: EngineClientDep, fingerprint: ServedFingerprintDep
                            ) -> Response | EventSourceResponse:
    """Complete `prompt` with the model `model` names (the base model or one of the tenant's prefixes)."""
    try:
        result = await serve_completion(body, access=access, db_calls=runtime_of(request).db_calls,
                                        engine=engine, fingerprint=fingerprint,
                                        disconnected=receive_disconnect(request.receive))
    except ClientDisconnected:
        return Response(status_code=499)
    return respond(result, send_timeout_s=runtime_of(request).settings.stream_send_timeout_s)
