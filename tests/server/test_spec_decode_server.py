"""Speculative decoding over HTTP: `--speculative-config` streams the same text as the plain server (the openai
client, greedy), with prompt lookup and with a draft model, and /metrics carries vLLM's spec_decode counters."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import MODEL, SERVED_NAME, ServerProcess

PASSAGE = (
    "The river runs through the valley, past the old mill and the stone bridge, until it reaches the sea. "
    "Fishermen gather at dawn on its banks, mending nets and telling stories of storms long past."
)
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "disable_by_batch_size": None}


def stream_texts(proc: ServerProcess) -> list[str]:
    client = openai.OpenAI(base_url=proc.url("/v1"), api_key="unused", max_retries=0, timeout=300)
    texts = []
    for content, max_tokens in ((f"Repeat this passage word for word: {PASSAGE}", 32), ("Name three colours.", 10)):
        kwargs: dict[str, Any] = {"model": SERVED_NAME, "max_tokens": max_tokens, "temperature": 0}
        stream = client.chat.completions.create(**kwargs, messages=[{"role": "user", "content": content}], stream=True)
        texts.append("".join(c.delta.content or "" for chunk in stream for c in chunk.choices))
    stream = client.completions.create(**kwargs, prompt=f"{PASSAGE}\n\nThe same again: {PASSAGE[:40]}", stream=True)
    texts.append("".join(c.text for chunk in stream for c in chunk.choices))
    return texts


@pytest.mark.slow
def test_streaming_with_speculation_is_the_same_text(
    server: ServerProcess, spawn_server: Callable[..., ServerProcess]
) -> None:
    plain = stream_texts(server)
    spec_server = spawn_server("--speculative-config", json.dumps(SPEC))
    assert stream_texts(spec_server) == plain
    assert "stone bridge" in plain[0]  # the passage really was copied (where speculation pays)
    metrics = spec_server.metrics()
    accepted = metrics["vllm:spec_decode_num_accepted_tokens_total"][0][1]
    drafted = metrics["vllm:spec_decode_num_draft_tokens_total"][0][1]
    assert 0 < accepted <= drafted
    assert metrics["vllm:spec_decode_num_drafts_total"][0][1] > 0
    per_pos = {labels["position"]: v for labels, v in metrics["vllm:spec_decode_num_accepted_tokens_per_pos_total"]}
    assert sorted(per_pos) == ["0", "1", "2", "3"] and sum(per_pos.values()) == accepted
    assert "vllm:spec_decode_num_drafts_total" not in server.metrics()  # off: not reported


@pytest.mark.slow
def test_streaming_with_a_draft_model_is_the_same_text(
    server: ServerProcess, spawn_server: Callable[..., ServerProcess]
) -> None:
    """The served model as its own draft (the registries carry no smaller SmolLM2): every guess is its own argmax,
    so the text is the same and nearly every draft is accepted."""
    plain = stream_texts(server)
    spec = {"method": "draft_model", "model": MODEL, "num_speculative_tokens": 2, "disable_by_batch_size": None}
    spec_server = spawn_server("--speculative-config", json.dumps(spec))
    assert stream_texts(spec_server) == plain
    metrics = spec_server.metrics()
    accepted = metrics["vllm:spec_decode_num_accepted_tokens_total"][0][1]
    drafted = metrics["vllm:spec_decode_num_draft_tokens_total"][0][1]
    assert 0.8 * drafted <= accepted <= drafted, (accepted, drafted)


def test_a_bad_speculative_config_is_refused_at_start(spawn_server: Callable[..., ServerProcess]) -> None:
    proc = ServerProcess(["--speculative-config", '{"method": "ngram", "lookahead": 3}'])
    status = proc.proc.wait(timeout=120)
    log = proc.log_text()
    proc.log_path.unlink(missing_ok=True)
    assert status != 0 and "lookahead" in log, log[-2000:]


def test_a_draft_model_that_is_not_there_is_refused_at_start(tmp_path: Path) -> None:
    spec = {"method": "draft_model", "model": str(tmp_path / "no-such-draft")}
    proc = ServerProcess(["--speculative-config", json.dumps(spec)])
    status = proc.proc.wait(timeout=120)
    log = proc.log_text()
    proc.log_path.unlink(missing_ok=True)
    assert status != 0 and "speculative_config.model" in log and "no-such-draft" in log, log[-2000:]
