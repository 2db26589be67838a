"""ModelRunner: owns the model and its paged KV cache; turns a scheduled batch into one forward pass.

Per step it builds, once, the flat token batch (decodes first, then prefill chunks) and the attention metadata
every layer shares, runs the model, and returns float32 logits for the sequences that sample this step.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig
from ..layers.attention import AttentionMetadata
from ..models.llama import LlamaForCausalLM
from .scheduler import ScheduledSeq, SchedulerOutput


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, cache_config: CacheConfig, device: torch.device, dtype: torch.dtype
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
        input_ids, positions, md = self._prepare(items)
        hidden = self.model(input_ids, positions, self.kv_caches, md)  # [T, H]
        sampling = [s for s in items if s.samples]
        if not sampling:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32), []
        last = [md.query_start_loc_cpu[i + 1] - 1 for i, s in enumerate(items) if s.samples]
        rows = torch.tensor(last, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden[rows]), sampling
