"""The stages of a claimed job, in order: validate, train, evaluate, publish, finish.

Each stage writes what it learnt in a transaction of its own (its SQL in app/jobs/repository.py
and the transitions module) and raises JobStopped or a TuneserveError to leave the run;
worker/runner.py claims the job, runs the stages, and ends the job on every exit path.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.adapters.models import Adapter
from app.base_models.loading import model_location
from app.base_models.registry import BaseModel, get_base_model
from app.db import unit_of_work, utcnow
from app.devices import Device, detect_device
from app.ids import new_id
from app.jobs import repository
from app.jobs.events import append_event
from app.jobs.models import Job, JobStatus, Throughput
from app.jobs.reward_models import reward_model_paths
from app.jobs.schemas import LoraSpec, Method, MethodType
from app.jobs.transitions import transition
from app.settings import Settings
from app.storage import artifact_store
from worker.base_side import BaseSides
from worker.checkpoints import CheckpointKeeper, latest_checkpoint, restore
from worker.datasets import PreparedDatasets, prepare_datasets
from worker.distributed import node_processes, run_distributed
from worker.evaluation import EvaluationTask, evaluate, evaluate_saved
from worker.heartbeat import Heartbeat
from worker.model_card import manifest, write_model_card
from worker.progress import ProgressWriter
from worker.rewards import RewardModels
from worker.sql import with_retries
from worker.training import (
    Checkpoint,
    EvaluateTrained,
    RowLosses,
    TrainingHooks,
    TrainingResult,
    TrainingSpec,
    train_lora,
)

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """The job must stop now: cancelled by its owner, its claim given to another attempt, or its
    worker shutting down (then it is handed back to the queue)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def event(job_id: str, type: str, message: str, level: str = "info", **data: Any) -> None:
    def write() -> None:
        with unit_of_work() as session:
            append_event(session, job_id, type, message, level=level, data=data or None)

    with_retries(write, what=f"log {type}")


@dataclass
class JobContext:
    job: Job
    settings: Settings
    heartbeat: Heartbeat
    worker_id: str
    checkpoints: CheckpointKeeper | None = None
    # Seconds each stage took, in order (the job.succeeded event reports them).
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[phase] = round(time.monotonic() - started, 2)

    @property
    def workdir(self) -> Path:
        return self.settings.artifacts_dir / "jobs" / self.job.id

    def check_stop(self) -> None:
        if self.heartbeat.stop_requested.is_set():
            raise JobStopped(self.heartbeat.reason or "cancelled")


@dataclass(frozen=True)
class Validated:
    """What the validate stage found: where and how the job trains, and its data."""

    device: Device
    bf16: bool
    processes: int
    base_model: BaseModel
    location: str
    prepared: PreparedDatasets
    distributed: str | None = None  # "fsdp" when the ranks shard the model, else None (DDP)


@dataclass(frozen=True)
class Trained:
    result: TrainingResult
    progress: dict[str, Any]  # the last progress the writer reported
    resumed: bool
    # The training process evaluated the model in memory (result.evaluation: its outcome).
    evaluated_in_memory: bool = False


@dataclass(frozen=True)
class NewAdapter:
    id: str
    owner: str
    job_id: str
    base_model: str
    name: str
    path: str
    sha256: str
    size_bytes: int
    rank: int

    def row(self) -> Adapter:
        return Adapter(**self.__dict__, created_at=utcnow())


def use_bf16(setting: str, device: Device) -> bool:
    return setting == "on" or (setting == "auto" and device.bf16)


def validate(context: JobContext) -> Validated:
    """The device, the base model on disk, the dataset fetched and checked row by row, "auto"
    hyperparameters resolved; recorded on the job."""
    job, settings = context.job, context.settings
    device = detect_device()
    bf16 = use_bf16(settings.bf16, device)
    with unit_of_work() as session:
        repository.record_device(session, job.id, device.facts())
        append_event(
            session,
            job.id,
            "job.device",
            f"Training on {device.kind}: {device.count} x {device.name}"
            f" ({'bf16 autocast' if bf16 else 'fp32'}).",
            data={**device.facts(), "bf16_autocast": bf16},
        )
    base_model = get_base_model(settings, job.base_model)
    quantized = f", its linear layers quantized to {job.quantization} (QLoRA)"
    event(
        job.id,
        "job.loading_model",
        f"Preparing base model {base_model.name}{quantized if job.quantization else ''}.",
        **({"quantization": job.quantization} if job.quantization else {}),
    )
    location = model_location(settings, base_model)  # BaseModelUnavailable fails the job
    context.check_stop()

    processes = settings.training_processes or node_processes()
    distributed = job.distributed if job.distributed == "fsdp" else None
    if distributed == "fsdp" and processes < 2:
        if device.kind == "cpu":
            processes = 2  # CPU ranks shard the RAM they share: two make the point
        else:
            distributed = None
            event(
                job.id,
                "job.distributed",
                f"FSDP shards the model over several devices; this worker trains on "
                f"{processes} (TUNESERVE_TRAINING_PROCESSES): training unsharded on one.",
                level="warning",
            )
    prepared = prepare_datasets(
        job, settings, location, context.workdir, processes, device=device, distributed=distributed
    )
    facts = prepared.facts
    hyperparameters = prepared.hyperparameters.model_dump(mode="json")
    resolved = {name: hyperparameters[name] for name in prepared.auto}
    with unit_of_work() as session:
        repository.record_dataset(
            session, job.id, dataset=dict(facts), hyperparameters=hyperparameters
        )
        chosen = ", ".join(f"{name}={value}" for name, value in resolved.items())
        auto = f" Auto hyperparameters: {chosen}." if resolved else ""
        append_event(
            session,
            job.id,
            "job.dataset_validated",
            f"Dataset valid: {facts['rows']} rows, format {facts['format']}, "
            f"{facts['tokens']} tokens.{auto}",
            data={**facts, "auto_hyperparameters": resolved} if resolved else dict(facts),
        )
        if prepared.activation_checkpointing:
            append_event(
                session,
                job.id,
                "job.activation_checkpointing",
                f"Activation checkpointing on: {hyperparameters['batch_size']} rows of up to "
                f"{min(hyperparameters['max_seq_length'], facts['max_row_tokens'])} tokens fit "
                "this device's memory only when activations are recomputed in the backward pass "
                "(about a third more compute).",
                data={"activation_checkpointing": True},
            )
    context.check_stop()
    return Validated(device, bf16, processes, base_model, location, prepared, prepared.distributed)


def train(context: JobContext, validated: Validated) -> Trained:
    """`running`, then the LoRA run (on one process or several), resumed from the job's last
    checkpoint when an earlier attempt left one; progress and checkpoints recorded as it goes."""
    job, settings, prepared = context.job, context.settings, validated.prepared
    with unit_of_work() as session:
        started = transition(
            session,
            job.id,
            JobStatus.RUNNING,
            f"Training started: {prepared.total_steps} steps.",
            only_from=frozenset({JobStatus.VALIDATING}),
            claimed_by=context.worker_id,
            values={
                "progress": {"step": 0, "total_steps": prepared.total_steps, "epoch": 0.0},
                "heartbeat_at": utcnow(),
            },
        )
    if not started:
        raise JobStopped("claim_lost")

    hp = prepared.hyperparameters
    resume_from = None
    checkpoint = latest_checkpoint(job.id)
    if checkpoint is not None:
        resume_from = str(restore(checkpoint, settings, context.workdir / "trainer"))
        event(
            job.id,
            "job.resumed",
            f"Resuming from the checkpoint at step {checkpoint.step} (attempt {job.attempt}).",
            step=checkpoint.step,
            checkpoint=checkpoint.id,
        )
    start_from = None
    if job.parent is not None:
        local = context.workdir / "parent"
        artifact_store(settings).get_dir(job.parent["path"], local)
        start_from = str(local)
        event(
            job.id,
            "job.parent",
            f"Training on from {job.parent['kind']} {job.parent['reference']} "
            f"({job.parent['id']}).",
            **{key: job.parent[key] for key in ("reference", "kind", "id")},
        )
    writer = ProgressWriter(job.id, settings.progress_interval_seconds)
    kept = hp.checkpoints_kept or settings.checkpoints_kept
    method = Method.model_validate(job.method or {})
    spec = TrainingSpec(
        model_location=validated.location,
        hyperparameters=hp,
        lora=LoraSpec.model_validate(job.lora),
        method=method,
        model_kwargs=prepared.model_kwargs,
        bf16=validated.bf16,
        gradient_checkpointing=prepared.activation_checkpointing,
        quantization=job.quantization,
        distributed=validated.distributed,
        checkpoint_every_steps=hp.checkpoint_every_steps or settings.checkpoint_every_steps,
        checkpoint_every_minutes=hp.checkpoint_every_minutes or settings.checkpoint_every_minutes,
        checkpoints_kept=kept,
        resume_from=resume_from,
        start_from=start_from,
        reward_models=reward_models_here(context, method),
    )
    heartbeat = context.heartbeat
    keeper = context.checkpoints = CheckpointKeeper(job.id, settings, kept)

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        # The curve up to the checkpoint must be in SQL before the checkpoint is: a resumed run
        # goes on from the step after it.
        writer.flush(must=True)
        keeper(checkpoint)

    hooks = TrainingHooks(
        on_progress=writer,
        should_stop=heartbeat.stop_requested.is_set,
        checkpoint_before_stop=lambda: heartbeat.reason == "shutdown",
        on_checkpoint=on_checkpoint,
        evaluate_trained=evaluated_in_memory(context, validated),
    )
    train_rows, eval_rows = prepared.train_records, prepared.eval_records
    if validated.processes > 1:
        processes = validated.processes
        how = "Fully sharded (FSDP)" if validated.distributed == "fsdp" else "Data-parallel"
        event(
            job.id,
            "job.distributed",
            f"{how} training on {processes} processes.",
            distributed=validated.distributed or "ddp",
            processes=processes,
        )
        result = run_distributed(spec, train_rows, eval_rows, context.workdir, hooks, processes)
    else:
        result = train_lora(
            spec, train_rows, eval_rows, context.workdir, hooks, tokenizer=prepared.tokenizer
        )
    writer.flush(must=True)
    context.check_stop()
    if result.stopped_early:
        raise JobStopped("cancelled")
    if result.kept_ranks:
        ranks = list(result.kept_ranks.values())
        event(
            job.id,
            "job.adalora",
            f"AdaLoRA kept an average rank of {sum(ranks) / len(ranks):.1f} of {spec.lora.r} "
            f"({min(ranks)} to {max(ranks)}) over {len(ranks)} modules; the adapter is the "
            f"rank-{max(max(ranks), 1)} LoRA it equals.",
            kept_ranks=result.kept_ranks,
        )
    return Trained(
        result,
        writer.progress,
        resumed=resume_from is not None,
        evaluated_in_memory=hooks.evaluate_trained is not None,
    )


def reward_models_here(context: JobContext, method: Method) -> dict[str, str]:
    """The reward models the job's grader names, brought into the job's directory: grader
    `model` -> adapter directory. Found again by reference: one deleted since the job was
    submitted fails the job by name."""
    if method.reinforcement is None:
        return {}
    job, settings = context.job, context.settings
    with unit_of_work() as session:
        paths = reward_model_paths(
            session,
            owner=job.owner,
            grader=method.reinforcement.grader,
            base_model=job.base_model,
            settings=settings,
        )
    here: dict[str, str] = {}
    for index, (name, path) in enumerate(sorted(paths.items())):
        local = context.workdir / "reward-models" / str(index)
        if not local.is_dir():
            artifact_store(settings).get_dir(path, local)
        here[name] = str(local)
    return here


def evaluation_task(context: JobContext, validated: Validated) -> EvaluationTask | None:
    """What the job's evaluation scores (the rows prepare_datasets set aside); None when the
    operator turned it off or there is nothing to score."""
    settings, prepared, scored = context.settings, validated.prepared, validated.prepared.scored
    if settings.auto_eval_rows == 0 or not scored.scored:
        return None
    method = Method.model_validate(context.job.method or {})
    reward_models = None
    if method.reinforcement is not None:
        reward_models = RewardModels(
            validated.location,
            reward_models_here(context, method),
            prepared.model_kwargs,
            validated.bf16,
        )
    return EvaluationTask(
        records=scored.scored,
        split=scored.split,
        samples=settings.auto_eval_samples,
        bf16=validated.bf16,
        scorer=method.type is MethodType.REWARD_MODEL,
        reinforcement=method.reinforcement,
        reward_models=reward_models,
        base_sides=BaseSides(settings.data_dir / "evaluations" / "base"),
    )


def evaluated_in_memory(context: JobContext, validated: Validated) -> EvaluateTrained | None:
    """The job's evaluation run by the training process on the model it has just trained, not
    on one loaded again: on single-process runs of an unquantized base (a quantized one is
    evaluated on the full-precision base it is served on)."""
    task = evaluation_task(context, validated)
    if task is None or validated.processes > 1 or context.job.quantization is not None:
        return None

    def run(model: Any, tokenizer: Any, eval_losses: RowLosses | None) -> dict[str, Any] | None:
        # A validation set's first rows are the ones scored: the adapter's losses on them are
        # known when the run has just scored the whole set.
        known = eval_losses if task.split == "validation" else None
        adapter_losses = known[: len(task.records)] if known is not None else None
        return _scored(
            context,
            task,
            lambda: evaluate(tokenizer, model, task, adapter_losses=adapter_losses),
        )

    return run


def evaluate_saved_adapter(
    context: JobContext, validated: Validated, trained: Trained
) -> dict[str, Any] | None:
    """The job's evaluation of the saved adapter, loaded again, where the training process did
    not evaluate it in memory (worker/evaluation.py). A failure is reported and leaves the job
    without an evaluation; the adapter stands."""
    if trained.evaluated_in_memory:
        return trained.result.evaluation
    task = evaluation_task(context, validated)
    if task is None:
        return None
    adapter_dir = context.workdir / "adapter"
    return _scored(
        context,
        task,
        lambda: evaluate_saved(
            validated.location, adapter_dir, task, validated.prepared.model_kwargs
        ),
    )


def _scored(
    context: JobContext, task: EvaluationTask, run: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """run() with the job's evaluation events around it; None when it fails."""
    job_id = context.job.id
    event(
        job_id,
        "job.evaluating",
        f"Evaluating: base model against adapter on {len(task.records)} {task.split} rows.",
    )
    try:
        evaluation = run()
    except Exception as exc:
        logger.exception("job %s: the automatic evaluation failed", job_id)
        event(
            job_id,
            "job.evaluation_failed",
            f"The automatic evaluation failed ({type(exc).__name__}: {exc}); the adapter is "
            "kept without it.",
            level="warning",
        )
        return None
    accuracy = ""
    if evaluation.get("adapter_preference_accuracy") is not None:
        accuracy = (
            f" Preference accuracy: base {evaluation['base_preference_accuracy']:.0%}, adapter "
            f"{evaluation['adapter_preference_accuracy']:.0%}."
        )
    where = f"on {evaluation['rows']} {evaluation['split']} rows"
    if evaluation.get("adapter_mean_reward") is not None:
        summary = (
            f"Mean reward {where}: base {evaluation['base_mean_reward']:.3f}, adapter "
            f"{evaluation['adapter_mean_reward']:.3f}."
        )
    else:
        summary = (
            f"Eval loss {where}: base {evaluation['base_eval_loss']:.4f}, adapter "
            f"{evaluation['adapter_eval_loss']:.4f} ({evaluation['improvement']:+.1%}).{accuracy}"
        )
    event(
        job_id,
        "job.evaluated",
        summary,
        **{key: value for key, value in evaluation.items() if key != "samples"},
    )
    return evaluation


def publish(
    context: JobContext,
    validated: Validated,
    trained: Trained,
    evaluation: dict[str, Any] | None,
) -> NewAdapter:
    """The model card and manifest written into the adapter, which goes to the artifact store."""
    job, result = context.job, trained.result
    write_model_card(
        context.workdir / "adapter",
        manifest(
            job=job,
            base_model=validated.base_model,
            dataset=dict(validated.prepared.facts),
            hyperparameters=validated.prepared.hyperparameters.model_dump(mode="json"),
            device={
                **validated.device.facts(),
                "bf16_autocast": validated.bf16,
                "processes": validated.processes,
                "distributed": validated.distributed,
                "quantization": job.quantization,
                "activation_checkpointing": validated.prepared.activation_checkpointing,
            },
            metrics={
                "steps": result.steps,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "trained_tokens": result.trained_tokens,
                "training_seconds": round(result.seconds, 1),
                **({"adalora_kept_ranks": result.kept_ranks} if result.kept_ranks else {}),
            },
            evaluation=evaluation,
        ),
    )
    adapter_id = new_id("adapter")
    local = context.workdir / "adapter"
    digest = hashlib.sha256((local / "adapter_model.safetensors").read_bytes()).hexdigest()
    size = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
    key = f"adapters/{adapter_id}"
    artifact_store(context.settings).put_dir(local, key)
    shutil.rmtree(local, ignore_errors=True)
    return NewAdapter(
        id=adapter_id,
        owner=job.owner,
        job_id=job.id,
        base_model=job.base_model,
        name=job.fine_tuned_model,
        path=key,
        sha256=digest,
        size_bytes=size,
        # AdaLoRA's adapter is a LoRA of the largest rank a module kept.
        rank=max(max(result.kept_ranks.values()), 1) if result.kept_ranks else int(job.lora["r"]),
    )


def finish(
    context: JobContext,
    validated: Validated,
    trained: Trained,
    adapter: NewAdapter,
    evaluation: dict[str, Any] | None,
) -> None:
    """In one transaction: the adapter's row, `succeeded` with the final progress and the
    evaluation, and the job's speed for later plans. A lost claim deletes the published files."""
    job, result = context.job, trained.result
    final = {
        **trained.progress,
        "step": result.steps,
        "total_steps": result.total_steps,
        "eta_seconds": 0.0,
        "trained_tokens": result.trained_tokens,
    }
    if result.eval_loss is not None:
        final["eval_loss"] = result.eval_loss
    phases = _phases(context.phases, result)
    beyond = {name: seconds for name, seconds in phases.items() if name != "training_steps"}
    overhead = (
        f" Beyond the training steps, {sum(beyond.values()):.1f} s: "
        + ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in beyond.items())
        + "."
    )

    def succeed() -> bool:
        with unit_of_work() as session:
            session.add(adapter.row())
            session.flush()
            succeeded = transition(
                session,
                job.id,
                JobStatus.SUCCEEDED,
                f"Training finished in {result.seconds:.0f} s; "
                f"adapter {adapter.id} ({adapter.name}).{overhead}",
                only_from=frozenset({JobStatus.RUNNING}),
                claimed_by=context.worker_id,
                data={
                    "adapter": adapter.id,
                    "mean_train_loss": result.train_loss,
                    "eval_loss": result.eval_loss,
                    "trained_tokens": result.trained_tokens,
                    "seconds": round(result.seconds, 1),
                    "phases": phases,
                },
                values={"progress": final, "evaluation": evaluation},
            )
            if not succeeded:
                session.rollback()
            elif not trained.resumed:
                _record_throughput(session, job, validated, trained)
            return succeeded

    if not with_retries(succeed, what=f"finish job {job.id}"):
        artifact_store(context.settings).delete(adapter.path)
        raise JobStopped("claim_lost")


def _phases(timed: dict[str, float], result: TrainingResult) -> dict[str, float]:
    """Where the job's time went since it was claimed: the stages as timed, the train stage
    split into its training steps, the evaluation of the model in memory (when the training
    process ran it), and the rest (loading the model, building the trainer, saving the
    adapter)."""
    phases = dict(timed)
    train = phases.pop("train", None)
    if train is None:
        return phases
    steps = min(result.steps_seconds, train)
    evaluating = min(result.evaluation_seconds, train - steps)
    ordered: dict[str, float] = {}
    for name, seconds in phases.items():
        if name == "evaluate":
            ordered["model_load_and_save"] = round(train - steps - evaluating, 2)
            ordered["training_steps"] = round(steps, 2)
            seconds = round(seconds + evaluating, 2)
        ordered[name] = seconds
    return ordered


def _record_throughput(session: Session, job: Job, validated: Validated, trained: Trained) -> None:
    """The speed this job trained at, for plans to estimate later jobs' time from. Jobs on a
    second attempt are left out: their clock started with the first."""
    speed, result = trained.progress.get("tokens_per_second"), trained.result
    started = repository.first_attempt_start(session, job.id)
    if not speed or not result.trained_tokens or started is None:
        return
    device = validated.device
    session.add(
        Throughput(
            job_id=job.id,
            accelerator=device.accelerator_class,
            device_name=device.name[:200],
            processes=validated.processes,
            base_model=job.base_model,
            trained_tokens=result.trained_tokens,
            tokens_per_second=float(speed),
            job_seconds=(utcnow() - started).total_seconds(),
            created_at=utcnow(),
        )
    )
