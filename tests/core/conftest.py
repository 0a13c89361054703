"""A fake installed distribution, made on disk, so plugin discovery is tested through real entry points."""

import itertools
from pathlib import Path

import pytest

_ids = itertools.count(1)


@pytest.fixture
def install_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """install_fake(module_source, {group: {name: "module:Class"}}) puts a dist-info + module on sys.path
    and returns the module name (unique per call, so `{mod}` in the targets is replaced by it)."""
    def install(source: str, entry_points: dict[str, dict[str, str]], module: str | None = None) -> str:
        n = next(_ids)
        name = module or f"fake_rlcore_plugin_{n}"
        root = tmp_path / f"site{n}"
        root.mkdir()
        (root / f"{name}.py").write_text(source)
        info = root / f"{name}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
        eps = "".join(f"[{g}]\n" + "".join(f"{k} = {v.format(mod=name)}\n" for k, v in m.items()) for g, m in entry_points.items())
        (info / "entry_points.txt").write_text(eps)
        monkeypatch.syspath_prepend(str(root))
        return name

    return install
