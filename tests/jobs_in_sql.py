"""A job row written straight to the session's database, for tests of code that reads jobs."""

from __future__ import annotations

from typing import Any

from app.db import unit_of_work, utcnow
from app.ids import new_id
from app.jobs.models import Job, JobStatus
from app.migrate import upgrade_database


def insert_job(status: JobStatus, owner: str, **fields: Any) -> str:
    upgrade_database()
    job_id = new_id("ftjob")
    with unit_of_work() as session:
        defaults: dict[str, Any] = {
            "base_model": "tiny",
            "dataset_url": "file-x",
            "hyperparameters": {"seed": 0},
            "lora": {"r": 8},
            "attempt": 0,
            "event_seq": 0,
            "created_at": utcnow(),
        }
        session.add(Job(id=job_id, owner=owner, status=status, **{**defaults, **fields}))
    return job_id
