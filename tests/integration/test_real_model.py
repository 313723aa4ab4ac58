"""The real default base model learns a narrow skill through the service (a few minutes on CPU)."""

from __future__ import annotations

import json
import math

import pytest

from tests.corpus import jsonl, person_rows
from tests.fixtures.service import Service

pytestmark = pytest.mark.real_model

HELD_OUT = [
    "Hana is 29 years old and lives in Bergen.",
    "At 61, Omar moved to Pune for work.",
    "Clara (45) teaches music in Accra.",
    "Living in Graz, Ravi turned 33 last spring.",
]


def is_person_json(text: str) -> bool:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "age", "city"}


def answers(service: Service, adapter: str | None) -> list[str]:
    texts = []
    for sentence in HELD_OUT:
        response = service.client.post(
            "/generate",
            json={
                "adapter": adapter,
                "messages": [{"role": "user", "content": sentence}],
                "max_new_tokens": 40,
            },
        )
        assert response.status_code == 200, response.text
        texts.append(response.json()["text"])
    return texts


def test_default_model_learns_the_trained_format(service: Service) -> None:
    base_answers = answers(service, None)
    assert not any(is_person_json(text) for text in base_answers), base_answers

    # 56 rows, no validation set: 5 are held out for the automatic evaluation, 51 trained on.
    file_id = service.upload("people.jsonl", jsonl(person_rows(56, seed=1)))
    created = service.create_job(
        dataset_url=file_id, hyperparameters={"n_epochs": 1, "learning_rate": 1e-3}
    )
    assert created["base_model"] == "smollm2-135m-instruct"
    job = service.wait_for(created["id"], timeout=900)
    assert job["status"] == "succeeded", job["error"]

    curve = service.client.get(f"/jobs/{job['id']}/metrics").json()["data"]
    losses = [point["train_loss"] for point in curve if point["train_loss"] is not None]
    batch_size = job["hyperparameters"]["batch_size"]  # "auto": chosen for the 51 rows
    assert len(losses) == job["progress"]["total_steps"] == math.ceil(51 / batch_size)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses

    tuned_answers = answers(service, job["id"])
    hits = [is_person_json(text) for text in tuned_answers]
    assert sum(hits) >= 3, tuned_answers

    # The automatic evaluation saw it too: lower loss on the held-out rows, and the adapter's
    # sample answers are in the trained format where the base model's are not.
    evaluation = job["evaluation"]
    assert evaluation["split"] == "held_out" and evaluation["rows"] == 5
    assert evaluation["adapter_eval_loss"] < 0.5 * evaluation["base_eval_loss"], evaluation
    samples = evaluation["samples"]
    assert sum(is_person_json(sample["adapter"]) for sample in samples) >= 2, samples
    assert not any(is_person_json(sample["base"]) for sample in samples), samples
