"""HTTP routes of the adapters API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.adapters.repository import get_adapter, list_adapters
from app.adapters.schemas import AdapterList, AdapterView
from app.deps import CurrentOwner, SessionDep

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("", response_model=AdapterList, summary="List trained adapters, newest first")
def adapters(
    session: SessionDep,
    owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> AdapterList:
    found, has_more = list_adapters(session, owner=owner, limit=limit, after=after)
    return AdapterList(data=[AdapterView.model_validate(a) for a in found], has_more=has_more)


@router.get("/{adapter_id}", response_model=AdapterView, summary="One adapter")
def adapter(adapter_id: str, session: SessionDep, owner: CurrentOwner) -> AdapterView:
    return AdapterView.model_validate(get_adapter(session, owner=owner, adapter_id=adapter_id))
