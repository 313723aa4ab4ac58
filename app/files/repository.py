"""Every SQL query of the files domain."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.files.models import File


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


def list_files(session: Session, *, owner: str, limit: int) -> list[File]:
    query = select(File).where(File.owner == owner).order_by(File.created_at.desc()).limit(limit)
    return list(session.scalars(query))
