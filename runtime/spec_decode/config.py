"""SpeculativeConfig: ``--speculative-config`` / ``LLM(speculative_config={...})``, with vLLM's keys.

Torch-free: ``runtime/config.py`` validates the setting with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "suffix", "draft_model")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"speculative_config.{name} {message}")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    # drafts per sequence and step at most; 3: a one-stream verification (4 rows) stays on the CPU int4 path
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2  # shortest n-gram (suffix of the sequence) looked up earlier in it
    prompt_lookup_max: int = 4  # longest; longer n-grams are tried first
    # above this many running sequences no drafts are proposed: a compute-bound batch pays for every verified
    # token and saves little (None: never)
    disable_by_batch_size: int | None = 4
    # method "suffix": finished requests whose tokens are indexed for the others' drafts (the oldest evicted)
    suffix_decoding_max_cached_requests: int = 1000
    # method "draft_model": the smaller model that proposes (a source as EngineConfig.model takes: a directory, a
    # .gguf file, builtin:..., hf://...); it must share the target's tokenizer
    model: str | None = None

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in (
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "suffix_decoding_max_cached_requests",
        ):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                   f"must be an integer of at least 1, got {value!r}")  # fmt: skip
        _check(
            self.prompt_lookup_min <= self.prompt_lookup_max,
            "prompt_lookup_min",
            f"must not exceed prompt_lookup_max ({self.prompt_lookup_max}), got {self.prompt_lookup_min}",
        )
        if self.method == "draft_model":
            _check(isinstance(self.model, str) and bool(self.model), "model",
                   "is required with method draft_model (the draft model's path or name)")  # fmt: skip
        else:
            _check(self.model is None, "model", f"applies to method draft_model only, not {self.method!r}")
        b = self.disable_by_batch_size
        _check(b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 1), "disable_by_batch_size",
               f"must be an integer of at least 1 or null, got {b!r}")  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpeculativeConfig:
        """Keys as vLLM spells them; an unknown key is an error naming it."""
        if not isinstance(values, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})"
            )
        return cls(**values)
