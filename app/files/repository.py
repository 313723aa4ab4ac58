"""Every SQL query of the files domain."""

from __future__ import annotations

from sqlalchemy import exists, or_, select, tuple_
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.files.models import File
from app.jobs.models import TERMINAL_STATUSES, Job


def get_file(session: Session, *, owner: str, file_id: str) -> File:
    file = session.get(File, file_id)
    if file is None or file.owner != owner:
        raise NotFound(
            f"No file {file_id!r}. Upload it with POST /files; GET /files lists yours.",
            code="file_not_found",
        )
    return file


def get_file_by_idempotency_key(session: Session, *, owner: str, key: str) -> File | None:
    return session.scalar(select(File).where(File.owner == owner, File.idempotency_key == key))


def list_files(
    session: Session, *, owner: str, limit: int, after: str | None = None
) -> tuple[list[File], bool]:
    """Newest first; `after` is the id of the last file of the previous page."""
    query = select(File).where(File.owner == owner)
    if after is not None:
        cursor = session.get(File, after)
        if cursor is None or cursor.owner != owner:
            raise InvalidRequest(f"after: no file {after!r}", code="invalid_cursor")
        query = query.where(tuple_(File.created_at, File.id) < (cursor.created_at, cursor.id))
    query = query.order_by(File.created_at.desc(), File.id.desc()).limit(limit + 1)
    files = list(session.scalars(query))
    return files[:limit], len(files) > limit


def used_by_unfinished_job(session: Session, file_id: str) -> bool:
    uses = or_(Job.dataset_url == file_id, Job.validation_url == file_id)
    query = select(exists().where(uses, Job.status.not_in(TERMINAL_STATUSES)))
    return bool(session.scalar(query))
