"""One step's model input as host lists: what rank 0 plans from the scheduler's batch and broadcasts to the
tensor-parallel workers, who rebuild the same tensors from it (no scheduler state leaves rank 0)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..kernels.interface import AttentionMetadata
from .scheduler import ScheduledSeq


@dataclass
class StepInput:
    input_ids: list[int]  # [T], decodes first, then prefill chunks
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    block_tables: list[list[int]]  # [num_seqs][blocks], unpadded
    seq_lens: list[int]  # [num_seqs]
    query_start_loc: list[int]  # [num_seqs + 1]
    num_decode_tokens: int
    # the tokens whose logits leave the model, ascending: per sequence its prompt-logprob rows, then its sampled one
    logit_rows: list[int]

    @property
    def is_decode_only(self) -> bool:
        return self.num_decode_tokens == len(self.seq_lens)


def prompt_logprob_positions(s: ScheduledSeq) -> range:
    """The positions of this step whose logits score the next prompt token (position p scores token p + 1):
    those of the chunk not scored yet, short of the last prompt token (its logits sample the first output)."""
    seq = s.seq
    if not seq.needs_prompt_logprobs:
        return range(0)
    assert seq.request.prompt_logprobs is not None
    first = max(s.start, len(seq.request.prompt_logprobs) - 1)
    return range(first, max(first, min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)))


def plan_step(items: list[ScheduledSeq], block_size: int) -> StepInput:
    """items ordered decodes (one query token) first. A sequence with drafts feeds them after its new tokens, and
    all of its ``1 + len(drafts)`` last positions give logits."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    seq_lens: list[int] = []
    query_start_loc = [0]
    block_tables: list[list[int]] = []
    logit_rows: list[int] = []
    for s in items:
        seq, start, end = s.seq, s.start, s.start + s.num_query_tokens
        table = seq.block_table
        input_ids.extend(seq.token_ids[start : s.start + s.num_new_tokens])
        input_ids.extend(s.draft_token_ids)
        positions.extend(range(start, end))
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        seq_lens.append(end)
        first_row = query_start_loc[-1] - start
        logit_rows.extend(first_row + p for p in prompt_logprob_positions(s))
        query_start_loc.append(query_start_loc[-1] + s.num_query_tokens)
        logit_rows.extend(range(query_start_loc[-1] - s.num_sample_rows, query_start_loc[-1]))
        block_tables.append(list(table))
    return StepInput(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
        num_decode_tokens=sum(1 for s in items if s.num_query_tokens == 1),
        logit_rows=logit_rows,
    )


def step_tensors(step: StepInput, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids [T], positions [T], the attention metadata) on ``device``."""
    width = max(len(t) for t in step.block_tables)
    padded = [t + [0] * (width - len(t)) for t in step.block_tables]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(step.query_start_loc, dtype=torch.int32, device=device),
        max_query_len=max(b - a for a, b in zip(step.query_start_loc, step.query_start_loc[1:], strict=False)),
        max_seq_len=max(step.seq_lens),
        num_decode_tokens=step.num_decode_tokens,
        seq_lens_cpu=step.seq_lens,
        query_start_loc_cpu=step.query_start_loc,
    )
    ids = torch.tensor(step.input_ids, dtype=torch.int64, device=device)
    pos = torch.tensor(step.positions, dtype=torch.int64, device=device)
    return ids, pos, md


def split_step(step: StepInput, num_microbatches: int) -> list[StepInput]:
    """Contiguous runs of sequences, about equal in count (each keeps decodes first): the micro-batches a pipeline
    passes from stage to stage within one step. Their logit rows, concatenated, are the step's."""
    num_seqs = len(step.seq_lens)
    m = max(1, min(num_microbatches, num_seqs))
    bounds = [num_seqs * i // m for i in range(m + 1)]
    qsl = step.query_start_loc
    parts = []
    for a, b in itertools.pairwise(bounds):
        lo, hi = qsl[a], qsl[b]
        parts.append(
            StepInput(
                input_ids=step.input_ids[lo:hi],
                positions=step.positions[lo:hi],
                slot_mapping=step.slot_mapping[lo:hi],
                block_tables=step.block_tables[a:b],
                seq_lens=step.seq_lens[a:b],
                query_start_loc=[x - lo for x in qsl[a : b + 1]],
                num_decode_tokens=max(0, min(b, step.num_decode_tokens) - a),
                logit_rows=[r - lo for r in step.logit_rows if lo <= r < hi],
            )
        )
    return parts
