"""Sampler: logits processors, greedy / random sampling and logprobs for a batch of rows, each with its own
SamplingParams. Everything works on whole [num_rows, vocab] tensors, except the penalties (on the entries of the
tokens each row has seen) and top-p where top-k bounds a row (on its kept tokens: top_k_top_p.py); Python only
loops over rows.

Order: grammar bitmask (structured outputs: one bitmask for the constrained rows, applied in one op; free rows
untouched) -> penalties (repetition, presence, frequency) -> logit_bias, allowed_token_ids, bad_words ->
min_tokens suppression of EOS/stop ids -> logprobs (log-softmax of these processed logits) -> greedy argmax, or
temperature -> top_k -> top_p -> min_p -> sample. The grammar goes first so that nothing after it (a +100 bias)
can bring back a token it forbids; min_tokens yields to it (when the grammar allows only its stop token, the stop
token stays). The sampler never advances a grammar for good: the engine calls ``row.grammar.accept(token)`` after it
appended the token.

Speculative decoding: a row with a ``draft_token_id`` verifies that draft. Its processed distribution p is the
target's at that position (the row's output ids include the drafts before it; a grammar row is filled with the
matcher advanced over them, then rolled back). The draft (a deterministic guess, q = one-hot) is accepted with
probability p(draft) (greedy: when it is the argmax); when rejected the token is drawn from p without the draft,
renormalised, so each emitted token is distributed exactly as p (Leviathan et al. 2023, with q one-hot).
Sampling draws ``argmax(probs / E)`` with E ~ Exp(1) (the "exponential race", equivalent to multinomial); a
seeded row draws E from its own ``torch.Generator`` so its choice does not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from .top_k_top_p import apply_top_k_top_p

if TYPE_CHECKING:  # xgrammar is imported only when a batch holds a constrained row (the engine runs without it)
    from ..structured_outputs.state import GrammarState


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row besides its logits."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = frozenset()
    grammar: GrammarState | None = None  # structured outputs: the tokens it allows next are the only candidates
    # speculation: the draft this row verifies. Rows of one sequence are consecutive and share its grammar state
    draft_token_id: int | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # a verified row: its draft when accepted, else the token drawn in its place
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)  # per row: its draft was accepted (False without one)


def score_tokens(logits: torch.Tensor, targets: list[int], num_top: int) -> list[TokenLogprob]:
    """Row i's log-probability of ``targets[i]`` under the raw distribution ``logits[i]`` [k, vocab], with its rank
    and the ``num_top`` most likely tokens: prompt logprobs, as vLLM computes them (no penalties, no temperature)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, dtype=torch.int64, device=logprobs.device)
    picked = logprobs.gather(1, target[:, None])
    ranks = (logprobs > picked).sum(dim=1).add_(1).tolist()
    picked_l = picked.squeeze(1).tolist()
    top_vals, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0])
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.long().tolist()
    return [
        TokenLogprob(token_id=t, logprob=lp, top=list(zip(ids, vals, strict=True)), rank=rank)
        for t, lp, rank, ids, vals in zip(targets, picked_l, ranks, top_ids_l, top_vals_l, strict=True)
    ]


def _seen_entries(
    token_lists: Seq[Seq[int]], row_ids: list[int], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse counts of the tokens of row ``row_ids[j]`` in ``token_lists[j]``: (j [N], row [N], token id [N],
    count [N] float32), one entry per distinct (row, token) pair. O(tokens), not O(rows x vocab): one flat tensor
    and one sort, no Python loop over tokens."""
    flat: list[int] = []
    lengths: list[int] = []
    for tokens in token_lists:
        flat.extend(tokens)
        lengths.append(len(tokens))
    sub = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lengths, dtype=torch.int64))
    keys = sub * vocab_size + torch.tensor(flat, dtype=torch.int64)  # (j, token) as one sortable key
    unique, counts = torch.unique(keys, return_counts=True)
    sub = unique // vocab_size
    row = torch.tensor(row_ids, dtype=torch.int64)[sub]
    return sub.to(device), row.to(device), (unique % vocab_size).to(device), counts.float().to(device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (tokens of the prompt and the output), then presence and frequency (output tokens only), on
    the entries of the tokens each row has seen; every other entry is untouched (the dense form would leave it
    unchanged too). Each entry gets the dense form's float32 ops in its order, so the result is bit-identical to
    it (tests/runtime/test_sampler_penalties.py), at a cost that grows with the tokens seen, not rows x vocab."""
    vocab_size = logits.shape[1]
    device = logits.device
    rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_rows:  # a row with penalty 1.0 would be unchanged: l / 1 == l * 1 == l
        seen = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in rep_rows]
        sub, row, tok, _ = _seen_entries(seen, rep_rows, vocab_size, device)
        rep = torch.tensor([rows[i].params.repetition_penalty for i in rep_rows], device=device)[sub]
        picked = logits[row, tok]
        logits = logits.index_put((row, tok), torch.where(picked > 0, picked / rep, picked * rep))
    pen_rows = [i for i, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if pen_rows:  # a row without them would be unchanged: l - 0 * c - 0 * 1 == l
        outputs = [rows[i].output_token_ids for i in pen_rows]
        sub, row, tok, counts = _seen_entries(outputs, pen_rows, vocab_size, device)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in pen_rows], device=device)[sub]
        pres = torch.tensor([rows[i].params.presence_penalty for i in pen_rows], device=device)[sub]
        # the dense form's order: l - freq * count - pres * (count > 0), each op in float32
        logits = logits.index_put((row, tok), logits[row, tok] - freq * counts - pres)
    return logits


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._bitmask: torch.Tensor | None = None  # reused across steps: [rows, ceil(vocab / 32)] int32

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [num_rows, vocab_size] float32 (modified in place) -> one token per row."""
        num_rows, vocab_size = logits.shape
        assert num_rows == len(rows), (num_rows, len(rows))
        params = [r.params for r in rows]

        # 0. grammars
        self._apply_grammars(logits, rows)

        # 1. penalties
        logits = apply_penalties(logits, rows)

        # 2. token controls, then min_tokens: EOS and stop ids cannot be sampled yet
        logits = _apply_token_controls(logits, rows)
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(r.eos_token_ids))
                banned_ids = [t for t in banned if t < vocab_size]
                if banned_ids:
                    kept = logits[i].clone() if r.grammar is not None else None
                    logits[i, banned_ids] = float("-inf")
                    if kept is not None and not torch.isfinite(logits[i]).any():
                        logits[i] = kept  # the grammar is complete: its stop token must stay possible

        # 3. logprobs of the processed logits
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

        # 4. choose: greedy rows keep the argmax; random rows race (verifying rows: accept or draw the rest)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(random_rows) == num_rows:  # no row to gather, no argmax to throw away
            token_ids = self._sample(logits, rows)
        else:
            token_ids = logits.argmax(dim=-1)
            if random_rows:
                token_ids[random_rows] = self._sample(logits[random_rows], [rows[i] for i in random_rows])
        chosen = token_ids.tolist()
        accepted = [r.draft_token_id is not None and chosen[i] == r.draft_token_id for i, r in enumerate(rows)]

        out_logprobs: list[TokenLogprob | None] = [None] * num_rows
        if logprobs is not None:
            max_top = max(params[i].logprobs or 0 for i in want_logprobs)
            picked = logprobs.gather(1, token_ids[want_logprobs][:, None]).squeeze(1).tolist()
            top_vals, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (logprobs[:, :0], logprobs[:, :0])
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.long().tolist()
            for j, i in enumerate(want_logprobs):
                n = params[i].logprobs or 0
                out_logprobs[i] = TokenLogprob(
                    token_id=chosen[i],
                    logprob=picked[j],
                    top=list(zip(top_ids_l[j][:n], top_vals_l[j][:n], strict=True)),
                )
        return SamplerOutput(chosen, out_logprobs, accepted)

    def _apply_grammars(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """One bitmask for the batch, filled for the constrained rows and applied to them in one op."""
        grammars = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if not grammars:
            return
        from ..structured_outputs.state import allocate_bitmask, apply_bitmask

        vocab_size = max(g.compiled.vocab_size for _, g in grammars)
        words = (vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(rows) or self._bitmask.shape[1] != words:
            self._bitmask = allocate_bitmask(max(len(rows), 8), vocab_size)
        bitmask = self._bitmask[: len(rows)]  # rows of free sequences are neither filled nor read
        filled: list[int] = []
        advanced: dict[int, tuple[GrammarState, int]] = {}  # id(state) -> (state, drafts accepted into it)
        ended: set[int] = set()  # states whose draft chain they refused or that terminated on a draft
        for i, grammar in grammars:
            key = id(grammar)
            if key in ended:
                continue  # a later row of a chain that an earlier row rejects: its token is never used
            grammar.fill_bitmask(bitmask, i)
            filled.append(i)
            draft = rows[i].draft_token_id
            if draft is None:
                continue
            if grammar.accept(draft):
                state, n = advanced.get(key, (grammar, 0))
                advanced[key] = (state, n + 1)
                if grammar.is_terminated():
                    ended.add(key)
            else:
                ended.add(key)  # the bitmask of this row forbids the draft, so it is rejected here
        for state, n in advanced.values():
            state.rollback(n)
        apply_bitmask(logits, bitmask, filled, vocab_size)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits: [R, V] of the random rows -> [R] sampled ids."""
        device = logits.device
        params = [r.params for r in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        logits = logits / temperature
        logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        race = torch.empty_like(probs)
        # the unseeded rows draw in one go from the engine's stream, a seeded row from its own (the same numbers
        # whether it runs alone or in any batch). The draws cover the whole vocabulary, the sampler's largest
        # cost, and stay so: drawing fewer would change every seeded request's tokens.
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            race.exponential_(generator=self._generator(device))  # the same numbers, drawn in place
        elif unseeded:
            shape = (len(unseeded), probs.shape[1])
            race[unseeded] = probs.new_empty(shape).exponential_(generator=self._generator(device))
        for i, r in enumerate(rows):
            if r.generator is not None:
                race[i].exponential_(generator=r.generator)
        verifying = [i for i, r in enumerate(rows) if r.draft_token_id is not None]
        if not verifying:
            return (probs / race).argmax(dim=-1)
        return self._verify(probs, race, rows, verifying)

    def _verify(
        self, probs: torch.Tensor, race: torch.Tensor, rows: list[SamplingRow], verifying: list[int]
    ) -> torch.Tensor:
        """Rejection sampling of one-hot drafts: accept row i's draft d with probability p(d), else draw from p
        with d removed. probs, race: [R, V]; verifying: the rows with a draft."""
        device = probs.device
        drafts = torch.tensor([rows[i].draft_token_id for i in verifying], dtype=torch.int64, device=device)
        index = torch.tensor(verifying, dtype=torch.int64, device=device)
        p_draft = probs[index].gather(1, drafts[:, None]).squeeze(1)  # [D]
        uniform = torch.empty(len(verifying), device=device)
        for j, i in enumerate(verifying):
            generator = rows[i].generator or self._generator(device)
            uniform[j : j + 1].uniform_(generator=generator)
        # the rejected branch: the draft cannot be drawn again
        residual = probs.clone()
        residual[index, drafts] = 0.0
        token_ids = (residual / race).argmax(dim=-1)
        token_ids[index] = torch.where(uniform < p_draft, drafts, token_ids[index])
        return token_ids


def _apply_token_controls(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logit_bias (added), allowed_token_ids (everything else -inf), bad_words (-inf for the last token of a bad
    word whose other tokens the output just produced); each as one indexed op over the batch."""
    vocab_size = logits.shape[1]
    device = logits.device
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    restricted_rows: list[int] = []  # rows with allowed_token_ids
    allowed_rows: list[int] = []
    allowed_cols: list[int] = []
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for i, r in enumerate(rows):
        p = r.params
        for token_id, bias in (p.logit_bias or {}).items():
            if token_id < vocab_size:
                bias_rows.append(i)
                bias_ids.append(token_id)
                bias_vals.append(bias)
        if p.allowed_token_ids is not None:
            restricted_rows.append(i)
            for token_id in p.allowed_token_ids:
                if token_id < vocab_size:
                    allowed_rows.append(i)
                    allowed_cols.append(token_id)
        if p.bad_words:
            if p.bad_words_token_ids is None:
                raise ValueError("bad_words were not resolved to token ids (call SamplingParams.resolve_bad_words)")
            for ids in _banned_next_tokens(p.bad_words_token_ids, r.output_token_ids):
                if ids < vocab_size:
                    banned_rows.append(i)
                    banned_ids.append(ids)
    if bias_rows:
        logits = logits.index_put(
            (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device)),
            torch.tensor(bias_vals, device=device, dtype=logits.dtype),
            accumulate=True,
        )
    if restricted_rows:
        # keep: [num_rows, vocab] True where sampling stays possible
        keep = torch.ones(logits.shape[0], 1, dtype=torch.bool, device=device).repeat(1, vocab_size)
        keep[restricted_rows] = False
        if allowed_rows:
            keep[torch.tensor(allowed_rows, device=device), torch.tensor(allowed_cols, device=device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if banned_rows:
        logits = logits.index_put(
            (torch.tensor(banned_rows, device=device), torch.tensor(banned_ids, device=device)),
            torch.tensor(float("-inf"), device=device, dtype=logits.dtype),
        )
    return logits


def _banned_next_tokens(bad_words: list[list[int]], output: Seq[int]) -> list[int]:
    """The last token of each bad word whose preceding tokens end the output (a one-token word: always)."""
    banned = []
    for ids in bad_words:
        if not ids:
            continue
        prefix = ids[:-1]
        if len(prefix) <= len(output) and (not prefix or list(output[len(output) - len(prefix) :]) == prefix):
            banned.append(ids[-1])
    return banned
