"""Quest: query-aware selection of the packed pages a decode step attends.

Tang, Zhao, Zhu, Xiao, Kasikci, Han, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference" (ICML 2024, arXiv:2406.10774). For each
page the cache keeps, per channel, the smallest and largest key; at a decode
step ``sum_c max(q_c * kmax_c, q_c * kmin_c)`` bounds ``q . k`` for every key
of the page from above, and the query attends only the pages with the largest
bounds, within a token budget. Quest keeps the first two layers dense, where
attention is spread too evenly for a few pages to carry it.

Here the per-channel extremes cost no extra bytes: keys quantized per channel
(KIVI) already store a ``(scale, min)`` pair per channel per key group, and
the stored keys of the group span exactly ``[min, min + scale * (2**bits - 1)]``
(codes 0 and ``2**bits - 1`` are the group's extreme keys). So the bound is
over the keys as attention reads them (dequantized), at key-group granularity;
a page's bound is the largest of its groups' bounds, which is tighter than one
bound from the page-wide extremes. Pages, not groups, are selected: the page is
what the decode kernel reads and vLLM allocates.

Grouped-query attention: one selection per KV head, so each page byte is still
read once for all the query heads that share it. A page's score for a KV head
is the largest of its query heads' bounds: it still bounds every one of those
heads' logits, and a page that one head needs strongly (a retrieval head
finding a needle) is not outvoted by the others, as with a sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcomp.config import check_positive_ints


@dataclass(frozen=True)
class Quest:
    """Which packed pages a decode query attends under Quest.

    budget_tokens: packed tokens attended per KV head; whole pages, so
        ``budget_pages = budget_tokens // block_size`` of them. The
        full-precision window (residual tokens and the query's own) is always
        attended on top and needs no bound.
    block_size: tokens per packed page.

    With ``P`` packed pages (positions ``[0, Q)``, ``P = ceil(Q / bs)``) and
    ``P <= budget_pages`` every page is attended (dense). Otherwise the newest
    packed page ``P - 1`` (Quest always keeps the last page) and the
    ``budget_pages - 1`` pages of ``[0, P - 1)`` with the largest scores, ties
    to the lower page.
    """

    budget_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        check_positive_ints(self, ("budget_tokens", "block_size"), "Quest")
        if self.budget_tokens < self.block_size:
            raise ValueError(f"Quest budget_tokens={self.budget_tokens} is below one page "
                             f"({self.block_size} tokens)")

    @property
    def budget_pages(self) -> int:
        return self.budget_tokens // self.block_size

    def is_sparse(self, packed_tokens: int) -> bool:
        """Whether a query reading packed positions ``[0, packed_tokens)``
        attends fewer than all of its pages."""
        return -(-packed_tokens // self.block_size) > self.budget_pages

    @staticmethod
    def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """Scores ``[H, P]`` of one query ``q [Hq, D]`` over pages whose key
        groups span ``[kmin, kmax]`` (``[P, H, groups, D]``): the query heads'
        bounds ``sum_c max(q_c kmax_c, q_c kmin_c)``, the largest over a
        page's key groups, then over the KV head's query heads."""
        P, H, _, D = kmin.shape
        qf = q.float().view(H, -1, D)[None, :, :, None, :]  # 1, H, rep, 1, D
        bound = torch.maximum(qf * kmax.float()[:, :, None], qf * kmin.float()[:, :, None])
        return bound.sum(-1).amax(dim=(2, 3)).T

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Selected page indices ``[H, min(P, budget_pages)]``, ascending,
        from ``scores [H, P]`` (see the class)."""
        H, P = scores.shape
        k = self.budget_pages
        dev = scores.device
        if P <= k:
            return torch.arange(P, device=dev).expand(H, P)
        # a stable descending sort: equal scores keep the lower page first
        order = torch.sort(scores[:, : P - 1], dim=1, descending=True, stable=True).indices
        last = torch.full((H, 1), P - 1, dtype=order.dtype, device=dev)
        return torch.sort(torch.cat([order[:, : k - 1], last], dim=1), dim=1).values
