"""Jobs that train on from an adapter (a finished job's, a checkpoint) on the live service,
natively and through /v1 (`model: ft:…`), and the requests that cannot."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, auth, create_api_key, local_key_headers

# Training that barely moves the weights (Adam's steps are about the learning rate): a job that
# starts from an adapter ends next to it, one that starts fresh ends next to zero in lora_B.
STILL = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 64, "learning_rate": 1e-9}


def weights(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return load(files["adapter_model.safetensors"])


@pytest.fixture(scope="module")
def first(service: Service, tiny_model: str) -> dict[str, Any]:
    return service.trained_job(tiny_model, rows=16)


def test_a_job_trains_on_from_a_finished_job(
    service: Service, tiny_model: str, first: dict[str, Any]
) -> None:
    created = service.create_job(
        dataset_url=first["file_id"], adapter=first["id"], hyperparameters=STILL
    )
    assert created["base_model"] == tiny_model
    lora = created["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (16, 32, 0.05)  # the parent's
    assert {"q_proj", "v_proj", "down_proj"} <= set(lora["target_modules"])  # all-linear's
    assert created["parent"] == {
        "reference": first["id"],
        "kind": "adapter",
        "id": first["adapter"]["id"],
    }
    done = service.wait_for(created["id"])
    assert done["status"] == "succeeded", done["error"]
    assert any(event["type"] == "job.parent" for event in service.events(created["id"]))

    parent_files = service.adapter_files(first["adapter"]["id"])
    child_files = service.adapter_files(done["adapter"]["id"])
    parent, child = weights(parent_files), weights(child_files)
    assert parent.keys() == child.keys()
    lora_b = [name for name in parent if "lora_B" in name]
    assert lora_b and all(parent[name].abs().max() > 1e-4 for name in lora_b)
    for name in parent:  # where the parent ended, not a fresh LoRA (lora_B zero)
        assert torch.allclose(parent[name], child[name], atol=1e-5), name

    manifest = json.loads(child_files["tuneserve_manifest.json"])
    assert manifest["parent"] == created["parent"]
    assert f"trained on from adapter `{first['id']}`" in child_files["README.md"].decode()


def test_a_job_trains_on_from_a_checkpoint_by_name(service: Service, first: dict[str, Any]) -> None:
    checkpoint = service.client.get(f"/jobs/{first['id']}/checkpoints").json()["data"][0]
    name = f"{first['adapter']['name']}:ckpt-step-{checkpoint['step']}"
    created = service.create_job(dataset_url=first["file_id"], adapter=name, hyperparameters=STILL)
    assert created["parent"] == {"reference": name, "kind": "checkpoint", "id": checkpoint["id"]}
    assert service.wait_for(created["id"])["status"] == "succeeded"


def test_the_sdk_fine_tunes_a_fine_tuned_model(
    service: Service, tiny_model: str, first: dict[str, Any]
) -> None:
    key = local_key_headers()["Authorization"].removeprefix("Bearer ")
    client = OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0)
    fine_tuned = first["adapter"]["name"]
    job = client.fine_tuning.jobs.create(
        model=fine_tuned,
        training_file=first["file_id"],
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        suffix="again",
    )
    assert job.model == fine_tuned
    native = service.wait_for(job.id)
    assert native["status"] == "succeeded" and native["base_model"] == tiny_model
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == (
        f"ft:{tiny_model}:local:again:{job.id}"
    )


def _refused(service: Service, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    answer = service.client.post("/jobs", json=body, headers=headers)
    assert 400 <= answer.status_code < 500, answer.text
    return answer


def test_what_cannot_be_trained_on_is_refused_by_name(
    service: Service, tiny_model: str, first: dict[str, Any]
) -> None:
    base = {"dataset_url": first["file_id"], "hyperparameters": STILL}
    unknown = _refused(service, {**base, "adapter": "adapter-000000000000000000000000"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["detail"]["field"] == "adapter"
    assert "adapter:" in unknown.json()["error"]["message"]

    with_lora = _refused(service, {**base, "adapter": first["id"], "lora": {"r": 4}})
    assert with_lora.status_code == 400
    assert with_lora.json()["error"]["code"] == "lora_with_adapter"

    mismatch = _refused(
        service, {**base, "adapter": first["id"], "base_model": "smollm2-135m-instruct"}
    )
    assert mismatch.json()["error"]["code"] == "adapter_base_model_mismatch"
    assert tiny_model in mismatch.json()["error"]["message"]

    stranger = auth(create_api_key("chains", owner=f"other-{uuid.uuid4().hex[:6]}"))
    other_file = service.client.post(
        "/files", files={"file": ("s.jsonl", jsonl(arithmetic_rows(8)))}, headers=stranger
    ).json()["id"]
    theirs = _refused(
        service, {"dataset_url": other_file, "adapter": first["id"]}, headers=stranger
    )
    assert theirs.status_code == 404  # another owner's adapter does not exist for them
