"""Pipeline parallelism within a step: GPipe's forward schedule over micro-batches.

The step's sequences are split into M contiguous micro-batches (engine/step_input.split_step, M = 2 x stages at
most). Each stage runs its layers on micro-batch i as soon as the previous stage has sent i's activations (hidden and
residual, [T_i, H] each, torch.distributed send/recv between the same tensor-parallel rank of adjacent stages), and
sends them on without waiting (isend). So with S stages and M micro-batches the schedule is

    stage 0:  mb0 mb1 mb2 mb3 .   .   .
    stage 1:  .   mb0 mb1 mb2 mb3 .   .         each stage idles S - 1 of the M + S - 1 slots (fill and drain)
    stage 2:  .   .   mb0 mb1 mb2 mb3 .

and micro-batches are in flight on different stages at once. The last stage computes each micro-batch's logits and
its tensor-parallel rank 0 sends them to rank 0, which samples. (A schedule that overlaps consecutive engine steps
would remove the fill and drain, but needs the scheduler to plan a step before the previous one is sampled.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..engine.step_input import StepInput, split_step, step_tensors

if TYPE_CHECKING:
    from ..engine.model_runner import ModelRunner

LOGITS_TAG = 1 << 20


@dataclass
class StageClock:
    """Where one rank's pipelined steps went: computing its layers (and the head) vs the whole step (the rest is
    waiting on the other stages: fill, drain, imbalance). Written at shutdown to $KUBELLM_PIPELINE_TIMING, a JSON
    line per rank, when that is set (bench/pipeline_idle.py)."""

    rank: int = 0
    stage: int = 0
    steps: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    microbatches: int = 0

    def report(self) -> None:
        path = os.environ.get("KUBELLM_PIPELINE_TIMING")
        if path and self.steps:
            with open(path, "a") as f:
                f.write(json.dumps(asdict(self)) + "\n")


def run_pipelined(runner: ModelRunner, step: StepInput) -> torch.Tensor | None:
    """One step through this rank's stage. Returns the logits [N, vocab] float32 on rank 0, None elsewhere."""
    group = runner.group
    assert group is not None
    stage, tp, model = group.stage, group.tp, runner.model
    tp_size = tp.size
    prev_rank = (stage.rank - 1) * tp_size + tp.rank
    next_rank = (stage.rank + 1) * tp_size + tp.rank
    last_rank0 = (stage.size - 1) * tp_size  # the last stage's tensor-parallel rank 0
    hidden_size = model.config.hidden_size
    microbatches = split_step(step, 2 * stage.size)
    clock = runner.stage_clock
    step_start = time.perf_counter()
    pending: list[dist.Work | None] = []
    logits: list[torch.Tensor] = []
    for i, mb in enumerate(microbatches):
        input_ids, positions, md = step_tensors(mb, runner.device)
        if stage.is_first:
            started = time.perf_counter()
            hidden, residual = model.forward_stage(positions, runner.kv_caches, md, input_ids=input_ids)
        else:
            hidden = torch.empty(len(mb.input_ids), hidden_size, dtype=runner.dtype, device=runner.device)
            residual = torch.empty_like(hidden)
            dist.recv(hidden, src=prev_rank, tag=2 * i)
            dist.recv(residual, src=prev_rank, tag=2 * i + 1)
            started = time.perf_counter()
            hidden, residual = model.forward_stage(positions, runner.kv_caches, md, hidden=hidden, residual=residual)
        assert residual is not None
        if not stage.is_last:
            clock.busy_s += time.perf_counter() - started
            pending.append(dist.isend(hidden.contiguous(), dst=next_rank, tag=2 * i))
            pending.append(dist.isend(residual.contiguous(), dst=next_rank, tag=2 * i + 1))
        elif not mb.logit_rows:
            clock.busy_s += time.perf_counter() - started
        else:
            rows = torch.tensor(mb.logit_rows, dtype=torch.int64, device=hidden.device)
            out = model.compute_logits(model.final_norm(hidden, residual)[rows])
            clock.busy_s += time.perf_counter() - started
            if tp.rank == 0 and group.rank != 0:
                pending.append(dist.isend(out, dst=0, tag=LOGITS_TAG + i))
            logits.append(out)
    if group.rank == 0 and not stage.is_last:  # rank 0 samples: the last stage sends it the logits
        vocab = model.config.vocab_size
        for i, mb in enumerate(microbatches):
            if mb.logit_rows:
                out = torch.empty(len(mb.logit_rows), vocab, dtype=torch.float32, device=runner.device)
                dist.recv(out, src=last_rank0, tag=LOGITS_TAG + i)
                logits.append(out)
    for work in pending:
        if work is not None:
            work.wait()
    clock.steps += 1
    clock.microbatches += len(microbatches)
    clock.wall_s += time.perf_counter() - step_start
    if group.rank != 0:
        return None
    if not logits:
        return torch.empty(0, model.config.vocab_size, dtype=torch.float32, device=runner.device)
    return torch.cat(logits)
