"""The device-dispatch interface: the per-step attention metadata, the rotary tables, and the backend every layer
calls. A leaf module (torch only): ``layers/``, ``models/`` and the backends in ``kernels/`` all import it, and it
imports none of them.

One backend per device, chosen once when the model is built (``kernels/dispatch.py``):

    torch   any device: torch compositions (SDPA over gathered blocks)       kernels/torch_backend.py
    cpu     the CPU with the C++ kernels of cpu_ops.cpp built                kernels/cpu_backend.py
    triton  CUDA (or the CPU under TRITON_INTERPRET=1, in tests)             kernels/backend.py

Every backend computes what ``kernels/reference.py`` specifies (within rounding). The model runner builds one
``AttentionMetadata`` per step; the model turns it into its backend's typed metadata once (``build_metadata``), and
every layer passes that on.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch


@dataclass
class AttentionMetadata:
    """One step's batch: sequences ordered decodes first (``q_len == 1``), then prefills / chunked prefills."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1 = do not write)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative new tokens per sequence
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int  # the first num_decode_tokens tokens (and sequences) are decodes
    # host copies for backends that loop over sequences (built once per step by the model runner; empty inside a
    # captured CUDA graph, whose backend must not read them)
    seq_lens_cpu: list[int] = field(default_factory=list)
    query_start_loc_cpu: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


M = TypeVar("M", bound=AttentionMetadata)


def extend_metadata(cls: type[M], md: AttentionMetadata, **extra: Any) -> M:
    """``md``'s fields copied into the backend's metadata type ``cls``, plus that type's own fields."""
    if isinstance(md, cls):
        return md
    common = {f.name: getattr(md, f.name) for f in dataclasses.fields(AttentionMetadata)}
    return cls(**common, **extra)


@dataclass
class RopeTables:
    """The rotary tables of one model, shared by its layers. cos_sin_cache: [max_position, head_dim] in the model's
    dtype (cos half, then sin half: the reference ops' layout); cos_sin_f32: the same values in float32 (the C++
    kernel's table). ``step`` holds what a backend gathers once per step (reset by ``new_step``)."""

    cos_sin_cache: torch.Tensor
    cos_sin_f32: torch.Tensor
    step: tuple[torch.Tensor, ...] | None = None

    def new_step(self) -> None:
        """Forget the step's gathered rows (positions may be rewritten in place, as a captured graph's buffer is,
        so the tensor's identity alone cannot tell steps apart)."""
        self.step = None


class AttentionBackend(abc.ABC):
    """The device's ops: paged attention, and the elementwise ops around it (RMSNorm, SwiGLU, rotary)."""

    name: ClassVar[str] = "abstract"
    # a captured forward must read no host state that changes per step (the host lists of the metadata)
    supports_cuda_graphs: ClassVar[bool] = False

    def build_metadata(self, md: AttentionMetadata) -> AttentionMetadata:
        """The backend's typed metadata for this step (once per step, shared by every layer)."""
        return md

    @abc.abstractmethod
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
        """query: [T, Hq, D]; key, value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D].

        Writes key/value at ``slot_mapping``, then returns each new token's attention output [T, Hq, D].
        kv_scale: float32 [2] (k_scale, v_scale) on kv_cache's device when the cache holds int8 / float8 codes
        (kernels/kv_quant.py), else None."""

    @abc.abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, new_residual): see reference.rms_norm."""

    @abc.abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., 2 * d] -> silu(gate) * up [..., d]: see reference.silu_and_mul."""

    @abc.abstractmethod
    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, Hq, D]; key [T, Hkv, D] (views are fine) -> rotated (query, key), new tensors."""

    def rotary_embedding_qk(
        self, positions: torch.Tensor, qk: torch.Tensor, num_q_heads: int, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qk: [T, Hq + Hkv, D], the query heads then the key heads (adjacent columns of the fused qkv projection,
        a view is fine) -> rotated (query [T, Hq, D], key [T, Hkv, D]). Backends that can rotate both in one pass
        override this."""
        return self.rotary_embedding(positions, qk[:, :num_q_heads], qk[:, num_q_heads:], rope)
