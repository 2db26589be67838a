"""Verification of drafts: the sampler rows of a sequence with drafts, and how many of them were accepted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from ..layers.sampler import SamplingRow


@dataclass
class RowGroup:
    """A sequence that samples this step: its logits rows are ``first_row .. first_row + len(drafts)``."""

    seq: Sequence
    first_row: int
    drafts: list[int]


def verification_rows(row: SamplingRow, drafts: list[int]) -> list[SamplingRow]:
    """Row j (0..k) sees the output followed by drafts[:j] and verifies drafts[j]; row k only samples."""
    if not drafts:
        return [row]
    output = list(row.output_token_ids)
    return [
        dataclasses.replace(
            row,
            output_token_ids=output + drafts[:j],
            draft_token_id=drafts[j] if j < len(drafts) else None,
        )
        for j in range(len(drafts) + 1)
    ]


def accepted_length(accepted: list[bool]) -> int:
    """Drafts accepted: the leading run of accepted rows (the first rejection ends it)."""
    n = 0
    for ok in accepted:
        if not ok:
            break
        n += 1
    return n
