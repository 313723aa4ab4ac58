"""Jobs end to end on the real api and a real Celery worker, with the tiny model."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import ALLOWED_DIR
from tests.fixtures.service import Service

FAST = {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 128}


def test_upload_train_and_generate(service: Service, tiny_model: str) -> None:
    file_id = service.upload("train.jsonl", jsonl(arithmetic_rows(16)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        hyperparameters=FAST,
        suffix="sums",
        metadata={"team": "tests"},
    )
    assert created["status"] == "queued"
    assert created["hyperparameters"]["n_epochs"] == 2
    assert created["hyperparameters"]["warmup_ratio"] == 0.03  # defaults resolved on the job

    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["dataset"]["rows"] == 16
    assert job["dataset"]["format"] == "chat"
    assert job["dataset"]["tokens"] > 16 * 10
    assert len(job["dataset"]["sha256"]) == 64
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 8
    assert job["progress"]["train_loss"] > 0
    assert job["attempt"] == 1
    assert job["queue"] == "training"
    assert job["device"]["kind"] == "cpu" and job["device"]["count"] == 1
    assert job["metadata"] == {"team": "tests"}
    assert job["finished_at"] >= job["started_at"] >= job["created_at"]

    adapter = service.client.get(f"/adapters/{job['adapter']['id']}").json()
    assert adapter["job_id"] == job["id"]
    assert adapter["name"] == f"ft:{tiny_model}:local:sums:{job['id']}"
    assert adapter["rank"] == 16

    types = [event["type"] for event in service.events(job["id"])]
    assert types == [
        "job.created",
        "job.claimed",
        "job.device",
        "job.loading_model",
        "job.dataset_validated",
        "job.training_started",
        "job.checkpoint_saved",  # the Trainer's last step is always checkpointed
        "job.evaluating",
        "job.evaluated",
        "job.succeeded",
    ]
    # Where the time went, stage by stage, in the order they ran.
    succeeded = service.events(job["id"])[-1]
    phases = succeeded["data"]["phases"]
    assert list(phases) == [
        "validate",
        "model_load_and_save",
        "training_steps",
        "evaluate",
        "publish",
    ]
    assert all(seconds >= 0 for seconds in phases.values()) and phases["training_steps"] > 0
    assert "Beyond the training steps" in succeeded["message"]

    # The adapter is standard PEFT on disk, and training moved it away from its zero init.
    from app.adapters.models import Adapter
    from app.db import unit_of_work
    from app.settings import get_settings
    from app.storage import artifact_store

    with unit_of_work() as session:
        key = session.get(Adapter, adapter["id"]).path
    assert key == f"adapters/{adapter['id']}"
    path = artifact_store(get_settings()).local_path(key)
    assert path is not None
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["peft_type"] == "LORA"
    weights = load_file(path / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)

    for reference in (job["id"], adapter["id"], adapter["name"]):
        answer = service.client.post(
            "/generate",
            json={
                "adapter": reference,
                "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
                "max_new_tokens": 8,
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["adapter"] == adapter["id"]
        assert body["usage"]["completion_tokens"] <= 8
        assert body["finish_reason"] in ("stop", "length")
    base = service.client.post(
        "/generate", json={"base_model": tiny_model, "prompt": "Hello", "max_new_tokens": 4}
    ).json()
    assert base["adapter"] is None and base["usage"]["completion_tokens"] <= 4

    checkpoints = service.client.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
    assert [checkpoint["step"] for checkpoint in checkpoints] == [8]
    assert checkpoints[0]["id"].startswith("ftckpt-") and checkpoints[0]["job_id"] == job["id"]
    from_checkpoint = service.client.post(
        "/generate",
        json={"adapter": checkpoints[0]["id"], "prompt": "What is 1 plus 1?", "max_new_tokens": 3},
    )
    assert from_checkpoint.status_code == 200, from_checkpoint.text
    assert from_checkpoint.json()["adapter"] == checkpoints[0]["id"]
    missing = service.client.post(
        "/generate", json={"adapter": "ftckpt-nope", "prompt": "Hi", "max_new_tokens": 3}
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "checkpoint_not_found"

    listed = service.client.get("/jobs", params={"status": "succeeded"}).json()["data"]
    assert job["id"] in [item["id"] for item in listed]


def test_dataset_from_file_url_with_validation_set(service: Service, tiny_model: str) -> None:
    train = ALLOWED_DIR / "sums.jsonl"
    train.write_bytes(jsonl(arithmetic_rows(8)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=f"file://{train}",
        validation_url=f"file://{train}",
        hyperparameters=FAST,
    )
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["dataset"]["validation"]["rows"] == 8
    assert job["progress"]["eval_loss"] > 0


def test_bad_dataset_fails_with_line_and_field(service: Service, tiny_model: str) -> None:
    rows = arithmetic_rows(4)
    rows[2]["messages"][1]["content"] = ""
    file_id = service.upload("broken.jsonl", jsonl(rows))
    job = service.wait_for(service.create_job(base_model=tiny_model, dataset_url=file_id)["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "dataset_invalid"
    assert "line 3" in job["error"]["message"]
    assert "messages[1].content" in job["error"]["message"]
    assert job["error"]["detail"]["errors"][0]["line"] == 3
    assert service.events(job["id"])[-1]["type"] == "job.failed"


def test_rows_longer_than_max_seq_length_fail_clearly(service: Service, tiny_model: str) -> None:
    rows = arithmetic_rows(3)
    rows[1]["messages"][0]["content"] = "many words " * 100
    file_id = service.upload("long.jsonl", jsonl(rows))
    job = service.wait_for(
        service.create_job(
            base_model=tiny_model, dataset_url=file_id, hyperparameters={"max_seq_length": 64}
        )["id"]
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "rows_too_long"
    assert "line 2" in job["error"]["message"]
    assert "max_seq_length" in job["error"]["message"]


def test_unreachable_dataset_url_fails_the_job(service: Service, tiny_model: str) -> None:
    job = service.wait_for(
        service.create_job(
            base_model=tiny_model,
            dataset_url="http://tuneserve-test-unreachable.invalid/train.jsonl",
        )["id"]
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "dataset_fetch_failed"


def test_cancel_a_running_job(service: Service, tiny_model: str) -> None:
    file_id = service.upload("many.jsonl", jsonl(arithmetic_rows(64)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        hyperparameters={"n_epochs": 100, "batch_size": 1, "max_seq_length": 64},
    )
    running = service.wait_for(created["id"], {"running", "failed", "succeeded"})
    assert running["status"] == "running"
    service.wait_until_step(created["id"], 2)
    cancelled = service.client.post(f"/jobs/{created['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["cancel_requested"] is True
    job = service.wait_for(created["id"], timeout=60)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    assert job["adapter"] is None
    types = [event["type"] for event in service.events(job["id"])]
    assert types[-2:] == ["job.cancel_requested", "job.cancelled"]
    # Cancelling again is a conflict: the job is already over.
    again = service.client.post(f"/jobs/{created['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "illegal_transition"
