"""/v1/files: OpenAI's files API over app/files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.files.models import File
from app.files.repository import get_file, list_files
from app.files.service import delete_file, read_file, store_upload
from app.openai.common import Page, epoch, unsupported

router = APIRouter(prefix="/v1/files", tags=["openai"])


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FilePage(Page):
    """OpenAI's file list names its first and last ids as strings, even when it is empty."""

    data: list[FileObject]
    first_id: str
    last_id: str


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


FORM_FIELDS = {"file", "purpose"}


async def _refuse_unknown_form_fields(request: Request) -> None:
    """A form field tuneserve does not honour is a 400 that names it, never silently dropped.
    (`expires_after` arrives as `expires_after[anchor]` and `expires_after[seconds]`.)"""
    for name in (await request.form()).keys():
        field = name.split("[", 1)[0]
        if field == "expires_after":
            raise unsupported(
                field,
                "expires_after: files do not expire in tuneserve; leave it out and "
                "delete the file with DELETE /v1/files/{id} when it is no longer needed.",
            )
        if field not in FORM_FIELDS:
            raise unsupported(
                field, f"{field}: not a field of file uploads; send file and purpose."
            )


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a file (purpose fine-tune)",
    dependencies=[Depends(_refuse_unknown_form_fields)],
)
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


@router.get("", response_model=FilePage, summary="List files, newest first")
def files(
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    order: Annotated[Literal["desc", "asc"], Query(description="By creation time")] = "desc",
) -> FilePage:
    found, has_more = list_files(
        session, owner=owner, limit=limit, after=after or None, purpose=purpose, order=order
    )
    listed = [file_object(file) for file in found]
    return FilePage(
        data=listed,
        has_more=has_more,
        first_id=listed[0].id if listed else "",
        last_id=listed[-1].id if listed else "",
    )


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
