"""Streamed generation: `stream: true` on POST /generate (the real api + Celery worker), with the
tiny model. The engine itself is tested in test_batched_inference.py."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service

PROMPT = "The three best things about living by the sea are"
CHAT = [{"role": "user", "content": "What is 3 plus 3?"}]


def events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, JSON decoded except `[DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    messages = [block for block in response.text.split("\n\n") if block]
    assert all(message.startswith("data: ") for message in messages), messages
    payloads = [message.removeprefix("data: ") for message in messages]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def streamed(service: Service, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The chunks' text joined, and the final `generation` message, of a streamed call."""
    answer = events(service.client.post("/generate", json={**body, "stream": True}))
    assert answer[-1] == "[DONE]"
    *chunks, final = answer[:-1]
    assert all(set(chunk) == {"object", "text"} for chunk in chunks), chunks
    assert all(chunk["object"] == "generation.chunk" and chunk["text"] for chunk in chunks)
    assert final["object"] == "generation"
    return "".join(chunk["text"] for chunk in chunks), final


def generated(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    answer = service.client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    return dict(answer.json())


# On the api


def test_streamed_chunks_add_up_to_the_generated_text(service: Service, tiny_model: str) -> None:
    body = {"base_model": tiny_model, "prompt": PROMPT, "max_new_tokens": 16}
    whole = generated(service, body)
    text, final = streamed(service, body)
    assert text == whole["text"] == final["text"]
    assert final == whole  # the same answer: finish_reason, usage, adapter, base model
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 16
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 16
    assert final["adapter"] is None and final["base_model"] == tiny_model


def test_stream_stops_right_before_a_stop_sequence(service: Service, tiny_model: str) -> None:
    body = {"base_model": tiny_model, "prompt": PROMPT, "max_new_tokens": 24}
    whole = generated(service, body)["text"]
    middle = len(whole) // 2
    stop = whole[middle : middle + 3]
    expected = whole[: whole.find(stop)]
    text, final = streamed(service, {**body, "stop": stop})
    assert text == final["text"] == expected
    assert final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] < 24
    assert final == generated(service, {**body, "stop": [stop]})


@pytest.fixture(scope="module")
def adapter_id(service: Service, tiny_model: str) -> str:
    file_id = service.upload("stream.jsonl", jsonl(arithmetic_rows(8)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "max_seq_length": 64},
    )
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    return str(job["adapter"]["id"])


def test_streaming_with_an_adapter(service: Service, adapter_id: str) -> None:
    body = {"adapter": adapter_id, "messages": CHAT, "max_new_tokens": 12}
    whole = generated(service, body)
    text, final = streamed(service, body)
    assert text == whole["text"]
    assert final == whole
    assert final["adapter"] == adapter_id
    # The base model alone still answers as before the adapter was loaded next to it.
    base = {"base_model": final["base_model"], "messages": CHAT, "max_new_tokens": 12}
    assert streamed(service, base)[1] == generated(service, base)


def test_errors_before_the_stream_are_json(service: Service, tiny_model: str) -> None:
    missing = service.client.post(
        "/generate", json={"adapter": "adapter-nope", "prompt": "Hi", "stream": True}
    )
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["error"]["code"] == "adapter_not_found"
    too_long = service.client.post(
        "/generate",
        json={"base_model": tiny_model, "prompt": PROMPT, "max_new_tokens": 1024, "stream": True},
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    not_a_bool = service.client.post(
        "/generate", json={"base_model": tiny_model, "prompt": "Hi", "stream": "yes"}
    )
    assert not_a_bool.status_code == 422


def test_a_client_that_goes_away_stops_its_generation(service: Service, tiny_model: str) -> None:
    api_log = service.logs / "api.log"
    log_start = api_log.stat().st_size
    body = {"base_model": tiny_model, "prompt": "Hi", "max_new_tokens": 1000, "stream": True}
    with service.client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["object"] == "generation.chunk"
    # 1000 tokens take many seconds here: the next request is answered long before that.
    started = time.monotonic()
    after = generated(service, {"base_model": tiny_model, "prompt": "Hi", "max_new_tokens": 4})
    assert after["usage"]["completion_tokens"] == 4
    assert time.monotonic() - started < 8
    cancelled = wait_for_log(api_log, log_start, "generation cancelled after ")
    assert int(cancelled.split("generation cancelled after ")[1].split()[0]) < 1000


def test_an_error_mid_stream_is_an_error_message(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process (to break the model): the status line is sent, so the error is an event."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.migrate import upgrade_database
    from tests.fixtures.service import auth, create_api_key

    upgrade_database()
    headers = auth(create_api_key("stream-errors"))
    body = {"base_model": tiny_model, "prompt": PROMPT, "max_new_tokens": 4}
    with TestClient(create_app()) as client:
        assert client.post("/generate", json=body, headers=headers).status_code == 200
        engine = client.app.state.engine  # type: ignore[attr-defined]
        model = engine._models[tiny_model].model
        forward, calls = model.forward, []

        def fails_midway(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) > 3:  # the prefill and two decode steps, then the device goes
                raise RuntimeError("the device fell off")
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", fails_midway)
        answer = client.post(
            "/generate", json={**body, "max_new_tokens": 50, "stream": True}, headers=headers
        )
        assert answer.status_code == 200
        messages = [m.removeprefix("data: ") for m in answer.text.split("\n\n") if m]
        error = json.loads(messages[-1])["error"]
        assert error["code"] == "internal_error" and "RuntimeError" in error["message"]
        assert "[DONE]" not in messages
        monkeypatch.undo()
        assert client.post("/generate", json=body, headers=headers).status_code == 200


def wait_for_log(path: Any, start: int, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with path.open(errors="replace") as log:
            log.seek(start)
            lines = [line for line in log.read().splitlines() if needle in line]
        if lines:
            return str(lines[-1])
        time.sleep(0.1)
    raise AssertionError(f"no {needle!r} in {path} after {timeout} s")
