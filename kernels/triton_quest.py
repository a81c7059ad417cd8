"""Quest on the packed pages: page scoring, top-k selection and the decode
attention over the selected pages (``vllm_kvcomp/policies/quest.py`` is the
rule), each beside its PyTorch reference.

Three launches per decode batch, all of fixed shape (CUDA-graph safe: every
range comes from ``seq_lens`` on the device, none from the host):

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
* ``_quest_decode_kernel``, grid ``(B, H)``: attention of the KV head's query
  heads over its selected pages only (read through the block table, codes
  unpacked and dequantized in registers), then the full-precision window and
  the fresh token, as ``triton_decode`` does for all pages.

The decode kernel is the plain form (one program walks a head's selected pages,
fp32 dequantization, no split-K, no packed-code tricks): at a 2048-token
budget a head reads at most 16 pages of 128 tokens, whatever the context.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import attention_ref
from vllm_kvcomp.kernels.triton_common import (
    check_alignment,
    check_decode_inputs,
    interpreted,
    layout_constexprs,
    load_params,
    load_raw_rows,
    matmul,
    residual_window_args,
    softmax_step,
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
    MAX_PAGES: tl.constexpr,
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
    q = tl.load(q_ptr + i64 * stride_qb + (h * REP + r)[:, None] * stride_qh + d[None, :],
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
def _unpack_rows(cache_ptr, row0, slot, valid, d, dm, ROW: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [BLOCK_N, BLOCK_D] of rows ``slot`` in channel order."""
    byte = tl.load(cache_ptr + row0 + slot[:, None] * ROW + (d * BITS // 8)[None, :],
                   mask=valid[:, None] & dm[None, :], other=0).to(tl.int32)
    return (byte >> ((d * BITS) % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _quest_decode_kernel(
    q_ptr, stride_qb, stride_qh, kn_ptr, stride_knb, stride_knh, vn_ptr, stride_vnb,
    stride_vnh, o_ptr, stride_ob, stride_oh, cache_ptr, stride_cb, stride_ch,
    res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt, bt_ptr, stride_bt, rbt_ptr,
    stride_rbt, sel_ptr, stride_selb, stride_selh, seq_lens_ptr, qk_scale,
    D: tl.constexpr, BS: tl.constexpr, BS_R: tl.constexpr, R: tl.constexpr,
    ALIGN: tl.constexpr, G: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    V_GC: tl.constexpr, V_NG: tl.constexpr,
    K_CODES_OFF: tl.constexpr, K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr,
    V_CODES_OFF: tl.constexpr, V_PARAMS_OFF: tl.constexpr, V_ROW: tl.constexpr,
    KP: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    i64 = i.to(tl.int64)
    n = tl.load(seq_lens_ptr + i)
    start = n - 1
    q_old, npages = _packed_pages(n, R, ALIGN, BS)
    MODEL_DTYPE: tl.constexpr = kn_ptr.dtype.element_ty
    r = tl.arange(0, REP_P)
    row_ok = r < REP
    hq = h * REP + r
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + i64 * stride_qb + hq[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([REP_P], -1.0e30, tl.float32)
    l_i = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, BLOCK_D], tl.float32)
    wp = cache_ptr.to(tl.pointer_type(tl.int32))
    nn = tl.arange(0, BLOCK_N)
    zero_row = tl.zeros([REP_P], tl.float32)

    # 1. the selected packed pages (n <= 0, graph padding: none)
    nsel = tl.where(n > 0, tl.minimum(npages, KP), 0)
    sel_row = sel_ptr + i64 * stride_selb + h * stride_selh
    for j in range(0, nsel):
        pg = tl.load(sel_row + j)
        blk = tl.load(bt_ptr + i64 * stride_bt + pg).to(tl.int64)
        page_off = blk * stride_cb + h * stride_ch
        for t0 in range(0, BS, BLOCK_N):
            slot = t0 + nn
            valid = pg * BS + slot < q_old
            kc = _unpack_rows(cache_ptr, page_off + K_CODES_OFF, slot, valid, d, dm, K_ROW,
                              K_BITS)
            sc, mn = load_params(wp, (page_off + K_PARAMS_OFF) // 4 + (slot // G)[:, None] * D
                                 + d[None, :], valid[:, None] & dm[None, :])
            k = kc.to(tl.float32) * sc + mn
            s = matmul(q, tl.trans(k), IEEE, MODEL_DTYPE) * qk_scale
            p, alpha, m_i, l_i = softmax_step(s, zero_row, valid[None, :], m_i, l_i)
            if V_BITS == 16:
                v = load_raw_rows(cache_ptr, page_off + V_CODES_OFF, slot, valid, d, V_ROW, D,
                                  MODEL_DTYPE).to(tl.float32)
            else:
                vc = _unpack_rows(cache_ptr, page_off + V_CODES_OFF, slot, valid, d, dm, V_ROW,
                                  V_BITS)
                sc, mn = load_params(wp, (page_off + V_PARAMS_OFF) // 4 + slot[:, None] * V_NG
                                     + (d // V_GC)[None, :], valid[:, None] & dm[None, :])
                v = vc.to(tl.float32) * sc + mn
            acc = acc * alpha[:, None] + matmul(p, v, IEEE, MODEL_DTYPE)

    # 2. the full-precision window [Q(start), start) and the fresh token
    kn = tl.load(kn_ptr + i64 * stride_knb + h * stride_knh + d, mask=dm, other=0.0)
    vn = tl.load(vn_ptr + i64 * stride_vnb + h * stride_vnh + d, mask=dm, other=0.0)
    rr = tl.arange(0, BLOCK_R)
    for n0 in range(q_old, start + 1, BLOCK_R):
        pos = n0 + rr
        is_new = (pos == start)[:, None]
        if HAS_RESIDUAL:
            in_res = pos < start
            rb = tl.load(rbt_ptr + i64 * stride_rbt + pos // BS_R, mask=in_res,
                         other=0).to(tl.int64)
            off = rb * stride_rb + h * stride_rh + (pos % BS_R) * stride_rt
            mk = in_res[:, None] & dm[None, :]
            k = tl.load(res_ptr + off[:, None] + d[None, :], mask=mk, other=0.0)
            v = tl.load(res_ptr + stride_rkv + off[:, None] + d[None, :], mask=mk, other=0.0)
            k = tl.where(is_new, kn[None, :].to(k.dtype), k)
            v = tl.where(is_new, vn[None, :].to(v.dtype), v)
        else:
            zero = tl.zeros([BLOCK_R, BLOCK_D], MODEL_DTYPE)
            k = tl.where(is_new, kn[None, :], zero)
            v = tl.where(is_new, vn[None, :], zero)
        s = matmul(q, tl.trans(k.to(tl.float32)), IEEE, MODEL_DTYPE) * qk_scale
        p, alpha, m_i, l_i = softmax_step(s, zero_row, (pos <= start)[None, :], m_i, l_i)
        acc = acc * alpha[:, None] + matmul(p, v.to(tl.float32), IEEE, MODEL_DTYPE)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + i64 * stride_ob + hq[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])


# --------------------------------------------------------------------------
# host wrappers
# --------------------------------------------------------------------------


def _check_quest(layout: PageLayout, cfg: KvcompConfig, quest) -> None:
    assert layout.config == cfg and quest.block_size == layout.block_size
    assert cfg.k_bits < 16 and cfg.key_axis == "channel", "Quest bounds per-channel keys"


def quest_select(query: torch.Tensor, packed_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, layout: PageLayout, cfg: KvcompConfig,
                 quest) -> torch.Tensor:
    """Pages each (request, KV head) of a decode batch attends:
    ``[B, H, quest.budget_pages]`` int32 page indices (positions in the
    request's block-table row), -1 where unused; any order. query [B, Hq, D],
    packed_cache uint8 [nb, H, head_page_bytes], block_table int32 [B, maxb]."""
    _check_quest(layout, cfg, quest)
    B, Hq, D = query.shape
    H = packed_cache.shape[1]
    assert query.stride(-1) == 1 and packed_cache.stride(-1) == 1
    check_alignment(layout, layout.model_dtype_bytes, packed_cache)
    kp = quest.budget_pages
    max_pages = triton.next_power_of_2(max(block_table.shape[1], kp, 2))
    scores = torch.empty(B, H, max_pages, dtype=torch.float32, device=query.device)
    sel = torch.empty(B, H, kp, dtype=torch.int32, device=query.device)
    if B == 0:
        return sel
    common = dict(BS=layout.block_size, R=cfg.residual_tokens, ALIGN=cfg.key_token_align)
    # pages a program scores: [pages, query heads, channels] stays ~4K elements
    block_p = min(16, max_pages, max(2, 4096 // (triton.next_power_of_2(Hq // H) *
                                                triton.next_power_of_2(D))))
    _quest_score_kernel[(B, H, max_pages // block_p)](
        query, query.stride(0), query.stride(1), packed_cache, packed_cache.stride(0),
        packed_cache.stride(1), block_table, block_table.stride(0), seq_lens,
        scores, scores.stride(0), scores.stride(1),
        D=D, G=cfg.group_size, K_BITS=cfg.k_bits, K_PARAMS_OFF=layout.k_params_offset,
        REP=Hq // H, REP_P=triton.next_power_of_2(Hq // H), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_P=block_p, MAX_PAGES=max_pages, **common)
    _quest_select_kernel[(B, H)](
        scores, scores.stride(0), scores.stride(1), seq_lens, sel, sel.stride(0),
        sel.stride(1), MAX_PAGES=max_pages, KP=kp, KP_P=triton.next_power_of_2(max(kp, 2)),
        **common)
    return sel


def quest_decode_attention(
    query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor,
    packed_cache: torch.Tensor, residual_cache: torch.Tensor | None, block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None, seq_lens: torch.Tensor,
    selected: torch.Tensor, layout: PageLayout, cfg: KvcompConfig, scale: float,
    residual_block_size: int, quest, out: torch.Tensor | None = None,
    block_n: int = 32, block_r: int = 32, num_warps: int = 4,
) -> torch.Tensor:
    """Decode attention over each (request, KV head)'s ``selected`` pages
    (``quest_select``), the full-precision window and the fresh token; the
    arguments are ``triton_decode.kvcomp_decode_attention``'s. -> out [B, Hq, D]."""
    _check_quest(layout, cfg, quest)
    B, Hq, H, D = check_decode_inputs(query, key_new, value_new, packed_cache, layout)
    assert selected.shape == (B, H, quest.budget_pages) and selected.dtype == torch.int32
    if out is None:
        out = torch.empty_like(query)
    if B == 0:
        return out
    res, rs, rbt, bs_r = residual_window_args(cfg, residual_cache, residual_block_table,
                                              residual_block_size, block_table, key_new)
    consts = layout_constexprs(layout)
    # Quest bounds per-channel keys only: no per-token key groups
    for name in ("KEY_CHANNEL", "K_GC", "K_NG"):
        del consts[name]
    bn = min(block_n, layout.block_size, cfg.group_size)
    rep = Hq // H
    _quest_decode_kernel[(B, H)](
        query, query.stride(0), query.stride(1), key_new, key_new.stride(0), key_new.stride(1),
        value_new, value_new.stride(0), value_new.stride(1), out, out.stride(0), out.stride(1),
        packed_cache, packed_cache.stride(0), packed_cache.stride(1), res, *rs,
        block_table, block_table.stride(0), rbt, rbt.stride(0),
        selected, selected.stride(0), selected.stride(1), seq_lens,
        float(scale) * math.log2(math.e),
        BS_R=bs_r, R=cfg.residual_tokens, ALIGN=cfg.key_token_align, G=cfg.group_size,
        KP=quest.budget_pages, REP=rep, REP_P=triton.next_power_of_2(rep), BLOCK_N=bn,
        BLOCK_R=max(16, triton.next_power_of_2(block_r)),
        HAS_RESIDUAL=residual_cache is not None,
        IEEE=query.dtype == torch.float32 or interpreted(), num_warps=num_warps, **consts,
    )
    return out


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


def quest_decode_reference(query, key_new, value_new, packed_cache, residual_cache,
                           block_table, residual_block_table, seq_lens, layout, cfg, scale,
                           residual_block_size, quest, out=None) -> torch.Tensor:
    """The decode step of ``attention_ref.request_attention`` with ``quest``,
    per request (zeros for ``seq_lens[i] <= 0``)."""
    if out is None:
        out = torch.empty_like(query)
    for i, n in enumerate(int(x) for x in seq_lens):
        if n <= 0:
            out[i] = 0
            continue
        res_row = None if residual_block_table is None else residual_block_table[i]
        o = attention_ref.request_attention(
            query[i: i + 1], key_new[i: i + 1], value_new[i: i + 1], packed_cache,
            residual_cache, layout, cfg, block_table[i], res_row, residual_block_size,
            n - 1, scale, key_new.dtype, as_stored=True, quest=quest)
        out[i] = o[0].to(out.dtype)
    return out


__all__ = [
    "quest_decode_attention",
    "quest_decode_reference",
    "quest_select",
    "quest_select_reference",
]
