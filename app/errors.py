"""Domain errors with their HTTP status and a stable code, rendered in one body shape.

Every error leaves the api as `{"error": {"code", "message", "detail"}}`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class TuneserveError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers
        if code is not None:
            self.code = code


class Unauthorized(TuneserveError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(TuneserveError):
    status_code = 404
    code = "not_found"


class Conflict(TuneserveError):
    status_code = 409
    code = "conflict"


class InvalidRequest(TuneserveError):
    status_code = 400
    code = "invalid_request"


class PayloadTooLarge(TuneserveError):
    status_code = 413
    code = "payload_too_large"


class TooManyRequests(TuneserveError):
    status_code = 429
    code = "rate_limited"


class ErrorInfo(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of the api."""

    error: ErrorInfo


_ERROR_MEANINGS = {
    400: "Bad input; the message says what and where.",
    401: "No API key, or one that is unknown or revoked.",
    404: "No such resource for this key's owner.",
    409: "Conflicts with the resource's state.",
    413: "The request body or upload is too large.",
    422: "The request does not match the schema; detail lists each field.",
    429: "Over a limit (requests per minute, jobs in flight); see Retry-After.",
    503: "A dependency (database, broker, model) is unavailable; retry.",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": meaning}
    for status, meaning in _ERROR_MEANINGS.items()
}


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every 4xx and 5xx answer under /v1, as OpenAI's API shapes them."""

    error: OpenAIErrorInfo


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorBody, "description": meaning}
    for status, meaning in _ERROR_MEANINGS.items()
    if status != 422  # payload errors are 400s under /v1, as at OpenAI
}


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "hyperparameters", "n_epochs") -> "hyperparameters.n_epochs"
    parts = [str(part) for part in loc if part not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _methods_of(app: FastAPI, path: str) -> list[str]:
    """Every method some route accepts on this path (Starlette's Allow names one route's)."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def openai_error_body(
    status: int, code: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """The error shape of OpenAI's API, which its SDKs turn into their exception classes."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param(detail: Any) -> str | None:
    if isinstance(detail, dict) and isinstance(detail.get("field"), str):
        return str(detail["field"])
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        field = detail[0].get("field")
        return str(field) if field is not None else None
    return None


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The api's error shape, or OpenAI's under /v1 (where payload errors are 400s, as there)."""
    if request.url.path.startswith(OPENAI_PREFIX):
        status = 400 if status == 422 else status
        body = openai_error_body(status, code, message, _param(detail))
    else:
        body = error_body(code, message, jsonable_encoder(detail))
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _domain(request: Request, exc: TuneserveError) -> JSONResponse:
        return error_response(
            request, exc.status_code, exc.code, exc.message, exc.detail, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        broken_json = [err for err in exc.errors() if err["type"] == "json_invalid"]
        if broken_json:
            position = broken_json[0]["loc"][-1]
            reason = broken_json[0].get("ctx", {}).get("error", "")
            return error_response(
                request,
                400,
                "invalid_json",
                f"The request body is not valid JSON (at character {position}: {reason}). "
                "Send a JSON object with Content-Type: application/json.",
                {"position": position},
            )
        problems = [
            {"field": _location(tuple(err["loc"])), "message": err["msg"], "type": err["type"]}
            for err in exc.errors()
        ]
        unknown = [p for p in problems if p["type"] == "extra_forbidden"]
        if unknown and request.url.path.startswith(OPENAI_PREFIX):
            field = unknown[0]["field"]
            return error_response(
                request,
                400,
                "unsupported_parameter",
                f"{field}: tuneserve does not support this parameter; leave it out "
                "(docs/openai.md lists what /v1 supports).",
                unknown,
            )
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return error_response(
            request, 422, "validation_error", f"Invalid request: {summary}", problems
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            code, message = "not_found", f"No such endpoint: {where}. /docs lists them."
        elif exc.status_code == 405:
            allowed = ", ".join(_methods_of(request.app, request.url.path))
            code, message = "method_not_allowed", f"{where} is not allowed; use {allowed}."
        else:
            code, message = "http_error", f"{where}: {exc.detail}"
        return error_response(request, exc.status_code, code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            request,
            500,
            "internal_error",
            f"Internal error ({type(exc).__name__}); see server logs.",
        )
