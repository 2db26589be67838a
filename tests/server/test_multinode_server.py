"""One replica over two "nodes": two real `kubellm serve` processes on loopback, `--nnodes 2`, node 0 serving the API
and node 1 running the second pipeline stage of the bundled SmolLM2 (gloo on the CPU), joined at node 0's
`--master-addr`/`--master-port` as pods of a group are. Greedy output equals one process; losing either node ends
the other with status 1 within seconds, without a request to notice it."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from server.conftest import BASE_ARGS, MODEL, ServerProcess

from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pair() -> tuple[ServerProcess, ServerProcess]:
    port = str(free_port())
    common = [*BASE_ARGS, "--dtype", "float32", "--pipeline-parallel-size", "2", "--nnodes", "2"]
    common += ["--master-addr", "127.0.0.1", "--master-port", port]
    node1 = ServerProcess([*common, "--node-rank", "1"])
    node0 = ServerProcess([*common, "--node-rank", "0"])
    node1.wait_ready()
    node0.wait_ready()
    return node0, node1


def wait_exit(proc: ServerProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            return proc.proc.returncode
        time.sleep(0.1)
    raise AssertionError(f"still running after {timeout} s:\n{proc.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    node0, node1 = start_pair()
    try:
        yield node0, node1
    finally:
        for proc in (node0, node1):
            proc.stop()
            proc.log_path.unlink(missing_ok=True)


def test_greedy_text_over_two_nodes_equals_one_process(pair: tuple[ServerProcess, ServerProcess]) -> None:
    node0, _ = pair
    llm = LLM(MODEL, dtype="float32", device="cpu", max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    want = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    status, _, raw = node0.request(
        "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    )
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == want


def test_node_1_answers_probes_only(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, node1 = pair
    assert node1.get_status("/health") == 200
    assert node1.get_status("/ready") == 200
    assert node1.get_status("/v1/models") == 404


def test_losing_node_1_ends_node_0_without_a_request(pair: tuple[ServerProcess, ServerProcess]) -> None:
    node0, node1 = pair
    node1.proc.send_signal(signal.SIGKILL)  # its worker sees its parent gone and exits
    assert wait_exit(node0, 60) == 1
    assert "the engine failed" in node0.log_text()


def test_losing_node_0_ends_node_1() -> None:
    node0, node1 = start_pair()
    try:
        node0.proc.send_signal(signal.SIGKILL)
        assert wait_exit(node1, 60) == 1
        assert "exited with code" in node1.log_text()
    finally:
        for proc in (node0, node1):
            proc.stop()
            proc.log_path.unlink(missing_ok=True)
