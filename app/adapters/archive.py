"""An adapter as a .tar.gz, streamed as it is built: nothing is staged in memory or on disk.

The archive holds one folder named after the adapter id with adapter_config.json,
adapter_model.safetensors and, when the adapter has them, README.md (its model card) and
tuneserve_manifest.json (how it was trained): after extraction,
`PeftModel.from_pretrained(base_model, "<adapter id>")` loads it. The tar records are written
by hand (TarInfo.tobuf for each header) and compressed with zlib in gzip framing, so each chunk
of a file goes out as soon as it is read from the artifact store (a local disk or S3). The same
adapter always gives the same bytes (fixed times and owners, no gzip timestamp).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from app.adapters.unpacking import CONFIG, MANIFEST, README, WEIGHTS
from app.storage import ArtifactStore

_CHUNK = 1024 * 1024
# Float weights barely compress at any level; the fastest keeps the api's CPU free.
_LEVEL = 1


@dataclass(frozen=True)
class Entry:
    name: str
    key: str
    size: int


def adapter_entries(store: ArtifactStore, key: str) -> list[Entry]:
    """The files to send; FileNotFoundError when a required one is missing (checked before
    the answer starts, so it can still be an error answer)."""
    entries = [
        Entry(name, f"{key}/{name}", store.size(f"{key}/{name}")) for name in (CONFIG, WEIGHTS)
    ]
    for optional in (README, MANIFEST):
        if store.exists(f"{key}/{optional}"):
            entries.append(Entry(optional, f"{key}/{optional}", store.size(f"{key}/{optional}")))
    return entries


def _header(name: str, *, size: int, mtime: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.mtime = mtime
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_gz(
    store: ArtifactStore, entries: list[Entry], *, folder: str, mtime: int
) -> Iterator[bytes]:
    """The .tar.gz of entries under folder/, in compressed chunks."""
    gzip = zlib.compressobj(_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing

    def pack(data: bytes) -> Iterator[bytes]:
        out = gzip.compress(data)
        if out:
            yield out

    yield from pack(_header(folder, size=0, mtime=mtime, directory=True))
    for entry in entries:
        yield from pack(_header(f"{folder}/{entry.name}", size=entry.size, mtime=mtime))
        sent = 0
        with store.open(entry.key) as source:
            while chunk := source.read(_CHUNK):
                sent += len(chunk)
                if sent > entry.size:
                    raise RuntimeError(f"{entry.key} grew while it was being sent")
                yield from pack(chunk)
        if sent != entry.size:
            raise RuntimeError(f"{entry.key} shrank while it was being sent")
        yield from pack(bytes(-entry.size % tarfile.BLOCKSIZE))
    yield from pack(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    yield gzip.flush()
