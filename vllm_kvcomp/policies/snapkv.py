"""SnapKV: keep the prompt tokens that the end of the prompt attends to.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows
What You are Looking for Before Generation" (2024, arXiv:2404.14469): the
attention of the prompt's last ``window`` queries (the observation window)
over the earlier tokens predicts which of them generation will attend. At
the end of prefill, per head, those queries' softmax attention is summed over
the window, smoothed by a 1-D pooling of width ``kernel`` (a kept token brings
its neighbours, which keeps the details around it), and the top-scoring
tokens are kept; the window itself is always kept. With grouped-query
attention the pooled scores of a KV head's query heads are summed, so each KV
head keeps one set (as AdaKV and kvpress do for GQA).

Here the prompt's selection is made once, in the step whose chunk completes
the prompt, and the kept tokens are moved to the front of the request's own
packed pages (``kernels/compaction.py``); the pages between them and the
kept tail go back to vLLM's pool (``spec.KvcompEvictionManager``). Everything
in that layout follows from the prompt length, so the block manager frees
without hearing from the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SnapKV:
    """SnapKV selection over a request's packed pages.

    block_size: tokens per packed page; only whole pages are freed.
    budget_tokens / budget_ratio: prompt tokens each KV head keeps in its
        compressed pages (one is set): a count, or ``floor(budget_ratio * P)``
        of a ``P``-token prompt. The prompt's last tokens, still in the
        full-precision window at its end, are kept on top (that window is held
        with or without eviction), the observation window usually among them.
    window: the last ``window`` prompt positions score the others (SnapKV's
        observation window, 32 by default as in the paper's experiments).
    kernel: pooling width (odd; 7 as in the paper), zero-padded at the ends.
    pooling: "avg" (SnapKV's default) or "max".

    Layout after the prompt of ``P`` tokens (``q_P`` of them packed, the rest in
    the full-precision window): candidates are the packed positions
    ``[0, end)``, ``end = floor(min(P - window, q_P) / block_size) * block_size``;
    the tokens from ``end`` on (the packed ones up to ``q_P``, the observation
    window, the full-precision window) stay where they are. Each KV head keeps
    its ``kept = budget - (q_P - end)`` best candidates, moved in position
    order to positions ``[0, kept)``, so it holds ``budget`` packed prompt
    tokens; pages ``[ceil(kept / bs), end / bs)`` are freed. Nothing is
    evicted when that page range is empty (among others, whenever
    ``budget >= P``).
    """

    block_size: int
    budget_tokens: int | None = None
    budget_ratio: float | None = None
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"

    def budget(self, prompt_len: int) -> int:
        if self.budget_tokens is not None:
            return self.budget_tokens
        return int(self.budget_ratio * prompt_len)

    def plan(self, prompt_len: int, packed_len: int) -> tuple[int, int] | None:
        """``(kept, end)`` for a prompt of ``prompt_len`` tokens of which
        ``packed_len`` are packed at its end; None: nothing is evicted."""
        bs = self.block_size
        end = max(0, min(prompt_len - self.window, packed_len)) // bs * bs
        kept = max(0, self.budget(prompt_len) - (max(packed_len, end) - end))
        if _cdiv(kept, bs) >= end // bs:
            return None
        return kept, end

    def freed_pages(self, prompt_len: int, packed_len: int) -> tuple[int, int]:
        """Page range ``[lo, hi)`` given back once the prompt is processed."""
        plan = self.plan(prompt_len, packed_len)
        if plan is None:
            return 0, 0
        kept, end = plan
        return _cdiv(kept, self.block_size), end // self.block_size

    def scores(self, probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Scores ``[H, L]`` of the positions before the observation window
        from the window queries' softmax attention ``probs`` ``[Hq, Tw, L]``
        (query heads grouped by KV head, as GQA lays them out)."""
        Hq, _, L = probs.shape
        summed = probs.float().sum(dim=1)  # [Hq, L]
        pad = self.kernel // 2
        x = summed.unsqueeze(1)
        if self.pooling == "avg":
            pooled = F.avg_pool1d(x, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.max_pool1d(x, self.kernel, stride=1, padding=pad)
        return pooled.squeeze(1).view(num_kv_heads, Hq // num_kv_heads, L).sum(dim=1)

    @staticmethod
    def select(scores: torch.Tensor, kept: int) -> torch.Tensor:
        """Per KV head, the ``kept`` best positions of ``scores`` ``[H, end]``,
        ascending (an equal score goes to the earlier position)."""
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return torch.sort(order[:, :kept], dim=-1).values
