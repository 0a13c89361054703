"""The README's generated option tables and its figure for the core's size agree with the code, so they
cannot drift."""

import re
from pathlib import Path

import pytest

from rlcore.option_docs import MARKER, sync_tables

REPO = Path(__file__).resolve().parents[2]
READMES = [REPO / "README.md", *sorted((REPO / "plugins").glob("*/README.md"))]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_option_tables_match_what_rlcore_plugins_generates(readme):
    text = readme.read_text()
    assert sync_tables(text) == text, f"regenerate them: python -m rlcore.option_docs {readme.relative_to(REPO)}"


def test_the_readme_has_the_trainer_sampling_and_grpo_tables():
    tables = {(m.group(2), m.group(3)) for m in MARKER.finditer((REPO / "README.md").read_text())}
    assert {("trainer", None), ("sampling", None), ("algo", "grpo")} <= tables


def test_the_readmes_core_size_is_within_ten_percent_of_the_real_count():
    claimed = re.search(r"The core \(`core/rlcore`, about\s+([\d,]+) lines", (REPO / "README.md").read_text())
    assert claimed, "the README no longer states the core's size"
    real = sum(len(p.read_text().splitlines()) for p in (REPO / "core" / "rlcore").rglob("*.py"))
    assert abs(int(claimed.group(1).replace(",", "")) - real) <= 0.1 * real, f"the core has {real} lines"
