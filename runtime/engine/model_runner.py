"""ModelRunner: owns the model and its paged KV cache; turns a scheduled batch into one forward pass.

Per step it builds, once, the flat token batch (decodes first, then prefill chunks) and the attention metadata
every layer shares, runs the model, and returns float32 logits for the sequences that sample this step. With
``decode_graphs`` (a GPU, not ``enforce_eager``), a step of decodes only replays a captured CUDA graph instead.
"""

from __future__ import annotations

import logging
import time

import torch

from ..config import CacheConfig
from ..kernels.interface import AttentionMetadata
from ..models.llama import LlamaForCausalLM
from . import cuda_graphs
from .scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache_config: CacheConfig,
        device: torch.device,
        dtype: torch.dtype,
        *,
        decode_graphs: bool = False,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.cache_config = cache_config
        self.device = device
        self.dtype = dtype
        cfg = model.config
        # one kv_cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [
            torch.zeros(
                2,
                cache_config.num_blocks,
                cache_config.block_size,
                cfg.num_key_value_heads,
                cfg.head_dim,
                dtype=dtype,
                device=device,
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        if decode_graphs:
            max_len = max_model_len or cfg.max_position_embeddings
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    self.graphs = cuda_graphs.DecodeGraphs(
                        model,
                        self.kv_caches,
                        sizes=cuda_graphs.capture_sizes(max_num_seqs),
                        max_blocks_per_seq=-(-max_len // cache_config.block_size),
                        max_seq_len=max_len,
                        device=device,
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
