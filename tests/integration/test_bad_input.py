"""The bad-input corpus: broken dataset files of every shape and container, uploads, dataset URLs
and headers, sent to the live service (real api and Celery worker, tiny model).

Every case ends in a 4xx in the one error shape whose message names the field, file or line,
or in a failed job whose error does; the service keeps serving and nothing is stored half-way.
(Malformed request bodies have their own table in test_api_errors.py.)
"""

# ruff: noqa: E501  (the case tables read best one case per line)

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.service import Service

# --- dataset files ---------------------------------------------------------------------------


def lines(*rows: Any) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def csv_bytes(header: list[str], *rows: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def parquet(columns: dict[str, list[Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def chat(question: str = "What is 2+2?", answer: str = "4") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


PC = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "Two and two make four."}
ALPACA = {"instruction": "Add the numbers.", "input": "2 2", "output": "4"}
SHAREGPT = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
HUGE = "word " * 4000  # far past the corpus jobs' max_seq_length of 64 tokens


@dataclass(frozen=True)
class BadDataset:
    id: str
    filename: str
    content: bytes
    code: str
    mentions: tuple[str, ...]  # each appears in the job's error message


DATASETS = [
    # chat
    BadDataset("chat-invalid-json", "c.jsonl", lines(chat()) + b'{"messages": [}\n', "dataset_invalid", ("line 2", "not valid JSON")),
    BadDataset("chat-messages-not-list", "c.jsonl", lines(chat(), {"messages": "hi"}), "dataset_invalid", ("line 2", "messages")),
    BadDataset("chat-missing-role", "c.jsonl", lines(chat(), {"messages": [{"content": "x"}]}), "dataset_invalid", ("line 2", "messages[0].role")),
    BadDataset("chat-unknown-role", "c.jsonl", lines({"messages": [{"role": "bot", "content": "x"}]}), "dataset_invalid", ("line 1", "allowed roles")),
    BadDataset("chat-content-not-string", "c.jsonl", lines(chat(), {"messages": [{"role": "user", "content": 7}]}), "dataset_invalid", ("line 2", "messages[0].content")),
    BadDataset("chat-empty-content", "c.jsonl", lines(chat(), chat(answer="")), "dataset_invalid", ("line 2", "messages[1].content")),
    BadDataset("chat-no-assistant", "c.jsonl", lines(chat(), {"messages": [{"role": "user", "content": "hi"}]}), "dataset_invalid", ("line 2", "assistant")),
    BadDataset("chat-huge-line", "c.jsonl", lines(chat(), chat(answer=HUGE)), "rows_too_long", ("line 2", "max_seq_length")),
    BadDataset("chat-not-utf8", "c.jsonl", lines(chat()) + b'{"messages": "caf\xe9"}\n', "dataset_encoding", ("line 2", "UTF-8")),
    BadDataset("chat-utf16", "c.jsonl", lines(chat()).decode().encode("utf-16"), "dataset_encoding", ("UTF-16",)),
    BadDataset("chat-no-rows", "c.jsonl", b"\n\n", "dataset_empty", ("no rows",)),
    # prompt-completion
    BadDataset("pc-invalid-json", "p.jsonl", lines(PC) + b'{"prompt": "a" "b"}\n', "dataset_invalid", ("line 2", "not valid JSON")),
    BadDataset("pc-completion-missing", "p.jsonl", lines(PC, {"prompt": "only"}), "dataset_invalid", ("line 2", "completion")),
    BadDataset("pc-wrong-type", "p.jsonl", lines(PC, {"prompt": ["a"], "completion": "b"}), "dataset_invalid", ("line 2", "prompt")),
    BadDataset("pc-empty-completion", "p.jsonl", lines(PC, {"prompt": "a", "completion": ""}), "dataset_invalid", ("line 2", "completion")),
    BadDataset("pc-huge-line", "p.jsonl", lines(PC, {"prompt": HUGE, "completion": "x"}), "rows_too_long", ("line 2",)),
    BadDataset("pc-json-array-broken", "p.json", b'[{"prompt": "a", "completion": "b"},', "dataset_unreadable", ("not valid JSON",)),
    BadDataset("pc-json-empty-array", "p.json", b"[]", "dataset_empty", ("no rows",)),
    BadDataset("pc-gzip-truncated", "p.jsonl.gz", gzip.compress(lines(PC, PC))[:-12], "dataset_unreadable", ("gzip",)),
    # text
    BadDataset("text-wrong-type", "t.jsonl", lines(TEXT, {"text": 12}), "dataset_invalid", ("line 2", "text")),
    BadDataset("text-empty", "t.jsonl", lines(TEXT, {"text": ""}), "dataset_invalid", ("line 2", "text")),
    BadDataset("text-row-not-object", "t.jsonl", lines(TEXT, [1, 2]), "dataset_invalid", ("line 2",)),
    BadDataset("text-unknown-shape", "t.jsonl", lines({"body": "x"}, {"body": "y"}), "dataset_unknown_format", ("body",)),
    BadDataset("pc-csv-empty-cell", "p.csv", csv_bytes(["prompt", "completion"], ["a", "b"], ["c", ""]), "dataset_invalid", ("line 3", "completion")),
    BadDataset("text-csv-header-only", "t.csv", csv_bytes(["text"]), "dataset_empty", ("no rows",)),
    BadDataset("text-not-utf8-csv", "t.csv", b"text\ncaf\xe9\n", "dataset_encoding", ("line 2", "UTF-8")),
    # alpaca
    BadDataset("alpaca-output-missing", "a.jsonl", lines(ALPACA, {"instruction": "x", "input": ""}), "dataset_invalid", ("line 2", "output")),
    BadDataset("alpaca-wrong-type", "a.jsonl", lines(ALPACA, {**ALPACA, "output": 4}), "dataset_invalid", ("line 2", "output")),
    BadDataset("alpaca-empty-instruction", "a.jsonl", lines(ALPACA, {**ALPACA, "instruction": ""}), "dataset_invalid", ("line 2", "instruction")),
    BadDataset("alpaca-parquet-null", "a.parquet", parquet({"instruction": ["x", None], "input": ["", ""], "output": ["y", "z"]}), "dataset_invalid", ("line 2", "instruction")),
    BadDataset("alpaca-parquet-no-rows", "a.parquet", parquet({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), "dataset_empty", ("no rows",)),
    # sharegpt
    BadDataset("sharegpt-unknown-speaker", "s.jsonl", lines(SHAREGPT, {"conversations": [{"from": "robot", "value": "x"}]}), "dataset_invalid", ("line 2", "conversations[0]")),
    BadDataset("sharegpt-value-missing", "s.jsonl", lines(SHAREGPT, {"conversations": [{"from": "human"}]}), "dataset_invalid", ("line 2", "conversations[0]")),
    BadDataset("sharegpt-not-list", "s.jsonl", lines(SHAREGPT, {"conversations": {"from": "human"}}), "dataset_invalid", ("line 2", "conversations")),
    BadDataset("sharegpt-empty-value", "s.jsonl", lines(SHAREGPT, {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]}), "dataset_invalid", ("line 2", "conversations[0]")),
    # containers
    BadDataset("binary-garbage", "g.bin", bytes(range(256)) * 8, "dataset_encoding", ("UTF-8",)),
    BadDataset("parquet-corrupt", "x.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1", "dataset_unreadable", ("Parquet",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset_jobs(service: Service, tiny_model: str) -> dict[str, dict[str, Any]]:
    """Every bad dataset uploaded and submitted at once, then waited for: id -> finished job."""
    submitted = {}
    for case in DATASETS:
        file_id = service.upload(case.filename, case.content)
        job = service.create_job(
            base_model=tiny_model,
            dataset_url=file_id,
            hyperparameters={"n_epochs": 1, "batch_size": 2, "max_seq_length": 64},
            metadata={"case": case.id},
        )
        submitted[case.id] = job["id"]
    return {case_id: service.wait_for(job_id) for case_id, job_id in submitted.items()}


@pytest.mark.parametrize("case", DATASETS, ids=lambda case: case.id)
def test_bad_dataset_fails_the_job_with_an_actionable_error(
    service: Service, dataset_jobs: dict[str, dict[str, Any]], case: BadDataset
) -> None:
    job = dataset_jobs[case.id]
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["code"] == case.code, error
    assert "dataset_url" in error["message"]
    for mention in case.mentions:
        assert mention in error["message"], (mention, error["message"])
    assert job["adapter"] is None  # nothing stored half-way
    assert service.client.get(f"/jobs/{job['id']}/checkpoints").json()["data"] == []


# --- requests: uploads, dataset URLs, headers ------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    id: str
    method: str
    path: str
    status: int
    code: str
    mentions: tuple[str, ...] = ()
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None


def job_url(id_: str, url: str, *mentions: str, field: str = "dataset_url") -> BadRequest:
    body: dict[str, Any] = {"dataset_url": "https://example.com/ok.jsonl", field: url}
    return BadRequest(
        f"url-{id_}", "POST", "/jobs", 400, "invalid_dataset_url", (field, *mentions), json=body
    )


REQUESTS = [
    # uploads
    BadRequest("upload-empty", "POST", "/files", 400, "empty_file", ("empty",), files={"file": ("e.jsonl", b"")}),
    BadRequest("upload-no-file", "POST", "/files", 422, "validation_error", ("file",), data={"purpose": "fine-tune"}),
    BadRequest("upload-bad-purpose", "POST", "/files", 400, "invalid_purpose", ("purpose", "fine-tune"), files={"file": ("a.jsonl", lines(TEXT))}, data={"purpose": "assistants"}),
    BadRequest("upload-not-multipart", "POST", "/files", 422, "validation_error", ("file",), content=b"raw bytes", headers={"content-type": "application/octet-stream"}),
    BadRequest("upload-bad-idempotency-key", "POST", "/files", 400, "invalid_idempotency_key", ("Idempotency-Key",), files={"file": ("a.jsonl", lines(TEXT))}, headers={"Idempotency-Key": "x" * 300}),
    # dataset URLs
    job_url("ftp", "ftp://example.com/train.jsonl", "ftp://"),
    job_url("gopher", "gopher://example.com/1", "gopher://"),
    job_url("javascript", "javascript:alert(1)", "javascript://"),
    job_url("relative", "train.jsonl", "relative"),
    job_url("no-host", "http:///train.jsonl", "no host"),
    job_url("bad-port", "http://example.com:99999/x", "not a valid URL"),
    job_url("whitespace", " https://example.com/x", "whitespace"),
    job_url("file-outside", "file:///etc/passwd", "not under an allowed directory"),
    job_url("file-traversal", "file:///tmp/../etc/shadow", "not under an allowed directory"),
    job_url("file-host", "file://etc/passwd", "three slashes"),
    job_url("bad-upload-id", "file-../../etc", "not a valid uploaded file id"),
    job_url("metadata-ip", "http://169.254.169.254/latest/meta-data/", "TUNESERVE_ALLOW_PRIVATE_NETWORKS"),
    job_url("loopback", "http://127.0.0.1:6379/", "TUNESERVE_ALLOW_PRIVATE_NETWORKS"),
    job_url("validation-private", "http://10.1.2.3/v.jsonl", "TUNESERVE_ALLOW_PRIVATE_NETWORKS", field="validation_url"),
    BadRequest("url-unknown-upload", "POST", "/jobs", 404, "file_not_found", ("dataset_url", "file-doesnotexist"), json={"dataset_url": "file-doesnotexist"}),
    # headers
    BadRequest("header-json-as-text", "POST", "/jobs", 422, "validation_error", (), content=b'{"dataset_url": "https://example.com/x"}', headers={"content-type": "text/plain"}),
    BadRequest("header-broken-json", "POST", "/jobs", 400, "invalid_json", ("not valid JSON",), content=b'{"dataset_url": ', headers={"content-type": "application/json"}),
    BadRequest("header-idempotency-key-control-chars", "POST", "/jobs", 400, "invalid_idempotency_key", ("Idempotency-Key",), json={"dataset_url": "https://example.com/x"}, headers={"Idempotency-Key": "a\tb"}),
    BadRequest("header-last-event-id-not-number", "GET", "/jobs/ftjob-x/events/stream", 422, "validation_error", ("Last-Event-ID",), headers={"Last-Event-ID": "abc"}),
    BadRequest("header-no-key", "GET", "/jobs", 401, "missing_api_key", ("Authorization: Bearer",), headers={"Authorization": ""}),
    BadRequest("header-wrong-scheme", "GET", "/jobs", 401, "missing_api_key", ("Bearer",), headers={"Authorization": "Token abc"}),
    BadRequest("header-unknown-key", "GET", "/jobs", 401, "invalid_api_key", ("not valid",), headers={"Authorization": "Bearer ts_unknown"}),
    BadRequest("header-huge-content-length", "POST", "/jobs", 413, "request_too_large", ("TUNESERVE_MAX_REQUEST_BYTES",), content=b" " * (9 * 1024 * 1024), headers={"content-type": "application/json"}),
]  # fmt: skip


def _counts(service: Service) -> tuple[int, int]:
    jobs = service.client.get("/jobs", params={"limit": 100}).json()["data"]
    files = service.client.get("/files", params={"limit": 1000}).json()["data"]
    return len(jobs), len(files)


def _stored_uploads(service: Service) -> set[str]:
    from app.settings import get_settings

    directory = get_settings().artifacts_dir / "files"
    return {path.name for path in directory.iterdir()} if directory.is_dir() else set()


@pytest.mark.parametrize("case", REQUESTS, ids=lambda case: case.id)
def test_bad_request_is_refused_with_a_clear_error(
    service: Service, tiny_model: str, case: BadRequest
) -> None:
    before, stored_before = _counts(service), _stored_uploads(service)
    body = case.json
    if case.path == "/jobs" and body is not None:
        body = {"base_model": tiny_model, **body}
    answer = service.client.request(
        case.method,
        case.path,
        json=body,
        files=case.files,
        data=case.data,
        content=case.content,
        headers=case.headers,
    )
    assert answer.status_code == case.status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"code", "message", "detail"}
    assert error["code"] == case.code, error
    for mention in case.mentions:
        assert mention in error["message"], (mention, error["message"])
    # Nothing stored half-way, and the service goes on serving.
    assert _counts(service) == before
    assert _stored_uploads(service) == stored_before
    assert service.client.get("/healthz").status_code == 200


def test_the_corpus_is_large(service: Service) -> None:
    assert len(DATASETS) + len(REQUESTS) >= 60
    assert len({case.id for case in DATASETS} | {case.id for case in REQUESTS}) == len(
        DATASETS
    ) + len(REQUESTS)
