"""The one error an export raises: the message names what cannot be exported and why."""

from __future__ import annotations

from app.errors import TuneserveError


class ExportError(TuneserveError):
    """An adapter or base model that cannot be exported as asked (unsupported, or not a match)."""

    status_code = 400
    code = "cannot_export"
