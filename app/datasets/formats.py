"""Parse and validate a user's training dataset file.

A dataset is one file (JSONL, JSON array, CSV or Parquet, optionally gzip-compressed) whose rows
all share one of five shapes. Every row is validated up front so a user learns about *all* the
problems in their file at submission time, not hours into a training run.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from app.errors import InvalidRequest

__all__ = [
    "DatasetError",
    "DatasetFormat",
    "ParsedDataset",
    "RowError",
    "parse_dataset",
]

# Kept small so an error payload stays readable and bounded even for a million bad rows.
MAX_KEPT_ERRORS = 50
# How many row errors str(DatasetError) spells out; the rest are summarised as a count.
_ERRORS_IN_MESSAGE = 5

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_UTF8_BOM = "\ufeff"
# How much a gzip file is inflated at a time, so a "zip bomb" stops at the size limit.
_INFLATE_CHUNK = 1024 * 1024


class DatasetFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"
    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    # A prompt with a chosen and a rejected answer, for preference tuning (method dpo).
    PREFERENCE = "preference"
    # A prompt alone, with the fields a grader reads, for reinforcement (the model answers).
    PROMPT = "prompt"


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"line {self.line}, field {self.field}: {self.message}"
        return f"line {self.line}: {self.message}"


class DatasetError(InvalidRequest):
    """A dataset the user must fix. code is stable and machine-readable."""

    def __init__(
        self,
        code: str,
        message: str,
        errors: Sequence[RowError] = (),
        *,
        error_count: int | None = None,
        rows_affected: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.errors: list[RowError] = list(errors[:MAX_KEPT_ERRORS])
        # The parser caps what it keeps itself, so it passes the true totals explicitly.
        self.error_count: int = len(errors) if error_count is None else error_count
        self.rows_affected: int = (
            len({e.line for e in errors}) if rows_affected is None else rows_affected
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the row errors and totals when the exception crosses a process boundary (Celery).
        return (type(self), (self.code, self.message, self.errors), self.__dict__)

    def __str__(self) -> str:
        if not self.errors:
            return self.message
        shown = "; ".join(str(e) for e in self.errors[:_ERRORS_IN_MESSAGE])
        text = f"{self.message} First errors: {shown}."
        hidden = self.error_count - min(len(self.errors), _ERRORS_IN_MESSAGE)
        if hidden > 0:
            text += f" ({hidden} more error{'s' if hidden != 1 else ''} not shown.)"
        return text


@dataclass(frozen=True)
class ParsedDataset:
    format: DatasetFormat
    records: list[dict[str, Any]]
    lines: list[int]

    @property
    def rows(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

# Keys that identify a shape, in priority order: a row carrying keys of several shapes is taken
# as the first listed (e.g. a chat row with a leftover "text" column is chat).
_SHAPE_KEYS: tuple[tuple[DatasetFormat, frozenset[str]], ...] = (
    (
        DatasetFormat.PREFERENCE,
        frozenset({"chosen", "rejected", "preferred_output", "non_preferred_output"}),
    ),
    (DatasetFormat.CHAT, frozenset({"messages"})),
    (DatasetFormat.SHAREGPT, frozenset({"conversations"})),
    (DatasetFormat.ALPACA, frozenset({"instruction", "output"})),
    (DatasetFormat.PROMPT_COMPLETION, frozenset({"prompt", "completion"})),
    (DatasetFormat.TEXT, frozenset({"text"})),
)
_IDENTIFYING_KEYS = dict(_SHAPE_KEYS)

_SHAPE_EXAMPLES: dict[DatasetFormat, str] = {
    DatasetFormat.CHAT: (
        '{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello!"}]}'
    ),
    DatasetFormat.PROMPT_COMPLETION: '{"prompt": "2+2=", "completion": "4"}',
    DatasetFormat.TEXT: '{"text": "Once upon a time..."}',
    DatasetFormat.ALPACA: (
        '{"instruction": "Translate to French", "input": "cat", "output": "le chat"}'
    ),
    DatasetFormat.SHAREGPT: (
        '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}'
    ),
    DatasetFormat.PREFERENCE: (
        '{"prompt": "2+2=", "chosen": "4", "rejected": "5"} (TRL; or message lists), or '
        '{"input": {"messages": [{"role": "user", "content": "2+2?"}]}, "preferred_output": '
        '[{"role": "assistant", "content": "4"}], "non_preferred_output": [{"role": '
        '"assistant", "content": "5"}]} (OpenAI)'
    ),
    DatasetFormat.PROMPT: (
        '{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"} (method '
        "reinforcement only: a prompt the model answers, and the fields its grader reads)"
    ),
}

PREFERENCE_EXAMPLE = '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}'
_CHAT_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# CSV cells are strings; these columns carry a JSON-encoded conversation instead.
_CSV_JSON_COLUMNS = frozenset({"messages", "conversations"})
_ALL_KNOWN_KEYS = frozenset().union(*_IDENTIFYING_KEYS.values()) | {"input"}


def _shape_of(row: dict[str, Any]) -> DatasetFormat | None:
    for fmt, keys in _SHAPE_KEYS:
        if keys & row.keys():
            return fmt
    return None


def _accepted_shapes_text() -> str:
    return "; ".join(f"{fmt.value}: {example}" for fmt, example in _SHAPE_EXAMPLES.items())


# ---------------------------------------------------------------------------------------------
# Error collection
# ---------------------------------------------------------------------------------------------


@dataclass
class _Errors:
    """Collects row errors, keeping only the first few but counting all of them."""

    kept: list[RowError] = field(default_factory=list)
    count: int = 0
    lines: set[int] = field(default_factory=set)

    def add(self, line: int, field_name: str, message: str) -> None:
        self.count += 1
        self.lines.add(line)
        if len(self.kept) < MAX_KEPT_ERRORS:
            self.kept.append(RowError(line, field_name, message))


def _type_name(value: object) -> str:
    # JSON vocabulary, because that is what users write their files in.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, bytes | bytearray):
        return "binary"
    return type(value).__name__


def _get_str(
    obj: dict[str, Any],
    key: str,
    path: str,
    line: int,
    errors: _Errors,
    *,
    required: bool = True,
    allow_empty: bool = False,
) -> str | None:
    """Return obj[key] if it is an acceptable string, otherwise record why not."""
    if key not in obj:
        if required:
            errors.add(line, path, "is missing")
        return None
    value = obj[key]
    if value is None:
        hint = "; use an empty string or leave the key out" if not required else ""
        errors.add(
            line, path, f"is null; must be a {'' if allow_empty else 'non-empty '}string{hint}"
        )
        return None
    if not isinstance(value, str):
        errors.add(line, path, f"must be a string, got {_type_name(value)}")
        return None
    if not allow_empty and not value.strip():
        errors.add(line, path, "must be a non-empty string")
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Row validation and normalisation
# ---------------------------------------------------------------------------------------------


def _validate_turns(
    row: dict[str, Any],
    line: int,
    errors: _Errors,
    *,
    list_key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
) -> dict[str, Any] | None:
    """Validate a chat or ShareGPT conversation and return it as TRL "messages"."""
    turns = row.get(list_key)
    if list_key not in row:
        errors.add(line, list_key, "is missing")
        return None
    if not isinstance(turns, list):
        errors.add(line, list_key, f"must be a list of messages, got {_type_name(turns)}")
        return None
    if not turns:
        errors.add(line, list_key, "must be a non-empty list of messages")
        return None

    before = errors.count
    messages: list[dict[str, str]] = []
    allowed = ", ".join(roles)
    for i, turn in enumerate(turns):
        path = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            errors.add(
                line,
                path,
                f"must be an object with {role_key!r} and {content_key!r}, got {_type_name(turn)}",
            )
            continue
        role = _get_str(turn, role_key, f"{path}.{role_key}", line, errors)
        if role is not None and role not in roles:
            errors.add(line, f"{path}.{role_key}", f"is {role!r}; allowed roles: {allowed}")
            role = None
        content = _get_str(turn, content_key, f"{path}.{content_key}", line, errors)
        if role is not None and content is not None:
            messages.append({"role": roles[role], "content": content})
    if errors.count != before:
        return None

    # Training only learns from assistant turns, so a conversation without one (or one that ends
    # on another role, whose tail would be silently ignored) is almost certainly a data bug.
    if not any(m["role"] == "assistant" for m in messages):
        errors.add(line, list_key, "has no assistant message; there is nothing to train on")
        return None
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        errors.add(
            line,
            f"{list_key}[{last}].{role_key}",
            f"is {turns[last][role_key]!r}; a conversation must end with an assistant message "
            "(messages after the last assistant reply are never trained on)",
        )
        return None
    return {"messages": messages}


def _normalise_chat(row: dict[str, Any], line: int, errors: _Errors) -> dict[str, Any] | None:
    roles = {r: r for r in _CHAT_ROLES}
    return _validate_turns(
        row, line, errors, list_key="messages", role_key="role", content_key="content", roles=roles
    )


def _normalise_sharegpt(row: dict[str, Any], line: int, errors: _Errors) -> dict[str, Any] | None:
    return _validate_turns(
        row,
        line,
        errors,
        list_key="conversations",
        role_key="from",
        content_key="value",
        roles=_SHAREGPT_ROLES,
    )


def _normalise_alpaca(row: dict[str, Any], line: int, errors: _Errors) -> dict[str, Any] | None:
    instruction = _get_str(row, "instruction", "instruction", line, errors)
    extra = _get_str(row, "input", "input", line, errors, required=False, allow_empty=True)
    output = _get_str(row, "output", "output", line, errors)
    if instruction is None or output is None or ("input" in row and extra is None):
        return None
    user = instruction + ("\n\n" + extra if extra else "")
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    }


def _normalise_prompt_completion(
    row: dict[str, Any], line: int, errors: _Errors
) -> dict[str, Any] | None:
    prompt = _get_str(row, "prompt", "prompt", line, errors)
    completion = _get_str(row, "completion", "completion", line, errors)
    if prompt is None or completion is None:
        return None
    return {"prompt": prompt, "completion": completion}


def _messages(
    value: Any, path: str, line: int, errors: _Errors, *, roles: tuple[str, ...]
) -> list[dict[str, str]] | None:
    """A non-empty list of {"role", "content"} messages with these roles, or None (recorded)."""
    if value is None:
        errors.add(line, path, "is missing")
        return None
    if not isinstance(value, list) or not value:
        errors.add(line, path, f"must be a non-empty list of messages, got {_type_name(value)}")
        return None
    before = errors.count
    messages = []
    for index, turn in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(turn, dict):
            errors.add(line, where, f"must be a message object, got {_type_name(turn)}")
            continue
        role = _get_str(turn, "role", f"{where}.role", line, errors)
        if role is not None and role not in roles:
            errors.add(line, f"{where}.role", f"is {role!r}; allowed roles: {', '.join(roles)}")
        content = _get_str(turn, "content", f"{where}.content", line, errors)
        if role is not None and content is not None:
            messages.append({"role": role, "content": content})
    return messages if errors.count == before else None


def _normalise_preference(row: dict[str, Any], line: int, errors: _Errors) -> dict[str, Any] | None:
    """OpenAI's DPO rows (input.messages, preferred_output, non_preferred_output) or TRL's
    (prompt, chosen, rejected; text or messages), as TRL's: prompt, chosen and rejected."""
    before = errors.count
    answer_roles = ("assistant",)
    if {"input", "preferred_output", "non_preferred_output"} & row.keys():
        request = row.get("input")
        if not isinstance(request, dict):
            errors.add(line, "input", f"must be an object with messages, got {_type_name(request)}")
            prompt = None
        else:
            prompt = _messages(
                request.get("messages"), "input.messages", line, errors, roles=_CHAT_ROLES
            )
        chosen = _messages(
            row.get("preferred_output"), "preferred_output", line, errors, roles=answer_roles
        )
        rejected = _messages(
            row.get("non_preferred_output"),
            "non_preferred_output",
            line,
            errors,
            roles=answer_roles,
        )
        if errors.count != before:
            return None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    found: dict[str, Any] = {}
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, list):
            roles = _CHAT_ROLES if key == "prompt" else answer_roles
            found[key] = _messages(value, key, line, errors, roles=roles)
        else:
            found[key] = _get_str(row, key, key, line, errors)
    if errors.count != before:
        return None
    if len({isinstance(value, list) for value in found.values()}) > 1:
        errors.add(
            line,
            "",
            "prompt, chosen and rejected must all be text or all be message lists, not a mix",
        )
        return None
    return found


def _normalise_text(row: dict[str, Any], line: int, errors: _Errors) -> dict[str, Any] | None:
    text = _get_str(row, "text", "text", line, errors)
    return None if text is None else {"text": text}


# Checks a prompt row against what reads it (a grader): (field, problem) pairs.
RowCheck = Callable[[dict[str, Any]], list[tuple[str, str]]]


def _normalise_prompt(
    row: dict[str, Any], line: int, errors: _Errors, row_check: RowCheck | None
) -> dict[str, Any] | None:
    """A reinforcement row: the prompt (OpenAI's `messages`, or TRL's `prompt` as text or
    messages) the model answers, and the whole row as the `item` its grader reads."""
    before = errors.count
    key = "messages" if "messages" in row or "prompt" not in row else "prompt"
    value = row.get(key)
    prompt: str | list[dict[str, str]] | None
    if key == "prompt" and not isinstance(value, list):
        prompt = _get_str(row, "prompt", "prompt", line, errors)
    elif value is None:
        errors.add(
            line,
            "messages",
            "is missing: a prompt row has messages ending with the user's turn (or a prompt), "
            "plus the fields its grader reads",
        )
        prompt = None
    else:
        prompt = _messages(value, key, line, errors, roles=_CHAT_ROLES)
        if prompt and prompt[-1]["role"] == "assistant":
            errors.add(
                line,
                f"{key}[{len(prompt) - 1}].role",
                "is 'assistant'; a prompt for reinforcement ends with the user's turn: the model "
                "writes the answer, and the grader reads the reference from a field of its own "
                '(e.g. "answer")',
            )
    for field_name, problem in row_check(row) if row_check else ():
        errors.add(line, field_name, problem)
    if errors.count != before or prompt is None:
        return None
    return {"prompt": prompt, "item": row}


_NORMALISERS = {
    DatasetFormat.CHAT: _normalise_chat,
    DatasetFormat.SHAREGPT: _normalise_sharegpt,
    DatasetFormat.ALPACA: _normalise_alpaca,
    DatasetFormat.PROMPT_COMPLETION: _normalise_prompt_completion,
    DatasetFormat.TEXT: _normalise_text,
    DatasetFormat.PREFERENCE: _normalise_preference,
}


# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RawRow:
    """One row as read from the container, before shape validation."""

    line: int
    value: Any
    # Set when the row could not even be read (bad JSON, wrong CSV field count, ...).
    error_field: str | None = None
    error: str | None = None


def _container_from_name(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(".gz"):
        lowered = lowered[:-3]
    for suffix, container in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "json"),
        (".csv", "csv"),
        (".parquet", "parquet"),
    ):
        if lowered.endswith(suffix):
            return container
    return None


def _sniff_text_container(text: str) -> str | None:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        return "jsonl"
    # A CSV has no magic; accept it when its header names columns we know.
    header = next(csv.reader(io.StringIO(stripped.split("\n", 1)[0])), [])
    if {column.strip() for column in header} & _ALL_KNOWN_KEYS:
        return "csv"
    return None


def _decompress(data: bytes, max_bytes: int | None) -> bytes:
    """gzip.decompress (every member of a multi-member file), refusing to grow past max_bytes."""
    chunks: list[bytes] = []
    size = 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            while chunk := fh.read(_INFLATE_CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise _too_large_error(
                        f"The file decompresses to more than {max_bytes} bytes, the limit for a "
                        "dataset once decompressed"
                    )
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            "dataset_unreadable",
            f"The file looks gzip-compressed but could not be decompressed ({exc}). It may be "
            "truncated or corrupt; compress it again (gzip) or upload it uncompressed.",
        ) from exc
    return b"".join(chunks)


def _too_large_error(what: str) -> DatasetError:
    return DatasetError(
        "dataset_too_large",
        f"{what}. Split it into smaller datasets, or ask the operator to raise "
        "TUNESERVE_MAX_DATASET_BYTES.",
    )


def _decode(data: bytes, compressed: bool) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = "of the decompressed content " if compressed else ""
        bad = data[exc.start]
        hint = ""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = " It looks like UTF-16."
        raise DatasetError(
            "dataset_encoding",
            f"The file is not valid UTF-8: byte 0x{bad:02x} at byte offset {exc.start} "
            f"{where}(line {line}) cannot be decoded.{hint} Save the file as UTF-8 (not Latin-1, "
            "Windows-1252 or UTF-16) and upload it again.",
            [RowError(line, "", f"is not valid UTF-8 (byte offset {exc.start})")],
        ) from exc
    # Editors on Windows like to prepend a BOM; it is not part of the data.
    return text.removeprefix(_UTF8_BOM)


def _read_jsonl(text: str) -> Iterator[_RawRow]:
    # split("\n") rather than splitlines(): JSON strings may legally contain U+2028 and friends,
    # which splitlines() would treat as line breaks and so corrupt both rows and line numbers.
    for number, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped:
            continue
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            column = exc.colno + (len(raw) - len(raw.lstrip()))
            yield _RawRow(number, None, "", f"is not valid JSON: {exc.msg} (col {column})")
            continue
        yield _RawRow(number, value)


def _read_json(text: str) -> Iterator[_RawRow]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            "dataset_unreadable",
            f"The file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "Fix the syntax, or if it holds one JSON object per line, name it .jsonl.",
        ) from exc
    if not isinstance(value, list):
        raise DatasetError(
            "dataset_unreadable",
            f"A .json dataset must be a top-level JSON array of row objects, got "
            f"{_type_name(value)}. Put the rows in an array ([{{...}}, {{...}}]) or write one "
            "object per line as .jsonl.",
        )
    for index, item in enumerate(value, start=1):
        yield _RawRow(index, item)


def _read_json_or_jsonl(text: str) -> Iterator[_RawRow]:
    # Many published datasets are JSON Lines saved as ".json"; accept them instead of failing.
    if text.lstrip().startswith("{"):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(text)
    return _read_json(text)


def _read_csv(text: str) -> Iterator[_RawRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    previous_end = 0
    for cells in reader:
        # A quoted cell may span lines, so a record starts right after the previous one ended.
        start, previous_end = previous_end + 1, reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            _check_csv_header(header)
            continue
        if len(cells) != len(header):
            yield _RawRow(
                start,
                None,
                "",
                f"has {len(cells)} fields but the header has {len(header)} columns "
                "(check quoting of commas and line breaks)",
            )
            continue
        yield _csv_row(start, dict(zip(header, cells, strict=True)))


def _check_csv_header(header: list[str]) -> None:
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise DatasetError(
            "dataset_unreadable",
            f"The CSV header repeats column(s) {', '.join(map(repr, duplicates))}. "
            "Give every column a unique name.",
        )


def _csv_row(line: int, row: dict[str, Any]) -> _RawRow:
    for column in _CSV_JSON_COLUMNS & row.keys():
        try:
            row[column] = json.loads(row[column])
        except json.JSONDecodeError as exc:
            message = f"is not valid JSON: {exc.msg} (col {exc.colno})"
            return _RawRow(line, None, column, message)
    return _RawRow(line, row)


def _read_parquet(data: bytes) -> Iterator[_RawRow]:
    # Imported lazily: pyarrow is heavy and most datasets are JSONL.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Single-threaded: datasets are small, and Arrow's thread pools have been seen to abort
        # the interpreter at exit (pyarrow 26) after a threaded read.
        rows: list[Any] = pq.ParquetFile(io.BytesIO(data)).read(use_threads=False).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(
            "dataset_unreadable",
            f"The file could not be read as Parquet ({exc}). It may be truncated or not a Parquet "
            "file; export it again or upload it as JSONL.",
        ) from exc
    for index, row in enumerate(rows, start=1):
        yield _RawRow(index, row)


def _at_most(rows: Iterable[_RawRow], max_rows: int | None) -> list[_RawRow]:
    """The rows, stopping with dataset_too_large at the first one past max_rows."""
    if max_rows is None:
        return list(rows)
    kept = list(itertools.islice(rows, max_rows + 1))
    if len(kept) > max_rows:
        raise DatasetError(
            "dataset_too_large",
            f"The dataset has more than {max_rows} rows; split it into smaller datasets or ask "
            "the operator to raise TUNESERVE_MAX_DATASET_ROWS.",
        )
    return kept


def _read_rows(
    data: bytes, name: str, max_bytes: int | None = None, max_rows: int | None = None
) -> list[_RawRow]:
    compressed = data.startswith(_GZIP_MAGIC)
    # Decide on the magic bytes, not the ".gz" suffix: HTTP clients transparently undo
    # Content-Encoding: gzip, so a "train.jsonl.gz" can legitimately arrive decompressed.
    if compressed:
        data = _decompress(data, max_bytes)
    container = _container_from_name(name)
    if container == "parquet" or (container is None and data.startswith(_PARQUET_MAGIC)):
        return _at_most(_read_parquet(data), max_rows)

    text = _decode(data, compressed)
    if not text.strip():
        return []
    container = container or _sniff_text_container(text)
    if container == "jsonl":
        return _at_most(_read_jsonl(text), max_rows)
    if container == "json":
        return _at_most(_read_json_or_jsonl(text), max_rows)
    if container == "csv":
        return _at_most(_read_csv(text), max_rows)
    raise DatasetError(
        "dataset_unreadable",
        f"Could not tell what kind of file {name!r} is. Use one of: .jsonl, .ndjson, .json "
        "(an array of objects), .csv or .parquet, optionally gzip-compressed (.gz).",
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _detect_shape(rows: Sequence[_RawRow]) -> tuple[DatasetFormat, int] | None:
    for row in rows:
        if isinstance(row.value, dict):
            fmt = _shape_of(row.value)
            if fmt is not None:
                return fmt, row.line
    return None


def _unknown_format_error(rows: Sequence[_RawRow]) -> DatasetError:
    first = next((r for r in rows if isinstance(r.value, dict)), None)
    seen = ""
    if first is not None:
        keys = ", ".join(map(repr, list(first.value)[:10])) or "none"
        seen = f" The first row (line {first.line}) has keys: {keys}."
    return DatasetError(
        "dataset_unknown_format",
        "No row matches a supported dataset shape." + seen + " Every row must use one of these "
        "shapes (extra keys are ignored): " + _accepted_shapes_text(),
    )


def _readable_object(row: _RawRow, errors: _Errors) -> dict[str, Any] | None:
    """Return the row as an object, or record why it is not one."""
    if row.error is not None:
        errors.add(row.line, row.error_field or "", row.error)
        return None
    if not isinstance(row.value, dict):
        errors.add(row.line, "", f"must be a JSON object, got {_type_name(row.value)}")
        return None
    return row.value


def _check_row(
    row: _RawRow, fmt: DatasetFormat, detected_line: int, errors: _Errors
) -> dict[str, Any] | None:
    value = _readable_object(row, errors)
    if value is None:
        return None
    if not (_IDENTIFYING_KEYS[fmt] & value.keys()):
        other = _shape_of(value)
        if other is not None:
            errors.add(
                row.line,
                "",
                f"has the {other.value} shape but this dataset is {fmt.value} (detected from "
                f"line {detected_line}); every row must use the same shape",
            )
            return None
    return _NORMALISERS[fmt](value, row.line, errors)


def parse_dataset(
    path: Path,
    *,
    filename: str | None = None,
    max_bytes: int | None = None,
    max_rows: int | None = None,
    prompts: bool = False,
    row_check: RowCheck | None = None,
) -> ParsedDataset:
    """Read, validate and normalise a dataset file for TRL's trainers.

    ``filename`` is the user's original file name, used for suffix detection when ``path`` is a
    storage name without one. ``max_bytes`` caps the file's size and, for a gzip file, its
    decompressed size; ``max_rows`` the number of rows (None: no cap). ``prompts``: every row is
    a prompt the model answers (reinforcement), checked by ``row_check`` too. Raises
    DatasetError describing every problem found ("dataset_too_large" past a cap).
    """
    name = filename or path.name
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise _too_large_error(f"The file ({size} bytes) is larger than the {max_bytes}-byte limit")
    data = path.read_bytes()
    if not data:
        raise _empty_error()
    rows = _read_rows(data, name, max_bytes, max_rows)
    if not rows:
        raise _empty_error()
    if prompts:
        return _parse_prompts(rows, row_check)

    detected = _detect_shape(rows)
    errors = _Errors()
    if detected is None:
        # Rows that could not even be read say more than "unknown format" would.
        for row in rows:
            _readable_object(row, errors)
        if errors.count:
            raise _invalid_error(errors, len(rows), None)
        raise _unknown_format_error(rows)

    fmt, detected_line = detected
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for row in rows:
        record = _check_row(row, fmt, detected_line, errors)
        if record is not None:
            records.append(record)
            lines.append(row.line)
    if errors.count:
        raise _invalid_error(errors, len(rows), fmt)
    return ParsedDataset(format=fmt, records=records, lines=lines)


def _parse_prompts(rows: Sequence[_RawRow], row_check: RowCheck | None) -> ParsedDataset:
    errors = _Errors()
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for row in rows:
        value = _readable_object(row, errors)
        record = None if value is None else _normalise_prompt(value, row.line, errors, row_check)
        if record is not None:
            records.append(record)
            lines.append(row.line)
    chat = [isinstance(record["prompt"], list) for record in records]
    for line, is_chat in zip(lines, chat, strict=True):
        if records and is_chat != chat[0]:  # one column of TRL's dataset holds them all
            kinds = ("messages", "text") if chat[0] else ("text", "messages")
            errors.add(
                line,
                "prompt",
                f"is {kinds[1]} but line {lines[0]}'s prompt is {kinds[0]}: give every prompt "
                "the same way",
            )
    if errors.count:
        raise _invalid_error(errors, len(rows), DatasetFormat.PROMPT)
    return ParsedDataset(format=DatasetFormat.PROMPT, records=records, lines=lines)


def _empty_error() -> DatasetError:
    return DatasetError(
        "dataset_empty",
        "The dataset has no rows. Upload a file with at least one training example, e.g. "
        + _SHAPE_EXAMPLES[DatasetFormat.PROMPT_COMPLETION],
    )


def _invalid_error(errors: _Errors, total_rows: int, fmt: DatasetFormat | None) -> DatasetError:
    affected = len(errors.lines)
    shape = f" (detected shape: {fmt.value})" if fmt is not None else ""
    plural = "s" if errors.count != 1 else ""
    return DatasetError(
        "dataset_invalid",
        f"{affected} of {total_rows} rows{shape} have problems ({errors.count} error{plural}). "
        "Fix or remove these rows and upload the file again.",
        errors.kept,
        error_count=errors.count,
        rows_affected=affected,
    )
