"""The README stays true to the code: its settings table lists every setting."""

from __future__ import annotations

import re

from app.settings import Settings
from tests.fixtures.env import REPO


def test_readme_settings_table_lists_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    documented = set(re.findall(r"`TUNESERVE_([A-Z0-9_]+)`", table))
    assert documented == {name.upper() for name in Settings.model_fields}
