"""Every SQL query of adapter exports."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import NotFound
from app.exports.models import AdapterExport


def get_export(session: Session, *, owner: str, adapter_id: str, export_id: str) -> AdapterExport:
    export = session.get(AdapterExport, export_id)
    if export is None or export.owner != owner or export.adapter_id != adapter_id:
        raise NotFound(
            f"No export {export_id!r} of adapter {adapter_id!r}. GET /adapters/{adapter_id}/"
            "exports lists them.",
            code="export_not_found",
        )
    return export


def list_exports(session: Session, *, owner: str, adapter_id: str) -> list[AdapterExport]:
    return list(
        session.scalars(
            select(AdapterExport)
            .where(AdapterExport.owner == owner, AdapterExport.adapter_id == adapter_id)
            .order_by(AdapterExport.created_at.desc(), AdapterExport.id)
        )
    )


def reusable_export(
    session: Session, *, adapter_id: str, format: str, precision: str
) -> AdapterExport | None:
    """An export of the same adapter, format and precision that is made or being made."""
    return session.scalar(
        select(AdapterExport).where(
            AdapterExport.adapter_id == adapter_id,
            AdapterExport.format == format,
            AdapterExport.precision == precision,
            AdapterExport.status != "failed",
        )
    )


def start_export(session: Session, export_id: str) -> AdapterExport | None:
    """The export marked running (again, if a worker died making it); None if it is gone."""
    export = session.get(AdapterExport, export_id)
    if export is None or export.status in ("succeeded", "failed"):
        return None
    export.status, export.started_at, export.error = "running", utcnow(), None
    return export


def save_export_progress(session: Session, export_id: str, progress: dict[str, Any]) -> None:
    export = session.get(AdapterExport, export_id)
    if export is not None:
        export.progress = progress


def finish_export(
    session: Session,
    export_id: str,
    *,
    files: list[dict[str, Any]] | None = None,
    error: dict[str, Any] | None = None,
) -> None:
    export = session.get(AdapterExport, export_id)
    if export is None:
        return
    export.status = "failed" if error else "succeeded"
    export.files, export.error, export.finished_at = files, error, utcnow()
    if error is None:
        export.progress = None
