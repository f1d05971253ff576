"""What a non-editable install (`pip install .`) ships: every source package and data file."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["setuptools"]


def test_every_source_package_is_listed():
    """A folder with an ``__init__.py`` that pyproject's ``packages`` leaves out works
    in the editable checkout and is missing from a wheel (``moechat.export.experts``
    was)."""
    config = _setuptools()
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found - set(config["packages"]) == set()


def test_every_data_file_is_matched():
    config = _setuptools()
    patterns = config["package-data"]["moechat.export"]
    data = ROOT / "export" / "data"
    for path in data.rglob("*.txt"):
        relative = path.relative_to(ROOT / "export")
        assert any(relative.match(p) for p in patterns), relative
