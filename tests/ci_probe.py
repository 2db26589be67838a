"""One test run in a subprocess, with and without CI=true: how the CI-rule tests (tests/conftest.py) watch a test
whose parts are missing skip on a developer's machine and fail in CI (imported as ``ci_probe``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_probe(probe: str, ci: str | None, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``probe`` (a test id), CI unset or set to ``ci``, the environment changed by ``env_overrides``."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(env_overrides)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-P", "-m", "pytest", probe, "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
