"""The torch backend: every op as a lean torch composition, on any device (the CPU without the C++ kernels).

Decodes in one padded, batched SDPA call over gathered blocks; short extends (a verification of drafts) as decodes
too, one per position; each longer prefill in its own SDPA call. Equal (within float rounding) to
``reference.paged_attention``, which loops over every sequence; the batched decode path is what makes CPU decoding
fast (tests/runtime/test_attention.py checks both agree).

Why one call per op matters on the CPU: a decode step of a small model is hundreds of tiny ops, where each call's
fixed cost (a microsecond or more) outweighs its arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kv_quant, reference
from .interface import AttentionBackend, AttentionMetadata, RopeTables, extend_metadata

__all__ = ["TorchAttentionBackend", "TorchAttentionMetadata"]

# A sequence extending by at most this many tokens (a verification of speculative drafts, a short prompt) attends as
# that many one-token decodes over the cache, the j-th seeing the keys up to its own position: one batched decode
# call for the step instead of a gathered, masked SDPA per sequence. On the CPU the per-sequence path was ~40% of a
# one-stream verification step (bench/speculative.py); each expanded row reads its context once more, which stays
# cheaper than the gather up to a few dozen rows.
SHORT_EXTEND_MAX = 16


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """What the torch backend derives once per step and reuses in every layer."""

    all_slots_valid: bool = True  # every new token has a cache slot (the engine's case)
    # batched decode (filled on first use): rows of the cache seen as [2 * num_blocks, block_size * Hkv * D]
    decode_rows: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, width * block_size]; None when all lengths are equal
    # a step with short extends: its short sequences' tokens as one-token decodes (``as_decodes``), the rows of the
    # query they are (None: every row, in order) and the sequences left to the per-sequence path
    short_rows: TorchAttentionMetadata | None = None
    short_index: torch.Tensor | None = None
    long_seqs: tuple[int, ...] = ()


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, md: AttentionMetadata) -> TorchAttentionMetadata:
        if isinstance(md, TorchAttentionMetadata):
            return md
        out = extend_metadata(TorchAttentionMetadata, md, all_slots_valid=bool((md.slot_mapping >= 0).all()))
        if out.all_slots_valid and out.num_decode_tokens != out.num_seqs and out.seq_lens_cpu:
            as_decodes(out)
        return out

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
        md = attn_metadata
        assert isinstance(md, TorchAttentionMetadata), "call build_metadata() once per step first"
        self._write_kv_cache(key, value, kv_cache, md, kv_scale)
        num_decodes = md.num_decode_tokens
        if num_decodes == md.num_seqs:  # a pure decode step: no output buffer to assemble
            return self._decode(query, kv_cache, md, scale, kv_scale)
        rows = md.short_rows
        if rows is not None and md.short_index is None:  # every sequence short: the query's rows as they are
            return self._decode(query, kv_cache, rows, scale, kv_scale)
        out = torch.empty_like(query)
        if rows is not None:
            assert md.short_index is not None
            out.index_copy_(0, md.short_index, self._decode(query[md.short_index], kv_cache, rows, scale, kv_scale))
            remaining: tuple[int, ...] | range = md.long_seqs
        else:
            if num_decodes:
                out[:num_decodes] = self._decode(query[:num_decodes], kv_cache, md, scale, kv_scale)
            remaining = range(num_decodes, md.num_seqs)
        starts, lens = md.query_start_loc_cpu, md.seq_lens_cpu
        for i in remaining:
            q_start, q_end = starts[i], starts[i + 1]
            out[q_start:q_end] = self._prefill(
                query[q_start:q_end], kv_cache, md.block_tables[i], lens[i], scale, kv_scale
            )
        return out

    @staticmethod
    def _write_kv_cache(
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        md: TorchAttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> None:
        if not md.all_slots_valid:
            reference.write_kv_cache(key, value, kv_cache, md.slot_mapping, kv_scale)  # the reference skips slot -1
            return
        # every token has a slot: one index_copy_ per tensor, ~1000x cheaper than masking
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        if kv_scale is None:
            k, v = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
        else:  # one-byte codes, copied as bytes (index_copy_ has no float8 kernel on the CPU)
            k = kv_quant.quantize(key, kv_scale[0], kv_cache.dtype).view(torch.uint8)
            v = kv_quant.quantize(value, kv_scale[1], kv_cache.dtype).view(torch.uint8)
            kv_cache = kv_cache.view(torch.uint8)
        slots = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        slots[0].index_copy_(0, md.slot_mapping, k)
        slots[1].index_copy_(0, md.slot_mapping, v)

    def _decode(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: TorchAttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # query: [B, Hq, D], one new token per sequence
        if kv_scale is not None:
            # quantized codes are widened as they are: k_scale folds into the query (q . s_k k = s_k (q . k)),
            # v_scale into the output (sum p s_v v = s_v sum p v)
            out = self._decode(query * kv_scale[0].to(query.dtype), kv_cache, md, scale, None)
            return out * kv_scale[1].to(out.dtype)
        num_seqs = query.shape[0]
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        if md.decode_rows is None:
            lens = md.seq_lens_cpu[:num_seqs]
            max_len = max(lens)
            width = -(-max_len // block_size)
            blocks = md.block_tables[:num_seqs, :width].reshape(-1).long()
            # K blocks, then V blocks
            md.decode_rows = torch.cat([blocks, blocks + num_blocks])
            if min(lens) != max_len:
                # True where the key position is inside the sequence
                key_pos = torch.arange(width * block_size, device=query.device)
                md.decode_mask = (key_pos[None, :] < md.seq_lens[:num_seqs, None])[:, None, None, :]
        mask = md.decode_mask
        # equal lengths (one sequence, say) need no mask: the keys are cut at the length instead
        length = None if mask is not None else md.seq_lens_cpu[0]
        # kv: [2, B, L = width * block_size, Hkv, D] -> k, v: [B, Hkv, L, D]
        kv = kv_cache.view(2 * num_blocks, -1).index_select(0, md.decode_rows)
        kv = kv.view(2, num_seqs, -1, num_kv_heads, head_dim)
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
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_len: int,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # query: [q_len, Hq, D], the last q_len positions of a seq_len context
        if kv_scale is not None:  # as in _decode: the scales fold into the query and the output
            query = query * kv_scale[0].to(query.dtype)
        q_len = query.shape[0]
        block_size = kv_cache.shape[2]
        blocks = block_table[: -(-seq_len // block_size)].long()
        k = kv_cache[0][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, seq_len, D]
        v = kv_cache[1][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        if kv_scale is not None:
            k, v = k.to(query.dtype), v.to(query.dtype)
        q = query.transpose(0, 1)  # [Hq, q_len, D]
        gqa = q.shape[0] != k.shape[0]
        if q_len == seq_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # query i sits at position seq_len - q_len + i and sees keys 0 .. that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out = out.transpose(0, 1)
        return out if kv_scale is None else out * kv_scale[1].to(out.dtype)

    # ---- elementwise ops --------------------------------------------------------------------------------
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            if residual.shape != x.shape:
                raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
            x = x + residual  # computed in float32 and rounded once, as the reference does
        # torch's fused rms_norm normalizes in float32 and rounds once: bit-equal to the reference
        return F.rms_norm(x, weight.shape, weight, eps), x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"the last dimension of x must be even (gate and up halves), got {x.shape[-1]}")
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up  # half precision rounds twice (as Hugging Face's SiLU * up does)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotate(positions, query, rope), self._rotate(positions, key, rope)

    def rotary_embedding_qk(
        self, positions: torch.Tensor, qk: torch.Tensor, num_q_heads: int, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotated = self._rotate(positions, qk, rope)  # one pass over both
        return rotated[:, :num_q_heads], rotated[:, num_q_heads:]

    @staticmethod
    def _rotate(positions: torch.Tensor, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x [T, H, D] -> ``x * cos + roll(x, D/2) * sin`` in float32 (the reference's arithmetic in fewer ops),
        with cos and sin gathered once per step: every layer of a forward pass gets the same ``positions``."""
        cached = rope.step
        if cached is None or cached[0] is not positions:
            cos, sin = rope.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
            # rotate-half: out = x * [cos, cos] + [x2, x1] * [-sin, sin]
            cached = (positions, torch.cat([cos, cos], -1)[:, None, :], torch.cat([-sin, sin], -1)[:, None, :])
            rope.step = cached
        _, cos_full, sin_signed = cached
        xf = x.float()
        return torch.addcmul(xf * cos_full, xf.roll(x.shape[-1] // 2, -1), sin_signed).to(x.dtype)


def as_decodes(md: TorchAttentionMetadata) -> None:
    """Fill ``md.short_rows``: the tokens of every sequence extending by at most SHORT_EXTEND_MAX tokens (decodes
    included) as one-token decodes over the same block table, token j of a sequence seeing the first
    ``seq_len - q_len + j + 1`` keys: causal attention, read from the cache the step has just written."""
    starts, lens = md.query_start_loc_cpu, md.seq_lens_cpu
    seq_of_row: list[int] = []
    row_lens: list[int] = []
    token_rows: list[int] = []
    long_seqs: list[int] = []
    for i in range(md.num_seqs):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end - q_start > SHORT_EXTEND_MAX:
            long_seqs.append(i)
            continue
        first = lens[i] - (q_end - q_start) + 1
        seq_of_row.extend([i] * (q_end - q_start))
        row_lens.extend(range(first, lens[i] + 1))
        token_rows.extend(range(q_start, q_end))
    if len(long_seqs) == md.num_seqs - md.num_decode_tokens:  # no short extend: the decodes need no expanding
        return
    device = md.seq_lens.device
    rows = torch.tensor(seq_of_row, dtype=torch.long, device=device)
    md.short_rows = TorchAttentionMetadata(
        slot_mapping=md.slot_mapping[torch.tensor(token_rows, dtype=torch.long, device=device)],
        block_tables=md.block_tables.index_select(0, rows),
        seq_lens=torch.tensor(row_lens, dtype=md.seq_lens.dtype, device=device),
        query_start_loc=torch.arange(len(row_lens) + 1, dtype=md.query_start_loc.dtype, device=device),
        max_query_len=1,
        max_seq_len=max(row_lens),
        num_decode_tokens=len(row_lens),
        seq_lens_cpu=row_lens,
        query_start_loc_cpu=list(range(len(row_lens) + 1)),
    )
    if long_seqs:
        md.short_index = torch.tensor(token_rows, dtype=torch.long, device=device)
        md.long_seqs = tuple(long_seqs)
