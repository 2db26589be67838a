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


def assert_greedy_agrees(model: Any, prompts: list[list[int]], ours: list[list[int]]) -> None:
    """Each of ``ours`` equals transformers' greedy continuation of its prompt, or parts from it only where the
    reference's top two logits are closer than 1e-3 (a near-tie: a random tiny model has them, and logits that agree
    to 1e-4 may then pick either)."""
    for i, (prompt, mine) in enumerate(zip(prompts, ours, strict=True)):
        reference = greedy_reference(model, prompt, len(mine))
        if mine == reference:
            continue
        k = next(j for j in range(len(mine)) if mine[j] != reference[j])
        with torch.inference_mode():
            top2 = model(torch.tensor([prompt + mine[:k]])).logits[0, -1].topk(2).values
        gap = float(top2[0] - top2[1])
        print(f"prompt {i} parts from transformers at token {k}: reference top-2 gap {gap:.2e}")
        assert gap < 1e-3, f"prompt {i}: divergence at token {k} is not a near-tie (gap {gap})"
