"""The pre-flight plan of a job: what it would do, without storing or queueing anything.

The dataset is read exactly as the worker reads it (app/datasets/reading.py: the uploaded file
from the artifact store, or the URL through the guarded fetch, with the same limits), counted
with the base model's tokenizer and chat template, and checked against max_seq_length. From that:
the "auto" hyperparameters resolved (app/jobs/auto.py), the steps (worker/training.py's
`total_steps`), the time from what workers measured (`throughput`), the peak memory and whether
it fits the target device, with activation checkpointing when only that makes it fit and FSDP
(the base model sharded over the devices a job trains on) when only that does (app/jobs/memory.py),
and the loss mask of the first examples (app/datasets/loss_mask.py).

`check_fits` is the cheap version run at submission: see its docstring.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.base_models.facts import ModelFacts, model_facts
from app.base_models.loading import BaseModelUnavailable, load_tokenizer
from app.base_models.registry import BaseModel, ModelSource, converted_dir, get_base_model
from app.datasets.formats import ParsedDataset
from app.datasets.loss_mask import mask_segments
from app.datasets.reading import (
    DatasetFailure,
    bring_here,
    parse,
    rows_too_long,
    token_counts,
    too_long_failure,
)
from app.db import unit_of_work
from app.errors import InvalidRequest, NotFound, TuneserveError
from app.evaluation.split import held_out_rows
from app.files.repository import get_file
from app.jobs import repository
from app.jobs.auto import auto_fields, resolve
from app.jobs.memory import (
    MemoryEstimate,
    batch_fits,
    checkpointing_needed,
    choose_distributed,
    estimate_memory,
    fits,
    suggest,
    usable,
)
from app.jobs.schemas import (
    CreateJobRequest,
    Distributed,
    JobPlan,
    LossMaskPreview,
    MaskSegment,
    MemoryParts,
    Method,
    PlanDataset,
    PlanDevice,
    PlanMemory,
    PlanProblem,
    PlanSuggestion,
    PlanTime,
    TooLongRow,
)
from app.jobs.service import check_dataset_urls, queue_for
from app.jobs.steps import total_steps
from app.settings import Settings

PREVIEW_EXAMPLES = 3
MEASUREMENTS_USED = 5
# Submission reads an uploaded dataset for the fit check only up to this size (see check_fits).
FIT_CHECK_MAX_BYTES = 16 * 1024 * 1024
# GPUs a node of a class is taken to have when no worker of the class has recorded its devices.
NODE_GPUS_ASSUMED = 8


class JobDoesNotFit(InvalidRequest):
    code = "job_does_not_fit"


class PlanDatasetError(InvalidRequest):
    """The dataset cannot be planned (not found, not fetched, invalid): the code the job would
    fail with."""


# --- the target device ---------------------------------------------------------------------------


def target_device(settings: Settings, request: CreateJobRequest, queue: str) -> PlanDevice:
    """The device the job will likely train on: a worker of the requested class (or of the
    queue) as recorded on the newest job it ran, else this machine; its memory from
    TUNESERVE_DEVICE_MEMORY_BYTES when set."""
    wanted = request.accelerator.value if request.accelerator is not None else None
    with unit_of_work() as session:
        recorded = repository.latest_device(
            session, queue=None if wanted else queue, accelerator=wanted
        )
    if recorded is not None:
        kind, name, count = str(recorded["kind"]), recorded.get("name"), recorded.get("count")
        memory, source = recorded.get("memory_bytes"), "recorded"
    else:
        from app.devices import detect_device

        here = detect_device()
        if wanted is None or wanted == here.kind:
            kind, name, count = here.kind, here.name, here.count
            memory, source = here.memory_bytes, "this machine"
        else:
            kind, name, count, memory, source = wanted, None, None, None, "unknown"
    if settings.device_memory_bytes is not None:
        memory, source = settings.device_memory_bytes, "setting"
    return PlanDevice(
        accelerator=kind,
        name=name,
        count=int(count) if count else None,
        memory_bytes=int(memory) if memory else None,
        source=source,
    )


def node_gpus(device: PlanDevice) -> tuple[int, str | None]:
    """GPUs of a node of the target class, as a worker of the class recorded them, else 8 (and a
    note that says they were assumed); 1 for CPU workers."""
    if device.accelerator == "cpu":
        return 1, None
    if device.count:
        return device.count, None
    return NODE_GPUS_ASSUMED, (
        f"{NODE_GPUS_ASSUMED} GPUs a node assumed: no {device.accelerator} worker has recorded "
        "its devices yet."
    )


def training_devices(settings: Settings, device: PlanDevice) -> tuple[int, str | None]:
    """Ranks (devices) a job trains on: TUNESERVE_TRAINING_PROCESSES, or (0) every GPU of the
    node; with the note of node_gpus when their number was assumed."""
    if settings.training_processes:
        return settings.training_processes, None
    return node_gpus(device)


def world_size(settings: Settings, device: PlanDevice) -> int:
    return training_devices(settings, device)[0]


# --- spreading over devices (DDP or FSDP) --------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """How a job spreads over its devices: `distributed` ("ddp", "fsdp", or None on one device),
    the devices its weights are sharded over, why, and the devices FSDP could use (for advice)."""

    distributed: Distributed | None
    shards: int
    note: str | None
    fsdp_devices: int


def choose_spread(
    settings: Settings,
    device: PlanDevice,
    asked: Distributed | None,
    needs_fsdp: Callable[[int], bool],
) -> Spread:
    """The job's `distributed` when it asks, else FSDP when `needs_fsdp(devices)` (the job fits
    only sharded over the devices it trains on), else DDP on several devices. A job that asks
    for FSDP where a job trains on one process (TUNESERVE_TRAINING_PROCESSES=1) is estimated
    over 2."""
    devices, assumed = training_devices(settings, device)
    advice = 1 if device.accelerator == "cpu" else max(devices, node_gpus(device)[0])
    if asked is Distributed.FSDP:
        if devices > 1:
            return Spread(asked, devices, _sharded(devices, assumed), advice)
        note = (
            "FSDP asked, but a job trains on one process here (TUNESERVE_TRAINING_PROCESSES=1): "
            "the estimate assumes its base model sharded over 2 devices."
        )
        return Spread(asked, 2, note, advice)
    if asked is None and devices > 1 and needs_fsdp(devices):
        why = "The job does not fit one device even with activation checkpointing: its"
        return Spread(Distributed.FSDP, devices, _sharded(devices, assumed, why), 1)
    if asked is None and devices == 1:
        return Spread(None, 1, None, advice)
    return Spread(Distributed.DDP, 1, None, advice)


def _sharded(devices: int, assumed: str | None, why: str = "The") -> str:
    note = f"{why} base model is sharded over {devices} devices (FSDP)."
    return f"{note} {assumed}" if assumed else note


def _request_spread(
    settings: Settings,
    request: CreateJobRequest,
    device: PlanDevice,
    facts: ModelFacts,
    *,
    batch: int,
    seq: int,
) -> Spread:
    """The spread of the job `request` asks for, FSDP chosen (when it asks for none) for
    batches of `batch` rows of `seq` tokens."""
    lora = request.lora.model_dump(mode="json")

    def needs_fsdp(devices: int) -> bool:
        chosen = choose_distributed(
            facts,
            lora,
            batch=batch,
            seq=seq,
            device_bytes=device.memory_bytes,
            shards=devices,
            accelerator=device.accelerator,
            sequences_per_row=request.method.sequences_per_row,
            quantization=request.quantization.value if request.quantization else None,
        )
        return chosen is not None

    return choose_spread(settings, device, request.distributed, needs_fsdp)


# --- time ----------------------------------------------------------------------------------------


def estimate_time(*, accelerator: str, base_model: str, tokens: int, epochs: int) -> PlanTime:
    """Seconds = tokens x n_epochs / tokens_per_second + overhead_seconds, both the median of
    the newest jobs that succeeded on this accelerator class and base model (overhead: the
    claim-to-success time not spent training: loading the model, validating, saving)."""
    with unit_of_work() as session:
        measured = repository.recent_throughput(
            session, accelerator=accelerator, base_model=base_model, limit=MEASUREMENTS_USED
        )
        rows = [(m.tokens_per_second, m.trained_tokens, m.job_seconds) for m in measured]
    if not rows:
        return PlanTime(
            estimated_seconds=None,
            reason=f"No job on {base_model} has succeeded on a {accelerator} worker yet: no "
            "measured speed to estimate from.",
        )
    speed = statistics.median(row[0] for row in rows)
    overhead = statistics.median(max(0.0, seconds - done / rate) for rate, done, seconds in rows)
    return PlanTime(
        estimated_seconds=round(tokens * epochs / speed + overhead, 1),
        tokens_per_second=round(speed, 1),
        overhead_seconds=round(overhead, 1),
        measured_jobs=len(rows),
    )


# --- tokenizers ----------------------------------------------------------------------------------

_tokenizers: dict[str, tuple[Any, threading.Lock]] = {}
_tokenizers_lock = threading.Lock()


@contextmanager
def tokenizer_of(settings: Settings, model: BaseModel) -> Iterator[Any]:
    """The base model's tokenizer, loaded once per api process and used by one plan at a time
    (a fast tokenizer is not safe to share between threads)."""
    key = f"{model.name}|{model.location}|{model.revision}"
    with _tokenizers_lock:
        entry = _tokenizers.get(key)
    if entry is None:
        entry = (load_tokenizer(settings, model), threading.Lock())
        with _tokenizers_lock:
            entry = _tokenizers.setdefault(key, entry)
    tokenizer, lock = entry
    with lock:
        yield tokenizer


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class _Read:
    parsed: ParsedDataset
    filename: str
    sha256: str
    bytes: int
    counts: list[int] = field(default_factory=list)


def _read(
    owner: str, url: str, settings: Settings, workdir: Path, field_name: str, method: Method
) -> _Read:
    """The dataset brought here and parsed as the worker does; a failure is the job's error."""
    try:
        fetched = bring_here(owner, url, settings, workdir / field_name, field_name)
        parsed = parse(fetched, field_name, settings, method=method)
    except DatasetFailure as failure:
        status = 404 if failure.code == "dataset_not_found" else 400
        error = PlanDatasetError(failure.message, code=failure.code, detail=failure.detail)
        error.status_code = status
        raise error from failure
    return _Read(
        parsed=parsed, filename=fetched.filename, sha256=fetched.sha256, bytes=fetched.bytes
    )


def _percentile(counts: list[int], share: float) -> int:
    ordered = sorted(counts)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _memory(
    facts: ModelFacts,
    device: PlanDevice,
    *,
    hyperparameters: dict[str, Any],
    lora: dict[str, Any],
    rows: int,
    counts: list[int],
    method: Method,
    spread: Spread,
    quantization: str | None = None,
) -> PlanMemory:
    """The peak estimate on the target device, spread over devices as `spread` says, with
    activation checkpointing on when the job fits only with it, and a change that fits when it
    does not fit even so."""
    seq = min(int(hyperparameters["max_seq_length"]), max(counts))
    batch = min(int(hyperparameters["batch_size"]), rows)
    checkpointing = checkpointing_needed(
        facts,
        lora,
        batch=batch,
        seq=seq,
        device_bytes=device.memory_bytes,
        accelerator=device.accelerator,
        sequences_per_row=method.sequences_per_row,
        quantization=quantization,
        shards=spread.shards,
    )
    estimate = estimate_memory(
        facts,
        batch=batch,
        seq=seq,
        lora_r=int(lora["r"]),
        target_modules=lora["target_modules"],
        accelerator=device.accelerator,
        sequences_per_row=method.sequences_per_row,
        quantization=quantization,
        checkpointing=checkpointing,
        shards=spread.shards,
    )
    fitting = None if device.memory_bytes is None else fits(estimate, device.memory_bytes)
    suggestion = None
    if fitting is False and device.memory_bytes is not None:
        p99 = _percentile(counts, 0.99)
        advice = suggest(
            facts,
            device.memory_bytes,
            hyperparameters=hyperparameters,
            lora=lora,
            seq=seq,
            p99_row_tokens=p99,
            rows_over_p99=sum(1 for count in counts if count > p99),
            accelerator=device.accelerator,
            sequences_per_row=method.sequences_per_row,
            quantization=quantization,
            checkpointing=checkpointing,
            shards=spread.shards,
            fsdp_devices=spread.fsdp_devices,
        )
        suggestion = PlanSuggestion(message=advice.message, hyperparameters=advice.hyperparameters)
    return PlanMemory(
        estimated_bytes=estimate.total,
        parts=_parts(estimate),
        batch=estimate.batch,
        seq=estimate.seq,
        device=device,
        usable_bytes=None if device.memory_bytes is None else usable(device.memory_bytes),
        fits=fitting,
        activation_checkpointing=checkpointing,
        quantization=quantization,
        distributed=spread.distributed,
        shards=spread.shards,
        distributed_note=spread.note,
        suggestion=suggestion,
    )


def _parts(estimate: MemoryEstimate) -> MemoryParts:
    return MemoryParts(
        weights=estimate.weights,
        gathered_layers=estimate.gathered_layers,
        lora_and_optimizer=estimate.lora_and_optimizer,
        activations=estimate.activations,
        logits=estimate.logits,
        runtime=estimate.runtime,
    )


def _preview(tokenizer: Any, read: _Read) -> list[LossMaskPreview]:
    previews = []
    for record, line in list(zip(read.parsed.records, read.parsed.lines, strict=True))[
        :PREVIEW_EXAMPLES
    ]:
        segments = mask_segments(tokenizer, record)
        previews.append(
            LossMaskPreview(
                line=line,
                tokens=sum(segment.tokens for segment in segments),
                trained_tokens=sum(segment.tokens for segment in segments if segment.trained),
                segments=[
                    MaskSegment(text=s.text, trained=s.trained, tokens=s.tokens) for s in segments
                ],
            )
        )
    return previews


def plan_job(
    *, owner: str, request: CreateJobRequest, settings: Settings, preview: bool = True
) -> JobPlan:
    """The plan of the job `request` would create (blocking: call it from a worker thread)."""
    base_model = get_base_model(settings, request.base_model)
    with unit_of_work() as session:
        check_dataset_urls(session, owner=owner, request=request, settings=settings)
    queue = queue_for(request.accelerator, settings)
    device = target_device(settings, request, queue)
    facts = model_facts(settings, base_model)
    requested = request.hyperparameters.model_dump(mode="json")
    lora = request.lora.model_dump(mode="json")
    quantization = request.quantization.value if request.quantization else None
    max_seq_length = int(requested["max_seq_length"])
    problems: list[PlanProblem] = []
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plan-", dir=settings.data_dir) as workdir:
        method = request.method
        train = _read(owner, request.dataset_url, settings, Path(workdir), "dataset_url", method)
        validation = None
        if request.validation_url is not None:
            validation = _read(
                owner, request.validation_url, settings, Path(workdir), "validation_url", method
            )
    with tokenizer_of(settings, base_model) as tokenizer:
        for read in (train, validation):
            if read is not None:
                read.counts = token_counts(
                    read.parsed, tokenizer, answer_tokens=method.answer_tokens
                )
        previews = _preview(tokenizer, train) if preview else []
    for read, field_name in ((train, "dataset_url"), (validation, "validation_url")):
        if read is None:
            continue
        too_long = rows_too_long(read.parsed, read.counts, max_seq_length)
        if too_long:
            failure = too_long_failure(too_long, max_seq_length, read.filename, field_name)
            problems.append(
                PlanProblem(code=failure.code, message=failure.message, detail=failure.detail)
            )
    held_out = held_out_rows(
        train.parsed.rows,
        has_validation=validation is not None,
        max_rows=settings.auto_eval_rows,
    )
    rows = train.parsed.rows - held_out  # the rows trained on
    seq = min(max_seq_length, max(train.counts))
    # Sharded or not is decided first, on the batch asked ("auto" halves down to 1 row).
    asked_batch = 1 if "batch_size" in auto_fields(requested) else int(requested["batch_size"])
    spread = _request_spread(
        settings, request, device, facts, batch=min(asked_batch, rows), seq=seq
    )
    resolved = resolve(
        requested,
        rows=rows,
        model_params=facts.params,
        fits=batch_fits(
            facts,
            lora,
            rows=rows,
            seq=seq,
            device_bytes=device.memory_bytes,
            accelerator=device.accelerator,
            sequences_per_row=method.sequences_per_row,
            quantization=quantization,
            shards=spread.shards,
        ),
    )
    hyperparameters = resolved.hyperparameters
    too_long_rows = rows_too_long(train.parsed, train.counts, max_seq_length)
    tokens = sum(train.counts)
    return JobPlan(
        base_model=base_model.name,
        queue=queue,
        dataset=PlanDataset(
            rows=train.parsed.rows,
            held_out_rows=held_out,
            format=train.parsed.format.value,
            tokens=tokens,
            max_row_tokens=max(train.counts),
            mean_row_tokens=round(tokens / train.parsed.rows, 2),
            p99_row_tokens=_percentile(train.counts, 0.99),
            too_long_count=len(too_long_rows),
            too_long=[TooLongRow(line=line, tokens=count) for line, count in too_long_rows[:50]],
            sha256=train.sha256,
            bytes=train.bytes,
            filename=train.filename,
            validation=None
            if validation is None
            else {
                "rows": validation.parsed.rows,
                "format": validation.parsed.format.value,
                "tokens": sum(validation.counts),
                "max_row_tokens": max(validation.counts),
            },
        ),
        hyperparameters=hyperparameters,
        auto_hyperparameters=resolved.auto,
        steps=total_steps(rows, hyperparameters, world_size(settings, device)),
        time=estimate_time(
            accelerator=device.accelerator,
            base_model=base_model.name,
            tokens=round(tokens * rows / train.parsed.rows),
            epochs=int(hyperparameters["n_epochs"]),
        ),
        memory=_memory(
            facts,
            device,
            hyperparameters=hyperparameters,
            lora=lora,
            rows=rows,
            counts=train.counts,
            method=method,
            spread=spread,
            quantization=quantization,
        ),
        loss_mask_preview=previews,
        problems=problems,
    )


# --- the fit check at submission ----------------------------------------------------------------


def _architecture_at_hand(settings: Settings, model: BaseModel) -> bool:
    """Whether the model's config can be read without converting or downloading weights."""
    if model.source is ModelSource.PACKAGE_GGUF:
        return converted_dir(settings, model).is_dir()
    return True


def check_fits(*, owner: str, request: CreateJobRequest, settings: Settings) -> None:
    """Refuse (400 job_does_not_fit) a job whose peak memory cannot fit its target device even
    with activation checkpointing (which the worker turns on for a job that needs it).

    Kept cheap: first the most the job could need (batch_size rows, or 1 row when batch_size is
    "auto" since auto halves it to fit, of max_seq_length tokens each, activations
    checkpointed); when that fits, which is
    the usual case, the dataset is not read at all. Only when it does not, and the dataset is an
    uploaded file (`file-…`) of at most 16 MiB, is the dataset tokenized for the real longest
    row; URLs and larger files are left to the worker (which fails the job with out_of_memory
    if it does not fit). Nothing is refused when the device's memory, the model's architecture or
    the dataset cannot be read here: the job goes ahead and the worker reports.
    """
    try:
        base_model = get_base_model(settings, request.base_model)
    except TuneserveError:
        return  # create_job answers it, in its order of checks
    if not _architecture_at_hand(settings, base_model):
        return
    try:
        facts = model_facts(settings, base_model)
    except BaseModelUnavailable:
        return
    queue = queue_for(request.accelerator, settings)
    device = target_device(settings, request, queue)
    if device.memory_bytes is None:
        return
    hyperparameters = request.hyperparameters.model_dump(mode="json")
    lora = request.lora.model_dump(mode="json")
    batch = 1 if "batch_size" in auto_fields(hyperparameters) else hyperparameters["batch_size"]
    seq = int(hyperparameters["max_seq_length"])
    spread = _request_spread(settings, request, device, facts, batch=int(batch), seq=seq)
    # Activation checkpointing on, as the worker turns it on when the job needs it; sharded
    # when the job asks for FSDP or fits only with it.
    most = estimate_memory(
        facts,
        batch=int(batch),
        seq=seq,
        lora_r=int(lora["r"]),
        target_modules=lora["target_modules"],
        accelerator=device.accelerator,
        sequences_per_row=request.method.sequences_per_row,
        quantization=request.quantization.value if request.quantization else None,
        checkpointing=True,
        shards=spread.shards,
    )
    if fits(most, device.memory_bytes) or not request.dataset_url.startswith("file-"):
        return
    try:
        with unit_of_work() as session:
            size = get_file(session, owner=owner, file_id=request.dataset_url).bytes
    except NotFound:
        return  # create_job answers the 404
    if size > FIT_CHECK_MAX_BYTES:
        return
    try:
        plan = plan_job(owner=owner, request=request, settings=settings, preview=False)
    except TuneserveError:
        return  # a dataset problem: the worker fails the job with it, as before plans existed
    if plan.memory.fits is False:
        suggestion = plan.memory.suggestion
        advice = f" {suggestion.message}" if suggestion else ""
        checkpointed = plan.memory.activation_checkpointing
        recomputed = " with activation checkpointing" if checkpointed else ""
        if plan.memory.shards > 1:
            recomputed += f", sharded over {plan.memory.shards} devices"
        raise JobDoesNotFit(
            f"The job needs about {plan.memory.estimated_bytes / (1 << 30):.1f} GiB at its peak "
            f"({plan.memory.batch} rows of {plan.memory.seq} tokens{recomputed}), more than the "
            f"{(plan.memory.usable_bytes or 0) / (1 << 30):.1f} GiB usable on a "
            f"{plan.memory.device.accelerator} worker.{advice} POST /jobs/plan shows the "
            "estimate.",
            detail={
                "estimated_bytes": plan.memory.estimated_bytes,
                "usable_bytes": plan.memory.usable_bytes,
                "device": plan.memory.device.model_dump(),
                "activation_checkpointing": plan.memory.activation_checkpointing,
                "distributed": plan.memory.distributed,
                "shards": plan.memory.shards,
                "suggestion": suggestion.model_dump() if suggestion else None,
            },
        )
