"""Store an uploaded file in the artifact directory, hashing it on the way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import InvalidRequest, PayloadTooLarge
from app.files.models import File
from app.ids import new_id
from app.settings import Settings
from app.storage import artifact_store

CHUNK = 1024 * 1024
PURPOSES = ("fine-tune",)
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str | None) -> str:
    """Keep only the last path segment and harmless characters (names never become paths)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = UNSAFE_NAME.sub("_", base).strip("._") or "upload"
    return cleaned[:200]


def store_upload(
    session: Session,
    *,
    owner: str,
    stream: BinaryIO,
    filename: str | None,
    purpose: str,
    settings: Settings,
) -> File:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r} is not supported; use one of {', '.join(PURPOSES)}.",
            code="invalid_purpose",
            detail={"field": "purpose"},
        )
    first = stream.read(CHUNK)
    if not first:
        raise InvalidRequest("The uploaded file is empty.", code="empty_file")

    def chunks() -> Iterator[bytes]:
        size, chunk = 0, first
        while chunk:
            size += len(chunk)
            if size > settings.max_dataset_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than {settings.max_dataset_bytes} bytes "
                    "(TUNESERVE_MAX_DATASET_BYTES).",
                    code="file_too_large",
                )
            yield chunk
            chunk = stream.read(CHUNK)

    file_id = new_id("file")
    key = f"files/{file_id}"
    # The store publishes the file only once every chunk is in: a refused upload leaves nothing.
    size, sha256 = artifact_store(settings).write_stream(key, chunks())
    file = File(
        id=file_id,
        owner=owner,
        filename=safe_filename(filename),
        bytes=size,
        sha256=sha256,
        purpose=purpose,
        path=key,
        created_at=utcnow(),
    )
    session.add(file)
    session.flush()
    return file
