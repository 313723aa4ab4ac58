"""Helpers shared by the artifact-store tests (local directory and S3)."""

from __future__ import annotations

import os
from pathlib import Path

from app.storage import ArtifactStore


def make_tree(root: Path, weights_bytes: int = 70_000) -> dict[str, bytes]:
    """An adapter-and-checkpoint-like directory tree; returns {relative path: content}."""
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(weights_bytes),
        "checkpoint-2/optimizer.pt": b"opt" * 1000,
        "checkpoint-2/nested/trainer_state.json": b"{}",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def write_then_fail(store: ArtifactStore, key: str) -> None:
    with store.open(key, "wb") as handle:
        handle.write(b"half")
        raise RuntimeError("half written")


def read(store: ArtifactStore, key: str) -> bytes:
    with store.open(key) as handle:
        return handle.read()


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
