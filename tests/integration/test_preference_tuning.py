"""Preference tuning (method dpo) on the live service: it raises held-out preference accuracy
over the base model, the SDK creates and reads dpo jobs, SFT then DPO is one chain, and bad
preference rows fail the job naming line and field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import OpenAI

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, local_key_headers

DPO = {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "max_seq_length": 128}


def preference_rows(first: int, last: int, openai_format: bool = False) -> list[dict[str, Any]]:
    """Sums, answered in JSON (chosen) rather than in a sentence (rejected)."""
    rows = []
    for a in range(first, last):
        for b in range(1, 7):
            question = [{"role": "user", "content": f"What is {a} + {b}?"}]
            chosen = [{"role": "assistant", "content": json.dumps({"sum": a + b})}]
            rejected = [{"role": "assistant", "content": f"The answer is {a + b}."}]
            if openai_format:
                rows.append(
                    {
                        "input": {"messages": question},
                        "preferred_output": chosen,
                        "non_preferred_output": rejected,
                    }
                )
            else:
                rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def pairs(service: Service) -> dict[str, str]:
    return {
        "train": service.upload("prefer-json.jsonl", jsonl(preference_rows(1, 10))),
        "held_out": service.upload("prefer-json-val.jsonl", jsonl(preference_rows(10, 12))),
    }


def test_dpo_raises_held_out_preference_accuracy(
    service: Service, tiny_model: str, pairs: dict[str, str]
) -> None:
    body = {
        "base_model": tiny_model,
        "dataset_url": pairs["train"],
        "validation_url": pairs["held_out"],
        "method": {"type": "dpo", "dpo": {"beta": 0.1}},
        "hyperparameters": DPO,
    }
    plan = service.client.post("/jobs/plan", json=body)
    assert plan.status_code == 200, plan.text
    assert plan.json()["dataset"]["format"] == "preference"

    created = service.create_job(**body)
    assert created["method"] == {"type": "dpo", "dpo": {"beta": 0.1}}
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["total_steps"] == plan.json()["steps"]
    evaluation = job["evaluation"]
    assert evaluation["split"] == "validation" and evaluation["rows"] == 12
    assert evaluation["adapter_preference_accuracy"] > evaluation["base_preference_accuracy"]
    assert evaluation["adapter_preference_accuracy"] >= 0.9
    evaluated = next(e for e in service.events(job["id"]) if e["type"] == "job.evaluated")
    assert "Preference accuracy: base" in evaluated["message"]


def test_sft_then_dpo_is_one_chain(
    service: Service, tiny_model: str, pairs: dict[str, str]
) -> None:
    sft = service.trained_job(tiny_model)
    created = service.create_job(
        dataset_url=pairs["train"],
        adapter=sft["id"],
        method={"type": "dpo", "dpo": {"rpo_alpha": 1.0}},  # with the chosen answers' SFT loss
        hyperparameters={**DPO, "n_epochs": 1},
    )
    assert created["parent"]["reference"] == sft["id"]
    assert created["method"] == {"type": "dpo", "dpo": {"beta": 0.1, "rpo_alpha": 1.0}}
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["evaluation"]["adapter_preference_accuracy"] is not None


def test_the_sdk_creates_and_reads_dpo_jobs(
    service: Service, tiny_model: str, pairs: dict[str, str]
) -> None:
    key = local_key_headers()["Authorization"].removeprefix("Bearer ")
    client = OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0)
    openai_rows = client.files.create(
        file=("prefer.jsonl", jsonl(preference_rows(1, 4, openai_format=True))),
        purpose="fine-tune",
    )
    job = client.fine_tuning.jobs.create(
        model=tiny_model,
        training_file=openai_rows.id,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}},
        },
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = service.wait_for(job.id)
    assert done["status"] == "succeeded", done["error"]
    read = client.fine_tuning.jobs.retrieve(job.id)
    assert read.method.type == "dpo" and read.method.dpo.hyperparameters.beta == 0.2
    assert read.method.dpo.hyperparameters.n_epochs == 1


def _failed(service: Service, **body: Any) -> dict[str, Any]:
    job = service.wait_for(service.create_job(**body)["id"])
    assert job["status"] == "failed"
    return dict(job["error"])


def test_bad_preference_rows_fail_naming_line_and_field(service: Service, tiny_model: str) -> None:
    rows = preference_rows(1, 2)
    del rows[1]["rejected"]
    broken = service.upload("prefer-broken.jsonl", jsonl(rows))
    error = _failed(service, base_model=tiny_model, dataset_url=broken, method={"type": "dpo"})
    assert error["code"] == "dataset_invalid"
    assert "line 2, field rejected: is missing" in error["message"]

    chat = service.upload("chat-for-dpo.jsonl", jsonl(arithmetic_rows(8)))
    error = _failed(service, base_model=tiny_model, dataset_url=chat, method={"type": "dpo"})
    assert error["code"] == "dataset_method_mismatch" and "preference rows" in error["message"]

    pairs_only = service.upload("prefer-for-sft.jsonl", jsonl(preference_rows(1, 2)))
    error = _failed(service, base_model=tiny_model, dataset_url=pairs_only)
    assert error["code"] == "dataset_method_mismatch" and '"dpo"' in error["message"]

    refused = service.client.post(
        "/jobs",
        json={"dataset_url": chat, "method": {"type": "supervised", "dpo": {"beta": 0.1}}},
    )
    assert refused.status_code == 422 and "dpo settings go with type dpo" in refused.text


def test_orpo_raises_held_out_preference_accuracy_without_a_reference(
    service: Service, tiny_model: str, pairs: dict[str, str]
) -> None:
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=pairs["train"],
        validation_url=pairs["held_out"],
        method={"type": "orpo", "orpo": {"beta": 0.1}},
        hyperparameters=DPO,
    )
    assert created["method"] == {"type": "orpo", "orpo": {"beta": 0.1}}
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    evaluation = job["evaluation"]
    assert evaluation["adapter_preference_accuracy"] > evaluation["base_preference_accuracy"]
    # OpenAI's API has no orpo: /v1 leaves the job's method out rather than misname it.
    seen = service.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert "method" not in seen and seen["status"] == "succeeded"


def test_a_reward_model_ranks_held_out_pairs_and_does_not_generate(
    service: Service, tiny_model: str, pairs: dict[str, str]
) -> None:
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=pairs["train"],
        validation_url=pairs["held_out"],
        method={"type": "reward_model"},
        hyperparameters=DPO,
    )
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    evaluation = job["evaluation"]
    assert evaluation["adapter_preference_accuracy"] >= 0.9  # chance is 0.5
    # Its pairwise loss fell from the untrained head's (about ln 2, a coin toss) toward 0.
    assert evaluation["adapter_eval_loss"] < min(evaluation["base_eval_loss"], 0.5)

    answer = service.client.post(
        "/generate", json={"adapter": job["id"], "prompt": "1 + 1 =", "max_new_tokens": 2}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "adapter_not_generative"
    mixed = service.client.post(
        "/jobs",
        json={"dataset_url": pairs["train"], "adapter": job["id"], "method": {"type": "dpo"}},
    )
    assert mixed.status_code == 400
    assert mixed.json()["error"]["code"] == "adapter_method_mismatch"


@pytest.mark.real_model
def test_on_the_default_model_dpo_and_a_reward_model_learn_the_preference(
    service: Service,
) -> None:
    """The default base model prefers the sentence; DPO moves it to JSON, and a reward model
    learns to rank the JSON answer first, on held-out sums."""
    train = service.upload("default-prefer.jsonl", jsonl(preference_rows(1, 5)))
    held_out = service.upload("default-prefer-val.jsonl", jsonl(preference_rows(10, 11)))
    settings = {"n_epochs": 1, "batch_size": 4, "learning_rate": 5e-4, "max_seq_length": 64}
    dpo = service.wait_for(
        service.create_job(
            dataset_url=train,
            validation_url=held_out,
            method={"type": "dpo", "dpo": {"beta": 0.1, "rpo_alpha": 1.0}},
            hyperparameters=settings,
        )["id"],
        timeout=900,
    )
    assert dpo["status"] == "succeeded", dpo["error"]
    evaluation = dpo["evaluation"]
    assert evaluation["adapter_preference_accuracy"] > evaluation["base_preference_accuracy"]

    judge = service.wait_for(
        service.create_job(
            dataset_url=train,
            validation_url=held_out,
            method={"type": "reward_model"},
            hyperparameters={**settings, "learning_rate": 1e-3},
        )["id"],
        timeout=900,
    )
    assert judge["status"] == "succeeded", judge["error"]
    assert judge["evaluation"]["adapter_preference_accuracy"] > 0.5  # above chance
