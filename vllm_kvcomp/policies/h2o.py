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
rule with older attention forgotten geometrically. ``H2O`` is the rule;
``PagedH2O`` serves it (or A2SF) with eviction in page-sized steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcomp.config import check_positive_ints


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
        check_positive_ints(self, ("budget_tokens", "recent_tokens"), type(self).__name__)
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PagedH2O:
    """H2O (or A2SF, ``rule``) served over a request's packed pages.

    The paper evicts one token per decode step. Here eviction happens in
    page-sized steps, so that the block manager can free whole pages at a
    point it computes from the token count alone, without hearing from the
    workers: after a step that brings the sequence to ``n`` tokens (``q`` of
    them packed, prompt ``P``), a request's layout is

        ``E = floor(min(n - R, q) / bs) * bs`` (0 while ``n < P``),
        ``K = min(budget_tokens - R, E)``,

    with ``R = recent_tokens``: its heavy hitters sit, in position order, in
    slots ``[0, K)`` of its own pages, and the tokens from position ``E`` on
    stay where they are (the last ``R`` tokens, up to a page more, and the
    full-precision window). Whenever ``E`` moves up a page, the worker keeps
    the ``K`` best of the old heavy hitters and the tokens that left the
    in-place range (lowest score evicted first, an equal score evicting the
    earlier token, as ``H2O.evict``), moves them to ``[0, K)``
    (``kernels/compaction.py``, their scores with them) and the manager
    frees pages ``[ceil(K / bs), E / bs)``. So a head holds ``budget_tokens``
    tokens right after an eviction step and up to ``bs - 1`` more before the
    next (more while the full-precision window is longer than ``R``): that
    page is the slack that whole-page freeing costs. At an eviction step the
    kept set is ``H2O.evict``'s for a recent window of ``n - E`` tokens and a
    budget of ``K + n - E``; between steps nothing is evicted.

    Scores count the attention of every query, the prompt's included (the
    paper's prefill initializes them the same way); nothing is evicted while
    the prompt is prefilled, so a prompt is chosen from with all of its
    queries' attention. Keys quantized per channel are requantized in their
    new token groups each time their group changes (one more rounding each
    time, ``kernels/compaction.py``).

    Preemption: a recomputed request runs its prompt and generated tokens as
    one prefill, which attends without eviction and evicts once, at its end,
    by the scores of that prefill. The decode steps that first produced the
    generated tokens attended an evicted cache and scored it step by step, so
    the kept set after recompute can differ (the same layout, other tokens),
    and later tokens with it.
    """

    rule: H2O
    block_size: int

    @property
    def heavy_tokens(self) -> int:
        return self.rule.budget_tokens - self.rule.recent_tokens

    @property
    def decay(self) -> float:
        return self.rule.decay

    def layout(self, n: int, q: int, prompt_len: int) -> tuple[int, int]:
        """``(K, E)`` after ``n`` tokens (class docstring)."""
        if n < prompt_len:
            return 0, 0
        bs = self.block_size
        e = max(0, min(n - self.rule.recent_tokens, q)) // bs * bs
        return min(self.heavy_tokens, e), e

    def freed_pages(self, n: int, q: int, prompt_len: int) -> tuple[int, int]:
        """Page range ``[lo, hi)`` that holds no kept token after ``n`` tokens."""
        k, e = self.layout(n, q, prompt_len)
        return _cdiv(k, self.block_size), e // self.block_size

    @staticmethod
    def select(scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices ``[H, keep]``, ascending, of each row's ``keep`` best
        scores (``scores [H, C]``); of equal scores the later index stays."""
        C = scores.shape[1]
        order = torch.sort(scores, dim=-1, stable=True).indices
        return torch.sort(order[:, C - keep:], dim=-1).values
