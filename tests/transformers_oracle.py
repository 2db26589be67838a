"""transformers as the oracle of greedy decoding (imported as ``transformers_oracle``; tests/ is on sys.path)."""

from __future__ import annotations

from typing import Any

import torch


def greedy_reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """The argmax continuation of ``prompt`` by a transformers causal LM, with no logits processors: the engine under
    ``ignore_eos`` may emit the EOS id, which ``generate(min_new_tokens=...)`` would forbid (it sets EOS to -inf)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
