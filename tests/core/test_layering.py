"""The plugin rules, checked on the source: the core imports no plugin, plugins import the core and never
each other, and the third-party example uses only rlcore's public modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {"rlcore_algorithms": "plugins/algorithms", "rlcore_backends": "plugins/backends",
                 "rlcore_tasks": "plugins/tasks", "rlcore_hardware": "plugins/hardware"}


def imported_packages(root: Path) -> dict[str, set[str]]:
    """Top-level packages each module under `root` imports (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_core_imports_no_plugin():
    bad = {f: n & set(DISTRIBUTIONS) for f, n in imported_packages(REPO / "core").items() if n & set(DISTRIBUTIONS)}
    assert not bad


@pytest.mark.parametrize("package", sorted(DISTRIBUTIONS))
def test_a_plugin_distribution_imports_no_other(package):
    others = set(DISTRIBUTIONS) - {package}
    found = imported_packages(REPO / DISTRIBUTIONS[package] / package)
    assert found and not {f: n & others for f, n in found.items() if n & others}


def test_the_third_party_example_uses_only_rlcore():
    found = imported_packages(REPO / "examples" / "rlcore-plugin-example" / "rlcore_plugin_example")
    assert {"rlcore"} <= set().union(*found.values())
    assert not {f: n & set(DISTRIBUTIONS) for f, n in found.items() if n & set(DISTRIBUTIONS)}
