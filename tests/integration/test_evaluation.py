"""The automatic evaluation after training and the model card + manifest in every adapter, on
the live service (real worker, tiny model)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.corpus import arithmetic_rows, jsonl, person_rows
from tests.fixtures.service import Service

FAST = {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_seq_length": 64}


@pytest.fixture(scope="module")
def held_out_job(service: Service, tiny_model: str) -> dict[str, Any]:
    """60 rows, no validation set: 6 are held out and the job trains on 54."""
    file_id = service.upload("sums60.jsonl", jsonl(arithmetic_rows(60)))
    body = {"base_model": tiny_model, "dataset_url": file_id, "hyperparameters": FAST}
    plan = service.client.post("/jobs/plan", json=body).json()
    job = service.wait_for(service.create_job(**body)["id"])
    assert job["status"] == "succeeded", job["error"]
    return {**job, "plan": plan}


def test_a_dataset_without_validation_set_holds_rows_out(held_out_job: dict[str, Any]) -> None:
    evaluation = held_out_job["evaluation"]
    assert evaluation["split"] == "held_out"
    assert evaluation["rows"] == 6
    assert held_out_job["dataset"]["held_out_rows"] == 6
    # The plan counts the same rows: 54 trained rows in batches of 8.
    assert held_out_job["plan"]["dataset"]["held_out_rows"] == 6
    assert held_out_job["plan"]["steps"] == held_out_job["progress"]["total_steps"] == 7
    assert evaluation["base_eval_loss"] > 0 and evaluation["adapter_eval_loss"] > 0
    assert math.isclose(
        evaluation["improvement"],
        (evaluation["base_eval_loss"] - evaluation["adapter_eval_loss"])
        / evaluation["base_eval_loss"],
        rel_tol=1e-3,
        abs_tol=1e-5,
    )
    # Training on sums moved the adapter's loss on unseen sums down from the base model's.
    assert evaluation["adapter_eval_loss"] < evaluation["base_eval_loss"]


def test_samples_show_both_answers_to_held_out_prompts(held_out_job: dict[str, Any]) -> None:
    samples = held_out_job["evaluation"]["samples"]
    assert len(samples) == 3
    for sample in samples:
        assert sample["prompt"].startswith("What is ")
        assert sample["reference"].startswith("ANSWER: ")
        assert isinstance(sample["base"], str) and isinstance(sample["adapter"], str)


def test_evaluation_events_are_logged(service: Service, held_out_job: dict[str, Any]) -> None:
    events = {event["type"]: event for event in service.events(held_out_job["id"])}
    assert "6 held_out rows" in events["job.evaluating"]["message"]
    evaluated = events["job.evaluated"]
    assert evaluated["data"]["split"] == "held_out"
    assert "base" in evaluated["message"] and "adapter" in evaluated["message"]


def test_a_validation_set_is_what_is_scored(service: Service, tiny_model: str) -> None:
    train = service.upload("t.jsonl", jsonl(arithmetic_rows(8)))
    validation = service.upload("v.jsonl", jsonl(arithmetic_rows(12)[8:]))
    job = service.wait_for(
        service.create_job(
            base_model=tiny_model,
            dataset_url=train,
            validation_url=validation,
            hyperparameters=FAST,
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    assert job["evaluation"]["split"] == "validation"
    assert job["evaluation"]["rows"] == 4
    assert job["dataset"]["held_out_rows"] == 0


def test_a_second_job_on_the_same_rows_reuses_the_base_models_side(
    service: Service, tiny_model: str
) -> None:
    """worker/base_side.py: the base model's loss and answers on a validation set are computed
    by the first job that scores it, and read by the next one (another learning rate here)."""
    train = service.upload("t.jsonl", jsonl(arithmetic_rows(8)))
    validation = service.upload("v.jsonl", jsonl(person_rows(3, seed=2024)))
    jobs = []
    for learning_rate in (1e-3, 3e-3):
        job = service.wait_for(
            service.create_job(
                base_model=tiny_model,
                dataset_url=train,
                validation_url=validation,
                hyperparameters={**FAST, "max_seq_length": 128, "learning_rate": learning_rate},
            )["id"]
        )
        assert job["status"] == "succeeded", job["error"]
        jobs.append(job["evaluation"])
    first, second = jobs
    assert (first["base_side_reused"], second["base_side_reused"]) == (False, True)
    assert second["base_eval_loss"] == first["base_eval_loss"]
    assert [s["base"] for s in second["samples"]] == [s["base"] for s in first["samples"]]
    assert len(second["samples"]) == 3


def test_a_small_dataset_is_scored_on_its_training_rows(service: Service, tiny_model: str) -> None:
    job = service.trained_job(tiny_model)  # 8 rows: too few to hold any out
    assert job["evaluation"]["split"] == "training_rows"
    assert job["evaluation"]["rows"] == 8
    assert job["progress"]["total_steps"] == 2


def test_every_adapter_has_a_model_card_and_manifest(
    service: Service, held_out_job: dict[str, Any], tiny_model: str
) -> None:
    files = service.adapter_files(held_out_job["adapter"]["id"])
    manifest = json.loads(files["tuneserve_manifest.json"])
    assert manifest["job_id"] == held_out_job["id"]
    assert manifest["base_model"]["name"] == tiny_model
    assert manifest["base_model"]["source"] == "local_dir"
    assert manifest["dataset"]["url"] == held_out_job["dataset_url"]
    assert manifest["dataset"]["sha256"] == held_out_job["dataset"]["sha256"]
    assert "etag" in manifest["dataset"]  # null for an upload; the server's ETag for a URL
    assert manifest["hyperparameters"] == held_out_job["hyperparameters"]
    assert manifest["seed"] == held_out_job["hyperparameters"]["seed"]
    assert manifest["lora"] == held_out_job["lora"]
    for library in ("torch", "transformers", "peft", "trl", "python", "tuneserve"):
        assert manifest["libraries"][library], library
    assert manifest["metrics"]["steps"] == 7
    assert manifest["evaluation"] == held_out_job["evaluation"]

    card = files["README.md"].decode()
    assert card.startswith("---\n")
    metadata = card.split("---\n")[1]
    assert "library_name: peft" in metadata
    assert f'base_model: "{tiny_model}"' in metadata
    assert held_out_job["dataset"]["sha256"] in card
    assert "| adapter |" in card and "| base |" in card
    assert "tuneserve_manifest.json" in card
