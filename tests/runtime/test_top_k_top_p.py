"""top-k / top-p without a whole-row sort where top-k bounds the row, against the written form that sorts every row
(the sampler's code before): the same logits bit for bit on random batches, ties (bfloat16-rounded logits),
grammar-style -inf masks, rows without top-k or top-p mixed in."""

from __future__ import annotations

import random

import torch

from kubellm.runtime.layers.top_k_top_p import _top_p_of_kept, apply_top_k_top_p

NEG_INF = float("-inf")


def written_form(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    vocab_size = logits.shape[1]
    if any(k > 0 for k in top_ks):
        ks = [min(k, vocab_size) if k > 0 else vocab_size for k in top_ks]
        top_vals = logits.topk(max(ks), dim=-1).values
        kth = top_vals.gather(1, torch.tensor(ks)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if any(p < 1.0 for p in top_ps):
        top_p = torch.tensor(top_ps)[:, None]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def random_batch(rng: random.Random) -> tuple[torch.Tensor, list[int], list[float]]:
    vocab_size = rng.choice([8, 100, 4096, 49152])
    num_rows = rng.randint(1, 16 if vocab_size < 49152 else 4)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(num_rows, vocab_size, generator=gen) * rng.choice([0.5, 3.0, 10.0])
    if rng.random() < 0.5:
        logits = logits.bfloat16().float()  # coarse values: many ties
    if rng.random() < 0.3:  # a grammar leaves few tokens, sometimes fewer than top_k
        logits[torch.rand(num_rows, vocab_size, generator=gen) < rng.choice([0.5, 0.99])] = NEG_INF
        logits[:, 0] = 0.0
    top_ks = [rng.choice([0, 1, 2, 5, 50, 50, 100]) for _ in range(num_rows)]
    if rng.random() < 0.3:
        top_ks = [0] * num_rows
    top_ps = [rng.choice([1.0, 0.9, 0.9, 0.5, 0.95, 0.1]) for _ in range(num_rows)]
    return logits, top_ks, top_ps


def test_bit_identical_to_the_sorting_form() -> None:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    rng = random.Random(seed)
    for _ in range(200):
        logits, top_ks, top_ps = random_batch(rng)
        original = logits.clone()
        expected = written_form(logits.clone(), top_ks, top_ps)
        got = apply_top_k_top_p(logits, top_ks, top_ps)
        assert torch.equal(got, expected), (top_ks, top_ps)
        assert torch.equal(logits, original)  # a new tensor: the caller's is left as it was


def test_distinct_values_are_decided_without_the_sort_and_ties_at_the_cut_are_not() -> None:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(seed))
    vals, ids = logits.topk(50, dim=-1)
    _, slow = _top_p_of_kept(logits, vals, ids, torch.full((4, 1), 0.5))
    assert not slow.any()  # float32 normal draws: no two equal values
    # two equal values where the cut falls: probabilities 0.4, 0.3, 0.3 and top_p 0.5 keep one of the 0.3s
    tied = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    vals, ids = tied.topk(3, dim=-1)
    _, slow = _top_p_of_kept(tied, vals, ids, torch.tensor([[0.5]]))
    assert slow.tolist() == [True]
    assert torch.equal(apply_top_k_top_p(tied.clone(), [3], [0.5]), written_form(tied.clone(), [3], [0.5]))
