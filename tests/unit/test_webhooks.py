"""Webhook signatures, the retry schedule, and the outbox against real SQL and a real HTTP
receiver on loopback (in-process: the scheduler's code, without its process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db import unit_of_work, utcnow
from app.jobs.models import JobEvent, JobStatus
from app.jobs.transitions import transition
from app.settings import Settings, get_settings
from app.webhooks.models import DeliveryStatus, WebhookDelivery
from app.webhooks.outbox import backoff_seconds, deliver_due
from app.webhooks.signing import sign, signature, verify
from tests.jobs_in_sql import insert_job

SECRET = "whsec_0123456789abcdef0123"


def test_a_signature_verifies_and_a_changed_body_does_not() -> None:
    body = b'{"type":"job.succeeded"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    assert header == f"t=1700000000,v1={signature(SECRET, 1_700_000_000, body)}"
    assert verify(SECRET, body, header, now=1_700_000_010)
    assert not verify(SECRET, body + b" ", header, now=1_700_000_010)
    assert not verify("whsec_another_secret_123", body, header, now=1_700_000_010)
    assert not verify(SECRET, body, header, now=1_700_000_000 + 301)  # a replay, too old
    assert not verify(SECRET, body, "garbage", now=1_700_000_000)


def test_retries_back_off_doubling_up_to_an_hour() -> None:
    settings = Settings(webhook_retry_seconds=10)
    assert [backoff_seconds(settings, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_seconds(settings, 20) == 3600


class Receiver:
    """An HTTP server on loopback answering POSTs with the next status of `statuses`."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"nope" if status >= 300 else b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500, 503])
    yield server
    server.server.shutdown()


def _ended_job(url: str) -> str:
    """A job with a webhook, cancelled while queued (the transition queues the delivery)."""
    job_id = insert_job(JobStatus.QUEUED, "webhook-tests", webhook_url=url, webhook_secret=SECRET)
    with unit_of_work() as session:
        assert transition(session, job_id, JobStatus.CANCELLED, "Cancelled by the test.")
    return job_id


def _delivery(job_id: str) -> WebhookDelivery:
    with unit_of_work() as session:
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).one()
        session.expunge(delivery)
        return delivery


def _make_due(job_id: str) -> None:
    with unit_of_work() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def _events(job_id: str) -> list[JobEvent]:
    with unit_of_work() as session:
        events = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by("seq"))
        )
        session.expunge_all()
        return events


def test_a_failing_receiver_is_retried_until_it_accepts(receiver: Receiver) -> None:
    settings = get_settings().model_copy(update={"allow_private_networks": True})
    job_id = _ended_job(receiver.url)
    assert _delivery(job_id).status is DeliveryStatus.PENDING

    assert deliver_due(settings) == []  # 500
    first = _delivery(job_id)
    assert first.attempts == 1 and first.last_status_code == 500
    assert first.next_attempt_at > utcnow()  # backing off: nothing due now
    assert deliver_due(settings) == []
    assert len(receiver.received) == 1

    _make_due(job_id)
    deliver_due(settings)  # 503
    _make_due(job_id)
    assert deliver_due(settings) == [first.id]  # 200
    done = _delivery(job_id)
    assert done.status is DeliveryStatus.DELIVERED and done.attempts == 3
    assert done.delivered_at is not None

    # Every attempt carries the same event and delivery id, signed with the job's secret.
    for request in receiver.received:
        headers = request["headers"]
        assert headers["Tuneserve-Event"] == "job.cancelled"
        assert headers["Tuneserve-Delivery"] == first.id
        assert verify(SECRET, request["body"], headers["Tuneserve-Signature"])
    payload = json.loads(receiver.received[-1]["body"])
    assert payload["type"] == "job.cancelled" and payload["id"] == first.id
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "cancelled"
    assert payload["data"]["webhook"]["secret"] is None  # never sent out again

    types = [event.type for event in _events(job_id)]
    assert types[-3:] == ["webhook.retrying", "webhook.retrying", "webhook.delivered"]


def test_a_private_address_is_refused_without_the_operator_setting(
    receiver: Receiver,
) -> None:
    settings = get_settings().model_copy(
        update={"allow_private_networks": False, "webhook_max_attempts": 2}
    )
    job_id = _ended_job(receiver.url)
    deliver_due(settings)
    _make_due(job_id)
    deliver_due(settings)
    delivery = _delivery(job_id)
    assert delivery.status is DeliveryStatus.FAILED and delivery.attempts == 2
    assert "refused" in (delivery.last_error or "") and "loopback" in (delivery.last_error or "")
    assert receiver.received == []  # nothing reached the loopback receiver
    events = _events(job_id)
    assert events[-1].type == "webhook.failed" and events[-1].level == "error"


def test_a_job_without_webhook_queues_nothing() -> None:
    job_id = _ended_job("")
    with unit_of_work() as session:
        found = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert found == []
