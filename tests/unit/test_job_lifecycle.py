"""Claims, transitions, events and the reaper against a real (fresh) SQL database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.db import unit_of_work, utcnow
from app.jobs.events import append_event, list_events
from app.jobs.models import Job, JobStatus
from app.jobs.transitions import IllegalTransition, require_transition, transition
from app.settings import get_settings


def make_job(status: JobStatus = JobStatus.QUEUED, **values: object) -> str:
    from app.ids import new_id

    job_id = new_id("ftjob")
    row: dict[str, object] = {
        "owner": "local",
        "base_model": "tiny",
        "dataset_url": "file-x",
        "hyperparameters": {},
        "lora": {},
        "attempt": 0,
        "event_seq": 0,
        "created_at": utcnow(),
        "enqueued_at": utcnow(),
    }
    with unit_of_work() as session:
        session.add(Job(id=job_id, status=status, **{**row, **values}))
    return job_id


def job(job_id: str) -> Job:
    with unit_of_work() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def test_a_second_delivery_claims_nothing(fresh_db) -> None:
    from worker.runner import claim

    job_id = make_job()
    first = claim(job_id, "host:1")
    second = claim(job_id, "host:2")
    assert first is not None and first.status is JobStatus.VALIDATING
    assert first.attempt == 1 and first.worker == "host:1" and first.heartbeat_at is not None
    assert second is None
    assert job(job_id).worker == "host:1"


def test_claim_skips_cancelled_and_missing_jobs(fresh_db) -> None:
    from worker.runner import claim

    cancelled = make_job(JobStatus.CANCELLED)
    assert claim(cancelled, "host:1") is None
    assert claim("ftjob-missing", "host:1") is None


@pytest.mark.parametrize(
    ("start", "target", "allowed"),
    [
        (JobStatus.QUEUED, JobStatus.RUNNING, False),
        (JobStatus.QUEUED, JobStatus.SUCCEEDED, False),
        (JobStatus.VALIDATING, JobStatus.RUNNING, True),
        (JobStatus.RUNNING, JobStatus.SUCCEEDED, True),
        (JobStatus.SUCCEEDED, JobStatus.FAILED, False),
        (JobStatus.SUCCEEDED, JobStatus.CANCELLED, False),
        (JobStatus.FAILED, JobStatus.QUEUED, False),
        (JobStatus.CANCELLED, JobStatus.RUNNING, False),
        (JobStatus.RUNNING, JobStatus.QUEUED, True),
    ],
)
def test_transitions_follow_the_lifecycle(fresh_db, start, target, allowed) -> None:
    job_id = make_job(start)
    with unit_of_work() as session:
        changed = transition(session, job_id, target, "test")
    assert changed is allowed
    assert job(job_id).status is (target if allowed else start)
    if allowed and target.is_terminal:
        assert job(job_id).finished_at is not None


def test_illegal_transition_is_a_conflict(fresh_db) -> None:
    job_id = make_job(JobStatus.SUCCEEDED)
    with unit_of_work() as session, pytest.raises(IllegalTransition) as raised:
        require_transition(session, session.get(Job, job_id), JobStatus.CANCELLED, "no")
    assert raised.value.status_code == 409
    assert "succeeded" in raised.value.message


def test_events_are_numbered_per_job(fresh_db) -> None:
    first, second = make_job(), make_job()
    with unit_of_work() as session:
        assert [append_event(session, first, "t", f"m{i}") for i in range(3)] == [1, 2, 3]
        assert append_event(session, second, "t", "other") == 1
    with unit_of_work() as session:
        events = list_events(session, first, after=1, limit=10)
    assert [(event.seq, event.message) for event in events] == [(2, "m1"), (3, "m2")]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids the reaper puts back on the queue (captured instead of sent to the broker)."""
    messages: list[str] = []
    monkeypatch.setattr(
        "worker.scheduler.enqueue_job", lambda job_id, queue: messages.append(job_id)
    )
    return messages


def test_reaper_requeues_a_job_whose_worker_went_silent(fresh_db, sent) -> None:
    from worker.scheduler import reap_lost_jobs

    settings = get_settings()
    stale = utcnow() - timedelta(seconds=settings.stale_job_seconds + 5)
    lost = make_job(JobStatus.RUNNING, attempt=1, worker="dead:1", heartbeat_at=stale)
    alive = make_job(JobStatus.RUNNING, attempt=1, worker="live:1", heartbeat_at=utcnow())
    outcome = reap_lost_jobs(settings)
    assert outcome["requeued"] == [lost]
    assert sent == [lost]
    assert job(lost).status is JobStatus.QUEUED and job(lost).worker is None
    assert job(alive).status is JobStatus.RUNNING
    with unit_of_work() as session:
        assert list_events(session, lost, after=0, limit=5)[-1].type == "job.requeued"


def test_reaper_fails_a_job_after_max_attempts(fresh_db, sent) -> None:
    from worker.scheduler import reap_lost_jobs

    settings = get_settings()
    stale = utcnow() - timedelta(seconds=settings.stale_job_seconds + 5)
    lost = make_job(
        JobStatus.RUNNING, attempt=settings.max_attempts, worker="dead:1", heartbeat_at=stale
    )
    assert reap_lost_jobs(settings)["failed"] == [lost]
    failed = job(lost)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error["code"] == "worker_lost"
    assert "TUNESERVE_MAX_ATTEMPTS" in failed.error["message"]
    assert sent == []


def test_reaper_cancels_a_silent_job_that_was_asked_to_cancel(fresh_db, sent) -> None:
    from worker.scheduler import reap_lost_jobs

    stale = utcnow() - timedelta(hours=1)
    lost = make_job(JobStatus.VALIDATING, attempt=1, heartbeat_at=stale, cancel_requested_at=stale)
    assert reap_lost_jobs(get_settings())["cancelled"] == [lost]
    assert job(lost).status is JobStatus.CANCELLED and sent == []


def test_reaper_resends_a_queued_job_whose_message_was_lost(fresh_db, sent) -> None:
    from worker.scheduler import reap_lost_jobs

    settings = get_settings()
    old = utcnow() - timedelta(seconds=settings.requeue_queued_after_seconds + 5)
    waiting, fresh = make_job(enqueued_at=old), make_job()
    assert reap_lost_jobs(settings)["resent"] == [waiting]
    assert sent == [waiting]
    with unit_of_work() as session:
        resent_at = session.scalar(select(Job.enqueued_at).where(Job.id == waiting))
    assert resent_at is not None and resent_at > old
    assert job(fresh).status is JobStatus.QUEUED


def test_a_worker_that_lost_its_claim_cannot_end_the_new_attempt(fresh_db) -> None:
    from worker.runner import _fail, claim

    job_id = make_job()
    assert claim(job_id, "old:1") is not None
    with unit_of_work() as session:  # the reaper gave up on old:1
        assert transition(session, job_id, JobStatus.QUEUED, "requeued", values={"worker": None})
    assert claim(job_id, "new:2") is not None
    _fail(job_id, "old:1", "training_failed", "late failure from the old attempt")
    current = job(job_id)
    assert current.status is JobStatus.VALIDATING
    assert current.worker == "new:2" and current.attempt == 2 and current.error is None
