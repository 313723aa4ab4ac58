"""Every SQL query of the adapters domain."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.db import after_commit, unit_of_work, utcnow
from app.errors import Conflict, NotFound
from app.exports.models import AdapterExport
from app.jobs.models import Job, JobCheckpoint
from app.pages import newest_first
from app.settings import Settings
from app.storage import artifact_store

logger = logging.getLogger(__name__)


def get_adapter(session: Session, *, owner: str, adapter_id: str) -> Adapter:
    adapter = session.get(Adapter, adapter_id)
    if adapter is None or adapter.owner != owner:
        raise NotFound(
            f"No adapter {adapter_id!r}. GET /adapters lists yours.", code="adapter_not_found"
        )
    return adapter


@dataclass(frozen=True)
class ServableAdapter:
    """LoRA weights generation can use: a trained adapter or a job's checkpoint."""

    id: str
    base_model: str
    path: str  # key in the artifact store
    created_at: datetime | None = None


CHECKPOINT_NAME = re.compile(r"^ft:.*:(?P<job>ftjob-[0-9a-f]+):ckpt-step-(?P<step>[0-9]{1,9})$")


def resolve_adapter(session: Session, *, owner: str, reference: str) -> ServableAdapter:
    """An adapter by its id, by the id of the job that trained it, by its name (ft:…), or a
    checkpoint by its id (ftckpt-…) or name (ft:…:ckpt-step-N)."""
    named = CHECKPOINT_NAME.match(reference)
    if reference.startswith("ftckpt-") or named:
        if named:
            checkpoint = session.scalar(
                select(JobCheckpoint).where(
                    JobCheckpoint.job_id == named["job"], JobCheckpoint.step == int(named["step"])
                )
            )
        else:
            checkpoint = session.get(JobCheckpoint, reference)
        job = session.get(Job, checkpoint.job_id) if checkpoint else None
        if checkpoint is None or job is None or job.owner != owner:
            raise NotFound(
                f"No checkpoint {reference!r}. GET /jobs/{{id}}/checkpoints lists a job's.",
                code="checkpoint_not_found",
            )
        return ServableAdapter(
            id=checkpoint.id,
            base_model=job.base_model,
            path=checkpoint.path,
            created_at=checkpoint.created_at,
        )
    return _servable(_find_adapter(session, owner=owner, reference=reference))


def _servable(adapter: Adapter) -> ServableAdapter:
    return ServableAdapter(
        id=adapter.id,
        base_model=adapter.base_model,
        path=adapter.path,
        created_at=adapter.created_at,
    )


def _find_adapter(session: Session, *, owner: str, reference: str) -> Adapter:
    if reference.startswith("ftjob-"):
        job = session.get(Job, reference)
        if job is None or job.owner != owner:
            raise NotFound(f"No job {reference!r}.", code="job_not_found")
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == reference))
        if adapter is None:
            raise Conflict(
                f"Job {reference} has no adapter: it is {job.status.value}. Adapters exist once "
                "a job has succeeded.",
                code="adapter_not_ready",
            )
        return adapter
    if reference.startswith("ft:"):
        adapter = session.scalar(
            select(Adapter).where(Adapter.name == reference, Adapter.owner == owner)
        )
        if adapter is None:
            raise NotFound(f"No adapter named {reference!r}.", code="adapter_not_found")
        return adapter
    return get_adapter(session, owner=owner, adapter_id=reference)


def list_adapters(
    session: Session, *, owner: str, limit: int, after: str | None
) -> tuple[list[Adapter], bool]:
    query = select(Adapter).where(Adapter.owner == owner)
    return newest_first(
        session, query, Adapter, owner=owner, after=after, limit=limit, noun="adapter"
    )


def all_adapters(session: Session, *, owner: str) -> list[Adapter]:
    """Every adapter of the owner, newest first."""
    query = select(Adapter).where(Adapter.owner == owner).order_by(Adapter.created_at.desc())
    return list(session.scalars(query))


def delete_adapter(session: Session, *, owner: str, adapter_id: str, settings: Settings) -> Adapter:
    """Delete the owner's adapter and its exports: the rows now, their files once that
    commits."""
    adapter = get_adapter(session, owner=owner, adapter_id=adapter_id)
    exported = select(AdapterExport.path).where(AdapterExport.adapter_id == adapter.id)
    paths = [adapter.path, *session.scalars(exported)]
    session.execute(delete(AdapterExport).where(AdapterExport.adapter_id == adapter.id))
    session.delete(adapter)
    session.flush()
    store = artifact_store(settings)

    def delete_files() -> None:
        for path in paths:
            store.delete(path)

    after_commit(session, delete_files)
    return adapter


def record_adapter_use(adapter_id: str) -> None:
    """Count one generation with the adapter and stamp its last use, in a short transaction of
    its own. A checkpoint id (ftckpt-…) or an unknown id changes nothing. Best effort: a
    database error is logged, never raised, so it cannot fail a generation that succeeded."""
    if adapter_id.startswith("ftckpt-"):
        return
    try:
        with unit_of_work() as session:
            session.execute(
                update(Adapter)
                .where(Adapter.id == adapter_id)
                .values(request_count=Adapter.request_count + 1, last_used_at=utcnow())
            )
    except SQLAlchemyError:
        logger.warning("could not record a use of adapter %s", adapter_id, exc_info=True)
