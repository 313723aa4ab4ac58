"""The api's layering: it sends work to the worker by name and never imports it."""

from __future__ import annotations

import subprocess
import sys

IMPORTED_WORKER_MODULES = """
import sys
from app.main import create_app
create_app()
print(sorted(m for m in sys.modules if m == "worker" or m.startswith("worker.")))
"""


def test_the_api_never_imports_the_worker() -> None:
    found = subprocess.run(
        [sys.executable, "-c", IMPORTED_WORKER_MODULES],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]", found.stdout
