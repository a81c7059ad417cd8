"""Triton decode attention that reads the packed pages directly.

One query token per request (``n = seq_lens[i]`` tokens after the step, the
query at position ``start = n - 1``, ``Q = cfg.quantized_prefix_len``) attends,
with GQA (query head ``hq`` reads KV head ``hq // (Hq / H)``), over

* packed ``[0, Q(start))``: codes and fp16 (scale, min) read from the pages
  through ``block_table`` and dequantized in registers; no model-dtype copy of
  the cache is ever written,
* residual ``[Q(start), start)``: the full-precision residual pages
  ``[nb_r, 2, H, bs_r, D]`` through ``residual_block_table``,
* the fresh token itself: ``key_new[i]`` / ``value_new[i]``,

exactly as ``attention_ref.kvcomp_step_reference`` does for a decode step (it
writes no cache: ``triton_store.kvcomp_store`` does the hand-over and the
residual write). ``decode_attention_reference`` below is the same thing in
plain PyTorch.

API::

    kvcomp_decode_attention(query [B, Hq, D], key_new [B, H, D], value_new [B, H, D],
                            packed_cache uint8 [nb, H, head_page_bytes],
                            residual_cache [nb_r, 2, H, bs_r, D] | None,
                            block_table int32 [B, maxb],
                            residual_block_table int32 [B, maxb_r] | None,
                            seq_lens int32 [B], layout, cfg, scale,
                            residual_block_size, max_seq_len,
                            num_splits=None, out=None, **tuning) -> out [B, Hq, D]

``max_seq_len`` (a Python int bounding ``seq_lens``) only sizes the split
count; every range is computed on the device from ``seq_lens``, so a wrong
bound costs speed, never correctness, and the launch has no host sync
(CUDA-graph friendly). Requests with ``seq_lens[i] <= 0`` (graph padding)
get a zero output. ``decode_attention_reference`` takes the same arguments.

The kernel's design, and what it was measured at, is in
``_kvcomp_decode_kernel``'s docstring; its launch (tile, warp tiles, warps,
stages, splits, code conversion) is chosen in ``decode_launch``; the device
helpers it is built from are in ``triton_common``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import attention_ref
from vllm_kvcomp.kernels.decode_launch import (
    DEFAULT_LAUNCH,
    KEY_FOLD_DEFAULT,
    code_conversion,
    code_offset,
    decode_num_splits,
    decode_tiles,
    decode_tiles_and_slices,
    decode_warps_stages,
    device_sm_count,
)
from vllm_kvcomp.kernels.triton_common import (
    accumulate_phase,
    check_decode_inputs,
    codes_operand,
    dequant,
    dot_operand,
    evicted_walk,
    interpreted,
    layout_constexprs,
    load_code_elems,
    load_code_slices,
    load_params,
    load_raw_rows,
    matmul,
    page_args,
    phase_codes,
    pick,
    softmax_step,
    split_phases,
    unpack_asm,
)
from vllm_kvcomp.layout import PageLayout

# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------


@triton.jit
def _kvcomp_decode_kernel(
    q_ptr, stride_qb, stride_qh,
    kn_ptr, stride_knb, stride_knh,
    vn_ptr, stride_vnb, stride_vnh,
    o_ptr, stride_ob, stride_oh,
    part_o_ptr, part_lse_ptr,
    cache_ptr, stride_cb, stride_ch,
    res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt,
    bt_ptr, stride_bt, rbt_ptr, stride_rbt,
    seq_lens_ptr, qk_scale, hole_ptr, logit_ptr, stride_lh,
    D: tl.constexpr, BS: tl.constexpr, BS_R: tl.constexpr,
    R: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    K_GC: tl.constexpr, K_NG: tl.constexpr, V_GC: tl.constexpr, V_NG: tl.constexpr,
    K_CODES_OFF: tl.constexpr, K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr,
    V_CODES_OFF: tl.constexpr, V_PARAMS_OFF: tl.constexpr, V_ROW: tl.constexpr,
    K_EW: tl.constexpr, V_EW: tl.constexpr, K_PH: tl.constexpr, V_PH: tl.constexpr,
    CVT_K: tl.constexpr, CVT_V: tl.constexpr, K_MAGIC: tl.constexpr, V_MAGIC: tl.constexpr,
    K_SPLIT_FOLD: tl.constexpr, K_FP16_FOLD: tl.constexpr,
    REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr, WT: tl.constexpr,
    HOLE: tl.constexpr = False, LOGITS: tl.constexpr = False,
):
    """Decode attention of one (request, KV head, split).

    Design (flash-decoding):

    * Grid ``(B, H, num_splits)``. A program owns one KV head of one request and
      a contiguous share of its packed tiles (``BLOCK_N`` = 128 tokens of one
      page by default; tiles, not pages, are split, so short contexts spread
      too), and handles the ``rep = Hq / H`` query heads of that KV head at once
      as the M dimension of ``tl.dot`` (M = next power of two of rep; Triton pads
      it to the tensor-core tile), so each page byte is read once per step.
      Codes and (scale, min) words are loaded with asynchronous copies that
      Triton pipelines ``num_stages`` deep.
    * Warp tiles (the default where ``decode_warp_tiles`` allows them): instead
      of all warps sharing each tile (cross-warp max / sum and a shared-memory
      trip for P on every tile: 21 barriers a tile at k4v4 on sm_90), each warp
      takes its own slice of it as the leading dimension of batched dots, with
      its own online-softmax state, merged once after the loop. Its dots run
      transposed (tokens / value channels as M, the query heads as N, padded to
      8 rather than 16), which halves the MMAs. Default launch (``decode_launch.DEFAULT_LAUNCH``):
      2 warps, one 64-token slice each, 2 stages. Measured on an H200
      (2026-11-30, benchmarks/results/2026-11-30-h200x2-all-formats): k4v4 at
      32 x 32K 372 us (73 % of copy bandwidth) against 461 us for the former default
      (shared tile, 4 warps, 3 stages) and 434 us for the best shared-tile
      launch; at 384 x 2K 353 against 412 us; k2v2 likewise (369 / 339 us).
      With 4 warps the slices are 32 tokens and the gain is gone. Key groups
      shorter than the tile (KIVI-2's 32 tokens) no longer shrink the tile:
      each slice lies in one group and folds that group's scales
      (``decode_tiles_and_slices``; where values fold too, i.e.
      ``value_group_size`` >= head size). On an H200 (2026-11-30, results folder
      2026-11-30-h200-w2-profile) that layout runs 14-19 % slower than 128-token
      key groups (430 vs 372 us at 32 x 32K), KIVI-2's own (32-token tiles) 4.4x slower.
    * The residual window and the fresh token (at most ``R + G`` tokens, in
      tiles of ``BLOCK_R``) are dealt round-robin to the same splits.
    * With more than one split, each program writes its normalised partial output
      and log-sum-exp (base 2) to fp32 scratch and a second small kernel
      (grid ``(B, Hq)``) merges them; with one split the first kernel writes the
      output and the second is not launched. ``decode_num_splits`` picks the
      split count from B * H, the SM count and ``max_seq_len``.
    * Dequantization is folded into the dots wherever the parameters are
      constant along the contracted dimension, so codes go into ``tl.dot`` as
      small integers and no ``code * scale + min`` tile is ever formed:
        - per-channel keys (KIVI; one (s, m) per channel per token group, tiles
          never straddle a group): ``q.k_t = sum_c (q_c s_c) code_tc + sum_c q_c m_c``,
          i.e. scale the query once per tile and add one bias per query head;
        - per-token keys with one channel group: ``q.k_t = s_t (q.code_t) + m_t sum(q)``;
        - values (per token, one channel group): ``p.V = (p * s) @ codes + (p.m)``.
      Channel groups smaller than the head (``group_size < head_size``) fall back
      to dequantizing the tile in registers (fp32), then the dot.
    * Per-row constants stay out of the score and output tiles: the softmax
      scale rides on the key scales (a few numbers a tile), the key bias of the
      fold joins the running max and the exponent's offset, and the value bias
      (``p.m - MAGIC * sum(p * s)``) is a running per-row sum added to the
      output at the end.
    * Codes are never shuffled back into channel order: a packed row is read as
      8- or 16-bit elements holding ``PH`` codes each, and the kernel works on
      each *phase* j (channels ``PH*w + j``) as a tensor of its own. Keys meet a
      query loaded in the same phase order (the score is a sum of PH dots);
      values feed PH output accumulators, stored back strided.
    * On the GPU a code becomes a bf16 / fp16 dot operand by OR-ing it into the
      mantissa of 128.0 / 1024.0 (``triton_common.unpack_asm``: one LOP3, plus one shift per
      phase, per pair of codes, in inline PTX); the constant offset is removed
      through the per-row bias (``MAGIC * sum(other operand)``). 8-bit codes in
      bf16 models (above 127) use a plain conversion. (Subtracting the offset in
      registers instead was tried on the H100, 2026-11-23: no bf16 output changed.)
    * Per-channel key scales are folded into the query (``q_c * s_c``). In bf16
      models that product and the key codes enter the key dots as fp16
      (``key_fold="fp16"``, the default): one bf16 operand put 2-bit outputs
      0.03 off on keys with large-scale channels (H100 test_bf16, 2026-11-23),
      fp16's 3 more mantissa bits pass the test, and at the same cost as bf16
      (H200, 32 x 32K, k4v4: 461 us; bf16 461.5 us). ``"split"`` (hi + lo bf16
      operands, one more MMA per phase) is as accurate but 18 % slower there
      (546 us). fp16 caps ``|q_c * s_c|`` at 65504, far above what LLM keys and
      queries reach (a 4-bit scale is a 15th of a channel's range in a group).

    Measured on one H100 (``benchmarks/bench_decode_kernel.py``, Llama-3.1-8B
    attention shape, CUDA-graph replays): k4v4 at batch 32 x 32K context reads
    its 1.17 GB in 476 us, 2.45 TB/s (81 % of the device's 3.02 TB/s copy
    bandwidth; 2.9x bf16 SDPA over a bf16 cache). k2v2 is bound by the unpacking
    work, not memory (~45 %, about the same time as k4v4).

    Matmul precision: fp32 models (and everything under ``TRITON_INTERPRET=1``,
    whose bf16 ``tl.dot`` is broken) use IEEE fp32 dots. fp16/bf16 models feed
    the dots in the model dtype (codes are exact there; the query times the key
    scale and the probabilities times the value scale are rounded once, like the
    bf16 P of flash attention), accumulating in fp32.
    """
    i = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    H = tl.num_programs(1)
    # a runtime value, so each split count does not compile a new kernel
    NUM_SPLITS = tl.num_programs(2)
    n = tl.load(seq_lens_ptr + i)
    start = n - 1
    q_old = tl.maximum(start - R, 0) // ALIGN * ALIGN
    MODEL_DTYPE: tl.constexpr = kn_ptr.dtype.element_ty
    # dot operand dtype (the interpreter also mis-converts ints to bf16)
    OP_DT: tl.constexpr = tl.float32 if IEEE else MODEL_DTYPE
    TS: tl.constexpr = BLOCK_N // WT
    # per-channel key scales fold into the query over one key group: the
    # shared tile lies in one group; warp tiles need only each slice to, and
    # with slices of different groups (K_SLICE_G) each slice scales its own
    K_FOLD_CH: tl.constexpr = KEY_CHANNEL and TS <= G
    K_SLICE_G: tl.constexpr = K_FOLD_CH and BLOCK_N > G
    K_FOLD_TOK: tl.constexpr = (not KEY_CHANNEL) and K_NG == 1
    K_ASM: tl.constexpr = CVT_K == 3 and (K_FOLD_CH or K_FOLD_TOK)
    V_ASM: tl.constexpr = CVT_V == 3 and V_NG == 1
    # per-channel key dots in fp16 (K_FP16_FOLD): q*key_scale keeps 3 more
    # mantissa bits than in bf16, the codes are exact either way
    K_DT: tl.constexpr = tl.float16 if (K_FP16_FOLD and K_FOLD_CH) else MODEL_DTYPE
    # phase widths: valid (K_W) and padded to a power of two (K_RP)
    K_RP: tl.constexpr = BLOCK_D // K_PH
    K_W: tl.constexpr = D // K_PH
    V_RP: tl.constexpr = BLOCK_D // V_PH
    V_W: tl.constexpr = D // V_PH

    r = tl.arange(0, REP_P)
    row_ok = r < REP
    hq = h * REP + r
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kb = tl.arange(0, K_RP)
    kbm = kb < K_W
    vb = tl.arange(0, V_RP)
    vbm = vb < V_W
    i64 = i.to(tl.int64)
    q_row = q_ptr + i64 * stride_qb + hq[:, None] * stride_qh
    qn = tl.load(q_row + d[None, :], mask=row_ok[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)
    qsum = tl.sum(qn, axis=1)
    # the query in the key codes' phase order (phase j: channels K_PH*w + j)
    qm = row_ok[:, None] & kbm[None, :]
    q0 = tl.load(q_row + (kb * K_PH)[None, :], mask=qm, other=0.0).to(tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    q4 = q0
    q5 = q0
    q6 = q0
    q7 = q0
    if K_PH > 1:
        q1 = tl.load(q_row + (kb * K_PH + 1)[None, :], mask=qm, other=0.0).to(tl.float32)
    if K_PH > 2:
        q2 = tl.load(q_row + (kb * K_PH + 2)[None, :], mask=qm, other=0.0).to(tl.float32)
        q3 = tl.load(q_row + (kb * K_PH + 3)[None, :], mask=qm, other=0.0).to(tl.float32)
    if K_PH > 4:
        q4 = tl.load(q_row + (kb * K_PH + 4)[None, :], mask=qm, other=0.0).to(tl.float32)
        q5 = tl.load(q_row + (kb * K_PH + 5)[None, :], mask=qm, other=0.0).to(tl.float32)
        q6 = tl.load(q_row + (kb * K_PH + 6)[None, :], mask=qm, other=0.0).to(tl.float32)
        q7 = tl.load(q_row + (kb * K_PH + 7)[None, :], mask=qm, other=0.0).to(tl.float32)

    # finite start: rows that see nothing (padding heads, empty splits) stay NaN-free
    m_i = tl.full([REP_P], -1.0e30, tl.float32)
    l_i = tl.zeros([REP_P], tl.float32)
    # the value dots' per-row bias (p.m - MAGIC * sum(p * s)), kept apart;
    # nonzero only where values are folded (quantized, one channel group)
    vba = tl.zeros([REP_P], tl.float32)
    # the output in the value codes' phase order (phase j: channels V_PH*w + j)
    acc0 = tl.zeros([REP_P, V_RP], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    # (scale, min) fp16 pairs as 32-bit words (regions are 4-byte aligned)
    wp = cache_ptr.to(tl.pointer_type(tl.int32))

    if LOGITS:
        # each read position's base-2 logit, for H2O / A2SF (``probs``)
        lg_row = logit_ptr + (i64 * (H * REP) + hq) * stride_lh

    # 1. this split's share of the packed tiles of [0, Q(start))
    q_end = q_old
    if HOLE:
        # [0, ev_lo) then [ev_hi, Q(start)): the splits share the stored tiles only
        ev_lo, ev_hi, lo_al, gap, q_end = evicted_walk(hole_ptr, i, q_old, BLOCK_N)
    n_tiles = tl.cdiv(q_end, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    lo = sp * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, q_end)
    nn = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + i64 * stride_bt
    # the tile's token offsets: [BLOCK_N], or [WT, TS] with warp tiles
    offs = nn
    if WT > 1:
        # Warp tiles: each of the WT warps owns its own TS-token slice of every
        # tile (the leading dimension of batched dots), with its own softmax
        # state. The scores of a slice never leave its warp, so the loop needs
        # no cross-warp max / sum; the WT states are merged once, after the
        # loop. The dots run transposed (tokens and value channels as M, the
        # REP query heads as N): MMA tiles are 16 x 8, so REP = 4 pads 8
        # columns instead of 16 rows, which halves the MMAs and accumulators.
        wi = tl.arange(0, WT)
        ti = tl.arange(0, TS)
        nn3 = wi[:, None] * TS + ti[None, :]
        m3 = tl.full([WT, REP_P], -1.0e30, tl.float32)
        l3 = tl.zeros([WT, REP_P], tl.float32)
        vb3 = tl.zeros([WT, REP_P], tl.float32)
        b0 = tl.zeros([WT, V_RP, REP_P], tl.float32)
        b1 = b0
        b2 = b0
        b3 = b0
        b4 = b0
        b5 = b0
        b6 = b0
        b7 = b0
        offs = nn3
    for m0 in range(lo, hi, BLOCK_N):
        n0 = m0
        if HOLE:
            n0 = tl.where(m0 >= lo_al, m0 + gap, m0)
        valid = n0 + offs < q_old
        if HOLE:
            valid = valid & ((n0 + offs < ev_lo) | (n0 + offs >= ev_hi))
        blk = tl.load(bt_row + n0 // BS).to(tl.int64)
        page_off = blk * stride_cb + h * stride_ch
        s0 = n0 % BS
        slot = s0 + offs
        if WT > 1:
            # keys as the A operand [WT, TS, K_RP]: s^T = codes @ (q * s)^T
            kraw = load_code_slices(cache_ptr, page_off + K_CODES_OFF, slot, valid, K_ROW, K_RP,
                                    K_EW, False)
            if K_ASM:
                k0, k1, k2, k3, k4, k5, k6, k7 = unpack_asm(kraw, K_BITS, K_EW, K_DT)
            else:
                kint = kraw.to(tl.int32)
            pbase = (page_off + K_PARAMS_OFF) // 4
            s = tl.zeros([WT, TS, REP_P], tl.float32)
            corr = tl.zeros([REP_P, K_RP], tl.float32)
            corr3 = tl.zeros([WT, REP_P, K_RP], tl.float32)
            if K_SLICE_G:
                # each slice's key group; slices past Q(start) read no params
                kgrp = (s0 + wi * TS) // G
                kgm = (n0 + wi * TS < q_old)[:, None] & kbm[None, :]
            for j in tl.static_range(K_PH):
                qj = pick(j, q0, q1, q2, q3, q4, q5, q6, q7)
                if K_ASM:
                    kop = pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
                else:
                    kop = codes_operand(phase_codes(kint, j, K_BITS, K_PH), CVT_K, OP_DT)
                if K_SLICE_G:
                    sc3, mn3 = load_params(wp, pbase + kgrp[:, None] * D + (kb * K_PH + j)[None, :],
                                           kgm)
                    a3 = dot_operand(qj[None, :, :] * sc3[:, None, :], IEEE, K_DT)
                    corr3 += qj[None, :, :] * mn3[:, None, :]
                    if K_MAGIC != 0.0:
                        corr3 -= K_MAGIC * a3.to(tl.float32)
                    s += matmul(kop, tl.permute(a3, (0, 2, 1)), IEEE, K_DT)
                else:
                    if K_FOLD_CH:
                        sc, mn = load_params(wp, pbase + (s0 // G) * D + kb * K_PH + j, kbm)
                        a = dot_operand(qj * sc[None, :], IEEE, K_DT)
                        corr += qj * mn[None, :]
                        s += matmul(kop, tl.broadcast_to(tl.trans(a)[None, :, :],
                                                         [WT, K_RP, REP_P]), IEEE, K_DT)
                    else:
                        a = dot_operand(qj, IEEE, MODEL_DTYPE)
                        s += matmul(kop, tl.broadcast_to(tl.trans(a)[None, :, :],
                                                         [WT, K_RP, REP_P]), IEEE, MODEL_DTYPE)
                    if K_MAGIC != 0.0:
                        corr -= K_MAGIC * a.to(tl.float32)
            if K_SLICE_G:
                s = s + tl.sum(corr3, axis=2)[:, None, :]
            else:
                s = s + tl.sum(corr, axis=1)[None, None, :]
            if not K_FOLD_CH:
                sc, mn = load_params(wp, pbase + slot, valid)
                s = s * sc[:, :, None] + qsum[None, None, :] * mn[:, :, None]
            s = tl.where(valid[:, :, None], s * qk_scale, float("-inf"))
            if LOGITS:
                ix3 = n0 + nn3
                if HOLE:
                    ix3 = tl.where(ix3 >= ev_hi, ix3 - (ev_hi - ev_lo), ix3)
                tl.store(lg_row[None, None, :] + ix3[:, :, None], s,
                         mask=valid[:, :, None] & row_ok[None, None, :])
            m_new = tl.maximum(m3, tl.max(s, axis=1))
            alpha = tl.exp2(m3 - m_new)
            p = tl.exp2(s - m_new[:, None, :])
            l3 = l3 * alpha + tl.sum(p, axis=1)
            m3 = m_new
            # values as the A operand [WT, V_RP, TS]: o^T = codes^T @ (p * s)^T
            vraw = load_code_slices(cache_ptr, page_off + V_CODES_OFF, slot, valid, V_ROW, V_RP,
                                    V_EW, True)
            if V_ASM:
                v0, v1, v2, v3, v4, v5, v6, v7 = unpack_asm(vraw, V_BITS, V_EW, MODEL_DTYPE)
            else:
                vint = vraw.to(tl.int32)
            sc, mn = load_params(wp, (page_off + V_PARAMS_OFF) // 4 + slot, valid)
            a = dot_operand(p * sc[:, :, None], IEEE, MODEL_DTYPE)
            # the bias is one number per head: kept apart and added at the end
            vb3 = vb3 * alpha + tl.sum(p * mn[:, :, None] - V_MAGIC * a.to(tl.float32), axis=1)
            for j in tl.static_range(V_PH):
                if V_ASM:
                    vop = pick(j, v0, v1, v2, v3, v4, v5, v6, v7)
                else:
                    vop = codes_operand(phase_codes(vint, j, V_BITS, V_PH), CVT_V, OP_DT)
                pv = matmul(vop, a, IEEE, MODEL_DTYPE)
                b0, b1, b2, b3, b4, b5, b6, b7 = accumulate_phase(
                    j, pv, alpha[:, None, :], b0, b1, b2, b3, b4, b5, b6, b7)
        else:
            # ---- scores q.k of the tile
            s_row = tl.zeros([REP_P], tl.float32)
            if K_BITS == 16:
                k = load_raw_rows(cache_ptr, page_off + K_CODES_OFF, slot, valid, d, K_ROW, D,
                                  MODEL_DTYPE)
                s = matmul(qn, tl.trans(k), IEEE, MODEL_DTYPE) * qk_scale
            else:
                kraw = load_code_elems(cache_ptr, page_off + K_CODES_OFF, slot, valid, K_ROW, K_RP,
                                       K_EW)
                if K_ASM:
                    k0, k1, k2, k3, k4, k5, k6, k7 = unpack_asm(kraw, K_BITS, K_EW, K_DT)
                else:
                    kint = kraw.to(tl.int32)
                pbase = (page_off + K_PARAMS_OFF) // 4
                s = tl.zeros([REP_P, BLOCK_N], tl.float32)
                # per-row constants, summed over channels once after the phases
                corr = tl.zeros([REP_P, K_RP], tl.float32)
                for j in tl.static_range(K_PH):
                    qj = pick(j, q0, q1, q2, q3, q4, q5, q6, q7)
                    ch = kb * K_PH + j
                    if K_ASM:
                        kop = pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
                    else:
                        code = phase_codes(kint, j, K_BITS, K_PH)
                        if K_FOLD_CH or K_FOLD_TOK:
                            kop = codes_operand(code, CVT_K, OP_DT)
                    if K_FOLD_CH:
                        # q.k = sum_c (q_c s_c) code_c + sum_c q_c m_c: the tile is
                        # inside one key group, so fold its scales into the query
                        sc, mn = load_params(wp, pbase + (s0 // G) * D + ch, kbm)
                        # the softmax scale rides on the key scales (a few
                        # numbers a tile), not on every score
                        qs = qj * (sc * qk_scale)[None, :]
                        a = dot_operand(qs, IEEE, K_DT)
                        s += matmul(a, tl.trans(kop), IEEE, K_DT)
                        if K_SPLIT_FOLD:
                            # the rounding error of q*s as a second operand: a bf16
                            # q*s is off by up to 2^-9 relative, and on a large-scale
                            # (outlier) key channel that moved 2-bit outputs 0.03
                            a_lo = dot_operand(qs - a.to(tl.float32), IEEE, MODEL_DTYPE)
                            s += matmul(a_lo, tl.trans(kop), IEEE, MODEL_DTYPE)
                            a = a.to(tl.float32) + a_lo.to(tl.float32)  # for the bias below
                        corr += qj * (mn * qk_scale)[None, :]
                        if K_MAGIC != 0.0:
                            corr -= K_MAGIC * a.to(tl.float32)
                    elif K_FOLD_TOK:
                        a = dot_operand(qj, IEEE, MODEL_DTYPE)
                        s += matmul(a, tl.trans(kop), IEEE, MODEL_DTYPE)
                        if K_MAGIC != 0.0:
                            corr -= K_MAGIC * a.to(tl.float32)
                    else:
                        x = dequant(code, wp, pbase, slot, valid, ch, kbm, KEY_CHANNEL, G, K_GC,
                                    K_NG, D)
                        s += matmul(qj, tl.trans(x), IEEE, MODEL_DTYPE)
                if K_FOLD_CH:
                    # the per-row constant joins the max and the exponent's
                    # offset instead of every score
                    s_row = tl.sum(corr, axis=1)
                elif K_FOLD_TOK:
                    # q.k_t = s_t (q.code_t) + m_t sum(q)
                    sc, mn = load_params(wp, pbase + slot, valid)
                    s = (s + tl.sum(corr, axis=1)[:, None]) * (sc * qk_scale)[None, :] + \
                        qsum[:, None] * (mn * qk_scale)[None, :]
                else:
                    s = s * qk_scale
            if LOGITS:
                ix = n0 + nn
                if HOLE:
                    ix = tl.where(ix >= ev_hi, ix - (ev_hi - ev_lo), ix)
                tl.store(lg_row[:, None] + ix[None, :], s + s_row[:, None],
                         mask=row_ok[:, None] & valid[None, :])
            p, alpha, m_i, l_i = softmax_step(s, s_row, valid[None, :], m_i, l_i)

            # ---- p @ V of the tile, per phase
            if V_BITS == 16:
                v = load_raw_rows(cache_ptr, page_off + V_CODES_OFF, slot, valid, d, V_ROW, D,
                                  MODEL_DTYPE)
                acc0 = acc0 * alpha[:, None] + matmul(p, v, IEEE, MODEL_DTYPE)
            else:
                vraw = load_code_elems(cache_ptr, page_off + V_CODES_OFF, slot, valid, V_ROW, V_RP,
                                       V_EW)
                if V_ASM:
                    v0, v1, v2, v3, v4, v5, v6, v7 = unpack_asm(vraw, V_BITS, V_EW, MODEL_DTYPE)
                else:
                    vint = vraw.to(tl.int32)
                pbase = (page_off + V_PARAMS_OFF) // 4
                if V_NG == 1:
                    # sum_t p_t (s_t code_t + m_t) = (p * s) @ code + p.m
                    sc, mn = load_params(wp, pbase + slot, valid)
                    a = dot_operand(p * sc[None, :], IEEE, MODEL_DTYPE)
                    # one number per row: kept apart and added at the end
                    if V_MAGIC != 0.0:
                        vbias = tl.sum(p * mn[None, :] - V_MAGIC * a.to(tl.float32), axis=1)
                    else:
                        vbias = tl.sum(p * mn[None, :], axis=1)
                    vba = vba * alpha + vbias
                for j in tl.static_range(V_PH):
                    if V_ASM:
                        pv = matmul(a, pick(j, v0, v1, v2, v3, v4, v5, v6, v7), IEEE,
                                    MODEL_DTYPE)
                    elif V_NG == 1:
                        code = phase_codes(vint, j, V_BITS, V_PH)
                        pv = matmul(a, codes_operand(code, CVT_V, OP_DT), IEEE,
                                    MODEL_DTYPE)
                    else:
                        code = phase_codes(vint, j, V_BITS, V_PH)
                        x = dequant(code, wp, pbase, slot, valid, vb * V_PH + j, vbm, False, 1,
                                    V_GC, V_NG, D)
                        pv = matmul(p, x, IEEE, MODEL_DTYPE)
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = accumulate_phase(
                        j, pv, alpha[:, None], acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
    if WT > 1:
        # merge the warps' states (a slice that saw nothing has l = 0, acc = 0)
        m_i = tl.max(m3, axis=0)
        w3 = tl.exp2(m3 - m_i[None, :])
        l_i = tl.sum(l3 * w3, axis=0)
        vba = tl.sum(vb3 * w3, axis=0)
        w3 = w3[:, None, :]
        acc0 = tl.trans(tl.sum(b0 * w3, axis=0))
        acc1 = tl.trans(tl.sum(b1 * w3, axis=0))
        acc2 = tl.trans(tl.sum(b2 * w3, axis=0))
        acc3 = tl.trans(tl.sum(b3 * w3, axis=0))
        acc4 = tl.trans(tl.sum(b4 * w3, axis=0))
        acc5 = tl.trans(tl.sum(b5 * w3, axis=0))
        acc6 = tl.trans(tl.sum(b6 * w3, axis=0))
        acc7 = tl.trans(tl.sum(b7 * w3, axis=0))

    # 2. residual [Q(start), start) + the fresh token at `start`, in tiles of
    # BLOCK_R dealt round-robin to the splits: the window is up to R + G
    # tokens whatever the context, and one program walking it alone would
    # add its latency to every step
    kn = tl.load(kn_ptr + i64 * stride_knb + h * stride_knh + d, mask=dm, other=0.0)
    vn = tl.load(vn_ptr + i64 * stride_vnb + h * stride_vnh + d, mask=dm, other=0.0)
    rr = tl.arange(0, BLOCK_R)
    rbt_row = rbt_ptr + i64 * stride_rbt
    for n0 in range(q_old + sp * BLOCK_R, start + 1, NUM_SPLITS * BLOCK_R):
        pos = n0 + rr
        is_new = (pos == start)[:, None]
        if HAS_RESIDUAL:
            in_res = pos < start
            rb = tl.load(rbt_row + pos // BS_R, mask=in_res, other=0).to(tl.int64)
            off = rb * stride_rb + h * stride_rh + (pos % BS_R) * stride_rt
            mk = in_res[:, None] & dm[None, :]
            # an fp8 window (residual_dtype) is read back in the model dtype
            k = tl.load(res_ptr + off[:, None] + d[None, :], mask=mk, other=0.0).to(MODEL_DTYPE)
            v = tl.load(res_ptr + stride_rkv + off[:, None] + d[None, :], mask=mk,
                        other=0.0).to(MODEL_DTYPE)
            k = tl.where(is_new, kn[None, :].to(k.dtype), k)
            v = tl.where(is_new, vn[None, :].to(v.dtype), v)
        else:
            zero = tl.zeros([BLOCK_R, BLOCK_D], MODEL_DTYPE)
            k = tl.where(is_new, kn[None, :], zero)
            v = tl.where(is_new, vn[None, :], zero)
        s = matmul(qn, tl.trans(k), IEEE, MODEL_DTYPE) * qk_scale
        if LOGITS:
            ix = pos
            if HOLE:
                ix = pos - (ev_hi - ev_lo)  # the window lies past the evicted range
            tl.store(lg_row[:, None] + ix[None, :], s,
                     mask=row_ok[:, None] & (pos <= start)[None, :])
        p, alpha, m_i, l_i = softmax_step(s, tl.zeros([REP_P], tl.float32),
                                          (pos <= start)[None, :], m_i, l_i)
        vba = vba * alpha
        # the rows are read in channel order (coalesced), then cut into the
        # value phases in registers
        v0, v1, v2, v3, v4, v5, v6, v7 = split_phases(v, V_PH)
        for j in tl.static_range(V_PH):
            pv = matmul(p, pick(j, v0, v1, v2, v3, v4, v5, v6, v7), IEEE, MODEL_DTYPE)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = accumulate_phase(
                j, pv, alpha[:, None], acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)

    # partials are normalised, so the merge needs no separate m and l
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    part = (i64 * (H * REP) + hq) * NUM_SPLITS + sp
    for j in tl.static_range(V_PH):
        out = (pick(j, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7) + vba[:, None]) / \
            l_safe[:, None]
        ch = vb * V_PH + j
        m = row_ok[:, None] & vbm[None, :]
        if SPLIT:
            tl.store(part_o_ptr + part[:, None] * BLOCK_D + ch[None, :], out, mask=m)
        else:
            tl.store(o_ptr + i64 * stride_ob + hq[:, None] * stride_oh + ch[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=m)
    if SPLIT or LOGITS:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), -1.0e30)
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _kvcomp_decode_merge_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh,
    NUM_SPLITS, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the splits' partials of one (request, query head), base-2 LSE."""
    i = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    Hq = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    sm = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    part = (i * Hq + hq) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=sm, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], mask=sm[:, None],
                other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + i * stride_ob + hq * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=d < D)


# --------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------


def kvcomp_decode_attention(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    cfg: KvcompConfig,
    scale: float,
    residual_block_size: int,
    max_seq_len: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 128,
    block_r: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
    code_cvt: int | None = None,
    key_fold: str | None = None,
    rep_m: int | None = None,
    elem_bits: int | None = None,
    warp_tiles: int | None = None,
    max_registers: int | None = None,
    evicted: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    programs_per_sm: int | None = None,
    probs_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per request; returns ``out``
    [B, Hq, D] in the query dtype (see the module docstring).

    query [B, Hq, D], key_new / value_new [B, H, D] (channel stride 1, any
    row/head strides), packed_cache uint8 [nb, H, head_page_bytes],
    residual_cache [nb_r, 2, H, bs_r, D] (strided view allowed) or None when
    the config keeps no residual window, int32 block tables and seq_lens on
    the device. ``num_splits`` overrides ``decode_num_splits``; the other
    keywords are tuning knobs (``code_cvt``: see ``code_conversion``;
    ``warp_tiles``: see ``decode_warp_tiles``; ``max_registers``: Triton's
    ``maxnreg``, a cap that trades spills for resident programs).
    ``evicted``: int32 ``[B, 2]`` packed positions ``[lo, hi)`` each request
    does not read (``eviction_gpu.evicted_ranges``; None: all are read).
    ``probs``: fp32 ``[B, Hq, W]`` (position stride 1) that receives each
    query's attention probabilities over the positions it reads, in
    position order: ``[0, lo)`` then ``[hi, seq_len)`` (``evicted``), 0
    past them; ``W`` at least each request's count of those (H2O / A2SF's
    scores, ``eviction_gpu.add_decode_scores``). ``probs_lse``: fp32
    ``[B, Hq]``; given, ``probs`` keeps the base-2 logits of the positions
    read (the rest left as they were) and ``probs_lse`` receives each row's
    base-2 log-sum-exp, for a consumer that normalises as it reads (the
    score kernel's ``lse``): two passes over ``probs`` fewer. ``programs_per_sm``:
    ``decode_num_splits``'s occupancy aim when it picks the splits.
    """
    assert layout.config == cfg
    B, Hq, H, D = check_decode_inputs(query, key_new, value_new, packed_cache, layout)
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(-1) == 1
    if B == 0:
        return out
    pages, bs_r = page_args(cfg, packed_cache, residual_cache, residual_block_table,
                            residual_block_size, block_table, key_new)

    rep = Hq // H
    # Triton pads small M to the tensor-core tile itself; padding here to 16
    # would make every softmax / scaling op on the score tile 16 / rep times
    # wider (and cost registers)
    rep_p = triton.next_power_of_2(rep) if rep_m is None else rep_m
    br = max(16, triton.next_power_of_2(block_r))
    # The interpreter's bf16 tl.dot is wrong (numpy has no bf16): fp32 dots
    # there, so CPU tests do not cover the bf16 tensor-core path.
    ieee = query.dtype == torch.float32 or interpreted()
    consts = layout_constexprs(layout)
    block_d = consts["BLOCK_D"]
    # bf16 per-channel keys: q*key_scale as one bf16 operand ("bf16"), as hi +
    # lo bf16 operands ("split", one more MMA per phase), or in fp16 with fp16
    # codes ("fp16"); fp16 models and fp32 dots need none of this
    if key_fold is None:
        key_fold = KEY_FOLD_DEFAULT
    if key_fold not in ("split", "fp16", "bf16"):
        raise ValueError(f"key_fold={key_fold!r}: choose 'split', 'fp16' or 'bf16'")
    fold = key_fold if (not ieee and query.dtype == torch.bfloat16) else "bf16"
    # the hi + lo key operands of key_fold="split" exist only in the shared tile
    if fold == "split":
        bn, wt = decode_tiles(layout, block_n), 1
    else:
        bn, wt = decode_tiles_and_slices(
            layout, consts, block_n,
            DEFAULT_LAUNCH["warp_tiles"] if warp_tiles is None else warp_tiles)
    if num_splits is None:
        sms = device_sm_count(query.device.index or 0) if query.is_cuda else 132
        aim = {} if programs_per_sm is None else {"programs_per_sm": programs_per_sm}
        num_splits = decode_num_splits(B, H, max_seq_len, cfg, bn, num_sms=sms, **aim)
    num_splits = max(1, int(num_splits))
    # the fold exists only where a slice lies in one key group (per-channel keys)
    fp16_keys = (fold == "fp16" and cfg.key_axis == "channel" and cfg.k_bits < 16
                 and bn // wt <= cfg.group_size)
    for which, bits in (("K", cfg.k_bits), ("V", cfg.v_bits)):
        cvt = code_conversion(bits, query.dtype, ieee) if code_cvt is None else code_cvt
        assert cvt == 0 or (cvt == 1 and (ieee or query.dtype == torch.float16)) or (
            cvt == 3 and not ieee and query.dtype == torch.bfloat16 and bits <= 4) or (
            cvt == 3 and not ieee and query.dtype == torch.float16), (cvt, bits, query.dtype)
        # codes read as 16-bit elements (4 / 2 phases) for 4- and 8-bit rows:
        # two codes per 32-bit op and ldmatrix-friendly; 2-bit rows stay
        # bytes (8 phases of 16-bit elements would make too many small dots)
        ew = 16 if 4 <= bits < 16 and D * bits >= 256 else 8
        if elem_bits is not None and bits < 16:
            ew = elem_bits
        consts[f"{which}_EW"] = ew
        consts[f"{which}_PH"] = ew // bits if bits < 16 else 1
        consts[f"CVT_{which}"] = cvt if bits < 16 else 0
        consts[f"{which}_MAGIC"] = code_offset(
            consts[f"CVT_{which}"], torch.float16 if which == "K" and fp16_keys else query.dtype)
    num_warps, num_stages = decode_warps_stages(cfg, num_warps, num_stages)
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, block_d, dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    if probs is not None:
        assert probs.shape[:2] == (B, Hq) and \
            probs.dtype == torch.float32 and probs.stride(2) == 1 and \
            probs.stride(0) == Hq * probs.stride(1)
        # the kernel writes the logits it reads; the rest stays at probability 0
        if probs_lse is None:
            probs.fill_(float("-inf"))
        else:
            assert probs_lse.shape == (B, Hq) and probs_lse.dtype == torch.float32
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=query.device)
    _kvcomp_decode_kernel[(B, H, num_splits)](
        query, query.stride(0), query.stride(1),
        key_new, key_new.stride(0), key_new.stride(1),
        value_new, value_new.stride(0), value_new.stride(1),
        out, out.stride(0), out.stride(1),
        part_o, part_lse,
        *pages,
        seq_lens, float(scale) * math.log2(math.e), evicted,
        probs, None if probs is None else probs.stride(1),
        BS_R=bs_r,
        R=cfg.residual_tokens, ALIGN=cfg.key_token_align, G=cfg.group_size,
        REP=rep, REP_P=rep_p, BLOCK_N=bn, BLOCK_R=br, SPLIT=num_splits > 1,
        HAS_RESIDUAL=residual_cache is not None, IEEE=ieee, WT=wt,
        K_SPLIT_FOLD=fold == "split", K_FP16_FOLD=fp16_keys,
        **({"HOLE": True} if evicted is not None else {}),
        **({"LOGITS": True} if probs is not None else {}),
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": max_registers} if max_registers else {}),
        **consts,
    )
    if num_splits > 1:
        _kvcomp_decode_merge_kernel[(B, Hq)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
            D=D, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    if probs is not None:
        # the splits' base-2 log-sum-exps merged: the softmax's normaliser
        lse = torch.logsumexp(part_lse * math.log(2.0), dim=-1) / math.log(2.0)
        if probs_lse is not None:
            probs_lse.copy_(lse)
        else:
            probs.sub_(lse[:, :, None]).exp2_()
    return out

# --------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------


def decode_attention_reference(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    seq_lens,
    layout: PageLayout,
    cfg: KvcompConfig,
    scale: float,
    residual_block_size: int,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    quest=None,
) -> torch.Tensor:
    """The attention half of ``attention_ref.kvcomp_step_reference`` for a
    decode batch (``attention_ref.request_attention`` of each request's one
    query, over the pages ``quest`` selects where given); ``max_seq_len`` /
    ``num_splits`` are ignored. A request with ``seq_lens[i] <= 0`` gets
    zeros."""
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



def decode_probs_reference(
    query, key_new, value_new, packed_cache, residual_cache, block_table,
    residual_block_table, seq_lens, layout: PageLayout, cfg: KvcompConfig, scale: float,
    residual_block_size: int, length: int,
) -> torch.Tensor:
    """``kvcomp_decode_attention``'s ``probs`` (fp64 ``[B, Hq, length]``):
    the probabilities ``attention_ref.request_attention`` gives each
    request's one query, by position."""
    from vllm_kvcomp.kernels.h2o_ref import dense_probs

    out = torch.zeros(query.shape[0], query.shape[1], length, dtype=torch.float64)
    for i, n in enumerate(int(x) for x in seq_lens):
        if n <= 0:
            continue
        res_row = None if residual_block_table is None else residual_block_table[i]
        probs = []
        attention_ref.request_attention(
            query[i: i + 1], key_new[i: i + 1], value_new[i: i + 1], packed_cache,
            residual_cache, layout, cfg, block_table[i], res_row, residual_block_size,
            n - 1, scale, key_new.dtype, as_stored=True, probs_out=probs)
        out[i] = dense_probs(*probs[0], length)[0]
    return out


__all__ = [
    "decode_attention_reference",
    "decode_probs_reference",
    "kvcomp_decode_attention",
]
