"""Every SQL query of the files domain."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.files.models import File
from app.jobs.models import TERMINAL_STATUSES, Job
from app.pages import newest_first


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
    session: Session,
    *,
    owner: str,
    limit: int,
    after: str | None = None,
    purpose: str | None = None,
    order: Literal["desc", "asc"] = "desc",
) -> tuple[list[File], bool]:
    """Newest first (or oldest, `order="asc"`); `after` is the id of the last file of the
    previous page."""
    query = select(File).where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return newest_first(
        session, query, File, owner=owner, after=after, limit=limit, noun="file", order=order
    )


def used_by_unfinished_job(session: Session, file_id: str) -> bool:
    uses = or_(Job.dataset_url == file_id, Job.validation_url == file_id)
    query = select(exists().where(uses, Job.status.not_in(TERMINAL_STATUSES)))
    return bool(session.scalar(query))
