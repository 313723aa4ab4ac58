"""`tuneserve jobs`: submit, plan, watch and inspect fine-tuning jobs."""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from app.cli.client import Client
from app.cli.common import (
    AfterOption,
    JsonOption,
    LimitOption,
    UrlOption,
    call,
    console,
    err_console,
    existing_file,
    fail,
    human_seconds,
    make_client,
    more_hint,
    note,
    print_json,
    when,
)
from app.cli.job_views import (
    job_line,
    job_summary,
    jobs_table,
    metrics_table,
    plan_summary,
)
from app.cli.transfer import upload_file

jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)

TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_SECONDS = 0.5
AUTO = "auto"

# The options of a job, shared by `jobs create` and `jobs plan`.
DatasetOption = Annotated[
    str,
    typer.Option(help="Training set: a local .jsonl file (uploaded first), a file id or a URL."),
]
BaseModelOption = Annotated[
    str | None, typer.Option(help="Base model (`tuneserve models`; default model if omitted).")
]
MethodOption = Annotated[
    str | None,
    typer.Option(
        help="supervised (default); dpo, orpo or reward_model (preference rows with prompt, "
        "chosen and rejected); reinforcement (prompt rows, graded by --grader)."
    ),
]
GraderOption = Annotated[
    Path | None,
    typer.Option(
        help='reinforcement: a JSON file with the grader, e.g. {"type": "string_check", '
        '"name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", '
        '"operation": "eq"}. Implies --method reinforcement.',
    ),
]
GenerationsOption = Annotated[
    int | None,
    typer.Option(help="reinforcement: answers written per prompt and compared (default 4)."),
]
QuantizationOption = Annotated[
    str | None,
    typer.Option(help="4bit (QLoRA: NF4 base) or 8bit: a quantized frozen base model."),
]
RsLoraOption = Annotated[
    bool, typer.Option("--rslora", help="Scale the LoRA by alpha/sqrt(r) (rsLoRA).")
]
DoraOption = Annotated[
    bool, typer.Option("--dora", help="DoRA: learn a magnitude per output feature too.")
]
AdaLoraOption = Annotated[
    int | None,
    typer.Option(
        "--adalora",
        metavar="TARGET_R",
        help="AdaLoRA: start every module at --lora-r and prune to this average rank.",
    ),
]
DistributedOption = Annotated[
    str | None,
    typer.Option(
        help="fsdp (shard the base model over the node's devices) or ddp; default: the plan picks.",
    ),
]
AnswerTokensOption = Annotated[
    int | None,
    typer.Option(help="reinforcement: the longest answer written, in tokens (default 256)."),
]
BetaOption = Annotated[
    float | None,
    typer.Option(
        help="dpo: how far the adapter may move from its reference; orpo: the weight "
        "of the preference term."
    ),
]
AdapterOption = Annotated[
    str | None,
    typer.Option(
        help="Train on from this adapter (a job id, adapter id or ft: name, or a checkpoint) "
        "instead of a fresh LoRA."
    ),
]
ValidationOption = Annotated[
    str | None, typer.Option(help="Validation set: a local file, a file id or a URL.")
]
EpochsOption = Annotated[
    str | None, typer.Option(metavar="N|auto", help="Passes over the data (n_epochs).")
]
LearningRateOption = Annotated[
    str | None, typer.Option(metavar="LR|auto", help="Peak learning rate.")
]
BatchSizeOption = Annotated[
    str | None, typer.Option(metavar="N|auto", help="Examples per device step.")
]
MaxSeqLengthOption = Annotated[int | None, typer.Option(help="Tokens per example.")]
LoraROption = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlphaOption = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha.")]
SeedOption = Annotated[int | None, typer.Option(help="Seed of data order and LoRA init.")]
SuffixOption = Annotated[str | None, typer.Option(help="Added to the adapter name.")]
MetadataOption = Annotated[
    list[str] | None,
    typer.Option("--metadata", metavar="KEY=VALUE", help="A label kept with the job; repeatable."),
]
WebhookUrlOption = Annotated[
    str | None, typer.Option(help="POSTed a signed event when the job ends.")
]
WebhookSecretOption = Annotated[
    str | None,
    typer.Option(help="Secret the webhook requests are signed with (default: one is made)."),
]


def _auto_or(value: str | None, kind: type[int] | type[float], option: str) -> Any:
    if value is None or value == AUTO:
        return value
    try:
        return kind(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not {'a whole number' if kind is int else 'a number'} or auto",
            param_hint=option,
        ) from None


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    found = {}
    for pair in pairs:
        key, sign, value = pair.partition("=")
        if not sign:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        found[key] = value
    return found


def _dataset(client: Client, value: str) -> str:
    """A local file is uploaded (its file id is used); a file id or URL is used as given."""
    path = Path(value).expanduser()
    if not path.is_file() and value.startswith(("file-", "http://", "https://", "file://")):
        return value
    if not path.exists():
        fail(f"no such dataset file: {value} (give a local file, a file id or a URL)")
    path = existing_file(value, "dataset file")
    uploaded = upload_file(client, path)
    note(f"uploaded {path} as {uploaded['id']} ({uploaded['bytes']} bytes)")
    return str(uploaded["id"])


@dataclass(frozen=True)
class JobOptions:
    """The options `jobs create` and `jobs plan` share: what makes a POST /jobs body."""

    dataset: str
    base_model: str | None = None
    adapter: str | None = None
    method: str | None = None
    beta: float | None = None
    grader: Path | None = None
    generations: int | None = None
    answer_tokens: int | None = None
    validation: str | None = None
    epochs: str | None = None
    learning_rate: str | None = None
    batch_size: str | None = None
    max_seq_length: int | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    rslora: bool = False
    dora: bool = False
    adalora: int | None = None
    quantization: str | None = None
    distributed: str | None = None
    seed: int | None = None
    suffix: str | None = None
    metadata: list[str] | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None


def _job_options(
    dataset: DatasetOption,
    base_model: BaseModelOption = None,
    adapter: AdapterOption = None,
    method: MethodOption = None,
    beta: BetaOption = None,
    grader: GraderOption = None,
    generations: GenerationsOption = None,
    answer_tokens: AnswerTokensOption = None,
    validation: ValidationOption = None,
    epochs: EpochsOption = None,
    learning_rate: LearningRateOption = None,
    batch_size: BatchSizeOption = None,
    max_seq_length: MaxSeqLengthOption = None,
    lora_r: LoraROption = None,
    lora_alpha: LoraAlphaOption = None,
    rslora: RsLoraOption = False,
    dora: DoraOption = False,
    adalora: AdaLoraOption = None,
    quantization: QuantizationOption = None,
    distributed: DistributedOption = None,
    seed: SeedOption = None,
    suffix: SuffixOption = None,
    metadata: MetadataOption = None,
    webhook_url: WebhookUrlOption = None,
    webhook_secret: WebhookSecretOption = None,
) -> None:
    """The typer options of JobOptions, declared once (see takes_job_options)."""


def takes_job_options(command: Callable[..., None]) -> Callable[..., None]:
    """A command taking `options: JobOptions` first, shown to typer with the job options
    followed by the command's own."""
    shared = list(inspect.signature(_job_options, eval_str=True).parameters.values())
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

    @functools.wraps(command)
    def with_options(**given: Any) -> None:
        options = JobOptions(**{p.name: given.pop(p.name) for p in shared})
        command(options, **given)

    with_options.__signature__ = inspect.Signature(shared + own)  # type: ignore[attr-defined]
    with_options.__annotations__ = {p.name: p.annotation for p in shared + own}
    return with_options


def _grader(path: Path) -> dict[str, Any]:
    try:
        grader = json.loads(existing_file(str(path), "grader file").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"{path} is not JSON: {exc}", param_hint="--grader") from None
    if not isinstance(grader, dict):
        raise typer.BadParameter(f"{path} must hold one grader object", param_hint="--grader")
    return grader


def _method(options: JobOptions) -> dict[str, Any] | None:
    """The method the options ask for: --beta implies dpo, --grader reinforcement."""
    implied = "reinforcement" if options.grader else "dpo" if options.beta is not None else None
    kind = options.method or implied
    if kind is None:
        return None
    method: dict[str, Any] = {"type": kind}
    if options.beta is not None:
        method[kind] = {"beta": options.beta}
    if kind == "reinforcement":
        if options.grader is None:
            raise typer.BadParameter(
                "method reinforcement needs a grader: --grader FILE", param_hint="--grader"
            )
        settings: dict[str, Any] = {"grader": _grader(options.grader)}
        if options.generations is not None:
            settings["num_generations"] = options.generations
        if options.answer_tokens is not None:
            settings["max_completion_length"] = options.answer_tokens
        method[kind] = settings
    return method


def job_body(client: Client, options: JobOptions) -> dict[str, Any]:
    """The POST /jobs body of the options; what is not given is left to the api's defaults.
    The options are checked before a local dataset is uploaded."""
    hyperparameters = {
        "n_epochs": _auto_or(options.epochs, int, "--epochs"),
        "learning_rate": _auto_or(options.learning_rate, float, "--learning-rate"),
        "batch_size": _auto_or(options.batch_size, int, "--batch-size"),
        "max_seq_length": options.max_seq_length,
        "seed": options.seed,
    }
    lora = {
        "r": options.lora_r,
        "alpha": options.lora_alpha,
        "use_rslora": options.rslora or None,
        "use_dora": options.dora or None,
        **({"type": "adalora", "target_r": options.adalora} if options.adalora else {}),
    }
    optional = {
        "method": _method(options),
        "base_model": options.base_model,
        "quantization": options.quantization,
        "distributed": options.distributed,
        "adapter": options.adapter,
        "suffix": options.suffix,
        "metadata": _metadata(options.metadata),
        "webhook_url": options.webhook_url,
        "webhook_secret": options.webhook_secret,
        "hyperparameters": {k: v for k, v in hyperparameters.items() if v is not None},
        "lora": {k: v for k, v in lora.items() if v is not None},
    }
    body: dict[str, Any] = {"dataset_url": _dataset(client, options.dataset)}
    if options.validation:
        body["validation_url"] = _dataset(client, options.validation)
    body.update({key: value for key, value in optional.items() if value})
    return body


def follow_job(client: Client, job_id: str) -> dict[str, Any]:
    """Live progress bar (step/total, loss, ETA) on stderr until the job ends. Ctrl-C stops
    watching, not the job."""
    columns = (
        TextColumn("[bold]{task.fields[status]}[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[score]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=err_console) as bar:
            task = bar.add_task(job_id, total=1, status="queued", score="loss -", eta="-")
            while True:
                job: dict[str, Any] = call(client, "GET", f"/jobs/{job_id}")
                progress = job.get("progress") or {}
                loss, reward = progress.get("train_loss"), progress.get("reward_mean")
                eta = progress.get("eta_seconds")
                score = f"loss {loss:.4f}" if loss is not None else "loss -"
                if reward is not None:  # reinforcement: the grader's mean reward says more
                    score = f"reward {reward:.3f}"
                bar.update(
                    task,
                    total=progress.get("total_steps") or 1,
                    completed=progress.get("step", 0),
                    status=job["status"],
                    score=score,
                    eta=human_seconds(eta),
                )
                if job["status"] in TERMINAL:
                    return job
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        note(f"stopped watching; the job goes on (`tuneserve jobs follow {job_id}`)")
        raise typer.Exit(130) from None


def _finish(job: dict[str, Any], as_json: bool) -> None:
    """The outcome of a followed job; exit status 1 unless it succeeded."""
    if as_json:
        print_json(job)
    elif job["status"] == "succeeded":
        adapter = job["adapter"] or {"id": "-", "name": "deleted"}
        console.print(
            Text.assemble(("succeeded", "green"), f": adapter {adapter['id']} ({adapter['name']})")
        )
    elif job["status"] == "failed":
        error = job["error"] or {"code": "unknown", "message": "no reason recorded"}
        console.print(Text.assemble(("failed", "red"), f" ({error['code']}): {error['message']}"))
    else:
        console.print(Text(job["status"], style="yellow"))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("create")
@takes_job_options
def jobs_create(
    options: JobOptions,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show live progress until it ends.")
    ] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a fine-tuning job (epochs, learning rate and batch size default to auto)."""
    client = make_client(url)
    job = call(client, "POST", "/jobs", json=job_body(client, options))
    secret = (job.get("webhook") or {}).get("secret")
    if secret and not as_json:
        note(f"webhook secret (shown only now; the webhook requests are signed with it): {secret}")
    if not follow:
        print_json(job) if as_json else console.print(job_line(job))
        return
    note(f"job {job['id']} submitted")
    _finish(follow_job(client, job["id"]), as_json)


@jobs_app.command("plan")
@takes_job_options
def jobs_plan(options: JobOptions, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Dry run: the steps, time, peak memory and problems of a job, without running it."""
    client = make_client(url)
    plan = call(client, "POST", "/jobs/plan", json=job_body(client, options))
    print_json(plan) if as_json else console.print(plan_summary(plan))


@jobs_app.command("list")
def jobs_list(
    limit: LimitOption = 20,
    after: AfterOption = None,
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit, "after": after, "status": status}
    page = call(make_client(url), "GET", "/jobs", params={k: v for k, v in params.items() if v})
    if as_json:
        print_json(page)
        return
    console.print(jobs_table(page["data"]))
    more_hint(page, "id")


@jobs_app.command("get")
def jobs_get(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show one job: status, progress, losses, adapter, error, dataset and evaluation."""
    job = call(make_client(url), "GET", f"/jobs/{job_id}")
    print_json(job) if as_json else console.print(job_summary(job))


@jobs_app.command("follow")
def jobs_follow(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Live progress of a job until it ends; exits 1 unless it succeeded."""
    _finish(follow_job(make_client(url), job_id), as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Cancel a job (a running one stops within about one training step)."""
    job = call(make_client(url), "POST", f"/jobs/{job_id}/cancel")
    print_json(job) if as_json else console.print(job_line(job))


@jobs_app.command("events")
def jobs_events(
    job_id: str,
    after: Annotated[int, typer.Option(min=0, help="Only events after this seq.")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, at most.")] = 1000,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's event log, oldest first."""
    page = call(
        make_client(url),
        "GET",
        f"/jobs/{job_id}/events",
        params={"after": after, "limit": limit},
    )
    if as_json:
        print_json(page)
        return
    for event in page["data"]:
        line = Text(f"{when(event['created_at'])}  {event['type']:<24} {event['message']}")
        if event["level"] in ("warning", "error"):
            line.stylize("yellow" if event["level"] == "warning" else "red")
        console.print(line)
    more_hint(page, "seq")


@jobs_app.command("metrics")
def jobs_metrics(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """A job's loss curve: step, train and eval loss, learning rate, tokens per second."""
    page = call(make_client(url), "GET", f"/jobs/{job_id}/metrics")
    if as_json:
        print_json(page)
        return
    if not page["data"]:
        note(f"no metrics yet for {job_id}")
        return
    console.print(metrics_table(page["data"]))
