"""Sampler: each parameter on hand-made logits, logprobs, and seeded reproducibility inside different batches."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.runtime.layers.sampler import Sampler, SamplingRow
from kubellm.runtime.sampling_params import SamplingParams

VOCAB = 8
EOS = 7


def probs_logits(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (padded with ~0 probability up to VOCAB)."""
    p = torch.tensor(probs + [1e-9] * (VOCAB - len(probs)))
    return torch.log(p / p.sum())


def draw(params: SamplingParams, logits: torch.Tensor, n: int = 300, **row: object) -> list[int]:
    sampler = Sampler(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    rows = [SamplingRow(params, [], [], **row) for _ in range(n)]
    return sampler(logits.repeat(n, 1), rows).token_ids


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    out = Sampler()(logits.clone(), [SamplingRow(SamplingParams(temperature=0), [], []) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_temperature_sharpens_and_flattens() -> None:
    logits = probs_logits([0.6, 0.4])
    # At T=0.02 token 1 has probability (0.4/0.6)**50 ~ 2e-9 per draw: never seen in 300 draws. (T=0.05 gave
    # 3e-4 per draw, a 9% chance of one in 300: a flaky test.)
    cold = draw(SamplingParams(temperature=0.02), logits)
    assert set(cold) == {0}
    warm = draw(SamplingParams(temperature=1.0), logits)
    share = warm.count(1) / len(warm)
    assert 0.25 < share < 0.55 and set(warm) <= {0, 1}


def test_top_k() -> None:
    logits = probs_logits([0.3, 0.25, 0.25, 0.2])
    assert set(draw(SamplingParams(top_k=1), logits)) == {0}
    assert set(draw(SamplingParams(top_k=2), logits)) <= {0, 1, 2}
    assert len(set(draw(SamplingParams(top_k=2), logits))) >= 2


def test_top_p() -> None:
    logits = probs_logits([0.5, 0.3, 0.2])
    assert set(draw(SamplingParams(top_p=0.5), logits)) == {0}
    assert set(draw(SamplingParams(top_p=0.6), logits)) == {0, 1}
    assert set(draw(SamplingParams(top_p=1.0), logits)) == {0, 1, 2}


def test_min_p() -> None:
    logits = probs_logits([0.5, 0.3, 0.2])
    assert set(draw(SamplingParams(min_p=0.5), logits)) == {0, 1}  # keeps p >= 0.25
    assert set(draw(SamplingParams(min_p=0.9), logits)) == {0}


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0, -3, -3, -3, -3, -3]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    out = Sampler()(logits.clone(), [SamplingRow(params, [0], [])])
    assert out.token_ids == [1]  # 2.0 / 2 = 1.0 < 1.5
    # a negative logit is multiplied: token 2 seen makes it -2.0, never above
    out = Sampler()(torch.tensor([[-1.0, -1.5, -3, -3, -3, -3, -3, -3]]), [SamplingRow(params, [], [0])])
    assert out.token_ids == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([[2.0, 1.5, 0, 0, 0, 0, 0, 0]])
    presence = SamplingParams(temperature=0, presence_penalty=1.0)
    assert Sampler()(logits.clone(), [SamplingRow(presence, [], [0])]).token_ids == [1]
    assert Sampler()(logits.clone(), [SamplingRow(presence, [0, 0], [])]).token_ids == [0]  # prompt ignored
    frequency = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert Sampler()(logits.clone(), [SamplingRow(frequency, [], [0])]).token_ids == [0]  # 2.0 - 0.3 > 1.5
    assert Sampler()(logits.clone(), [SamplingRow(frequency, [], [0, 0])]).token_ids == [1]  # 2.0 - 0.6 < 1.5


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = torch.tensor([[0.0, 0, 0, 5.0, 0, 0, 0, 9.0]])  # EOS (7) best, stop id 3 second
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    eos = frozenset({EOS})
    assert Sampler()(logits.clone(), [SamplingRow(params, [1], [4], eos_token_ids=eos)]).token_ids == [0]
    assert Sampler()(logits.clone(), [SamplingRow(params, [1], [4, 4], eos_token_ids=eos)]).token_ids == [EOS]
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits.clone(), [SamplingRow(ignore, [1], [], eos_token_ids=eos)]).token_ids == [EOS]


def test_logprobs_are_log_softmax_of_processed_logits() -> None:
    logits = torch.randn(3, VOCAB)
    rows = [
        SamplingRow(SamplingParams(temperature=0, logprobs=3), [], []),
        SamplingRow(SamplingParams(temperature=0), [], []),
        SamplingRow(SamplingParams(temperature=0, logprobs=0), [], []),
    ]
    out = Sampler()(logits.clone(), rows)
    expected = torch.log_softmax(logits, -1)
    lp0 = out.logprobs[0]
    assert lp0 is not None and lp0.token_id == out.token_ids[0]
    assert math.isclose(lp0.logprob, float(expected[0, out.token_ids[0]]), rel_tol=1e-5)
    top = expected[0].topk(3)
    assert [t for t, _ in lp0.top] == top.indices.tolist()
    assert [v for _, v in lp0.top] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert out.logprobs[1] is None
    assert out.logprobs[2] is not None and out.logprobs[2].top == []


def test_seeded_rows_sample_the_same_in_any_batch() -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(temperature=1.0, seed=seed)

    def run(batch_size: int, position: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        sampler = Sampler(seed=batch_size)  # different global RNG streams for the unseeded rows
        tokens = []
        for _ in range(20):
            rows = [SamplingRow(SamplingParams(temperature=1.0), [], []) for _ in range(batch_size)]
            batch_logits = torch.randn(batch_size, VOCAB)
            rows[position] = SamplingRow(params, [], [], generator=gen)
            batch_logits[position] = logits[0]
            tokens.append(sampler(batch_logits, rows).token_ids[position])
        return tokens

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(9, 0) == alone
    assert len(set(alone)) > 1  # it really samples
