"""Store an uploaded file in the artifact directory, hashing it on the way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import after_commit, utcnow
from app.errors import Conflict, InvalidRequest, PayloadTooLarge
from app.files.models import File
from app.files.repository import get_file, get_file_by_idempotency_key, used_by_unfinished_job
from app.idempotency import check_idempotency_key, ensure_same_request, request_hash
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


class Upload(NamedTuple):
    file: File
    replayed: bool  # True: an earlier request with the same Idempotency-Key stored the file


def upload_hash(*, filename: str | None, purpose: str, sha256: str) -> str:
    return request_hash({"filename": filename, "purpose": purpose, "sha256": sha256})


def _replay(file: File, *, key: str, request_hash: str) -> Upload:
    ensure_same_request(
        key=key,
        stored_hash=file.request_hash,
        new_hash=request_hash,
        kind="file",
        resource_id=file.id,
    )
    return Upload(file, replayed=True)


def store_upload(
    session: Session,
    *,
    owner: str,
    stream: BinaryIO,
    filename: str | None,
    purpose: str,
    settings: Settings,
    idempotency_key: str | None = None,
) -> Upload:
    """Store the upload and its row.

    With an idempotency key, a retry of the same upload (same name, purpose and bytes) gets the
    file the first one stored (`replayed`, the bytes just received are dropped); the same key
    on a different upload is a 409.
    """
    key = check_idempotency_key(idempotency_key)
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
    path = f"files/{file_id}"
    store = artifact_store(settings)
    # The store publishes the file only once every chunk is in: a refused upload leaves nothing.
    # The request's hash needs the bytes' sha256, so even a retry is stored before it is known.
    size, sha256 = store.write_stream(path, chunks())
    file = File(
        id=file_id,
        owner=owner,
        filename=safe_filename(filename),
        bytes=size,
        sha256=sha256,
        purpose=purpose,
        path=path,
        created_at=utcnow(),
    )
    if key is None:
        session.add(file)
        session.flush()
        return Upload(file, replayed=False)
    file.idempotency_key = key
    file.request_hash = upload_hash(filename=filename, purpose=purpose, sha256=sha256)
    try:
        upload = _add_keyed(session, file, owner=owner, key=key, request_hash=file.request_hash)
    except BaseException:
        store.delete(path)
        raise
    if upload.replayed:
        store.delete(path)  # the first request's copy is the file
    return upload


def _add_keyed(session: Session, file: File, *, owner: str, key: str, request_hash: str) -> Upload:
    earlier = get_file_by_idempotency_key(session, owner=owner, key=key)
    if earlier is None:
        try:
            # A savepoint, so losing the race on UNIQUE(owner, idempotency_key) to an identical
            # upload leaves the request's session usable for reading the winner.
            with session.begin_nested():
                session.add(file)
                session.flush()
            return Upload(file, replayed=False)
        except IntegrityError:
            earlier = get_file_by_idempotency_key(session, owner=owner, key=key)
            if earlier is None:
                raise
    return _replay(earlier, key=key, request_hash=request_hash)


def delete_file(session: Session, *, owner: str, file_id: str, settings: Settings) -> File:
    """Delete the row now and the bytes once that commits; refused while a job still needs it."""
    file = get_file(session, owner=owner, file_id=file_id)
    if used_by_unfinished_job(session, file.id):
        raise Conflict(
            f"File {file.id} is the dataset of a job that has not finished; cancel the job or "
            "wait for it, then delete the file.",
            code="file_in_use",
        )
    session.delete(file)
    session.flush()
    store = artifact_store(settings)
    after_commit(session, lambda: store.delete(file.path))
    return file


def read_file(file: File, settings: Settings) -> Iterator[bytes]:
    """The stored bytes of a file, in chunks."""
    store = artifact_store(settings)

    def chunks() -> Iterator[bytes]:
        with store.open(file.path) as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    return chunks()
