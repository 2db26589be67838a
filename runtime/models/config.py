"""The architecture of a Llama-family decoder, read from a Hugging Face ``config.json`` dict.

One dataclass covers Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (QKV bias), Qwen3 (per-head
q/k RMSNorm) and SmolLM2. The GGUF loader builds the same dict from GGUF metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2; Llama's `attention_bias`)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"  # the checkpoint's dtype, as a name

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a ``config.json`` dict (transformers 4 or 5: rope settings under ``rope_theta``/``rope_scaling``
        or under ``rope_parameters``). A missing or mistyped field raises ``ValueError`` naming it."""
        if not isinstance(hf, dict):
            raise ValueError(f"config must be a JSON object, got {type(hf).__name__}")

        def need_int(key: str) -> int:
            value = hf.get(key)
            if value is None:
                raise ValueError(f"config field {key!r} is missing")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {key!r} must be a positive integer, got {value!r}")
            return value

        model_type = hf.get("model_type", "llama")
        num_heads = need_int("num_attention_heads")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_theta, rope_scaling = _rope_settings(hf)
        return cls(
            model_type=model_type,
            vocab_size=need_int("vocab_size"),
            hidden_size=need_int("hidden_size"),
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or need_int("hidden_size") // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
        )


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either layout; rope_scaling is None for plain RoPE and otherwise carries
    ``rope_type`` (``"llama3"``, ``"linear"``, ``"dynamic"``, ``"yarn"``...) plus that type's parameters."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        # transformers 5: {"rope_type": ..., "rope_theta": ..., **scaling}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"config field 'rope_scaling' must be an object, got {scaling!r}")
    if scaling:
        scaling = dict(scaling)
        # transformers 4 wrote "type" in older configs
        rope_type = scaling.pop("type", None)
        scaling["rope_type"] = scaling.get("rope_type") or rope_type or "default"
        if scaling["rope_type"] == "default":
            scaling = None
    else:
        scaling = None
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise ValueError(f"config field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta), scaling
