"""`tuneserve adapters`: trained and imported LoRA adapters."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from app.cli.client import Client
from app.cli.common import (
    AfterOption,
    JsonOption,
    LimitOption,
    UrlOption,
    call,
    console,
    err_console,
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
from app.cli.transfer import download, download_resuming, upload_adapter

adapters_app = typer.Typer(help="LoRA adapters: trained or uploaded.", no_args_is_help=True)

# What the api keeps of an adapter folder (app/adapters/unpacking.py); the rest stays behind.
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PACKED = (CONFIG, WEIGHTS, "README.md")


def pack_folder(folder: Path) -> bytes:
    """A PEFT adapter folder as a .tar.gz in memory: its config, weights and model card, in a
    top-level folder of its name (links followed)."""
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        hint = ""
        if WEIGHTS in missing and (folder / "adapter_model.bin").is_file():
            hint = (
                " It has adapter_model.bin, a pickle the api never loads: save the adapter "
                "with safe_serialization=True (PEFT's default)."
            )
        fail(f"{folder} is not a PEFT LoRA adapter folder: no {' or '.join(missing)}.{hint}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", dereference=True) as archive:
        for name in PACKED:
            if (folder / name).is_file():
                archive.add(folder / name, arcname=f"{folder.resolve().name}/{name}")
    return buffer.getvalue()


def _label(name: str) -> str:
    """The label of `ft:<base>:<owner>:<label>:<job or adapter id>`: the rest of the name is in
    the other columns, and the whole of it would not fit a terminal's table."""
    parts = name.split(":")
    return parts[-2] if name.startswith("ft:") and len(parts) >= 5 else name


def _adapters_table(adapters: list[dict[str, Any]]) -> Table:
    table = list_table("id", "base model", "label", "rank", "size", "uses", "created")
    for adapter in adapters:
        table.add_row(
            adapter["id"],
            adapter["base_model"],
            _label(adapter["name"]),
            str(adapter["rank"]),
            human_bytes(adapter["size_bytes"]),
            str(adapter["request_count"]),
            when(adapter["created_at"]),
        )
    return table


@adapters_app.command("list")
def adapters_list(
    limit: LimitOption = 20,
    after: AfterOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List adapters, newest first."""
    params = {"limit": limit, "after": after} if after else {"limit": limit}
    page = call(make_client(url), "GET", "/adapters", params=params)
    if as_json:
        print_json(page)
        return
    console.print(_adapters_table(page["data"]))
    more_hint(page, "id")


@adapters_app.command("get")
def adapters_get(adapter_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show one adapter."""
    adapter = call(make_client(url), "GET", f"/adapters/{adapter_id}")
    if as_json:
        print_json(adapter)
        return
    facts = facts_table()
    facts.add_row("id", adapter["id"])
    facts.add_row("name", adapter["name"])
    facts.add_row("base model", adapter["base_model"])
    facts.add_row("trained by", adapter["job_id"] or "imported")
    facts.add_row("rank", str(adapter["rank"]))
    facts.add_row("size", f"{adapter['size_bytes']} bytes ({human_bytes(adapter['size_bytes'])})")
    facts.add_row("sha256", adapter["sha256"])
    facts.add_row("loaded", "yes" if adapter["loaded"] else "no")
    facts.add_row(
        "used", f"{adapter['request_count']} times, last {when(adapter.get('last_used_at'))}"
    )
    facts.add_row("created", when(adapter["created_at"]))
    console.print(facts)


@adapters_app.command("upload")
def adapters_upload(
    path: Annotated[
        str,
        typer.Argument(help="A .zip or .tar.gz of a PEFT LoRA adapter, or its folder."),
    ],
    base_model: Annotated[str, typer.Option(help="The base model it was trained on.")],
    name: Annotated[
        str | None, typer.Option(help="Part of its name: letters, digits, - or _ (default import).")
    ] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import an adapter trained elsewhere (a folder is packed into a .tar.gz first)."""
    source = Path(path).expanduser()
    if not source.exists():
        fail(f"no such adapter archive or folder: {path}")
    form = {"base_model": base_model, **({"name": name} if name else {})}
    client = make_client(url)
    if source.is_dir():
        packed = pack_folder(source)
        note(f"packed {source} ({len(packed)} bytes)")
        adapter = upload_adapter(client, packed, f"{source.resolve().name}.tar.gz", form)
    else:
        adapter = upload_adapter(client, source, source.name, form)
    print_json(adapter) if as_json else console.print(f"{adapter['id']}  {adapter['name']}")


@adapters_app.command("download")
def adapters_download(
    adapter_id: str,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="File or folder to save to (default ./<adapter id>.tar.gz)."
        ),
    ] = None,
    url: UrlOption = None,
) -> None:
    """Save an adapter as a .tar.gz (PEFT loads its folder; `adapters upload` takes it back)."""
    target = output_path(output, f"{adapter_id}.tar.gz")
    client = make_client(url)
    written = download(client, f"/adapters/{adapter_id}/download", target, adapter_id)
    note(f"saved {adapter_id} to {target} ({human_bytes(written)})")


@adapters_app.command("delete")
def adapters_delete(adapter_id: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Delete an adapter (the job that trained it stays, without it)."""
    deleted = call(make_client(url), "DELETE", f"/adapters/{adapter_id}")
    print_json(deleted) if as_json else console.print(f"deleted {deleted['id']}")


@adapters_app.command("export")
def adapters_export(
    adapter_id: str,
    format: Annotated[
        str, typer.Option("--format", help="merged (a Hugging Face folder, as .tar) or gguf.")
    ],
    precision: Annotated[
        str | None,
        typer.Option(
            help="merged: bfloat16 (default), float16, float32; gguf: f16 (default), q8_0, f32."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to save the files in.")
    ] = Path("."),
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Merge an adapter into its base model (or write it as GGUF, with an Ollama Modelfile) on a
    worker, show its progress, and download the files (run it again to resume a download)."""
    client = make_client(url)
    body = {"format": format, **({"precision": precision} if precision else {})}
    export = call(client, "POST", f"/adapters/{adapter_id}/exports", json=body)
    export = follow_export(client, adapter_id, export)
    if export["status"] == "failed":
        fail(f"export {export['id']} failed: {export['error']['message']}")
    for file in export["files"]:
        target = output / file["name"]
        if target.is_file() and target.stat().st_size == file["bytes"]:
            note(f"{target} is already here")
            continue
        download_resuming(client, file["url"], target, file["name"])
        note(f"saved {target} ({human_bytes(file['bytes'])})")
    if as_json:
        print_json(export)


def follow_export(client: Client, adapter_id: str, export: dict[str, Any]) -> dict[str, Any]:
    """The export, polled with a progress bar (stage, tensors done) until it ends."""
    columns = (TextColumn("{task.fields[stage]}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(export["id"], total=None, stage=export["status"])
        while export["status"] in ("queued", "running"):
            time.sleep(0.5)
            export = call(client, "GET", f"/adapters/{adapter_id}/exports/{export['id']}")
            progress = export.get("progress") or {}
            bar.update(
                task,
                stage=progress.get("stage") or export["status"],
                total=progress.get("total"),
                completed=progress.get("done", 0),
            )
    return export
