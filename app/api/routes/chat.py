"""`POST /v1/chat/completions` (OpenAI-compatible; SSE when `stream` is true)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse

from app.api.deps import EngineClientDep, GenerationDep, ServedFingerprintDep, runtime_of
from app.api.routes.streaming import receive_disconnect, respond
from app.protocol.chat import ChatCompletionRequest
from app.services.chat import serve_chat
from app.services.generation import ClientDisconnected

router = APIRouter(tags=["inference"])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, access: GenerationDep, engine: EngineClientDep,
    fingerprint: ServedFingerprintDep,
) -> Response | EventSourceResponse:
    """Answer `messages` (through the model's chat template) with the model `model` names."""
    try:
        result = await serve_chat(body, access=access, db_calls=runtime_of(request).db_calls, engine=engine,
                                  fingerprint=fingerprint, disconnected=receive_disconnect(request.receive))
    except ClientDisconnected:
        return Response(status_code=499)
    return respond(result, send_timeout_s=runtime_of(request).settings.stream_send_timeout_s)
