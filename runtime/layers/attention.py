"""Attention over the paged KV cache: the per-step metadata and the backend interface.

The model runner builds one ``AttentionMetadata`` per step (shared by every layer); each attention layer calls
``backend.forward``, which writes the new tokens' keys/values into the layer's cache and attends. Sequences are
ordered decodes first (``q_len == 1``), then prefills / chunked prefills, so ``num_decode_tokens`` splits them.

Backends: ``TorchAttentionBackend`` (CPU and any device; numerically the torch reference ops in
``kernels/reference.py``, batched for speed) and the Triton backend in ``kernels/backend.py`` (GPU).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import cpu
from ..kernels.reference import write_kv_cache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1 = do not write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative new tokens per sequence
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int  # the first num_decode_tokens tokens (and sequences) are decodes
    # host copies for backends that loop over sequences (built once per step by the model runner)
    seq_lens_cpu: list[int] = field(default_factory=list)
    query_start_loc_cpu: list[int] = field(default_factory=list)
    # per-step tensors a backend derives once and reuses in every layer
    derived: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


class AttentionBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """query: [T, Hq, D]; key, value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D].

        Writes key/value at ``slot_mapping``, then returns each new token's attention output [T, Hq, D]."""


class TorchAttentionBackend(AttentionBackend):
    """The CPU backend: decodes in one call of the C++ paged kernel (kernels/cpu_ops.cpp) when it is built, else in
    one padded, batched SDPA call over gathered blocks; each prefill in its own SDPA call.

    Equal (within float rounding) to ``reference.paged_attention``, which loops over every sequence; the
    batched decode path is what makes CPU decoding fast (tests/runtime/test_attention.py checks both agree).
    """

    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        md = attn_metadata
        self._write_kv_cache(key, value, kv_cache, md)
        num_decodes = md.num_decode_tokens
        if num_decodes == md.num_seqs:  # a pure decode step: no output buffer to assemble
            return self._decode(query, kv_cache, md, scale)
        out = torch.empty_like(query)
        if num_decodes:
            out[:num_decodes] = self._decode(query[:num_decodes], kv_cache, md, scale)
        starts, lens = md.query_start_loc_cpu, md.seq_lens_cpu
        for i in range(num_decodes, md.num_seqs):
            q_start, q_end = starts[i], starts[i + 1]
            out[q_start:q_end] = self._prefill(query[q_start:q_end], kv_cache, md.block_tables[i], lens[i], scale)
        return out

    @staticmethod
    def _write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> None:
        if "all_slots_valid" not in md.derived:
            md.derived["all_slots_valid"] = (md.slot_mapping >= 0).all()
        if not md.derived["all_slots_valid"]:
            write_kv_cache(key, value, kv_cache, md.slot_mapping)  # the reference skips slot -1
            return
        # every token has a slot (the engine's case): one index_copy_ per tensor, ~1000x cheaper than masking
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        slots = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        slots[0].index_copy_(0, md.slot_mapping, key.to(kv_cache.dtype))
        slots[1].index_copy_(0, md.slot_mapping, value.to(kv_cache.dtype))

    @staticmethod
    def _decode(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        # query: [B, Hq, D], one new token per sequence
        num_seqs = query.shape[0]
        if query.device.type == "cpu" and kv_cache.dtype == query.dtype:
            kernels = cpu.load()
            if kernels is not None:  # the C++ kernel reads K and V in place: no gather copy
                return kernels.paged_decode_attention(
                    query, kv_cache, md.block_tables[:num_seqs], md.seq_lens[:num_seqs], scale
                )
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        if "decode_rows" not in md.derived:
            lens = md.seq_lens_cpu[:num_seqs]
            max_len = max(lens)
            width = -(-max_len // block_size)
            blocks = md.block_tables[:num_seqs, :width].reshape(-1).long()
            # rows of the cache seen as [2 * num_blocks, block_size * Hkv * D]: K blocks, then V blocks
            md.derived["decode_rows"] = torch.cat([blocks, blocks + num_blocks])
            if min(lens) != max_len:
                # mask: [B, 1, 1, width * block_size], True where the key position is inside the sequence
                key_pos = torch.arange(width * block_size, device=query.device)
                md.derived["decode_mask"] = (key_pos[None, :] < md.seq_lens[:num_seqs, None])[:, None, None, :]
        mask = md.derived.get("decode_mask")
        rows = md.derived["decode_rows"]
        # equal lengths (one sequence, say) need no mask: the keys are cut at the length instead
        length = None if mask is not None else md.seq_lens_cpu[0]
        # kv: [2, B, L = width * block_size, Hkv, D] -> k, v: [B, Hkv, L, D]
        kv = kv_cache.view(2 * num_blocks, -1).index_select(0, rows).view(2, num_seqs, -1, num_kv_heads, head_dim)
        if kv.dtype != query.dtype:
            kv = kv.to(query.dtype)
        k, v = kv[0, :, :length].transpose(1, 2), kv[1, :, :length].transpose(1, 2)
        # grouped-query attention without repeating K/V: the `group` query heads sharing a KV head act as
        # `group` query rows of that head. q: [B, Hkv, group, D]
        q = query.view(num_seqs, num_kv_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.reshape(num_seqs, -1, head_dim)

    @staticmethod
    def _prefill(
        query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale: float
    ) -> torch.Tensor:
        # query: [q_len, Hq, D], the last q_len positions of a seq_len context
        q_len = query.shape[0]
        block_size = kv_cache.shape[2]
        blocks = block_table[: -(-seq_len // block_size)].long()
        k = kv_cache[0][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, seq_len, D]
        v = kv_cache[1][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        q = query.transpose(0, 1)  # [Hq, q_len, D]
        gqa = q.shape[0] != k.shape[0]
        if q_len == seq_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # query i sits at position seq_len - q_len + i and sees keys 0 .. that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(0, 1)


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA when they import; the torch backend otherwise."""
    if device.type == "cuda":
        try:
            from ..kernels.backend import TritonAttentionBackend

            return TritonAttentionBackend()
        except ImportError:
            pass
    return TorchAttentionBackend()
