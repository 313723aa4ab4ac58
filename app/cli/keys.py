"""`tuneserve keys`: API keys, managed on a machine that reaches the database (like `db`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.errors import TuneserveError

keys_app = typer.Typer(help="API keys (run where the database is reachable).", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _fail(exc: TuneserveError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc.message}")
    return typer.Exit(1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for, e.g. alice or ci.")],
    owner: Annotated[
        str | None,
        typer.Option(
            help="Owner of what the key creates (default: NAME); keys of one owner "
            "share jobs, files and adapters."
        ),
    ] = None,
) -> None:
    """Make a key and print it once (the last line of output); only its hash is stored."""
    from app.db import unit_of_work
    from app.keys.service import create_key
    from app.migrate import upgrade_database

    upgrade_database()
    try:
        with unit_of_work() as session:
            new = create_key(session, name=name, owner=owner)
    except TuneserveError as exc:
        raise _fail(exc) from exc
    err_console.print(
        f"created {new.row.id} (name {new.row.name}, owner {new.row.owner}). The key is shown "
        "only this once; store it now:"
    )
    print(new.secret)  # noqa: T201 - the key alone on stdout's last line, for scripts


@keys_app.command("list")
def keys_list(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List keys (never the keys themselves: their id, owner and first characters)."""
    from app.db import unit_of_work
    from app.keys.service import list_keys

    with unit_of_work() as session:
        rows = list_keys(session, include_revoked=revoked)
        found: list[dict[str, Any]] = [
            {
                "id": row.id,
                "name": row.name,
                "owner": row.owner,
                "prefix": row.prefix,
                "created_at": row.created_at.isoformat(),
                "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
                "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
            }
            for row in rows
        ]
    if as_json:
        console.print_json(json.dumps({"object": "list", "data": found}))
        return
    table = Table()
    table.add_column("id", no_wrap=True)  # whole: `keys revoke` needs it
    for column in ("name", "owner", "key starts", "created", "last used", "revoked"):
        table.add_column(column)
    for key in found:
        table.add_row(
            key["id"],
            key["name"],
            key["owner"],
            f"{key['prefix']}…",
            key["created_at"][:16].replace("T", " "),
            (key["last_used_at"] or "-")[:16].replace("T", " "),
            (key["revoked_at"] or "-")[:16].replace("T", " "),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from app.db import unit_of_work
    from app.keys.service import revoke_key

    try:
        with unit_of_work() as session:
            row = revoke_key(session, key_id)
            owner = row.owner
    except TuneserveError as exc:
        raise _fail(exc) from exc
    console.print(f"revoked {key_id} (owner {owner})")
