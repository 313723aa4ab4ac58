"""Store an uploaded file in the artifact directory, hashing it on the way."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import InvalidRequest, PayloadTooLarge
from app.files.models import File
from app.ids import new_id
from app.settings import Settings

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
    file_id = new_id("file")
    directory = settings.artifacts_dir / "files"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_id
    digest, size = hashlib.sha256(), 0
    partial = path.with_suffix(".partial")
    try:
        with partial.open("wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > settings.max_dataset_bytes:
                    raise PayloadTooLarge(
                        f"The file is larger than {settings.max_dataset_bytes} bytes "
                        "(TUNESERVE_MAX_DATASET_BYTES).",
                        code="file_too_large",
                    )
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidRequest("The uploaded file is empty.", code="empty_file")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    file = File(
        id=file_id,
        owner=owner,
        filename=safe_filename(filename),
        bytes=size,
        sha256=digest.hexdigest(),
        purpose=purpose,
        path=str(Path(path)),
        created_at=utcnow(),
    )
    session.add(file)
    session.flush()
    return file
