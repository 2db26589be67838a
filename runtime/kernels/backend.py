"""The Triton attention backend: the engine's AttentionBackend interface on our kernels.

One step's batch, as the model runner orders it (runtime/layers/attention.py)::

    tokens:    | d d d d | p p p p p p p | e e e |      d = decode (q_len 1), p = prefill, e = extend / chunk
    sequences: | 0 1 2 3 | 4             | 5     |
               ^ num_decode_tokens = 4

The decodes go to the split-K decode kernel, the rest to the prefill/extend kernel; both read the cache that
write_kv_cache filled a moment before.
"""

from __future__ import annotations

import torch

from ..layers.attention import AttentionBackend, AttentionMetadata
from .kv_cache import write_kv_cache
from .paged_attention import choose_num_splits, paged_decode_attention
from .prefill_attention import paged_prefill_attention

__all__ = ["TritonAttentionBackend"]


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """query: [T, Hq, D]; key, value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        md = attn_metadata
        write_kv_cache(key, value, kv_cache, md.slot_mapping)
        out = torch.empty_like(query)
        num_decodes = md.num_decode_tokens
        if num_decodes:
            num_splits = choose_num_splits(num_decodes, kv_cache.shape[3], md.max_seq_len, query.device)
            paged_decode_attention(
                query[:num_decodes],
                kv_cache,
                md.block_tables[:num_decodes],
                md.seq_lens[:num_decodes],
                scale,
                out=out[:num_decodes],
                num_splits=num_splits,
            )
        if num_decodes < md.num_seqs:
            # the prefill kernel indexes query from 0: shift the start locations past the decodes (once per step)
            query_start_loc = md.derived.get("triton_prefill_query_start_loc")
            if query_start_loc is None:
                query_start_loc = md.query_start_loc[num_decodes:] - num_decodes
                md.derived["triton_prefill_query_start_loc"] = query_start_loc
            paged_prefill_attention(
                query[num_decodes:],
                kv_cache,
                md.block_tables[num_decodes:],
                md.seq_lens[num_decodes:],
                query_start_loc,
                scale,
                out=out[num_decodes:],
                max_query_len=md.max_query_len,
            )
        return out
