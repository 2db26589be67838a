"""A GGUF Q6_K or Q5_K matrix as its file stores it: int8 codes with a scale (and an offset) per group of columns,
handed from the loader to the linear layers without dequantizing (the int4 sibling: int4_groups.py).

``w[n, G g + j] = scale[n, g] * codes[n, G g + j] (+ offset[n, g])``, the layout of kernels/quant_reference.py's
int8 groups, which the C++ ``int8_group_matmul`` reads as it is:

- Q6_K sub-blocks of 16: ``w = d * sc * q``, q in -32..31, sc int8: symmetric groups of 16, scale ``d * sc``.
- Q5_K sub-blocks of 32: ``w = d * sc * q - dmin * m``, q in 0..31: groups of 32 with the offset ``-dmin * m``
  (the codes are kept 0..31, not shifted, so that scale and offset are the file's numbers, not re-rounded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.quant_reference import dequantize_int8_groups

# GGUF formats whose decoder linears the loader hands over as int8 groups: format -> group size
INT8_GROUP_FORMATS = {"Q5_K": 32, "Q6_K": 16}


@dataclass
class Int8Groups:
    codes: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K / group_size] float32
    offset: torch.Tensor | None  # [N, K / group_size] float32, or None (symmetric)
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scale) if self.offset is None else (self.codes, self.scale, self.offset)
        return sum(t.numel() * t.element_size() for t in parts)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights in ``dtype``, computed in float32 as GGUF's reference does."""
        return dequantize_int8_groups(self.codes, self.scale, self.offset, self.group_size).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int8Groups:
        """The same matrix with its rows rearranged by ``fn`` (a row permutation, a slice of rows)."""
        offset = fn(self.offset) if self.offset is not None else None
        return Int8Groups(fn(self.codes), fn(self.scale), offset, self.group_size)

    def narrow(self, dim: int, start: int, size: int) -> Int8Groups:
        """Rows (dim 0) or columns (dim 1, whole groups only) ``start .. start + size``."""
        if dim == 0:
            return self.map_rows(lambda t: t.narrow(0, start, size))
        g = self.group_size
        if start % g or size % g:
            raise ValueError(f"columns [{start}, {start + size}) are not whole groups of {g}")
        offset = self.offset.narrow(1, start // g, size // g) if self.offset is not None else None
        return Int8Groups(self.codes.narrow(1, start, size), self.scale.narrow(1, start // g, size // g), offset, g)

    def same_kind(self, other: Int8Groups) -> bool:
        """Whether ``other`` can be stacked with this one into one layer (same group size, offsets or not)."""
        return self.group_size == other.group_size and (self.offset is None) == (other.offset is None)


def cat_rows(parts: list[Int8Groups]) -> Int8Groups:
    """Stack matrices of the same kind (:meth:`Int8Groups.same_kind`) along the output rows."""
    first = parts[0]
    offset = torch.cat([p.offset for p in parts if p.offset is not None]) if first.offset is not None else None
    return Int8Groups(
        torch.cat([p.codes for p in parts]).contiguous(),
        torch.cat([p.scale for p in parts]).contiguous(),
        offset.contiguous() if offset is not None else None,
        first.group_size,
    )
