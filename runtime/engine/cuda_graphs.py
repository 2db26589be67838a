"""CUDA graphs for decode steps, and the profiling pass that sizes the KV cache on a GPU.

A decode step of a small batch launches hundreds of short kernels; replaying them as one captured graph removes
the per-launch CPU cost. ``DecodeGraphs`` captures the model's forward once per batch size in ``sizes`` (largest
first, all sharing one memory pool), reading from static input buffers. A step of B decodes copies its inputs
into those buffers and replays the graph of the smallest captured size >= B; the extra rows are padding that
neither writes the cache (slot -1) nor reads it (seq_len 0), and whose outputs are dropped.

What a captured forward must not depend on is host state that changes per step: the attention metadata of a
graph carries no host lists, and its ``max_seq_len`` is the model's maximum, so the decode kernel's work split
(a launch parameter) is fixed at capture; the kernel itself reads each sequence's true length from ``seq_lens``.
The Triton attention backend satisfies this (the torch backend reads host lists, so graphs need the GPU path).

``Graph`` is the capture/replay seam: ``CudaGraph`` on a GPU; tests substitute an eager stand-in to check the
buffer and padding logic on the CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..kernels.interface import AttentionMetadata
from ..models.llama import LlamaForCausalLM

# batch sizes captured by default: every size up to 8, then steps of 8 (padding wastes at most 7 rows)
DEFAULT_CAPTURE_SIZES = (1, 2, 4, *range(8, 257, 8))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The default sizes that a batch of at most max_num_seqs decodes can use."""
    sizes = [s for s in DEFAULT_CAPTURE_SIZES if s <= max_num_seqs]
    if max_num_seqs < DEFAULT_CAPTURE_SIZES[-1] and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record fn (which reads only static buffers) and return its output buffer."""

    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph, warmed up on a side stream, captured into a memory pool shared by all sizes."""

    pool: Any = None  # torch.cuda.graph_pool_handle(), created with the first capture

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: Triton compiles and autotunes outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        if CudaGraph.pool is None:
            CudaGraph.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=CudaGraph.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        *,
        sizes: Sequence[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        graph_factory: Callable[[], Graph] = CudaGraph,
    ) -> None:
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"capture sizes must be distinct positive integers in increasing order, got {sizes}")
        if not model.backend.supports_cuda_graphs:
            raise ValueError(
                f"decode graphs need an attention backend that reads no host state (the Triton backend), "
                f"not {model.backend.name!r}"
            )
        self.sizes = list(sizes)
        largest = self.sizes[-1]
        # the static inputs every captured graph reads (row i = the i-th sequence of the batch)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its pool memory
            md = AttentionMetadata(
                slot_mapping=self.slot_mapping[:size],
                block_tables=self.block_tables[:size],
                seq_lens=self.seq_lens[:size],
                query_start_loc=self.query_start_loc[: size + 1],
                max_query_len=1,
                max_seq_len=max_seq_len,
                num_decode_tokens=size,
            )
            graph = graph_factory()
            self.outputs[size] = graph.capture(self._forward(model, kv_caches, size, md))
            self.graphs[size] = graph

    def _forward(
        self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], size: int, md: AttentionMetadata
    ) -> Callable[[], torch.Tensor]:
        ids, positions = self.input_ids[:size], self.positions[:size]
        return lambda: model(ids, positions, kv_caches, md)

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_seqs: int) -> int:
        """The captured size that serves num_seqs decodes (num_seqs <= max_batch_size)."""
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        block_tables: list[list[int]],
        seq_lens: list[int],
    ) -> torch.Tensor:
        """One decode step of len(input_ids) sequences -> hidden states [num_seqs, H] (a view of the graph's output,
        valid until the next replay)."""
        num_seqs = len(input_ids)
        size = self.size_for(num_seqs)
        width = max(len(t) for t in block_tables)
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the captured {self.block_tables.shape[1]}")
        device = self.input_ids.device
        # one host -> device copy per buffer; the padding rows [num_seqs, size) are reset every step
        pad = size - num_seqs
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slot_mapping + [-1] * pad), non_blocking=True)
        self.seq_lens[:size].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        self.block_tables[:num_seqs, :width].copy_(tables.to(device, non_blocking=True))
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]


def dummy_prefill_forward(
    model: LlamaForCausalLM, *, num_tokens: int, max_model_len: int, num_logits: int, block_size: int
) -> torch.Tensor:
    """The largest step the scheduler can build, on throwaway inputs: num_tokens prompt tokens in sequences of
    at most max_model_len, and logits for num_logits rows. Nothing is written to any real cache (every slot is -1;
    each layer gets a one-block dummy cache whose reads are harmless garbage). Returns the logits."""
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    lens = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lens.append(num_tokens % max_model_len)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    caches = [
        # this rank's KV heads (tensor parallelism splits them)
        torch.zeros(2, 1, block_size, model.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        for _ in range(cfg.num_hidden_layers)
    ]
    max_blocks = -(-max(lens) // block_size)
    md = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(len(lens), max_blocks, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        num_decode_tokens=0,
        seq_lens_cpu=lens,
        query_start_loc_cpu=starts,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    with torch.inference_mode():
        hidden = model(ids, positions, caches, md)
        rows = torch.full((min(num_logits, num_tokens),), num_tokens - 1, device=device)
        return model.compute_logits(hidden[rows])


def profile_activation_bytes(
    model: LlamaForCausalLM, *, num_tokens: int, max_model_len: int, num_logits: int, block_size: int
) -> int:
    """Peak CUDA memory above what is allocated now, during :func:`dummy_prefill_forward` (activations, logits,
    the kernels' workspaces): what a step may need on top of the weights and the KV cache."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dummy_prefill_forward(
        model, num_tokens=num_tokens, max_model_len=max_model_len, num_logits=num_logits, block_size=block_size
    )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    return max(0, peak)
