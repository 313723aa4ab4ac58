"""Bring your own adapter: an uploaded or fetched PEFT LoRA archive, checked, then registered.

Every check runs in a temp directory under the data dir (removed whatever happens); only an
adapter that passes them all is copied to the artifact store (`adapters/<id>`) and gets its row.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from app.adapters import adalora
from app.adapters.fetch import fetch_archive
from app.adapters.models import Adapter
from app.adapters.unpacking import refusal, unpack_adapter
from app.adapters.validation import check_weights, linear_shapes, read_config
from app.base_models.registry import get_base_model
from app.db import unit_of_work, utcnow
from app.ids import new_id
from app.settings import Settings
from app.storage import artifact_store

_CHUNK = 1024 * 1024


@contextmanager
def _workspace(settings: Settings) -> Iterator[Path]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".adapter-import-", dir=settings.data_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _save_upload(stream: BinaryIO, dest: Path, max_bytes: int) -> None:
    size = 0
    with dest.open("xb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise refusal(
                    "adapter_archive_too_large",
                    f"The archive is larger than {max_bytes} bytes (TUNESERVE_MAX_DATASET_BYTES).",
                    field="file",
                    limit=max_bytes,
                )
            out.write(chunk)


def import_upload(
    stream: BinaryIO, *, owner: str, base_model: str, label: str | None, settings: Settings
) -> Adapter:
    """Register the adapter in an uploaded archive (POST /adapters)."""
    model = get_base_model(settings, base_model)
    with _workspace(settings) as work:
        _save_upload(stream, work / "archive", settings.max_dataset_bytes)
        return _import(work, owner=owner, base_model=model.name, label=label, settings=settings)


def import_url(
    url: str, *, owner: str, base_model: str, label: str | None, settings: Settings
) -> Adapter:
    """Register the adapter in the archive at url (POST /adapters/import)."""
    model = get_base_model(settings, base_model)
    with _workspace(settings) as work:
        fetch_archive(url, work / "archive", settings)
        return _import(work, owner=owner, base_model=model.name, label=label, settings=settings)


def _import(
    work: Path, *, owner: str, base_model: str, label: str | None, settings: Settings
) -> Adapter:
    directory = work / "adapter"
    directory.mkdir()
    unpacked = unpack_adapter(work / "archive", directory, max_bytes=settings.max_dataset_bytes)
    (work / "archive").unlink()
    if adalora.is_adalora(directory):
        adalora.to_lora(directory)  # then checked, stored and served as the LoRA it equals
    facts = read_config(directory)
    check_weights(directory, facts, linear_shapes(settings, get_base_model(settings, base_model)))

    adapter_id = new_id("adapter")
    key = f"adapters/{adapter_id}"
    store = artifact_store(settings)
    store.put_dir(directory, key)
    adapter = Adapter(
        id=adapter_id,
        owner=owner,
        job_id=None,
        base_model=base_model,
        name=f"ft:{base_model}:{owner}:{label or 'import'}:{adapter_id}",
        path=key,
        sha256=unpacked.sha256,
        size_bytes=unpacked.size_bytes,
        rank=facts.rank,
        created_at=utcnow(),
        request_count=0,
    )
    try:
        with unit_of_work() as session:
            session.add(adapter)
    except BaseException:
        store.delete(key)
        raise
    return adapter
