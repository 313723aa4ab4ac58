"""/v1 against OpenAI's published OpenAPI document, as a client generated from it would see it.

Every answer of the fine-tuning flow, the models, chat and text completions (plain and every
streamed chunk) and the error bodies is validated against the document's schema for its operation
(tests/openai_schema.py). Every request field the document defines for these operations is sent
once: it is honoured (2xx) or refused with a 400 in OpenAI's error shape naming it, and which of
the two is pinned below (docs/openai.md lists the same).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, auth, create_api_key, local_key_headers
from tests.openai_schema import (
    assert_answer_conforms,
    assert_conforms,
    assert_error_conforms,
    example,
    problems,
    request_fields,
    response_ref,
)

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]
TERMINAL = {"succeeded", "failed", "cancelled"}
FINISH_REASON_NULL = [
    "choices/0/finish_reason: None is not of type 'string'",
    "choices/0/finish_reason: None is not one of ['stop', 'length', 'content_filter']",
]


@pytest.fixture(scope="module")
def v1(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{service.url}/v1", headers=local_key_headers(), timeout=120
    ) as client:
        yield client


def ok(response: httpx.Response, operation_id: str) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert_answer_conforms(operation_id, body)
    return body


def upload(v1: httpx.Client, name: str, content: bytes, **form: str) -> httpx.Response:
    return v1.post("/files", files={"file": (name, content)}, data={"purpose": "fine-tune", **form})


def create_job(v1: httpx.Client, body: dict[str, Any]) -> Any:
    return ok(v1.post("/fine_tuning/jobs", json=body), "createFineTuningJob")


def wait(v1: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    """Poll until the job ends, validating every answer on the way (queued, running, done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = ok(v1.get(f"/fine_tuning/jobs/{job_id}"), "retrieveFineTuningJob")
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


@pytest.fixture(scope="module")
def flow(v1: httpx.Client, tiny_model: str) -> dict[str, Any]:
    """A file uploaded and a job trained to success through /v1 alone, each answer validated."""
    file = ok(upload(v1, "sums.jsonl", jsonl(arithmetic_rows(8))), "createFile")
    created = create_job(
        v1,
        {
            "model": tiny_model,
            "training_file": file["id"],
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
            },
            "suffix": "schema",
            "metadata": {"run": uuid.uuid4().hex[:8]},
        },
    )
    job = wait(v1, created["id"])
    assert job["status"] == "succeeded", job["error"]
    return {"file": file, "job": job}


def test_file_answers_conform(service: Service, v1: httpx.Client, flow: dict[str, Any]) -> None:
    file = flow["file"]
    assert "expires_at" not in file and "status_details" not in file
    listed = ok(v1.get("/files"), "listFiles")
    assert file["id"] in [f["id"] for f in listed["data"]]
    assert ok(v1.get(f"/files/{file['id']}"), "retrieveFile") == file
    content = v1.get(f"/files/{file['id']}/content")
    assert content.status_code == 200 and content.content == jsonl(arithmetic_rows(8))

    spare = ok(upload(v1, "spare.jsonl", b'{"text": "x"}\n'), "createFile")
    assert ok(v1.delete(f"/files/{spare['id']}"), "deleteFile") == {
        "id": spare["id"],
        "object": "file",
        "deleted": True,
    }
    # A list with nothing in it still names its first and last ids (as strings: they are required).
    stranger = auth(create_api_key("conformance", owner=f"empty-{uuid.uuid4().hex[:6]}"))
    empty = ok(httpx.get(f"{service.url}/v1/files", headers=stranger), "listFiles")
    assert empty["data"] == [] and empty["has_more"] is False


def test_file_list_order_and_pages(v1: httpx.Client, flow: dict[str, Any]) -> None:
    first = ok(upload(v1, "a.jsonl", b'{"text": "a"}\n'), "createFile")
    second = ok(upload(v1, "b.jsonl", b'{"text": "b"}\n'), "createFile")
    newest = ok(v1.get("/files", params={"limit": 2}), "listFiles")
    assert [f["id"] for f in newest["data"]] == [second["id"], first["id"]]
    assert newest["first_id"] == second["id"] and newest["last_id"] == first["id"]
    oldest = ok(v1.get("/files", params={"order": "asc", "limit": 1}), "listFiles")
    assert oldest["has_more"] is True
    after = ok(v1.get("/files", params={"order": "asc", "after": first["id"]}), "listFiles")
    assert [f["id"] for f in after["data"]][:1] == [second["id"]]
    assert flow["file"]["id"] not in [f["id"] for f in after["data"]]


def test_fine_tuning_answers_conform(
    v1: httpx.Client, tiny_model: str, flow: dict[str, Any]
) -> None:
    job = flow["job"]
    listed = ok(
        v1.get("/fine_tuning/jobs", params={"metadata[run]": job["metadata"]["run"]}),
        "listPaginatedFineTuningJobs",
    )
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    events = ok(v1.get(f"/fine_tuning/jobs/{job['id']}/events"), "listFineTuningEvents")
    assert events["data"][0]["data"]["type"] == "job.succeeded"
    checkpoints = ok(
        v1.get(f"/fine_tuning/jobs/{job['id']}/checkpoints"), "listFineTuningJobCheckpoints"
    )
    assert checkpoints["data"], "the last step is always checkpointed"

    # A job that fails (its dataset has no usable rows) carries an error object.
    bad = ok(upload(v1, "bad.jsonl", b'{"nothing": 1}\n'), "createFile")
    created = create_job(v1, {"model": tiny_model, "training_file": bad["id"]})
    failed = wait(v1, created["id"])
    assert failed["status"] == "failed" and failed["error"]["message"]

    # A cancelled one.
    long = ok(upload(v1, "long.jsonl", jsonl(arithmetic_rows(64))), "createFile")
    created = create_job(
        v1,
        {
            "model": tiny_model,
            "training_file": long["id"],
            "hyperparameters": {"n_epochs": 50},
        },
    )
    cancelled = ok(v1.post(f"/fine_tuning/jobs/{created['id']}/cancel"), "cancelFineTuningJob")
    assert cancelled["id"] == created["id"]
    assert wait(v1, created["id"])["status"] == "cancelled"


def test_model_answers_conform(v1: httpx.Client, tiny_model: str, flow: dict[str, Any]) -> None:
    models = ok(v1.get("/models"), "listModels")
    fine_tuned = flow["job"]["fine_tuned_model"]
    assert {tiny_model, fine_tuned} <= {m["id"] for m in models["data"]}
    for name in (tiny_model, fine_tuned, f"{fine_tuned}:ckpt-step-2"):
        found = ok(v1.get(f"/models/{name}"), "retrieveModel")
        assert found["id"] == name
        if name != tiny_model:  # a fine-tuned model or checkpoint was made at a known moment
            assert found["created"] >= flow["job"]["created_at"]


def sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_completion_answers_conform(
    v1: httpx.Client, flow: dict[str, Any], include_usage: bool
) -> None:
    request = {
        "model": flow["job"]["fine_tuned_model"],
        "messages": CHAT,
        "max_tokens": 6,
        "temperature": 0,
    }
    plain = ok(v1.post("/chat/completions", json=request), "createChatCompletion")
    assert "system_fingerprint" not in plain
    chunks = sse_chunks(
        v1.post(
            "/chat/completions",
            json={**request, "stream": True, "stream_options": {"include_usage": include_usage}},
        )
    )
    chunk_ref = response_ref("createChatCompletion", "text/event-stream")
    for chunk in chunks:
        assert_conforms(chunk_ref, chunk)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert (chunks[-1].get("usage") == plain["usage"]) is include_usage
    # Stream obfuscation, on by default as at OpenAI: every chunk padded to whole blocks.
    assert all(len(json.dumps(chunk)) % 64 == 0 for chunk in chunks)
    bare = sse_chunks(
        v1.post(
            "/chat/completions",
            json={**request, "stream": True, "stream_options": {"include_obfuscation": False}},
        )
    )
    assert not any("obfuscation" in chunk for chunk in bare)


@pytest.mark.parametrize("include_usage", [False, True])
def test_text_completion_answers_conform(
    v1: httpx.Client, tiny_model: str, include_usage: bool
) -> None:
    request = {"model": tiny_model, "prompt": "1 + 1 =", "max_tokens": 5, "temperature": 0}
    plain = ok(v1.post("/completions", json=request), "createCompletion")
    chunks = sse_chunks(
        v1.post(
            "/completions",
            json={**request, "stream": True, "stream_options": {"include_usage": include_usage}},
        )
    )
    # Streamed chunks share the plain answer's schema, whose finish_reason is a string. OpenAI's
    # own server sends null there until the last chunk, and so does tuneserve: the one gap
    # between the document and any server that streams, and the only problem allowed.
    for chunk in chunks:
        found = problems(response_ref("createCompletion"), chunk)
        finishing = chunk["choices"] and chunk["choices"][0]["finish_reason"] is not None
        expected = [] if finishing or not chunk["choices"] else FINISH_REASON_NULL
        assert found == expected, (found, chunk)
    assert (
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        == (plain["choices"][0]["text"])
    )
    assert (chunks[-1].get("usage") == plain["usage"]) is include_usage


def test_error_bodies_conform(
    service: Service, v1: httpx.Client, tiny_model: str, flow: dict[str, Any]
) -> None:
    answers = {
        400: v1.post("/chat/completions", json={"model": tiny_model, "messages": []}),
        401: httpx.get(f"{service.url}/v1/models", headers=auth("ts_wrong")),
        404: v1.get("/fine_tuning/jobs/ftjob-000000000000000000000000"),
        405: v1.put("/models"),
        409: v1.post(f"/fine_tuning/jobs/{flow['job']['id']}/cancel"),
    }
    for status, response in answers.items():
        assert response.status_code == status, response.text
        assert_error_conforms(response.json())
    broken = v1.post(
        "/chat/completions", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert_error_conforms(broken.json())


# --- requests: every field of the document is honoured or refused ------------------------------

# The fields /v1 honours, per operation. Every other field the document defines is refused with a
# 400 naming it when a client sets it to something tuneserve does not do (a no-op value, such as
# n=1 or store=false, is accepted).
HONOURED = {
    "createChatCompletion": {
        "messages",
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "response_format",
        "user",
        "safety_identifier",
        "parallel_tool_calls",  # accepted: no tools run, so none run in parallel
    },
    "createCompletion": {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "user",
    },
    "createFineTuningJob": {
        "model",
        "training_file",
        "validation_file",
        "hyperparameters",
        "method",
        "suffix",
        "seed",
        "metadata",
    },
    "createFile": {"file", "purpose"},
    "listFiles": {"purpose", "limit", "order", "after"},
    "listPaginatedFineTuningJobs": {"after", "limit", "metadata"},
    "listFineTuningEvents": {"after", "limit"},
    "listFineTuningJobCheckpoints": {"after", "limit"},
}

# Values a client would set to ask for something, where the document's smallest example would ask
# for nothing (n=1) or is not a value to try here.
ASKING: dict[tuple[str, str], Any] = {
    ("createChatCompletion", "n"): 2,
    ("createChatCompletion", "logprobs"): True,
    ("createChatCompletion", "top_logprobs"): 2,
    ("createChatCompletion", "frequency_penalty"): 0.5,
    ("createChatCompletion", "presence_penalty"): 0.5,
    ("createChatCompletion", "logit_bias"): {"50256": -100},
    ("createChatCompletion", "modalities"): ["text", "audio"],
    ("createChatCompletion", "response_format"): {"type": "text"},
    ("createChatCompletion", "service_tier"): "flex",
    ("createChatCompletion", "tool_choice"): "required",
    ("createChatCompletion", "metadata"): {"k": "v"},
    ("createChatCompletion", "stop"): ["\n"],
    ("createCompletion", "n"): 2,
    ("createCompletion", "max_tokens"): 2,
    ("createCompletion", "best_of"): 2,
    ("createCompletion", "logprobs"): 2,
    ("createCompletion", "frequency_penalty"): 0.5,
    ("createCompletion", "presence_penalty"): 0.5,
    ("createCompletion", "logit_bias"): {"50256": -100},
    ("createCompletion", "stop"): ["\n"],
    ("createFineTuningJob", "integrations"): [{"type": "wandb", "wandb": {"project": "p"}}],
    ("createFineTuningJob", "hyperparameters"): {"n_epochs": 1},
    ("createFineTuningJob", "method"): {"type": "supervised"},
    ("createFineTuningJob", "metadata"): {"k": "v"},
    ("createFineTuningJob", "seed"): 3,
    ("createFineTuningJob", "suffix"): "fields",
    ("listFiles", "purpose"): "fine-tune",
    ("listFiles", "order"): "asc",
    ("listPaginatedFineTuningJobs", "metadata"): {"k": "v"},
}


def _field_cases() -> list[tuple[str, str]]:
    return [(operation, name) for operation in HONOURED for name in request_fields(operation)]


def _send(
    v1: httpx.Client, operation: str, name: str, value: Any, context: dict[str, Any]
) -> httpx.Response:
    model, job_id, file_id = context["model"], context["job_id"], context["file_id"]
    bases = {
        "createChatCompletion": {"model": model, "messages": CHAT, "max_tokens": 1},
        "createCompletion": {"model": model, "prompt": "1 +", "max_tokens": 1},
        "createFineTuningJob": {"model": model, "training_file": file_id},
    }
    if operation in bases:
        body = bases[operation]
        # A required field keeps the base request's value (a model that exists, and so on).
        body = (
            body
            if name in ("model", "messages", "prompt", "training_file")
            else {
                **body,
                name: file_id if name == "validation_file" else value,
            }
        )
        path = {
            "createChatCompletion": "/chat/completions",
            "createCompletion": "/completions",
            "createFineTuningJob": "/fine_tuning/jobs",
        }[operation]
        return v1.post(path, json=body)
    if operation == "createFile":
        if name in ("file", "purpose"):
            return upload(v1, "field.jsonl", b'{"text": "x"}\n')
        form = {f"{name}[{key}]": str(item) for key, item in value.items()}  # as the SDK sends it
        return upload(v1, "field.jsonl", b'{"text": "x"}\n', **form)
    path = {
        "listFiles": "/files",
        "listPaginatedFineTuningJobs": "/fine_tuning/jobs",
        "listFineTuningEvents": f"/fine_tuning/jobs/{job_id}/events",
        "listFineTuningJobCheckpoints": f"/fine_tuning/jobs/{job_id}/checkpoints",
    }[operation]
    if name == "after":
        value = context["after"][operation]
    params = (
        {f"{name}[{k}]": v for k, v in value.items()} if isinstance(value, dict) else {name: value}
    )
    return v1.get(path, params=params)


@pytest.fixture(scope="module")
def context(v1: httpx.Client, tiny_model: str, flow: dict[str, Any]) -> dict[str, Any]:
    job_id = flow["job"]["id"]
    events = v1.get(f"/fine_tuning/jobs/{job_id}/events").json()["data"]
    checkpoints = v1.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    return {
        "model": tiny_model,
        "job_id": job_id,
        "file_id": flow["file"]["id"],
        "after": {
            "listFiles": flow["file"]["id"],
            "listPaginatedFineTuningJobs": job_id,
            "listFineTuningEvents": events[0]["id"],
            "listFineTuningJobCheckpoints": checkpoints[0]["id"],
        },
    }


@pytest.mark.parametrize(("operation", "name"), _field_cases())
def test_every_request_field_is_honoured_or_refused_by_name(
    v1: httpx.Client, context: dict[str, Any], operation: str, name: str
) -> None:
    value = ASKING.get((operation, name), example(request_fields(operation)[name]))
    response = _send(v1, operation, name, value, context)
    if operation == "createFineTuningJob" and response.status_code == 200:
        v1.post(f"/fine_tuning/jobs/{response.json()['id']}/cancel")  # nothing to train here
    if name in HONOURED[operation]:
        assert response.status_code == 200, f"{name}={value!r}: {response.text}"
        return
    assert response.status_code == 400, f"{name}={value!r} was not refused: {response.text}"
    body = response.json()
    assert_error_conforms(body)
    assert body["error"]["param"] == name, body
    assert name in body["error"]["message"], body


def test_values_that_ask_for_nothing_are_accepted(v1: httpx.Client, tiny_model: str) -> None:
    """A client that sends every field at its default (n=1, store=false, …) is served."""
    chat = {
        "model": tiny_model,
        "messages": CHAT,
        "max_tokens": 3,
        "temperature": 0,
        "n": 1,
        "store": False,
        "modalities": ["text"],
        "service_tier": "auto",
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "logit_bias": {},
        "logprobs": False,
        "top_logprobs": 0,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "response_format": {"type": "text"},
    }
    answer = ok(v1.post("/chat/completions", json=chat), "createChatCompletion")
    plain = ok(
        v1.post(
            "/chat/completions",
            json={"model": tiny_model, "messages": CHAT, "max_tokens": 3, "temperature": 0},
        ),
        "createChatCompletion",
    )
    assert answer["choices"][0]["message"] == plain["choices"][0]["message"]
    text = {
        "model": tiny_model,
        "prompt": ["1 +"],  # a list of one prompt is one prompt
        "max_tokens": 3,
        "temperature": 0,
        "best_of": 1,
        "echo": False,
        "suffix": "",
        "logprobs": 0,
    }
    listed = ok(v1.post("/completions", json=text), "createCompletion")
    single = ok(v1.post("/completions", json={**text, "prompt": "1 +"}), "createCompletion")
    assert listed["choices"][0]["text"] == single["choices"][0]["text"]
    two = v1.post("/completions", json={**text, "prompt": ["1 +", "2 +"]})
    assert two.status_code == 400 and two.json()["error"]["param"] == "prompt"
