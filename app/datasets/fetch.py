"""Bring a dataset URL's bytes to a local file.

Accepts http(s):// URLs and file:// paths under operator-approved directories. Uploaded file ids
("file-…") are resolved by the caller; only their syntax is checked here.

http(s) downloads go through app.outbound: unless private networks are allowed, only public
addresses are reached (checked after DNS, connection pinned to the checked address, every
redirect re-checked), within a byte cap, a per-step timeout and a deadline for the whole download.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, unquote, urlsplit

import httpx

from app import outbound
from app.errors import InvalidRequest

__all__ = ["FetchError", "FetchedDataset", "fetch_dataset", "validate_dataset_url"]

ACCEPTED_FORMS = (
    "an uploaded file id (file-…), an http(s):// URL, or a file:// path under an allowed directory"
)
MAX_REDIRECTS = outbound.MAX_REDIRECTS
_CHUNK_SIZE = 1024 * 1024
_UPLOAD_ID = re.compile(r"file-[A-Za-z0-9_-]+")
_ALLOWED_DIRS_SETTING = "TUNESERVE_ALLOWED_FILE_DIRS"
_PUBLIC_HOSTS_ADVICE = (
    "dataset URLs must point at public hosts. Upload the file with POST /files, or ask the "
    "operator to set TUNESERVE_ALLOW_PRIVATE_NETWORKS=true."
)


@dataclass(frozen=True)
class FetchedDataset:
    path: Path
    filename: str
    bytes: int
    sha256: str
    etag: str | None


class FetchError(InvalidRequest):
    """A dataset URL that could not be fetched; code is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message))


def _invalid(reason: str) -> FetchError:
    return FetchError("dataset_url_invalid", f"{reason}. Use {ACCEPTED_FORMS}.")


def _redact(url: str) -> str:
    """The URL without credentials or query string, which may hold signed tokens."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return "the dataset URL"
    if scheme in ("http", "https"):
        return outbound.redact(url, fallback="the dataset URL")
    return url


def _forbidden_host(exc: outbound.Forbidden) -> FetchError:
    advice = _PUBLIC_HOSTS_ADVICE if exc.reason is not None else "upload the file with POST /files."
    return FetchError("dataset_url_forbidden", f"{exc}; {advice}")


# ---------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------


def _classify(url: str) -> tuple[str, SplitResult | None]:
    """Return ("upload" | "http" | "file", parsed URL) or raise dataset_url_invalid."""
    if not url or not url.strip():
        raise _invalid("The dataset URL is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in url) or url != url.strip():
        raise _invalid("The dataset URL contains whitespace or control characters")
    if url.startswith("file-"):
        if not _UPLOAD_ID.fullmatch(url):
            raise _invalid(f"{url!r} is not a valid uploaded file id")
        return "upload", None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise _invalid(f"{url!r} is not a valid URL ({exc})") from exc
    del port
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise _invalid(f"{url!r} has no host name")
        return "http", parts
    if scheme == "file":
        _check_file_url(url, parts)
        return "file", parts
    if not scheme:
        raise _invalid(f"{url!r} is not a URL (relative paths are not accepted)")
    raise _invalid(f"URL scheme {scheme + '://'!r} is not supported")


def _check_file_url(url: str, parts: SplitResult) -> None:
    # "file://data/x" parses "data" as a host, a common slip for "file:///data/x".
    if parts.netloc not in ("", "localhost"):
        raise _invalid(
            f"{url!r} names host {parts.netloc!r}; a file:// URL needs an absolute path on the "
            "server with three slashes, e.g. file:///data/train.jsonl"
        )
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise _invalid(f"{url!r} does not name an absolute path, e.g. file:///data/train.jsonl")


def validate_dataset_url(
    url: str,
    *,
    allowed_file_dirs: Sequence[Path] | None = None,
    allow_private_networks: bool = False,
) -> None:
    """Cheap check, so the API can reject a bad URL before queueing anything: the syntax; for
    file:// (when allowed_file_dirs is given) that the path lies under an allowed directory; for
    http(s), unless allow_private_networks, that the host is not "localhost" or a non-public IP
    literal. No DNS lookup: fetch_dataset checks what a host name resolves to."""
    kind, parts = _classify(url)
    if kind == "file" and parts is not None and allowed_file_dirs is not None:
        _under_allowed(Path(unquote(parts.path)), allowed_file_dirs)
    if kind == "http" and not allow_private_networks:
        try:
            outbound.check_url_literal(url)
        except outbound.Forbidden as exc:
            raise _forbidden_host(exc) from exc


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _HashingSink:
    """Writes chunks to a file while hashing them, refusing to grow past max_bytes."""

    def __init__(self, fh: BinaryIO, max_bytes: int, source: str) -> None:
        self._fh = fh
        self._max_bytes = max_bytes
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise _too_large(self._source, self._max_bytes, None)
        self.digest.update(chunk)
        self._fh.write(chunk)


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temp file next to dest that replaces dest only if the block succeeds."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            # Survive a crash right after the rename with the data, not an empty file.
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _too_large(source: str, max_bytes: int, size: int | None) -> FetchError:
    actual = f" ({size} bytes)" if size is not None else ""
    return FetchError(
        "dataset_too_large",
        f"{source}{actual} is larger than the {max_bytes}-byte limit. Use a smaller dataset "
        "(or a gzip-compressed one), or ask the operator to raise the limit.",
    )


# ---------------------------------------------------------------------------------------------
# http(s)://
# ---------------------------------------------------------------------------------------------


def _filename_from_url(url: httpx.URL) -> str:
    segment = unquote(url.path.rsplit("/", 1)[-1])
    # An encoded "/" or "\" must not smuggle a directory into the name.
    name = re.split(r"[/\\]", segment)[-1].strip()
    return name if name not in ("", ".", "..") else "dataset"


def _check_response(response: httpx.Response, shown: str, max_bytes: int) -> None:
    status = response.status_code
    if status in (404, 410):
        raise FetchError(
            "dataset_not_found",
            f"{shown} returned HTTP {status} {response.reason_phrase}. Check the URL, or upload "
            "the file with POST /files.",
        )
    if not 200 <= status < 300:
        hint = (
            " The server needs credentials; use a URL that works without logging in (e.g. a "
            "signed link) or upload the file with POST /files."
            if status in (401, 403)
            else " Try again later, or upload the file with POST /files."
        )
        raise FetchError(
            "dataset_fetch_failed",
            f"Downloading {shown} failed: HTTP {status} {response.reason_phrase}.{hint}",
        )
    length = response.headers.get("content-length")
    # Refuse before downloading anything; the streaming check still guards lying servers.
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(shown, max_bytes, int(length))


@dataclass(frozen=True)
class _HttpLimits:
    max_bytes: int
    timeout_seconds: float
    max_seconds: float
    allow_private_networks: bool


def _fetch_http(url: str, dest: Path, limits: _HttpLimits) -> FetchedDataset:
    shown = _redact(url)
    started = time.monotonic()
    try:
        with outbound.open_guarded(
            url,
            allow_private=limits.allow_private_networks,
            timeout=limits.timeout_seconds,
            max_seconds=limits.max_seconds,
            max_redirects=MAX_REDIRECTS,
        ) as guarded:
            final = _redact(str(guarded.url))
            _check_response(guarded.response, final, limits.max_bytes)
            with _atomic_file(dest) as fh:
                # The cap counts decoded bytes: a small gzip Content-Encoding cannot bypass it.
                sink = _HashingSink(fh, limits.max_bytes, final)
                for chunk in guarded.iter_bytes():
                    sink.write(chunk)
            return FetchedDataset(
                path=dest,
                filename=_filename_from_url(guarded.url),
                bytes=sink.size,
                sha256=sink.digest.hexdigest(),
                etag=guarded.response.headers.get("etag"),
            )
    except outbound.OutboundError as exc:
        raise _from_outbound(shown, exc, limits.max_seconds) from exc
    except httpx.TimeoutException as exc:
        # Near the deadline a step's timeout is cut short; say which limit was hit.
        if time.monotonic() - started >= limits.max_seconds:
            raise _deadline_exceeded(shown, limits.max_seconds) from exc
        reason = f"no response within {limits.timeout_seconds:g} seconds"
        raise _fetch_failed(shown, reason) from exc
    except httpx.HTTPError as exc:
        raise _fetch_failed(shown, str(exc) or type(exc).__name__) from exc
    except httpx.InvalidURL as exc:
        raise _invalid(f"{shown!r} is not a valid URL ({exc})") from exc


def _from_outbound(shown: str, exc: outbound.OutboundError, max_seconds: float) -> FetchError:
    if isinstance(exc, outbound.Forbidden):
        return _forbidden_host(exc)
    if isinstance(exc, outbound.DeadlineExceeded):
        return _deadline_exceeded(shown, max_seconds)
    if isinstance(exc, outbound.TooManyRedirects):
        return _fetch_failed(shown, f"more than {MAX_REDIRECTS} redirects")
    return _fetch_failed(shown, str(exc))  # Unresolvable, UnsupportedEncoding


def _deadline_exceeded(shown: str, max_seconds: float) -> FetchError:
    return FetchError(
        "dataset_fetch_failed",
        f"Downloading {shown} failed: it took longer than {max_seconds:g} s. Host the file "
        "somewhere faster, upload it with POST /files, or ask the operator to raise "
        "TUNESERVE_FETCH_MAX_SECONDS.",
    )


def _fetch_failed(shown: str, reason: str) -> FetchError:
    return FetchError(
        "dataset_fetch_failed",
        f"Downloading {shown} failed: {reason}. Check that the URL is reachable from the tuneserve "
        "server, or upload the file with POST /files.",
    )


# ---------------------------------------------------------------------------------------------
# file://
# ---------------------------------------------------------------------------------------------


def _forbidden(path: str, allowed: Sequence[Path]) -> FetchError:
    todo = (
        f"Upload the file with POST /files or ask the operator to add its directory to "
        f"{_ALLOWED_DIRS_SETTING}"
    )
    if not allowed:
        return FetchError(
            "dataset_url_forbidden",
            f"file:// URLs are disabled on this server (no allowed directories). {todo}.",
        )
    listed = ", ".join(str(d) for d in allowed)
    return FetchError(
        "dataset_url_forbidden",
        f"{path} is not under an allowed directory; allowed: {listed}. {todo}.",
    )


def _under_allowed(path: Path, allowed_file_dirs: Sequence[Path]) -> None:
    allowed = [d.resolve() for d in allowed_file_dirs]
    try:
        # Non-strict first so a missing file outside the allowed dirs is "forbidden", not "not
        # found": the answer must not reveal what exists elsewhere on the server.
        candidate = path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        raise _forbidden(str(path), allowed) from exc
    if not any(candidate.is_relative_to(d) for d in allowed):
        raise _forbidden(str(path), allowed)


def _resolve_allowed(path: Path, allowed_file_dirs: Sequence[Path]) -> Path:
    """Resolve symlinks and refuse anything outside the allowed directories."""
    _under_allowed(path, allowed_file_dirs)
    try:
        return path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise FetchError(
            "dataset_not_found",
            f"{path} does not exist on the server. Check the path, or upload the file with "
            "POST /files.",
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise FetchError("dataset_fetch_failed", f"Cannot access {path}: {exc}.") from exc


def _fetch_file(
    parts: SplitResult, dest: Path, allowed_file_dirs: Sequence[Path], max_bytes: int
) -> FetchedDataset:
    path = Path(unquote(parts.path))
    resolved = _resolve_allowed(path, allowed_file_dirs)
    info = resolved.stat()
    if stat.S_ISDIR(info.st_mode):
        raise _invalid(f"{path} is a directory; point at a single dataset file")
    if not stat.S_ISREG(info.st_mode):
        raise _invalid(f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise _too_large(str(path), max_bytes, info.st_size)
    try:
        with resolved.open("rb") as src, _atomic_file(dest) as fh:
            # The size check above can race with a growing file; the sink enforces it again.
            sink = _HashingSink(fh, max_bytes, str(path))
            while chunk := src.read(_CHUNK_SIZE):
                sink.write(chunk)
    except OSError as exc:
        raise FetchError(
            "dataset_fetch_failed",
            f"Cannot read {path}: {exc.strerror or exc}. Check its permissions, or upload the "
            "file with POST /files.",
        ) from exc
    # Name it as the user did: the resolved target may be a content-addressed blob (HF cache).
    return FetchedDataset(
        path=dest,
        filename=path.name or "dataset",
        bytes=sink.size,
        sha256=sink.digest.hexdigest(),
        etag=None,
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def fetch_dataset(
    url: str,
    dest: Path,
    *,
    allowed_file_dirs: Sequence[Path],
    max_bytes: int,
    timeout_seconds: float,
    max_seconds: float,
    allow_private_networks: bool,
) -> FetchedDataset:
    """Download or copy the dataset at url to dest (atomically), hashing it on the way.

    timeout_seconds bounds each network operation (connect, each read); max_seconds the whole
    download. Unless allow_private_networks, an http(s) URL (and every redirect) must resolve to
    public addresses only, or FetchError "dataset_url_forbidden" is raised.
    """
    kind, parts = _classify(url)
    if kind == "http":
        limits = _HttpLimits(max_bytes, timeout_seconds, max_seconds, allow_private_networks)
        return _fetch_http(url, dest, limits)
    if kind == "file" and parts is not None:
        return _fetch_file(parts, dest, allowed_file_dirs, max_bytes)
    raise _invalid(f"{url!r} is an uploaded file id; resolve it to its stored file instead")
