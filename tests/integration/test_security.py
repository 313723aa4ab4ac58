"""Security as an attacker would try it: keys, owner isolation, limits, refused dataset URLs.

Keys and isolation run against the live service (api + worker); the limits run in-process on
an app whose settings are tightened for the test, so they do not throttle the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fixtures.service import Service, auth, create_api_key

UNREACHABLE = "http://tuneserve-test-unreachable.invalid/train.jsonl"


def _operations(service: Service) -> list[tuple[str, str]]:
    schema = service.client.get("/openapi.json").json()
    return [
        (method.upper(), path.replace("{", "").replace("}", ""))
        for path, operations in schema["paths"].items()
        for method in operations
    ]


def test_every_endpoint_but_health_needs_a_key(service: Service) -> None:
    operations = _operations(service)
    assert len(operations) >= 15
    for method, path in operations:
        answer = service.client.request(method, path, headers={"Authorization": ""})
        if path == "/healthz":
            assert answer.status_code == 200
            continue
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
        error = answer.json()["error"]
        assert error["code"] == "missing_api_key"
        assert "Authorization: Bearer" in error["message"]
        assert "tuneserve keys create" in error["message"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ts_not-a-key-anyone-made",
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer " + "ts_" + "x" * 5000,
        "Bearer",
    ],
)
def test_a_wrong_key_is_a_401(service: Service, header: str) -> None:
    answer = service.client.get("/jobs", headers={"Authorization": header})
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")


def tuneserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_keys_cli_creates_lists_and_revokes(service: Service) -> None:
    created = tuneserve("keys", "create", "--name", "Robot Arm", "--owner", "robots")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]  # the last line is the key
    assert key.startswith("ts_") and len(key) > 40
    assert "shown only this once" in created.stderr
    key_id = created.stderr.split()[1]

    assert service.client.get("/jobs", headers=auth(key)).status_code == 200
    listed = tuneserve("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout  # only a hash is stored, never shown again
    assert key[:10] in listed.stdout and "robots" in listed.stdout

    revoked = tuneserve("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    answer = service.client.get("/jobs", headers=auth(key))
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert "revoked" in answer.json()["error"]["message"]

    bad = tuneserve("keys", "create", "--name", "Not An Owner")
    assert bad.returncode == 1
    assert "--owner" in bad.stderr


# --- owner isolation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owned(service: Service, tiny_model: str) -> dict[str, Any]:
    """A succeeded job of the local owner, with its file, adapter and a checkpoint."""
    job = service.trained_job(tiny_model)
    file_id = job["file_id"]
    checkpoints = service.client.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
    return {"file": file_id, "job": job, "checkpoint": checkpoints[0]["id"]}


def test_another_owner_sees_nothing_and_gets_404s(
    service: Service, tiny_model: str, owned: dict[str, Any]
) -> None:
    other = auth(create_api_key("mallory"))
    job, adapter = owned["job"], owned["job"]["adapter"]
    reads = [
        ("GET", f"/jobs/{job['id']}"),
        ("GET", f"/jobs/{job['id']}/events"),
        ("GET", f"/jobs/{job['id']}/events/stream"),
        ("GET", f"/jobs/{job['id']}/metrics"),
        ("GET", f"/jobs/{job['id']}/checkpoints"),
        ("POST", f"/jobs/{job['id']}/cancel"),
        ("GET", f"/adapters/{adapter['id']}"),
        ("GET", f"/files/{owned['file']}"),
    ]
    for method, path in reads:
        answer = service.client.request(method, path, headers=other)
        assert answer.status_code == 404, (method, path, answer.text)  # never 403
    for reference in (adapter["id"], adapter["name"], job["id"], owned["checkpoint"]):
        answer = service.client.post(
            "/generate",
            json={"adapter": reference, "prompt": "1+1=", "max_new_tokens": 2},
            headers=other,
        )
        assert answer.status_code == 404, (reference, answer.text)
    # Another owner's file cannot be trained on either.
    answer = service.client.post(
        "/jobs", json={"base_model": tiny_model, "dataset_url": owned["file"]}, headers=other
    )
    assert answer.status_code == 404, answer.text
    for listing in ("/jobs", "/adapters", "/files"):
        assert service.client.get(listing, headers=other).json()["data"] == [], listing
    # The owner still sees all of it.
    assert service.client.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"


def test_keys_of_one_owner_share_its_resources(service: Service, owned: dict[str, Any]) -> None:
    second_local_key = auth(create_api_key("ci", owner="local"))
    answer = service.client.get(f"/jobs/{owned['job']['id']}", headers=second_local_key)
    assert answer.status_code == 200


# --- limits ----------------------------------------------------------------------------------


@pytest.fixture
def tight_app() -> Iterator[TestClient]:
    """The api in-process, with small limits for one owner of its own."""
    from app.main import create_app
    from app.migrate import upgrade_database
    from app.settings import get_settings

    upgrade_database()
    settings = get_settings().model_copy(
        update={"rate_limit_per_minute": 8, "max_jobs_in_flight": 2, "max_request_bytes": 2000}
    )
    key = create_api_key("limited", owner="limited")
    with TestClient(create_app(settings), headers=auth(key)) as client:
        yield client


def test_requests_per_minute_per_key_get_429_with_retry_after(tight_app: TestClient) -> None:
    answers = [tight_app.get("/jobs") for _ in range(9)]
    assert [a.status_code for a in answers] == [200] * 8 + [429]
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "8 per minute" in refused.json()["error"]["message"]
    # Another key has its own budget.
    other = tight_app.get("/jobs", headers=auth(create_api_key("unlimited")))
    assert other.status_code == 200


def test_jobs_in_flight_per_owner(tight_app: TestClient) -> None:
    # accelerator=rocm: a queue no test worker consumes, so the jobs stay queued.
    body = {"dataset_url": UNREACHABLE, "accelerator": "rocm"}
    assert [tight_app.post("/jobs", json=body).status_code for _ in range(2)] == [201, 201]
    refused = tight_app.post("/jobs", json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert "TUNESERVE_MAX_JOBS_IN_FLIGHT" in refused.json()["error"]["message"]
    queued = tight_app.get("/jobs").json()["data"]
    tight_app.post(f"/jobs/{queued[0]['id']}/cancel")
    assert tight_app.post("/jobs", json=body).status_code == 201  # a slot is free again


def test_oversized_bodies_get_413_before_they_are_read(tight_app: TestClient) -> None:
    big = {"dataset_url": UNREACHABLE, "metadata": {"k": "v" * 3000}}
    answer = tight_app.post("/jobs", json=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert "TUNESERVE_MAX_REQUEST_BYTES" in answer.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"dataset_url": "' + b"x" * 1500
        yield b"y" * 1500 + b'"}'

    answer = tight_app.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "request_too_large"


# --- dataset URLs aimed at the internal network ----------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/jobs",
        "http://localhost/train.jsonl",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/train.jsonl",
        "http://192.168.1.1/train.jsonl",
        "http://[::1]/train.jsonl",
        "http://[::ffff:127.0.0.1]/train.jsonl",
        "http://0.0.0.0/train.jsonl",
        "https://[fd00::1]/train.jsonl",
    ],
)
def test_dataset_urls_into_private_networks_are_refused(
    service: Service, tiny_model: str, url: str
) -> None:
    answer = service.client.post("/jobs", json={"base_model": tiny_model, "dataset_url": url})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["detail"] == {"field": "dataset_url"}
    assert "TUNESERVE_ALLOW_PRIVATE_NETWORKS" in error["message"], error
