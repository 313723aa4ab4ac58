"""Idempotency-Key on POST /jobs and POST /files, and a job's live event stream, on the real
api + Celery worker with the tiny model."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, local_key_headers

# Passes the submit-time URL checks; a job on it fails fast (nothing listens), with no training.
UNREACHABLE = "http://tuneserve-test-unreachable.invalid/train.jsonl"
FAST = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 128}
# No worker of the test service listens to training-rocm: a job sent there stays queued.
NEVER_CLAIMED = {"accelerator": "rocm"}


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def post_job(service: Service, body: dict[str, Any], key: str) -> httpx.Response:
    return service.client.post("/jobs", json=body, headers={"Idempotency-Key": key})


def post_file(service: Service, content: bytes, key: str) -> httpx.Response:
    return service.client.post(
        "/files", files={"file": ("train.jsonl", content)}, headers={"Idempotency-Key": key}
    )


def jobs_tagged(service: Service, tag: str) -> list[str]:
    listed = service.client.get("/jobs", params={"limit": 100}).json()["data"]
    return [job["id"] for job in listed if job["metadata"] == {"test": tag}]


def rows_with_key(table: str, key: str) -> int:
    from sqlalchemy import func, select

    from app.db import unit_of_work
    from app.files.models import File
    from app.jobs.models import Job

    model = {"jobs": Job, "files": File}[table]
    with unit_of_work() as session:
        return session.scalar(
            select(func.count()).select_from(model).where(model.idempotency_key == key)
        )


def stored_uploads() -> set[str] | None:
    """Names of the upload artifacts, where the artifact store is a local directory."""
    from app.settings import get_settings
    from app.storage import artifact_store

    files = artifact_store(get_settings()).local_path("files")
    return None if files is None else {path.name for path in Path(files).glob("file-*")}


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "detail"}
    assert error["code"] == code
    return str(error["message"])


# Idempotency-Key


def test_retry_with_the_same_key_returns_the_same_job(service: Service, tiny_model: str) -> None:
    key = new_key()
    body = {"base_model": tiny_model, "dataset_url": UNREACHABLE, "metadata": {"test": key}}
    first = post_job(service, body, key)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    job_id = first.json()["id"]

    # The same request with its defaults spelled out is the same request.
    spelled = {"n_epochs": "auto", "warmup_ratio": 0.03}
    again = post_job(service, {**body, "hyperparameters": spelled}, key)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()

    assert jobs_tagged(service, key) == [job_id]
    assert rows_with_key("jobs", key) == 1
    job = service.wait_for(job_id, timeout=60)
    assert job["status"] == "failed"
    types = [event["type"] for event in service.events(job_id)]
    assert types.count("job.created") == 1
    assert types.count("job.claimed") == 1

    # A late retry gets the job as it is now.
    late = post_job(service, body, key)
    assert late.status_code == 200
    assert late.json()["id"] == job_id and late.json()["status"] == "failed"


def test_same_key_on_a_different_request_is_a_conflict(service: Service, tiny_model: str) -> None:
    key = new_key()
    body = {"base_model": tiny_model, "dataset_url": UNREACHABLE, "metadata": {"test": key}}
    job_id = post_job(service, body, key).json()["id"]
    other = post_job(service, {**body, "suffix": "other"}, key)
    message = assert_error(other, 409, "idempotency_key_reused")
    assert key in message and "different request" in message and "new key" in message
    assert other.json()["error"]["detail"]["job_id"] == job_id
    assert jobs_tagged(service, key) == [job_id]
    # The key belongs to one owner's one request; another key is a new job.
    assert post_job(service, body, new_key()).status_code == 201


def test_identical_requests_racing_make_one_job(service: Service, tiny_model: str) -> None:
    key = new_key()
    body = {"base_model": tiny_model, "dataset_url": UNREACHABLE, "metadata": {"test": key}}
    start = threading.Barrier(10)

    def send(_: int) -> httpx.Response:
        start.wait()
        return httpx.post(
            f"{service.url}/jobs",
            json=body,
            headers={"Idempotency-Key": key, **local_key_headers()},
            timeout=60,
        )

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, range(10)))
    assert sorted(answer.status_code for answer in answers) == [200] * 9 + [201], [
        answer.text for answer in answers
    ]
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 1
    assert jobs_tagged(service, key) == list(ids)
    assert rows_with_key("jobs", key) == 1
    assert all(
        answer.headers.get("Idempotent-Replayed") == "true"
        for answer in answers
        if answer.status_code == 200
    )


def test_retried_upload_returns_the_same_file(service: Service) -> None:
    key = new_key()
    content = jsonl(arithmetic_rows(4))
    first = post_file(service, content, key)
    assert first.status_code == 201, first.text
    stored = stored_uploads()

    again = post_file(service, content, key)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()

    different = post_file(service, jsonl(arithmetic_rows(5)), key)
    message = assert_error(different, 409, "idempotency_key_reused")
    assert "different request" in message and "new key" in message
    # Neither the retry's bytes nor the refused ones were kept.
    assert stored_uploads() == stored
    assert rows_with_key("files", key) == 1


@pytest.mark.parametrize(
    "key",
    ["", "k" * 300, "clé".encode(), "tab\there"],
    ids=["empty", "300-chars", "non-ascii", "control-char"],
)
@pytest.mark.parametrize("path", ["/jobs", "/files"])
def test_bad_idempotency_key_is_refused(
    service: Service, tiny_model: str, path: str, key: str | bytes
) -> None:
    headers = {"Idempotency-Key": key}
    if path == "/jobs":
        body = {"base_model": tiny_model, "dataset_url": UNREACHABLE}
        response = service.client.post(path, json=body, headers=headers)
    else:
        response = service.client.post(path, files={"file": ("a.jsonl", b"{}")}, headers=headers)
    message = assert_error(response, 400, "invalid_idempotency_key")
    assert "Idempotency-Key" in message and "1 to 200 printable ASCII" in message


def test_longest_idempotency_key_is_accepted(service: Service) -> None:
    key = new_key().ljust(200, "-")
    assert post_file(service, b'{"text": "x"}\n', key).status_code == 201
    assert post_file(service, b'{"text": "x"}\n', key).status_code == 200


# GET /jobs/{id}/events/stream


def read_stream(service: Service, job_id: str, **options: Any) -> list[dict[str, Any]]:
    """The messages of the stream, read until the server ends it."""
    with service.client.stream("GET", f"/jobs/{job_id}/events/stream", **options) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_messages(response.iter_lines()))


def sse_messages(lines: Any) -> Any:
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    **json.loads(fields["data"]),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_stream_follows_a_job_to_its_end(service: Service, tiny_model: str) -> None:
    file_id = service.upload("stream.jsonl", jsonl(arithmetic_rows(8)))
    job = service.create_job(base_model=tiny_model, dataset_url=file_id, hyperparameters=FAST)
    messages = read_stream(service, job["id"])

    logged = service.events(job["id"])
    assert logged[-1]["type"] == "job.succeeded"
    assert [message["event"] for message in messages][-1] == "job.succeeded"
    assert [message["id"] for message in messages] == list(range(1, len(logged) + 1))
    assert all(message["seq"] == message["id"] for message in messages)
    assert all(message["type"] == message["event"] for message in messages)
    assert [strip_sse(message) for message in messages] == logged

    # Resuming sends only what came after, and the stream of an ended job still ends.
    resumed = read_stream(service, job["id"], headers={"Last-Event-ID": "3"})
    assert [strip_sse(message) for message in resumed] == logged[3:]
    after = read_stream(service, job["id"], params={"after": 5})
    assert [strip_sse(message) for message in after] == logged[5:]
    wins = read_stream(service, job["id"], params={"after": 1}, headers={"Last-Event-ID": "4"})
    assert [message["id"] for message in wins] == [event["seq"] for event in logged[4:]]
    assert read_stream(service, job["id"], headers={"Last-Event-ID": str(len(logged))}) == []


def strip_sse(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key not in ("id", "event")}


def test_stream_delivers_events_as_they_happen(service: Service, tiny_model: str) -> None:
    job = service.create_job(base_model=tiny_model, dataset_url=UNREACHABLE, **NEVER_CLAIMED)
    path = f"/jobs/{job['id']}/events/stream"
    with service.client.stream("GET", path) as response:
        messages = sse_messages(response.iter_lines())
        assert next(messages)["event"] == "job.created"
        # The job waits in its queue; the stream is open when it is cancelled.
        assert service.client.post(f"/jobs/{job['id']}/cancel").status_code == 200
        cancelled = next(messages)
        assert (cancelled["event"], cancelled["id"]) == ("job.cancelled", 2)
        assert list(messages) == []  # the server ended the stream


def test_stream_of_unknown_job_is_404(service: Service) -> None:
    response = service.client.get("/jobs/ftjob-nope/events/stream")
    assert response.headers["content-type"].startswith("application/json")
    message = assert_error(response, 404, "job_not_found")
    assert "ftjob-nope" in message


def test_quiet_stream_keeps_alive_and_stops_when_the_reader_leaves(
    service: Service, tiny_model: str
) -> None:
    from app.jobs.schemas import JobEventView
    from app.jobs.service import follow_events

    job = service.create_job(base_model=tiny_model, dataset_url=UNREACHABLE, **NEVER_CLAIMED)

    async def follow() -> list[JobEventView | None]:
        items: list[JobEventView | None] = []

        async def disconnected() -> bool:
            return items.count(None) >= 2

        async for item in follow_events(
            job["id"],
            after=0,
            disconnected=disconnected,
            poll_seconds=0.05,
            keepalive_seconds=0.3,
        ):
            items.append(item)
        return items

    items = asyncio.run(follow())
    assert [item.type if item else None for item in items] == ["job.created", None, None]
    service.client.post(f"/jobs/{job['id']}/cancel")
