"""Queue a job's webhook in the transaction that ends the job (the outbox), and send due ones.

`record_terminal` runs inside `app.jobs.transitions.transition`: the delivery row commits with
the status change or not at all. `deliver_due` runs in the scheduler: it takes due rows (a lease
on `next_attempt_at`, so two schedulers don't send the same attempt), POSTs each through the
SSRF guard, and records the outcome on the row and in the job's event log. Delivery is at least
once: receivers dedupe on the `Tuneserve-Delivery` header.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import __version__
from app.db import unit_of_work, utcnow
from app.ids import new_id
from app.jobs.events import append_event
from app.jobs.models import Job
from app.outbound import OutboundError, post_guarded
from app.settings import Settings
from app.webhooks.models import DeliveryStatus, WebhookDelivery
from app.webhooks.signing import SIGNATURE_HEADER, sign

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 3600.0


def record_terminal(session: Session, job_id: str, event: str) -> None:
    """If the job has a webhook, queue `event` with the job as it is now (in this transaction)."""
    from app.jobs.service import views  # the job's public view; jobs.service imports transitions

    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.webhook_url:
        return
    delivery_id = new_id("whdel")
    created = utcnow()
    payload = {
        "id": delivery_id,
        "object": "event",
        "type": event,
        "created_at": int(created.timestamp()),
        "data": views(session, [job])[0].model_dump(mode="json"),
    }
    session.add(
        WebhookDelivery(
            id=delivery_id,
            job_id=job_id,
            event=event,
            url=job.webhook_url,
            payload=payload,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=created,
            created_at=created,
        )
    )
    session.flush()


def backoff_seconds(settings: Settings, failed_attempts: int) -> float:
    """Wait after the n-th failed attempt: retry_seconds, then doubling, at most an hour."""
    return float(
        min(settings.webhook_retry_seconds * 2 ** (failed_attempts - 1), MAX_BACKOFF_SECONDS)
    )


@dataclass(frozen=True)
class _Due:
    id: str
    job_id: str
    event: str
    url: str
    payload: dict[str, Any]
    attempts: int
    secret: str


def _take_due(settings: Settings, limit: int) -> list[_Due]:
    now = utcnow()
    lease = now + timedelta(seconds=settings.webhook_timeout_seconds * 3)
    taken = []
    with unit_of_work() as session:
        rows = session.execute(
            select(WebhookDelivery, Job.webhook_secret)
            .join(Job, Job.id == WebhookDelivery.job_id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
        for delivery, secret in rows:
            leased = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery.id,
                    WebhookDelivery.next_attempt_at == delivery.next_attempt_at,
                )
                .values(next_attempt_at=lease)
                .execution_options(synchronize_session=False)
            )
            if leased.rowcount == 1:  # type: ignore[attr-defined]
                taken.append(
                    _Due(
                        id=delivery.id,
                        job_id=delivery.job_id,
                        event=delivery.event,
                        url=delivery.url,
                        payload=delivery.payload,
                        attempts=delivery.attempts,
                        secret=secret or "",
                    )
                )
    return taken


def _attempt(due: _Due, settings: Settings) -> tuple[int | None, str | None]:
    """(HTTP status, None) when answered 2xx; (status or None, why) otherwise."""
    body = json.dumps(due.payload, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"tuneserve-webhooks/{__version__}",
        "Tuneserve-Event": due.event,
        "Tuneserve-Delivery": due.id,
        SIGNATURE_HEADER: sign(due.secret, body),
    }
    try:
        answer = post_guarded(
            due.url,
            body,
            allow_private=settings.allow_private_networks,
            timeout=settings.webhook_timeout_seconds,
            headers=headers,
        )
    except OutboundError as exc:
        return None, f"refused: {exc}"
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if 200 <= answer.status_code < 300:
        return answer.status_code, None
    return answer.status_code, f"answered HTTP {answer.status_code}: {answer.excerpt[:200]}"


def _record(due: _Due, settings: Settings, status_code: int | None, error: str | None) -> None:
    attempts = due.attempts + 1
    now = utcnow()
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_status_code": status_code,
        "last_error": error,
    }
    if error is None:
        values.update(status=DeliveryStatus.DELIVERED, delivered_at=now)
        kind, level = "webhook.delivered", "info"
        message = f"Webhook {due.event} delivered to {due.url} (HTTP {status_code})."
    elif attempts >= settings.webhook_max_attempts:
        values["status"] = DeliveryStatus.FAILED
        kind, level = "webhook.failed", "error"
        message = (
            f"Webhook {due.event} to {due.url} given up after {attempts} attempts: {error}. "
            "Check that the URL accepts POST and answers 2xx."
        )
    else:
        wait = backoff_seconds(settings, attempts)
        values["next_attempt_at"] = now + timedelta(seconds=wait)
        kind, level = "webhook.retrying", "warning"
        message = (
            f"Webhook {due.event} to {due.url}, attempt {attempts}: {error}. "
            f"Trying again in {wait:g} s."
        )
    with unit_of_work() as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == due.id).values(**values)
        )
        append_event(
            session,
            due.job_id,
            kind,
            message,
            level=level,
            data={"delivery": due.id, "attempt": attempts, "status_code": status_code},
        )


def deliver_due(settings: Settings, limit: int = 50) -> list[str]:
    """Send every webhook due now, once; the ids of those delivered."""
    delivered = []
    for due in _take_due(settings, limit):
        status_code, error = _attempt(due, settings)
        _record(due, settings, status_code, error)
        if error is None:
            delivered.append(due.id)
        else:
            logger.warning("webhook %s for job %s: %s", due.id, due.job_id, error)
    return delivered
