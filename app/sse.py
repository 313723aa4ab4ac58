"""Server-sent events: the message format and the response, for every stream the api answers
(job events, POST /generate, the /v1 completions)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

KEEP_ALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"


def message(data: str, *, id: int | None = None, event: str | None = None) -> str:
    """One message: optional `id:` and `event:` lines, the `data:` line, a blank line."""
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event else "")
    return f"{head}data: {data}\n\n"


def event_stream(
    messages: AsyncIterator[str], background: BackgroundTask | None = None
) -> StreamingResponse:
    return StreamingResponse(
        messages,
        media_type="text/event-stream",
        # Proxies must pass each message on as it comes, not cache or buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=background,
    )
