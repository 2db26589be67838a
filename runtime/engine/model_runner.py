"""ModelRunner: owns the device, the dtype, the model and its paged KV cache; turns a scheduled batch into one
forward pass.

At construction it resolves the device and dtype, picks the device's attention backend (once), builds the model
straight into its dtype on its device (models/build.py), prepares the CPU's weight copies (oneDNN packing, int4),
sizes the KV cache (a profiling pass on a GPU) and allocates it, and captures decode CUDA graphs where the backend
allows. Per step it builds, once, the flat token batch (decodes first, then prefill chunks) and the attention
metadata every layer shares, runs the model, and returns float32 logits for the sequences that sample this step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..config import CacheConfig, EngineConfig
from ..kernels import cpu
from ..kernels.dispatch import get_attention_backend
from ..kernels.interface import AttentionMetadata
from ..models.build import build_model
from . import cuda_graphs
from .scheduler import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:
    from ..models.loader import LoadedModel

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32
# kept free on a GPU besides the profiled activations: the CUDA-graph pool and allocator fragmentation
GPU_RESERVE_BYTES = 256 << 20
FOUR_BIT_FORMATS = frozenset({"Q4_0", "Q4_1"})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu.cpu_flags())


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        # A decode step reads every weight once, so half the bytes is about twice the speed (SmolLM2, one stream,
        # 2-core EPYC, quiet machine: 37 vs 18 tok/s), but only where the CPU has bf16 units; elsewhere bf16 is
        # emulated. (An earlier measurement that found bf16 no faster was taken with the cores oversubscribed.)
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"float16": torch.float16, "float32": torch.bfloat16}.get(checkpoint_dtype, torch.bfloat16)


def resolve_quantization(quantization: str, device: torch.device, weight_formats: frozenset[str]) -> str:
    """ "auto" -> "int4" on the CPU for a checkpoint whose layers are 4-bit already (nothing is lost), else "none"."""
    if quantization == "int4" and device.type != "cpu":
        raise ValueError(f"quantization int4 is a CPU path (torch's CPU int4 kernel); the device is {device.type}")
    if quantization == "auto":
        four_bit = bool(weight_formats) and weight_formats <= FOUR_BIT_FORMATS
        return "int4" if device.type == "cpu" and four_bit else "none"
    return quantization


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, *, max_model_len: int) -> None:
        """``loaded``: the checkpoint (its weights iterator is consumed here); ``max_model_len``: resolved by the
        engine (the longest sequence a step may hold)."""
        self.config = config
        self.max_model_len = max_model_len
        mc = loaded.config
        self.device = device = resolve_device(config.device)
        self.dtype = dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        self.backend = get_attention_backend(device)
        self.model = build_model(mc, loaded.weights, backend=self.backend, device=device, dtype=dtype, seed=config.seed)
        self.quantization = resolve_quantization(config.quantization, device, loaded.weight_formats)
        if self.quantization == "int4":
            self.model.quantize_int4()
        if device.type == "cpu":
            self.model.pack_for_cpu()

        bytes_per_block = kv_cache_bytes_per_block(
            mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype
        )
        num_blocks = config.num_gpu_blocks or max(1, self._kv_cache_budget() // bytes_per_block)
        self.cache_config = CacheConfig(config.block_size, num_blocks, config.enable_prefix_caching)
        # one kv_cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [
            torch.zeros(
                2, num_blocks, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype=dtype, device=device
            )
            for _ in range(mc.num_hidden_layers)
        ]
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        if device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

    def _kv_cache_budget(self) -> int:
        config = self.config
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_CACHE_BYTES
        # a profiling pass: the largest step the scheduler can build, for its activation peak
        activations = cuda_graphs.profile_activation_bytes(
            self.model,
            num_tokens=min(config.max_num_batched_tokens, self.max_model_len * config.max_num_seqs),
            max_model_len=self.max_model_len,
            num_logits=config.max_num_seqs,
            block_size=config.block_size,
        )
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # the weights, the CUDA context, other processes
        budget = int(total * config.gpu_memory_utilization) - used - activations - GPU_RESERVE_BYTES
        logger.info(
            "GPU memory: %.1f GiB total, %.1f GiB in use, %.2f GiB peak activations: %.1f GiB for the KV cache",
            total / 2**30, used / 2**30, activations / 2**30, max(budget, 0) / 2**30,
        )  # fmt: skip
        return max(0, budget)

    def _capture_graphs(self) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                self.graphs = cuda_graphs.DecodeGraphs(
                    self.model,
                    self.kv_caches,
                    sizes=cuda_graphs.capture_sizes(self.config.max_num_seqs),
                    max_blocks_per_seq=-(-self.max_model_len // self.cache_config.block_size),
                    max_seq_len=self.max_model_len,
                    device=self.device,
                    graph_factory=cuda_graphs.CudaGraph,
                )
        except (RuntimeError, ValueError) as e:  # serve eager rather than not at all
            logger.warning("decode CUDA graphs could not be captured (%s): running eager", e)
        else:
            logger.info(
                "captured decode CUDA graphs for %d batch sizes in %.1f s",
                len(self.graphs.sizes),
                time.perf_counter() - started,
            )

    def _prepare(self, items: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.cache_config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        block_tables: list[list[int]] = []
        for s in items:
            seq, start, end = s.seq, s.start, s.start + s.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
            block_tables.append(table)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_new_tokens for s in items),
            max_seq_len=max(seq_lens),
            num_decode_tokens=sum(1 for s in items if s.num_new_tokens == 1),
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=query_start_loc,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, md

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Run one step. Returns (logits [num_sampling, vocab] float32, the sampling sequences in row order)."""
        # decodes (one new token) first: the attention backends batch them together
        items = sorted(batch.scheduled, key=lambda s: s.num_new_tokens != 1)
        graphs = self.graphs
        if graphs is not None and len(items) <= graphs.max_batch_size and items[-1].num_new_tokens == 1:
            hidden = self._replay_decode(graphs, items)
            last = [i for i, s in enumerate(items) if s.samples]
        else:
            input_ids, positions, md = self._prepare(items)
            hidden = self.model(input_ids, positions, self.kv_caches, md)  # [T, H]
            last = [md.query_start_loc_cpu[i + 1] - 1 for i, s in enumerate(items) if s.samples]
        sampling = [s for s in items if s.samples]
        if not sampling:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32), []
        rows = torch.tensor(last, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden[rows]), sampling

    def _replay_decode(self, graphs: cuda_graphs.DecodeGraphs, items: list[ScheduledSeq]) -> torch.Tensor:
        """A step of single-token items through the captured graphs -> hidden [num_seqs, H]."""
        bs = self.cache_config.block_size
        positions = [s.start for s in items]
        return graphs.run(
            input_ids=[s.seq.token_ids[s.start] for s in items],
            positions=positions,
            slot_mapping=[s.seq.block_table[p // bs] * bs + p % bs for s, p in zip(items, positions, strict=True)],
            block_tables=[s.seq.block_table for s in items],
            seq_lens=[p + 1 for p in positions],
        )
