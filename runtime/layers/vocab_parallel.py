"""The vocabulary split over tensor-parallel ranks: the embedding and the head each hold ``per_rank`` rows.

The vocabulary is padded to ``size * per_rank``; the padded rows are zeros. Embedding: each rank looks up the ids
in its range (others read row 0 and are zeroed), then one all-reduce adds the ranks' rows. Head: each rank
computes its slice of the logits; the slices are gathered in rank order and the padding dropped. With one rank
both are the plain embedding and matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel import TensorParallel
from ..quantization.int4_groups import CodeGroups, Weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.start, self.per_rank = tp.vocab_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)

    def load_weight(self, param: str, tensor: Weight) -> None:
        """The checkpoint's whole [vocab_size, hidden] matrix -> this rank's rows (zeros past the vocabulary)."""
        if isinstance(tensor, CodeGroups):  # a GGUF's K-quant / Q8_0 embedding: dequantized
            tensor = tensor.dense(self.weight.dtype)
        expected = (self.vocab_size, self.weight.shape[1])
        if param != "weight" or tuple(tensor.shape) != expected:
            raise ValueError(f"{param}: checkpoint has shape {tuple(tensor.shape)}, expected {expected}")
        num_rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        self.weight.data[:num_rows].copy_(tensor.narrow(0, self.start, num_rows))
        self.weight.data[num_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.masked_fill(~inside, 0), self.weight)
        out.masked_fill_(~inside[:, None], 0)
        return self.tp.all_reduce(out)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[N, per_rank] (this rank's columns of the logits) -> [N, vocab_size] on every rank."""
        return self.tp.all_gather_last(local)[:, : self.vocab_size]
