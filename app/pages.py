"""Lists newest first (or oldest first), a page at a time, with the last id of the previous page
as the cursor."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from app.errors import InvalidRequest

Row = TypeVar("Row")


def newest_first(
    session: Session,
    query: Select[Row],
    model: Any,
    *,
    owner: str,
    after: str | None,
    limit: int,
    noun: str,
    order: Literal["desc", "asc"] = "desc",
) -> tuple[list[Row], bool]:
    """One page of `query` (already filtered to the owner), newest first (`order="asc"`: oldest
    first), and whether more follow. `after` must be an id of the owner's `model` rows (else 400
    invalid_cursor)."""
    key = tuple_(model.created_at, model.id)
    if after is not None:
        cursor = session.get(model, after)
        if cursor is None or cursor.owner != owner:
            raise InvalidRequest(
                f"after: no {noun} {after!r}", code="invalid_cursor", detail={"field": "after"}
            )
        position = (cursor.created_at, cursor.id)
        query = query.where(key < position if order == "desc" else key > position)
    if order == "desc":
        query = query.order_by(model.created_at.desc(), model.id.desc())
    else:
        query = query.order_by(model.created_at.asc(), model.id.asc())
    query = query.limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
