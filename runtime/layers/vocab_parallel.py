"""The vocabulary split over tensor-parallel ranks: the embedding and the head each hold ``per_rank`` rows.

The vocabulary is padded to ``size * per_rank``; the padded rows are zeros. Embedding: each rank looks up the ids
in its range (others read row 0 and are zeroed), then one all-reduce adds the ranks' rows. Head: each rank
computes its slice of the logits; the slices are gathered in rank order and the padding dropped. With one rank
both are the plain embedding and matmul.

On the CPU with a K-quant / int4 format the head (and, tied, the embedding) may hold its rows as int8 groups of
32 instead (:meth:`VocabParallelEmbedding.use_int8_rows`, GGUF Q8_0's layout): the weight is then held once, as
codes; a lookup dequantizes the rows it reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel import TensorParallel
from ..quantization.int4_groups import CodeGroups, Weight
from ..quantization.int8_groups import Int8Groups


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.start, self.per_rank = tp.vocab_range(vocab_size)
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.int8_rows: Int8Groups | None = None  # instead of weight: use_int8_rows()
        self.takes_int8_rows = False  # set by the model: checkpoint int8 groups of 32 are kept as they are
        self.dtype = self.weight.dtype

    def load_weight(self, param: str, tensor: Weight) -> None:
        """The checkpoint's whole [vocab_size, hidden] matrix -> this rank's rows (zeros past the vocabulary)."""
        if self.weight is None:
            raise ValueError(f"{param}: loaded twice (the rows are int8 codes already)")
        expected = (self.vocab_size, self.weight.shape[1])
        if param != "weight" or tuple(tensor.shape) != expected:
            raise ValueError(f"{param}: checkpoint has shape {tuple(tensor.shape)}, expected {expected}")
        num_rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        keep = isinstance(tensor, Int8Groups) and tensor.offset is None and tensor.group_size == 32
        if keep and self.takes_int8_rows:  # a GGUF's Q8_0 head: its codes, never a dense copy
            assert isinstance(tensor, Int8Groups)
            self.use_int8_rows(_pad_rows(tensor.narrow(0, self.start, num_rows), self.per_rank))
            return
        if isinstance(tensor, CodeGroups):  # a GGUF's K-quant embedding: dequantized
            tensor = tensor.dense(self.weight.dtype)
        self.weight.data[:num_rows].copy_(tensor.narrow(0, self.start, num_rows))
        self.weight.data[num_rows:].zero_()

    def use_int8_rows(self, rows: Int8Groups) -> None:
        """Hold this rank's rows as ``rows`` (their int8 codes, the same values up to the dtype's rounding) instead
        of the dense weight, which is dropped."""
        if self.weight is not None:
            self.dtype = self.weight.dtype
        self.int8_rows = rows
        self.weight = None

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8_rows is None:
            assert self.weight is not None
            return F.embedding(ids, self.weight)
        rows = self.int8_rows
        offset = rows.offset[ids] if rows.offset is not None else None
        picked = Int8Groups(rows.codes[ids], rows.scale[ids], offset, rows.group_size)  # [T, hidden] codes
        return picked.dense(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if self.tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = self._lookup(local.masked_fill(~inside, 0))
        out.masked_fill_(~inside[:, None], 0)
        return self.tp.all_reduce(out)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[N, per_rank] (this rank's columns of the logits) -> [N, vocab_size] on every rank."""
        return self.tp.all_gather_last(local)[:, : self.vocab_size]


def _pad_rows(rows: Int8Groups, num_rows: int) -> Int8Groups:
    """``rows`` with zero rows (codes 0, scale 1) appended up to ``num_rows`` (the padded vocabulary's)."""
    pad = num_rows - rows.codes.shape[0]
    if pad == 0:
        return Int8Groups(rows.codes.contiguous(), rows.scale.contiguous(), None, rows.group_size)
    codes = torch.cat([rows.codes, rows.codes.new_zeros(pad, rows.codes.shape[1])])
    scale = torch.cat([rows.scale, rows.scale.new_ones(pad, rows.scale.shape[1])])
    return Int8Groups(codes, scale, None, rows.group_size)
