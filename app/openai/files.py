"""/v1/files: OpenAI's files API over app/files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.files.models import File
from app.files.repository import get_file, list_files
from app.files.service import delete_file, read_file, store_upload
from app.openai.common import Page, epoch, page

router = APIRouter(prefix="/v1/files", tags=["openai"])


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def file_object(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=epoch(file.created_at) or 0,
        filename=file.filename,
        purpose=file.purpose,
    )


@router.post("", response_model=FileObject, summary="Upload a file (purpose fine-tune)")
def create_file(
    file: UploadFile,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    purpose: Annotated[str, Form()],
) -> FileObject:
    upload = store_upload(
        session,
        owner=owner,
        stream=file.file,
        filename=file.filename,
        purpose=purpose,
        settings=settings,
    )
    return file_object(upload.file)


@router.get("", response_model=Page, summary="List files, newest first")
def files(
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> Page:
    found, has_more = list_files(session, owner=owner, limit=limit, after=after)
    return page([file_object(f) for f in found if purpose in (None, f.purpose)], has_more)


@router.get("/{file_id}", response_model=FileObject, summary="One file")
def retrieve_file(file_id: str, session: SessionDep, owner: CurrentOwner) -> FileObject:
    return file_object(get_file(session, owner=owner, file_id=file_id))


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def remove_file(
    file_id: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> FileDeleted:
    return FileDeleted(id=delete_file(session, owner=owner, file_id=file_id, settings=settings).id)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    summary="A file's bytes",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(
    file_id: str, session: SessionDep, owner: CurrentOwner, settings: SettingsDep
) -> StreamingResponse:
    file = get_file(session, owner=owner, file_id=file_id)
    return StreamingResponse(read_file(file, settings), media_type="application/octet-stream")
