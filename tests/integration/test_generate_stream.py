"""Streamed generation: the engine's stream (in process) and `stream: true` on POST /generate
(the real api + Celery worker), with the tiny model."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service

GENERATION_THREAD = "tuneserve-generate"
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
        tokenizer, model = engine._models[tiny_model].tokenizer, engine._models[tiny_model].model

        def fails_midway(input_ids: Any, streamer: Any, **_: Any) -> None:
            streamer.put(input_ids)  # the prompt, skipped
            streamer.put(tokenizer(" one two three ", return_tensors="pt")["input_ids"][0])
            raise RuntimeError("the device fell off")

        monkeypatch.setattr(model, "generate", fails_midway)
        answer = client.post("/generate", json={**body, "stream": True}, headers=headers)
        assert answer.status_code == 200
        messages = [m.removeprefix("data: ") for m in answer.text.split("\n\n") if m]
        assert json.loads(messages[0]) == {"object": "generation.chunk", "text": " one two three "}
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


# The engine in process


@pytest.fixture(scope="module")
def engine(tiny_model: str) -> Any:
    from app.inference.engine import InferenceEngine
    from app.settings import get_settings

    return InferenceEngine(get_settings())


def generation(tiny_model: str, **fields: Any) -> Any:
    from app.base_models.registry import get_base_model
    from app.inference.engine import Generation
    from app.settings import get_settings

    defaults: dict[str, Any] = {
        "base_model": get_base_model(get_settings(), tiny_model),
        "adapter_key": None,
        "adapter_path": None,
        "prompt": PROMPT,
        "messages": None,
        "max_new_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": None,
        "seed": None,
    }
    return Generation(**{**defaults, **fields})


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == GENERATION_THREAD]


def test_engine_stream_yields_deltas_then_the_result(engine: Any, tiny_model: str) -> None:
    from app.inference.engine import GenerationResult, TextDelta

    with engine.stream(generation(tiny_model)) as stream:
        items = list(stream)
    *deltas, result = items
    assert isinstance(result, GenerationResult)
    assert deltas and all(isinstance(delta, TextDelta) and delta.text for delta in deltas)
    assert "".join(delta.text for delta in deltas) == result.text
    assert result == engine.generate(generation(tiny_model))
    assert result.completion_tokens == 16 and result.finish_reason == "length"


def test_closing_a_stream_stops_its_thread_and_frees_the_engine(
    engine: Any, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream = engine.stream(generation(tiny_model, prompt="Hi", max_new_tokens=1000))
    with caplog.at_level(logging.INFO, logger="app.inference.engine"):
        assert [next(stream), next(stream)]
        assert generation_threads()
        stream.close()
    assert not generation_threads()
    cancelled = [r.getMessage() for r in caplog.records if "generation cancelled" in r.message]
    assert cancelled and int(cancelled[-1].split()[-2]) < 1000
    started = time.monotonic()
    assert engine.generate(generation(tiny_model, max_new_tokens=4)).completion_tokens == 4
    assert time.monotonic() - started < 5


def test_a_cancelled_event_ends_the_stream_without_a_result(engine: Any, tiny_model: str) -> None:
    from app.inference.engine import TextDelta

    cancelled = threading.Event()
    with engine.stream(
        generation(tiny_model, prompt="Hi", max_new_tokens=1000), cancelled
    ) as stream:
        assert isinstance(next(stream), TextDelta)
        cancelled.set()
        rest = list(stream)
    assert all(isinstance(item, TextDelta) for item in rest)  # what was queued; no result
    assert not generation_threads()
    assert engine.generate(generation(tiny_model, max_new_tokens=2)).completion_tokens == 2


def test_bad_requests_raise_before_streaming(engine: Any, tiny_model: str) -> None:
    from app.inference.engine import ContextLengthExceeded

    with pytest.raises(ContextLengthExceeded):
        engine.stream(generation(tiny_model, max_new_tokens=1024))
    assert not generation_threads()
    assert engine.generate(generation(tiny_model, max_new_tokens=2)).completion_tokens == 2


def test_an_error_in_the_generation_thread_reaches_the_consumer(
    engine: Any, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.generate(generation(tiny_model, max_new_tokens=1))  # loaded
    model = engine._models[tiny_model].model

    def broken(**_: Any) -> None:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        engine.generate(generation(tiny_model))
    monkeypatch.undo()
    assert not generation_threads()
    assert engine.generate(generation(tiny_model, max_new_tokens=2)).completion_tokens == 2


def test_concurrent_streams_take_turns(engine: Any, tiny_model: str) -> None:
    from app.inference.engine import GenerationResult

    expected = engine.generate(generation(tiny_model))
    results: list[GenerationResult] = []

    def consume() -> None:
        with engine.stream(generation(tiny_model)) as stream:
            results.extend(item for item in stream if isinstance(item, GenerationResult))

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [expected] * 3
