"""HTTP routes of the files API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile

from app.deps import CurrentOwner, SessionDep, SettingsDep
from app.files.repository import get_file, list_files
from app.files.schemas import FileList, FileView
from app.files.service import store_upload

router = APIRouter(prefix="/files", tags=["files"])


@router.post("", status_code=201, response_model=FileView, summary="Upload a dataset file")
def upload_file(
    file: UploadFile,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FileView:
    stored = store_upload(
        session,
        owner=owner,
        stream=file.file,
        filename=file.filename,
        purpose=purpose,
        settings=settings,
    )
    return FileView.model_validate(stored)


@router.get("", response_model=FileList, summary="List uploaded files")
def files(
    session: SessionDep, owner: CurrentOwner, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> FileList:
    return FileList(
        data=[FileView.model_validate(f) for f in list_files(session, owner=owner, limit=limit)]
    )


@router.get("/{file_id}", response_model=FileView, summary="One uploaded file")
def file_info(file_id: str, session: SessionDep, owner: CurrentOwner) -> FileView:
    return FileView.model_validate(get_file(session, owner=owner, file_id=file_id))
