"""Model sources beyond local paths: hf://org/name through the Hub cache, file:// URIs, and a chat-template override.

The Hub itself is out of reach here, so the hf:// test runs a fresh process the way a pod does (HF_HOME set,
here also HF_HUB_OFFLINE=1) over a Hub cache laid out as huggingface_hub writes it: refs/<branch> naming a
commit, snapshots/<commit>/ holding the files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubellm.runtime.llm import LLM
from kubellm.runtime.models.loader import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache_with(model_dir: Path, hf_home: Path, repo: str, branch: str = "main") -> None:
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / branch).write_text(COMMIT)


def _load_in_pod_like_process(source: str, hf_home: Path, revision: str | None = None) -> dict[str, Any]:
    code = (
        "import json, sys; from kubellm.runtime.models.loader import load_model; "
        "m = load_model(sys.argv[1], revision=sys.argv[2] or None); "
        "print(json.dumps({'layers': m.config.num_hidden_layers, 'tensors': sum(1 for _ in m.weights), "
        "'vocab': m.tokenizer.vocab_size}))"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, source, revision or ""], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_hf_source_loads_from_the_hub_cache_by_branch_and_by_commit(tiny_model_dir: Any, tmp_path: Path) -> None:
    model_dir = tiny_model_dir("qwen2")
    _hub_cache_with(model_dir, tmp_path, "acme/tiny-qwen2")
    local = load_model(str(model_dir))
    expected = {
        "layers": local.config.num_hidden_layers,
        "tensors": sum(1 for _ in local.weights or ()),
        "vocab": local.tokenizer.vocab_size if local.tokenizer else None,
    }
    assert _load_in_pod_like_process("hf://acme/tiny-qwen2", tmp_path) == expected
    assert _load_in_pod_like_process("hf://acme/tiny-qwen2", tmp_path, revision=COMMIT) == expected


def test_hf_source_that_is_not_cached_offline_fails_with_the_repository_named(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    code = "from kubellm.runtime.models.loader import load_model; load_model('hf://acme/absent')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "acme/absent" in result.stderr


@pytest.mark.parametrize("source", ["hf://just-a-name", "hf://a/b/c", "hf:///name"])
def test_malformed_hf_source_is_refused(source: str) -> None:
    with pytest.raises(ValueError, match="hf://org/name"):
        load_model(source)


def test_revision_is_refused_for_local_models(smollm2_gguf_path: Path) -> None:
    with pytest.raises(ValueError, match="revision"):
        load_model(str(smollm2_gguf_path), revision="main")


def test_file_uri_is_the_plain_path(tiny_model_dir: Any) -> None:
    model_dir = tiny_model_dir("llama")
    assert load_model(f"file://{model_dir}").config == load_model(str(model_dir)).config


def test_chat_template_file_replaces_the_models_own(tmp_path: Path) -> None:
    template = tmp_path / "chat_template.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    llm = LLM(chat_template=str(template), kv_cache_memory_bytes=16 << 20)
    tokenizer = llm.engine.tokenizer
    assert tokenizer is not None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "[USER] hi\n[ASSISTANT]"


def test_missing_chat_template_file_is_named() -> None:
    with pytest.raises(ValueError, match="chat_template"):
        LLM(chat_template="/nonexistent/template.jinja")
