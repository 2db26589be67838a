"""Per-request sampling parameters, validated on construction.

Interface for the server / engine (besides the fields):

- ``params.verify_vocab(vocab_size)``: the token ids in ``logit_bias`` / ``allowed_token_ids`` exist (call at
  add time, when the model's vocabulary size is known); ValueError naming the field.
- ``params.resolve_bad_words(tokenizer)``: turns ``bad_words`` into ``bad_words_token_ids`` (vLLM's semantics:
  each word's token sequence with and without a leading space). Call it once when the request is added; the
  sampler refuses a request with ``bad_words`` that were not resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .structured_outputs.params import StructuredOutputsParams

MAX_LOGIT_BIAS = 100.0


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass
class SamplingParams:
    """How one request samples its continuation.

    Disabled values: ``top_k <= 0``, ``top_p == 1``, ``min_p == 0``, penalties at their neutral value.
    ``temperature == 0`` is greedy. ``logprobs`` is the number of top alternatives to return for each
    sampled token (``0`` returns the sampled token's own logprob only; ``None`` returns none);
    ``prompt_logprobs`` the same for each prompt token (the model's raw distribution; the first token has none).
    ``max_tokens == 0`` scores the prompt only: nothing is generated, which needs ``prompt_logprobs``.
    ``logit_bias`` (token id -> bias in [-100, 100], added to the logits as OpenAI does; string keys, as JSON
    sends them, are converted), ``allowed_token_ids`` (only these may be sampled), ``bad_words`` (never generated),
    ``structured_outputs`` (a grammar the output must match).
    Every bad value raises ``ValueError`` with a message that names the field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None
    # set by resolve_bad_words: the banned token sequences
    bad_words_token_ids: list[list[int]] | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        _check(
            -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 0,
            "max_tokens",
            f"must be non-negative, got {self.max_tokens}",
        )
        if self.max_tokens == 0:
            _check(self.prompt_logprobs is not None, "max_tokens", "0 scores the prompt only: it needs prompt_logprobs")
            _check(self.n == 1, "n", f"must be 1 when max_tokens is 0 (nothing is generated), got {self.n}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
            "logprobs",
            f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}",
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS,
            "prompt_logprobs",
            f"must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}",
        )
        _check(all(s for s in self.stop), "stop", "must not contain empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative")
        self._check_token_controls()

    def _check_token_controls(self) -> None:
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", "must be a map of token id to bias")
            self.logit_bias = {_token_id(k, "logit_bias"): _bias(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            _check(isinstance(ids, list | tuple) and len(ids) > 0, "allowed_token_ids", "must be a non-empty list")
            self.allowed_token_ids = [_token_id(t, "allowed_token_ids") for t in ids]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(self.bad_words)
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words", "must be non-empty strings")
        if self.structured_outputs is not None:
            from .structured_outputs.params import StructuredOutputsParams

            _check(
                isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs",
                f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}",
            )

    def verify_vocab(self, vocab_size: int) -> None:
        """Every token id this request names exists in a vocabulary of ``vocab_size``."""
        for name, ids in (("logit_bias", list(self.logit_bias or ())), ("allowed_token_ids", self.allowed_token_ids)):
            bad = [t for t in ids or () if t >= vocab_size]
            _check(not bad, name, f"token ids must be in [0, {vocab_size}), got {bad[:4]}")

    def resolve_bad_words(self, tokenizer: _Encoder) -> None:
        """``bad_words`` -> ``bad_words_token_ids``, as vLLM does: each word's tokens, and the tokens of the word
        after a space when that is a different first token of the same length (" word" is one token where "word"
        is one token)."""
        resolved: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            resolved.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                resolved.append(spaced)
        self.bad_words_token_ids = resolved

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _token_id(value: Any, name: str) -> int:
    try:
        token_id = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} token ids must be integers, got {value!r}") from None
    _check(
        not isinstance(value, bool | float) and token_id >= 0,
        name,
        f"token ids must be non-negative integers, got {value!r}",
    )
    return token_id


def _bias(value: Any) -> float:
    _check(
        isinstance(value, int | float) and not isinstance(value, bool) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS,
        "logit_bias",
        f"values must be numbers in [-100, 100], got {value!r}",
    )
    return float(value)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
