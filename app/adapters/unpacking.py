"""Read an adapter archive (.zip, .tar.gz or .tar) safely into a directory.

Only adapter_config.json, adapter_model.safetensors and README.md are written out, under those
fixed names, whether they lie at the archive's root or in its one top-level folder. Everything
else is checked and left behind: harmless text (tokenizer files, model cards) is dropped; a
pickle format (.bin, .pt, .pth, .pkl, .ckpt…) refuses the archive, since pickles are never
loaded; any other file refuses it too, so nothing unexpected passes silently.

Refused before a byte is extracted: absolute paths, `..`, links, devices and other special
members, the same path twice, more than MAX_MEMBERS members, and declared sizes adding up to
more than the byte limit (a zip or tar bomb). Reading cannot outgrow what was declared: zipfile
stops at a member's declared size (and checks its CRC), a tar member's data is its declared size,
and a tar header that asks for a huge read (a pax or long-name bomb) is refused (_CappedReader).
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from app.errors import InvalidRequest

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
README = "README.md"
MANIFEST = "tuneserve_manifest.json"  # written by the worker (worker/model_card.py)
KEPT = (CONFIG, WEIGHTS, README)
REQUIRED = (CONFIG, WEIGHTS)
MAX_MEMBERS = 1000
MAX_TEXT_BYTES = 1024 * 1024  # adapter_config.json and README.md
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
DROPPED_SUFFIXES = frozenset({".md", ".txt", ".json", ".jinja", ".yaml", ".yml", ".model"})
ACCEPTED = (
    "a .zip or .tar.gz holding adapter_config.json and adapter_model.safetensors (at its root "
    "or in one top-level folder)"
)
_CHUNK = 256 * 1024
_MAX_HEADER_READ = 1024 * 1024 + 512  # no tar header needs more; data is read in _CHUNKs
_MAX_ZIP_DIRECTORY = 16 * 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


def refusal(code: str, message: str, **detail: Any) -> InvalidRequest:
    return InvalidRequest(message, code=code, detail=detail or None)


def _invalid(reason: str) -> InvalidRequest:
    return refusal("adapter_archive_invalid", f"{reason}. Send {ACCEPTED}.")


def _unsafe(name: str, reason: str) -> InvalidRequest:
    return refusal(
        "adapter_archive_unsafe",
        f"The archive member {name!r} {reason}; such archives are refused.",
        file=name,
    )


def _too_large(message: str, **detail: Any) -> InvalidRequest:
    return refusal("adapter_archive_too_large", message, **detail)


@dataclass
class Unpacked:
    """What was written to the directory, and what was left behind."""

    directory: Path
    sha256: str = ""  # of adapter_model.safetensors
    size_bytes: int = 0  # of the files written
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    raw_name: str
    parts: tuple[str, ...]
    size: int
    handle: Any  # ZipInfo or TarInfo


def _parts(name: str) -> tuple[str, ...]:
    """The member's path segments; refused if it could point outside the archive."""
    if "\x00" in name or "\\" in name:
        raise _unsafe(name, "has a backslash or NUL in its path")
    if name.startswith("/") or _DRIVE.match(name):
        raise _unsafe(name, "has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _unsafe(name, "has '..' in its path")
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    """macOS resource forks (__MACOSX/, ._name): dropped, and never the top-level folder."""
    return parts[0] == "__MACOSX" or parts[-1].startswith("._")


class _Budget:
    """Member count and declared bytes, refused past their caps; a file path seen twice too."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.members = 0
        self.bytes = 0
        self.seen: set[tuple[str, ...]] = set()

    def count(self, name: str, parts: tuple[str, ...] | None, size: int) -> None:
        """One member; parts None for a directory (which may repeat harmlessly)."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise _too_large(f"The archive has more than {MAX_MEMBERS} members.")
        if parts is not None:
            if parts in self.seen:
                raise _unsafe(name, "appears twice")
            self.seen.add(parts)
        self.bytes += size
        if size < 0 or self.bytes > self.max_bytes:
            raise _too_large(
                f"The archive unpacks to more than {self.max_bytes} bytes (at {name!r}, declared "
                f"{size} bytes); the limit is TUNESERVE_MAX_DATASET_BYTES.",
                file=name,
                limit=self.max_bytes,
            )


# ---------------------------------------------------------------------------------------------
# zip
# ---------------------------------------------------------------------------------------------


def _zip_directory_facts(handle: IO[bytes]) -> tuple[int, int]:
    """(entries, central directory bytes) from the end records, before zipfile reads any of it."""
    handle.seek(0, io.SEEK_END)
    end = handle.tell()
    tail_start = max(0, end - (22 + 65535))
    handle.seek(tail_start)
    tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise _invalid("The zip archive has no end-of-directory record (truncated?)")
    entries, size = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries == 0xFFFF or size == 0xFFFFFFFF:  # zip64: the real values are in its own record
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator[:4] != b"PK\x06\x07":
            raise _invalid("The zip archive's zip64 records are missing")
        handle.seek(struct.unpack("<Q", locator[8:16])[0])
        record = handle.read(56)
        if record[:4] != b"PK\x06\x06" or len(record) < 56:
            raise _invalid("The zip archive's zip64 record is damaged")
        entries, size = struct.unpack("<QQ", record[32:48])
    return int(entries), int(size)


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        parts = _parts(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            what = "is a symbolic link" if kind == stat.S_IFLNK else "is not a regular file"
            raise _unsafe(info.filename, what)
        if info.flag_bits & 0x1:
            raise _invalid(f"The archive member {info.filename!r} is encrypted")
        if info.is_dir() or not parts:
            continue
        yield _Member(info.filename, parts, info.file_size, info)


def _zip_open(archive: zipfile.ZipFile, member: _Member) -> IO[bytes]:
    try:
        return archive.open(member.handle)
    except NotImplementedError as exc:  # a compression method Python lacks
        raise _invalid(f"The archive member {member.raw_name!r} cannot be read ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# tar
# ---------------------------------------------------------------------------------------------


class _CappedReader(io.RawIOBase):
    """A seekable stream whose single reads may not be huge (tarfile reads a pax or long-name
    header's whole declared size at once)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_HEADER_READ:
            raise _too_large(f"A tar header declares a {size}-byte extension; refused.")
        return self._inner.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


def _tar_member(info: tarfile.TarInfo) -> _Member | None:
    parts = _parts(info.name)
    if info.issym() or info.islnk():
        raise _unsafe(info.name, f"is a {'symbolic' if info.issym() else 'hard'} link")
    if info.isdir() or not parts:
        return None
    if not info.isreg() or info.issparse():
        raise _unsafe(info.name, "is not a regular file (a device, fifo or sparse file)")
    return _Member(info.name, parts, info.size, info)


# ---------------------------------------------------------------------------------------------
# Choosing what to keep
# ---------------------------------------------------------------------------------------------


def _disposition(parts: tuple[str, ...], root: tuple[str, ...]) -> str:
    """ "keep", "drop", or raise: what to do with one file of the archive."""
    name = "/".join(parts)
    if _is_junk(parts):
        return "drop"
    suffix = PurePosixPath(parts[-1]).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise refusal(
            "adapter_not_safetensors",
            f"The archive holds {name}, a pickle file: pickle files are never loaded. Send the "
            f"weights as {WEIGHTS} only (PEFT's save_pretrained writes it by default).",
            file=name,
        )
    if parts[: len(root)] == root and len(parts) == len(root) + 1 and parts[-1] in KEPT:
        return "keep"
    if suffix in DROPPED_SUFFIXES or parts[-1].startswith("."):
        return "drop"
    raise refusal(
        "adapter_unexpected_file",
        f"The archive holds {name}, which is not part of a PEFT LoRA adapter. Send {ACCEPTED}; "
        "text files (.md, .txt, .json…) are ignored.",
        file=name,
    )


def _root(members: list[_Member]) -> tuple[str, ...]:
    """() when files lie at the top, else the one folder every file is in."""
    files = [m.parts for m in members if not _is_junk(m.parts)]
    tops = {parts[0] for parts in files}
    if len(tops) == 1 and all(len(parts) > 1 for parts in files):
        return (tops.pop(),)
    return ()


def _write(source: IO[bytes], dest: Path, member: _Member, unpacked: Unpacked) -> None:
    if member.parts[-1] != WEIGHTS and member.size > MAX_TEXT_BYTES:
        raise _too_large(
            f"{member.raw_name} is {member.size} bytes; at most {MAX_TEXT_BYTES} are accepted.",
            file=member.raw_name,
        )
    digest = hashlib.sha256()
    written = 0
    with dest.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise _invalid(f"The archive member {member.raw_name!r} is longer than declared")
            digest.update(chunk)
            out.write(chunk)
    if written != member.size:
        raise _invalid(f"The archive member {member.raw_name!r} is truncated")
    unpacked.size_bytes += written
    if member.parts[-1] == WEIGHTS:
        unpacked.sha256 = digest.hexdigest()


def _check_required(kept: set[str], unpacked: Unpacked) -> None:
    missing = [name for name in REQUIRED if name not in kept]
    if missing:
        raise refusal(
            "adapter_files_missing",
            f"The archive has no {' and no '.join(missing)} (at its root or in one top-level "
            f"folder). Send {ACCEPTED}.",
            missing=missing,
            dropped=unpacked.dropped[:20],
        )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _kind(archive: Path) -> str:
    with archive.open("rb") as handle:
        head = handle.read(512)
    if not head:
        raise _invalid("The archive is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    raise _invalid("The file is not a .zip, .tar.gz or .tar archive")


def unpack_adapter(archive: Path, dest: Path, *, max_bytes: int) -> Unpacked:
    """Check the archive and write its adapter files into the existing empty directory dest."""
    kind = _kind(archive)
    try:
        if kind == "zip":
            return _unpack_zip(archive, dest, max_bytes)
        return _unpack_tar(archive, dest, max_bytes, gzipped=kind == "tar.gz")
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _invalid(f"The {kind} archive is damaged ({exc})") from exc


def _unpack_zip(archive: Path, dest: Path, max_bytes: int) -> Unpacked:
    with archive.open("rb") as handle:
        entries, directory = _zip_directory_facts(handle)
        if entries > MAX_MEMBERS:
            raise _too_large(f"The archive has {entries} members; at most {MAX_MEMBERS}.")
        if directory > _MAX_ZIP_DIRECTORY:
            raise _too_large(f"The archive's directory is {directory} bytes; refused.")
        handle.seek(0)
        with zipfile.ZipFile(handle) as opened:
            budget = _Budget(max_bytes)
            members = list(_zip_members(opened))
            for member in members:
                budget.count(member.raw_name, member.parts, member.size)
            unpacked, kept = _select(members, dest)
            for member in kept:
                with _zip_open(opened, member) as source:
                    _write(source, dest / member.parts[-1], member, unpacked)
    return unpacked


def _select(members: list[_Member], dest: Path) -> tuple[Unpacked, list[_Member]]:
    """The members to keep (refusing the archive if a file must not be in it)."""
    root = _root(members)
    unpacked = Unpacked(dest)
    kept = []
    for member in members:
        if _disposition(member.parts, root) == "keep":
            kept.append(member)
        else:
            unpacked.dropped.append(member.raw_name)
    _check_required({member.parts[-1] for member in kept}, unpacked)
    return unpacked, kept


def _unpack_tar(archive: Path, dest: Path, max_bytes: int, *, gzipped: bool) -> Unpacked:
    """One pass (a .tar.gz is read as a stream): every file that could be kept is written to
    dest/top/ (at the root) or dest/nested/ (one folder down); once every name has been seen,
    the right ones move to dest."""
    import gzip

    members: list[_Member] = []
    written: dict[tuple[str, str], Unpacked] = {}
    with archive.open("rb") as raw:
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw)
        capped = cast(IO[bytes], _CappedReader(stream))
        with stream, tarfile.open(fileobj=capped, mode="r:") as opened:
            budget = _Budget(max_bytes)
            for info in opened:
                member = _tar_member(info)
                budget.count(info.name, member.parts if member else None, info.size)
                if member is None:
                    continue
                members.append(member)
                slot = _candidate_slot(member.parts)
                if slot is None:
                    continue
                source = opened.extractfile(info)
                if source is None:
                    raise _unsafe(info.name, "has no data")
                (dest / slot).mkdir(exist_ok=True)
                copy = Unpacked(dest / slot)
                with source:
                    _write(source, copy.directory / member.parts[-1], member, copy)
                written[slot, member.parts[-1]] = copy
    unpacked, kept = _select(members, dest)
    for member in kept:
        slot = "top" if len(member.parts) == 1 else "nested"
        copy = written[slot, member.parts[-1]]
        (copy.directory / member.parts[-1]).rename(dest / member.parts[-1])
        unpacked.size_bytes += copy.size_bytes
        unpacked.sha256 = copy.sha256 or unpacked.sha256
    for slot in ("top", "nested"):
        shutil.rmtree(dest / slot, ignore_errors=True)
    return unpacked


def _candidate_slot(parts: tuple[str, ...]) -> str | None:
    if parts[-1] not in KEPT or _is_junk(parts) or len(parts) > 2:
        return None
    return "top" if len(parts) == 1 else "nested"
