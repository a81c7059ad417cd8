"""Reference (PyTorch) store + attention over packed pages and residual pages.

For each request of a batch, with ``start`` tokens already cached and ``n``
after this step (``Q`` = ``KvcompConfig.quantized_prefix_len``):

1. hand-over: tokens ``[Q(start), Q(n))`` are quantized into the packed pages,
   read from the residual pages where older than ``start``, else from the
   fresh K/V (so handover needs no extra copy);
2. attention of the step's queries (causal, GQA, float32 accumulation). The
   query at position ``p`` reads key ``j`` from the packed pages (quantized)
   where ``j < bound(p)`` and in full precision (residual or fresh) from there
   to ``p``: ``bound(p) = Q(p)`` when prompts attend as stored (what a
   decode step at ``p`` reads, whatever the chunking or prefix-cache hits),
   ``Q(start)`` for every query of the step otherwise (a chunk's own tokens
   in full precision). For a decode step both are ``Q(start)``. Under
   eviction the packed keys the policy drops for that query
   (``policy.dropped(p + 1, bound(p))``) are masked, and pages dropped for
   the step's first query are not read at all (the block manager may have
   given them back to the pool). Under SnapKV (``policies.snapkv``), in the
   step whose chunk completes the prompt, the prompt's queries attend the
   whole cache, the observation window's attention (summed over the chunks
   that hold its queries) picks each KV head's kept tokens, those are moved
   to the front of the request's pages (``kernels/compaction.py``), and the
   step's later queries (a recomputed request's generated tokens) attend,
   like every later step, only the kept positions ``[0, kept)`` and
   ``[end, ...)``. Under H2O / A2SF (``kernels/h2o_ref.py``) every step
   attends the heavy hitters ``[0, K)`` and the tokens in place from ``E``,
   adds its probabilities to the scores of what it read, and compacts when
   ``E`` moves up a page. Under Quest (``policies.quest``) a one-token step whose
   packed pages exceed the budget reads, per KV head, only the pages its
   query selects (``quest_pages``), under SnapKV among the pages the
   request still holds;
3. the fresh tokens are written, unquantized (cast to float8 e4m3 under
   ``residual_dtype``, where the backend has rounded them on arrival,
   ``packing.round_to_window``), into the residual pages
   (with ``residual_ring`` only those of the new window ``[Q(n), n)``: the
   ring's slots are shared by positions a span apart).

This is the CPU implementation and the oracle for the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vllm_kvcomp.kernels import packing
from vllm_kvcomp.config import SCORED_EVICTION, KvcompConfig
from vllm_kvcomp.layout import PageLayout


@dataclass
class BatchView:
    """Per-step inputs, host-side lists where the reference loops over them."""

    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [num_reqs, max_blocks] packed group
    residual_block_table: torch.Tensor | None  # [num_reqs, max_blocks_r]
    residual_slot_mapping: torch.Tensor | None  # [num_tokens]
    residual_block_size: int
    # prompt length per request: SnapKV selects where a step completes it
    prompt_lens: list[int] | None = None


def step_requests(query_start_loc, seq_lens):
    """``(i, qs, qe, n, start)`` of each request with tokens in the step:
    its rows ``[qs, qe)`` of the step's tokens, ``n`` tokens after the step,
    the first of them at position ``start``."""
    for i in range(len(seq_lens)):
        qs, qe = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if qe == qs:
            continue
        n = int(seq_lens[i])
        yield i, qs, qe, n, n - (qe - qs)


def gather_residual(
    residual_cache: torch.Tensor, block_row: torch.Tensor, bs_r: int, lo: int, hi: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of positions [lo, hi) from residual pages [nb, 2, H, bs_r, D], in
    ``dtype`` (default: the pages' own; an fp8 window mixes with nothing)."""
    pos = torch.arange(lo, hi, device=block_row.device)
    blocks = block_row[pos // bs_r].long()
    offs = pos % bs_r
    k = residual_cache[blocks, 0, :, offs, :]
    v = residual_cache[blocks, 1, :, offs, :]
    if dtype is not None:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


def _causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Scaled GQA scores [H, rep, Tq, Tk] of queries at positions [start,
    start+Tq) over keys at [0, Tk), -inf above the causal diagonal."""
    Tq, Hq, D = q.shape
    Tk, H, _ = k.shape
    qf = q.float().view(Tq, H, Hq // H, D)
    scores = torch.einsum("qhrd,khd->hrqk", qf, k.float()) * scale
    qpos = torch.arange(start, start + Tq, device=q.device)
    kpos = torch.arange(Tk, device=q.device)
    scores.masked_fill_(kpos.unsqueeze(0) > qpos.unsqueeze(1), float("-inf"))
    return scores


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int
) -> torch.Tensor:
    """Causal GQA attention of queries at positions [start, start+Tq) over
    keys at positions [0, Tk). q [Tq, Hq, D], k/v [Tk, H, D] -> [Tq, Hq, D]."""
    Tq, Hq, D = q.shape
    probs = torch.softmax(_causal_scores(q, k, scale, start), dim=-1)
    out = torch.einsum("hrqk,khd->qhrd", probs, v.float())
    return out.reshape(Tq, Hq, D)


def attend_split(
    q: torch.Tensor, start: int, k_packed: torch.Tensor, v_packed: torch.Tensor,
    k_full: torch.Tensor, v_full: torch.Tensor, full_lo: int, bounds: torch.Tensor,
    scale: float, packed_pos: torch.Tensor | None = None,
    dropped: torch.Tensor | None = None, head_mask: torch.Tensor | None = None,
    probs_out: list | None = None,
) -> torch.Tensor:
    """Causal GQA attention of queries at positions [start, start+Tq): query
    ``t`` reads packed keys (positions ``packed_pos``, default [0,
    len(k_packed))) below ``bounds[t]`` and outside ``[dropped[t, 0],
    dropped[t, 1])`` when given, only those of ``head_mask [H, len(k_packed)]``
    for the query heads of each KV head when given, and full-precision keys
    (positions [full_lo, full_lo + len(k_full))) from ``bounds[t]`` to its own
    position. ``probs_out``: receives the softmax ``[H, rep, Tq, K]`` and the
    keys' positions ``[K]`` (what SnapKV scores with). -> [Tq, Hq, D] float."""
    Tq, Hq, D = q.shape
    H = k_full.shape[1]
    dev = q.device
    k = torch.cat([k_packed.float(), k_full.float()])
    v = torch.cat([v_packed.float(), v_full.float()])
    n_p = k_packed.shape[0]
    if packed_pos is None:
        packed_pos = torch.arange(n_p, device=dev)
    pos = torch.cat([packed_pos.to(dev), full_lo + torch.arange(k_full.shape[0], device=dev)])
    packed = torch.arange(k.shape[0], device=dev) < n_p
    qpos = torch.arange(start, start + Tq, device=dev)[:, None]
    b = bounds.to(dev)[:, None]
    packed_visible = pos[None, :] < b
    if dropped is not None:
        d = dropped.to(dev)
        packed_visible &= (pos[None, :] < d[:, :1]) | (pos[None, :] >= d[:, 1:])
    visible = torch.where(packed[None, :], packed_visible,
                          (pos[None, :] >= b) & (pos[None, :] <= qpos))
    scores = torch.einsum("qhrd,khd->hrqk", q.float().view(Tq, H, Hq // H, D), k) * scale
    scores.masked_fill_(~visible, float("-inf"))
    if head_mask is not None:
        scores[..., :n_p].masked_fill_(~head_mask.to(dev)[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if probs_out is not None:
        probs_out.append((probs, pos))
    return torch.einsum("hrqk,khd->qhrd", probs, v).reshape(Tq, Hq, D)


def packed_prefix(
    packed_cache: torch.Tensor, layout: PageLayout, block_row: torch.Tensor, hi: int,
    model_dtype: torch.dtype, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of positions [0, hi) dequantized from a request's packed pages."""
    k, v, _ = packed_kept(packed_cache, layout, block_row, hi, (0, 0), model_dtype,
                          num_kv_heads)
    return k, v


def packed_kept(
    packed_cache: torch.Tensor, layout: PageLayout, block_row: torch.Tensor, hi: int,
    skip_pages: tuple[int, int], model_dtype: torch.dtype, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V and positions of [0, hi) dequantized from a request's packed
    pages, leaving out the pages ``[skip_pages[0], skip_pages[1])``: their
    block-table entries may be stale (given back to the pool)."""
    return packed_pages(packed_cache, layout, block_row, hi, held_pages(layout, hi, skip_pages),
                        model_dtype, num_kv_heads)


def packed_pages(
    packed_cache: torch.Tensor, layout: PageLayout, block_row: torch.Tensor, hi: int,
    pages: list[int], model_dtype: torch.dtype, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V and positions below ``hi`` of a request's packed pages ``pages``
    (ascending page indices), dequantized; no other page is read."""
    bs = layout.block_size
    dev = packed_cache.device
    if not pages:
        empty = torch.zeros(0, num_kv_heads, layout.head_size, dtype=model_dtype, device=dev)
        return empty, empty, torch.zeros(0, dtype=torch.long, device=dev)
    idx = torch.tensor(pages, dtype=torch.long, device=block_row.device)
    k, v = packing.dequantize_pages(packed_cache, layout, block_row[idx].long(), model_dtype)
    pos = (idx.to(dev)[:, None] * bs + torch.arange(bs, device=dev)[None, :]).reshape(-1)
    keep = pos < hi
    return k[keep], v[keep], pos[keep]


def request_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None, layout: PageLayout, cfg: KvcompConfig,
    block_row: torch.Tensor, residual_row: torch.Tensor | None, residual_block_size: int,
    start: int, scale: float, model_dtype: torch.dtype, as_stored: bool,
    window: tuple[torch.Tensor, torch.Tensor] | None = None, quest=None,
    prompt_len: int | None = None, probs_out: list | None = None, from_row: int = 0,
) -> torch.Tensor:
    """One request's step attention (module docstring, 2.) over the cache as it
    is after the step's hand-over: packed pages hold [0, Q(n)). ``window``: the
    residual K, V of [Q(start), start) when the caller has gathered them.
    ``quest`` (``policies.quest.Quest``): a decode query past its budget reads,
    per KV head, only the packed pages the policy selects (prompts attend
    every page). ``prompt_len``: the request's prompt length (SnapKV); a step
    that starts inside the prompt attends the whole cache (``snapkv_step``
    splits the step that completes it). ``probs_out``: see ``attend_split``.
    ``from_row``: only the queries from that row on attend (over what the
    whole step reads), returning their rows."""
    Tq = q.shape[0]
    q_old = cfg.quantized_prefix_len(start)
    bounds = torch.tensor([cfg.quantized_prefix_len(start + t) if as_stored else q_old
                           for t in range(Tq)])
    packed_pos = dropped = head_mask = None
    snap = None
    if cfg.eviction is not None and cfg.eviction.method == "snapkv":
        assert prompt_len is not None, "SnapKV needs each request's prompt length"
        plan = cfg.eviction.policy(layout.block_size).plan(
            prompt_len, cfg.quantized_prefix_len(prompt_len))
        if plan is not None and start >= prompt_len:
            snap = plan
    if cfg.eviction is not None and cfg.eviction.method in SCORED_EVICTION:
        assert prompt_len is not None, "H2O / A2SF need each request's prompt length"
        # heavy hitters in [0, K), tokens in place from E (policies.h2o.PagedH2O)
        snap = cfg.eviction.policy(layout.block_size).layout(start, q_old, prompt_len)
    if snap is not None:
        # positions [kept, end) hold nothing: the moved-out tokens' pages are
        # (or will be) back in the pool, the rest of the last kept page is stale
        kept, end = snap
        skip = (-(-kept // layout.block_size), end // layout.block_size)
        if (quest is not None and Tq == 1
                and len(held_pages(layout, q_old, skip)) > quest.budget_pages):
            # Quest among the pages SnapKV kept and those written since
            k_packed, v_packed, packed_pos, head_mask = quest_pages(
                q[0], packed_cache, layout, block_row, q_old, quest, model_dtype,
                k_new.shape[1], skip)
        else:
            k_packed, v_packed, packed_pos = packed_kept(
                packed_cache, layout, block_row, int(bounds.max()), skip, model_dtype,
                k_new.shape[1])
        dropped = torch.tensor([[kept, end]] * Tq, dtype=torch.long)
    elif quest is not None and Tq == 1 and quest.is_sparse(q_old):
        k_packed, v_packed, packed_pos, head_mask = quest_pages(
            q[0], packed_cache, layout, block_row, q_old, quest, model_dtype, k_new.shape[1])
    elif cfg.eviction is None or cfg.eviction.method == "snapkv":
        k_packed, v_packed = packed_prefix(packed_cache, layout, block_row, int(bounds.max()),
                                           model_dtype, k_new.shape[1])
    else:
        policy = cfg.eviction.policy(layout.block_size)
        # bounds never decrease along the step, so the first query's drops
        # are shared by all of them
        k_packed, v_packed, packed_pos = packed_kept(
            packed_cache, layout, block_row, int(bounds.max()),
            policy.dropped_pages(start + 1, int(bounds[0])), model_dtype, k_new.shape[1])
        dropped = torch.tensor([policy.dropped(start + t + 1, int(bounds[t]))
                                for t in range(Tq)], dtype=torch.long)
    k_full, v_full = k_new, v_new
    if start > q_old:
        kr, vr = window or gather_residual(residual_cache, residual_row, residual_block_size,
                                           q_old, start)
        k_full, v_full = torch.cat([kr.to(k_new.dtype), k_new]), torch.cat([vr.to(v_new.dtype), v_new])
    if from_row:
        q, bounds = q[from_row:], bounds[from_row:]
        dropped = dropped[from_row:] if dropped is not None else None
    return attend_split(q, start + from_row, k_packed, v_packed, k_full, v_full, q_old, bounds,
                        scale, packed_pos, dropped, head_mask, probs_out)


# Observation-window scores of prompts whose window a chunk boundary splits,
# per layer cache, request (its first packed page, exclusively its own: no
# prefix hits under eviction) and prompt length: (scored up to, [Hq, L] sums).
_WINDOW_SCORES: dict = {}
_WINDOW_SCORES_MAX = 4096


class RequestStep(NamedTuple):
    """One request's step over ``[start, start + Tq)`` after its hand-over,
    as the references of an evicting step take it (``snapkv_step``,
    ``snapkv_window_probs``, ``snapkv_settle``, ``h2o_ref.scored_step``).
    ``window``: the residual K, V of ``[Q(start), start)`` when gathered;
    ``prompt_len``: the request's prompt length."""

    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    packed_cache: torch.Tensor
    residual_cache: torch.Tensor | None
    layout: PageLayout
    cfg: KvcompConfig
    block_row: torch.Tensor
    residual_row: torch.Tensor | None
    residual_block_size: int
    start: int
    scale: float
    model_dtype: torch.dtype
    as_stored: bool
    window: tuple[torch.Tensor, torch.Tensor] | None
    prompt_len: int

    def rows(self, lo: int = 0, hi: int | None = None) -> RequestStep:
        """The step of queries ``[lo, hi)`` alone (fresh K/V sliced alike)."""
        return self._replace(q=self.q[lo:hi], k_new=self.k_new[lo:hi], v_new=self.v_new[lo:hi])

    def attention(self, **kw) -> torch.Tensor:
        """``request_attention`` of the step (``kw``: its keywords)."""
        # the fields up to ``window`` are request_attention's positional arguments
        return request_attention(*self[:15], prompt_len=self.prompt_len, **kw)


def snapkv_step(step: RequestStep) -> torch.Tensor:
    """A step of a prompt that SnapKV evicts from, whose chunk holds
    observation-window queries (module docstring, 2.). The window's
    attention is summed over its queries chunk by chunk, so a window split
    by chunked prefill scores as a whole; the chunk that completes the
    prompt selects and compacts."""
    m, w0 = _snapkv_rows(step)
    probs = []
    out = step.rows(0, m).attention(probs_out=probs)
    p, pos = probs[0]  # [H, rep, m, K], [K]
    rest = snapkv_settle((p[:, :, w0:], pos), step)
    return out if rest is None else torch.cat([out, rest])


def _snapkv_rows(step: RequestStep) -> tuple[int, int]:
    """(the step's prompt queries, the first of them in the observation window)."""
    window = step.cfg.eviction.policy(step.layout.block_size).window
    P, start = step.prompt_len, step.start
    return min(P, start + step.q.shape[0]) - start, max(P - window, start) - start


def snapkv_window_probs(step: RequestStep) -> tuple[torch.Tensor, torch.Tensor]:
    """``snapkv_step``'s softmax ``[H, rep, w, K]`` of the step's
    observation-window queries alone, and the keys' positions ``[K]``: what
    a path whose attention kernel keeps no probabilities scores with."""
    m, w0 = _snapkv_rows(step)
    probs = []
    step.rows(0, m).attention(probs_out=probs, from_row=w0)
    return probs[0]


def snapkv_settle(window_probs: tuple[torch.Tensor, torch.Tensor],
                  step: RequestStep, compact=None) -> torch.Tensor | None:
    """The window's attention ``window_probs`` (``snapkv_window_probs``)
    added to the sums of the prompt's earlier chunks; in the chunk that
    completes the prompt, the selection and its compaction (``compact``:
    ``compaction.compact_kept`` or a function of its arguments). Returns the
    attention of the step's queries past the prompt (None: there are none)."""
    from vllm_kvcomp.kernels.compaction import compact_kept

    compact = compact or compact_kept

    cfg, layout, block_row = step.cfg, step.layout, step.block_row
    start, P, Tq = step.start, step.prompt_len, step.q.shape[0]
    policy = cfg.eviction.policy(layout.block_size)
    n = start + Tq
    kept, end = policy.plan(P, cfg.quantized_prefix_len(P))
    m, _ = _snapkv_rows(step)
    p, pos = window_probs
    H, rep = p.shape[:2]
    # a position read both packed and in full precision is one or the other
    # for each query, so summing over copies gives each query's probability
    L = P - policy.window
    cols = pos < L
    obs = p[:, :, :, cols].sum(dim=2).reshape(H * rep, -1)
    sums = torch.zeros(H * rep, L, dtype=obs.dtype, device=obs.device)
    sums.index_add_(1, pos[cols].to(obs.device), obs)
    key = (step.packed_cache.data_ptr(), int(block_row[0]), P)
    earlier = _WINDOW_SCORES.pop(key, None)
    if earlier is not None and earlier[0] == start:
        sums += earlier[1]
    if n < P:
        if cfg.quantized_prefix_len(n) > 0:  # else page 0 is not the request's yet
            while len(_WINDOW_SCORES) >= _WINDOW_SCORES_MAX:
                _WINDOW_SCORES.pop(next(iter(_WINDOW_SCORES)))
            _WINDOW_SCORES[key] = (n, sums)
        return None
    kept_pos = policy.select(policy.scores(sums[:, None], H)[:, :end], kept)
    compact(step.packed_cache, layout, block_row, kept_pos, step.model_dtype)
    if m == Tq:
        return None
    # a recomputed request's generated tokens: they attend the kept view, as
    # the decode steps that first produced them did
    q_old, q_p = cfg.quantized_prefix_len(start), cfg.quantized_prefix_len(P)
    parts = [step.window] if step.window is not None else []
    parts.append((step.k_new[:m], step.v_new[:m]))
    k_full = torch.cat([x[0].to(step.k_new.dtype) for x in parts])[q_p - q_old:]
    v_full = torch.cat([x[1].to(step.v_new.dtype) for x in parts])[q_p - q_old:]
    return step.rows(m)._replace(start=P, window=(k_full, v_full)).attention()


def held_pages(layout: PageLayout, hi: int, skip_pages: tuple[int, int] = (0, 0)) -> list[int]:
    """A request's packed pages below position ``hi``, leaving out the pages
    ``[skip_pages[0], skip_pages[1])`` that eviction gave back."""
    lo_pg, hi_pg = skip_pages
    return [i for i in range(-(-hi // layout.block_size)) if not lo_pg <= i < hi_pg]


def quest_selection(q: torch.Tensor, packed_cache: torch.Tensor, layout: PageLayout,
                    block_row: torch.Tensor, hi: int, quest,
                    skip_pages: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Page indices ``[H, K]`` that a decode query ``q [Hq, D]`` reading
    packed positions ``[0, hi)`` attends under ``quest``, scored on the key
    groups' ranges of every page below ``hi`` that the request still holds
    (``skip_pages``: evicted, see ``held_pages``): Quest over the held pages
    as one sequence, its newest page the last held one."""
    held = torch.tensor(held_pages(layout, hi, skip_pages), dtype=torch.long)
    lo, up = packing.key_group_ranges(packed_cache, layout, block_row.long()[held])
    return held.to(q.device)[quest.select(quest.page_scores(q, lo, up))]


def quest_pages(q, packed_cache, layout, block_row, hi, quest, model_dtype, num_kv_heads,
                skip_pages: tuple[int, int] = (0, 0)):
    """K, V, positions of the pages some KV head selected (``packed_pages``),
    and which KV head reads which of them ``[H, len(positions)]``."""
    sel = quest_selection(q, packed_cache, layout, block_row, hi, quest, skip_pages)
    pages = sorted(set(sel.flatten().tolist()))
    k, v, pos = packed_pages(packed_cache, layout, block_row, hi, pages, model_dtype,
                             num_kv_heads)
    page_of = pos // layout.block_size
    head_mask = (page_of[None, :, None] == sel.to(pos.device)[:, None, :]).any(-1)
    return k, v, pos, head_mask


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Natural-log log-sum-exp of ``attend``'s causal scores, [Hq, Tq]: what
    merging two partial attentions over disjoint key sets needs."""
    Tq, Hq, _ = q.shape
    return torch.logsumexp(_causal_scores(q, k, scale, start), dim=-1).reshape(Hq, Tq)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial
    results: outputs [T, Hq, D], LSEs [Hq, T] (natural log, -inf: empty)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    tot = wa + wb
    wa, wb = (wa / tot).T.unsqueeze(-1), (wb / tot).T.unsqueeze(-1)
    return out_a.float() * wa + out_b.float() * wb


def _handover(
    packed_cache: torch.Tensor,
    layout: PageLayout,
    cfg: KvcompConfig,
    block_row: torch.Tensor,
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    lo: int,
) -> None:
    """Quantize tokens at positions [lo, lo + len(k_src)) into packed pages."""
    T = k_src.shape[0]
    if T == 0:
        return
    bs = layout.block_size
    pos = torch.arange(lo, lo + T, device=block_row.device)
    blocks = block_row[pos // bs].long()
    slots = pos % bs
    if cfg.k_bits < 16 and cfg.key_axis == "channel":
        G = cfg.group_size
        assert lo % G == 0 and T % G == 0, "per-channel key groups must be whole"
        gpos = pos[::G]
        packing.store_key_groups_per_channel(
            packed_cache,
            layout,
            k_src.reshape(T // G, G, *k_src.shape[1:]),
            block_row[gpos // bs].long(),
            (gpos % bs) // G,
        )
    else:
        packing.store_per_token(packed_cache, layout, "k", k_src, blocks, slots)
    packing.store_per_token(packed_cache, layout, "v", v_src, blocks, slots)


def step_model_dtype(cfg: KvcompConfig, residual_cache: torch.Tensor | None,
                     query: torch.Tensor) -> torch.dtype:
    """The model dtype, which 16-bit pages are read in and kept keys
    requantized from: the window's dtype, unless the window holds float8
    (``residual_dtype``), a storage format that 16-bit pages are not in."""
    if residual_cache is not None and not cfg.residual_fp8:
        return residual_cache.dtype
    return query.dtype


def kvcomp_step_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    layout: PageLayout,
    cfg: KvcompConfig,
    scale: float,
    batch: BatchView,
    as_stored: bool | None = None,
    quest=None,
) -> None:
    """One attention layer's step for a whole batch (see module docstring);
    ``as_stored`` defaults to the config's choice on the CPU path; ``quest``:
    the layer's page selection at decode (``request_attention``)."""
    if as_stored is None:
        as_stored = cfg.prompt_as_stored
    model_dtype = step_model_dtype(cfg, residual_cache, query)
    for i, qs, qe, n, start in step_requests(batch.query_start_loc, batch.seq_lens):
        q_old, q_new = cfg.quantized_prefix_len(start), cfg.quantized_prefix_len(n)
        row = batch.block_table[i]
        res_row = batch.residual_block_table[i] if batch.residual_block_table is not None else None
        k_new, v_new = key[qs:qe], value[qs:qe]
        # the window [Q(start), start): read by the hand-over and the attention
        window = None
        if start > q_old:
            window = gather_residual(residual_cache, res_row, batch.residual_block_size,
                                     q_old, start, key.dtype)
        if q_new > q_old:
            old_hi = min(q_new, start)
            ks, vs = [], []
            if old_hi > q_old:
                ks.append(window[0][: old_hi - q_old])
                vs.append(window[1][: old_hi - q_old])
            if q_new > start:
                ks.append(k_new[: q_new - start])
                vs.append(v_new[: q_new - start])
            _handover(packed_cache, layout, cfg, row, torch.cat(ks), torch.cat(vs), q_old)
        P = batch.prompt_lens[i] if batch.prompt_lens is not None else None
        step = RequestStep(query[qs:qe], k_new, v_new, packed_cache, residual_cache, layout, cfg,
                           row, res_row, batch.residual_block_size, start, scale, model_dtype,
                           as_stored, window, P)
        if cfg.eviction is not None and cfg.eviction.method in SCORED_EVICTION:
            from vllm_kvcomp.kernels.h2o_ref import scored_step

            out = scored_step(step)
        elif (cfg.eviction is not None and cfg.eviction.method == "snapkv"
                and start < P and n > P - cfg.eviction.window
                and cfg.eviction.policy(layout.block_size).plan(
                    P, cfg.quantized_prefix_len(P)) is not None):
            out = snapkv_step(step)
        else:
            out = request_attention(query[qs:qe], k_new, v_new, packed_cache, residual_cache,
                                    layout, cfg, row, res_row, batch.residual_block_size, start,
                                    scale, model_dtype, as_stored, window, quest, prompt_len=P)
        output[qs:qe] = out.to(output.dtype)

    if residual_cache is not None and batch.residual_slot_mapping is not None:
        T = key.shape[0]
        slots = batch.residual_slot_mapping[:T].long()
        keep = slots >= 0
        if cfg.residual_ring:
            # a step's tokens below Q(n) were packed straight from the fresh
            # K/V; in a ring their slots may alias tokens of the new window
            for i in range(len(batch.seq_lens)):
                qs, qe = batch.query_start_loc[i], batch.query_start_loc[i + 1]
                n = batch.seq_lens[i]
                packed = cfg.quantized_prefix_len(n) - (n - (qe - qs))
                keep[qs: qs + max(0, min(packed, qe - qs))] = False
        if bool(keep.any()):
            bs_r = batch.residual_block_size
            b, o = slots[keep] // bs_r, slots[keep] % bs_r
            residual_cache[b, 0, :, o, :] = packing.to_window(key[:T][keep], residual_cache.dtype)
            residual_cache[b, 1, :, o, :] = packing.to_window(value[:T][keep],
                                                              residual_cache.dtype)
