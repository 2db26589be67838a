"""The gateway tests reuse the e2e harness' fixtures (the operator subprocess, the process leak check) and the
deployment tests' helm."""

from deploy.conftest import helm
from e2e.conftest import e2e_operator, run_tag

__all__ = ["e2e_operator", "helm", "run_tag"]
