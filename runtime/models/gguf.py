"""Reading a GGUF file (llama.cpp's format) into what the rest of the runtime speaks: a Hugging Face config dict
and weights with Hugging Face names and layouts (its tokenizer: gguf_tokenizer.py).

GGUF stores tensor shapes fastest-dimension first (``[in_features, out_features]``); ``GGUFReader`` already hands
the data over in numpy (row-major) order, so a dequantized weight reshaped to ``reversed(shape)`` is
``[out_features, in_features]`` like ``nn.Linear.weight``.

llama.cpp's converter permutes the rows of the Q and K projections of llama-architecture models so that rotary
embedding pairs dimensions ``(2i, 2i+1)`` (GPT-J style) instead of ``(i, i + head_dim/2)`` (Hugging Face's
``rotate_half``). :func:`unpermute_qk` undoes that so that the weights match the Hugging Face checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..quantization.int4_groups import INT4_GROUP_FORMATS, Int4Groups
from ..quantization.int8_groups import INT8_GROUP_FORMATS, Int8Groups
from .gguf_blocks import GGUFError, decode_q4_k, decode_q5_k, decode_q6_k, dequantize_tensor

# GGUF architecture -> Hugging Face model_type. Mistral GGUFs say "llama".
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose Q/K rows llama.cpp's converter permutes (the GPT-J rotary convention).
PERMUTED_QK_ARCHITECTURES = {"llama", "mistral"}


@dataclass
class GGUFFile:
    """An opened GGUF file: its metadata (key -> python value) and its tensors (memory-mapped, not yet read)."""

    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def open_gguf(path: str | Path) -> GGUFFile:
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises bare ValueError/struct errors on garbage
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception:  # an exotic value type we never read; keep going
            continue
    # the reader's fields hold a numpy view per element of each array (two per token string: ~170 MiB for a 49k
    # vocabulary with its merges) for as long as the file is open, i.e. the whole load; metadata has their values
    reader.fields.clear()
    return GGUFFile(path=path, metadata=metadata, reader=reader)


# --------------------------------------------------------------------------------------------------- config


def gguf_to_hf_config(f: GGUFFile) -> dict[str, Any]:
    """GGUF metadata -> a Hugging Face ``config.json`` dict (what :meth:`ModelConfig.from_hf_config` reads)."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{f.path}: general.architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in f.metadata:
            raise GGUFError(f"{f.path}: metadata key {full!r} is missing")
        return f.metadata[full]

    num_heads = int(need("attention.head_count"))
    hidden_size = int(need("embedding_length"))
    tokens = f.get("tokenizer.ggml.tokens")
    vocab_size = f.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab_size is None:
        token_embd = _tensor_by_name(f).get("token_embd.weight")
        if token_embd is None:
            raise GGUFError(f"{f.path}: cannot tell the vocabulary size ({arch}.vocab_size and tokens are missing)")
        vocab_size = int(token_embd.shape[-1])
    tensor_names = set(_tensor_by_name(f))
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [_HF_ARCHITECTURE_CLASSES[ARCHITECTURES[arch]]],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv") or num_heads),
        "head_dim": int(f.get(f"{arch}.attention.key_length") or hidden_size // num_heads),
        "rms_norm_eps": _float32_value(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_value(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "torch_dtype": _file_dtype_name(f),
    }
    scaling_type = f.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling: dict[str, Any] = {"rope_type": str(scaling_type)}
        if f.get(f"{arch}.rope.scaling.factor") is not None:
            scaling["factor"] = float(f.get(f"{arch}.rope.scaling.factor"))
        if f.get(f"{arch}.rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(f.get(f"{arch}.rope.scaling.original_context_length"))
        hf["rope_scaling"] = scaling
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp bakes Llama 3.1's rope scaling into per-dimension frequency divisors; recover the parameters
        freqs = _tensor_by_name(f)["rope_freqs.weight"]
        divisors = dequantize_tensor(np.asarray(freqs.data), freqs.tensor_type.name, (int(freqs.n_elements),))
        hf["rope_scaling"] = llama3_rope_scaling_from_factors(
            divisors, hf["rope_theta"], hf["head_dim"], f"{f.path}: rope_freqs.weight"
        )
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        value = f.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            hf[hf_key] = int(value)
    eos_ids = gguf_eos_token_ids(f)
    if eos_ids:
        hf["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return hf


def _float32_value(value: Any) -> float:
    """GGUF stores these as float32: 9.999999747378752e-06 is the float32 nearest 1e-05, which the checkpoint
    said. Give back the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def llama3_rope_frequency_divisors(
    rope_theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> torch.Tensor:
    """Per rotary pair, what Llama 3 rope scaling divides the frequency by: 1 for short wavelengths, ``factor``
    for long ones, a smooth blend between. ``[head_dim // 2]`` float64."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < original / high_freq_factor, torch.ones_like(inv_freq), blended)
    return torch.where(wavelen > original / low_freq_factor, torch.full_like(inv_freq, factor), divisors)


def llama3_rope_scaling_from_factors(
    divisors: torch.Tensor, rope_theta: float, head_dim: int, where: str
) -> dict[str, Any]:
    """Find the Llama 3 rope-scaling parameters that produce ``divisors`` (llama.cpp's ``rope_freqs``), among the
    values Llama 3.x releases use; a clear error for anything else."""
    divisors = divisors.to(torch.float64)
    factor = float(divisors.max())
    for low in (1.0, 2.0):
        for high in (4.0, 2.0, 8.0):
            for exponent in range(7, 18):  # original context 128 .. 131072
                original = 2**exponent
                expected = llama3_rope_frequency_divisors(rope_theta, head_dim, factor, low, high, original)
                if expected.shape == divisors.shape and torch.allclose(expected, divisors, rtol=1e-4):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": original,
                    }
    raise GGUFError(f"{where}: frequency factors do not match any Llama 3 rope scaling; not supported")


_HF_ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_eos_token_ids(f: GGUFFile) -> list[int]:
    """End-of-sequence ids: eos plus end-of-turn / end-of-message where the file names them (Llama 3 chats end with
    ``<|eot_id|>``)."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = f.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _file_dtype_name(f: GGUFFile) -> str:
    """The dtype of most 2-D tensors, by name; block formats say bfloat16 (what the engine computes in)."""
    counts: dict[str, int] = {}
    for t in f.reader.tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    main = max(counts, key=lambda k: counts[k]) if counts else "F32"
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(main, "bfloat16")


def _tensor_by_name(f: GGUFFile) -> dict[str, Any]:
    return {t.name: t for t in f.reader.tensors}


# -------------------------------------------------------------------------------------------------- weights

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """A GGUF tensor name -> its Hugging Face parameter name; None for tensors with no HF counterpart
    (``rope_freqs.weight``)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a Q or K projection (weight ``[num_heads * head_dim, in]`` or bias
    ``[num_heads * head_dim]``).

    The converter reshaped each head's rows as ``[2, head_dim/2]`` and transposed to ``[head_dim/2, 2]``
    (interleaving the two rotary halves); we reshape as ``[head_dim/2, 2]`` and transpose back.
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(
    f: GGUFFile, hf_config: dict[str, Any], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor | Int4Groups | Int8Groups]]:
    """Yield ``(hf_name, tensor)`` one tensor at a time, dequantized (the file stays memory-mapped), except the
    decoder linears stored as K-quants: Q4_K ones come as :class:`Int4Groups`, Q5_K / Q6_K ones as
    :class:`Int8Groups` (the file's codes and scales), which a K-quant layer keeps as they are and any other layer
    dequantizes (``.dense``); a Q8_0 embedding / head also comes as int8 groups, which an int8 head keeps."""
    permute = f.architecture in PERMUTED_QK_ARCHITECTURES
    num_heads = int(hf_config["num_attention_heads"])
    num_kv_heads = int(hf_config["num_key_value_heads"])
    for t in f.reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        tensor: torch.Tensor | Int4Groups | Int8Groups
        decoder_matrix = name.startswith("model.layers.") and len(shape) == 2
        if t.tensor_type.name in INT4_GROUP_FORMATS and decoder_matrix:
            tensor = int4_groups_of(np.asarray(t.data), shape)
        elif t.tensor_type.name in INT8_GROUP_FORMATS and decoder_matrix:
            tensor = int8_groups_of(np.asarray(t.data), t.tensor_type.name, shape)
        elif t.tensor_type.name == "Q8_0" and name in VOCAB_MATRICES:  # an int8 head keeps these codes as they are
            tensor = q8_0_groups_of(np.asarray(t.data), shape)
        else:
            tensor = dequantize_tensor(np.asarray(t.data), t.tensor_type.name, shape)
        heads = num_heads if "q_proj." in name else num_kv_heads if "k_proj." in name else 0
        if permute and heads:
            tensor = _unpermute(tensor, heads)
        if isinstance(tensor, torch.Tensor) and dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


def _unpermute(
    tensor: torch.Tensor | Int4Groups | Int8Groups, num_heads: int
) -> torch.Tensor | Int4Groups | Int8Groups:
    if isinstance(tensor, (Int4Groups, Int8Groups)):  # the rows of its codes, scales and minimums alike
        return tensor.map_rows(lambda w: unpermute_qk(w, num_heads))
    return unpermute_qk(tensor, num_heads)


def int4_groups_of(data: np.ndarray, shape: tuple[int, ...]) -> Int4Groups:
    """A Q4_K matrix ``[N, K]`` -> its codes and per-32-column scales and minimums, as the file has them."""
    n, k = shape
    codes, scale, minimum = decode_q4_k(data)
    return Int4Groups(codes.reshape(n, k), scale.reshape(n, k // 32), minimum.reshape(n, k // 32))


VOCAB_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")


def q8_0_groups_of(data: np.ndarray, shape: tuple[int, ...]) -> Int8Groups:
    """A Q8_0 matrix ``[N, K]`` -> its int8 codes and per-32-column scales ``d``: ``dense()`` is ``d * q`` as the
    reference dequantizes it, bit for bit."""
    n, k = shape
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(-1, 34)
    scale = raw[:, 0:2].contiguous().view(torch.float16).to(torch.float32).reshape(n, k // 32)
    codes = raw[:, 2:34].contiguous().view(torch.int8).reshape(n, k)
    return Int8Groups(codes, scale, None, 32)


def int8_groups_of(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> Int8Groups:
    """A Q6_K matrix ``[N, K]`` -> int8 codes -32..31 with a scale per 16 columns; a Q5_K one -> codes 0..31 with a
    scale and an offset (``-dmin * m``) per 32 columns: the file's numbers, as :mod:`gguf_blocks` decodes them."""
    n, k = shape
    group_size = INT8_GROUP_FORMATS[type_name]
    if type_name == "Q6_K":
        codes, scale = decode_q6_k(data)
        return Int8Groups(codes.reshape(n, k), scale.reshape(n, k // group_size), None, group_size)
    codes5, scale, minimum = decode_q5_k(data)
    offset = minimum.reshape(n, k // group_size)
    return Int8Groups(codes5.reshape(n, k).view(torch.int8), scale.reshape(n, k // group_size), offset, group_size)
