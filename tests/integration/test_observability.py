"""/metrics parses as Prometheus text and its counters move when a job runs and an adapter
generates; /readyz answers 200, and 503 when the broker is away; the worker's log lines are
JSON and carry the id of the job they were logged for."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.service import Service, auth, create_api_key, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client | TestClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        assert family.documentation, f"{family.name} has no HELP text"
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_counters_move_when_a_job_runs_and_its_adapter_generates(
    service: Service, tiny_model: str
) -> None:
    before = scrape(service.client)
    assert value(before, "tuneserve_database_up") == 1
    statuses = ("queued", "validating", "running", "succeeded", "failed", "cancelled")
    assert all(("tuneserve_jobs", frozenset({("status", s)})) in before for s in statuses)
    active_before = sum(
        value(before, "tuneserve_jobs", status=s) for s in ("queued", "validating", "running")
    )

    job = service.trained_job(tiny_model)
    usage = 0
    for stream in (False, False, True):  # a miss, then hits; whole, then streamed
        answer = service.client.post(
            "/generate",
            json={"adapter": job["id"], "prompt": "1+1=", "max_new_tokens": 3, "stream": stream},
        )
        assert answer.status_code == 200, answer.text
        if not stream:
            usage += answer.json()["usage"]["completion_tokens"]
    after = scrape(service.client)

    # Job figures, from SQL: this job (and at most the jobs that were active before) ended.
    succeeded = moved(before, after, "tuneserve_jobs_finished_total", status="succeeded")
    assert 1 <= succeeded <= 1 + active_before
    assert moved(before, after, "tuneserve_jobs", status="succeeded") == succeeded
    ended = moved(before, after, "tuneserve_job_duration_seconds_count", status="succeeded")
    assert ended == succeeded
    assert moved(before, after, "tuneserve_job_duration_seconds_sum", status="succeeded") > 0
    assert value(after, "tuneserve_job_duration_seconds_bucket", status="succeeded", le="+Inf")
    trained = moved(before, after, "tuneserve_trained_tokens_total")
    assert trained >= job["progress"]["trained_tokens"] > 0
    assert value(after, "tuneserve_queue_depth", queue="training") >= 0
    assert value(after, "tuneserve_training_tokens_per_second") >= 0

    # Generation figures, counted by the api's engine: exactly this test's requests.
    whole = {"kind": "adapter", "stream": "false"}
    assert moved(before, after, "tuneserve_generate_seconds_count", **whole) == 2
    assert moved(before, after, "tuneserve_generate_seconds_sum", **whole) > 0
    streamed = {"kind": "adapter", "stream": "true"}
    assert moved(before, after, "tuneserve_generate_seconds_count", **streamed) == 1
    assert moved(before, after, "tuneserve_generate_tokens_total", kind="adapter") >= usage > 0
    assert moved(before, after, "tuneserve_adapter_cache_misses_total") == 1
    assert moved(before, after, "tuneserve_adapter_cache_hits_total") == 2
    assert moved(before, after, "tuneserve_adapter_cache_evictions_total") >= 0
    assert value(after, "tuneserve_adapter_cache_slots_used") >= 1

    # The worker's lines are JSON; those logged while it ran the job carry the job's id.
    deadline = time.monotonic() + 10
    while True:
        worker_lines = json_lines(service.logs / "worker.log")
        of_job = [line for line in worker_lines if line.get("job_id") == job["id"]]
        if of_job or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"ts", "level", "logger", "process", "message"} <= set(of_job[0])
    assert of_job[0]["ts"].endswith("Z")
    # Libraries' output in the job's thread too: progress bars and prints through Celery's
    # redirect of stdout and stderr, warnings through logging.
    loggers = {line["logger"] for line in of_job}
    assert "celery.redirected" in loggers, loggers
    # uvicorn's own lines go through the same JSON handler as the app's.
    api_lines = json_lines(service.logs / "api.log")
    assert any(line["logger"].startswith("uvicorn") for line in api_lines)


def test_metrics_are_public_by_default(service: Service) -> None:
    answer = httpx.get(f"{service.url}/metrics", timeout=30)
    assert answer.status_code == 200
    assert "tuneserve_jobs" in answer.text


def test_readyz_says_the_database_and_broker_answer(service: Service) -> None:
    answer = httpx.get(f"{service.url}/readyz", timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "broker"}
    assert all(check["ok"] and check["seconds"] >= 0 for check in body["checks"].values())


@pytest.fixture(scope="module")
def key_headers(tiny_model: str) -> dict[str, str]:
    from app.migrate import upgrade_database

    upgrade_database()
    return auth(create_api_key("observability"))


@pytest.fixture
def app_with(key_headers: dict[str, str]) -> Iterator[Any]:
    """`app_with(**settings)`: the api in process with those settings changed."""
    from app.main import create_app
    from app.settings import get_settings

    clients: list[TestClient] = []

    def make(**update: Any) -> TestClient:
        client = TestClient(create_app(get_settings().model_copy(update=update)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_readyz_is_503_when_the_broker_is_unreachable(app_with: Any) -> None:
    client = app_with(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    answer = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["ok"] is True
    broker = body["checks"]["broker"]
    assert broker["ok"] is False and "refused" in broker["error"].lower()


def test_a_scrape_without_the_database_reports_it_down(
    app_with: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from app.observability import metrics

    def unreachable() -> None:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(metrics, "_read_stats", unreachable)
    samples = scrape(app_with())
    assert value(samples, "tuneserve_database_up") == 0
    assert not any(name == "tuneserve_jobs" for name, _ in samples)
    assert value(samples, "tuneserve_adapter_cache_hits_total") == 0  # this process still reports


def test_metrics_need_a_key_when_not_public(app_with: Any, key_headers: dict[str, str]) -> None:
    client = app_with(metrics_public=False)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=key_headers).status_code == 200
    assert client.get("/readyz").status_code == 200  # probes never need a key
