"""Refuse request bodies over their limit before they are read into memory or onto disk."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import OPENAI_PREFIX, error_body, openai_error_body
from app.settings import Settings

# Multipart uploads (dataset files, adapter archives): form fields and boundaries around the file.
UPLOAD_OVERHEAD = 1024 * 1024
UPLOAD_PATHS = ("/files", "/v1/files", "/adapters")


TOO_LARGE = "request_too_large"


def body_limit(settings: Settings, path: str) -> tuple[int, str]:
    """The largest body a request to path may send, and the setting that decides it."""
    if path.rstrip("/") in UPLOAD_PATHS:
        return settings.max_dataset_bytes + UPLOAD_OVERHEAD, "TUNESERVE_MAX_DATASET_BYTES"
    return settings.max_request_bytes, "TUNESERVE_MAX_REQUEST_BYTES"


class RequestSizeLimit:
    """413 for a Content-Length over the limit at once; a body that streams past it (chunked,
    or a lying Content-Length) gets the 413 as soon as it crosses the limit, and the app sees
    the client as gone."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = body_limit(self.settings, scope["path"])
        message = f"The request body is larger than {limit} bytes ({setting})."
        declared = dict(scope["headers"]).get(b"content-length", b"")
        refusal = (
            openai_error_body(413, TOO_LARGE, message)
            if scope["path"].startswith(OPENAI_PREFIX)
            else error_body(TOO_LARGE, message)
        )
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, refusal)
            return
        received = 0
        refused = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    refused = True
                    await _refuse(send, refusal)
                    return {"type": "http.disconnect"}
            return event

        async def unless_refused(event: Message) -> None:
            if not refused:
                await send(event)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:  # the app's trouble with the cut-off body is no news
                raise


async def _refuse(send: Send, refusal: dict[str, Any]) -> None:
    body = json.dumps(refusal).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
