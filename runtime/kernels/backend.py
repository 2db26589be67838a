"""The Triton attention backend: the engine's AttentionBackend interface on our kernels.

One step's batch, as the model runner orders it (kernels/interface.py)::

    tokens:    | d d d d | p p p p p p p | e e e |      d = decode (q_len 1), p = prefill, e = extend / chunk
    sequences: | 0 1 2 3 | 4             | 5     |
               ^ num_decode_tokens = 4

The decodes go to the split-K decode kernel, the rest to the prefill/extend kernel; both read the cache that
write_kv_cache filled a moment before. The elementwise ops are the Triton kernels of fused.py. The backend reads
no host state of the metadata, so a captured CUDA graph may replay it (``supports_cuda_graphs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fused
from .interface import AttentionBackend, AttentionMetadata, RopeTables, extend_metadata
from .kv_cache import write_kv_cache
from .paged_attention import choose_num_splits, paged_decode_attention
from .prefill_attention import paged_prefill_attention

__all__ = ["TritonAttentionBackend", "TritonAttentionMetadata"]


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    # the prefill kernel indexes query from 0: the start locations shifted past the decodes (None: no prefills)
    prefill_query_start_loc: torch.Tensor | None = None


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def build_metadata(self, md: AttentionMetadata) -> TritonAttentionMetadata:
        if isinstance(md, TritonAttentionMetadata):
            return md
        num_decodes = md.num_decode_tokens
        shifted = md.query_start_loc[num_decodes:] - num_decodes if num_decodes < md.num_seqs else None
        return extend_metadata(TritonAttentionMetadata, md, prefill_query_start_loc=shifted)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query: [T, Hq, D]; key, value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
        md = attn_metadata
        assert isinstance(md, TritonAttentionMetadata), "call build_metadata() once per step first"
        write_kv_cache(key, value, kv_cache, md.slot_mapping, kv_scale)
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
                kv_scale=kv_scale,
            )
        query_start_loc = md.prefill_query_start_loc
        if query_start_loc is not None:
            paged_prefill_attention(
                query[num_decodes:],
                kv_cache,
                md.block_tables[num_decodes:],
                md.seq_lens[num_decodes:],
                query_start_loc,
                scale,
                out=out[num_decodes:],
                max_query_len=md.max_query_len,
                kv_scale=kv_scale,
            )
        return out

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused.rms_norm(x, weight, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_and_mul(x)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the kernel rotates in place: contiguous copies, so the fused qkv output is left as it was
        return fused.rotary_embedding(positions, query.contiguous(), key.contiguous(), rope.cos_sin_cache, True)
