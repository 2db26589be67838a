"""Shared runtime fixtures: the bundled SmolLM2 (its GGUF path, tokenizer, weights, a Hugging Face copy) and tiny
random Hugging Face model directories for each supported architecture.

Names other test files rely on (keep them stable):

- ``smollm2_gguf_path`` (session): the bundled SmolLM2-135M-Instruct Q4_1 GGUF file (``smollm2_path`` is an alias).
- ``smollm2_gguf_file`` (session): that file opened (:class:`GGUFFile`; opening parses the vocabulary: seconds).
- ``smollm2_tokenizer`` (session): its :class:`kubellm.runtime.tokenizer.Tokenizer`.
- ``smollm2_state_dict`` (session): its dequantized float32 weights, Hugging Face names (do not modify them).
- ``smollm2`` (function): a fresh :class:`LoadedModel` over those weights (``weights`` is a new iterator each time).
- ``smollm2_hf_dir`` (session): the same model written as a Hugging Face directory (float32 safetensors,
  tokenizer, chat template) that ``transformers.AutoModelForCausalLM.from_pretrained`` can load as a reference.
- ``tiny_model_dir`` (session factory): ``tiny_model_dir("llama" | "llama3" | "qwen2" | "qwen3" | "mistral",
  dtype="float32", sharded=False, tie_word_embeddings=None) -> Path``: random weights saved with transformers'
  ``save_pretrained``; 2 layers, hidden 64, SmolLM2's real tokenizer (vocab 49152) and chat template, so text
  round-trips. ``"llama"`` carries Llama 3 rope scaling (``rope_type="llama3"``); ``"llama3"`` is an alias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.runtime.models.gguf import GGUFFile, open_gguf
from kubellm.runtime.models.loader import LoadedModel, builtin_model_path, load_gguf_file
from kubellm.runtime.quantization.int4_groups import CodeGroups
from kubellm.runtime.tokenizer import Tokenizer

SMOLLM2 = "builtin:smollm2-135m-instruct"

# Architecture -> (transformers config class name, config fields). Small enough to run in milliseconds on a CPU.
_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 49152,  # SmolLM2's tokenizer
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": ("Qwen2Config", {"rope_theta": 1000000.0, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"rope_theta": 1000000.0, "head_dim": 32, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {"rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False}),
}
TINY_ARCHITECTURES["llama3"] = TINY_ARCHITECTURES["llama"]


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    try:
        return builtin_model_path("smollm2-135m-instruct")
    except FileNotFoundError as e:  # a broken setup must fail loudly, never skip
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_path(smollm2_gguf_path: Path) -> Path:
    return smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_gguf_file(smollm2_gguf_path: Path) -> GGUFFile:
    """The opened GGUF (metadata parsed, tensors memory-mapped): opening it takes seconds, so tests share it."""
    return open_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def _smollm2_meta(smollm2_gguf_file: GGUFFile) -> LoadedModel:
    """Config + tokenizer, no weights read."""
    return load_gguf_file(smollm2_gguf_file, name="smollm2-135m-instruct", dummy=True)


@pytest.fixture(scope="session")
def smollm2_state_dict(smollm2_gguf_file: GGUFFile) -> dict[str, torch.Tensor]:
    loaded = load_gguf_file(smollm2_gguf_file, name="smollm2-135m-instruct", dtype=torch.float32)
    assert loaded.weights is not None
    # the Q8_0 embedding comes as its codes (an int8 head keeps them): as a tensor here, dequantized as gguf does
    return {name: w.dense() if isinstance(w, CodeGroups) else w for name, w in loaded.weights}


@pytest.fixture(scope="session")
def smollm2_tokenizer(_smollm2_meta: LoadedModel) -> Tokenizer:
    assert _smollm2_meta.tokenizer is not None
    return _smollm2_meta.tokenizer


@pytest.fixture
def smollm2(_smollm2_meta: LoadedModel, smollm2_state_dict: dict[str, torch.Tensor]) -> LoadedModel:
    return LoadedModel(
        name=_smollm2_meta.name,
        config=_smollm2_meta.config,
        weights=iter(smollm2_state_dict.items()),
        tokenizer=_smollm2_meta.tokenizer,
        generation_config=dict(_smollm2_meta.generation_config),
        hf_config=dict(_smollm2_meta.hf_config),
    )


@pytest.fixture(scope="session")
def smollm2_hf_dir(
    tmp_path_factory: pytest.TempPathFactory,
    _smollm2_meta: LoadedModel,
    smollm2_state_dict: dict[str, torch.Tensor],
) -> Path:
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("smollm2-hf")
    hf = {**_smollm2_meta.hf_config, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(_smollm2_meta.generation_config, indent=2))
    save_file({k: v.contiguous() for k, v in smollm2_state_dict.items()}, str(directory / "model.safetensors"))
    assert _smollm2_meta.tokenizer is not None
    _smollm2_meta.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def _tokenizer_files_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, _tokenizer_files_dir: Path) -> Callable[..., Path]:
    made: dict[tuple[Any, ...], Path] = {}

    def make(
        arch: str, *, dtype: str = "float32", sharded: bool = False, tie_word_embeddings: bool | None = None
    ) -> Path:
        key = (arch, dtype, sharded, tie_word_embeddings)
        if key in made:
            return made[key]
        if arch not in TINY_ARCHITECTURES:
            raise ValueError(f"tiny_model_dir: unknown arch {arch!r} (known: {', '.join(TINY_ARCHITECTURES)})")
        import transformers

        transformers.utils.logging.disable_progress_bar()
        class_name, fields = TINY_ARCHITECTURES[arch]
        fields = {**_TINY_COMMON, **fields}
        if tie_word_embeddings is not None:
            fields["tie_word_embeddings"] = tie_word_embeddings
        config = getattr(transformers, class_name)(**fields)
        # the same weights every run (tests compare against transformers, not constants), without touching the
        # global RNG other tests draw from
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
            # random init leaves norms at 1.0 and biases at 0; perturb them so that mixing them up is caught
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("norm.weight", ".bias")):
                        param.add_(torch.randn_like(param) * 0.1)
        directory = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}{'-sharded' if sharded else ''}")
        model.save_pretrained(directory, max_shard_size="300KB" if sharded else "2GB")
        model.generation_config.save_pretrained(directory)
        for file in _tokenizer_files_dir.iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
        made[key] = directory
        return directory

    return make
