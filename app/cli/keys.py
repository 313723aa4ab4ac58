"""`tuneserve keys`: API keys, managed on a machine that reaches the database (like `db`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli.common import JsonOption, console, err_console, fail, list_table, print_json

keys_app = typer.Typer(help="API keys (run where the database is reachable).", no_args_is_help=True)


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
    from app.errors import TuneserveError
    from app.keys.service import create_key
    from app.migrate import upgrade_database

    upgrade_database()
    try:
        with unit_of_work() as session:
            new = create_key(session, name=name, owner=owner)
    except TuneserveError as exc:
        fail(exc.message)
    err_console.print(
        f"created {new.row.id} (name {new.row.name}, owner {new.row.owner}). The key is shown "
        "only this once; store it now:"
    )
    print(new.secret)  # noqa: T201 - the key alone on stdout's last line, for scripts


@keys_app.command("list")
def keys_list(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
    as_json: JsonOption = False,
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
        print_json({"object": "list", "data": found})
        return
    table = list_table("id", "name", "owner", "key starts", "created", "last used", "revoked")
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
    from app.errors import TuneserveError
    from app.keys.service import revoke_key

    try:
        with unit_of_work() as session:
            row = revoke_key(session, key_id)
            owner = row.owner
    except TuneserveError as exc:
        fail(exc.message)
    console.print(f"revoked {key_id} (owner {owner})")
