"""HTTP routes of the files API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Header, Query, Response, UploadFile
from fastapi.responses import StreamingResponse

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.files.repository import get_file, list_files
from app.files.schemas import FileDeleted, FileList, FileView
from app.files.service import delete_file, read_file, store_upload

router = APIRouter(prefix="/files", tags=["files"])


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Makes retries safe: 1 to 200 printable ASCII characters, unique per "
        "upload (a UUID). A repeat with the same key, filename, purpose and bytes answers 200 "
        "with the file the first one stored and `Idempotent-Replayed: true`; the key on a "
        "different upload is a 409 `idempotency_key_reused`.",
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=FileView,
    summary="Upload a dataset file",
    responses={
        200: {
            "model": FileView,
            "description": "A retry with the same Idempotency-Key and upload: the file the "
            "first request stored, with the header `Idempotent-Replayed: true`.",
        },
        409: {"description": "The Idempotency-Key was used for a different upload."},
    },
)
def upload_file(
    file: UploadFile,
    response: Response,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    purpose: Annotated[str, Form()] = "fine-tune",
    idempotency_key: IdempotencyKey = None,
) -> FileView:
    """Store a dataset file (201) for `dataset_url: "file-…"`. Send an `Idempotency-Key` header
    to make retries safe: the same key with the same upload returns the stored file."""
    upload = store_upload(
        session,
        owner=owner,
        stream=file.file,
        filename=file.filename,
        purpose=purpose,
        settings=settings,
        idempotency_key=idempotency_key,
    )
    if upload.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return FileView.model_validate(upload.file)


@router.get("", response_model=FileList, summary="List uploaded files, newest first")
def files(
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        str | None, Query(max_length=64, description="Last id of the previous page")
    ] = None,
) -> FileList:
    found, has_more = list_files(session, owner=owner, limit=limit, after=after)
    return FileList(data=[FileView.model_validate(f) for f in found], has_more=has_more)


@router.get("/{file_id}", response_model=FileView, summary="One uploaded file")
def file_info(file_id: str, session: SessionDep, owner: CurrentOwner) -> FileView:
    return FileView.model_validate(get_file(session, owner=owner, file_id=file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    summary="The uploaded bytes",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(
    file_id: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> StreamingResponse:
    file = get_file(session, owner=owner, file_id=file_id)
    return StreamingResponse(
        read_file(file, settings),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{file.filename}"'},
    )


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete an uploaded file")
def remove_file(
    file_id: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> FileDeleted:
    """Refused (409) while a queued or running job still needs the file."""
    file = delete_file(session, owner=owner, file_id=file_id, settings=settings)
    return FileDeleted(id=file.id)
