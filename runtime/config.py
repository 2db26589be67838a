"""Engine configuration: one user-facing dataclass (EngineConfig) and the two resolved pieces the engine hands
to its parts (CacheConfig for the block manager, SchedulerConfig for the scheduler). Each validates itself in
``__post_init__`` and names the offending field in its error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("auto", "none", "int4")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


@dataclass
class EngineConfig:
    """Everything a user may set to run one model. ``None`` means "derive it from the model and the machine"."""

    model: str = "builtin:smollm2-135m-instruct"
    revision: str | None = None  # for hf:// models: a branch, tag or commit (default: main)
    chat_template: str | None = None  # a Jinja chat template file replacing the model's own
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU; on CPU bfloat16 when the CPU has bf16 units
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # KV-cache budget; default: a share of free memory
    num_gpu_blocks: int | None = None  # overrides the budget: exactly this many KV blocks
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    load_format: str = "auto"
    # int4: an int4 weight-only copy of the decoder's linears and an int8 copy of the head (32-column groups) for
    # small batches (CPU; see layers/linear.py and LlamaForCausalLM.quantize_int4).
    # auto: int4 on the CPU when the checkpoint's layers are 4-bit already (GGUF Q4_0/Q4_1), else none.
    quantization: str = "auto"
    seed: int = 0
    # ranks that split each layer (heads, intermediate size, vocabulary): one process per rank, one GPU each
    tensor_parallel_size: int = 1
    # stages holding contiguous layer ranges, activations passed between them (distributed/pipeline.py)
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), "model", "must be a non-empty string")
        _check(
            self.chat_template is None or Path(self.chat_template).is_file(),
            "chat_template",
            f"must be a readable file, got {self.chat_template!r}",
        )
        _check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(
            self.device in DEVICES or self.device.startswith("cuda:"),
            "device",
            f"must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}",
        )
        _check(
            self.max_model_len is None or self.max_model_len >= 2,
            "max_model_len",
            f"must be at least 2, got {self.max_model_len}",
        )
        _check(
            self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
            "block_size",
            f"must be a positive power of two, got {self.block_size}",
        )
        _check(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "kv_cache_memory_bytes",
            f"must be positive, got {self.kv_cache_memory_bytes}",
        )
        _check(
            self.num_gpu_blocks is None or self.num_gpu_blocks >= 1,
            "num_gpu_blocks",
            f"must be at least 1, got {self.num_gpu_blocks}",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be at least 1, got {self.max_num_batched_tokens}",
        )
        _check(
            self.load_format in LOAD_FORMATS,
            "load_format",
            f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}",
        )
        _check(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            f"must be at least 1, got {self.tensor_parallel_size}",
        )
        _check(
            isinstance(self.pipeline_parallel_size, int) and self.pipeline_parallel_size >= 1,
            "pipeline_parallel_size",
            f"must be at least 1, got {self.pipeline_parallel_size}",
        )
        _check(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}",
        )


@dataclass
class CacheConfig:
    """The resolved paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots per layer."""

    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "block_size", f"must be at least 1, got {self.block_size}")
        _check(self.num_blocks >= 1, "num_blocks", f"must be at least 1, got {self.num_blocks}")

    @property
    def num_slots(self) -> int:
        return self.block_size * self.num_blocks


@dataclass
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be at least 1, got {self.max_num_batched_tokens}",
        )
        _check(self.max_model_len >= 2, "max_model_len", f"must be at least 2, got {self.max_model_len}")
