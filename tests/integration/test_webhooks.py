"""Webhooks through real processes: the api stores the job's webhook, the scheduler process
sends it when the job ends, retrying until the receiver accepts.

The session's service refuses private addresses (as a default install does), so the delivery
test runs its own api and scheduler, with TUNESERVE_ALLOW_PRIVATE_NETWORKS=true, on a data
directory of its own, to reach a receiver on loopback. No worker is needed: a job cancelled
while queued ends, and so is sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.webhooks.signing import verify
from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import (
    Service,
    auth,
    create_api_key,
    free_port,
    start,
    stop,
    wait_until_healthy,
)
from tests.unit.test_webhooks import Receiver


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """api + scheduler allowed to reach loopback, with fast webhook retries."""
    from app.cli.processes import api_command, scheduler_command

    data = tmp_path_factory.mktemp("webhook-stack")
    env = {
        "TUNESERVE_DATA_DIR": str(data),
        "TUNESERVE_DATABASE_URL": f"sqlite:///{data / 'tuneserve.sqlite'}",
        "TUNESERVE_BROKER_URL": f"sqla+sqlite:///{data / 'broker.sqlite'}",
        "TUNESERVE_ALLOW_PRIVATE_NETWORKS": "true",
        "TUNESERVE_WEBHOOK_RETRY_SECONDS": "0.3",
        "TUNESERVE_WEBHOOK_POLL_SECONDS": "0.2",
        "TUNESERVE_WEBHOOK_MAX_ATTEMPTS": "3",
    }
    subprocess.run(
        [sys.executable, "-m", "app.cli.main", "db", "upgrade"],
        env={**__import__("os").environ, **env},
        check=True,
        capture_output=True,
    )
    key = create_api_key("webhooks", database_url=env["TUNESERVE_DATABASE_URL"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = Path(data)
    processes = [
        start("webhook-api", api_command("127.0.0.1", port), logs, env),
        start("webhook-scheduler", scheduler_command(), logs, env),
    ]
    try:
        wait_until_healthy(url, processes[0])
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as client:
            yield client
    finally:
        for process in processes:
            stop(process)


def _queued_job(client: httpx.Client, **webhook: Any) -> dict[str, Any]:
    upload = client.post("/files", files={"file": ("t.jsonl", jsonl(arithmetic_rows(4)))})
    assert upload.status_code == 201, upload.text
    created = client.post("/jobs", json={"dataset_url": upload.json()["id"], **webhook})
    assert created.status_code == 201, created.text
    return dict(created.json())


def _wait(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_scheduler_delivers_a_signed_webhook_after_retries(
    private_stack: httpx.Client,
) -> None:
    receiver = Receiver([500])
    try:
        created = _queued_job(private_stack, webhook_url=receiver.url)
        secret = created["webhook"]["secret"]
        assert secret.startswith("whsec_")
        # The secret is shown once: in the answer to the request that made the job.
        again = private_stack.get(f"/jobs/{created['id']}").json()
        assert again["webhook"] == {"url": receiver.url, "secret": None, "deliveries": []}

        assert private_stack.post(f"/jobs/{created['id']}/cancel").status_code == 200
        _wait(lambda: len(receiver.received) == 2)
    finally:
        receiver.server.shutdown()
    first, second = receiver.received
    assert first["headers"]["Tuneserve-Delivery"] == second["headers"]["Tuneserve-Delivery"]
    assert verify(secret, second["body"], second["headers"]["Tuneserve-Signature"])
    payload = json.loads(second["body"])
    assert payload["type"] == "job.cancelled"
    assert payload["data"]["id"] == created["id"] and payload["data"]["status"] == "cancelled"

    def delivered() -> bool:
        job = private_stack.get(f"/jobs/{created['id']}").json()
        return bool(job["webhook"]["deliveries"][0]["status"] == "delivered")

    _wait(delivered)
    job = private_stack.get(f"/jobs/{created['id']}").json()
    delivery = job["webhook"]["deliveries"][0]
    assert delivery["attempts"] == 2 and delivery["last_status_code"] == 200
    events = private_stack.get(f"/jobs/{created['id']}/events").json()["data"]
    assert [e["type"] for e in events][-2:] == ["webhook.retrying", "webhook.delivered"]


def test_a_secret_of_your_own_signs_and_a_dead_receiver_is_given_up(
    private_stack: httpx.Client,
) -> None:
    receiver = Receiver([500, 500, 500])
    secret = "my-own-webhook-secret-42"
    try:
        created = _queued_job(private_stack, webhook_url=receiver.url, webhook_secret=secret)
        assert created["webhook"]["secret"] == secret
        private_stack.post(f"/jobs/{created['id']}/cancel")
        _wait(lambda: len(receiver.received) == 3)
    finally:
        receiver.server.shutdown()
    assert all(
        verify(secret, r["body"], r["headers"]["Tuneserve-Signature"]) for r in receiver.received
    )

    def given_up() -> bool:
        job = private_stack.get(f"/jobs/{created['id']}").json()
        return bool(job["webhook"]["deliveries"][0]["status"] == "failed")

    _wait(given_up)
    events = private_stack.get(f"/jobs/{created['id']}/events").json()["data"]
    assert events[-1]["type"] == "webhook.failed"
    assert "given up after 3 attempts" in events[-1]["message"]


@pytest.mark.parametrize(
    ("webhook", "status", "code"),
    [
        ({"webhook_url": "http://127.0.0.1:9/hook"}, 400, "invalid_webhook_url"),
        ({"webhook_url": "http://localhost/hook"}, 400, "invalid_webhook_url"),
        ({"webhook_url": "ftp://example.com/hook"}, 422, None),
        ({"webhook_url": "https://example.com/h", "webhook_secret": "short"}, 422, None),
    ],
)
def test_bad_webhooks_are_refused_when_the_job_is_made(
    service: Service, webhook: dict[str, str], status: int, code: str | None
) -> None:
    file_id = service.upload("t.jsonl", jsonl(arithmetic_rows(4)))
    answer = service.client.post("/jobs", json={"dataset_url": file_id, **webhook})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert "webhook_" in error["message"]
    if code:
        assert error["code"] == code
