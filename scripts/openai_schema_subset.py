"""Cut the part of OpenAI's published OpenAPI document that /v1 implements, for the tests.

tests/data/openai_openapi.json holds, for each operation tuneserve serves under /v1, its path item
(parameters, request body, responses) and every component schema those reach, unchanged. The
conformance test (tests/integration/test_openai_conformance.py) validates live answers against it
and checks that every request field it defines is honoured or refused, so CI needs no network.

Usage, with a checkout of github.com/openai/openai-openapi:

    python scripts/openai_schema_subset.py path/to/openai-openapi/openapi.json --commit <sha>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The operations /v1 serves, by OpenAI's operationId.
OPERATIONS = {
    "createFile",
    "listFiles",
    "retrieveFile",
    "deleteFile",
    "downloadFile",
    "createFineTuningJob",
    "listPaginatedFineTuningJobs",
    "retrieveFineTuningJob",
    "cancelFineTuningJob",
    "listFineTuningEvents",
    "listFineTuningJobCheckpoints",
    "listModels",
    "retrieveModel",
    "createChatCompletion",
    "createCompletion",
}
EXTRA_SCHEMAS = ["ErrorResponse"]  # every error body
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "openai_openapi.json"


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def subset(document: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and operation.get("operationId") in OPERATIONS:
                kept = {k: v for k, v in operation.items() if k != "x-oaiMeta"}
                paths.setdefault(path, {})[method] = kept
    found = {op["operationId"] for item in paths.values() for op in item.values()}
    if found != OPERATIONS:
        raise SystemExit(f"operations missing from the document: {sorted(OPERATIONS - found)}")
    schemas = document["components"]["schemas"]
    wanted, todo = set(), _refs(paths) | set(EXTRA_SCHEMAS)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo |= _refs(schemas[name]) - wanted
    return {
        "openapi": document["openapi"],
        "info": document["info"],
        "paths": paths,
        "components": {"schemas": {name: schemas[name] for name in sorted(wanted)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", type=Path, help="openapi.json of openai/openai-openapi")
    parser.add_argument("--commit", required=True, help="the commit it was read at")
    args = parser.parse_args()
    cut = subset(json.loads(args.document.read_text()))
    cut["x-tuneserve-source"] = {
        "repository": "https://github.com/openai/openai-openapi",
        "file": "openapi.json",
        "commit": args.commit,
        "operations": sorted(OPERATIONS),
        "made_by": "scripts/openai_schema_subset.py",
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(cut, indent=1, sort_keys=False) + "\n")
    print(f"{OUTPUT}: {len(cut['paths'])} paths, {len(cut['components']['schemas'])} schemas")


if __name__ == "__main__":
    main()
