"""Bad requests against the live service (real api + Celery worker, tiny model).

Every case asserts the exact status, the one error body shape
`{"error": {"code", "message", "detail"}}`, the stable error code, and that the message names the
offending field or thing. 422 is for payload validation only; domain errors carry their status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service

# Placeholders, replaced when a case is sent (the values exist only once the service is up).
MODEL = "<tiny-model>"  # the tiny registered base model
JOB = "<failed-job>"  # a job on the tiny model whose dataset failed validation: no adapter
DROP = object()  # as a value in a body change: remove that key from the base body

# Passes the submit-time URL checks; a job wrongly accepted with it fails fast (nothing listens).
UNREACHABLE = "http://tuneserve-test-unreachable.invalid/train.jsonl"
JOB_BODY: dict[str, Any] = {"base_model": MODEL, "dataset_url": UNREACHABLE}
GEN_BODY: dict[str, Any] = {"base_model": MODEL, "prompt": "Hello", "max_new_tokens": 4}
ERROR_KEYS = {"code", "message", "detail"}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    mentions: tuple[str, ...] = ()  # each must appear in error.message
    field: str | None = None  # 422: some problem in error.detail is about this field (prefix)
    json: Any = None  # None: no JSON body
    content: bytes | None = None
    headers: dict[str, str] | None = None
    params: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = {**base, **changes}
    return {key: value for key, value in body.items() if value is not DROP}


def invalid(field: str, *mentions: str) -> dict[str, Any]:
    """The expectation of a payload validation error about `field`."""
    return {
        "status": 422,
        "code": "validation_error",
        "field": field,
        "mentions": mentions or (field,),
    }


def job(
    id_: str,
    changes: dict[str, Any],
    *,
    status: int,
    code: str,
    mentions: tuple[str, ...] = (),
    field: str | None = None,
) -> Case:
    return Case(
        f"jobs-{id_}",
        "POST",
        "/jobs",
        status,
        code,
        mentions,
        field,
        json=_changed(JOB_BODY, changes),
    )


def job_invalid(id_: str, changes: dict[str, Any], field: str, *mentions: str) -> Case:
    return job(id_, changes, **invalid(field, *mentions))


def hyper(id_: str, name: str, value: Any) -> Case:
    return job_invalid(
        f"hyperparameters-{id_}",
        {"hyperparameters": {name: value}},
        f"hyperparameters.{name}",
    )


def lora(id_: str, name: str, value: Any) -> Case:
    return job_invalid(f"lora-{id_}", {"lora": {name: value}}, f"lora.{name}")


def gen(
    id_: str,
    changes: dict[str, Any],
    *,
    status: int,
    code: str,
    mentions: tuple[str, ...] = (),
    field: str | None = None,
) -> Case:
    return Case(
        f"generate-{id_}",
        "POST",
        "/generate",
        status,
        code,
        mentions,
        field,
        json=_changed(GEN_BODY, changes),
    )


def gen_invalid(id_: str, changes: dict[str, Any], field: str, *mentions: str) -> Case:
    return gen(id_, changes, **invalid(field, *mentions))


def get(
    id_: str,
    path: str,
    status: int,
    code: str,
    *mentions: str,
    field: str | None = None,
    params: dict[str, Any] | None = None,
) -> Case:
    return Case(id_, "GET", path, status, code, mentions, field, params=params)


def get_invalid(id_: str, path: str, params: dict[str, Any], field: str) -> Case:
    return Case(id_, "GET", path, params=params, **invalid(field))


CASES: list[Case] = [
    # -- POST /jobs: body shape ---------------------------------------------------------------
    job_invalid("unknown-top-level-field", {"epochs": 3}, "epochs"),
    job_invalid("missing-dataset-url", {"dataset_url": DROP}, "dataset_url"),
    job_invalid("dataset-url-null", {"dataset_url": None}, "dataset_url"),
    job_invalid("dataset-url-not-a-string", {"dataset_url": 7}, "dataset_url"),
    Case("jobs-body-json-array", "POST", "/jobs", json=[JOB_BODY], **invalid("body")),
    Case(
        "jobs-body-empty",
        "POST",
        "/jobs",
        content=b"",
        headers={"content-type": "application/json"},
        **invalid("body"),
    ),
    Case(
        "jobs-body-not-json",
        "POST",
        "/jobs",
        400,
        "invalid_json",
        ("JSON", "body"),
        content=b'{"dataset_url": "file-x",',
        headers={"content-type": "application/json"},
    ),
    # -- POST /jobs: hyperparameters -----------------------------------------------------------
    job_invalid(
        "unknown-hyperparameter-n_epoch",
        {"hyperparameters": {"n_epoch": 3}},
        "hyperparameters.n_epoch",
    ),
    job_invalid("hyperparameters-not-an-object", {"hyperparameters": [3]}, "hyperparameters"),
    hyper("n_epochs-0", "n_epochs", 0),
    hyper("n_epochs-101", "n_epochs", 101),
    hyper("n_epochs-string", "n_epochs", "three"),
    hyper("n_epochs-fractional", "n_epochs", 2.5),
    hyper("n_epochs-bool", "n_epochs", True),
    hyper("learning_rate-0", "learning_rate", 0),
    hyper("learning_rate-1.5", "learning_rate", 1.5),
    hyper("learning_rate-string", "learning_rate", "fast"),
    hyper("batch_size-0", "batch_size", 0),
    hyper("batch_size-1025", "batch_size", 1025),
    hyper("batch_size-list", "batch_size", [8]),
    hyper("gradient_accumulation_steps-0", "gradient_accumulation_steps", 0),
    hyper("gradient_accumulation_steps-1025", "gradient_accumulation_steps", 1025),
    hyper("max_seq_length-15", "max_seq_length", 15),
    hyper("max_seq_length-131073", "max_seq_length", 131073),
    hyper("warmup_ratio-negative", "warmup_ratio", -0.1),
    hyper("warmup_ratio-1", "warmup_ratio", 1.0),
    hyper("lr_scheduler-unknown", "lr_scheduler", "cosine_restarts"),
    hyper("lr_scheduler-number", "lr_scheduler", 3),
    hyper("weight_decay-negative", "weight_decay", -0.1),
    hyper("weight_decay-1.5", "weight_decay", 1.5),
    hyper("seed-negative", "seed", -1),
    hyper("seed-2**32", "seed", 2**32),
    hyper("seed-string", "seed", "lucky"),
    Case(
        "jobs-hyperparameters-learning_rate-nan",
        "POST",
        "/jobs",
        content=b'{"dataset_url": "'
        + UNREACHABLE.encode()
        + b'", "hyperparameters": {"learning_rate": NaN}}',
        headers={"content-type": "application/json"},
        **invalid("hyperparameters.learning_rate"),
    ),
    # -- POST /jobs: lora ---------------------------------------------------------------------
    job_invalid("lora-unknown-field", {"lora": {"rank": 8}}, "lora.rank"),
    lora("r-0", "r", 0),
    lora("r-257", "r", 257),
    lora("r-string", "r", "sixteen"),
    lora("alpha-0", "alpha", 0),
    lora("alpha-1025", "alpha", 1025),
    lora("dropout-negative", "dropout", -0.1),
    lora("dropout-0.95", "dropout", 0.95),
    lora("dropout-string", "dropout", "high"),
    lora("target_modules-empty-list", "target_modules", []),
    lora("target_modules-not-identifiers", "target_modules", ["q-proj", "1x"]),
    lora("target_modules-65-names", "target_modules", [f"m{i}" for i in range(65)]),
    lora("target_modules-other-string", "target_modules", "q_proj"),
    lora("target_modules-number", "target_modules", 7),
    lora("target_modules-list-of-numbers", "target_modules", [1, 2]),
    # -- POST /jobs: suffix, metadata -----------------------------------------------------------
    job_invalid("suffix-bad-chars", {"suffix": "my suffix!"}, "suffix"),
    job_invalid("suffix-41-chars", {"suffix": "a" * 41}, "suffix"),
    job_invalid("suffix-empty", {"suffix": ""}, "suffix"),
    job_invalid(
        "metadata-17-pairs",
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        "metadata",
        "metadata",
        "16",
    ),
    job_invalid("metadata-long-key", {"metadata": {"k" * 65: "v"}}, "metadata", "metadata", "64"),
    job_invalid("metadata-empty-key", {"metadata": {"": "v"}}, "metadata"),
    job_invalid(
        "metadata-long-value",
        {"metadata": {"team": "v" * 513}},
        "metadata",
        "metadata",
        "team",
        "512",
    ),
    job_invalid("metadata-number-value", {"metadata": {"team": 5}}, "metadata.team"),
    job_invalid("metadata-object-value", {"metadata": {"team": {"a": "b"}}}, "metadata.team"),
    job_invalid("metadata-not-an-object", {"metadata": ["team"]}, "metadata"),
    # -- POST /jobs: base model ---------------------------------------------------------------
    job(
        "unknown-base-model",
        {"base_model": "no-such-model"},
        status=400,
        code="unknown_base_model",
        mentions=("no-such-model", MODEL),
    ),
    job_invalid("base-model-201-chars", {"base_model": "m" * 201}, "base_model"),
    job_invalid("base-model-empty", {"base_model": ""}, "base_model"),
    # -- POST /jobs: dataset and validation URLs ------------------------------------------------
    job_invalid("dataset-url-empty", {"dataset_url": ""}, "dataset_url"),
    job(
        "dataset-url-ftp",
        {"dataset_url": "ftp://example.com/train.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "ftp://"),
    ),
    job(
        "dataset-url-relative-path",
        {"dataset_url": "data/train.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "data/train.jsonl", "relative"),
    ),
    job(
        "dataset-url-http-without-host",
        {"dataset_url": "http://"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "host"),
    ),
    job(
        "dataset-url-file-with-host",
        {"dataset_url": "file://data/train.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "file:///"),
    ),
    job(
        "dataset-url-leading-space",
        {"dataset_url": " https://example.com/t.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "whitespace"),
    ),
    job(
        "dataset-url-unknown-file-id",
        {"dataset_url": "file-doesnotexist"},
        status=404,
        code="file_not_found",
        mentions=("file-doesnotexist",),
    ),
    job(
        "dataset-url-file-outside-allowed-dirs",
        {"dataset_url": "file:///etc/passwd"},
        status=400,
        code="invalid_dataset_url",
        mentions=("dataset_url", "/etc/passwd"),
    ),
    job_invalid("validation-url-empty", {"validation_url": ""}, "validation_url"),
    job(
        "validation-url-relative-path",
        {"validation_url": "valid.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("validation_url", "valid.jsonl"),
    ),
    job(
        "validation-url-ftp",
        {"validation_url": "ftp://example.com/v.jsonl"},
        status=400,
        code="invalid_dataset_url",
        mentions=("validation_url", "ftp://"),
    ),
    job(
        "validation-url-unknown-file-id",
        {"validation_url": "file-nope"},
        status=404,
        code="file_not_found",
        mentions=("file-nope",),
    ),
    job(
        "validation-url-file-outside-allowed-dirs",
        {"validation_url": "file:///etc/hosts"},
        status=400,
        code="invalid_dataset_url",
        mentions=("validation_url", "/etc/hosts"),
    ),
    # -- GET /jobs, one job, cancel, events ----------------------------------------------------
    get_invalid("list-jobs-limit-0", "/jobs", {"limit": 0}, "limit"),
    get_invalid("list-jobs-limit-101", "/jobs", {"limit": 101}, "limit"),
    get_invalid("list-jobs-limit-not-a-number", "/jobs", {"limit": "ten"}, "limit"),
    get_invalid("list-jobs-bad-status", "/jobs", {"status": "finished"}, "status"),
    get_invalid("list-jobs-after-65-chars", "/jobs", {"after": "x" * 65}, "after"),
    get(
        "list-jobs-unknown-after-cursor",
        "/jobs",
        400,
        "invalid_cursor",
        "after",
        "ftjob-nope",
        params={"after": "ftjob-nope"},
    ),
    get("get-job-unknown", "/jobs/ftjob-nope", 404, "job_not_found", "ftjob-nope"),
    Case(
        "cancel-job-unknown",
        "POST",
        "/jobs/ftjob-nope/cancel",
        404,
        "job_not_found",
        ("ftjob-nope",),
    ),
    Case(
        "cancel-job-already-failed",
        "POST",
        f"/jobs/{JOB}/cancel",
        409,
        "illegal_transition",
        (JOB, "failed"),
    ),
    get("job-events-unknown-job", "/jobs/ftjob-nope/events", 404, "job_not_found", "ftjob-nope"),
    get_invalid("job-events-after-negative", f"/jobs/{JOB}/events", {"after": -1}, "after"),
    get_invalid("job-events-after-not-a-number", f"/jobs/{JOB}/events", {"after": "x"}, "after"),
    get_invalid("job-events-limit-0", f"/jobs/{JOB}/events", {"limit": 0}, "limit"),
    get_invalid("job-events-limit-1001", f"/jobs/{JOB}/events", {"limit": 1001}, "limit"),
    Case(
        "job-events-after-2**63",
        "GET",
        f"/jobs/{JOB}/events",
        params={"after": 2**63},
        **invalid("after"),
    ),
    # -- files ----------------------------------------------------------------------------------
    Case("upload-no-file-part", "POST", "/files", data={"purpose": "fine-tune"}, **invalid("file")),
    Case(
        "upload-file-under-another-name",
        "POST",
        "/files",
        files={"dataset": ("train.jsonl", b'{"text": "x"}\n')},
        **invalid("file"),
    ),
    Case(
        "upload-empty-file",
        "POST",
        "/files",
        400,
        "empty_file",
        ("file", "empty"),
        files={"file": ("train.jsonl", b"")},
    ),
    Case(
        "upload-bad-purpose",
        "POST",
        "/files",
        400,
        "invalid_purpose",
        ("purpose", "assistants"),
        files={"file": ("train.jsonl", b'{"text": "x"}\n')},
        data={"purpose": "assistants"},
    ),
    get("get-file-unknown", "/files/file-nope", 404, "file_not_found", "file-nope"),
    get_invalid("list-files-limit-0", "/files", {"limit": 0}, "limit"),
    # -- adapters -------------------------------------------------------------------------------
    get("get-adapter-unknown", "/adapters/adapter-nope", 404, "adapter_not_found", "adapter-nope"),
    get_invalid("list-adapters-limit-0", "/adapters", {"limit": 0}, "limit"),
    get_invalid("list-adapters-limit-101", "/adapters", {"limit": 101}, "limit"),
    get(
        "list-adapters-unknown-after-cursor",
        "/adapters",
        400,
        "invalid_cursor",
        "after",
        "adapter-nope",
        params={"after": "adapter-nope"},
    ),
    # -- POST /generate -------------------------------------------------------------------------
    gen_invalid(
        "prompt-and-messages",
        {"messages": [{"role": "user", "content": "Hi"}]},
        "body",
        "prompt",
        "messages",
    ),
    gen_invalid("neither-prompt-nor-messages", {"prompt": DROP}, "body", "prompt", "messages"),
    gen_invalid("messages-empty-list", {"prompt": DROP, "messages": []}, "messages"),
    gen_invalid(
        "message-bad-role",
        {"prompt": DROP, "messages": [{"role": "robot", "content": "Hi"}]},
        "messages.0.role",
    ),
    gen_invalid(
        "message-without-content",
        {"prompt": DROP, "messages": [{"role": "user"}]},
        "messages.0.content",
    ),
    gen_invalid("unknown-field-max_tokens", {"max_tokens": 4}, "max_tokens"),
    gen(
        "adapter-unknown-id",
        {"base_model": DROP, "adapter": "adapter-nope"},
        status=404,
        code="adapter_not_found",
        mentions=("adapter-nope",),
    ),
    gen(
        "adapter-unknown-name",
        {"base_model": DROP, "adapter": "ft:tiny:local:x"},
        status=404,
        code="adapter_not_found",
        mentions=("ft:tiny:local:x",),
    ),
    gen(
        "adapter-unknown-job",
        {"base_model": DROP, "adapter": "ftjob-nope"},
        status=404,
        code="job_not_found",
        mentions=("ftjob-nope",),
    ),
    gen(
        "adapter-of-failed-job",
        {"base_model": DROP, "adapter": JOB},
        status=409,
        code="adapter_not_ready",
        mentions=(JOB, "failed"),
    ),
    gen_invalid(
        "adapter-and-base-model", {"adapter": "adapter-nope"}, "body", "adapter", "base_model"
    ),
    gen_invalid("max_new_tokens-0", {"max_new_tokens": 0}, "max_new_tokens"),
    gen_invalid("max_new_tokens-string", {"max_new_tokens": "many"}, "max_new_tokens"),
    gen_invalid("max_new_tokens-bool", {"max_new_tokens": True}, "max_new_tokens"),
    gen(
        "max_new_tokens-above-limit",
        {"max_new_tokens": 1025},
        status=400,
        code="max_new_tokens_too_large",
        mentions=("max_new_tokens", "1024"),
    ),
    gen_invalid("temperature-negative", {"temperature": -1}, "temperature"),
    gen_invalid("temperature-3", {"temperature": 3}, "temperature"),
    gen_invalid("top_p-0", {"top_p": 0}, "top_p"),
    gen_invalid("top_p-1.5", {"top_p": 1.5}, "top_p"),
    gen_invalid("seed-negative", {"seed": -1}, "seed"),
    gen_invalid("stop-5-sequences", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop", "4"),
    gen_invalid("stop-sequence-101-chars", {"stop": "x" * 101}, "stop", "stop", "100"),
    gen_invalid("stop-empty-sequence", {"stop": [""]}, "stop"),
    gen_invalid(
        "stop-empty-list",
        {"stop": []},
        "stop",
    ),
    gen(
        "unknown-base-model",
        {"base_model": "no-such-model"},
        status=400,
        code="unknown_base_model",
        mentions=("no-such-model",),
    ),
    gen_invalid("base-model-empty", {"base_model": ""}, "base_model"),
    gen_invalid(
        "prompt-empty",
        {"prompt": ""},
        "prompt",
    ),
    gen(
        "prompt-longer-than-context",
        {"prompt": "word " * 1100},
        status=400,
        code="context_length_exceeded",
        mentions=("prompt", "1024"),
    ),
    gen(
        "max_new_tokens-past-context",
        {"max_new_tokens": 1024},
        status=400,
        code="context_length_exceeded",
        mentions=("max_new_tokens", "1024"),
    ),
    # -- routing --------------------------------------------------------------------------------
    get("unknown-route", "/no-such-route", 404, "not_found"),
    get(
        "unknown-route-message-names-path",
        "/no-such-route",
        404,
        "not_found",
        "/no-such-route",
    ),
    Case("wrong-method", "DELETE", "/jobs", 405, "method_not_allowed"),
    Case(
        "wrong-method-message-names-method",
        "DELETE",
        "/jobs",
        405,
        "method_not_allowed",
        ("DELETE", "/jobs", "GET", "POST"),
    ),
]


def _cases(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


def _fill(value: Any, ctx: dict[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, real in ctx.items():
            value = value.replace(placeholder, real)
        return value
    if isinstance(value, dict):
        return {_fill(key, ctx): _fill(item, ctx) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_fill(item, ctx) for item in value)
    return value


@pytest.fixture(scope="module")
def ctx(service: Service, tiny_model: str) -> dict[str, str]:
    """Values for the placeholders; the failed job is one whose dataset did not validate."""
    rows = arithmetic_rows(4)
    rows[1]["messages"][1]["content"] = ""
    file_id = service.upload("broken.jsonl", jsonl(rows))
    created = service.create_job(base_model=tiny_model, dataset_url=file_id)
    failed = service.wait_for(created["id"], timeout=120)
    assert failed["status"] == "failed", failed
    return {MODEL: tiny_model, JOB: failed["id"]}


SENT: dict[str, httpx.Response] = {}


def send(service: Service, ctx: dict[str, str], case: Case) -> httpx.Response:
    response = service.client.request(
        case.method,
        _fill(case.path, ctx),
        json=_fill(case.json, ctx),
        content=case.content,
        headers=case.headers,
        params=case.params,
        files=case.files,
        data=case.data,
    )
    if case.method == "POST" and case.path == "/jobs" and response.status_code == 201:
        # A bad request that was wrongly accepted must not keep the worker busy.
        service.client.post(f"/jobs/{response.json()['id']}/cancel")
    SENT[case.id] = response
    return response


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    for key in ("code", "message"):
        assert isinstance(body["error"][key], str), body
        assert body["error"][key], body
    return dict(body["error"])


def test_cases_are_many_and_named_uniquely() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 45


@pytest.mark.parametrize("case", _cases(CASES))
def test_bad_request(service: Service, ctx: dict[str, str], case: Case) -> None:
    response = send(service, ctx, case)
    assert response.status_code == case.status, response.text
    error = assert_error_shape(response)
    assert error["code"] == case.code, error
    for word in _fill(case.mentions, ctx):
        assert word in error["message"], (word, error["message"])
    if case.field is not None:
        fields = [problem["field"] for problem in error["detail"]]
        assert any(name.startswith(case.field) for name in fields), (case.field, fields)


def _responses(service: Service, ctx: dict[str, str]) -> dict[str, httpx.Response]:
    """Every case's response: those the table test already got, the others sent now."""
    return {case.id: SENT.get(case.id) or send(service, ctx, case) for case in CASES}


def test_every_error_status_has_the_error_shape(service: Service, ctx: dict[str, str]) -> None:
    errors = {case_id: r for case_id, r in _responses(service, ctx).items() if r.status_code >= 400}
    assert len(errors) > len(CASES) / 2
    for response in errors.values():
        assert_error_shape(response)


def test_no_bad_request_is_a_500(service: Service, ctx: dict[str, str]) -> None:
    statuses = {case_id: r.status_code for case_id, r in _responses(service, ctx).items()}
    assert {case_id: s for case_id, s in statuses.items() if s >= 500} == {}
