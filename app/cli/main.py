"""`tuneserve`: run the service and drive it from a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.client import ApiError, Client
from app.cli.keys import keys_app
from app.settings import get_settings

app = typer.Typer(help="tuneserve: self-hosted LoRA fine-tuning.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")
console = Console()
err_console = Console(stderr=True)

UrlOption = Annotated[str | None, typer.Option("--url", help="API URL (TUNESERVE_API_URL).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON.")]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _client(url: str | None) -> Client:
    from app.keys.service import read_key_file

    settings = get_settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return Client(url or settings.api_url, api_key=key or read_key_file(settings.api_key_file))


def _call(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return client.request(method, path, **kwargs)
    except ApiError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value))


# --- running the service ---------------------------------------------------------------------


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface the api listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the api.")] = 8000,
) -> None:
    """Migrate, then run the api, one worker and the scheduler until Ctrl-C."""
    from app.cli.processes import Supervisor, api_command, scheduler_command, worker_command
    from app.keys.service import ensure_local_key
    from app.migrate import upgrade_database

    settings = get_settings()
    upgrade_database()
    new_key = ensure_local_key(settings.api_key_file)
    if new_key is not None:
        console.print(
            f"Created the local API key (saved in {settings.api_key_file}, where the CLI finds "
            f"it; send it as `Authorization: Bearer <key>`):\n{new_key}"
        )
    supervisor = Supervisor(console)
    supervisor.start("api", api_command(host, port))
    supervisor.start("worker", worker_command(settings.worker_queues))
    supervisor.start("scheduler", scheduler_command())
    console.print(
        f"[green]tuneserve is up[/green] at http://{host}:{port} (API docs: /docs). "
        f"Data: {settings.data_dir}. Ctrl-C stops it."
    )
    raise typer.Exit(supervisor.run())


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Run the api alone (uvicorn)."""
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, access_log=False)


@app.command()
def worker(
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues (TUNESERVE_WORKER_QUEUES).")
    ] = None,
) -> None:
    """Run one training worker (a Celery worker, one job at a time)."""
    from app.cli.processes import worker_arguments
    from worker.celery_app import celery_app

    chosen = queues.split(",") if queues else get_settings().worker_queues
    celery_app.worker_main(worker_arguments(chosen))


@app.command()
def scheduler() -> None:
    """Run the periodic upkeep: re-queue jobs whose worker died or whose message was lost."""
    import signal
    import threading

    from app.logs import configure_logging
    from worker.scheduler import run_scheduler

    configure_logging(get_settings().log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_scheduler(stop)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    from app.migrate import upgrade_database

    upgrade_database()
    console.print(f"database at {get_settings().sqlalchemy_url} is up to date")


# --- jobs --------------------------------------------------------------------------------------


def _job_line(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['status']}"
    progress = job.get("progress") or {}
    if progress.get("total_steps"):
        line += f"  step {progress.get('step', 0)}/{progress['total_steps']}"
    if progress.get("train_loss") is not None:
        line += f"  loss {progress['train_loss']:.4f}"
    return line


def follow_job(client: Client, job_id: str) -> dict[str, Any]:
    """Live progress bar (step/total, loss, ETA) until the job ends."""
    columns = (
        TextColumn("[bold]{task.fields[status]}[/bold]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=1, status="queued", loss="-", eta="-")
        while True:
            job = _call(client, "GET", f"/jobs/{job_id}")
            progress = job.get("progress") or {}
            loss = progress.get("train_loss")
            eta = progress.get("eta_seconds")
            bar.update(
                task,
                total=progress.get("total_steps") or 1,
                completed=progress.get("step", 0),
                status=job["status"],
                loss=f"{loss:.4f}" if loss is not None else "-",
                eta=f"{eta:.0f}s" if eta is not None else "-",
            )
            if job["status"] in TERMINAL:
                return dict(job)
            time.sleep(1.0)


@jobs_app.command("create")
def jobs_create(
    dataset: Annotated[str, typer.Option(help="A local file (uploaded first), file id, or URL.")],
    base_model: Annotated[str | None, typer.Option(help="Base model (GET /models).")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation set: file, id or URL.")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Tokens per example.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Added to the adapter name.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show live progress until it ends.")
    ] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a fine-tuning job."""
    client = _client(url)

    def resolve(value: str) -> str:
        path = Path(value).expanduser()
        if path.is_file():
            uploaded = _call(
                client, "POST", "/files", files={"file": (path.name, path.read_bytes())}
            )
            err_console.print(f"uploaded {path} as {uploaded['id']} ({uploaded['bytes']} bytes)")
            return str(uploaded["id"])
        return value

    hyperparameters = {
        key: value
        for key, value in {
            "n_epochs": epochs,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "max_seq_length": max_seq_length,
        }.items()
        if value is not None
    }
    body: dict[str, Any] = {"dataset_url": resolve(dataset), "hyperparameters": hyperparameters}
    if base_model:
        body["base_model"] = base_model
    if validation:
        body["validation_url"] = resolve(validation)
    if suffix:
        body["suffix"] = suffix
    job = _call(client, "POST", "/jobs", json=body)
    if not follow:
        _print_json(job) if as_json else console.print(_job_line(job))
        return
    err_console.print(f"job {job['id']} submitted")
    job = follow_job(client, job["id"])
    _finish(job, as_json)


def _finish(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(job)
    elif job["status"] == "succeeded":
        console.print(
            f"[green]succeeded[/green]: adapter {job['adapter']['id']} ({job['adapter']['name']})"
        )
    elif job["status"] == "failed":
        console.print(f"[red]failed[/red] ({job['error']['code']}): {job['error']['message']}")
    else:
        console.print(f"[yellow]{job['status']}[/yellow]")
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    page = _call(_client(url), "GET", "/jobs", params=params)
    if as_json:
        _print_json(page)
        return
    table = Table("id", "status", "base model", "progress", "loss", "created")
    for job in page["data"]:
        progress = job.get("progress") or {}
        loss = progress.get("train_loss")
        table.add_row(
            job["id"],
            job["status"],
            job["base_model"],
            f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}",
            f"{loss:.4f}" if loss is not None else "-",
            job["created_at"][:19],
        )
    console.print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show one job."""
    job = _call(_client(url), "GET", f"/jobs/{job_id}")
    _print_json(job) if as_json else console.print(_job_line(job))


@jobs_app.command("follow")
def jobs_follow(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Live progress of a job until it ends."""
    _finish(follow_job(_client(url), job_id), as_json)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Cancel a job (a running one stops within about one training step)."""
    job = _call(_client(url), "POST", f"/jobs/{job_id}/cancel")
    _print_json(job) if as_json else console.print(_job_line(job))


@jobs_app.command("events")
def jobs_events(job_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """A job's event log."""
    page = _call(_client(url), "GET", f"/jobs/{job_id}/events", params={"limit": 1000})
    if as_json:
        _print_json(page)
        return
    for event in page["data"]:
        console.print(f"{event['created_at'][:19]}  {event['type']:<24} {event['message']}")


# --- models and generation ---------------------------------------------------------------------


@app.command()
def models(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List the base models."""
    page = _call(_client(url), "GET", "/models")
    if as_json:
        _print_json(page)
        return
    for model in page["data"]:
        marks = " (default)" if model["default"] else ""
        console.print(f"{model['id']}{marks}  {model['source']}  available={model['available']}")


@app.command()
def generate(
    prompt: str,
    adapter: Annotated[
        str | None, typer.Option(help="Job id, adapter id or name; none = base.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    raw: Annotated[
        bool, typer.Option("--raw", help="Continue PROMPT as raw text, no chat template.")
    ] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate with the base model or an adapter (PROMPT is sent as a user chat message)."""
    body: dict[str, Any] = {
        "adapter": adapter,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
    }
    if raw:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    result = _call(_client(url), "POST", "/generate", json=body)
    _print_json(result) if as_json else console.print(result["text"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
