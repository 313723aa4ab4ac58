"""Fault injection with real processes: a killed worker, a lost broker message, a restarted api,
a database that goes away, a burst of submissions and of pollers.

These tests run their own api, worker(s) and scheduler on the session's database and broker,
on a queue of their own, with a scheduler that declares a worker dead after 4 silent seconds.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import SESSION_DIR, STACK, TEST_ENV
from tests.fixtures.service import (
    Service,
    free_port,
    local_key_headers,
    start,
    stop,
    wait_until_healthy,
)

QUEUE = "training-faults"
FAULT_ENV = {
    "TUNESERVE_DEFAULT_QUEUE": QUEUE,
    "TUNESERVE_STALE_JOB_SECONDS": "4",
    "TUNESERVE_REQUEUE_QUEUED_AFTER_SECONDS": "4",
    "TUNESERVE_REAPER_INTERVAL_SECONDS": "1",
    # Failures are the subject here, not results: the automatic evaluation (tested on its own in
    # test_evaluation.py) would add a model load to each of these many jobs.
    "TUNESERVE_AUTO_EVAL_ROWS": "0",
}
# Enough tiny-model steps to kill a worker between two checkpoints.
LONG_JOB = {"n_epochs": 6, "batch_size": 1, "max_seq_length": 64, "checkpoint_every_steps": 10}


@dataclass
class FaultStack:
    port: int
    logs: Path
    service: Service
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        from app.cli.processes import api_command, scheduler_command, worker_command

        command = {
            "api": lambda: api_command("127.0.0.1", self.port),
            "scheduler": scheduler_command,
        }.get(name.rstrip("0123456789"), lambda: worker_command([QUEUE]))()
        process = start(f"faults-{name}", command, self.logs, FAULT_ENV)
        self.processes[name] = process
        if name == "api":
            wait_until_healthy(self.service.url, process)
        return process

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def faults(service: Service, tiny_model: str) -> Iterator[FaultStack]:
    logs = SESSION_DIR / "logs"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=local_key_headers(), timeout=60) as client:
        stack = FaultStack(port=port, logs=logs, service=Service(url=url, client=client, logs=logs))
        try:
            stack.start("api")
            stack.start("scheduler")
            yield stack
        finally:
            for process in stack.processes.values():
                stop(process)


def submit(service: Service, tiny_model: str, rows: int, **hyperparameters: Any) -> str:
    """Upload `rows` arithmetic chats and start a job on them; its id."""
    file_id = service.upload("sums.jsonl", jsonl(arithmetic_rows(rows)))
    return service.create_job(
        base_model=tiny_model, dataset_url=file_id, hyperparameters=hyperparameters
    )["id"]


def events_of(stack: FaultStack, job_id: str) -> list[dict[str, Any]]:
    return stack.service.events(job_id)


def wait_for_event(stack: FaultStack, job_id: str, type: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = events_of(stack, job_id)
        if any(event["type"] == type for event in events):
            return
        ended = [event for event in events if event["type"] in ("job.failed", "job.succeeded")]
        assert not ended, f"{job_id} ended before {type}: {ended[-1]['message']}"
        time.sleep(0.1)
    raise TimeoutError(f"no {type} for {job_id}")


def test_killed_worker_resumes_from_its_checkpoint(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    faults.start("worker")
    job_id = submit(service, tiny_model, 16, **LONG_JOB)
    wait_for_event(faults, job_id, "job.checkpoint_saved")
    faults.kill("worker")  # kill -9 mid-run, after the first checkpoint
    killed_at = service.client.get(f"/jobs/{job_id}").json()
    assert killed_at["status"] == "running"

    faults.start("worker")  # a restarted worker
    job = service.wait_for(job_id, timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 96

    events = events_of(faults, job_id)
    types = [event["type"] for event in events]
    assert types.count("job.claimed") == 2
    assert "job.requeued" in types  # the scheduler noticed the silent heartbeat
    resumed = next(event for event in events if event["type"] == "job.resumed")
    saved_before = [
        event["data"]["step"]
        for event in events[: events.index(resumed)]
        if event["type"] == "job.checkpoint_saved"
    ]
    assert resumed["data"]["step"] == max(saved_before) >= 10
    # The loss curve continues from the checkpoint: every step once, none repeated.
    curve = service.client.get(f"/jobs/{job_id}/metrics").json()["data"]
    steps = [point["step"] for point in curve if point["train_loss"] is not None]
    assert steps == list(range(1, 97))
    faults.kill("worker")


def lose_broker_messages() -> int:
    """What a flushed Redis or a lost broker file does: every queued message is gone."""
    if STACK == "postgres":
        import redis

        client = redis.Redis.from_url(TEST_ENV["TUNESERVE_BROKER_URL"])
        lost = sum(int(client.llen(key)) for key in client.keys(f"{QUEUE}*"))
        client.flushdb()
        return lost
    broker = Path(TEST_ENV["TUNESERVE_DATA_DIR"]) / "broker.sqlite"
    with sqlite3.connect(broker, timeout=30) as connection:
        return connection.execute("DELETE FROM kombu_message").rowcount


def test_job_whose_message_was_lost_still_runs_once(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    job_id = submit(service, tiny_model, 4, n_epochs=1)
    assert lose_broker_messages() >= 1  # no worker consumes the queue yet
    faults.start("worker")
    job = service.wait_for(job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1
    types = [event["type"] for event in events_of(faults, job_id)]
    assert types.count("job.claimed") == 1 and types.count("job.succeeded") == 1
    faults.kill("worker")


def test_api_restart_mid_job_loses_nothing(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    faults.start("worker")
    job_id = submit(service, tiny_model, 8, **LONG_JOB)
    service.wait_until_step(job_id, 3)
    stop(faults.processes.pop("api"))  # SIGTERM, then a new api on the same port
    faults.start("api")
    job = service.wait_for(job_id, timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1
    assert [event["seq"] for event in events_of(faults, job_id)] == list(
        range(1, len(events_of(faults, job_id)) + 1)
    )
    faults.kill("worker")


def _database_away(seconds: float) -> None:
    if STACK == "postgres":
        cluster = subprocess.run(["ls", "/etc/postgresql"], capture_output=True, text=True)
        version = cluster.stdout.split()[0]
        base = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
        subprocess.run([*base, "stop", "-m", "fast"], check=True)
        time.sleep(seconds)
        subprocess.run([*base, "start"], check=True)
        return
    # SQLite: holding the write lock stops every tuneserve transaction (each begins IMMEDIATE).
    database = Path(TEST_ENV["TUNESERVE_DATA_DIR"]) / "tuneserve.sqlite"
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    time.sleep(seconds)
    connection.execute("COMMIT")
    connection.close()


def test_database_outage_is_ridden_out(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    faults.start("worker")
    job_id = submit(service, tiny_model, 8, **LONG_JOB)
    service.wait_until_step(job_id, 3)
    _database_away(6)
    job = service.wait_for(job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    curve = service.client.get(f"/jobs/{job_id}/metrics").json()["data"]
    steps = [point["step"] for point in curve if point["train_loss"] is not None]
    assert steps == sorted(set(steps)) and steps[-1] == job["progress"]["total_steps"]
    types = [event["type"] for event in events_of(faults, job_id)]
    assert types.count("job.succeeded") == 1 and types.count("job.claimed") >= 1
    faults.kill("worker")


def test_fifty_concurrent_submissions_train_once_each(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    faults.start("worker")
    faults.start("worker2")
    file_id = service.upload("one.jsonl", jsonl(arithmetic_rows(2)))
    body = {
        "base_model": tiny_model,
        "dataset_url": file_id,
        "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_seq_length": 64},
    }

    def submit(index: int) -> httpx.Response:
        with httpx.Client(base_url=service.url, headers=local_key_headers(), timeout=60) as client:
            return client.post("/jobs", json={**body, "metadata": {"n": str(index)}})

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(submit, range(50)))
    assert [answer.status_code for answer in answers] == [201] * 50
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 50
    for job_id in ids:
        job = service.wait_for(job_id, timeout=600)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempt"] == 1
        types = [event["type"] for event in events_of(faults, job_id)]
        assert types.count("job.claimed") == 1
        assert types.count("job.training_started") == 1
        assert types.count("job.succeeded") == 1
    faults.kill("worker")
    faults.kill("worker2")


def test_fifty_pollers_while_a_job_trains(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    faults.start("worker")
    job_id = submit(service, tiny_model, 8, **{**LONG_JOB, "n_epochs": 2})
    statuses: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=service.url, headers=local_key_headers(), timeout=60) as client:
            while not done.is_set():
                answer = client.get(f"/jobs/{job_id}")
                with lock:
                    statuses.append(answer.status_code)
                if answer.json()["status"] in ("succeeded", "failed", "cancelled"):
                    return

    threads = [threading.Thread(target=poll) for _ in range(50)]
    for thread in threads:
        thread.start()
    job = service.wait_for(job_id, timeout=300)
    done.set()
    for thread in threads:
        thread.join(timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert len(statuses) >= 50
    assert set(statuses) == {200}
    faults.kill("worker")


def test_sigterm_checkpoints_and_hands_the_job_back(faults: FaultStack, tiny_model: str) -> None:
    service = faults.service
    worker = faults.start("worker")
    job_id = submit(service, tiny_model, 16, **{**LONG_JOB, "checkpoint_every_steps": 1000})
    service.wait_until_step(job_id, 5)
    worker.send_signal(signal.SIGTERM)  # e.g. `docker compose stop worker`
    assert worker.wait(timeout=60) == 0
    faults.processes.pop("worker")
    events = events_of(faults, job_id)
    handed_back = next(event for event in events if event["type"] == "job.requeued")
    assert handed_back["data"]["reason"] == "worker_shutdown"
    assert handed_back["data"]["checkpoint_step"] >= 5
    assert service.client.get(f"/jobs/{job_id}").json()["status"] == "queued"

    faults.start("worker")
    job = service.wait_for(job_id, timeout=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1  # a graceful hand-back is not a failed attempt
    resumed = next(e for e in events_of(faults, job_id) if e["type"] == "job.resumed")
    assert resumed["data"]["step"] == handed_back["data"]["checkpoint_step"]
    faults.kill("worker")
