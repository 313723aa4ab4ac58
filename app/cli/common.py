"""What every `tuneserve` command that talks to the api shares: the client, the `--url` and
`--json` options, error reporting, and the two consoles.

stdout carries results only (the API's JSON with --json, tables, generated text); messages,
progress bars and errors go to stderr, so `tuneserve ... --json | jq` always reads clean JSON.
The consoles print text as given (no rich markup or emoji codes): names, messages and generated
text from the api may hold `[...]` or `:word:`, which rich would otherwise eat or replace.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.cli.client import ApiError, Client

# soft_wrap: a line of text stays one line (a message, an id, a path), whatever the width; tables
# still fit the terminal.
console = Console(markup=False, emoji=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, emoji=False, soft_wrap=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="API URL (default: TUNESERVE_API_URL).")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON answer, nothing else, on stdout.")
]
LimitOption = Annotated[int, typer.Option(min=1, help="How many, at most.")]
AfterOption = Annotated[
    str | None, typer.Option(help="Start after this id (the last one of the previous page).")
]


def _saved_key(path: Path) -> str | None:
    # As app.keys.service.read_key_file, without importing the SQL stack it lives with (half a
    # second of every command).
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def make_client(url: str | None) -> Client:
    """A client of the api at `url` (else TUNESERVE_API_URL) with TUNESERVE_API_KEY, or else the
    key `tuneserve up` saved."""
    from app.settings import get_settings

    settings = get_settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return Client(url or settings.api_url, api_key=key or _saved_key(settings.api_key_file))


def fail(message: str) -> NoReturn:
    """`error: <message>` on stderr, exit status 1."""
    err_console.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(1)


def call(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    """The api's answer; an API error is reported as `error: <message> [code, HTTP status]`."""
    try:
        return client.request(method, path, **kwargs)
    except ApiError as exc:
        fail(str(exc))


def print_json(value: Any) -> None:
    """JSON on stdout: highlighted on a terminal, plain (and whole) when piped."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if console.is_terminal:
        console.print_json(text)
    else:
        sys.stdout.write(text + "\n")


def note(message: str) -> None:
    """A message for the person at the terminal (stderr)."""
    err_console.print(message)


def existing_file(value: str, what: str = "file") -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        fail(f"no such {what}: {value}")
    if not path.is_file():
        fail(f"not a file: {value}")
    return path


def output_path(output: str | None, name: str) -> Path:
    """Where `-o` says to save `name`: that file, or into that folder (one that exists, or any
    path ending in a slash)."""
    if output is None:
        return Path(name)
    path = Path(output).expanduser()
    return path / name if output.endswith(("/", os.sep)) or path.is_dir() else path


def more_hint(page: dict[str, Any], cursor: str) -> None:
    """On stderr, how to get the next page when there is one."""
    if page.get("has_more") and page.get("data"):
        note(f"more: --after {page['data'][-1][cursor]}")


def facts_table() -> Table:
    """Facts of one thing, a `name  value` line each."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    return facts


def list_table(*headers: str) -> Table:
    """A compact table of a list (a line a row, few rules, to fit a terminal); its first column,
    an id other commands take, and the creation time are never cut or wrapped."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for header in headers:
        table.add_column(header, no_wrap=header in (headers[0], "created"))
    return table


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(count: int | float | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def when(timestamp: str | None) -> str:
    """An API timestamp to the second, as `2026-01-31 12:34:56`."""
    return "-" if not timestamp else timestamp[:19].replace("T", " ")
