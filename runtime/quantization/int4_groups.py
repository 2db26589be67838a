"""A 4-bit matrix as a GGUF file stores it, handed from the loader to the linear layers without dequantizing.

``w[n, 32 g + j] = scale[n, g] * codes[n, 32 g + j] + minimum[n, g]`` with codes in 0..15: GGUF's Q4_K sub-blocks
(``scale = d * sc``, ``minimum = -dmin * m``) have exactly the layout of torch's CPU int4 kernel (asymmetric groups
of 32 columns), so an int4 layer takes the file's codes and scales as they are. Any other consumer (a dense layer,
the embedding) asks for :meth:`Int4Groups.dense`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .int8_groups import Int8Groups

GROUP_SIZE = 32
# GGUF formats whose decoder linears the loader hands over as their codes (Int4Groups) instead of dequantized.
INT4_GROUP_FORMATS = frozenset({"Q4_K"})


@dataclass
class Int4Groups:
    codes: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K / 32] float32
    minimum: torch.Tensor  # [N, K / 32] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights in ``dtype``, computed in float32 as GGUF's reference does (``scale * q - dmin * m``)."""
        n, k = self.codes.shape
        q = self.codes.reshape(n, k // GROUP_SIZE, GROUP_SIZE).to(torch.float32)
        w = q * self.scale[..., None] + self.minimum[..., None]
        return w.reshape(n, k).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Groups:
        """The same matrix with its rows rearranged by ``fn`` (a row permutation, a slice of rows)."""
        return Int4Groups(fn(self.codes), fn(self.scale), fn(self.minimum))

    def narrow(self, dim: int, start: int, size: int) -> Int4Groups:
        """Rows (dim 0) or columns (dim 1, whole groups only) ``start .. start + size``."""
        if dim == 0:
            return self.map_rows(lambda t: t.narrow(0, start, size))
        if start % GROUP_SIZE or size % GROUP_SIZE:
            raise ValueError(f"columns [{start}, {start + size}) are not whole groups of {GROUP_SIZE}")
        g0, gs = start // GROUP_SIZE, size // GROUP_SIZE
        codes = self.codes.narrow(1, start, size)
        return Int4Groups(codes, self.scale.narrow(1, g0, gs), self.minimum.narrow(1, g0, gs))


CodeGroups = (Int4Groups, Int8Groups)  # a GGUF matrix as its file's codes (for isinstance)
Weight = torch.Tensor | Int4Groups | Int8Groups  # what a checkpoint's loader yields per tensor


def cat_rows(parts: list[Int4Groups]) -> Int4Groups:
    return Int4Groups(
        torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), torch.cat([p.minimum for p in parts])
    )
