"""top-k, then top-p (nucleus), on temperature-scaled logits [R, V]: the tokens left out become -inf.

The written form of top-p sorts each whole row. Where top-k bounds a row to its n kept tokens (n much smaller
than V), that row's sorted form is known without a sort: its kept values, in the order top-k already returned
them, then -inf. Every number that decides what top-p drops is then computed from exactly the values the sort
would have produced (the softmax over the same full-length row, the running sum over its first n entries), so the
kept set is bit-identical. The one thing a sort decides on its own is the order of equal values: when tokens with
equal logits straddle the top-p cut, which of them stays is the sort's choice, so those rows still take the sort.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
TIE_MARGIN = 32


def apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """logits: [R, V] float32; top_ks[i] 0 (off) or > 0; top_ps[i] in (0, 1] -> the filtered logits (a new tensor).
    A row with top_p 1.0 in a batch where another row uses top-p goes through the same arithmetic (its float
    rounding can drop a token of ~0 probability, and it does so as before)."""
    device = logits.device
    vocab_size = logits.shape[1]
    top_vals = top_ids = None
    if any(k > 0 for k in top_ks):
        ks = torch.tensor([min(k, vocab_size) if k > 0 else vocab_size for k in top_ks], device=device)
        # a few more than k: tokens tied with the k-th (common with bfloat16 logits) are kept too
        width = min(vocab_size, int(ks.max()) + TIE_MARGIN)
        top_vals, top_ids = logits.topk(width, dim=-1)  # [R, width], descending
        kth = top_vals.gather(1, ks[:, None] - 1)  # [R, 1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
        top_vals = top_vals.masked_fill(top_vals < kth, NEG_INF)  # the masked row's largest values, in order
    if all(p >= 1.0 for p in top_ps):
        return logits
    top_p = torch.tensor(top_ps, device=device)[:, None]
    if top_vals is None or top_ids is None:
        return _top_p_sorted(logits, top_p)
    # from here on ``logits`` is this function's own tensor (top-k's masked copy)
    slow = torch.ones(len(top_ps), dtype=torch.bool, device=device)
    num_kept = (logits != NEG_INF).sum(dim=-1)  # [R]
    width = max(1, int(num_kept.max()))
    if width <= top_vals.shape[1]:  # every row's kept tokens are among its top-k candidates
        logits, slow = _top_p_of_kept(logits, top_vals[:, :width], top_ids[:, :width], top_p)
    if bool(slow.any()):
        rows = slow.nonzero().squeeze(1)
        logits[rows] = _top_p_sorted(logits[rows], top_p[rows])
    return logits


def _top_p_sorted(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The written form: sort each row, drop a token when the tokens ranked above it already reach top_p (the
    best one always stays). logits [R, V], top_p [R, 1]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def _top_p_of_kept(
    logits: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p from each row's kept values ``vals`` [R, W] (descending, -inf past the kept ones) and their token ids
    ``ids`` [R, W]. Returns (logits with the drops applied to the rows it decided, [R] rows left to the sort)."""
    # the sorted full row, as the sort would give it: same values at the same places, so the same softmax bits
    padded = torch.full_like(logits, NEG_INF)
    padded[:, : vals.shape[1]] = vals
    sorted_probs = padded.softmax(dim=-1)[:, : vals.shape[1]]
    # a running sum's first W entries depend only on the first W terms
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p  # [R, W]
    # equal values on both sides of the cut: the sort's order of ties decides, not the values
    straddles = (vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] != NEG_INF) & (drop_sorted[:, 1:] != drop_sorted[:, :-1])
    slow = straddles.any(dim=-1)
    drop_sorted &= ~slow[:, None]
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(ids)
    logits = logits.index_put((rows[drop_sorted], ids[drop_sorted]), torch.tensor(NEG_INF, device=logits.device))
    return logits, slow
