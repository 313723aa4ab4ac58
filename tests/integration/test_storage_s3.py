"""The artifact store against a real S3-compatible server: moto's HTTP server in a subprocess.

The server is started once for the module on a free loopback port; the store talks to it over
HTTP through s3fs exactly as it would to MinIO or AWS S3.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.storage import ArtifactStore, artifact_store
from tests.fixtures.service import free_port, stop
from tests.storage_helpers import make_tree, read, read_tree, write_then_fail

ACCESS_KEY = "tuneserve-test"
SECRET_KEY = "tuneserve-test-secret"  # moto accepts any credentials
REGION = "us-east-1"
BUCKET = "tuneserve-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MOTO_"))}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"moto server exited at start: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not answer in 60 s: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(process)


def options(endpoint: str) -> dict[str, Any]:
    return {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


@pytest.fixture
def store(s3_endpoint: str) -> ArtifactStore:
    # A fresh prefix per test: tests never see each other's objects.
    return ArtifactStore(
        f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}", storage_options=options(s3_endpoint)
    )


def test_store_is_remote(store: ArtifactStore) -> None:
    assert not store.is_local
    assert store.local_path("files/f") is None


def test_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 1000)
    store.put_file(source, "files/file-abc")
    assert store.exists("files/file-abc")
    assert store.size("files/file-abc") == source.stat().st_size
    store.get_file("files/file-abc", tmp_path / "out" / "copy.jsonl")
    assert (tmp_path / "out" / "copy.jsonl").read_bytes() == source.read_bytes()
    with store.open("files/file-abc") as handle:
        assert handle.read() == source.read_bytes()

    with store.open("files/meta.json", "wb") as handle:
        handle.write(b"{}")
    assert read(store, "files/meta.json") == b"{}"
    with pytest.raises(RuntimeError, match="half written"):
        write_then_fail(store, "files/meta.json")
    assert read(store, "files/meta.json") == b"{}"


def test_write_stream(store: ArtifactStore) -> None:
    # Larger than s3fs's 5 MiB block, so a real multipart upload happens.
    chunks = [os.urandom(1024 * 1024) for _ in range(7)]
    size, digest = store.write_stream("files/file-big", iter(chunks))
    data = b"".join(chunks)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.size("files/file-big") == len(data)
    with store.open("files/file-big") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == digest

    assert store.write_stream("files/empty", []) == (0, hashlib.sha256(b"").hexdigest())
    assert store.exists("files/empty") and store.size("files/empty") == 0

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.write_stream("files/file-broken", broken())
    assert not store.exists("files/file-broken")


def test_dir_round_trip_mirror_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter", weights_bytes=200_000)
    store.put_dir(tmp_path / "adapter", "adapters/adapter-xyz")
    assert store.exists("adapters/adapter-xyz")
    assert store.exists("adapters/adapter-xyz/checkpoint-2/nested/trainer_state.json")
    assert store.size("adapters/adapter-xyz") == sum(len(data) for data in files.values())
    store.get_dir("adapters/adapter-xyz", tmp_path / "got")
    assert read_tree(tmp_path / "got") == files

    (tmp_path / "adapter" / "checkpoint-2" / "optimizer.pt").unlink()
    store.put_dir(tmp_path / "adapter", "adapters/adapter-xyz")
    del files["checkpoint-2/optimizer.pt"]
    store.get_dir("adapters/adapter-xyz", tmp_path / "got")
    assert read_tree(tmp_path / "got") == files
    assert not store.exists("adapters/adapter-xyz/checkpoint-2/optimizer.pt")

    store.delete("adapters/adapter-xyz")
    store.delete("adapters/never-existed")
    assert not store.exists("adapters/adapter-xyz")
    with pytest.raises(FileNotFoundError):
        store.size("adapters/adapter-xyz")
    with pytest.raises(FileNotFoundError):
        store.get_dir("adapters/adapter-xyz", tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        store.get_file("files/missing", tmp_path / "gone-file")
    with pytest.raises(FileNotFoundError):
        read(store, "files/missing")
    assert not (tmp_path / "gone").exists() and not (tmp_path / "gone-file").exists()


def test_other_processes_see_writes(store: ArtifactStore, s3_endpoint: str) -> None:
    # A second store on the same root (another replica) sees new objects at once: listings
    # are not cached.
    other = ArtifactStore(store.root_url, storage_options=options(s3_endpoint))
    assert not other.exists("adapters/a")
    store.write_stream("adapters/a/adapter_config.json", [b"{}"])
    assert other.exists("adapters/a")
    assert other.size("adapters") == 2  # lists the prefix
    assert other.exists("adapters/a/adapter_config.json")
    store.write_stream("adapters/a/adapter_model.safetensors", [b"1234"])
    store.write_stream("adapters/b/adapter_config.json", [b"{}"])
    assert other.size("adapters") == 8
    assert other.size("adapters/a") == 6
    assert other.exists("adapters/b")
    store.delete("adapters/a")
    assert not other.exists("adapters/a/adapter_config.json")
    assert other.size("adapters") == 2


def test_cached_dir_downloads_once(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_tree(tmp_path / "adapter", weights_bytes=200_000)
    store.put_dir(tmp_path / "adapter", "adapters/adapter-c")
    cache = tmp_path / "cache"

    fs = store._fs
    downloads: list[Any] = []
    real_get = fs.get

    def counting_get(*args: Any, **kwargs: Any) -> Any:
        downloads.append(args[0])
        return real_get(*args, **kwargs)

    monkeypatch.setattr(fs, "get", counting_get)

    first = store.cached_dir("adapters/adapter-c", cache)
    assert first == cache / "adapters" / "adapter-c"
    assert read_tree(first) == files
    assert len(downloads) == 1
    inode = first.stat().st_ino

    # Even with the bucket copy gone, the second call is served from the cache.
    store.delete("adapters/adapter-c")
    second = store.cached_dir("adapters/adapter-c", cache)
    assert second == first and second.stat().st_ino == inode
    assert read_tree(second) == files
    assert len(downloads) == 1
    assert [path.name for path in cache.rglob("*") if "~" in path.name] == []

    with pytest.raises(FileNotFoundError):
        store.cached_dir("adapters/never", cache)
    assert not (cache / "adapters" / "never").exists()


def test_cached_dir_concurrent_downloads_one_wins(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter", weights_bytes=200_000)
    store.put_dir(tmp_path / "adapter", "adapters/adapter-r")
    cache = tmp_path / "cache"
    # A second process that finished first: its complete copy is already in place when this
    # one renames; this one keeps the winner's and throws its own away.
    winner = cache / "adapters" / "adapter-r"
    real_download = store._download_tree

    def racing_download(key: str, dest: Path) -> None:
        real_download(key, dest)
        if not winner.exists():
            real_download(key, winner)
            (winner / "winner-marker").write_bytes(b"")

    store._download_tree = racing_download  # type: ignore[method-assign]
    result = store.cached_dir("adapters/adapter-r", cache)
    assert result == winner
    assert read_tree(result) == {**files, "winner-marker": b""}
    assert [path.name for path in cache.rglob("*") if "~" in path.name] == []


def test_artifact_store_from_settings(s3_endpoint: str, tmp_path: Path) -> None:
    fields: dict[str, Any] = {
        "artifacts_url": f"s3://{BUCKET}/from-settings",
        "s3_endpoint_url": s3_endpoint,
        "s3_access_key_id": ACCESS_KEY,
        "s3_secret_access_key": SECRET_KEY,
        "s3_region": REGION,
    }
    from app.settings import Settings

    settings: Any
    if all(name in Settings.model_fields for name in fields):
        settings = Settings(data_dir=tmp_path, **fields)
    else:  # before app/settings.py has the S3 fields
        settings = SimpleNamespace(
            data_dir=tmp_path, artifacts_dir=tmp_path / "artifacts", **fields
        )
    store = artifact_store(settings)
    assert artifact_store(settings) is store
    assert not store.is_local
    assert store.write_stream("files/file-s", [b"hello"]) == (
        5,
        hashlib.sha256(b"hello").hexdigest(),
    )
    reader = ArtifactStore(f"s3://{BUCKET}/from-settings", storage_options=options(s3_endpoint))
    assert read(reader, "files/file-s") == b"hello"
    reader.delete("files/file-s")
    assert not store.exists("files/file-s")


def test_store_survives_fork(store: ArtifactStore) -> None:
    # Celery's prefork workers inherit the store from the parent; s3fs is not fork-safe, so
    # each process must build its own filesystem.
    store.write_stream("files/before-fork", [b"x"])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = store.exists("files/before-fork")
            store.write_stream("files/from-child", [b"child"])
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert read(store, "files/from-child") == b"child"
