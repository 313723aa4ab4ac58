"""Schemathesis over /openapi.json: generated requests, valid and not, to every endpoint; no
answer is a 5xx, and every answer (status, content type, body) matches the schema.

The api runs in-process with a queue no worker consumes (fuzzed jobs stay queued), the tiny
model as default base model and small generations, so the run takes seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fixtures.service import auth, create_api_key

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _app() -> Any:
    from app.main import create_app
    from app.settings import get_settings
    from tests.fixtures.models import TINY_MODEL

    return create_app(
        get_settings().model_copy(
            update={
                "default_queue": "fuzzed",
                "default_base_model": TINY_MODEL,
                "max_new_tokens_limit": 4,
                "max_jobs_in_flight": 100_000,
            }
        )
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@pytest.fixture(scope="module")
def key_headers(tiny_model: str) -> dict[str, str]:
    from app.migrate import upgrade_database

    upgrade_database()
    return auth(create_api_key("fuzzer"))


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_match_the_schema(case: Any, key_headers: dict[str, str]) -> None:
    if case.path.endswith("/events/stream"):
        case.query = {**(case.query or {}), "after": 0}
    case.call_and_validate(headers=key_headers, checks=CHECKS)
