"""One rank's view of its tensor-parallel group, and the partition of a model over it.

Megatron-style: a column-parallel linear holds a slice of the output rows (q/k/v and gate/up: heads and the
intermediate size split), a row-parallel linear a slice of the input columns (o and down), whose partial sums one
all-reduce adds: one per attention block and one per MLP block. The embedding and the head split the vocabulary
(padded to a multiple of the ranks); the head's logits are gathered, and only rank 0 samples.

KV heads are split like the query heads when they divide by the ranks; when there are fewer KV heads than ranks,
each is replicated on ``size / num_kv_heads`` consecutive ranks, which hold the query heads that read it.

Gloo on the CPU, NCCL on GPUs. ``TensorParallel.single()`` is the one-rank group: every collective is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadPartition:
    """This rank's heads: query heads [q_start, q_start + num_heads), KV heads [kv_start, kv_start + num_kv_heads)."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def check_tensor_parallel(tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Refuse, naming the numbers, a size the model cannot be split by."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {tp_size} and the model's {num_kv_heads} KV heads: one must divide the other"
        )
    if intermediate_size % tp_size:
        raise ValueError(
            f"tensor_parallel_size {tp_size} does not divide the model's intermediate_size {intermediate_size}"
        )


def check_devices(ranks_per_node: int, device: torch.device) -> None:
    """On GPUs one rank per device: more ranks on this node (tensor x pipeline parallel size / nnodes) than visible
    devices is refused."""
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if ranks_per_node > available:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size / nnodes = {ranks_per_node} ranks on this node need "
                f"{ranks_per_node} GPUs, but {available} are visible"
            )


@dataclass
class TensorParallel:
    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # the collectives of the forward pass (gloo or NCCL)

    @staticmethod
    def single() -> TensorParallel:
        return TensorParallel(0, 1)

    def heads(self, num_heads: int, num_kv_heads: int) -> HeadPartition:
        per_rank = num_heads // self.size
        if num_kv_heads >= self.size:
            kv_per_rank = num_kv_heads // self.size
            kv_start = self.rank * kv_per_rank
        else:  # replicated: rank r reads KV head r // (size / num_kv_heads)
            kv_per_rank = 1
            kv_start = self.rank // (self.size // num_kv_heads)
        return HeadPartition(per_rank, kv_per_rank, self.rank * per_rank, kv_start)

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """[start, start + per_rank) of the padded vocabulary this rank holds (rows past vocab_size are zeros)."""
        per_rank = -(-vocab_size // self.size)
        return self.rank * per_rank, per_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PipelineStage:
    """This rank's pipeline stage: decoder layers [layer_start, layer_end); the first stage also holds the
    embedding, the last the final norm and the head."""

    rank: int
    size: int
    layer_start: int
    layer_end: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @staticmethod
    def of(rank: int, size: int, num_layers: int) -> PipelineStage:
        """Contiguous ranges, the first ``num_layers % size`` stages one layer longer."""
        if num_layers < size:
            raise ValueError(f"pipeline_parallel_size {size} exceeds the model's {num_layers} layers")
        base, extra = divmod(num_layers, size)
        start = rank * base + min(rank, extra)
        return PipelineStage(rank, size, start, start + base + (rank < extra))

    @staticmethod
    def single(num_layers: int) -> PipelineStage:
        return PipelineStage(0, 1, 0, num_layers)
