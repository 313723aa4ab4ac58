"""`tuneserve files`: the dataset files uploaded to the api."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli.client import ApiError
from app.cli.common import (
    AfterOption,
    JsonOption,
    LimitOption,
    UrlOption,
    call,
    console,
    existing_file,
    facts_table,
    fail,
    human_bytes,
    list_table,
    make_client,
    more_hint,
    note,
    output_path,
    print_json,
    when,
)
from app.cli.transfer import download, upload_file

files_app = typer.Typer(help="Uploaded dataset files.", no_args_is_help=True)


@files_app.command("upload")
def files_upload(
    path: Annotated[str, typer.Argument(help="A local file (.jsonl, .csv, .parquet…).")],
    purpose: Annotated[str, typer.Option(help="What the file is for.")] = "fine-tune",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset file; its id works as `--dataset` of `jobs create`."""
    uploaded = upload_file(make_client(url), existing_file(path), purpose)
    if as_json:
        print_json(uploaded)
    else:
        console.print(f"{uploaded['id']}  {uploaded['filename']}  {uploaded['bytes']} bytes")


@files_app.command("list")
def files_list(
    limit: LimitOption = 100,
    after: AfterOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List uploaded files, newest first."""
    params = {"limit": limit, "after": after} if after else {"limit": limit}
    page = call(make_client(url), "GET", "/files", params=params)
    if as_json:
        print_json(page)
        return
    table = list_table("id", "filename", "size", "purpose", "sha256", "created")
    for file in page["data"]:
        table.add_row(
            file["id"],
            file["filename"],
            human_bytes(file["bytes"]),
            file["purpose"],
            file["sha256"][:12],
            when(file["created_at"]),
        )
    console.print(table)
    more_hint(page, "id")


@files_app.command("get")
def files_get(file_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show one file."""
    file = call(make_client(url), "GET", f"/files/{file_id}")
    if as_json:
        print_json(file)
        return
    facts = facts_table()
    facts.add_row("id", file["id"])
    facts.add_row("filename", file["filename"])
    facts.add_row("size", f"{file['bytes']} bytes ({human_bytes(file['bytes'])})")
    facts.add_row("purpose", file["purpose"])
    facts.add_row("sha256", file["sha256"])
    facts.add_row("created", when(file["created_at"]))
    console.print(facts)


@files_app.command("content")
def files_content(
    file_id: str,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="File or folder to save to instead of stdout."),
    ] = None,
    url: UrlOption = None,
) -> None:
    """The uploaded bytes, on stdout or into a file."""
    client = make_client(url)
    if output is not None:
        target = output_path(output, file_id)
        if target != Path(output).expanduser():  # into a folder: under the uploaded name
            filename = Path(call(client, "GET", f"/files/{file_id}")["filename"]).name
            target = target.with_name(filename or file_id)
        written = download(client, f"/files/{file_id}/content", target, f"downloading {file_id}")
        note(f"saved {file_id} to {target} ({written} bytes)")
        return
    try:
        with client.stream("GET", f"/files/{file_id}/content") as response:
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
    except ApiError as exc:
        fail(str(exc))
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return
    sys.stdout.buffer.flush()


@files_app.command("delete")
def files_delete(file_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Delete an uploaded file (refused while a queued or running job needs it)."""
    deleted = call(make_client(url), "DELETE", f"/files/{file_id}")
    print_json(deleted) if as_json else console.print(f"deleted {deleted['id']}")
