"""`tuneserve up`: run the api, one worker and the scheduler together, and stop them together."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from rich.console import Console

STOP_GRACE_SECONDS = 20


def api_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
    ]


def worker_arguments(queues: Sequence[str]) -> list[str]:
    # The solo pool runs the job in the worker process itself: one job per worker (per GPU), and
    # a SIGTERM reaches the job, which checkpoints and hands itself back before the worker exits.
    return [
        "worker",
        "--loglevel",
        "INFO",
        "--queues",
        ",".join(queues),
        "--pool",
        "solo",
        "--without-gossip",
        "--without-mingle",
    ]


def worker_command(queues: Sequence[str]) -> list[str]:
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app"]
    return celery + worker_arguments(queues)


def scheduler_command() -> list[str]:
    return [sys.executable, "-m", "app.cli.main", "scheduler"]


class Supervisor:
    """Starts child processes and keeps them running: one that dies (a worker killed by the OOM
    killer, say) is started again, and its job resumes from its checkpoint. A child that keeps
    dying (RESTARTS_PER_MINUTE) or a stop signal stops all of them."""

    RESTARTS_PER_MINUTE = 5

    def __init__(self, console: Console) -> None:
        self.console = console
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.restarts: dict[str, list[float]] = {}
        self.stopping = False

    def start(self, name: str, command: list[str]) -> None:
        self.commands[name] = command
        self.children[name] = subprocess.Popen(command)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        self.console.print(f"[yellow]{signal.Signals(signum).name}: stopping…[/yellow]")

    def _restart(self, name: str, returncode: int) -> bool:
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < 60] + [now]
        self.restarts[name] = recent
        if len(recent) > self.RESTARTS_PER_MINUTE:
            self.console.print(
                f"[red]{name} exited with code {returncode} {len(recent)} times in a minute; "
                "stopping everything. Its output above says why.[/red]"
            )
            return False
        self.console.print(
            f"[yellow]{name} exited with code {returncode}; starting it again.[/yellow]"
        )
        self.start(name, self.commands[name])
        return True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        exit_code = 0
        while not self.stopping:
            for name, child in list(self.children.items()):
                if child.poll() is not None and not self._restart(name, child.returncode):
                    exit_code = child.returncode or 1
                    self.stopping = True
                    break
            time.sleep(0.5)
        self.stop()
        return exit_code

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for name, child in self.children.items():
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.console.print(
                    f"[red]{name} did not stop in {STOP_GRACE_SECONDS} s; killing it.[/red]"
                )
                child.kill()
                child.wait()
