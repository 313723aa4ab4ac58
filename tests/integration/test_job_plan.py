"""Job plans (POST /jobs/plan, POST /jobs with dry_run) and "auto" hyperparameters, against the
live service and the tiny model: a plan stores nothing, and the job then does what it said."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import MODEL_CACHE
from tests.fixtures.service import Service, local_key_headers

AUTO = ["n_epochs", "batch_size", "learning_rate"]
# The tiny model's chat template (SmolLM2's), written out by hand.
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
# A time estimate counts when the job takes between a third of it and three times it.
TIME_TOLERANCE = 3.0
SMALL_DEVICE = 2 << 30  # 2 GiB
# The memory estimate against the peak RSS a real training run reaches on the CPU.
MEMORY_TOLERANCE = 0.5


def rendered(question: str, answer: str) -> str:
    return (
        f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_CACHE / tiny_model)


def plan(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    response = service.client.post("/jobs/plan", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def events_of_jobs_since(moment: datetime) -> int:
    """Events of every job created since `moment`, whoever's."""
    from sqlalchemy import func, select

    from app.db import unit_of_work
    from app.jobs.models import Job, JobEvent

    with unit_of_work() as session:
        query = (
            select(func.count())
            .select_from(JobEvent)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.created_at >= moment)
        )
        return int(session.scalar(query) or 0)


def throughput_rows(base_model: str, accelerator: str) -> int:
    from sqlalchemy import func, select

    from app.db import unit_of_work
    from app.jobs.models import Throughput

    with unit_of_work() as session:
        query = select(func.count()).where(
            Throughput.base_model == base_model, Throughput.accelerator == accelerator
        )
        return int(session.scalar(query) or 0)


def job_ids(service: Service) -> list[str]:
    return [job["id"] for job in service.client.get("/jobs", params={"limit": 100}).json()["data"]]


def seconds(job: dict[str, Any]) -> float:
    started = datetime.fromisoformat(job["started_at"])
    return (datetime.fromisoformat(job["finished_at"]) - started).total_seconds()


def test_a_dry_run_stores_nothing_and_the_job_does_what_the_plan_said(
    service: Service, tiny_model: str
) -> None:
    file_id = service.upload("plan-16.jsonl", jsonl(arithmetic_rows(16)))
    body = {
        "base_model": tiny_model,
        "dataset_url": file_id,
        "hyperparameters": {"max_seq_length": 128},
    }
    jobs_before, started = job_ids(service), datetime.now(UTC)
    dry = service.client.post("/jobs", json={**body, "dry_run": True})
    assert dry.status_code == 200, dry.text
    planned = plan(service, body)
    assert {**dry.json(), "time": None} == {**planned, "time": None}
    assert job_ids(service) == jobs_before  # nothing stored, nothing queued
    assert events_of_jobs_since(started) == 0

    assert planned["object"] == "job.plan" and planned["queue"] == "training"
    assert planned["auto_hyperparameters"] == AUTO
    resolved = planned["hyperparameters"]
    assert (resolved["n_epochs"], resolved["batch_size"]) == (10, 2)  # app/jobs/auto.py's table
    assert resolved["learning_rate"] == pytest.approx(1e-4)
    assert resolved["max_seq_length"] == 128 and resolved["warmup_ratio"] == 0.03
    assert planned["steps"] == 8 * 10
    assert planned["dataset"]["rows"] == 16 and planned["problems"] == []
    assert planned["memory"]["fits"] is True and planned["memory"]["suggestion"] is None
    assert planned["memory"]["batch"] == 2
    assert planned["memory"]["seq"] == planned["dataset"]["max_row_tokens"]

    created = service.create_job(**body)
    assert created["auto_hyperparameters"] == AUTO
    assert created["hyperparameters"]["n_epochs"] == "auto"  # until the worker resolves it
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["hyperparameters"] == resolved
    assert job["auto_hyperparameters"] == AUTO
    assert job["progress"]["step"] == job["progress"]["total_steps"] == planned["steps"]
    for fact in ("rows", "tokens", "max_row_tokens", "sha256", "format"):
        assert job["dataset"][fact] == planned["dataset"][fact]
    validated = next(e for e in service.events(job["id"]) if e["type"] == "job.dataset_validated")
    assert "Auto hyperparameters: n_epochs=10, batch_size=2" in validated["message"]
    assert validated["data"]["auto_hyperparameters"]["n_epochs"] == 10

    # The job measured its speed: plans on this class and model now estimate time.
    after = plan(service, body)
    assert after["time"]["estimated_seconds"] is not None
    assert after["time"]["tokens_per_second"] > 0 and after["time"]["measured_jobs"] >= 1

    # The job's own plan (what the dashboard shows) asks "auto" again and gets the same answer.
    own = service.client.get(f"/jobs/{job['id']}/plan")
    assert own.status_code == 200, own.text
    assert {**own.json(), "time": None} == {**after, "time": None}


def test_time_is_estimated_only_from_measurements_and_holds_within_tolerance(
    service: Service, tiny_model: str
) -> None:
    small = service.upload("plan-time-8.jsonl", jsonl(arithmetic_rows(8)))
    body: dict[str, Any] = {"base_model": tiny_model, "dataset_url": small}
    # No worker of this class has trained this model: no estimate, and a reason instead.
    elsewhere = plan(service, {**body, "accelerator": "rocm"})
    assert elsewhere["time"]["estimated_seconds"] is None
    assert "No job on tiny-llama has succeeded on a rocm worker" in elsewhere["time"]["reason"]
    if throughput_rows(tiny_model, "cpu") == 0:
        assert plan(service, body)["time"]["estimated_seconds"] is None
        first = service.wait_for(service.create_job(**body)["id"])
        assert first["status"] == "succeeded", first["error"]

    bigger = service.upload("plan-time-48.jsonl", jsonl(arithmetic_rows(48)))
    body = {
        "base_model": tiny_model,
        "dataset_url": bigger,
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "max_seq_length": 128},
    }
    estimate = plan(service, body)["time"]["estimated_seconds"]
    assert estimate is not None and estimate > 0
    job = service.wait_for(service.create_job(**body)["id"])
    assert job["status"] == "succeeded", job["error"]
    took = seconds(job)
    assert estimate / TIME_TOLERANCE <= took <= estimate * TIME_TOLERANCE, (estimate, took)


def test_tokens_rows_and_the_loss_mask_preview_match_a_hand_count(
    service: Service, tiny_model: str, tokenizer: Any
) -> None:
    rows = arithmetic_rows(5)
    file_id = service.upload("plan-count.jsonl", jsonl(rows))
    planned = plan(service, {"base_model": tiny_model, "dataset_url": file_id})
    by_hand = [
        rendered(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows
    ]
    counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in by_hand]
    dataset = planned["dataset"]
    assert dataset["rows"] == 5 and dataset["format"] == "chat"
    assert dataset["tokens"] == sum(counts)
    assert dataset["max_row_tokens"] == max(counts)
    assert dataset["mean_row_tokens"] == pytest.approx(sum(counts) / 5, abs=0.01)

    previews = planned["loss_mask_preview"]
    assert [preview["line"] for preview in previews] == [1, 2, 3]
    for preview, text, row, count in zip(previews, by_hand, rows, counts, strict=False):
        assert "".join(segment["text"] for segment in preview["segments"]) == text
        trained = [segment for segment in preview["segments"] if segment["trained"]]
        assert [segment["text"] for segment in trained] == [
            row["messages"][1]["content"] + "<|im_end|>\n"
        ]
        assert preview["tokens"] == count
        assert preview["trained_tokens"] == trained[0]["tokens"] < count


def test_rows_too_long_are_listed_by_line(service: Service, tiny_model: str) -> None:
    rows = arithmetic_rows(5)
    rows[1]["messages"][0]["content"] = "many words " * 60
    rows[3]["messages"][1]["content"] = "a long answer " * 60
    file_id = service.upload("plan-long.jsonl", jsonl(rows))
    planned = plan(
        service,
        {
            "base_model": tiny_model,
            "dataset_url": file_id,
            "hyperparameters": {"max_seq_length": 64},
        },
    )
    assert planned["dataset"]["too_long_count"] == 2
    assert [row["line"] for row in planned["dataset"]["too_long"]] == [2, 4]
    assert all(row["tokens"] > 64 for row in planned["dataset"]["too_long"])
    [problem] = planned["problems"]
    assert problem["code"] == "rows_too_long"
    assert "line 2" in problem["message"] and "line 4" in problem["message"]
    assert planned["memory"]["seq"] == 64  # the Trainer would not go past max_seq_length


def test_a_plan_of_a_missing_or_invalid_dataset_is_the_jobs_error(
    service: Service, tiny_model: str
) -> None:
    missing = service.client.post(
        "/jobs/plan", json={"base_model": tiny_model, "dataset_url": "file-nope"}
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
    rows = arithmetic_rows(3)
    rows[2]["messages"][1]["content"] = ""
    broken = service.upload("plan-broken.jsonl", jsonl(rows))
    invalid = service.client.post(
        "/jobs/plan", json={"base_model": tiny_model, "dataset_url": broken}
    )
    assert invalid.status_code == 400, invalid.text
    assert invalid.json()["error"]["code"] == "dataset_invalid"
    assert invalid.json()["error"]["detail"]["errors"][0]["line"] == 3


@pytest.fixture
def small_device(service: Service, tiny_model: str) -> Iterator[Any]:
    """An in-process api (same database and artifacts) whose devices have 2 GiB, and a queue
    no worker consumes."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import get_settings

    settings = get_settings().model_copy(
        update={"device_memory_bytes": SMALL_DEVICE, "default_queue": "plan-tests"}
    )
    with TestClient(create_app(settings), headers=local_key_headers()) as client:
        yield client


def test_a_job_that_cannot_fit_is_refused_with_a_change_that_fits(
    small_device: Any, tiny_model: str
) -> None:
    rows = arithmetic_rows(8)
    for row in rows:
        row["messages"][1]["content"] = "the answer is " * 80
    uploaded = small_device.post("/files", files={"file": ("plan-fit.jsonl", jsonl(rows))})
    assert uploaded.status_code == 201, uploaded.text
    body = {
        "base_model": tiny_model,
        "dataset_url": uploaded.json()["id"],
        "hyperparameters": {"batch_size": 8, "max_seq_length": 512},
    }
    planned = small_device.post("/jobs/plan", json=body).json()
    memory = planned["memory"]
    assert memory["device"] == {
        "accelerator": memory["device"]["accelerator"],
        "name": memory["device"]["name"],
        "count": memory["device"]["count"],
        "memory_bytes": SMALL_DEVICE,
        "source": "setting",
    }
    assert memory["fits"] is False and memory["estimated_bytes"] > memory["usable_bytes"]
    suggestion = memory["suggestion"]
    changes = suggestion["hyperparameters"]
    assert 1 <= changes["batch_size"] < 8
    assert changes["batch_size"] * changes["gradient_accumulation_steps"] >= 8

    refused = small_device.post("/jobs", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "job_does_not_fit"
    assert suggestion["message"] in error["message"]
    assert error["detail"]["suggestion"] == suggestion

    changed = {**body, "hyperparameters": {**body["hyperparameters"], **changes}}
    assert small_device.post("/jobs/plan", json=changed).json()["memory"]["fits"] is True
    accepted = small_device.post("/jobs", json=changed)
    assert accepted.status_code == 201, accepted.text
    assert small_device.post(f"/jobs/{accepted.json()['id']}/cancel").status_code == 200

    # "auto" batch_size is never refused for memory: it is halved until it fits.
    auto = {**body, "hyperparameters": {"max_seq_length": 512}}
    auto_plan = small_device.post("/jobs/plan", json=auto).json()
    assert auto_plan["memory"]["fits"] is True
    assert auto_plan["hyperparameters"]["batch_size"] <= changes["batch_size"]


MEASURE = """
import json, resource, sys, tempfile
from pathlib import Path
import datasets, peft, torch, transformers, trl  # the imports training pays for anyway
from app.jobs.schemas import LoraSpec, TrainingHyperparameters
from worker.training import TrainingSpec, train_lora

location, records, hyperparameters, lora = json.loads(sys.argv[1])
hyperparameters = TrainingHyperparameters.model_validate(hyperparameters)
lora = LoraSpec.model_validate(lora)
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with tempfile.TemporaryDirectory() as out:
    train_lora(TrainingSpec(location, hyperparameters, lora), records, None, Path(out))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak}))
"""


def test_memory_estimate_against_a_measured_peak(service: Service, tiny_model: str) -> None:
    """The tiny model's peak RSS in a fresh process training one batch of long rows, against
    the plan's estimate of the whole process's peak (runtime allowance included), within
    MEMORY_TOLERANCE either way. (The part above the imports alone is not comparable: what the
    imports allocate and free is reused by training, more or less depending on the machine.)"""
    rows = arithmetic_rows(4)
    for row in rows:
        row["messages"][1]["content"] = "the answer is " * 120
    file_id = service.upload("plan-memory.jsonl", jsonl(rows))
    hyperparameters = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 512}
    planned = plan(
        service,
        {"base_model": tiny_model, "dataset_url": file_id, "hyperparameters": hyperparameters},
    )
    memory = planned["memory"]
    from app.jobs.schemas import Hyperparameters, LoraSpec

    full = Hyperparameters.model_validate(hyperparameters).model_dump(mode="json")
    lora = LoraSpec().model_dump(mode="json")
    argument = json.dumps([str(MODEL_CACHE / tiny_model), rows, full, lora])
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, argument], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    peak, estimated = measured["peak"], memory["estimated_bytes"]
    seen = f"estimated {estimated} bytes, measured {peak} (plan {memory}, {measured})"
    assert (1 - MEMORY_TOLERANCE) * peak <= estimated <= (1 + MEMORY_TOLERANCE) * peak, seen


def test_openai_auto_hyperparameters_resolve_to_numbers(service: Service, tiny_model: str) -> None:
    file_id = service.upload("plan-openai.jsonl", jsonl(arithmetic_rows(16)))
    client = httpx.Client(base_url=service.url, headers=local_key_headers(), timeout=60)
    with client:
        created = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": tiny_model,
                "training_file": file_id,
                "hyperparameters": {
                    "n_epochs": "auto",
                    "batch_size": "auto",
                    "learning_rate_multiplier": "auto",
                },
            },
        )
        assert created.status_code == 200, created.text
        assert created.json()["hyperparameters"] == {
            "n_epochs": "auto",
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
        }
        job_id = created.json()["id"]
        assert service.wait_for(job_id)["status"] == "succeeded"
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["hyperparameters"]["n_epochs"] == 10
    assert job["hyperparameters"]["batch_size"] == 2
    assert job["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(0.5)
