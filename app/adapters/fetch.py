"""Download an adapter archive from a URL, through app.outbound's SSRF guard.

The limits are the dataset fetch's (app/datasets/fetch.py): unless
TUNESERVE_ALLOW_PRIVATE_NETWORKS, only public addresses (checked after DNS, the connection pinned
to the checked address, every redirect checked again); TUNESERVE_FETCH_TIMEOUT_SECONDS per
network step, TUNESERVE_FETCH_MAX_SECONDS for the whole download, and at most
TUNESERVE_MAX_DATASET_BYTES (decoded bytes). Only http(s) URLs: no file://, no uploaded ids.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from app import outbound
from app.adapters.unpacking import refusal
from app.errors import InvalidRequest
from app.settings import Settings

MAX_REDIRECTS = outbound.MAX_REDIRECTS
_UPLOAD_INSTEAD = "or upload the archive with POST /adapters"


def _invalid(reason: str) -> InvalidRequest:
    return refusal(
        "adapter_url_invalid",
        f"{reason}. Give an http(s):// URL of a .zip or .tar.gz, {_UPLOAD_INSTEAD}.",
        field="url",
    )


def _failed(shown: str, reason: str) -> InvalidRequest:
    return refusal(
        "adapter_fetch_failed",
        f"Downloading {shown} failed: {reason}. Check that the URL is reachable from the "
        f"tuneserve server, {_UPLOAD_INSTEAD}.",
        field="url",
    )


def _check_syntax(url: str) -> None:
    if url != url.strip() or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise _invalid("The URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # a malformed port raises ValueError
    except ValueError as exc:
        raise _invalid(f"The URL is not valid ({exc})") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _invalid("Only http:// and https:// URLs with a host name are fetched")


def fetch_archive(url: str, dest: Path, settings: Settings) -> int:
    """Download url to dest (a new file); return its size."""
    _check_syntax(url)
    shown = outbound.redact(url, fallback="the adapter URL")
    started = time.monotonic()
    try:
        with outbound.open_guarded(
            url,
            allow_private=settings.allow_private_networks,
            timeout=settings.fetch_timeout_seconds,
            max_seconds=settings.fetch_max_seconds,
            max_redirects=MAX_REDIRECTS,
        ) as guarded:
            shown = outbound.redact(guarded.url, fallback=shown)
            _check_response(guarded.response, shown, settings.max_dataset_bytes)
            size = 0
            with dest.open("xb") as out:
                for chunk in guarded.iter_bytes():
                    size += len(chunk)
                    if size > settings.max_dataset_bytes:
                        raise _too_large(shown, settings.max_dataset_bytes)
                    out.write(chunk)
            return size
    except outbound.Forbidden as exc:
        if exc.reason is None:
            raise _invalid(str(exc)) from exc
        raise refusal(
            "adapter_url_forbidden",
            f"{exc}; adapter URLs must point at public hosts. Upload the archive with POST "
            "/adapters, or ask the operator to set TUNESERVE_ALLOW_PRIVATE_NETWORKS=true.",
            field="url",
        ) from exc
    except outbound.DeadlineExceeded as exc:
        raise _failed(shown, f"it took longer than {settings.fetch_max_seconds:g} s") from exc
    except outbound.TooManyRedirects as exc:
        raise _failed(shown, f"more than {MAX_REDIRECTS} redirects") from exc
    except outbound.OutboundError as exc:
        raise _failed(shown, str(exc)) from exc
    except httpx.TimeoutException as exc:
        if time.monotonic() - started >= settings.fetch_max_seconds:
            raise _failed(shown, f"it took longer than {settings.fetch_max_seconds:g} s") from exc
        raise _failed(shown, f"no response within {settings.fetch_timeout_seconds:g} s") from exc
    except httpx.InvalidURL as exc:
        raise _invalid(f"The URL is not valid ({exc})") from exc
    except httpx.HTTPError as exc:
        raise _failed(shown, str(exc) or type(exc).__name__) from exc


def _too_large(shown: str, max_bytes: int) -> InvalidRequest:
    return refusal(
        "adapter_archive_too_large",
        f"{shown} is larger than the {max_bytes}-byte limit (TUNESERVE_MAX_DATASET_BYTES).",
        field="url",
        limit=max_bytes,
    )


def _check_response(response: httpx.Response, shown: str, max_bytes: int) -> None:
    status = response.status_code
    if not 200 <= status < 300:
        raise _failed(shown, f"HTTP {status} {response.reason_phrase}")
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(shown, max_bytes)
