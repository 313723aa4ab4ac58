"""The `validating` stage: bring the dataset files here, check every row, count tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from app.base_models.facts import model_facts
from app.base_models.loading import hub_kwargs
from app.base_models.registry import get_base_model
from app.datasets.fetch import FetchedDataset
from app.datasets.formats import ParsedDataset
from app.datasets.reading import (
    MAX_LISTED_ROWS,
    bring_here,
    check_lengths,
    parse,
    token_counts,
)
from app.devices import Device
from app.evaluation.split import EvaluationSplit, split_records
from app.jobs.auto import Resolved, auto_fields, resolve
from app.jobs.memory import batch_fits, checkpointing_needed, choose_distributed
from app.jobs.models import Job
from app.jobs.schemas import Hyperparameters, Method, TrainingHyperparameters
from app.jobs.steps import total_steps
from app.settings import Settings

logger = logging.getLogger(__name__)
__all__ = ["MAX_LISTED_ROWS", "DatasetFacts", "PreparedDatasets", "prepare_datasets"]


class DatasetFacts(TypedDict, total=False):
    rows: int
    format: str
    tokens: int
    max_row_tokens: int
    sha256: str
    bytes: int
    filename: str
    etag: str | None
    held_out_rows: int
    validation: dict[str, Any]


@dataclass
class PreparedDatasets:
    facts: DatasetFacts
    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]] | None  # the validation set, scored during training
    scored: EvaluationSplit  # the rows the automatic evaluation scores after training
    total_steps: int
    hyperparameters: TrainingHyperparameters  # "auto" resolved
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    auto: list[str] = field(default_factory=list)  # the names that were "auto"
    # On when the job fits this worker's device only with it (app/jobs/memory.py).
    activation_checkpointing: bool = False
    # "fsdp" when the ranks shard the base model (asked, or the job fits only so), else None.
    distributed: str | None = None
    # The base model's tokenizer, as loaded to count the rows' tokens: training in this process
    # takes it on (worker/training.py train_lora) rather than loading it again.
    tokenizer: Any = None


def _bring_here(
    job: Job, url: str, settings: Settings, dest: Path, field_name: str
) -> FetchedDataset:
    return bring_here(job.owner, url, settings, dest, field_name)


def _parse(
    fetched: FetchedDataset, field_name: str, settings: Settings, method: Method
) -> ParsedDataset:
    return parse(fetched, field_name, settings, method=method)


def _token_counts(parsed: ParsedDataset, tokenizer: Any, method: Method) -> list[int]:
    return token_counts(parsed, tokenizer, answer_tokens=method.answer_tokens)


def _check_lengths(
    parsed: ParsedDataset,
    counts: list[int],
    max_seq_length: int,
    fetched: FetchedDataset,
    field_name: str,
) -> None:
    check_lengths(parsed, counts, max_seq_length, fetched, field_name)


def resolve_hyperparameters(
    job: Job,
    settings: Settings,
    *,
    rows: int,
    max_row_tokens: int,
    device: Device | None,
    shards: int = 1,
) -> Resolved:
    """The job's "auto" hyperparameters as numbers for this dataset and this worker's device
    (app/jobs/auto.py has the rules; auto batch_size fits the device's memory, or
    TUNESERVE_DEVICE_MEMORY_BYTES); a job with none is returned as it is."""
    if not auto_fields(job.hyperparameters):
        return Resolved(hyperparameters=dict(job.hyperparameters), auto=[])
    requested = Hyperparameters.model_validate(job.hyperparameters)
    asked = _about_the_job(job, settings, requested.max_seq_length, max_row_tokens, device)
    return resolve(
        job.hyperparameters,
        rows=rows,
        model_params=asked["facts"].params,
        fits=batch_fits(**asked, rows=rows, shards=shards),
    )


def _about_the_job(
    job: Job, settings: Settings, max_seq_length: int, max_row_tokens: int, device: Device | None
) -> dict[str, Any]:
    """What app/jobs/memory.py's fit questions take about this job on this worker's device
    (or TUNESERVE_DEVICE_MEMORY_BYTES; device_bytes None when unknown), but the batch."""
    return {
        "facts": model_facts(settings, get_base_model(settings, job.base_model)),
        "lora": job.lora,
        "seq": min(max_seq_length, max_row_tokens),
        "device_bytes": _device_bytes(settings, device),
        "accelerator": device.accelerator_class if device else "cpu",
        "sequences_per_row": Method.model_validate(job.method or {}).sequences_per_row,
        "quantization": job.quantization,
    }


def _fit_question(
    job: Job,
    settings: Settings,
    hyperparameters: TrainingHyperparameters,
    *,
    rows: int,
    max_row_tokens: int,
    device: Device | None,
) -> dict[str, Any] | None:
    """The arguments app/jobs/memory.py's fit questions take for this job's largest batch on
    this worker's device; None when its memory is unknown."""
    if _device_bytes(settings, device) is None:
        return None
    asked = _about_the_job(job, settings, hyperparameters.max_seq_length, max_row_tokens, device)
    return {**asked, "batch": min(hyperparameters.batch_size, rows)}


def _device_bytes(settings: Settings, device: Device | None) -> int | None:
    return settings.device_memory_bytes or (device.memory_bytes if device else None)


def needs_checkpointing(
    job: Job,
    settings: Settings,
    hyperparameters: TrainingHyperparameters,
    *,
    rows: int,
    max_row_tokens: int,
    device: Device | None,
    shards: int = 1,
) -> bool:
    """Whether the job fits this worker's device only with activation checkpointing: its
    largest batch does not fit without."""
    question = _fit_question(
        job, settings, hyperparameters, rows=rows, max_row_tokens=max_row_tokens, device=device
    )
    return question is not None and checkpointing_needed(**question, shards=shards)


def needs_sharding(
    job: Job,
    settings: Settings,
    hyperparameters: TrainingHyperparameters,
    *,
    rows: int,
    max_row_tokens: int,
    device: Device | None,
    world_size: int,
) -> bool:
    """Whether a job that names no `distributed` fits this worker's devices only with its base
    model sharded over the `world_size` ranks (FSDP): as the plan decides, with this worker's
    own device memory."""
    if job.distributed is not None or device is None:
        return False
    question = _fit_question(
        job, settings, hyperparameters, rows=rows, max_row_tokens=max_row_tokens, device=device
    )
    return question is not None and choose_distributed(**question, shards=world_size) is not None


def prepare_datasets(
    job: Job,
    settings: Settings,
    model_location: str,
    workdir: Path,
    world_size: int = 1,
    device: Device | None = None,
    distributed: str | None = None,
) -> PreparedDatasets:
    """Fetch, parse and check the datasets and resolve "auto" hyperparameters (auto batch_size
    fits `device`'s memory when given, sharded over world_size when `distributed` is "fsdp").
    A job that names no `distributed` is sharded when it fits only so (`needs_sharding`)."""
    from transformers import AutoTokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    base_model = get_base_model(settings, job.base_model)
    model_kwargs = hub_kwargs(settings, base_model)
    tokenizer = AutoTokenizer.from_pretrained(
        model_location, trust_remote_code=False, **model_kwargs
    )
    requested = Hyperparameters.model_validate(job.hyperparameters)
    method = Method.model_validate(job.method or {})
    max_seq_length = requested.max_seq_length

    def load(
        url: str, name: str, field_name: str
    ) -> tuple[FetchedDataset, ParsedDataset, list[int]]:
        fetched = _bring_here(job, url, settings, workdir / name, field_name)
        parsed = _parse(fetched, field_name, settings, method)
        counts = _token_counts(parsed, tokenizer, method)
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
    scored = split_records(
        parsed.records,
        eval_records,
        seed=requested.seed,
        max_rows=settings.auto_eval_rows,
    )
    facts["held_out_rows"] = len(parsed.records) - len(scored.train)
    shards = world_size if distributed == "fsdp" else 1
    resolved = resolve_hyperparameters(
        job,
        settings,
        rows=len(scored.train),
        max_row_tokens=max(counts),
        device=device,
        shards=shards,
    )
    hyperparameters = TrainingHyperparameters.model_validate(resolved.hyperparameters)
    rows, longest = len(scored.train), max(counts)
    if world_size > 1 and needs_sharding(
        job,
        settings,
        hyperparameters,
        rows=rows,
        max_row_tokens=longest,
        device=device,
        world_size=world_size,
    ):
        distributed, shards = "fsdp", world_size
    return PreparedDatasets(
        facts=facts,
        train_records=scored.train,
        eval_records=eval_records,
        scored=scored,
        total_steps=total_steps(len(scored.train), resolved.hyperparameters, world_size),
        model_kwargs=model_kwargs,
        hyperparameters=hyperparameters,
        auto=resolved.auto,
        activation_checkpointing=needs_checkpointing(
            job,
            settings,
            hyperparameters,
            rows=rows,
            max_row_tokens=longest,
            device=device,
            shards=shards,
        ),
        distributed=distributed,
        tokenizer=tokenizer,
    )
