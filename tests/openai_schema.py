"""OpenAI's published OpenAPI document (the part /v1 implements) as validators and request fields.

The document is tests/data/openai_openapi.json, cut from github.com/openai/openai-openapi by
scripts/openai_schema_subset.py (its `x-tuneserve-source` says at which commit). It declares
OpenAPI 3.1, whose schemas are JSON Schema 2020-12, but keeps 3.0's `nullable: true` and boolean
`exclusiveMinimum` in places; generated clients read them the 3.0 way, and so does this module.
Nothing else is loosened: a `null` where a field is optional but not nullable fails, as it would
in a typed decoder.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).parent / "data" / "openai_openapi.json"
ROOT = "urn:openai-openapi"


def _as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 idioms the document kept, as JSON Schema 2020-12 says them:
    `{"type": "object", "nullable": true, …}` -> `{"anyOf": [{…}, {"type": "null"}]}`, and
    `{"minimum": 0, "exclusiveMinimum": true}` -> `{"exclusiveMinimum": 0}` (same for maximum)."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _as_json_schema(value) for key, value in node.items()}
    for bound in ("Minimum", "Maximum"):
        exclusive = converted.get(f"exclusive{bound}")
        if isinstance(exclusive, bool):
            del converted[f"exclusive{bound}"]
            if exclusive and bound.lower() in converted:
                converted[f"exclusive{bound}"] = converted.pop(bound.lower())
    if converted.pop("nullable", False) is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


@cache
def _registry() -> Registry:
    converted = _as_json_schema(copy.deepcopy(document()))
    return Registry().with_resource(ROOT, Resource(contents=converted, specification=DRAFT202012))


def operation(operation_id: str) -> tuple[str, str, dict[str, Any]]:
    """(method, path, operation object) of one operation of the document."""
    for path, item in document()["paths"].items():
        for method, found in item.items():
            if found.get("operationId") == operation_id:
                return method, path, found
    raise KeyError(f"{operation_id} is not in {DOCUMENT.name}")


def response_ref(operation_id: str, media_type: str = "application/json") -> str:
    schema = operation(operation_id)[2]["responses"]["200"]["content"][media_type]["schema"]
    return str(schema["$ref"])


def problems(ref: str, body: Any) -> list[str]:
    """Every way `body` breaks the schema at `ref` (`#/components/schemas/Name`), one per line."""
    validator = Draft202012Validator({"$ref": f"{ROOT}{ref}"}, registry=_registry())
    found = []
    for error in validator.iter_errors(body):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        # anyOf/oneOf failures say only "is not valid under any of the given schemas": show why.
        causes = sorted({sub.message for sub in error.context or []})
        found.append(f"{where}: {error.message[:300]}" + (f" {causes[:4]}" if causes else ""))
    return found


def assert_conforms(ref: str, body: Any) -> None:
    found = problems(ref, body)
    assert not found, f"answer breaks {ref}:\n  " + "\n  ".join(found) + f"\n{json.dumps(body)}"


def assert_answer_conforms(operation_id: str, body: Any) -> None:
    assert_conforms(response_ref(operation_id), body)


def assert_error_conforms(body: Any) -> None:
    assert_conforms("#/components/schemas/ErrorResponse", body)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    schema = _resolve(schema)
    found: dict[str, dict[str, Any]] = {}
    for part in schema.get("allOf", []):
        found.update(_properties(part))
    found.update(schema.get("properties", {}))
    return found


def request_fields(operation_id: str) -> dict[str, dict[str, Any]]:
    """The request body's top-level fields and the query parameters, with their schemas."""
    found = operation(operation_id)[2]
    fields = {
        parameter["name"]: parameter["schema"]
        for parameter in found.get("parameters", [])
        if parameter["in"] == "query"
    }
    for content in found.get("requestBody", {}).get("content", {}).values():
        fields.update(_properties(content["schema"]))
    return fields


def example(schema: dict[str, Any]) -> Any:
    """A small value the schema accepts, never null: what a client that sets the field sends."""
    schema = _resolve(schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [option for option in schema[key] if _resolve(option).get("type") != "null"]
            return example(options[0])
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = example(part)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    kind = next(k for k in kind if k != "null") if isinstance(kind, list) else kind
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 1))
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), -(2**63))  # the document rounds int64's bounds
    if kind == "number":
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    if kind == "array":
        return [example(schema.get("items", {"type": "string"}))] * max(
            1, schema.get("minItems", 1)
        )
    properties = schema.get("properties", {})
    return {name: example(properties[name]) for name in schema.get("required", [])}
