"""Engine configuration: one user-facing dataclass (EngineConfig) and the two resolved pieces the engine hands
to its parts (CacheConfig for the block manager, SchedulerConfig for the scheduler). Each validates itself in
``__post_init__`` and names the offending field in its error.

EngineConfig is the one definition of the engine's settings: each field's metadata (``setting(...)``) carries its
help, choices and flag, and ``add_arguments`` generates the ``kubellm serve`` flags from them; the operator
renders a config file with the same field names (``--config``) and validates it with this same dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
# runtime/quantization/registry.py (the checkpoint formats and the online ones)
QUANTIZATIONS = ("auto", "none", "int4", "awq", "gptq", "compressed-tensors", "int8", "fp8")
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3")  # kernels/kv_quant.py (fp8 = fp8_e4m3, as in vLLM)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    minimum: int | None = 1,
) -> Any:
    """A dataclass field that also describes its command-line flag (``--field-name`` unless `flag` says
    otherwise; a bool defaulting to True becomes ``--no-field-name``). cli=False: config file only. An int flag
    refuses values below ``minimum`` (None: any int)."""
    meta = {
        "help": help, "choices": tuple(choices) if choices else None, "flag": flag, "metavar": metavar, "cli": cli,
        "minimum": minimum,
    }  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """Everything a user may set to run one model. ``None`` means "derive it from the model and the machine"."""

    model: str = setting(
        "builtin:smollm2-135m-instruct",
        "builtin:smollm2-135m-instruct, a Hugging Face model directory, a .gguf file or hf://org/name",
    )
    revision: str | None = setting(None, "for hf:// models: a branch, tag or commit (default: main)")
    chat_template: str | None = setting(None, "a Jinja chat template file replacing the model's own", metavar="PATH")
    served_model_name: str | None = setting(None, "the name clients use in the 'model' field (default: --model)")
    dtype: str = setting(
        "auto", "auto: the checkpoint's dtype on GPU; on CPU bfloat16 when the CPU has bf16 units", choices=DTYPES
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available, else cpu)")
    max_model_len: int | None = setting(None, "context length in tokens (default: the model's)")
    block_size: int = setting(16, "tokens per KV-cache block")
    kv_cache_memory_bytes: int | None = setting(
        None, "KV-cache budget in bytes (default: derived from free memory)", flag="--kv-cache-memory", metavar="BYTES"
    )
    num_gpu_blocks: int | None = setting(None, "exactly this many KV blocks (overrides the budget)", cli=False)
    kv_cache_dtype: str = setting(
        "auto",
        "auto: the model's dtype; int8 or fp8 (= fp8_e4m3): one-byte codes with per-layer K and V scales "
        "calibrated at start-up, twice the blocks of bf16 for the same memory",
        choices=KV_CACHE_DTYPES,
    )
    gpu_memory_utilization: float = setting(0.9, "share of GPU memory the runtime may use")
    max_num_seqs: int = setting(256, "sequences in a batch at most")
    max_num_batched_tokens: int = setting(2048, "tokens per step at most")
    enable_prefix_caching: bool = setting(True, "turn the prefix cache off")
    enforce_eager: bool = setting(False, "no CUDA graphs / compilation")
    load_format: str = setting("auto", "dummy: random weights of the model's shapes", choices=LOAD_FORMATS, cli=False)
    # the decoder linears' weight format (runtime/quantization/): int4 (CPU, quantized at load, and an int8 copy of
    # the head for small batches), awq / gptq / compressed-tensors / fp8 (the checkpoint's, from its
    # quantization_config), int8 / fp8 over a float checkpoint (per output channel, quantized at load)
    quantization: str = setting(
        "auto",
        "auto: the checkpoint's quantization_config (awq, gptq, compressed-tensors, fp8), else int4 for a "
        "Q4_0/Q4_1 GGUF on an AVX-512 CPU; int4: int4 weight-only linears and an int8 head (CPU); int8 / fp8 over "
        "a float checkpoint: per-channel 8-bit weights quantized at load",
        choices=QUANTIZATIONS,
    )
    seed: int = setting(0, "the engine's seed for unseeded requests", minimum=None)
    tensor_parallel_size: int = setting(
        1,
        "ranks splitting each layer (heads, intermediate size, vocabulary): one process per rank, one GPU each "
        "(gloo on the CPU)",
    )
    pipeline_parallel_size: int = setting(
        1, "stages holding contiguous layer ranges (each stage --tensor-parallel-size ranks)"
    )
    # one replica over several nodes (pods): the ranks split evenly, node k holding ranks [k*L, (k+1)*L)
    nnodes: int = setting(1, "nodes (pods) one replica spans; node 0 runs the engine and serves the API")
    node_rank: int = setting(
        0, "this node's index in [0, nnodes): nodes above 0 run only their ranks' workers", minimum=0
    )
    master_addr: str | None = setting(None, "node 0's address: the torch.distributed rendezvous when nnodes > 1")
    master_port: int = setting(29500, "node 0's rendezvous port when nnodes > 1")
    speculative_config: dict[str, Any] | None = setting(  # noqa: RUF009 (the default is None, never shared)
        None,
        "speculative decoding, JSON with vLLM's keys: method (ngram: prompt lookup; suffix: also the tokens of recent "
        "requests, suffix_decoding_max_cached_requests of them, default 1000; draft_model: a smaller model with the "
        "same tokenizer, given as model, proposes greedily), num_speculative_tokens (3), "
        "prompt_lookup_min (2), prompt_lookup_max (4), disable_by_batch_size (4: no drafts above that many running "
        "sequences; null: never)",
        metavar="JSON",
    )

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
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}",
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
        self._check_nodes()
        if self.speculative_config is not None:
            from .spec_decode.config import SpeculativeConfig

            spec = SpeculativeConfig.from_dict(self.speculative_config)  # raises ValueError naming the key
            # the draft model would need its own sharded runner on every rank: not built yet
            _check(
                spec.method != "draft_model" or self.tensor_parallel_size * self.pipeline_parallel_size == 1,
                "speculative_config.method",
                "draft_model does not support tensor_parallel_size or pipeline_parallel_size > 1 yet",
            )
        _check(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}",
        )

    def _check_nodes(self) -> None:
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        _check(isinstance(self.nnodes, int) and self.nnodes >= 1, "nnodes", f"must be at least 1, got {self.nnodes}")
        _check(
            world % self.nnodes == 0,
            "nnodes",
            f"({self.nnodes}) must divide tensor_parallel_size x pipeline_parallel_size ({world}): each node holds "
            "as many ranks",
        )
        _check(
            isinstance(self.node_rank, int) and 0 <= self.node_rank < self.nnodes,
            "node_rank",
            f"must be in [0, nnodes = {self.nnodes}), got {self.node_rank}",
        )
        _check(self.nnodes == 1 or bool(self.master_addr), "master_addr", "is needed when nnodes > 1")
        _check(0 < self.master_port < 65536, "master_port", f"must be in [1, 65535], got {self.master_port}")

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        """The context a replica serves: the setting, else the model's; never past the model's."""
        resolved = self.max_model_len or max_position_embeddings
        if resolved > max_position_embeddings:
            raise ValueError(
                f"max_model_len ({resolved}) exceeds the model's max_position_embeddings ({max_position_embeddings})"
            )
        return resolved

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)


@dataclass
class CacheConfig:
    """The resolved paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots per layer."""

    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype, as vllm:cache_config_info reports it

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


# ---- the command line and the config file, generated from the fields ----


def _scalar_type(cls: type, name: str) -> type:
    """int / float / str / bool of a field, from its annotation (they are strings under postponed evaluation)."""
    annotation = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if annotation.startswith("dict"):
        return dict
    for kind in (bool, int, float, str):
        if kind.__name__ in annotation.replace(" ", "").split("|"):
            return kind
    raise TypeError(f"{cls.__name__}.{name}: unsupported type {annotation}")


def flag_name(f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("flag"):
        return str(f.metadata["flag"])
    if _scalar_type(EngineConfig, f.name) is bool and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def dest_name(f: dataclasses.Field[Any]) -> str:
    """The argparse dest of a field's flag: the field name, or the name its own flag spells (--kv-cache-memory)."""
    flag = f.metadata.get("flag")
    return str(flag).removeprefix("--").replace("-", "_") if flag else f.name


def cli_fields(exclude: Sequence[str] = ()) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("cli", True) and f.name not in exclude]


def add_arguments(group: Any, exclude: Sequence[str] = ()) -> None:
    """One flag per EngineConfig field with cli=True: help, default and choices from its metadata."""
    for f in cli_fields(exclude):
        kind = _scalar_type(EngineConfig, f.name)
        kw: dict[str, Any] = {"dest": dest_name(f), "default": f.default}
        help_text = str(f.metadata.get("help", ""))
        if kind is bool:
            kw["action"] = "store_false" if f.default is True else "store_true"
        else:
            minimum = f.metadata.get("minimum", 1)
            if kind is dict:
                kw["type"] = _json_object
            elif kind is int and minimum is not None:
                kw["type"] = _at_least(minimum)
            else:
                kw["type"] = kind
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            help_text += f" (default: {f.default})" if f.default is not None else ""
        group.add_argument(flag_name(f), help=help_text, **kw)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its error message
    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def given(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The engine settings the command line sets, by field name: those whose flag's value is not the default."""
    out = {}
    for f in cli_fields(exclude):
        value = getattr(args, dest_name(f), f.default)
        if value != f.default:
            out[f.name] = value
    return out


def engine_config(values: dict[str, Any]) -> EngineConfig:
    """An EngineConfig from a config file's and the flags' values; a key that is no field is an error naming it."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown engine setting(s): {', '.join(unknown)}")
    return EngineConfig(**values)
