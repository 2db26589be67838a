"""A real `kubellm serve --tensor-parallel-size 3` (the bundled SmolLM2: 9 heads, 3 KV heads; gloo on the CPU):
the `openai` client tests of test_openai_client.py run against it, and a killed worker takes the server down.

The module's own ``server`` fixture replaces the session one for the tests imported here; the kill test comes
last (file order) because it ends that server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.conftest import BASE_ARGS, ServerProcess
from server.test_openai_client import (  # noqa: F401 (fixtures and tests collected in this module)
    aclient,
    client,
    test_async_client_chat_and_completion_concurrently,
    test_bad_parameter_is_a_400_naming_the_field,
    test_chat_logprobs,
    test_chat_non_streaming_usage_matches_tokenizer,
    test_chat_streaming_matches_non_streaming_greedy,
    test_completion_streaming,
    test_completion_usage_and_greedy_text_match_tokenizer,
    test_models,
    test_seed_gives_identical_outputs,
    test_stop_string_cuts_the_output,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([*BASE_ARGS, "--max-num-seqs", "16", "--tensor-parallel-size", "3"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)


def worker_pids(pid: int) -> list[int]:
    """The server's spawned tensor-parallel workers (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_zz_a_killed_worker_takes_the_server_down(server: ServerProcess) -> None:
    workers = worker_pids(server.proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.proc.returncode not in (None, 0), "the server kept running (or exited 0) without its worker"
    log = server.log_text()
    assert "tensor-parallel worker rank" in log and "exited with code -9" in log, log[-3000:]
    # the other worker follows its parent
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() for p in workers[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}/cmdline").exists() and Path(f"/proc/{p}/cmdline").read_bytes() for p in workers[1:])
