"""Jobs reach the workers of their accelerator class, and a worker can train one job on several
processes (data parallel through torchrun, gloo on this CPU)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import SESSION_DIR
from tests.fixtures.service import Service, start, stop


@pytest.fixture(scope="module")
def cpu_class_worker(service: Service) -> Iterator[int]:
    """A second worker that serves only `training-cpu`, training each job on 2 processes."""
    from app.cli.processes import worker_command

    os.environ["TUNESERVE_TRAINING_PROCESSES"] = "2"
    try:
        process = start("worker-cpu", worker_command(["training-cpu"]), SESSION_DIR / "logs")
    finally:
        del os.environ["TUNESERVE_TRAINING_PROCESSES"]
    yield process.pid
    stop(process)


def test_a_job_for_an_accelerator_class_runs_on_its_workers(
    service: Service, tiny_model: str, cpu_class_worker: int
) -> None:
    file_id = service.upload("sums.jsonl", jsonl(arithmetic_rows(16)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        accelerator="cpu",
        hyperparameters={"n_epochs": 1, "batch_size": 2, "max_seq_length": 64},
    )
    assert created["queue"] == "training-cpu"
    job = service.wait_for(created["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    types = [event["type"] for event in service.events(job["id"])]
    assert "job.distributed" in types
    # 16 rows, 2 per rank and step, 2 ranks: 4 steps.
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 4
    assert job["adapter"] is not None


def test_a_job_for_a_class_without_workers_waits_in_its_queue(
    service: Service, tiny_model: str
) -> None:
    file_id = service.upload("sums.jsonl", jsonl(arithmetic_rows(4)))
    created = service.create_job(base_model=tiny_model, dataset_url=file_id, accelerator="rocm")
    assert created["queue"] == "training-rocm"
    time.sleep(3)
    assert service.client.get(f"/jobs/{created['id']}").json()["status"] == "queued"
    cancelled = service.client.post(f"/jobs/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
