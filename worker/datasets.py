"""The `validating` stage: bring the dataset files here, check every row, count tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from app.base_models.loading import hub_kwargs
from app.base_models.registry import get_base_model
from app.datasets.fetch import FetchedDataset, FetchError, fetch_dataset
from app.datasets.formats import DatasetError, DatasetFormat, ParsedDataset, parse_dataset
from app.db import unit_of_work
from app.errors import NotFound
from app.files.repository import get_file
from app.jobs.models import Job
from app.settings import Settings
from app.storage import artifact_store
from worker.training import total_steps

logger = logging.getLogger(__name__)
MAX_LISTED_ROWS = 10


class JobFailure(Exception):
    """A reason to fail the job that the user can act on (bad dataset, missing model…)."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class DatasetFacts(TypedDict, total=False):
    rows: int
    format: str
    tokens: int
    max_row_tokens: int
    sha256: str
    bytes: int
    filename: str
    etag: str | None
    validation: dict[str, Any]


@dataclass
class PreparedDatasets:
    facts: DatasetFacts
    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]] | None
    total_steps: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _bring_here(
    job: Job, url: str, settings: Settings, dest: Path, field_name: str
) -> FetchedDataset:
    if url.startswith("file-"):
        try:
            with unit_of_work() as session:
                file = get_file(session, owner=job.owner, file_id=url)
        except NotFound as exc:
            raise JobFailure("dataset_not_found", f"{field_name}: {exc.message}") from exc
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
        raise JobFailure(exc.code, f"{field_name}: {exc.message}") from exc


def _parse(fetched: FetchedDataset, field_name: str, settings: Settings) -> ParsedDataset:
    try:
        return parse_dataset(
            fetched.path,
            filename=fetched.filename,
            max_bytes=settings.max_dataset_bytes,
            max_rows=settings.max_dataset_rows,
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
        raise JobFailure(exc.code, f"{field_name} ({fetched.filename}): {exc}", detail) from exc


def _token_counts(parsed: ParsedDataset, tokenizer: Any) -> list[int]:
    counts = []
    for record in parsed.records:
        if parsed.format is DatasetFormat.PROMPT_COMPLETION:
            ids = tokenizer(record["prompt"] + record["completion"])["input_ids"]
            counts.append(len(ids) + 1)  # + eos
        elif parsed.format is DatasetFormat.TEXT:
            counts.append(len(tokenizer(record["text"])["input_ids"]) + 1)
        else:
            rendered = tokenizer.apply_chat_template(record["messages"], tokenize=True)
            ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
            counts.append(len(ids))
    return counts


def _check_lengths(
    parsed: ParsedDataset,
    counts: list[int],
    max_seq_length: int,
    fetched: FetchedDataset,
    field_name: str,
) -> None:
    too_long = [
        (line, count)
        for line, count in zip(parsed.lines, counts, strict=True)
        if count > max_seq_length
    ]
    if not too_long:
        return
    listed = ", ".join(
        f"line {line} ({count} tokens)" for line, count in too_long[:MAX_LISTED_ROWS]
    )
    longest = max(count for _, count in too_long)
    raise JobFailure(
        "rows_too_long",
        f"{field_name} ({fetched.filename}): {len(too_long)} row(s) are longer than "
        f"max_seq_length={max_seq_length} tokens after the chat template: {listed}. Raise "
        f"hyperparameters.max_seq_length to at least {longest}, or shorten or remove those rows.",
        {
            "field": field_name,
            "max_seq_length": max_seq_length,
            "rows": [{"line": line, "tokens": count} for line, count in too_long[:50]],
            "count": len(too_long),
        },
    )


def prepare_datasets(
    job: Job, settings: Settings, model_location: str, workdir: Path, world_size: int = 1
) -> PreparedDatasets:
    from transformers import AutoTokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    base_model = get_base_model(settings, job.base_model)
    model_kwargs = hub_kwargs(settings, base_model)
    tokenizer = AutoTokenizer.from_pretrained(
        model_location, trust_remote_code=False, **model_kwargs
    )
    max_seq_length = int(job.hyperparameters["max_seq_length"])

    def load(
        url: str, name: str, field_name: str
    ) -> tuple[FetchedDataset, ParsedDataset, list[int]]:
        fetched = _bring_here(job, url, settings, workdir / name, field_name)
        parsed = _parse(fetched, field_name, settings)
        counts = _token_counts(parsed, tokenizer)
        _check_lengths(parsed, counts, max_seq_length, fetched, field_name)
        return fetched, parsed, counts

    fetched, parsed, counts = load(job.dataset_url, "train-dataset", "dataset_url")
    facts: DatasetFacts = {
        "rows": parsed.rows,
        "format": parsed.format.value,
        "tokens": sum(counts),
        "max_row_tokens": max(counts),
        "sha256": fetched.sha256,
        "bytes": fetched.bytes,
        "filename": fetched.filename,
        "etag": fetched.etag,
    }
    eval_records = None
    if job.validation_url:
        v_fetched, v_parsed, v_counts = load(
            job.validation_url, "validation-dataset", "validation_url"
        )
        eval_records = v_parsed.records
        facts["validation"] = {
            "rows": v_parsed.rows,
            "format": v_parsed.format.value,
            "tokens": sum(v_counts),
            "sha256": v_fetched.sha256,
        }
    return PreparedDatasets(
        facts=facts,
        train_records=parsed.records,
        eval_records=eval_records,
        total_steps=total_steps(parsed.rows, job.hyperparameters, world_size),
        model_kwargs=model_kwargs,
    )
