"""A small HTTP client of the tuneserve api for the CLI; errors become readable messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    pass


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"Cannot reach the tuneserve api at {self.base_url} ({exc}). Start it with "
                "`tuneserve up`, or point TUNESERVE_API_URL / --url at it."
            ) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = f"{error['message']} [{error['code']}, HTTP {response.status_code}]"
                if response.status_code == 401:
                    message += (
                        " The CLI sends TUNESERVE_API_KEY, or else the key `tuneserve up` saved "
                        "in the data dir."
                    )
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:500]}"
            raise ApiError(message)
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as handle:
            result: dict[str, Any] = self.request(
                "POST", "/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}
            )
        return result
