"""Quest on the packed pages: page scoring, top-k selection and the decode
attention over the selected pages (``vllm_kvcomp/policies/quest.py`` is the
rule), each beside its PyTorch reference.

Four launches per decode batch (five with the split merge), all of fixed
shape (CUDA-graph safe: every range comes from ``seq_lens`` on the device,
none from the host):

* ``_quest_score_kernel``, grid ``(B, H, pages / BLOCK_P)``: each page's bound
  from its key groups' (scale, min) (``packing.key_group_ranges``), the largest
  over the page's groups and the KV head's query heads, into fp32 scratch
  ``[B, H, max_pages]`` (``-inf`` past the request's packed pages);
* ``_quest_select_kernel``, grid ``(B, H)``: top ``budget_pages - 1`` of the
  pages below the newest by one bitonic top-k over ``(score, page)`` packed
  into int64 keys (equal scores keep the lower page, as the reference's stable
  sort), plus the newest page; every page when there are no more than the
  budget. Output: ``selected [B, H, budget_pages]`` int32 page indices, -1
  where unused;
* ``_quest_rewrite_kernel``, grid ``(B, H)``: the rewritten batch the
  attention runs on, one request of one KV head per (request, KV head): its
  block table the selected pages in ascending order, its length, its window's
  block-table row (``quest_rewrite``; ``quest_rewrite_reference`` builds the
  same from PyTorch ops, some forty small kernels in a CUDA graph);
* the attention over the selected pages is the dense decode kernel
  (``triton_decode``) on that batch (``quest_decode_attention``). So Quest
  reads its pages with the dense kernel's split-K tiles, merge and code
  folding, and adds no attention kernel of its own to verify on a GPU. Its
  split count is the dense launch's rule applied to the rewritten batch
  (``quest_num_splits``: B * H requests of one KV head, at most
  ``quest_span`` tokens each, at a lower occupancy aim), or the caller's
  ``num_splits``.

A plain kernel of its own (one program per (request, KV head) walking the
selected pages, no split) ran 4.2x slower than the dense kernel on an H200 at
batch 32 x 32K with a 2048-token budget, although it read 8x fewer bytes
(benchmarks/results/2026-12-03-h200-quest): at that batch fewer than two such
programs run per SM.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import attention_ref
from vllm_kvcomp.kernels.decode_launch import decode_num_splits
from vllm_kvcomp.kernels.triton_common import (
    check_alignment,
    check_decode_inputs,
    load_params,
)
from vllm_kvcomp.layout import PageLayout


@triton.jit
def _packed_pages(seq_len, R: tl.constexpr, ALIGN: tl.constexpr, BS: tl.constexpr):
    """Packed pages a decode query of a ``seq_len``-token sequence reads."""
    q_old = tl.maximum(seq_len - 1 - R, 0) // ALIGN * ALIGN
    return q_old, tl.cdiv(q_old, BS)


@triton.jit
def _quest_score_kernel(
    q_ptr, stride_qb, stride_qh, cache_ptr, stride_cb, stride_ch, bt_ptr, stride_bt,
    seq_lens_ptr, score_ptr, stride_sb, stride_sh,
    D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, ALIGN: tl.constexpr,
    G: tl.constexpr, K_BITS: tl.constexpr, K_PARAMS_OFF: tl.constexpr,
    REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    MAX_PAGES: tl.constexpr, SPLIT_HEADS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    i64 = i.to(tl.int64)
    _, npages = _packed_pages(tl.load(seq_lens_ptr + i), R, ALIGN, BS)
    pg = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pg < npages
    r = tl.arange(0, REP_P)
    row_ok = r < REP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q_row = q_ptr + i64 * stride_qb + h * REP * stride_qh
    if not SPLIT_HEADS:
        q = tl.load(q_row + r[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
    blk = tl.load(bt_ptr + i64 * stride_bt + pg, mask=pm, other=0).to(tl.int64)
    # (scale, min) fp16 pairs as 32-bit words, one per channel per key group
    wp = cache_ptr.to(tl.pointer_type(tl.int32))
    pbase = (blk * stride_cb + h * stride_ch + K_PARAMS_OFF) // 4
    QMAX: tl.constexpr = (1 << K_BITS) - 1
    score = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(BS // G):
        sc, lo = load_params(wp, pbase[:, None] + g * D + d[None, :], pm[:, None] & dm[None, :])
        hi = lo + sc * QMAX
        if SPLIT_HEADS:
            # one query head at a time: [BLOCK_P, BLOCK_D] temporaries, not
            # [BLOCK_P, REP_P, BLOCK_D] (registers, at GQA 4 and wide tiles)
            for rr in tl.static_range(REP):
                qr = tl.load(q_row + rr * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
                bound = tl.sum(tl.maximum(qr[None, :] * hi, qr[None, :] * lo), axis=1)
                score = tl.maximum(score, bound)
        else:
            # sum_c max(q_c hi_c, q_c lo_c): [BLOCK_P, REP_P]
            qb = q[None, :, :]
            bound = tl.sum(tl.maximum(qb * hi[:, None, :], qb * lo[:, None, :]), axis=2)
            bound = tl.where(row_ok[None, :], bound, float("-inf"))
            score = tl.maximum(score, tl.max(bound, axis=1))
    score = tl.where(pm, score, float("-inf"))
    tl.store(score_ptr + i64 * stride_sb + h * stride_sh + pg, score, mask=pg < MAX_PAGES)


@triton.jit
def _quest_select_kernel(
    score_ptr, stride_sb, stride_sh, seq_lens_ptr, sel_ptr, stride_selb, stride_selh,
    BS: tl.constexpr, R: tl.constexpr, ALIGN: tl.constexpr, MAX_PAGES: tl.constexpr,
    KP: tl.constexpr, KP_P: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    i64 = i.to(tl.int64)
    _, npages = _packed_pages(tl.load(seq_lens_ptr + i), R, ALIGN, BS)
    idx = tl.arange(0, MAX_PAGES)
    # the newest page is always attended: rank only the pages below it
    s = tl.load(score_ptr + i64 * stride_sb + h * stride_sh + idx, mask=idx < npages - 1,
                other=float("-inf"))
    # an int64 key per page ordering like (score, -page): float bits made
    # order-preserving as signed ints, the page's complement below them
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (MAX_PAGES - 1 - idx).to(tl.int64)
    top = tl.topk(key, KP_P)
    page = (MAX_PAGES - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
    j = tl.arange(0, KP_P)
    sel_row = sel_ptr + i64 * stride_selb + h * stride_selh
    dense = npages <= KP
    out = tl.where(dense, j, tl.where(j == KP - 1, npages - 1, page))
    out = tl.where(j < tl.minimum(npages, KP), out, -1)
    tl.store(sel_row + j, out, mask=j < KP)


@triton.jit
def _quest_rewrite_kernel(
    sel_ptr, stride_selb, stride_selh, bt_ptr, stride_bt, bt_cols, seq_lens_ptr,
    rbt_ptr, stride_rbt, rbt_cols, table_ptr, lens_ptr, res_table_ptr, mb, mh, rmb, rmh,
    BS: tl.constexpr, BS_R: tl.constexpr, R: tl.constexpr, ALIGN: tl.constexpr,
    KP: tl.constexpr, KP_P: tl.constexpr, WIDTH: tl.constexpr, WIDTH_P: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    i64 = i.to(tl.int64)
    row = i64 * tl.num_programs(1) + h
    n = tl.load(seq_lens_ptr + i)
    _, npages = _packed_pages(n, R, ALIGN, BS)
    # whole pages are dropped, so the window keeps its offset in its own pages
    dropped = (npages - tl.minimum(npages, KP)) * BS
    tl.store(lens_ptr + row, n - dropped)
    j = tl.arange(0, KP_P)
    UNUSED: tl.constexpr = 2147483647
    sel = tl.load(sel_ptr + i64 * stride_selb + h * stride_selh + j, mask=j < KP, other=-1)
    # ascending, unused last: the newest (maybe partial) page ends the list,
    # so only the rewritten request's last packed tile is partial
    page = tl.sort(tl.where(sel < 0, UNUSED, sel))
    used = page != UNUSED
    # clamped: a launch recorded without running the selection stays in bounds
    page = tl.minimum(tl.where(used, page, 0), bt_cols - 1)
    blk = tl.load(bt_ptr + i64 * stride_bt + page, mask=used, other=0).to(tl.int64)
    tl.store(table_ptr + row * KP + j, tl.where(used, blk * mb + h * mh, 0).to(tl.int32),
             mask=j < KP)
    if HAS_RESIDUAL:
        c = tl.arange(0, WIDTH_P)
        col = tl.minimum(c + dropped // BS_R, rbt_cols - 1)
        rb = tl.load(rbt_ptr + i64 * stride_rbt + col, mask=c < WIDTH, other=0).to(tl.int64)
        tl.store(res_table_ptr + row * WIDTH + c, (rb * rmb + h * rmh).to(tl.int32),
                 mask=c < WIDTH)


# --------------------------------------------------------------------------
# host wrappers
# --------------------------------------------------------------------------


def _check_quest(layout: PageLayout, cfg: KvcompConfig, quest) -> None:
    assert layout.config == cfg and quest.block_size == layout.block_size
    assert cfg.k_bits < 16 and cfg.key_axis == "channel", "Quest bounds per-channel keys"


def quest_page_scores(query: torch.Tensor, packed_cache: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, layout: PageLayout,
                      cfg: KvcompConfig, quest, block_p: int | None = None,
                      split_heads: bool = True, num_warps: int = 8) -> torch.Tensor:
    """Each packed page's Quest score for each (request, KV head) of a decode
    batch: fp32 ``[B, H, max_pages]`` (a power of two at least the block
    table's width), -inf past a request's packed pages. query [B, Hq, D],
    packed_cache uint8 [nb, H, head_page_bytes], block_table int32 [B, maxb].
    ``block_p`` (pages a program scores), ``split_heads`` (one query head at
    a time) and ``num_warps`` pick the launch; the scores are the same."""
    _check_quest(layout, cfg, quest)
    B, Hq, D = query.shape
    H = packed_cache.shape[1]
    assert query.stride(-1) == 1 and packed_cache.stride(-1) == 1
    check_alignment(layout, layout.model_dtype_bytes, packed_cache)
    max_pages = triton.next_power_of_2(max(block_table.shape[1], quest.budget_pages, 2))
    scores = torch.empty(B, H, max_pages, dtype=torch.float32, device=query.device)
    if B == 0:
        return scores
    # pages a program scores: [pages, query heads, channels] stays ~4K elements
    if block_p is None:
        # a program's temporaries ([pages, channels], or [pages, query heads,
        # channels] with all heads at once) stay ~4K elements. One head at a
        # time, 32 pages and 8 warps scored 32 x 32K (GQA 4) in 14.0 µs on an
        # H200, all heads at once (16 pages, 4 warps) in 43.7
        # (benchmarks/results/2026-12-04-h200-window-defaults-quest)
        rows = 1 if split_heads else triton.next_power_of_2(Hq // H)
        block_p = min(32 if split_heads else 16,
                      max(2, 4096 // (rows * triton.next_power_of_2(D))))
    block_p = min(block_p, max_pages)
    _quest_score_kernel[(B, H, max_pages // block_p)](
        query, query.stride(0), query.stride(1), packed_cache, packed_cache.stride(0),
        packed_cache.stride(1), block_table, block_table.stride(0), seq_lens,
        scores, scores.stride(0), scores.stride(1),
        D=D, G=cfg.group_size, K_BITS=cfg.k_bits, K_PARAMS_OFF=layout.k_params_offset,
        REP=Hq // H, REP_P=triton.next_power_of_2(Hq // H), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_P=block_p, MAX_PAGES=max_pages, BS=layout.block_size, R=cfg.residual_tokens,
        ALIGN=cfg.key_token_align, SPLIT_HEADS=split_heads, num_warps=num_warps)
    return scores


def quest_top_pages(scores: torch.Tensor, seq_lens: torch.Tensor, layout: PageLayout,
                    cfg: KvcompConfig, quest, num_warps: int = 4) -> torch.Tensor:
    """The pages each (request, KV head) attends, from ``quest_page_scores``:
    ``[B, H, quest.budget_pages]`` int32 page indices, -1 where unused."""
    B, H, max_pages = scores.shape
    kp = quest.budget_pages
    sel = torch.empty(B, H, kp, dtype=torch.int32, device=scores.device)
    if B == 0:
        return sel
    _quest_select_kernel[(B, H)](
        scores, scores.stride(0), scores.stride(1), seq_lens, sel, sel.stride(0),
        sel.stride(1), MAX_PAGES=max_pages, KP=kp, KP_P=triton.next_power_of_2(max(kp, 2)),
        BS=layout.block_size, R=cfg.residual_tokens, ALIGN=cfg.key_token_align,
        num_warps=num_warps)
    return sel


def quest_select(query: torch.Tensor, packed_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                 quest) -> torch.Tensor:
    """Pages each (request, KV head) of a decode batch attends:
    ``[B, H, quest.budget_pages]`` int32 page indices (positions in the
    request's block-table row), -1 where unused; any order: the page scores,
    then their top-k."""
    scores = quest_page_scores(query, packed_cache, block_table, seq_lens, layout, cfg, quest)
    return quest_top_pages(scores, seq_lens, layout, cfg, quest)


def quest_span(quest, cfg: KvcompConfig) -> int:
    """The longest request of Quest's rewritten batch (``quest_rewrite``):
    the budget's pages, a window, the fresh token."""
    return quest.budget_pages * quest.block_size + cfg.residual_tokens + cfg.key_token_align


# Occupancy aim of Quest's attention splits. Its rewritten batch has many short requests
# (one per request and KV head), so a lower aim than the dense kernel's 8 programs per SM
# suits it: on an H200 at batch 32 x 32K, budget 2048, 2 splits ran 47.8 µs, the dense
# aim's 5 splits 53.4 µs, 1 split 63.9, 10 splits 56.0
# (benchmarks/results/2026-12-04-h200-quest-eviction)
QUEST_PROGRAMS_PER_SM = 3


def quest_num_splits(num_reqs: int, num_kv_heads: int, quest, cfg: KvcompConfig, block_n: int,
                     num_sms: int = 132) -> int:
    """Splits of Quest's attention launch with no ``num_splits`` given: the
    dense launch's rule (``decode_num_splits``) for the rewritten batch,
    ``num_reqs * num_kv_heads`` requests of one KV head and at most
    ``quest_span`` tokens, aiming at ``QUEST_PROGRAMS_PER_SM``. ``block_n``:
    the decode kernel's tile. Python ints only, like the dense rule: the
    same answer at capture and replay."""
    return decode_num_splits(num_reqs * num_kv_heads, 1, quest_span(quest, cfg), cfg, block_n,
                             num_sms=num_sms, programs_per_sm=QUEST_PROGRAMS_PER_SM)


def _window_columns(layout: PageLayout, cfg: KvcompConfig, quest, residual_block_size: int,
                    residual_block_table: torch.Tensor | None) -> int:
    """Columns of the rewritten window table: only those a rewritten
    request's positions reach, whatever the context."""
    bs = layout.block_size
    assert quest.block_size == bs
    # whole pages are dropped, so the window keeps its offset in its own pages
    assert bs % cfg.key_token_align == 0 and bs % residual_block_size == 0
    if residual_block_table is None:
        return 0
    reach = -(-quest_span(quest, cfg) // residual_block_size) + 1
    return min(residual_block_table.shape[1], reach)


def quest_rewrite(selected: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  residual_block_table: torch.Tensor | None, layout: PageLayout,
                  cfg: KvcompConfig, quest, residual_block_size: int, heads: tuple[int, int],
                  res_heads: tuple[int, int] | None) -> tuple:
    """The batch ``quest_decode_attention`` runs the dense decode kernel on:
    ``(table [B*H, KP], lens [B*H], res_table [B*H, W] | None)``, int32. Row
    ``i * H + h`` is request i's KV head h: its selected pages in ascending
    order (unused entries last, as block 0) as blocks ``blk * mb + h * mh`` of the
    per-head cache view (``heads = (mb, mh)``, ``_per_head_blocks``), its
    length shortened by the unselected pages' tokens, and its window's
    block-table row shifted by as many pages (``res_heads``: the window
    view's ``(mb, mh)``). One launch, no host sync."""
    B, H, KP = selected.shape
    assert selected.dtype == torch.int32 and selected.stride(2) == 1
    width = _window_columns(layout, cfg, quest, residual_block_size, residual_block_table)
    dev = selected.device
    table = torch.empty(B * H, KP, dtype=torch.int32, device=dev)
    lens = torch.empty(B * H, dtype=torch.int32, device=dev)
    res_table = None
    if residual_block_table is not None:
        res_table = torch.empty(B * H, width, dtype=torch.int32, device=dev)
    if B == 0:
        return table, lens, res_table
    rbt = residual_block_table if residual_block_table is not None else block_table
    rmb, rmh = res_heads if res_heads is not None else (0, 0)
    _quest_rewrite_kernel[(B, H)](
        selected, selected.stride(0), selected.stride(1), block_table, block_table.stride(0),
        block_table.shape[1], seq_lens, rbt, rbt.stride(0), rbt.shape[1], table, lens,
        res_table if res_table is not None else table, heads[0], heads[1], rmb, rmh,
        BS=layout.block_size, BS_R=residual_block_size, R=cfg.residual_tokens,
        ALIGN=cfg.key_token_align, KP=KP, KP_P=triton.next_power_of_2(max(KP, 2)),
        WIDTH=max(width, 1), WIDTH_P=triton.next_power_of_2(max(width, 2)),
        HAS_RESIDUAL=residual_block_table is not None, num_warps=1)
    return table, lens, res_table


def _per_head_blocks(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, int, int]:
    """``cache`` with its head folded into the block index: a view whose block
    ``blk * mb + h * mh`` is block ``blk``'s head ``h`` (one KV head left, of
    size 1 at ``head_dim``), and ``(mb, mh)``. The block stride of the view is
    the gcd of the block and head strides, so any strided (padded) page works."""
    sb, sh = cache.stride(0), cache.stride(head_dim)
    step = math.gcd(sb, sh)
    mb, mh = sb // step, sh // step
    rows = (cache.shape[0] - 1) * mb + (cache.shape[head_dim] - 1) * mh + 1
    assert rows < 2 ** 31, "block index of the per-head view overflows int32"
    size, stride = list(cache.shape), list(cache.stride())
    size[0], stride[0], size[head_dim] = rows, step, 1
    return cache.as_strided(size, stride, cache.storage_offset()), mb, mh


def quest_decode_attention(
    query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor,
    packed_cache: torch.Tensor, residual_cache: torch.Tensor | None, block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None, seq_lens: torch.Tensor,
    selected: torch.Tensor, layout: PageLayout, cfg: KvcompConfig, scale: float,
    residual_block_size: int, quest, out: torch.Tensor | None = None,
    stale: torch.Tensor | None = None, **launch,
) -> torch.Tensor:
    """Decode attention over each (request, KV head)'s ``selected`` pages
    (``quest_select``), the full-precision window and the fresh token; the
    arguments are ``triton_decode.kvcomp_decode_attention``'s (``launch``: its
    tuning keywords, ``num_splits`` among them; without it
    ``quest_num_splits``). ``stale``: positions of the rewritten batch not to
    read (``quest_stale_ranges``, under SnapKV). -> out [B, Hq, D].

    It runs the dense decode kernel itself, split-K tiles, merge and all, on
    the rewritten batch of ``quest_rewrite``: each (request, KV head) a
    request of one KV head whose block table lists its selected pages
    through views of the caches with the head folded into the block index
    (``_per_head_blocks``), so its packed prefix ends where the selected
    pages end and its window and fresh token are the request's own. A
    selection has fixed shape and lives on the device, so this is CUDA-graph
    safe."""
    from vllm_kvcomp.kernels.triton_decode import kvcomp_decode_attention

    _check_quest(layout, cfg, quest)
    B, Hq, H, D = check_decode_inputs(query, key_new, value_new, packed_cache, layout)
    KP = quest.budget_pages
    assert selected.shape == (B, H, KP) and selected.dtype == torch.int32
    if out is None:
        out = torch.empty_like(query)
    if B == 0:
        return out
    rep = Hq // H
    packed, mb, mh = _per_head_blocks(packed_cache, 1)
    res_view, res_heads = residual_cache, None
    if residual_cache is not None:
        res_view, rmb, rmh = _per_head_blocks(residual_cache, 2)
        res_heads = (rmb, rmh)
    table, lens, res_table = quest_rewrite(
        selected, block_table, seq_lens, residual_block_table if residual_cache is not None
        else None, layout, cfg, quest, residual_block_size, (mb, mh), res_heads)
    head_view = out.view(B * H, rep, D) if out.is_contiguous() else torch.empty(
        B * H, rep, D, dtype=out.dtype, device=query.device)
    # max_seq_len = quest_span: the dense rule then picks quest_num_splits
    kvcomp_decode_attention(
        query.reshape(B * H, rep, D), key_new.reshape(B * H, 1, D),
        value_new.reshape(B * H, 1, D), packed, res_view, table, res_table, lens, layout, cfg,
        scale, residual_block_size, quest_span(quest, cfg), out=head_view,
        programs_per_sm=QUEST_PROGRAMS_PER_SM,
        **({"evicted": stale} if stale is not None else {}), **launch)
    if head_view.data_ptr() != out.data_ptr():
        out.copy_(head_view.view(B, Hq, D))
    return out


def quest_held_batch(evicted: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     residual_block_table: torch.Tensor | None, layout: PageLayout,
                     residual_block_size: int) -> tuple:
    """A decode batch under SnapKV as Quest sees it: each request's held
    pages as one sequence. ``evicted`` ``[B, 2]`` (``eviction_gpu``): packed
    positions ``[lo, hi)`` not read, ``hi`` a page boundary; the whole pages
    ``[ceil(lo / bs), hi / bs)`` are given back. Returns ``(block_table,
    seq_lens, residual_block_table)`` with those pages' columns removed and
    every later position (the window's too) moved down by their tokens. Keys
    were cached after RoPE, so where a page sits changes nothing but which
    page Quest calls the newest. Torch ops on the device, fixed shapes."""
    bs = layout.block_size
    lo, hi = evicted[:, 0].long(), evicted[:, 1].long()
    lo_pg = torch.div(lo + bs - 1, bs, rounding_mode="floor")
    gone = (torch.div(hi, bs, rounding_mode="floor") - lo_pg).clamp(min=0)
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    src = cols[None, :] + torch.where(cols[None, :] >= lo_pg[:, None], gone[:, None], 0)
    table = torch.gather(block_table, 1, src.clamp(max=block_table.shape[1] - 1))
    lens = (seq_lens.long() - gone * bs).to(seq_lens.dtype)
    res_table = None
    if residual_block_table is not None:
        assert bs % residual_block_size == 0
        rcols = torch.arange(residual_block_table.shape[1], device=block_table.device)
        rsrc = rcols[None, :] + (gone * (bs // residual_block_size))[:, None]
        res_table = torch.gather(residual_block_table, 1,
                                 rsrc.clamp(max=residual_block_table.shape[1] - 1))
    return table, lens, res_table


def quest_stale_ranges(selected: torch.Tensor, evicted: torch.Tensor,
                       layout: PageLayout) -> torch.Tensor:
    """``[B * H, 2]`` int32: in the batch ``quest_rewrite`` makes of
    ``selected`` (pages of ``quest_held_batch``'s sequences), the positions
    of the page holding SnapKV's kept end ``lo`` past ``lo`` (stale; ``(0,
    0)`` where that page is whole or not selected): the decode kernel's
    evicted range there."""
    bs = layout.block_size
    B, H, _ = selected.shape
    lo = evicted[:, 0].long()
    part = torch.div(lo, bs, rounding_mode="floor")  # the page holding lo
    torn = (lo % bs != 0)[:, None]
    sel = selected.long()
    rank = ((sel >= 0) & (sel < part[:, None, None])).sum(-1)  # its place among the selected
    chosen = (sel == part[:, None, None]).any(-1) & torn
    start = rank * bs + (lo % bs)[:, None]
    ranges = torch.stack([torch.where(chosen, start, 0), torch.where(chosen, (rank + 1) * bs, 0)],
                         dim=-1)
    return ranges.view(B * H, 2).to(torch.int32)


# --------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------


def quest_select_reference(query, packed_cache, block_table, seq_lens, layout, cfg,
                           quest) -> torch.Tensor:
    """``quest_select`` by ``attention_ref.quest_selection`` per request,
    ascending page indices, -1 where unused."""
    B, H = query.shape[0], packed_cache.shape[1]
    sel = torch.full((B, H, quest.budget_pages), -1, dtype=torch.int32)
    for i, n in enumerate(int(x) for x in seq_lens):
        hi = cfg.quantized_prefix_len(max(n - 1, 0))
        if n <= 0 or hi == 0:
            continue
        s = attention_ref.quest_selection(query[i], packed_cache, layout, block_table[i], hi,
                                          quest)
        sel[i, :, : s.shape[1]] = s.to(torch.int32)
    return sel


def quest_rewrite_reference(selected, block_table, seq_lens, residual_block_table, layout, cfg,
                            quest, residual_block_size, heads, res_heads) -> tuple:
    """``quest_rewrite`` in PyTorch ops."""
    B, H, KP = selected.shape
    width = _window_columns(layout, cfg, quest, residual_block_size, residual_block_table)
    bs, dev = layout.block_size, selected.device
    n = seq_lens.to(torch.int64)
    ALIGN, R = cfg.key_token_align, cfg.residual_tokens
    q_old = (n - 1 - R).clamp(min=0) // ALIGN * ALIGN
    pages = (q_old + bs - 1) // bs
    dropped = ((pages - pages.clamp(max=KP)) * bs)[:, None]  # [B, 1]
    unused = torch.iinfo(torch.int32).max
    order = torch.sort(torch.where(selected < 0, unused, selected), dim=-1).values
    used = order != unused
    page = torch.where(used, order, 0).clamp(0, block_table.shape[1] - 1).to(torch.int64)
    heads_ix = torch.arange(H, device=dev)[None, :, None]
    blk = block_table.to(torch.int64).gather(1, page.view(B, H * KP)).view(B, H, KP)
    table = torch.where(used, blk * heads[0] + heads_ix * heads[1], 0).to(torch.int32)
    lens = (n[:, None] - dropped).expand(B, H).reshape(B * H).to(torch.int32)
    res_table = None
    if residual_block_table is not None:
        cols = residual_block_table.shape[1]
        shift = torch.arange(width, device=dev)[None, :] + dropped // residual_block_size
        rb = residual_block_table.to(torch.int64).gather(1, shift.clamp(max=cols - 1))
        res_table = (rb[:, None, :] * res_heads[0] + heads_ix * res_heads[1]).to(
            torch.int32).view(B * H, width)
    return table.view(B * H, KP), lens, res_table


def quest_decode_reference(query, key_new, value_new, packed_cache, residual_cache,
                           block_table, residual_block_table, seq_lens, layout, cfg, scale,
                           residual_block_size, quest, out=None) -> torch.Tensor:
    """The decode step of ``attention_ref.request_attention`` with ``quest``,
    per request (zeros for ``seq_lens[i] <= 0``): the dense reference
    (``triton_decode.decode_attention_reference``) over the selected pages."""
    from vllm_kvcomp.kernels.triton_decode import decode_attention_reference

    return decode_attention_reference(
        query, key_new, value_new, packed_cache, residual_cache, block_table,
        residual_block_table, seq_lens, layout, cfg, scale, residual_block_size, out=out,
        quest=quest)


__all__ = [
    "quest_decode_attention",
    "quest_decode_reference",
    "quest_num_splits",
    "quest_page_scores",
    "quest_top_pages",
    "quest_rewrite",
    "quest_rewrite_reference",
    "quest_select",
    "quest_select_reference",
    "quest_span",
]
