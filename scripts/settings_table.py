"""Rewrite the settings table in README.md from app/settings.py (run after adding a setting)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def table() -> str:
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shown = (
            "" if default is None else json.dumps(default) if isinstance(default, list) else default
        )
        rows.append(f"| `TUNESERVE_{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    text = re.sub(
        r"(<!-- settings-table:start -->\n).*?(\n<!-- settings-table:end -->)",
        lambda match: match.group(1) + table() + match.group(2),
        text,
        flags=re.S,
    )
    README.write_text(text)


if __name__ == "__main__":
    main()
