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


def test_a_job_asking_for_fsdp_trains_sharded_and_serves(service: Service, tiny_model: str) -> None:
    """distributed: fsdp on a CPU worker that trains on one process: two gloo ranks shard the
    model (FSDP2), the adapter is saved once, evaluated and served."""
    file_id = service.upload("sums-fsdp.jsonl", jsonl(arithmetic_rows(16)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        distributed="fsdp",
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-2},
    )
    assert created["distributed"] == "fsdp"
    job = service.wait_for(created["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    said = {event["type"]: event for event in service.events(job["id"])}["job.distributed"]
    assert said["message"] == "Fully sharded (FSDP) training on 2 processes."
    assert said["data"] == {"distributed": "fsdp", "processes": 2}
    assert job["evaluation"]["adapter_eval_loss"] < job["evaluation"]["base_eval_loss"]
    answer = service.client.post(
        "/generate", json={"adapter": job["id"], "prompt": "1 + 1 =", "max_new_tokens": 4}
    )
    assert answer.status_code == 200, answer.text


def test_adalora_sharded_is_refused_by_name(service: Service, tiny_model: str) -> None:
    body = {
        "base_model": tiny_model,
        "dataset_url": "file-anything",
        "distributed": "fsdp",
        "lora": {"type": "adalora"},
    }
    for path in ("/jobs", "/jobs/plan"):
        answer = service.client.post(path, json=body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "distributed_unsupported"
        assert error["detail"]["field"] == "distributed" and '"ddp"' in error["message"]
    answer = service.client.post("/jobs", json={**body, "distributed": "zero3"})
    assert answer.status_code == 422 and "distributed" in answer.text
