"""The docs hold what the code does: the settings table is `Settings`, every link leads somewhere, and the README
stays a front door."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import REPO
from service.settings import Settings

ROOT = Path(REPO)
OPERATIONS = ROOT / "docs" / "operations.md"


def _settings_table() -> list[str]:
    """The rows of the settings table in docs/operations.md."""
    text = OPERATIONS.read_text()
    table = text[text.index("## Settings") :]
    table = table[: table.index("\n\n", table.index("| variable"))]
    return [line for line in table.splitlines() if line.startswith("| `PUPPET_")]


def test_the_settings_table_is_every_setting_and_nothing_else():
    documented = {name for row in _settings_table() for name in re.findall(r"`(PUPPET_[A-Z0-9_]+)`", row.split("|")[1])}
    settings = {f"PUPPET_{name.upper()}" for name in Settings.model_fields}
    assert documented == settings, (sorted(settings - documented), sorted(documented - settings))


def test_every_puppet_variable_the_code_reads_is_documented():
    """A PUPPET_* name in the runtime packages is a setting (serving) or is named in the docs (training)."""
    read = set()
    for folder in ("service", "model"):
        for path in (ROOT / folder).rglob("*.py"):
            read |= set(re.findall(r"PUPPET_[A-Z0-9_]+", path.read_text()))
    docs = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    settings = {f"PUPPET_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in read - settings if name not in docs} == set()


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150
    for command in ("make serve", "make test"):
        assert any(line.startswith(command) for line in lines), command
    for page in ("docs/api.md", "docs/operations.md", "docs/reliability.md", "docs/design.md"):
        assert os.path.exists(ROOT / page) and f"({page})" in "\n".join(lines), page
