"""The distribution's layout: the package list in pyproject.toml covers every folder, and the CLI exists."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "kubellm": "kubellm",
    "kubellm.runtime": "runtime",
    "kubellm.operator": "operator",
    "kubellm.gateway": "gateway",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for prefix, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *rel.parts]))
    return found


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == FOLDERS
    assert set(config["packages"]) == _packages_on_disk()


def test_operator_package_does_not_shadow_the_standard_library() -> None:
    import operator

    import kubellm.operator

    assert hasattr(operator, "itemgetter"), operator.__file__
    assert Path(kubellm.operator.__file__).parent == ROOT / "operator"


def test_console_script_lists_its_subcommands() -> None:
    kubellm = Path(sys.executable).parent / "kubellm"
    result = subprocess.run([str(kubellm), "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "generate", "operator", "gateway"):
        assert command in result.stdout
