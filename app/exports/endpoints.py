"""/adapters/{id}/exports: ask for an adapter merged or as GGUF, follow it, download its files
(with HTTP Range requests, so a broken download resumes)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from app.adapters.repository import get_adapter
from app.db import after_commit
from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.errors import InvalidRequest, NotFound
from app.exports.download import ranged_stream
from app.exports.models import AdapterExport
from app.exports.repository import get_export, list_exports, reusable_export
from app.exports.schemas import CreateExport, ExportFile, ExportList, ExportView
from app.ids import new_id
from app.jobs.parents import lora_facts
from app.queue import enqueue_export
from app.storage import artifact_store

router = APIRouter(prefix="/adapters", tags=["exports"])


def _view(export: AdapterExport) -> ExportView:
    files = [
        ExportFile(
            **file,
            url=f"/adapters/{export.adapter_id}/exports/{export.id}/files/{file['name']}",
        )
        for file in export.files or []
    ]
    own = set(ExportView.model_fields) - {"files", "object"}
    return ExportView.model_validate({**{c: getattr(export, c) for c in own}, "files": files})


@router.post(
    "/{adapter_id}/exports",
    response_model=ExportView,
    status_code=202,
    summary="Export an adapter merged into its base model, or as GGUF",
)
def create_export(
    adapter_id: str,
    body: CreateExport,
    response: Response,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
) -> ExportView:
    """Made by a worker (progress in `progress`, GET it until `succeeded`). The same format and
    precision asked again answers the export already made or being made (200)."""
    adapter = get_adapter(session, owner=owner, adapter_id=adapter_id)
    assert body.precision is not None  # set by the request model
    if lora_facts(settings, adapter.path).task_type == "SEQ_CLS":
        raise InvalidRequest(
            f"Adapter {adapter.id} is a reward model: it scores answers and has no text to "
            "generate, so there is no merged or GGUF language model to make of it. Download it "
            "as it is with GET /adapters/{id}/download.",
            code="adapter_not_generative",
        )
    existing = reusable_export(
        session, adapter_id=adapter.id, format=body.format.value, precision=body.precision
    )
    if existing is not None:
        response.status_code = 200
        if existing.status == "queued":  # its message may have been lost: send it again
            after_commit(session, lambda: enqueue_export(existing.id, settings))
        return _view(existing)
    export_id = new_id("export")
    export = AdapterExport(
        id=export_id,
        adapter_id=adapter.id,
        owner=owner,
        format=body.format.value,
        precision=body.precision,
        status="queued",
        path=f"exports/{export_id}",
    )
    session.add(export)
    session.flush()
    after_commit(session, lambda: enqueue_export(export_id, settings))
    return _view(export)


@router.get("/{adapter_id}/exports", response_model=ExportList, summary="An adapter's exports")
def exports(adapter_id: str, session: SessionDep, owner: CurrentOwner) -> ExportList:
    adapter = get_adapter(session, owner=owner, adapter_id=adapter_id)
    return ExportList(
        data=[_view(e) for e in list_exports(session, owner=owner, adapter_id=adapter.id)]
    )


@router.get("/{adapter_id}/exports/{export_id}", response_model=ExportView, summary="One export")
def export(adapter_id: str, export_id: str, session: SessionDep, owner: CurrentOwner) -> ExportView:
    return _view(get_export(session, owner=owner, adapter_id=adapter_id, export_id=export_id))


@router.get(
    "/{adapter_id}/exports/{export_id}/files/{name}",
    response_class=StreamingResponse,
    summary="Download a file of an export (Range requests resume)",
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "A range"}},
)
def export_file(
    adapter_id: str,
    export_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
) -> Response:
    export = get_export(session, owner=owner, adapter_id=adapter_id, export_id=export_id)
    known = {file["name"]: file for file in export.files or []}
    if name not in known:
        raise NotFound(
            f"Export {export.id} has no file {name!r}"
            + (f"; its files: {', '.join(known)}." if known else f" yet: it is {export.status}."),
            code="export_file_not_found",
        )
    store = artifact_store(settings)
    key = f"{export.path}/{name}"
    headers = {"ETag": f'"{known[name]["sha256"]}"'}
    local = store.local_path(key)
    if local is not None:  # Starlette answers Range and If-Range itself
        return FileResponse(local, filename=name, headers=headers)
    return ranged_stream(store, key, name, known[name]["bytes"], request, headers)
