"""Fixtures for the deployment tests: the real helm binary (see deploy/helmchart.py)."""

from __future__ import annotations

import pytest
from deploy.helmchart import Helm, find_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(find_helm())
