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


# ---- token controls: logit_bias, allowed_token_ids, bad_words ------------------------------------------------


def test_logit_bias_minus_100_keeps_a_token_out_and_plus_100_forces_one() -> None:
    logits = probs_logits([0.7, 0.2, 0.1])
    assert 0 not in set(draw(SamplingParams(logit_bias={0: -100}), logits))
    assert set(draw(SamplingParams(logit_bias={"5": 100}), logits)) == {5}  # JSON sends string keys
    # greedy: the bias is added to the logit (OpenAI's semantics), so a small bias moves the argmax only when
    # it covers the gap
    greedy = torch.tensor([[1.0, 0.5, 0, 0, 0, 0, 0, 0]])
    assert Sampler()(
        greedy.clone(), [SamplingRow(SamplingParams(temperature=0, logit_bias={1: 0.4}), [], [])]
    ).token_ids == [0]
    assert Sampler()(
        greedy.clone(), [SamplingRow(SamplingParams(temperature=0, logit_bias={1: 0.6}), [], [])]
    ).token_ids == [1]


def test_allowed_token_ids_restrict_only_their_row() -> None:
    logits = probs_logits([0.4, 0.3, 0.2, 0.1]).repeat(2, 1)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    sampler = Sampler(seed=seed)
    seen: list[set[int]] = [set(), set()]
    for _ in range(100):
        rows = [SamplingRow(SamplingParams(allowed_token_ids=[2, 3]), [], []), SamplingRow(SamplingParams(), [], [])]
        out = sampler(logits.clone(), rows).token_ids
        seen[0].add(out[0])
        seen[1].add(out[1])
    assert seen[0] == {2, 3}
    assert {0, 1} <= seen[1]


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0, 0, 0, 0, 0]])
    params = SamplingParams(temperature=0, bad_words=["x", "y"])
    params.bad_words_token_ids = [[0], [4, 1]]
    assert Sampler()(logits.clone(), [SamplingRow(params, [], [])]).token_ids == [1]  # [0] banned, [4,1] not due
    assert Sampler()(logits.clone(), [SamplingRow(params, [], [5, 4])]).token_ids == [2]  # 4 just came: 1 banned
    assert Sampler()(logits.clone(), [SamplingRow(params, [4], [])]).token_ids == [1]  # the prompt does not count
    with pytest.raises(ValueError, match="resolve_bad_words"):
        Sampler()(logits.clone(), [SamplingRow(SamplingParams(bad_words=["x"]), [], [])])


def test_resolve_bad_words_with_and_without_a_leading_space(smollm2_tokenizer) -> None:
    params = SamplingParams(bad_words=["Paris", "New York"])
    params.resolve_bad_words(smollm2_tokenizer)
    encode = lambda text: smollm2_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert params.bad_words_token_ids is not None
    assert encode("Paris") in params.bad_words_token_ids
    assert encode(" Paris") in params.bad_words_token_ids
    assert encode("New York") in params.bad_words_token_ids
    if len(encode(" New York")) == len(encode("New York")):
        assert encode(" New York") in params.bad_words_token_ids


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(logit_bias={1: 101}), "logit_bias"),
        (dict(logit_bias={1: -100.5}), "logit_bias"),
        (dict(logit_bias={"a": 1}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"),
        (dict(logit_bias={1: True}), "logit_bias"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=[-2]), "allowed_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(structured_outputs={"json": {}}), "structured_outputs"),
    ],
)
def test_token_controls_are_validated(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_verify_vocab_names_the_field() -> None:
    SamplingParams(logit_bias={7: 1.0}, allowed_token_ids=[0, 7]).verify_vocab(8)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={8: 1.0}).verify_vocab(8)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[1, 9]).verify_vocab(8)


# ---- grammars: the bitmask per row -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammar_backend(smollm2_tokenizer):
    from kubellm.runtime.structured_outputs import GrammarBackend

    return GrammarBackend(smollm2_tokenizer, 49152)


def _choice_state(backend, choices: list[str]):
    from kubellm.runtime.structured_outputs import StructuredOutputsParams

    return backend.compile(StructuredOutputsParams(choice=choices)).new_state()


def test_mixed_constrained_and_free_batch(grammar_backend, smollm2_tokenizer) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    vocab = 49152
    logits = torch.randn(4, vocab, generator=gen)
    yes = smollm2_tokenizer.encode("yes", add_special_tokens=False)[0]

    def starts_a_choice(token: int) -> bool:  # "yes" may also begin as "y", "ye"
        text = smollm2_tokenizer.decode([token])
        return bool(text) and ("yes".startswith(text) or "no".startswith(text))

    rows = [
        SamplingRow(
            SamplingParams(temperature=0, logprobs=3), [], [], grammar=_choice_state(grammar_backend, ["yes", "no"])
        ),
        SamplingRow(SamplingParams(temperature=0, logprobs=3), [], []),
        SamplingRow(SamplingParams(temperature=1.0), [], [], grammar=_choice_state(grammar_backend, ["yes", "no"])),
        SamplingRow(SamplingParams(temperature=0, logit_bias={yes: 100}), [], []),
    ]
    out = Sampler(seed=seed)(logits.clone(), rows)
    assert starts_a_choice(out.token_ids[0]) and starts_a_choice(out.token_ids[2])
    assert out.token_ids[1] == int(logits[1].argmax())  # the free row is untouched
    assert out.token_ids[3] == yes
    lp0, lp1 = out.logprobs[0], out.logprobs[1]
    assert lp0 is not None and lp1 is not None
    assert all(starts_a_choice(t) for t, v in lp0.top if v > float("-inf"))  # logprobs see the mask
    assert math.isclose(lp1.logprob, float(torch.log_softmax(logits[1], -1).max()), rel_tol=1e-5)
    # the sampler does not advance the matcher: the same rows give the same masks again
    again = Sampler(seed=seed)(logits.clone(), rows)
    assert again.token_ids[0] == out.token_ids[0]


def test_the_grammar_wins_over_logit_bias_and_min_tokens(grammar_backend, smollm2_tokenizer) -> None:
    vocab = 49152
    banned = smollm2_tokenizer.encode("maybe", add_special_tokens=False)[0]
    state = _choice_state(grammar_backend, ["yes"])
    row = SamplingRow(SamplingParams(temperature=0, logit_bias={banned: 100}), [], [], grammar=state)
    assert Sampler()(torch.zeros(1, vocab), [row]).token_ids[0] != banned
    # walk "yes" to its end: only the stop token remains, and min_tokens must not take it away
    for token in smollm2_tokenizer.encode("yes", add_special_tokens=False):
        assert state.accept(token)
    eos = frozenset(smollm2_tokenizer.eos_token_ids)
    row = SamplingRow(SamplingParams(temperature=0, min_tokens=10), [], [1], eos_token_ids=eos, grammar=state)
    assert Sampler()(torch.zeros(1, vocab), [row]).token_ids[0] in eos
    # a free row with min_tokens still has its EOS suppressed
    free = SamplingRow(SamplingParams(temperature=0, min_tokens=10), [], [1], eos_token_ids=eos)
    logits = torch.zeros(1, vocab)
    logits[0, next(iter(eos))] = 5.0
    assert Sampler()(logits, [free]).token_ids[0] not in eos


def test_padded_logits_are_masked_past_the_grammar_vocab(grammar_backend) -> None:
    logits = torch.zeros(1, 49152 + 64)
    logits[0, 49152 + 3] = 50.0  # a padding column the head produces but no grammar allows
    row = SamplingRow(SamplingParams(temperature=0), [], [], grammar=_choice_state(grammar_backend, ["ok"]))
    assert Sampler()(logits, [row]).token_ids[0] < 49152
