"""Small process and waiting helpers shared by the e2e harness."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every process the harness starts carries this variable (value: the run's tag), so that a leak check can find
# them in /proc even if their Popen handles were lost.
MARK_ENV = "KUBELLM_E2E_RUN"


def die_with_parent() -> None:
    """preexec_fn: if the test process dies without tearing down, the kernel kills the child (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy and return its value; AssertionError naming `what` after `timeout` s.
    An exception from the predicate fails at once (the harness' predicates do not raise while things start)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def marked_processes(tag: str) -> list[int]:
    """Live pids whose environment has MARK_ENV set to `tag` or to a tag starting with `tag-` (zombies excluded:
    they hold no memory and no port)."""
    exact, prefix = f"{MARK_ENV}={tag}".encode(), f"{MARK_ENV}={tag}-".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
            if not any(v == exact or v.startswith(prefix) for v in variables):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found
