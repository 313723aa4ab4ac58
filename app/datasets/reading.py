"""A job's dataset as the worker validates it: brought here, parsed, counted in tokens after the
chat template, and checked against max_seq_length. The worker's `validating` stage
(worker/datasets.py) and job plans (app/jobs/plan.py) both read datasets through these functions,
so a plan sees exactly what the job will.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from app.datasets.fetch import FetchedDataset, FetchError, fetch_dataset
from app.datasets.formats import (
    PREFERENCE_EXAMPLE,
    DatasetError,
    DatasetFormat,
    ParsedDataset,
    parse_dataset,
)
from app.datasets.loss_mask import one_side, prompt_ids
from app.db import unit_of_work
from app.errors import InvalidRequest, NotFound
from app.files.repository import get_file
from app.graders import check_row
from app.jobs.schemas import Method, MethodType
from app.settings import Settings
from app.storage import artifact_store

MAX_LISTED_ROWS = 10


class DatasetFailure(InvalidRequest):
    """A reason the dataset cannot be trained on that the user can act on (not found, invalid,
    rows too long…): fails a job, or answers a plan with a 400."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message, code=code, detail=detail)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.detail))


def bring_here(
    owner: str, url: str, settings: Settings, dest: Path, field_name: str
) -> FetchedDataset:
    """An uploaded file from the artifact store (read in place when it is local), or a URL
    through the guarded fetch with the dataset limits."""
    if url.startswith("file-"):
        try:
            with unit_of_work() as session:
                file = get_file(session, owner=owner, file_id=url)
        except NotFound as exc:
            raise DatasetFailure("dataset_not_found", f"{field_name}: {exc.message}") from exc
        store = artifact_store(settings)
        path = store.local_path(file.path)
        if path is None:
            path = dest
            store.get_file(file.path, path)
        return FetchedDataset(
            path=path, filename=file.filename, bytes=file.bytes, sha256=file.sha256, etag=None
        )
    try:
        return fetch_dataset(
            url,
            dest,
            allowed_file_dirs=settings.allowed_file_dirs,
            max_bytes=settings.max_dataset_bytes,
            timeout_seconds=settings.fetch_timeout_seconds,
            max_seconds=settings.fetch_max_seconds,
            allow_private_networks=settings.allow_private_networks,
        )
    except FetchError as exc:
        raise DatasetFailure(exc.code, f"{field_name}: {exc.message}") from exc


def parse(
    fetched: FetchedDataset, field_name: str, settings: Settings, *, method: Method
) -> ParsedDataset:
    """The dataset read and checked row by row, and fit for the job's method: preference rows
    (a chosen and a rejected answer) for dpo, orpo and reward_model, prompt rows with the fields
    the grader reads for reinforcement, any other shape for supervised."""
    parsed = _parse(fetched, field_name, settings, method)
    preference = parsed.format is DatasetFormat.PREFERENCE
    where = f"{field_name} ({fetched.filename})"
    if method.learns_preferences and not preference:
        raise DatasetFailure(
            "dataset_method_mismatch",
            f"{where}: method {method.type} learns from preference rows, each a prompt with a "
            f"chosen and a rejected answer, but this dataset's rows are {parsed.format.value} "
            f"(line {parsed.lines[0]}). Give rows like {PREFERENCE_EXAMPLE}, or use method "
            "supervised.",
            {"field": field_name, "format": parsed.format.value},
        )
    if method.type is MethodType.SUPERVISED and preference:
        raise DatasetFailure(
            "dataset_method_mismatch",
            f"{where}: its rows are preference rows (a chosen and a rejected answer, line "
            f"{parsed.lines[0]}), which method supervised cannot learn from; set "
            'method {"type": "dpo"} (or "orpo") to learn the preference.',
            {"field": field_name, "format": parsed.format.value},
        )
    return parsed


def _parse(
    fetched: FetchedDataset, field_name: str, settings: Settings, method: Method
) -> ParsedDataset:
    grader = method.reinforcement.grader if method.reinforcement else None
    try:
        return parse_dataset(
            fetched.path,
            filename=fetched.filename,
            max_bytes=settings.max_dataset_bytes,
            max_rows=settings.max_dataset_rows,
            prompts=grader is not None,
            row_check=None if grader is None else partial(check_row, grader),
        )
    except DatasetError as exc:
        detail = {
            "field": field_name,
            "file": fetched.filename,
            "error_count": exc.error_count,
            "errors": [
                {"line": error.line, "field": error.field, "message": error.message}
                for error in exc.errors
            ],
        }
        raise DatasetFailure(exc.code, f"{field_name} ({fetched.filename}): {exc}", detail) from exc


def token_counts(parsed: ParsedDataset, tokenizer: Any, *, answer_tokens: int = 0) -> list[int]:
    """Tokens of each row as training sees it (chat template applied, EOS counted); a prompt
    row counts its prompt and the `answer_tokens` the model may write to it."""
    if parsed.format is DatasetFormat.PROMPT:
        return [prompt_tokens(tokenizer, record) + answer_tokens for record in parsed.records]
    if parsed.format is DatasetFormat.PREFERENCE:  # the longer of prompt + each answer
        return [
            max(_tokens(tokenizer, one_side(record, side)) for side in ("chosen", "rejected"))
            for record in parsed.records
        ]
    return [_tokens(tokenizer, record) for record in parsed.records]


def prompt_tokens(tokenizer: Any, record: dict[str, Any]) -> int:
    """Tokens of a prompt row as the model reads it, ready for the answer."""
    return len(prompt_ids(tokenizer, record["prompt"]))


def _tokens(tokenizer: Any, record: dict[str, Any]) -> int:
    if "completion" in record:
        return len(tokenizer(record["prompt"] + record["completion"])["input_ids"]) + 1  # + eos
    if "text" in record:
        return len(tokenizer(record["text"])["input_ids"]) + 1
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=True)
    return len(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def rows_too_long(
    parsed: ParsedDataset, counts: list[int], max_seq_length: int
) -> list[tuple[int, int]]:
    """(line, tokens) of every row longer than max_seq_length."""
    return [
        (line, count)
        for line, count in zip(parsed.lines, counts, strict=True)
        if count > max_seq_length
    ]


def too_long_failure(
    too_long: list[tuple[int, int]], max_seq_length: int, filename: str, field_name: str
) -> DatasetFailure:
    listed = ", ".join(
        f"line {line} ({count} tokens)" for line, count in too_long[:MAX_LISTED_ROWS]
    )
    longest = max(count for _, count in too_long)
    return DatasetFailure(
        "rows_too_long",
        f"{field_name} ({filename}): {len(too_long)} row(s) are longer than "
        f"max_seq_length={max_seq_length} tokens after the chat template: {listed}. Raise "
        f"hyperparameters.max_seq_length to at least {longest}, or shorten or remove those rows.",
        {
            "field": field_name,
            "max_seq_length": max_seq_length,
            "rows": [{"line": line, "tokens": count} for line, count in too_long[:50]],
            "count": len(too_long),
        },
    )


def check_lengths(
    parsed: ParsedDataset,
    counts: list[int],
    max_seq_length: int,
    fetched: FetchedDataset,
    field_name: str,
) -> None:
    too_long = rows_too_long(parsed, counts, max_seq_length)
    if too_long:
        raise too_long_failure(too_long, max_seq_length, fetched.filename, field_name)
