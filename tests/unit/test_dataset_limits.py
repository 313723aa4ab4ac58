"""parse_dataset's caps: the decompressed size of a gzip file (zip bombs) and the row count."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from app.datasets.formats import DatasetError, DatasetFormat, parse_dataset

MB = 1024 * 1024
ROW = {"text": "hello"}


def jsonl(count: int) -> bytes:
    return b"".join(json.dumps(ROW).encode() + b"\n" for _ in range(count))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def dataset_error(path: Path, **limits: int) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_dataset(path, **limits)  # type: ignore[arg-type]
    return info.value


def test_gzip_bomb_stops_at_the_decompressed_limit(tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (10 * MB))
    assert len(bomb) < 20_000
    error = dataset_error(write(tmp_path, "t.jsonl.gz", bomb), max_bytes=MB)
    assert error.code == "dataset_too_large"
    assert error.message == (
        f"The file decompresses to more than {MB} bytes, the limit for a dataset once "
        "decompressed. Split it into smaller datasets, or ask the operator to raise "
        "TUNESERVE_MAX_DATASET_BYTES."
    )


def test_gzip_exactly_at_the_limit_is_fine(tmp_path: Path) -> None:
    data = jsonl(100)
    path = write(tmp_path, "t.jsonl.gz", gzip.compress(data))
    assert parse_dataset(path, max_bytes=len(data)).rows == 100
    assert dataset_error(path, max_bytes=len(data) - 1).code == "dataset_too_large"


def test_multi_member_gzip_still_reads_every_member(tmp_path: Path) -> None:
    data = gzip.compress(jsonl(3)) + gzip.compress(jsonl(4))
    parsed = parse_dataset(write(tmp_path, "t.jsonl.gz", data), max_bytes=MB, max_rows=10)
    assert (parsed.format, parsed.rows, parsed.lines) == (DatasetFormat.TEXT, 7, list(range(1, 8)))


@pytest.mark.parametrize(
    "data",
    [gzip.compress(jsonl(50))[:-12], b"\x1f\x8b\x08\x00garbage that is not deflate"],
    ids=["truncated", "corrupt"],
)
def test_broken_gzip_is_still_unreadable(tmp_path: Path, data: bytes) -> None:
    error = dataset_error(write(tmp_path, "t.jsonl.gz", data), max_bytes=MB)
    assert error.code == "dataset_unreadable"


def test_uncompressed_file_over_the_byte_limit(tmp_path: Path) -> None:
    data = jsonl(100)
    error = dataset_error(write(tmp_path, "t.jsonl", data), max_bytes=len(data) - 1)
    assert error.code == "dataset_too_large"
    assert f"({len(data)} bytes) is larger than the {len(data) - 1}-byte limit" in error.message


def csv_rows(count: int) -> bytes:
    return b"text\n" + b"hello\n" * count


def json_rows(count: int) -> bytes:
    return json.dumps([ROW] * count).encode()


@pytest.mark.parametrize(
    ("name", "make"),
    [("t.jsonl", jsonl), ("t.csv", csv_rows), ("t.json", json_rows)],
)
def test_too_many_rows(tmp_path: Path, name: str, make: object) -> None:
    assert callable(make)
    assert parse_dataset(write(tmp_path, name, make(10)), max_rows=10).rows == 10
    error = dataset_error(write(tmp_path, name, make(11)), max_rows=10)
    assert error.code == "dataset_too_large"
    assert error.message == (
        "The dataset has more than 10 rows; split it into smaller datasets or ask the operator "
        "to raise TUNESERVE_MAX_DATASET_ROWS."
    )


def test_blank_lines_do_not_count_as_rows(tmp_path: Path) -> None:
    data = b"\n\n".join(json.dumps(ROW).encode() for _ in range(5)) + b"\n\n\n"
    assert parse_dataset(write(tmp_path, "t.jsonl", data), max_rows=5).rows == 5


def test_too_many_rows_in_a_gzip_file(tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl.gz", gzip.compress(jsonl(1000)))
    assert dataset_error(path, max_bytes=MB, max_rows=999).code == "dataset_too_large"


def test_too_many_rows_in_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([ROW] * 6), path)
    assert parse_dataset(path, max_rows=6).rows == 6
    assert dataset_error(path, max_rows=5).code == "dataset_too_large"


def test_no_caps_by_default(tmp_path: Path) -> None:
    data = gzip.compress(jsonl(20_000))
    assert parse_dataset(write(tmp_path, "t.jsonl.gz", data)).rows == 20_000
