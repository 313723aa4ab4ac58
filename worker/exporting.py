"""Make one adapter export (the `tuneserve.export_adapter` task): bring the adapter and its base
model here, merge them (worker/exports), write GGUF and a Modelfile when asked, and put the files
in the artifact store. Progress goes to SQL about once a second; every failure ends the export
`failed` with a message that says what to do, never `running` for good."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from app.adapters.models import Adapter
from app.base_models.loading import hub_kwargs, model_location
from app.base_models.registry import ModelSource, get_base_model
from app.db import unit_of_work
from app.errors import TuneserveError
from app.exports.repository import finish_export, save_export_progress, start_export
from app.settings import Settings, get_settings
from app.storage import artifact_store
from worker.exports import merge_adapter, ollama_modelfile_for, write_gguf

logger = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 1.0


class _Progress:
    """Writes (stage, done, total) to the export's row, at most once a second."""

    def __init__(self, export_id: str) -> None:
        self.export_id = export_id
        self.written = 0.0

    def stage(self, name: str) -> Any:
        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self.written < PROGRESS_EVERY_SECONDS and done < total:
                return
            self.written = now
            with unit_of_work() as session:
                progress = {"stage": name, "done": done, "total": total}
                save_export_progress(session, self.export_id, progress)

        return report


def _base_model_here(settings: Settings, base_model: str) -> Path:
    """The base model's folder on this disk (a Hub model is downloaded into the model cache)."""
    model = get_base_model(settings, base_model)
    location = model_location(settings, model)
    if model.source is not ModelSource.HUGGING_FACE:
        return Path(location)
    from huggingface_hub import snapshot_download

    kwargs = hub_kwargs(settings, model)
    return Path(
        snapshot_download(
            location,
            revision=kwargs["revision"],
            cache_dir=kwargs["cache_dir"],
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _tar(folder: Path, target: Path) -> Path:
    """The merged folder as one uncompressed .tar (safetensors do not compress)."""
    with tarfile.open(target, "w") as archive:
        archive.add(folder, arcname=target.name.removesuffix(".tar"))
    return target


def _make(
    kind: str, precision: str, adapter: Adapter, base_dir: Path, workdir: Path, progress: _Progress
) -> list[Path]:
    adapter_dir = workdir / "adapter"
    artifact_store(get_settings()).get_dir(adapter.path, adapter_dir)
    if kind == "merged":
        merged = merge_adapter(
            base_dir,
            adapter_dir,
            workdir / f"{adapter.id}-merged-{precision}",
            dtype=precision,  # type: ignore[arg-type]
            on_progress=progress.stage("merging"),
        )
        return [_tar(merged, workdir / f"{merged.name}.tar")]
    merged = merge_adapter(
        base_dir,
        adapter_dir,
        workdir / "merged",
        dtype="float32" if precision == "f32" else "float16",
        on_progress=progress.stage("merging"),
    )
    name = f"{adapter.id}-{precision}.gguf"
    gguf = write_gguf(
        merged,
        workdir / name,
        quantization=precision,  # type: ignore[arg-type]
        model_name=adapter.name,
        on_progress=progress.stage("writing gguf"),
    )
    modelfile = workdir / "Modelfile"
    modelfile.write_text(ollama_modelfile_for(merged, name))
    return [gguf, modelfile]


def run_export(export_id: str) -> None:
    settings = get_settings()
    with unit_of_work() as session:
        export = start_export(session, export_id)
        if export is None:
            return
        kind, precision, path = export.format, export.precision, export.path
        adapter = session.get(Adapter, export.adapter_id)
        if adapter is not None:
            session.expunge(adapter)
    if adapter is None:
        with unit_of_work() as session:
            finish_export(
                session,
                export_id,
                error={"code": "adapter_not_found", "message": "The adapter was deleted."},
            )
        return
    workdir = settings.data_dir / "exports" / export_id
    shutil.rmtree(workdir, ignore_errors=True)  # what an earlier, interrupted attempt left
    workdir.mkdir(parents=True)
    progress = _Progress(export_id)
    try:
        base_dir = _base_model_here(settings, adapter.base_model)
        made = _make(kind, precision, adapter, base_dir, workdir, progress)
        store = artifact_store(settings)
        files = []
        for index, local in enumerate(made):
            progress.stage("storing")(index, len(made))
            store.put_file(local, f"{path}/{local.name}")
            files.append(
                {"name": local.name, "bytes": local.stat().st_size, "sha256": _sha256(local)}
            )
        with unit_of_work() as session:
            finish_export(session, export_id, files=files)
        logger.info(
            "export %s (%s %s of %s) made: %s", export_id, kind, precision, adapter.id, files
        )
    except Exception as exc:
        logger.exception("export %s failed", export_id)
        code = exc.code if isinstance(exc, TuneserveError) else "export_failed"
        message = exc.message if isinstance(exc, TuneserveError) else f"{type(exc).__name__}: {exc}"
        with unit_of_work() as session:
            finish_export(session, export_id, error={"code": code, "message": message})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
