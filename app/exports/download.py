"""A file of the artifact store over HTTP with one Range (bytes=START- or START-END): how a
client resumes a large download from a store that is not a local directory (S3)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.storage import ArtifactStore

CHUNK = 1024 * 1024
ONE_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _chunks(store: ArtifactStore, key: str, start: int, length: int) -> Iterator[bytes]:
    with store.open(key) as handle:
        handle.seek(start)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def ranged_stream(
    store: ArtifactStore,
    key: str,
    name: str,
    size: int,
    request: Request,
    headers: dict[str, str],
) -> Response:
    headers = {
        **headers,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    asked = request.headers.get("range")
    if_range = request.headers.get("if-range")
    start, end = 0, size - 1
    status = 200
    if asked and (if_range is None or if_range == headers.get("ETag")):
        match = ONE_RANGE.match(asked.strip())
        if match is None or int(match[1]) >= size:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        _chunks(store, key, start, end - start + 1),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )
