"""The gateway tests reuse the e2e harness: its fixtures (the operator subprocess, the process leak check)."""

from e2e.conftest import e2e_operator, run_tag

__all__ = ["e2e_operator", "run_tag"]
