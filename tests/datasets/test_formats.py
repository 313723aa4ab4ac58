from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.datasets.formats import (
    DatasetError,
    DatasetFormat,
    ParsedDataset,
    RowError,
    parse_dataset,
)

# --- helpers -----------------------------------------------------------------------------------


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def user(content: str = "Hi") -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str = "Hello!") -> dict[str, str]:
    return {"role": "assistant", "content": content}


CHAT = {"messages": [user(), assistant()]}
PC = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "Once upon a time"}
ALPACA = {"instruction": "Translate", "input": "cat", "output": "chat"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}

CHAT_NORM = {"messages": [user(), assistant()]}
ALPACA_NORM = {"messages": [user("Translate\n\ncat"), assistant("chat")]}
SHAREGPT_NORM = {"messages": [user("Hi"), assistant("Yo")]}


# --- every shape, every container ---------------------------------------------------------------

SHAPES = [
    pytest.param(CHAT, DatasetFormat.CHAT, CHAT_NORM, id="chat"),
    pytest.param(PC, DatasetFormat.PROMPT_COMPLETION, PC, id="prompt_completion"),
    pytest.param(TEXT, DatasetFormat.TEXT, TEXT, id="text"),
    pytest.param(ALPACA, DatasetFormat.ALPACA, ALPACA_NORM, id="alpaca"),
    pytest.param(SHAREGPT, DatasetFormat.SHAREGPT, SHAREGPT_NORM, id="sharegpt"),
]


@pytest.mark.parametrize(("row", "fmt", "normalised"), SHAPES)
def test_jsonl_each_shape(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, normalised: dict[str, Any]
) -> None:
    path = write(tmp_path, "train.jsonl", jsonl(row, row))
    parsed = parse_dataset(path)
    assert parsed == ParsedDataset(format=fmt, records=[normalised, normalised], lines=[1, 2])
    assert parsed.rows == 2


@pytest.mark.parametrize(("row", "fmt", "normalised"), SHAPES)
def test_json_array_each_shape(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, normalised: dict[str, Any]
) -> None:
    path = write(tmp_path, "train.json", json.dumps([row, row, row], indent=2).encode())
    parsed = parse_dataset(path)
    assert parsed == ParsedDataset(format=fmt, records=[normalised] * 3, lines=[1, 2, 3])


@pytest.mark.parametrize(("row", "fmt", "normalised"), SHAPES)
def test_parquet_each_shape(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, normalised: dict[str, Any]
) -> None:
    path = write(tmp_path, "train.parquet", parquet([row, row]))
    parsed = parse_dataset(path)
    assert parsed == ParsedDataset(format=fmt, records=[normalised, normalised], lines=[1, 2])


@pytest.mark.parametrize(("row", "fmt", "normalised"), SHAPES)
def test_gzip_jsonl_each_shape(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, normalised: dict[str, Any]
) -> None:
    path = write(tmp_path, "train.jsonl.gz", gzip.compress(jsonl(row)))
    assert parse_dataset(path) == ParsedDataset(format=fmt, records=[normalised], lines=[1])


@pytest.mark.parametrize(
    ("csv_text", "fmt", "records"),
    [
        pytest.param(
            "prompt,completion\n2+2=,4\n",
            DatasetFormat.PROMPT_COMPLETION,
            [PC],
            id="prompt_completion",
        ),
        pytest.param("text\nOnce upon a time\n", DatasetFormat.TEXT, [TEXT], id="text"),
        pytest.param(
            "instruction,input,output\nTranslate,cat,chat\nSay hi,,hi\n",
            DatasetFormat.ALPACA,
            [ALPACA_NORM, {"messages": [user("Say hi"), assistant("hi")]}],
            id="alpaca",
        ),
        pytest.param(
            'id,messages\n7,"' + json.dumps(CHAT["messages"]).replace('"', '""') + '"\n',
            DatasetFormat.CHAT,
            [CHAT_NORM],
            id="chat-json-column",
        ),
    ],
)
def test_csv_shapes(
    tmp_path: Path, csv_text: str, fmt: DatasetFormat, records: list[dict[str, Any]]
) -> None:
    parsed = parse_dataset(write(tmp_path, "train.csv", csv_text.encode()))
    assert parsed.format == fmt
    assert parsed.records == records
    assert parsed.lines == list(range(2, 2 + len(records)))


def test_csv_line_numbers_are_physical_lines(tmp_path: Path) -> None:
    text = 'prompt,completion\r\n"multi\nline\nprompt",a\r\n\r\nnext,b\r\n'
    parsed = parse_dataset(write(tmp_path, "t.csv", text.encode()))
    assert parsed.records == [
        {"prompt": "multi\nline\nprompt", "completion": "a"},
        {"prompt": "next", "completion": "b"},
    ]
    assert parsed.lines == [2, 6]


def test_gzip_csv(tmp_path: Path) -> None:
    parsed = parse_dataset(write(tmp_path, "t.csv.gz", gzip.compress(b"text\nhello\n")))
    assert parsed == ParsedDataset(DatasetFormat.TEXT, [{"text": "hello"}], [2])


def test_gzip_json_array(tmp_path: Path) -> None:
    path = write(tmp_path, "t.json.gz", gzip.compress(json.dumps([PC]).encode()))
    assert parse_dataset(path) == ParsedDataset(DatasetFormat.PROMPT_COMPLETION, [PC], [1])


# --- normalisation details ----------------------------------------------------------------------


def test_chat_extra_keys_dropped_and_content_kept_verbatim(tmp_path: Path) -> None:
    row = {
        "id": 42,
        "source": "x",
        "messages": [
            {"role": "system", "content": "Be terse.", "name": "sys"},
            {"role": "user", "content": "  Hi  "},
            {"role": "assistant", "content": "Hello", "weight": 1},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello again"},
        ],
    }
    parsed = parse_dataset(write(tmp_path, "c.jsonl", jsonl(row)))
    assert parsed.records == [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "  Hi  "},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Hello again"},
            ]
        }
    ]


def test_sharegpt_role_mapping(tmp_path: Path) -> None:
    row = {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "H"},
            {"from": "gpt", "value": "G"},
            {"from": "user", "value": "U"},
            {"from": "assistant", "value": "A"},
        ],
    }
    parsed = parse_dataset(write(tmp_path, "s.jsonl", jsonl(row)))
    assert parsed.format == DatasetFormat.SHAREGPT
    assert parsed.records == [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "H"},
                {"role": "assistant", "content": "G"},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"},
            ]
        }
    ]


def test_alpaca_input_missing_or_empty(tmp_path: Path) -> None:
    rows = [
        {"instruction": "I1", "output": "O1"},
        {"instruction": "I2", "input": "", "output": "O2"},
        {"instruction": "I3", "input": "X", "output": "O3", "extra": None},
    ]
    parsed = parse_dataset(write(tmp_path, "a.jsonl", jsonl(*rows)))
    assert parsed.format == DatasetFormat.ALPACA
    assert parsed.records == [
        {"messages": [user("I1"), assistant("O1")]},
        {"messages": [user("I2"), assistant("O2")]},
        {"messages": [user("I3\n\nX"), assistant("O3")]},
    ]


def test_prompt_completion_and_text_drop_extra_keys(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "c", "id": 1, "meta": {"a": None}}]
    parsed = parse_dataset(write(tmp_path, "p.jsonl", jsonl(*rows)))
    assert parsed.records == [{"prompt": "p", "completion": "c"}]
    parsed = parse_dataset(write(tmp_path, "t.jsonl", jsonl({"text": "t", "id": None})))
    assert parsed.records == [{"text": "t"}]


def test_parquet_nested_chat_with_null_extra_struct_field(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "a", "name": None}, assistant("b")]},
        {"messages": [user("c"), {"role": "assistant", "content": "d", "name": "x"}]},
    ]
    parsed = parse_dataset(write(tmp_path, "c.parquet", parquet(rows)))
    assert parsed.records == [
        {"messages": [user("a"), assistant("b")]},
        {"messages": [user("c"), assistant("d")]},
    ]


# --- container detection ------------------------------------------------------------------------


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    data = b"\n" + json.dumps(TEXT).encode() + b"\r\n   \n\n" + json.dumps(TEXT).encode()
    parsed = parse_dataset(write(tmp_path, "t.jsonl", data))
    assert parsed.lines == [2, 5]
    assert parsed.records == [TEXT, TEXT]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        pytest.param("t.jsonl", b"\xef\xbb\xbf" + jsonl(TEXT), id="jsonl"),
        pytest.param("t.json", b"\xef\xbb\xbf" + json.dumps([TEXT]).encode(), id="json"),
        pytest.param("t.csv", b"\xef\xbb\xbftext\nOnce upon a time\n", id="csv"),
        pytest.param("t.jsonl.gz", gzip.compress(b"\xef\xbb\xbf" + jsonl(TEXT)), id="gzip"),
    ],
)
def test_utf8_bom_accepted(tmp_path: Path, name: str, data: bytes) -> None:
    parsed = parse_dataset(write(tmp_path, name, data))
    assert parsed.format == DatasetFormat.TEXT
    assert parsed.records == [TEXT]


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        pytest.param(jsonl(PC), DatasetFormat.PROMPT_COMPLETION, id="jsonl"),
        pytest.param(
            b"  \n" + json.dumps([PC]).encode(), DatasetFormat.PROMPT_COMPLETION, id="json"
        ),
        pytest.param(gzip.compress(jsonl(TEXT)), DatasetFormat.TEXT, id="gzip"),
        pytest.param(
            gzip.compress(json.dumps([TEXT]).encode()), DatasetFormat.TEXT, id="gzip-json"
        ),
        pytest.param(parquet([TEXT]), DatasetFormat.TEXT, id="parquet"),
        pytest.param(b"text\nhello\n", DatasetFormat.TEXT, id="csv-known-header"),
    ],
)
def test_sniffed_without_suffix(tmp_path: Path, data: bytes, fmt: DatasetFormat) -> None:
    parsed = parse_dataset(write(tmp_path, "blob-0123", data))
    assert parsed.format == fmt
    assert parsed.rows == 1


def test_filename_argument_overrides_storage_name(tmp_path: Path) -> None:
    path = write(tmp_path, "file-abc", b"prompt,completion\n2+2=,4\n")
    parsed = parse_dataset(path, filename="My Data.CSV")
    assert parsed.records == [PC]


def test_gz_suffix_but_already_decompressed(tmp_path: Path) -> None:
    # HTTP clients undo Content-Encoding: gzip, so the bytes may arrive plain.
    parsed = parse_dataset(write(tmp_path, "train.jsonl.gz", jsonl(TEXT)))
    assert parsed.records == [TEXT]


def test_json_suffix_holding_jsonl(tmp_path: Path) -> None:
    parsed = parse_dataset(write(tmp_path, "train.json", jsonl(PC, PC)))
    assert parsed.lines == [1, 2]
    assert parsed.records == [PC, PC]


def test_ndjson_suffix(tmp_path: Path) -> None:
    parsed = parse_dataset(write(tmp_path, "train.ndjson", jsonl(TEXT)))
    assert parsed.records == [TEXT]


def test_unicode_line_separator_inside_string_is_not_a_line_break(tmp_path: Path) -> None:
    row = {"text": "a\u2028b\u0085c"}
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode() + jsonl(TEXT)
    parsed = parse_dataset(write(tmp_path, "t.jsonl", data))
    assert parsed.records == [row, TEXT]
    assert parsed.lines == [1, 2]


def test_shape_detected_from_first_matching_row(tmp_path: Path) -> None:
    # Line 1 matches no shape, so line 2 decides; line 1 is then reported as missing keys.
    path = write(tmp_path, "t.jsonl", jsonl({"id": 1}, PC, PC))
    with pytest.raises(DatasetError) as info:
        parse_dataset(path)
    assert info.value.errors == [
        RowError(1, "prompt", "is missing"),
        RowError(1, "completion", "is missing"),
    ]


def test_row_with_keys_of_two_shapes_uses_priority(tmp_path: Path) -> None:
    row = {"messages": [user(), assistant()], "text": "rendered"}
    parsed = parse_dataset(write(tmp_path, "t.jsonl", jsonl(row, CHAT)))
    assert parsed.format == DatasetFormat.CHAT
    assert parsed.records == [CHAT_NORM, CHAT_NORM]


# --- bad input ----------------------------------------------------------------------------------


def _empty_parquet() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), buffer)
    return buffer.getvalue()


def _bad_utf8_on_line_3() -> bytes:
    return jsonl(TEXT, TEXT) + b'{"text": "caf\xe9"}\n'


BAD = [
    # (filename, data, code, line of first error, field of first error)
    pytest.param(
        "t.jsonl",
        jsonl(TEXT, TEXT) + b'{"text": "a" "b"}\n',
        "dataset_invalid",
        3,
        "",
        id="invalid-json-line-3",
    ),
    pytest.param("t.jsonl", jsonl(TEXT, [1, 2]), "dataset_invalid", 2, "", id="row-not-object"),
    pytest.param("t.jsonl", jsonl(TEXT, "str"), "dataset_invalid", 2, "", id="row-is-string"),
    pytest.param("t.jsonl", jsonl(TEXT, None), "dataset_invalid", 2, "", id="row-is-null"),
    pytest.param(
        "t.jsonl",
        jsonl(CHAT, {"messages": "hi"}),
        "dataset_invalid",
        2,
        "messages",
        id="messages-not-list",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(CHAT, {"messages": []}),
        "dataset_invalid",
        2,
        "messages",
        id="messages-empty",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(CHAT, {"messages": ["hi", assistant()]}),
        "dataset_invalid",
        2,
        "messages[0]",
        id="message-not-object",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [user(), {"content": "x"}]}),
        "dataset_invalid",
        1,
        "messages[1].role",
        id="missing-role",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [user(), {"role": "bot", "content": "x"}]}),
        "dataset_invalid",
        1,
        "messages[1].role",
        id="unknown-role",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [{"role": 1, "content": "x"}, assistant()]}),
        "dataset_invalid",
        1,
        "messages[0].role",
        id="role-not-string",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [{"role": "user"}, assistant()]}),
        "dataset_invalid",
        1,
        "messages[0].content",
        id="missing-content",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(CHAT, CHAT, {"messages": [user(), assistant("")]}),
        "dataset_invalid",
        3,
        "messages[1].content",
        id="empty-content",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [user(" \n\t"), assistant()]}),
        "dataset_invalid",
        1,
        "messages[0].content",
        id="whitespace-content",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [user(), {"role": "assistant", "content": ["x"]}]}),
        "dataset_invalid",
        1,
        "messages[1].content",
        id="content-not-string",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [{"role": "system", "content": ""}, user(), assistant()]}),
        "dataset_invalid",
        1,
        "messages[0].content",
        id="empty-system-content",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(CHAT, {"messages": [user(), user()]}),
        "dataset_invalid",
        2,
        "messages",
        id="no-assistant",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"messages": [user(), assistant(), user()]}),
        "dataset_invalid",
        1,
        "messages[2].role",
        id="last-not-assistant",
    ),
    pytest.param("t.jsonl", jsonl(CHAT, TEXT), "dataset_invalid", 2, "", id="mixed-shapes"),
    pytest.param(
        "t.jsonl",
        jsonl(PC, {"prompt": "p"}),
        "dataset_invalid",
        2,
        "completion",
        id="missing-completion",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(PC, {"id": 3}),
        "dataset_invalid",
        2,
        "prompt",
        id="no-shape-keys",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"prompt": None, "completion": "c"}),
        "dataset_invalid",
        1,
        "prompt",
        id="null-prompt",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"prompt": "p", "completion": 4}),
        "dataset_invalid",
        1,
        "completion",
        id="completion-number",
    ),
    pytest.param(
        "t.jsonl", jsonl(TEXT, {"text": ""}), "dataset_invalid", 2, "text", id="empty-text"
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"instruction": "i", "input": ""}),
        "dataset_invalid",
        1,
        "output",
        id="alpaca-missing-output",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"instruction": "i", "input": 5, "output": "o"}),
        "dataset_invalid",
        1,
        "input",
        id="alpaca-input-not-string",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"instruction": "i", "input": None, "output": "o"}),
        "dataset_invalid",
        1,
        "input",
        id="alpaca-input-null",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"instruction": " ", "output": "o"}),
        "dataset_invalid",
        1,
        "instruction",
        id="alpaca-empty-instruction",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"conversations": [{"from": "bot", "value": "x"}]}),
        "dataset_invalid",
        1,
        "conversations[0].from",
        id="sharegpt-unknown-from",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"conversations": [{"from": "human", "value": "x"}]}),
        "dataset_invalid",
        1,
        "conversations",
        id="sharegpt-no-gpt",
    ),
    pytest.param(
        "t.jsonl",
        jsonl(
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "human", "value": "c"},
                ]
            }
        ),
        "dataset_invalid",
        1,
        "conversations[2].from",
        id="sharegpt-last-human",
    ),
    pytest.param(
        "t.jsonl",
        jsonl({"conversations": [{"from": "human", "value": ""}]}),
        "dataset_invalid",
        1,
        "conversations[0].value",
        id="sharegpt-empty-value",
    ),
    pytest.param(
        "t.jsonl",
        _bad_utf8_on_line_3(),
        "dataset_encoding",
        3,
        "",
        id="non-utf8-line-3",
    ),
    pytest.param(
        "t.jsonl.gz",
        gzip.compress(jsonl(TEXT) + b'{"text": "\xff"}\n'),
        "dataset_encoding",
        2,
        "",
        id="non-utf8-in-gzip-line-2",
    ),
    pytest.param(
        "t.jsonl",
        json.dumps(TEXT).encode("utf-16"),
        "dataset_encoding",
        1,
        "",
        id="utf-16",
    ),
    pytest.param("t.jsonl", b"", "dataset_empty", None, None, id="empty-file"),
    pytest.param("t.jsonl", b"\n  \r\n\n", "dataset_empty", None, None, id="only-blank-lines"),
    pytest.param("t.jsonl", b"\xef\xbb\xbf", "dataset_empty", None, None, id="only-bom"),
    pytest.param("t.json", b"[]", "dataset_empty", None, None, id="empty-json-array"),
    pytest.param(
        "t.csv", b"prompt,completion\n", "dataset_empty", None, None, id="csv-header-only"
    ),
    pytest.param("t.jsonl.gz", gzip.compress(b""), "dataset_empty", None, None, id="empty-gzip"),
    pytest.param("t.parquet", b"", "dataset_empty", None, None, id="zero-byte-parquet"),
    pytest.param("t.parquet", _empty_parquet(), "dataset_empty", None, None, id="parquet-no-rows"),
    pytest.param(
        "t.json",
        json.dumps({"data": [TEXT]}).encode(),
        "dataset_unreadable",
        None,
        None,
        id="json-not-array",
    ),
    pytest.param("t.json", b'[{"text": "a"},', "dataset_unreadable", None, None, id="json-syntax"),
    pytest.param(
        "t.jsonl.gz",
        gzip.compress(jsonl(TEXT) * 50)[:-12],
        "dataset_unreadable",
        None,
        None,
        id="truncated-gzip",
    ),
    pytest.param(
        "t.parquet",
        b"PAR1 this is not really parquet PAR1",
        "dataset_unreadable",
        None,
        None,
        id="bad-parquet",
    ),
    pytest.param(
        "t.parquet",
        parquet([TEXT] * 20)[:-30],
        "dataset_unreadable",
        None,
        None,
        id="truncated-parquet",
    ),
    pytest.param("blob", b"hello world\n", "dataset_unreadable", None, None, id="unsniffable"),
    pytest.param(
        "t.jsonl",
        jsonl({"a": 1}, {"b": 2}),
        "dataset_unknown_format",
        None,
        None,
        id="unknown-shape",
    ),
    pytest.param(
        "t.jsonl",
        b"{oops\n[1]\n",
        "dataset_invalid",
        1,
        "",
        id="all-rows-unreadable",
    ),
    pytest.param(
        "t.json",
        json.dumps([TEXT, 5]).encode(),
        "dataset_invalid",
        2,
        "",
        id="json-array-element-not-object",
    ),
    pytest.param(
        "t.json",
        json.dumps([PC, PC, {"prompt": "p", "completion": None}]).encode(),
        "dataset_invalid",
        3,
        "completion",
        id="json-array-null",
    ),
    pytest.param(
        "t.csv",
        b"prompt,completion\na,b\nc,\n",
        "dataset_invalid",
        3,
        "completion",
        id="csv-empty-cell",
    ),
    pytest.param(
        "t.csv",
        b"prompt,completion\na,b\nc,d,e\n",
        "dataset_invalid",
        3,
        "",
        id="csv-extra-field",
    ),
    pytest.param(
        "t.csv",
        b'prompt,completion\n"x\ny",b\nc,\n',
        "dataset_invalid",
        4,
        "completion",
        id="csv-line-after-multiline-cell",
    ),
    pytest.param(
        "t.csv",
        b'messages\n"[{""role"": ""user"""\n',
        "dataset_invalid",
        2,
        "messages",
        id="csv-messages-bad-json",
    ),
    pytest.param(
        "t.csv",
        b"text,text\na,b\n",
        "dataset_unreadable",
        None,
        None,
        id="csv-duplicate-column",
    ),
    pytest.param(
        "t.parquet",
        parquet([TEXT, {"text": None}]),
        "dataset_invalid",
        2,
        "text",
        id="parquet-null",
    ),
]


@pytest.mark.parametrize(("name", "data", "code", "line", "field"), BAD)
def test_bad_input(
    tmp_path: Path, name: str, data: bytes, code: str, line: int | None, field: str | None
) -> None:
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, name, data))
    exc = info.value
    assert exc.code == code
    if line is None:
        assert exc.errors == []
    else:
        assert exc.errors, "expected row errors"
        assert (exc.errors[0].line, exc.errors[0].field) == (line, field)
        assert f"line {line}" in str(exc)


def test_invalid_json_message(tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", jsonl(TEXT) + b'{"text": "a" "b"}\n')
    with pytest.raises(DatasetError) as info:
        parse_dataset(path)
    assert info.value.errors == [
        RowError(2, "", "is not valid JSON: Expecting ',' delimiter (col 14)")
    ]


def test_unknown_role_message_lists_allowed_roles(tmp_path: Path) -> None:
    path = write(
        tmp_path, "t.jsonl", jsonl({"messages": [user(), {"role": "bot", "content": "x"}]})
    )
    with pytest.raises(DatasetError) as info:
        parse_dataset(path)
    assert info.value.errors == [
        RowError(1, "messages[1].role", "is 'bot'; allowed roles: system, user, assistant")
    ]


def test_mixed_shape_message_names_expected_shape(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", jsonl({"id": 0}, CHAT, TEXT)))
    assert info.value.errors[-1] == RowError(
        3,
        "",
        "has the text shape but this dataset is chat (detected from line 2); "
        "every row must use the same shape",
    )
    assert info.value.errors[0] == RowError(1, "messages", "is missing")


def test_encoding_error_names_offset_and_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", _bad_utf8_on_line_3()))
    offset = len(jsonl(TEXT, TEXT)) + len('{"text": "caf')
    assert info.value.errors == [RowError(3, "", f"is not valid UTF-8 (byte offset {offset})")]
    assert f"byte offset {offset}" in str(info.value)
    assert "(line 3)" in str(info.value)
    assert "UTF-8" in str(info.value)


def test_all_errors_reported_and_capped(tmp_path: Path) -> None:
    rows = [PC] + [{"prompt": "", "completion": ""}] * 60 + [{"prompt": "p"}] * 5
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", jsonl(*rows)))
    exc = info.value
    assert exc.code == "dataset_invalid"
    assert exc.error_count == 125
    assert exc.rows_affected == 65
    assert len(exc.errors) == 50
    assert exc.errors[:2] == [
        RowError(2, "prompt", "must be a non-empty string"),
        RowError(2, "completion", "must be a non-empty string"),
    ]
    text = str(exc)
    assert text.startswith("65 of 66 rows (detected shape: prompt_completion) have problems")
    assert "125 errors" in text
    assert "line 2, field prompt: must be a non-empty string" in text
    assert "line 4, field prompt: must be a non-empty string" in text
    assert "line 5," not in text  # only the first five errors are spelled out
    assert "(120 more errors not shown.)" in text
    assert "upload the file again" in text


def test_unknown_format_lists_shapes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", jsonl({"question": "q", "answer": "a"})))
    text = str(info.value)
    assert "'question', 'answer'" in text
    for fmt in DatasetFormat:
        assert f"{fmt.value}: {{" in text


def test_null_message_content_names_null(tmp_path: Path) -> None:
    row = {"messages": [user(), {"role": "assistant", "content": None}]}
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", jsonl(row)))
    assert info.value.errors == [
        RowError(1, "messages[1].content", "is null; must be a non-empty string")
    ]


def test_dataset_error_defaults() -> None:
    errors = [RowError(i, "text", "bad") for i in range(1, 61)]
    exc = DatasetError("dataset_invalid", "Bad rows.", errors)
    assert exc.error_count == 60
    assert exc.rows_affected == 60
    assert len(exc.errors) == 50
    assert exc.message == "Bad rows."
    assert str(RowError(7, "messages[2].content", "must be a non-empty string")) == (
        "line 7, field messages[2].content: must be a non-empty string"
    )
    assert str(RowError(3, "", "oops")) == "line 3: oops"
    assert str(DatasetError("dataset_empty", "No rows.")) == "No rows."


def test_dataset_error_survives_pickling() -> None:
    errors = [RowError(i, "text", "bad") for i in range(1, 61)]
    exc = DatasetError(
        "dataset_invalid", "Bad rows.", errors[:50], error_count=60, rows_affected=55
    )
    clone = pickle.loads(pickle.dumps(exc))
    assert isinstance(clone, DatasetError)
    assert (clone.code, clone.message, clone.errors) == (
        "dataset_invalid",
        "Bad rows.",
        errors[:50],
    )
    assert (clone.error_count, clone.rows_affected) == (60, 55)
    assert str(clone) == str(exc)


# --- preference rows (method dpo) ----------------------------------------------------------------

TRL_PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
TRL_CHAT_PAIR = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
OPENAI_PAIR = {
    "input": {"messages": [user("2+2?")]},
    "preferred_output": [assistant("4")],
    "non_preferred_output": [assistant("5")],
}


@pytest.mark.parametrize(
    ("row", "normalised"),
    [
        pytest.param(TRL_PAIR, TRL_PAIR, id="trl-text"),
        pytest.param(TRL_CHAT_PAIR, TRL_CHAT_PAIR, id="trl-messages"),
        pytest.param(OPENAI_PAIR, TRL_CHAT_PAIR, id="openai-dpo"),
        pytest.param({**TRL_PAIR, "score": 3}, TRL_PAIR, id="extra-keys-dropped"),
    ],
)
def test_preference_rows_become_trl_pairs(
    tmp_path: Path, row: dict[str, Any], normalised: dict[str, Any]
) -> None:
    parsed = parse_dataset(write(tmp_path, "pairs.jsonl", jsonl(row, row)))
    assert parsed.format is DatasetFormat.PREFERENCE
    assert parsed.records == [normalised, normalised]


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        pytest.param({"prompt": "2+2=", "chosen": "4"}, "rejected", "is missing", id="no-rejected"),
        pytest.param({**TRL_PAIR, "chosen": ""}, "chosen", "non-empty", id="empty-chosen"),
        pytest.param(
            {**OPENAI_PAIR, "non_preferred_output": None},
            "non_preferred_output",
            "is missing",
            id="openai-no-rejected",
        ),
        pytest.param(
            {**OPENAI_PAIR, "preferred_output": [user("4")]},
            "preferred_output[0].role",
            "allowed roles: assistant",
            id="answer-from-user",
        ),
        pytest.param(
            {**OPENAI_PAIR, "input": {"messages": "2+2?"}},
            "input.messages",
            "list of messages",
            id="input-not-messages",
        ),
        pytest.param(
            {**TRL_PAIR, "chosen": [assistant("4")]}, "", "not a mix", id="text-and-messages"
        ),
    ],
)
def test_bad_preference_rows_name_line_and_field(
    tmp_path: Path, row: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(DatasetError) as failure:
        parse_dataset(write(tmp_path, "pairs.jsonl", jsonl(TRL_PAIR, row)))
    assert failure.value.code == "dataset_invalid"
    [error] = failure.value.errors
    assert (error.line, error.field) == (2, field) and message in error.message


def _graded(row: dict[str, Any]) -> list[tuple[str, str]]:
    return [] if "answer" in row else [("answer", "missing: the grader reads {{item.answer}}")]


def test_prompt_rows_keep_every_field_for_the_grader(tmp_path: Path) -> None:
    rows = [
        {"messages": [user("2+2?")], "answer": "4", "level": 1},
        {"prompt": [user("3+3?")], "answer": "6"},
    ]
    parsed = parse_dataset(
        write(tmp_path, "t.jsonl", jsonl(*rows)), prompts=True, row_check=_graded
    )
    assert parsed.format is DatasetFormat.PROMPT
    assert parsed.records[0] == {"prompt": [user("2+2?")], "item": rows[0]}
    assert parsed.records[1]["prompt"] == [user("3+3?")]


def test_bad_prompt_rows_name_line_and_field(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2=", "answer": "4"},
        {"prompt": [user("3+3?")], "answer": "6"},
        {"messages": [user("1+1?"), {"role": "assistant", "content": "2"}], "answer": "2"},
        {"prompt": "5+5="},
        {"answer": "7"},
    ]
    with pytest.raises(DatasetError) as info:
        parse_dataset(write(tmp_path, "t.jsonl", jsonl(*rows)), prompts=True, row_check=_graded)
    found = {(e.line, e.field) for e in info.value.errors}
    assert (2, "prompt") in found  # messages among text prompts
    assert (3, "messages[1].role") in found  # ends with the answer
    assert (4, "answer") in found  # the grader's field is missing
    assert (5, "messages") in found  # no prompt at all
