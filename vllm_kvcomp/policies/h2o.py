"""H2O: keep the heavy hitters of accumulated attention and the recent tokens.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen,
"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048): a small set of tokens receives most
of the attention mass throughout generation. Each cached token's score is the
attention it has received, summed over the queries so far; the cache holds at
most ``budget_tokens`` tokens per head, the last ``recent_tokens`` of them
always, and when a step goes over the budget the lowest-scoring tokens outside
the recent window are evicted (the paper's Algorithm 1 evicts one per step;
several at once when a step adds several). An evicted token never comes back.

With grouped-query attention a KV head's score is the sum over its query
heads, so each KV head keeps one set. A2SF (``policies.a2sf``) is the same
rule with older attention forgotten geometrically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class H2O:
    """H2O's kept set per KV head.

    budget_tokens: tokens each KV head keeps (heavy hitters + recent).
    recent_tokens: the last tokens of the sequence, always kept (the query's
        own included); the paper splits the budget evenly between the two.
    """

    budget_tokens: int
    recent_tokens: int

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "recent_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__} {name}={v!r} must be a positive integer")
        if self.recent_tokens > self.budget_tokens:
            raise ValueError(f"{type(self).__name__} recent_tokens={self.recent_tokens} exceeds "
                             f"budget_tokens={self.budget_tokens}")

    @property
    def decay(self) -> float:
        """Weight of the scores so far against one step later (H2O: none lost)."""
        return 1.0

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor,
                   num_kv_heads: int) -> torch.Tensor:
        """New scores ``[H, L]`` after the queries ``probs`` ``[Hq, T, L]``
        (softmax rows in position order; an evicted or future key has 0),
        each older step's mass weighted by ``decay`` per later query."""
        Hq, T, L = probs.shape
        w = self.decay ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
        step = (probs.double() * w[None, :, None]).sum(dim=1)
        step = step.view(num_kv_heads, Hq // num_kv_heads, L).sum(dim=1)
        return scores.double() * self.decay ** T + step

    def evict(self, scores: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
        """Kept mask ``[H, n]`` after a step that brings the sequence to ``n``
        tokens: ``kept`` (``[H, n]``, the step's own tokens included) less, per
        head, its lowest-scoring tokens below ``n - recent_tokens`` until at
        most ``budget_tokens`` remain (an equal score evicts the earlier token)."""
        kept = kept.clone()
        H = kept.shape[0]
        over = kept.sum(dim=1) - self.budget_tokens
        movable = kept.clone()
        movable[:, max(0, n - self.recent_tokens):] = False
        for h in range(H):
            if over[h] <= 0:
                continue
            cand = movable[h].nonzero().squeeze(1)
            order = torch.sort(scores[h, cand], stable=True).indices
            kept[h, cand[order[: int(over[h])]]] = False
        return kept
