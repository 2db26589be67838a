"""Draft-model speculation: a smaller model with the target's tokenizer guesses each sequence's next k tokens.

The draft decodes greedily, so its proposal distribution is one-hot: its drafts are exactly what the sampler's
rejection sampling already verifies for ngram (accept d with probability p(d), else sample the residual p without
d). Greedy output is therefore identical to non-speculative output, and sampled output keeps the target's
distribution, whatever the draft proposes; the draft only decides how many tokens a step yields.

Each step, for the sequences that speculate, in one batch::

    catch up   feed what the draft's cache lacks: the whole prompt the first time (chunked within
               max_num_batched_tokens), else the drafts the target accepted and the token it sampled after them
               (an extend over the paged cache)                                     -> d0 = argmax
    k - 1 x    feed d[j-1] to every sequence still guessing (a batched decode)        -> d[j] = argmax

The draft's cache then holds ``token_ids + d0 .. d[k-2]``. At the next proposal it keeps the prefix the target
kept (its tokens up to the last proposal, then the drafts it accepted); the slots past it are overwritten.

The draft has its own paged KV cache and its own BlockManager with as many blocks as the target's (the engine splits
the KV budget between the two in proportion to their bytes per block, so both hold the same number of tokens). Each
target sequence has a shadow Sequence here: its ``token_ids`` the target's followed by the drafts, its
``num_computed_tokens`` the draft's count, its ``block_table`` the draft's blocks. The shadow is freed whenever the
target frees the sequence (finish, abort, preemption: ``release``). A sequence whose draft blocks cannot be had
simply gets no drafts that step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.block_manager import BlockManager
from ..engine.model_runner import ModelRunner
from ..engine.scheduler import ScheduledSeq
from ..engine.sequence import Sequence
from ..engine.step_input import plan_step
from ..quantization.registry import CHECKPOINT_ONLY_FORMATS

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..models.loader import LoadedModel
    from .config import SpeculativeConfig


def load_draft_model(
    spec: SpeculativeConfig, config: EngineConfig, target: LoadedModel, max_model_len: int
) -> LoadedModel:
    """The draft checkpoint (weights still lazy), with the loader the target used; refused (ValueError naming
    ``speculative_config.model``) when its vocabulary is not the target's or its context is shorter."""
    from ..models.loader import load_model

    assert spec.model is not None
    where = f"speculative_config.model {spec.model!r}"
    try:
        draft = load_model(spec.model, load_format=config.load_format)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where} cannot be loaded: {e}") from e
    check_same_vocabulary(target, draft, where)
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(
            f"{where} has max_position_embeddings {draft.config.max_position_embeddings}, shorter than the target's "
            f"max_model_len {max_model_len}: set max_model_len to at most that"
        )
    return draft


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel, where: str) -> None:
    """The draft's token ids must mean the target's tokens: the tokenizers' token -> id maps are equal."""
    t, d = target.tokenizer, draft.tokenizer
    if t is None or d is None:
        if t is not None or d is not None:
            which = "the draft" if d is None else "the target"
            raise ValueError(f"{where}: {which} has no tokenizer, so its vocabulary cannot be compared")
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError(
                f"{where} has vocab_size {draft.config.vocab_size}, the target {target.config.vocab_size}: the draft "
                "must share the target's tokenizer"
            )
        return
    tv, dv = t.backend.get_vocab(with_added_tokens=True), d.backend.get_vocab(with_added_tokens=True)
    if tv == dv:
        if draft.config.vocab_size < len(dv):
            raise ValueError(f"{where} has vocab_size {draft.config.vocab_size}, fewer than its tokenizer's {len(dv)}")
        return
    diffs = [f"{tok!r} is {tv[tok]} in the target, {dv.get(tok)} in the draft" for tok in sorted(tv, key=tv.__getitem__)
             if dv.get(tok) != tv[tok]][:3]  # fmt: skip
    diffs += [f"{tok!r} is only in the draft" for tok in sorted(set(dv) - set(tv))[: 3 - len(diffs)]]
    raise ValueError(
        f"{where} does not share the target's tokenizer ({len(dv)} tokens, the target {len(tv)}; e.g. "
        f"{'; '.join(diffs)}): a draft model must have the target's vocabulary"
    )


@dataclass(eq=False)
class _DraftState:
    shadow: Sequence  # the draft's view of one target sequence
    num_verified: int = 0  # leading tokens of the shadow known to be the target's (the drafts follow them)


class DraftModel:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, *, num_blocks: int, max_model_len: int, vocab_size: int
    ) -> None:
        """``config``: the target's settings (device, dtype, block size, KV cache dtype); ``num_blocks``: the
        target's, for the same token capacity; ``vocab_size``: the target's. Heads padded differently (Qwen2.5
        0.5B has 151936 rows, 7B 152064) share the tokenizer's ids: drafts stay below both sizes."""
        assert config.speculative_config is not None
        draft_config = dataclasses.replace(
            config,
            model=config.speculative_config["model"],
            speculative_config=None,
            num_gpu_blocks=num_blocks,
            # the target's choice, except a checkpoint's own format (awq, gptq, ...): the draft's checkpoint says its
            # own (fp8 is also an online format: a draft with its own fp8 config reads it, a float one is quantized)
            quantization="auto" if config.quantization in CHECKPOINT_ONLY_FORMATS else config.quantization,
            chat_template=None,
            served_model_name=None,
        )
        self.runner = ModelRunner(draft_config, loaded, max_model_len=max_model_len)
        # no prefix caching: a block may hold drafts that are rolled back, and hashed blocks must never change
        self.block_manager = BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
        self.vocab_size = min(vocab_size, loaded.config.vocab_size)  # the ids both models have rows for
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self._states: dict[Sequence, _DraftState] = {}

    @property
    def num_sequences(self) -> int:
        return len(self._states)

    def release(self, seq: Sequence) -> None:
        """The target freed ``seq``'s blocks (finished, aborted, preempted): free the draft's too."""
        state = self._states.pop(seq, None)
        if state is not None:
            self.block_manager.free(state.shadow)

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Sequence, int]]) -> None:
        """Set ``draft_token_ids`` of each (sequence, k) to k greedy guesses; to none while its prompt is still
        being fed to the draft (beyond this step's token budget) or when the draft's cache has no room."""
        budget = self.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        guessing: list[tuple[Sequence, _DraftState, int]] = []
        for seq, k in wanted:
            state = self._sync(seq)
            shadow = state.shadow
            num_missing = shadow.num_tokens - shadow.num_computed_tokens  # >= 1: the last token is always fed
            num_new = min(num_missing, budget)
            if num_new < 1:
                break
            if max(shadow.token_ids[shadow.num_computed_tokens :]) >= self.vocab_size:
                continue  # a padding id of a target with a larger head (its tokenizer has no such token)
            complete = num_new == num_missing
            # slots for the catch-up and the k - 1 drafts fed after it: all or nothing, never an error
            end = shadow.num_computed_tokens + num_new + (k - 1 if complete else 0)
            if not self.block_manager.allocate_slots(shadow, end):
                continue
            items.append(ScheduledSeq.of(shadow, num_new))
            budget -= num_new
            if complete:
                guessing.append((seq, state, k))
        if not items:
            return
        first = self._greedy_step(items)
        drafts = {seq: [first[state.shadow]] for seq, state, _ in guessing}
        for j in range(1, max((k for _, _, k in guessing), default=0)):
            step_items = []
            for seq, state, k in guessing:
                if j < k:
                    state.shadow.token_ids.append(drafts[seq][-1])
                    step_items.append(ScheduledSeq.of(state.shadow, 1))
            tokens = self._greedy_step(step_items)
            for seq, state, k in guessing:
                if j < k:
                    drafts[seq].append(tokens[state.shadow])
        for seq, _, _ in guessing:
            seq.draft_token_ids = drafts[seq]

    def _sync(self, seq: Sequence) -> _DraftState:
        """The draft's state of ``seq``, its tokens brought up to the target's and its count cut back to what the
        target kept: its own tokens up to the last proposal, then the leading drafts the target accepted."""
        state = self._states.get(seq)
        if state is None:
            # its own request copy: the draft never scores prompts (prompt_logprobs) for the target
            request = dataclasses.replace(seq.request, prompt_logprobs=None, seqs=[])
            shadow = Sequence(seq.seq_id, request, seq.index, list(seq.token_ids), seq.num_prompt_tokens)
            state = self._states[seq] = _DraftState(shadow, seq.num_tokens)
            return state
        shadow = state.shadow
        keep = min(state.num_verified, shadow.num_computed_tokens)
        # short of the target's last token: its logits give d0, so it is fed again even when the draft has it
        limit = min(shadow.num_computed_tokens, seq.num_tokens - 1)
        while keep < limit and shadow.token_ids[keep] == seq.token_ids[keep]:
            keep += 1
        shadow.num_computed_tokens = keep
        shadow.token_ids[keep:] = seq.token_ids[keep:]
        state.num_verified = seq.num_tokens
        return state

    def _greedy_step(self, items: list[ScheduledSeq]) -> dict[Sequence, int]:
        """One forward of the draft over ``items`` -> the argmax after each sampling item's last token."""
        order = sorted(items, key=lambda s: s.num_query_tokens != 1)  # decodes first, as the backends want
        step = plan_step(order, self.block_manager.block_size)
        logits = self.runner.execute_step(step)
        assert logits is not None
        tokens = logits[:, : self.vocab_size].argmax(dim=-1).tolist()
        for s in order:
            s.seq.num_computed_tokens += s.num_new_tokens
        return dict(zip([s.seq for s in order if s.samples], tokens, strict=True))
