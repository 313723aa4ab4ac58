"""HTTP routes of the adapters API."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from app.adapters.archive import adapter_entries, tar_gz
from app.adapters.importing import import_upload, import_url
from app.adapters.models import Adapter
from app.adapters.repository import delete_adapter, get_adapter, list_adapters
from app.adapters.schemas import (
    LABEL_DESCRIPTION,
    LABEL_PATTERN,
    AdapterDeleted,
    AdapterImport,
    AdapterList,
    AdapterView,
)
from app.db import after_commit
from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.errors import NotFound
from app.storage import artifact_store

router = APIRouter(prefix="/adapters", tags=["adapters"])

IMPORT_CHECKS = (
    "The archive is a .zip or .tar.gz holding adapter_config.json and adapter_model.safetensors "
    "(at its root or in one top-level folder); README.md is kept, other text files are dropped. "
    "Refused with a 400 naming the file or tensor: unsafe members (absolute paths, `..`, links, "
    "devices), too many members or bytes unpacked, pickle files (`adapter_not_safetensors`), "
    "configs that are not plain LoRA, and weights whose modules or shapes do not fit the base "
    "model (`adapter_module_mismatch`, `adapter_shape_mismatch`). Nothing is stored unless every "
    "check passes."
)


def _loaded(request: Request) -> frozenset[str]:
    loaded: frozenset[str] = request.app.state.engine.loaded_adapter_ids()
    return loaded


def _view(adapter: Adapter, loaded: frozenset[str]) -> AdapterView:
    view = AdapterView.model_validate(adapter)
    view.loaded = adapter.id in loaded
    return view


@router.get("", response_model=AdapterList, summary="List adapters, newest first")
def adapters(
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> AdapterList:
    found, has_more = list_adapters(session, owner=owner, limit=limit, after=after)
    loaded = _loaded(request)
    return AdapterList(data=[_view(a, loaded) for a in found], has_more=has_more)


@router.post(
    "",
    status_code=201,
    response_model=AdapterView,
    summary="Upload an adapter",
    description="Import a PEFT LoRA adapter trained elsewhere: multipart `file` (the archive), "
    f"`base_model` (a name from GET /models) and optional `name`. {IMPORT_CHECKS}",
)
def upload_adapter(
    request: Request,
    file: UploadFile,
    owner: CurrentOwner,
    settings: SettingsDep,
    base_model: Annotated[
        str, Form(min_length=1, max_length=200, description="A name from GET /models.")
    ],
    name: Annotated[str | None, Form(pattern=LABEL_PATTERN, description=LABEL_DESCRIPTION)] = None,
) -> AdapterView:
    adapter = import_upload(
        file.file, owner=owner, base_model=base_model, label=name, settings=settings
    )
    return _view(adapter, _loaded(request))


@router.post(
    "/import",
    status_code=201,
    response_model=AdapterView,
    summary="Import an adapter from a URL",
    description="Download the archive at `url` (http(s); public hosts only unless the operator "
    "sets TUNESERVE_ALLOW_PRIVATE_NETWORKS; the dataset download limits apply) and import it as "
    f"POST /adapters does. {IMPORT_CHECKS}",
)
def import_adapter(
    body: AdapterImport, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> AdapterView:
    adapter = import_url(
        body.url, owner=owner, base_model=body.base_model, label=body.name, settings=settings
    )
    return _view(adapter, _loaded(request))


@router.get("/{adapter_id}", response_model=AdapterView, summary="One adapter")
def adapter(
    adapter_id: str, request: Request, session: SessionDep, owner: CurrentOwner
) -> AdapterView:
    return _view(get_adapter(session, owner=owner, adapter_id=adapter_id), _loaded(request))


@router.get(
    "/{adapter_id}/download",
    response_class=StreamingResponse,
    summary="The adapter as a .tar.gz",
    responses={200: {"content": {"application/gzip": {}}}},
)
def download_adapter(
    adapter_id: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> StreamingResponse:
    """A `<adapter id>.tar.gz` holding the folder `<adapter id>/` with adapter_config.json,
    adapter_model.safetensors and README.md (when there is one): PEFT's
    `PeftModel.from_pretrained(base_model, "<adapter id>")` loads it after extraction, and
    POST /adapters imports it again."""
    adapter = get_adapter(session, owner=owner, adapter_id=adapter_id)
    store = artifact_store(settings)
    try:
        entries = adapter_entries(store, adapter.path)
    except FileNotFoundError as exc:
        raise NotFound(
            f"Adapter {adapter.id}'s files are missing from the artifact store.",
            code="adapter_files_missing",
        ) from exc
    return StreamingResponse(
        tar_gz(store, entries, folder=adapter.id, mtime=int(adapter.created_at.timestamp())),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{adapter.id}.tar.gz"'},
    )


@router.delete("/{adapter_id}", response_model=AdapterDeleted, summary="Delete an adapter")
def remove_adapter(
    adapter_id: str,
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
) -> AdapterDeleted:
    """The row goes at once and the files once that commits; jobs that trained it remain (their
    `adapter` becomes null). A vLLM server that serves it unloads it once that commits."""
    deleted = delete_adapter(session, owner=owner, adapter_id=adapter_id, settings=settings)
    engine = request.app.state.engine
    after_commit(session, partial(engine.adapter_deleted, deleted.id, deleted.base_model))
    return AdapterDeleted(id=deleted.id)
