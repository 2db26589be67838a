"""The sampler's sparse penalties against their dense written form (count matrices over the whole vocabulary, as
the sampler computed them before): bit-identical on random batches, with ties, -inf entries and negative values."""

from __future__ import annotations

import random

import torch

from kubellm.runtime.layers.sampler import SamplingRow, apply_penalties
from kubellm.runtime.sampling_params import SamplingParams


def dense_counts(token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """[num_rows, vocab_size] float32 counts of each token id in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32)
    for i, tokens in enumerate(token_lists):
        for t in tokens:
            counts[i, t] += 1
    return counts


def dense_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The reference: every entry of every row gets every penalty (zero counts leave it unchanged)."""
    vocab_size = logits.shape[1]
    params = [r.params for r in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = dense_counts([[*r.prompt_token_ids, *r.output_token_ids] for r in rows], vocab_size) > 0
        rep = torch.tensor([p.repetition_penalty for p in params])[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = dense_counts([list(r.output_token_ids) for r in rows], vocab_size)
        freq = torch.tensor([p.frequency_penalty for p in params])[:, None]
        pres = torch.tensor([p.presence_penalty for p in params])[:, None]
        logits = logits - freq * counts - pres * (counts > 0).float()
    return logits


def random_batch(rng: random.Random, vocab_size: int) -> tuple[torch.Tensor, list[SamplingRow]]:
    num_rows = rng.randint(1, 12)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    # bfloat16-rounded logits tie often; some entries masked (a grammar's -inf) and some exactly 0
    logits = (torch.randn(num_rows, vocab_size, generator=gen) * 4).bfloat16().float()
    logits[torch.rand(num_rows, vocab_size, generator=gen) < 0.05] = float("-inf")
    logits[torch.rand(num_rows, vocab_size, generator=gen) < 0.02] = 0.0
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(
            temperature=0.8,
            repetition_penalty=rng.choice([1.0, 1.0, 1.1, 1.7, 0.9]),
            presence_penalty=rng.choice([0.0, 0.0, 0.5, -1.3, 2.0]),
            frequency_penalty=rng.choice([0.0, 0.0, 0.3, -0.7, 1.9]),
        )
        # small id ranges: many repeats per row
        prompt = [rng.randrange(min(vocab_size, 40)) for _ in range(rng.randint(0, 30))]
        output = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 20))]
        output += [rng.choice(prompt or [0]) for _ in range(rng.randint(0, 10))]
        rows.append(SamplingRow(params, prompt, output))
    return logits, rows


def test_sparse_penalties_are_bit_identical_to_the_dense_form() -> None:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    rng = random.Random(seed)
    for _ in range(200):
        logits, rows = random_batch(rng, rng.choice([8, 97, 1000]))
        expected = dense_penalties(logits.clone(), rows)
        got = apply_penalties(logits.clone(), rows)
        # -0.0 and 0.0 compare equal (and sample alike); every other bit must match
        assert torch.equal(got, expected), [r.params for r in rows]


def test_rows_without_penalties_and_empty_lists_are_untouched() -> None:
    logits = torch.randn(3, 16)
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=1.5, presence_penalty=1.0), [], []),
        SamplingRow(SamplingParams(), [1, 2, 3], [4, 4]),
        SamplingRow(SamplingParams(frequency_penalty=1.0), [5], [6, 6, 6]),
    ]
    got = apply_penalties(logits.clone(), rows)
    assert torch.equal(got[:2], logits[:2])
    assert torch.equal(got[2, 6], logits[2, 6] - 3.0)
    assert torch.equal(got[2, :6], logits[2, :6]) and torch.equal(got[2, 7:], logits[2, 7:])
