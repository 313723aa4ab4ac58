"""`tuneserve`: run the service and drive it from a terminal.

Running the service is here; each group of api commands has its module (jobs.py, files.py,
adapters.py, generate.py, keys.py), sharing common.py.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from app.cli.adapters import adapters_app
from app.cli.common import (
    JsonOption,
    UrlOption,
    call,
    console,
    list_table,
    make_client,
    print_json,
)
from app.cli.files import files_app
from app.cli.generate import generate
from app.cli.jobs import jobs_app
from app.cli.keys import keys_app

app = typer.Typer(help="tuneserve: self-hosted LoRA fine-tuning.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(files_app, name="files")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")


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
    from app.settings import get_settings

    settings = get_settings()
    upgrade_database()
    new_key = ensure_local_key(settings.api_key_file)
    # The supervisor's messages are rich markup; this output is the service's own, not api data.
    marked_up = Console()
    if new_key is not None:
        console.print(
            f"Created the local API key (saved in {settings.api_key_file}, where the CLI finds "
            f"it; send it as `Authorization: Bearer <key>`):\n{new_key}"
        )
    supervisor = Supervisor(marked_up)
    supervisor.start("api", api_command(host, port))
    supervisor.start("worker", worker_command(settings.worker_queues))
    supervisor.start("scheduler", scheduler_command())
    marked_up.print(
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
    from app.settings import get_settings
    from worker.celery_app import celery_app

    chosen = queues.split(",") if queues else get_settings().worker_queues
    celery_app.worker_main(worker_arguments(chosen))


@app.command()
def scheduler() -> None:
    """Run the periodic upkeep: re-queue jobs whose worker died or whose message was lost."""
    import signal
    import threading

    from app.logs import configure_logging
    from app.settings import get_settings
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
    from app.settings import get_settings

    upgrade_database()
    console.print(f"database at {get_settings().sqlalchemy_url} is up to date")


# --- models ------------------------------------------------------------------------------------


@app.command()
def models(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List the base models."""
    page = call(make_client(url), "GET", "/models")
    if as_json:
        print_json(page)
        return
    table = list_table("id", "source", "available", "default", "description")
    for model in page["data"]:
        table.add_row(
            model["id"],
            model["source"],
            "yes" if model["available"] else "no",
            "yes" if model["default"] else "",
            model["description"],
        )
    console.print(table)


app.command()(generate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
