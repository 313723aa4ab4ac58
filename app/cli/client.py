"""A small HTTP client of the tuneserve api for the CLI; errors become readable messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


class ApiError(Exception):
    pass


def error_message(response: httpx.Response) -> str:
    """`<message> [<code>, HTTP <status>]` from the api's error body (read already)."""
    try:
        error = response.json()["error"]
        message = f"{error['message']} [{error['code']}, HTTP {response.status_code}]"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
    if response.status_code == 401:
        message += (
            " The CLI sends TUNESERVE_API_KEY, or else the key `tuneserve up` saved in the data "
            "dir."
        )
    return message


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        return ApiError(
            f"Cannot reach the tuneserve api at {self.base_url} ({exc}). Start it with "
            "`tuneserve up`, or point TUNESERVE_API_URL / --url at it."
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON; an error answer raises ApiError with its message."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise ApiError(error_message(response))
        try:
            return response.json()
        except ValueError as exc:  # something else answers at that URL (a proxy's page…)
            raise ApiError(
                f"{self.base_url} answered HTTP {response.status_code} with no JSON: is it the "
                f"tuneserve api? {response.text[:200]}"
            ) from exc

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed answer (a download, server-sent events) whose status was checked; leaving
        the block closes the connection, which also ends a generation the api is streaming."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(error_message(response))
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
