"""H2O / A2SF on the CPU path: scores accumulated from the step's own
attention probabilities, and eviction in page-sized steps.

Each packed page carries, per KV head, one fp32 score per token slot
(``PageLayout.scores_offset``), so the scores live in the request's own pages,
inside vLLM's KV budget, and move with their tokens when these are compacted.
A request holds the packed page of every cached token under this eviction,
not only of its packed ones (``spec.KvcompEvictionManager``), so the tokens of
the full-precision window have their slots too. The layout (heavy hitters in
``[0, K)``, tokens in place from ``E``) follows from the token count alone
(``policies.h2o.PagedH2O``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.layout import PageLayout

if TYPE_CHECKING:
    from vllm_kvcomp.kernels.attention_ref import RequestStep


def score_view(cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """``[num_blocks, H, block_size]`` fp32 view of the pages' score slots."""
    off = layout.scores_offset
    return cache[:, :, off: off + 4 * layout.block_size].view(torch.float32)


def read_scores(cache, layout, block_row, slots: torch.Tensor) -> torch.Tensor:
    """Scores ``[H, len(slots)]`` of a request's slots."""
    bs = layout.block_size
    s = slots.long()
    return score_view(cache, layout)[block_row.long()[s // bs], :, s % bs].T


def slot_ranges(ranges) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in ranges if b > a]
                     or [torch.zeros(0, dtype=torch.long)])


def scored_step(step: RequestStep) -> torch.Tensor:
    """One request's step (``attention_ref.RequestStep``) under H2O / A2SF:
    attention over the layout of ``start`` tokens, the queries'
    probabilities added to the scores of the slots they read (the older
    scores first multiplied by ``alpha ** Tq``), and, when the layout of
    ``start + Tq`` tokens differs, the eviction step that reaches it."""
    cache, layout, cfg, row = step.packed_cache, step.layout, step.cfg, step.block_row
    start, P = step.start, step.prompt_len
    probs = []
    out = step.attention(probs_out=probs)
    p, pos = probs[0]  # [H, rep, Tq, Kn], [Kn]
    add_step_scores(cache, layout, cfg, row, start, P, p, pos)
    evict_step(cache, layout, cfg, row, start, start + step.q.shape[0], P, step.model_dtype)
    return out


def add_step_scores(packed_cache: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                    block_row: torch.Tensor, start: int, prompt_len: int, p: torch.Tensor,
                    pos: torch.Tensor) -> None:
    """A step's queries' probabilities ``p`` ``[H, rep, Tq, Kn]`` over the
    positions ``pos`` ``[Kn]`` added to the scores of the slots they read,
    the step's own slots from nothing and the older scores first multiplied
    by ``alpha ** Tq``."""
    Tq = p.shape[2]
    begin_step_scores(packed_cache, layout, cfg, block_row, start, Tq, prompt_len)
    add_query_scores(packed_cache, layout, cfg, block_row, start, Tq, p, pos, 0)


def begin_step_scores(packed_cache: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                      block_row: torch.Tensor, start: int, num_queries: int,
                      prompt_len: int) -> None:
    """The part of ``add_step_scores`` that precedes the queries' own: the
    step's slots from nothing (they may hold a previous owner's scores), the
    held ones multiplied by ``alpha ** num_queries``."""
    policy = cfg.eviction.policy(layout.block_size)
    bs = layout.block_size
    k0, e0 = policy.layout(start, cfg.quantized_prefix_len(start), prompt_len)
    sc = score_view(packed_cache, layout)  # index writes go to the cache
    row = block_row.long()
    fresh = torch.arange(start, start + num_queries, device=row.device)
    sc[row[fresh // bs], :, fresh % bs] = 0.0
    if policy.decay != 1.0:
        held = slot_ranges([(0, k0), (e0, start)]).to(row.device)
        sc[row[held // bs], :, held % bs] *= policy.decay ** num_queries


def add_query_scores(packed_cache: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                     block_row: torch.Tensor, start: int, num_queries: int, p: torch.Tensor,
                     pos: torch.Tensor, first_query: int) -> None:
    """Queries ``first_query`` .. ``first_query + p.shape[2]`` of a step of
    ``num_queries`` from ``start``: their probabilities ``p`` ``[H, rep, Tq,
    Kn]`` over ``pos`` added to the slots they read, query ``t`` weighted
    ``alpha ** (num_queries - 1 - t)`` (its age once the step is over). A
    step's queries may come in several pieces after one
    ``begin_step_scores``."""
    bs = layout.block_size
    decay = cfg.eviction.policy(bs).decay
    sc = score_view(packed_cache, layout)
    row = block_row.long()
    dev = row.device
    H, _, Tq, _ = p.shape
    if decay != 1.0:
        age = torch.arange(num_queries - 1 - first_query, num_queries - 1 - first_query - Tq, -1,
                           dtype=torch.float64, device=p.device)
        step = (p.double() * (decay ** age)[None, None, :, None]).sum(dim=(1, 2))
    else:
        step = p.double().sum(dim=(1, 2))
    # a position read packed by some queries and in full precision by others
    # (prompts as stored) is one key for each query: its columns add up
    add = torch.zeros(H, start + num_queries, dtype=torch.float64, device=dev)
    add.index_add_(1, pos.long().to(dev), step.to(dev))
    slots = pos.long().to(dev).unique()
    cur = sc[row[slots // bs], :, slots % bs].double()  # [S, H]
    sc[row[slots // bs], :, slots % bs] = (cur + add[:, slots].T).float()


def evict_step(packed_cache: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
               block_row: torch.Tensor, start: int, n: int, prompt_len: int,
               model_dtype: torch.dtype, compact=None, on_device: bool = False) -> None:
    """When the layout of ``n`` tokens differs from that of ``start``, the
    eviction step that reaches it: the best-scoring of the old heavy hitters
    and of the tokens leaving the in-place range moved to the front
    (``compact``: ``compaction.compact_kept`` or a function of its arguments).
    ``on_device``: the candidates made where the cache is, not copied there
    from the host (a copy from pageable memory waits for the device)."""
    from vllm_kvcomp.kernels.compaction import compact_kept

    compact = compact or compact_kept

    policy = cfg.eviction.policy(layout.block_size)
    P = prompt_len
    step = _eviction_layouts(cfg, policy, start, n, P)
    if step is None:
        return
    k0, e0, k1, e1 = step
    made = block_row.device if on_device else "cpu"
    cand = torch.cat([torch.arange(0, k0, device=made),
                      torch.arange(e0, max(e0, e1), device=made)]).to(block_row.device)
    scores = read_scores(packed_cache, layout, block_row, cand)
    kept = cand[policy.select(scores, k1)]
    compact(packed_cache, layout, block_row, kept, model_dtype)


def _eviction_layouts(cfg: KvcompConfig, policy, start: int, n: int,
                      P: int) -> tuple[int, int, int, int] | None:
    """``(k0, e0, k1, e1)``: the layouts of ``start`` and ``n`` tokens, or
    None where the step moves nothing."""
    k0, e0 = policy.layout(start, cfg.quantized_prefix_len(start), P)
    k1, e1 = policy.layout(n, cfg.quantized_prefix_len(n), P)
    if moves_nothing(k0, e0, k1, e1, k0 + max(0, e1 - e0)):
        return None
    return k0, e0, k1, e1


def decode_rows_candidates(cfg, block_size: int) -> int:
    """The most candidates a one-token step's eviction weighs: the heavy
    hitters and the span a step moves ``E`` past them (``key_token_align``
    rounded up to pages, plus one)."""
    heavy = cfg.eviction.policy(block_size).heavy_tokens
    return heavy + (cfg.key_token_align // block_size + 1) * block_size


def moves_nothing(k0, e0, k1, e1, count):
    """Whether the step from layout ``(k0, e0)`` to ``(k1, e1)`` moves no
    token: the layout stays, or its ``count`` candidates (``[0, k0)`` then
    ``[e0, e1)``) are all kept and already make one run from 0. Ints or
    tensors of them (element by element)."""
    return ((k1 == k0) & (e1 == e0)) | ((count == k1) & ((e1 <= e0) | (e0 == k0)))


def evict_steps(packed_cache: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                block_table: torch.Tensor, rows, starts, ns, prompt_lens,
                model_dtype: torch.dtype, select=None) -> None:
    """``evict_step(..., compact=triton_compact, on_device=True)`` for each
    request ``rows[i]`` of ``block_table`` (``starts[i]``, ``ns[i]``,
    ``prompt_lens[i]``: host ints), the same bytes written, in a fixed
    number of launches for all of them (``select_and_compact``, candidates
    padded to the longest request's count): a request's launches, not its
    work, are what an eviction step costs the host. ``select``: a function
    of ``select_and_compact``'s arguments (``triton_select.triton_select_and_compact``),
    by default that one. ``model_dtype`` is not read (``triton_compact``)."""
    policy = cfg.eviction.policy(layout.block_size)
    plan = []
    for i, start, n, P in zip(rows, starts, ns, prompt_lens):
        step = _eviction_layouts(cfg, policy, start, n, P)
        if step is not None:
            k0, e0, k1, e1 = step
            plan.append((i, k0, e0, k0 + max(0, e1 - e0), k1))
    if not plan:
        return
    C, kmax = max(p[3] for p in plan), max(p[4] for p in plan)
    if kmax == 0:
        return
    dev = block_table.device
    # one copy of the whole plan, from pinned memory so that it does not wait for the device
    host = torch.tensor(plan, dtype=torch.long).T.contiguous()
    if dev.type == "cuda":
        host = host.pin_memory()
    row, k0, e0, count, k1 = host.to(dev, non_blocking=True)[:, :, None]
    (select or select_and_compact)(packed_cache, layout, block_table[row[:, 0]], k0, e0,
                                   count, k1, C, kmax)


def select_and_compact(packed_cache: torch.Tensor, layout: PageLayout,
                       block_rows: torch.Tensor, k0: torch.Tensor, e0: torch.Tensor,
                       count: torch.Tensor, k1: torch.Tensor, C: int, kmax: int) -> None:
    """The eviction steps of requests ``block_rows`` (``[R, NB]``), from
    device tensors ``[R, 1]``: candidates ``[0, k0)`` then ``[e0, ...)``,
    ``count`` of them (at most ``C``), of which each KV head keeps its
    ``k1`` (at most ``kmax``) best, moved to ``[0, k1)``; a request with
    ``k1`` 0 is left as it is. Candidates are padded to ``C`` with scores of
    ``-inf``, which a stable sort puts before every real (accumulated, so
    finite) score without changing the order of those: the ``k1`` best are
    ``policy.select``'s. Requests keeping fewer than ``kmax`` drop their
    surplus from the front of that tail. Fixed shapes, no host sync."""
    from vllm_kvcomp.kernels.triton_compaction import triton_compact_batch

    dev = block_rows.device
    bs = layout.block_size
    c = torch.arange(C, device=dev)[None]
    real = c < count
    cand = torch.where(c < k0, c, c - k0 + e0)
    cand = torch.where(real, cand, cand[:, :1])  # a real slot: every block-table entry read holds
    blk = block_rows.long().gather(1, cand // bs)
    heads = torch.arange(packed_cache.shape[1], device=dev)[None, :, None]
    scores = score_view(packed_cache, layout)[blk[:, None], heads, (cand % bs)[:, None]]
    scores = scores.masked_fill(~real[:, None], float("-inf"))  # [R, H, C]
    best = torch.sort(scores, dim=-1, stable=True).indices[..., C - kmax:]
    j = torch.arange(kmax, device=dev)
    best = torch.where(j >= kmax - k1[:, :, None], best, C - 1)  # dropped, sorted last
    kept = cand.gather(1, torch.sort(best, dim=-1).values.flatten(1)).view(best.shape)
    triton_compact_batch(packed_cache, layout, block_rows, kept, k1[:, 0])


def dense_probs(p: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
    """``[Tq, H * rep, length]`` probabilities by position from a step's
    ``p`` ``[H, rep, Tq, Kn]`` over ``pos`` ``[Kn]`` (0 where not read)."""
    H, rep, Tq, _ = p.shape
    out = torch.zeros(Tq, H * rep, length, dtype=torch.float64)
    out.index_add_(2, pos.long().cpu(), p.double().cpu().permute(2, 0, 1, 3).reshape(
        Tq, H * rep, -1))
    return out
