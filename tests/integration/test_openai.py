"""The official `openai` SDK against the live service, unchanged but for base_url and api_key:
upload, fine-tune, poll, events, checkpoints, cancel, chat with the result, and errors mapped to
the SDK's exception classes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, local_key_headers

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def client(service: Service) -> OpenAI:
    key = local_key_headers()["Authorization"].removeprefix("Bearer ")
    return OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0, timeout=120)


def wait_for_job(client: OpenAI, job_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise TimeoutError(f"{job_id} still {job.status}")


@pytest.fixture(scope="module")
def tuned(client: OpenAI, tiny_model: str) -> dict[str, Any]:
    """A job created, run and finished through the SDK alone."""
    run = uuid.uuid4().hex[:8]
    uploaded = client.files.create(
        file=("sums.jsonl", jsonl(arithmetic_rows(8))), purpose="fine-tune"
    )
    created = client.fine_tuning.jobs.create(
        model=tiny_model,
        training_file=uploaded.id,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 4,
                    "learning_rate_multiplier": 5,
                }
            },
        },
        suffix="sdk",
        seed=7,
        metadata={"run": run},
    )
    return {"file": uploaded, "created": created, "job": wait_for_job(client, created.id)}


def test_upload_and_files(client: OpenAI, tuned: dict[str, Any]) -> None:
    uploaded = tuned["file"]
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert uploaded.bytes == len(jsonl(arithmetic_rows(8)))
    assert client.files.retrieve(uploaded.id).filename == "sums.jsonl"
    assert client.files.content(uploaded.id).content == jsonl(arithmetic_rows(8))
    assert uploaded.id in [f.id for f in client.files.list()]

    spare = client.files.create(file=("spare.jsonl", b'{"text": "x"}\n'), purpose="fine-tune")
    assert client.files.delete(spare.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(spare.id)


def test_fine_tuning_job_through_the_sdk(
    client: OpenAI, tiny_model: str, tuned: dict[str, Any]
) -> None:
    created, job = tuned["created"], tuned["job"]
    assert created.object == "fine_tuning.job"
    assert created.status in ("validating_files", "queued", "running")
    assert isinstance(created.created_at, int)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_model}:local:sdk:{job.id}"
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(5)
    assert job.method.type == "supervised"
    assert job.seed == 7 and job.user_provided_suffix == "sdk"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at >= job.created_at
    assert job.error is None


def test_events_newest_first_and_paginated(client: OpenAI, tuned: dict[str, Any]) -> None:
    job_id = tuned["job"].id
    first = client.fine_tuning.jobs.list_events(job_id, limit=2)
    assert len(first.data) == 2 and first.has_more
    every = list(client.fine_tuning.jobs.list_events(job_id, limit=2))  # auto-pagination
    assert every[:2] == first.data
    assert every[0].data["type"] == "job.succeeded"
    assert every[-1].data["type"] == "job.created"
    assert len({event.id for event in every}) == len(every) >= 6
    assert all(event.object == "fine_tuning.job.event" for event in every)


def test_jobs_list_pages_and_metadata_filter(client: OpenAI, tuned: dict[str, Any]) -> None:
    run = tuned["job"].metadata["run"]
    found = client.fine_tuning.jobs.list(metadata={"run": run})
    assert [job.id for job in found.data] == [tuned["job"].id]
    assert client.fine_tuning.jobs.list(metadata={"run": "no-such-run"}).data == []
    page = client.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1
    if page.has_more:
        after = client.fine_tuning.jobs.list(limit=1, after=page.data[0].id)
        assert after.data[0].id != page.data[0].id


def test_checkpoints_are_models(client: OpenAI, tuned: dict[str, Any]) -> None:
    job = tuned["job"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "the last step is always checkpointed"
    checkpoint = checkpoints[0]
    assert checkpoint.fine_tuning_job_id == job.id
    assert checkpoint.fine_tuned_model_checkpoint == (
        f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
    )
    answer = client.chat.completions.create(
        model=checkpoint.fine_tuned_model_checkpoint, messages=CHAT, max_tokens=4, temperature=0
    )
    assert answer.choices[0].message.role == "assistant"


def test_chat_with_the_fine_tuned_model(
    service: Service, client: OpenAI, tuned: dict[str, Any]
) -> None:
    model = tuned["job"].fine_tuned_model
    answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.model == model
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # The same engine call as the native API.
    native = service.client.post(
        "/generate", json={"adapter": model, "messages": CHAT, "max_new_tokens": 8}
    ).json()
    assert answer.choices[0].message.content == native["text"]

    listed = [m.id for m in client.models.list()]
    assert model in listed
    assert client.models.retrieve(model).owned_by == "local"


def test_text_completion_with_the_base_model(client: OpenAI, tiny_model: str) -> None:
    answer = client.completions.create(model=tiny_model, prompt="1 + 1 =", max_tokens=4, seed=1)
    assert answer.object == "text_completion"
    assert answer.usage.completion_tokens <= 4
    assert isinstance(answer.choices[0].text, str)
    assert tiny_model in [m.id for m in client.models.list()]


def test_cancel_through_the_sdk(client: OpenAI, tiny_model: str) -> None:
    uploaded = client.files.create(
        file=("long.jsonl", jsonl(arithmetic_rows(64))), purpose="fine-tune"
    )
    created = client.fine_tuning.jobs.create(
        model=tiny_model, training_file=uploaded.id, hyperparameters={"n_epochs": 50}
    )
    cancelled = client.fine_tuning.jobs.cancel(created.id)
    assert cancelled.id == created.id
    assert wait_for_job(client, created.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(created.id)


def test_errors_map_to_the_sdk_exceptions(
    service: Service, client: OpenAI, tiny_model: str, tuned: dict[str, Any]
) -> None:
    file_id = tuned["file"].id
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert missing.value.code == "job_not_found"
    with pytest.raises(openai.BadRequestError) as reinforcement:
        client.fine_tuning.jobs.create(
            model=tiny_model,
            training_file=file_id,
            method={"type": "reinforcement", "reinforcement": {}},
        )
    assert reinforcement.value.param == "method.reinforcement.grader"  # a grader is required
    with pytest.raises(openai.BadRequestError) as epochs:
        client.fine_tuning.jobs.create(
            model=tiny_model, training_file=file_id, hyperparameters={"n_epochs": 0}
        )
    assert epochs.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as unknown_model:
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=file_id)
    assert "gpt-4o" in unknown_model.value.message
    with pytest.raises(openai.NotFoundError) as no_file:
        client.fine_tuning.jobs.create(model=tiny_model, training_file="file-nothere")
    assert no_file.value.param == "training_file"
    with pytest.raises(openai.NotFoundError) as no_model:
        client.chat.completions.create(model="ft:nope:local::ftjob-0", messages=CHAT)
    assert no_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model=tiny_model, messages=CHAT, n=2)
    assert two.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny_model, messages=[])
    stranger = OpenAI(base_url=f"{service.url}/v1", api_key="ts_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_streamed_chat_matches_the_plain_answer(client: OpenAI, tuned: dict[str, Any]) -> None:
    model = tuned["job"].fine_tuned_model
    plain = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_streamed_text_completion(client: OpenAI, tiny_model: str) -> None:
    plain = client.completions.create(
        model=tiny_model, prompt="7 + 5 =", max_tokens=6, temperature=0
    )
    chunks = list(
        client.completions.create(
            model=tiny_model, prompt="7 + 5 =", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
