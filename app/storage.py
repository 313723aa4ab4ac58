"""One storage interface for shared artifacts: uploaded datasets, adapters and checkpoints.

Every artifact lives under one root URL, read and written through fsspec: a local directory by
default (`file://DATA_DIR/artifacts`), or an S3-compatible bucket (`s3://bucket/prefix`) in
production, so api replicas and workers on other nodes see the same files.

Keys are relative POSIX paths (`files/file-abc`, `adapters/adapter-xyz/adapter_config.json`)
made of segments of `[A-Za-z0-9._-]`; anything else is a `ValueError`, so a name never becomes
a path without being checked. A "directory key" is simply a prefix that has files below it (S3
has no directories; empty directories are not stored anywhere).

Writes are atomic for readers: a local file appears by rename from a temp file beside it, an S3
object appears when its upload completes. Temp names contain `~`, which no key may, so they
never show up as artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from types import TracebackType

    from app.settings import Settings

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_COPY_CHUNK = 1024 * 1024


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative POSIX key, else raise `ValueError`."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid artifact key {key!r}: empty")
    if key.startswith("/"):
        raise ValueError(f"invalid artifact key {key!r}: absolute")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"invalid artifact key {key!r}: empty segment")
        if segment in (".", ".."):
            raise ValueError(f"invalid artifact key {key!r}: '.' or '..' segment")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(f"invalid artifact key {key!r}: only [A-Za-z0-9._-] in a segment")
    return key


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name next to `path`, on the same filesystem, never a valid key (it has `~`)."""
    return path.parent / f".{path.name}~{kind}-{uuid.uuid4().hex}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(temp: Path, target: Path) -> None:
    """Move the complete directory `temp` to `target`, replacing whatever is there."""
    try:
        os.rename(temp, target)
        return
    except OSError:
        if not target.exists():
            raise
    # A directory cannot atomically replace a non-empty one: move the old one aside first.
    old = _temp_sibling(target, "old")
    os.rename(target, old)
    os.rename(temp, target)
    shutil.rmtree(old, ignore_errors=True)


class _AtomicWriter(io.BufferedWriter):
    """A binary file written to a temp file; `close()` publishes it via `commit(temp)`.

    Leaving a `with` block by an exception (or `discard()`, or garbage collection without a
    close) throws the temp file away, so a half-written artifact is never published.
    """

    def __init__(self, temp: Path, commit: Callable[[Path], None]) -> None:
        super().__init__(io.FileIO(temp, "w"))
        self._temp = temp
        self._commit = commit
        self._finished = False

    def discard(self) -> None:
        if getattr(self, "_finished", True):
            return
        self._finished = True
        try:
            super().close()
        finally:
            self._temp.unlink(missing_ok=True)

    def close(self) -> None:
        if self._finished:
            super().close()
            return
        try:
            self.flush()
            os.fsync(self.fileno())
        except BaseException:
            self.discard()
            raise
        self._finished = True
        super().close()
        try:
            self._commit(self._temp)
        finally:
            self._temp.unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def __del__(self) -> None:
        self.discard()


class ArtifactStore:
    """Artifacts (uploaded datasets, adapters, checkpoints) under one root URL.

    The root is a local directory (default) or `s3://bucket/prefix`; `storage_options` go to
    fsspec (for S3: `key`, `secret`, `client_kwargs={"endpoint_url": ..., "region_name": ...}`).
    """

    def __init__(self, root_url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root_url = root_url
        options = dict(storage_options or {})
        protocol = fsspec.core.split_protocol(root_url)[0] or "file"
        if protocol not in ("file", "local"):
            # Several processes share the bucket: a cached listing in one of them would hide
            # what another wrote. Listings are always asked of the server.
            options.setdefault("use_listings_cache", False)
        self._options = options
        self._pid = -1
        self._fs_obj: Any = None
        fs, root = self._make_fs()
        self._local = isinstance(fs, LocalFileSystem)
        self._root = str(root).rstrip("/")
        if self._local:
            Path(self._root).mkdir(parents=True, exist_ok=True)

    # -- plumbing ----------------------------------------------------------------------------

    def _make_fs(self) -> tuple[Any, str]:
        fs, root = fsspec.core.url_to_fs(self.root_url, **self._options)
        self._fs_obj = fs
        self._pid = os.getpid()
        return fs, cast(str, root)

    @property
    def _fs(self) -> Any:
        # s3fs instances are not fork-safe (Celery's prefork workers): one per process.
        if self._pid != os.getpid():
            self._make_fs()
        return self._fs_obj

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    def _local_file(self, key: str) -> Path:
        return Path(self._root) / validate_key(key)

    def _dir_files(self, key: str) -> dict[str, int]:
        """Files below the directory key `key`: relative key -> size (temp files left out)."""
        base = self._path(key)
        if self._local:
            root = Path(base)
            if not root.is_dir():
                return {}
            found: dict[str, int] = {}
            for path in root.rglob("*"):
                rel = path.relative_to(root).as_posix()
                if _is_valid_key(rel) and path.is_file():
                    found[rel] = path.stat().st_size
            return dict(sorted(found.items()))
        try:
            listing = cast(dict[str, dict[str, Any]], self._fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        prefix = base + "/"
        remote: dict[str, int] = {}
        for name, info in listing.items():
            name = name.rstrip("/")
            if not name.startswith(prefix) or info.get("type") != "file":
                continue
            rel = name[len(prefix) :]
            if _is_valid_key(rel):
                remote[rel] = int(info.get("size") or 0)
        return dict(sorted(remote.items()))

    def _download_tree(self, key: str, dest: Path) -> None:
        """Copy every file below `key` into the new directory `dest` (not atomic by itself)."""
        files = self._dir_files(key)
        if not files:
            raise FileNotFoundError(f"artifact directory {key!r} not found")
        dest.mkdir(parents=True)
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if self._local:
            for rel in files:
                shutil.copyfile(self._local_file(key) / rel, dest / rel)
        else:
            remote = [f"{self._path(key)}/{rel}" for rel in files]
            self._fs.get(remote, [str(dest / rel) for rel in files])

    def _writer(self, key: str) -> _AtomicWriter:
        if self._local:
            target = self._local_file(key)
            target.parent.mkdir(parents=True, exist_ok=True)

            def publish_local(temp: Path) -> None:
                os.replace(temp, target)
                _fsync_dir(target.parent)

            return _AtomicWriter(_temp_sibling(target), publish_local)
        remote = self._path(key)

        def publish_remote(temp: Path) -> None:
            self._fs.put_file(str(temp), remote)

        fd, name = tempfile.mkstemp(prefix="tuneserve-upload-")
        os.close(fd)
        return _AtomicWriter(Path(name), publish_remote)

    # -- public API --------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self._local

    def local_path(self, key: str) -> Path | None:
        """The real path of `key` when the store is local, else None."""
        return self._local_file(key) if self._local else None

    def put_file(self, local: Path, key: str) -> None:
        """Store the file `local` as `key` (atomic: readers see the old file or the new one)."""
        with open(local, "rb") as source, self._writer(key) as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK)

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Make `key/` hold exactly the files below `local_dir` (a mirror: stale files go).

        Local: built in a temp directory and renamed into place (a replaced directory is absent
        for the instant between two renames). S3: each object appears whole; stale objects are
        deleted after the new ones are uploaded.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"not a directory: {local_dir}")
        rels = sorted(
            path.relative_to(local_dir).as_posix()
            for path in local_dir.rglob("*")
            if path.is_file()
        )
        for rel in rels:
            validate_key(f"{validate_key(key)}/{rel}")
        if self._local:
            target = self._local_file(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = _temp_sibling(target)
            try:
                temp.mkdir()
                for rel in rels:
                    (temp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(local_dir / rel, temp / rel)
                _replace_dir(temp, target)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
            return
        base = self._path(key)
        if rels:
            self._fs.put([str(local_dir / rel) for rel in rels], [f"{base}/{rel}" for rel in rels])
        wanted = set(rels)
        stale = [f"{base}/{rel}" for rel in self._dir_files(key) if rel not in wanted]
        if stale:
            self._fs.rm(stale)

    def get_file(self, key: str, local: Path) -> None:
        """Copy the file `key` to `local` (atomic: temp file beside it, then rename)."""
        local = Path(local)
        found = self._local_file(key).is_file() if self._local else self._fs.isfile(self._path(key))
        if not found:
            raise FileNotFoundError(f"artifact {key!r} not found")
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(local)
        try:
            if self._local:
                shutil.copyfile(self._local_file(key), temp)
            else:
                self._fs.get_file(self._path(key), str(temp))
            os.replace(temp, local)
        finally:
            temp.unlink(missing_ok=True)

    def get_dir(self, key: str, local_dir: Path) -> None:
        """Materialise `key/` as `local_dir`, replacing it (built in a temp dir, then renamed)."""
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(local_dir)
        try:
            self._download_tree(key, temp)
            _replace_dir(temp, local_dir)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        """Read (`rb`) or write (`wb`) `key` as a binary file.

        A `wb` file is published when it is closed, atomically; leaving its `with` block by an
        exception, or calling its `discard()`, publishes nothing.
        """
        if mode == "rb":
            if self._local:
                return open(self._local_file(key), "rb")
            return cast(IO[bytes], self._fs.open(self._path(key), "rb"))
        if mode == "wb":
            return self._writer(key)
        raise ValueError(f"unsupported mode {mode!r}: use 'rb' or 'wb'")

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Store the bytes of `chunks` as `key` atomically; return (size, sha256 hex)."""
        digest = hashlib.sha256()
        size = 0
        with self._writer(key) as sink:
            for chunk in chunks:
                sink.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def exists(self, key: str) -> bool:
        """Whether `key` is a file or a directory key with files below it."""
        if self._local:
            return self._local_file(key).exists()
        return bool(self._fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        """The size of the file `key`, or the total size of the files below directory key."""
        if self._local:
            path = self._local_file(key)
            if path.is_file():
                return path.stat().st_size
        elif self._fs.isfile(self._path(key)):
            return int(self._fs.size(self._path(key)))
        files = self._dir_files(key)
        if not files:
            raise FileNotFoundError(f"artifact {key!r} not found")
        return sum(files.values())

    def delete(self, key: str) -> None:
        """Delete the file or directory key `key` (recursively); a missing key is fine."""
        if self._local:
            path = self._local_file(key)
            if path.is_dir() and not path.is_symlink():
                # Renamed away first, so no reader sees a half-deleted directory.
                doomed = _temp_sibling(path, "del")
                try:
                    os.rename(path, doomed)
                except FileNotFoundError:
                    return
                shutil.rmtree(doomed, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self._path(key), recursive=True)

    def cached_dir(self, key: str, cache_root: Path) -> Path:
        """A local directory holding `key/`'s files.

        Local store: the real directory. Otherwise `cache_root/<key>`, downloaded on the first
        call and reused after (artifacts are written once under fresh ids, so a cached copy is
        not checked against the bucket again). Safe for concurrent processes: each downloads
        into its own temp directory and renames it into place; the first rename wins and the
        others throw their copy away, so a cached directory is always complete.
        """
        validate_key(key)
        if self._local:
            path = self._local_file(key)
            if not path.is_dir():
                raise FileNotFoundError(f"artifact directory {key!r} not found")
            return path
        target = Path(cache_root) / key
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(target)
        try:
            self._download_tree(key, temp)
            try:
                os.rename(temp, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another process got there first; its copy is complete.
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return target

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"


def _s3_storage_options(
    endpoint_url: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    region: str | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if access_key_id:
        options["key"] = access_key_id
    if secret_access_key:
        options["secret"] = secret_access_key
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


@lru_cache(maxsize=16)
def _store(
    root_url: str,
    endpoint_url: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    region: str | None,
) -> ArtifactStore:
    protocol = fsspec.core.split_protocol(root_url)[0]
    options = (
        _s3_storage_options(endpoint_url, access_key_id, secret_access_key, region)
        if protocol in ("s3", "s3a")
        else {}
    )
    return ArtifactStore(root_url, storage_options=options)


def _secret(value: Any) -> str | None:
    secret = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return None if secret is None else str(secret)


def artifact_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name (one instance per root and credentials)."""
    url = getattr(settings, "artifacts_url", None) or f"file://{settings.artifacts_dir}"
    return _store(
        str(url),
        getattr(settings, "s3_endpoint_url", None),
        getattr(settings, "s3_access_key_id", None),
        _secret(getattr(settings, "s3_secret_access_key", None)),
        getattr(settings, "s3_region", None),
    )
