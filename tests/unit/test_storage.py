"""The artifact store on a local directory: round trips, hashes, key checks, atomic writes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.storage import ArtifactStore, artifact_store, validate_key
from tests.storage_helpers import make_tree, read, read_tree, write_then_fail


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path / 'artifacts'}")


def leftovers(root: Path) -> list[str]:
    return [path.name for path in root.rglob("*") if "~" in path.name]


def test_root_is_created_and_local(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "plain" / "path"))
    assert store.is_local
    assert (tmp_path / "plain" / "path").is_dir()
    assert store.local_path("files/file-a") == tmp_path / "plain" / "path" / "files" / "file-a"


def test_file_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 100)
    store.put_file(source, "files/file-abc")
    local = store.local_path("files/file-abc")
    assert local is not None and local.read_bytes() == source.read_bytes()
    assert store.exists("files/file-abc")
    assert store.size("files/file-abc") == source.stat().st_size

    out = tmp_path / "out" / "deep" / "copy.jsonl"
    store.get_file("files/file-abc", out)
    assert out.read_bytes() == source.read_bytes()
    with store.open("files/file-abc") as handle:
        assert handle.read() == source.read_bytes()

    # Overwriting replaces the content.
    source.write_bytes(b"new")
    store.put_file(source, "files/file-abc")
    assert store.size("files/file-abc") == 3
    assert leftovers(tmp_path) == []


def test_dir_round_trip_and_mirror(store: ArtifactStore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "adapter")
    store.put_dir(tmp_path / "adapter", "adapters/adapter-xyz")
    assert store.exists("adapters/adapter-xyz")
    assert store.exists("adapters/adapter-xyz/checkpoint-2/optimizer.pt")
    assert store.size("adapters/adapter-xyz") == sum(len(data) for data in files.values())

    store.get_dir("adapters/adapter-xyz", tmp_path / "got")
    assert read_tree(tmp_path / "got") == files

    # get_dir replaces what was there; put_dir mirrors (stale files go).
    (tmp_path / "got" / "stray").write_bytes(b"x")
    (tmp_path / "adapter" / "checkpoint-2" / "optimizer.pt").unlink()
    store.put_dir(tmp_path / "adapter", "adapters/adapter-xyz")
    store.get_dir("adapters/adapter-xyz", tmp_path / "got")
    del files["checkpoint-2/optimizer.pt"]
    assert read_tree(tmp_path / "got") == files
    assert leftovers(tmp_path) == []


def test_write_stream_hash_and_size(store: ArtifactStore) -> None:
    chunks = [b"a" * 1000, b"", b"bc" * 70_000]
    size, digest = store.write_stream("files/file-s", iter(chunks))
    data = b"".join(chunks)
    assert size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    with store.open("files/file-s") as handle:
        assert handle.read() == data

    assert store.write_stream("files/empty", []) == (0, hashlib.sha256(b"").hexdigest())
    assert store.size("files/empty") == 0


def test_write_stream_failure_publishes_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    def chunks() -> Any:
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.write_stream("files/file-broken", chunks())
    assert not store.exists("files/file-broken")
    assert leftovers(tmp_path) == []


def test_open_for_writing_is_atomic(store: ArtifactStore, tmp_path: Path) -> None:
    with store.open("meta/info.json", "wb") as handle:
        handle.write(b"{}")
        assert not store.exists("meta/info.json")
    assert read(store, "meta/info.json") == b"{}"

    with pytest.raises(RuntimeError, match="half written"):
        write_then_fail(store, "meta/info.json")
    assert read(store, "meta/info.json") == b"{}"
    with pytest.raises(ValueError, match="mode"):
        store.open("meta/info.json", "r")
    assert leftovers(tmp_path) == []


def test_exists_size_delete(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("files/nope")
    with pytest.raises(FileNotFoundError):
        store.size("files/nope")
    with pytest.raises(FileNotFoundError):
        store.get_file("files/nope", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        store.get_dir("adapters/nope", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(FileNotFoundError):
        store.open("files/nope")

    make_tree(tmp_path / "tree")
    store.put_dir(tmp_path / "tree", "adapters/a")
    store.write_stream("files/f", [b"abc"])
    store.delete("files/f")
    store.delete("adapters/a")
    store.delete("adapters/never-existed")
    assert not store.exists("files/f")
    assert not store.exists("adapters/a")
    with pytest.raises(FileNotFoundError):
        store.get_file("adapters", tmp_path / "z")  # a directory is not a file
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/files/abs",
        "files/../etc",
        "..",
        "files/./x",
        ".",
        "files//double",
        "files/",
        "files\\win",
        "files/sp ace",
        "files/ünï",
        "files/a~b",
        "files/semi;colon",
        "files/q?",
        "files/%2e%2e",
        "files/new\nline",
    ],
)
def test_bad_keys_are_rejected(store: ArtifactStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid artifact key"):
        validate_key(key)
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.exists(key)
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.write_stream(key, [b"x"])
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.delete(key)
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.local_path(key)


@pytest.mark.parametrize("key", ["files/file-abc", "a", "x/y/z.tar.gz", "A_b-C.9", "d/...x"])
def test_good_keys(key: str) -> None:
    assert validate_key(key) == key


def test_put_dir_rejects_bad_file_names_before_writing(
    store: ArtifactStore, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ok.txt").write_bytes(b"1")
    (tmp_path / "src" / "bad name.txt").write_bytes(b"2")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.put_dir(tmp_path / "src", "adapters/a")
    assert not store.exists("adapters/a")


def test_cached_dir_is_the_real_path_for_local(store: ArtifactStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    store.put_dir(tmp_path / "tree", "adapters/a")
    cached = store.cached_dir("adapters/a", tmp_path / "cache")
    assert cached == store.local_path("adapters/a")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError):
        store.cached_dir("adapters/missing", tmp_path / "cache")


def test_failing_put_file_leaves_no_partial_file(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file(tmp_path / "does-not-exist", "files/file-x")
    assert not store.exists("files/file-x")

    # An existing artifact survives a failed overwrite untouched.
    store.write_stream("files/file-x", [b"original"])
    with pytest.raises(FileNotFoundError):
        store.put_file(tmp_path / "does-not-exist", "files/file-x")
    with pytest.raises(IsADirectoryError):
        store.put_file(tmp_path, "files/file-x")
    assert read(store, "files/file-x") == b"original"
    assert leftovers(tmp_path) == []


def test_failing_copy_midway_publishes_nothing(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "big"
    source.write_bytes(b"z" * 3_000_000)
    calls = 0

    def broken_copy(src: Any, dst: Any, length: int = 0) -> None:
        nonlocal calls
        calls += 1
        dst.write(src.read(1000))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        store.put_file(source, "files/file-big")
    monkeypatch.undo()
    assert calls == 1
    assert not store.exists("files/file-big")
    assert leftovers(tmp_path) == []


def test_temp_files_are_never_listed(store: ArtifactStore, tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    store.put_dir(tmp_path / "tree", "adapters/a")
    local = store.local_path("adapters/a")
    assert local is not None
    (local / ".x~tmp-123").write_bytes(b"in progress")
    before = store.size("adapters/a")
    store.get_dir("adapters/a", tmp_path / "got")
    assert ".x~tmp-123" not in read_tree(tmp_path / "got")
    assert before == sum(len(data) for data in read_tree(tmp_path / "got").values())


def test_artifact_store_from_settings(tmp_path: Path) -> None:
    settings = SimpleNamespace(data_dir=tmp_path, artifacts_dir=tmp_path / "artifacts")
    store = artifact_store(settings)  # type: ignore[arg-type]
    assert store.is_local
    assert store.local_path("files/f") == tmp_path / "artifacts" / "files" / "f"
    assert artifact_store(settings) is store  # type: ignore[arg-type]

    other = SimpleNamespace(
        data_dir=tmp_path, artifacts_dir=tmp_path / "artifacts", artifacts_url=str(tmp_path / "o")
    )
    assert artifact_store(other).local_path("f") == tmp_path / "o" / "f"  # type: ignore[arg-type]


def test_real_settings_default_to_the_artifacts_dir(tmp_path: Path) -> None:
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path)
    assert artifact_store(settings).local_path("a/b") == settings.artifacts_dir / "a" / "b"
