"""Uploads and downloads with a byte progress bar on stderr when it is a terminal (uploads:
from PROGRESS_FROM_BYTES; downloads, whose size is known only as they come: always)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.cli.client import ApiError, Client
from app.cli.common import call, err_console, fail, note

# Smaller transfers take well under a second: a bar would only flicker.
PROGRESS_FROM_BYTES = 8 * 1024 * 1024


def _bar(description: str) -> Progress:
    return Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,  # a log or a pipe gets the outcome, not frames
    )


class CountingReader:
    """A binary file whose reads advance a callback by the bytes read. httpx sizes a multipart
    upload with fileno() and rewinds with seek(), so those pass through."""

    def __init__(self, handle: IO[bytes], advance: Callable[[int], object]) -> None:
        self._handle = handle
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._advance(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()


@contextmanager
def _readable(path: Path, label: str) -> Iterator[IO[bytes] | CountingReader]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size < PROGRESS_FROM_BYTES:
            yield handle
            return
        with _bar(label) as bar:
            task = bar.add_task(label, total=size)
            # A retry rewinds and reads again: the bar counts the bytes of the latest pass.
            yield CountingReader(handle, lambda count: bar.advance(task, count))


def upload_file(client: Client, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
    """POST /files with the file at `path` (streamed from disk, not read into memory)."""
    with _readable(path, f"uploading {path.name}") as readable:
        uploaded: dict[str, Any] = call(
            client,
            "POST",
            "/files",
            files={"file": (path.name, readable)},
            data={"purpose": purpose},
        )
    return uploaded


def upload_adapter(
    client: Client, archive: Path | bytes, filename: str, form: dict[str, str]
) -> dict[str, Any]:
    """POST /adapters with an archive on disk or packed in memory."""
    if isinstance(archive, bytes):
        adapter: dict[str, Any] = call(
            client, "POST", "/adapters", files={"file": (filename, archive)}, data=form
        )
        return adapter
    with _readable(archive, f"uploading {filename}") as readable:
        adapter = call(client, "POST", "/adapters", files={"file": (filename, readable)}, data=form)
    return adapter


def download(client: Client, path: str, target: Path, label: str) -> int:
    """Stream GET `path` into `target` (written whole or not at all); the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    written = 0
    try:
        with (
            partial.open("wb") as handle,
            client.stream("GET", path) as response,
            _bar(label) as bar,
        ):
            length = response.headers.get("Content-Length")
            task = bar.add_task(label, total=int(length) if length else None)
            for chunk in response.iter_bytes():
                handle.write(chunk)
                written += len(chunk)
                bar.advance(task, len(chunk))
        partial.replace(target)
    except ApiError as exc:
        fail(str(exc))
    finally:
        partial.unlink(missing_ok=True)
    return written


def download_resuming(client: Client, path: str, target: Path, label: str) -> int:
    """GET `path` into `target`, going on from the bytes an interrupted earlier run left in
    `.<name>.part` (an HTTP Range request); the part file stays for the next run on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with client.stream("GET", path, headers=headers) as response, _bar(label) as bar:
            resumed = response.status_code == 206
            length = int(response.headers.get("Content-Length") or 0)
            task = bar.add_task(label, total=(have if resumed else 0) + length or None)
            bar.advance(task, have if resumed else 0)
            with partial.open("ab" if resumed else "wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    bar.advance(task, len(chunk))
        partial.replace(target)
    except ApiError as exc:
        if "416" in str(exc):  # the part file is already whole (or larger): start over
            partial.unlink(missing_ok=True)
        fail(str(exc))
    except KeyboardInterrupt:
        note(f"stopped; run the same command again to resume from {partial}")
        raise
    return target.stat().st_size
