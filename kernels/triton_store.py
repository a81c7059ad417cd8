"""Triton store kernel: hand-over into packed pages + residual write, for a
whole batch (mixed prefill chunks and decodes) in one launch.

Per request ``i`` of the batch (``qs, qe = query_start_loc[i], [i + 1]``,
``n = seq_lens[i]``, ``start = n - (qe - qs)``, ``Q = cfg.quantized_prefix_len``):

* hand-over: positions ``[Q(start), Q(n))`` are quantized into the packed
  pages (``vllm_kvcomp.layout``), read from the residual pages where the
  position is ``< start``, else from the fresh ``key`` / ``value`` rows;
* residual write: the fresh tokens go unquantized to the residual cache
  ``[nb_r, 2, H, bs_r, D]`` at ``residual_slot_mapping[t]`` (negative: skip).

Grid ``(num_reqs, num_unit_programs, H)``. The hand-over of a request is cut
into *units* of ``UNIT`` consecutive positions (a whole key group of
``group_size`` tokens for per-channel keys, so min/max are over the group;
``TOKEN_UNIT`` tokens otherwise); program ``(i, j, h)`` does units ``j,
j + num_unit_programs, ...`` of request ``i`` for KV head ``h``, then (fused
mode) the fresh tokens of that request in chunks of ``sub_tokens``, chunks
``j, j + num_unit_programs, ...``. Inside a unit, per-channel key groups are
processed in channel slices and per-token rows in token slices, to bound
registers. Any ``num_unit_programs >= 1`` is correct; ``store_grid_bound``
gives the one that needs no loop over units (``ceil(max_query_len / UNIT)``:
1 for decode), so the launch depends only on Python ints and the wrapper never
syncs with the device (captured in a CUDA graph on an H100: replay writes the
same bytes as an eager launch).

Ordering: a residual write could clobber a slot that a hand-over of the same
step still reads only if a residual block holding positions ``>= Q(start)``
of some request were re-used for fresh tokens within the step. The reference
(``attention_ref.kvcomp_step_reference``) does all hand-overs, then all
residual writes; ``fuse_residual_write=False`` keeps that order with a second
launch of the same kernel. The fused launch (default) relies on
``spec.KvcompResidualManager`` freeing only blocks wholly below
``Q(num_computed_tokens) = Q(start)``, which no hand-over of the step reads
(true at the time of writing; re-check if the manager changes).

Codes match ``packing.quantize_lastdim`` bit for bit on the same inputs:
``scale = fp16((max - min) / qmax)``, ``min = fp16(min)``, codes
``round_half_even((x - min16) / scale16)`` with IEEE division (``div_rn``), so
the GPU's approximate ``/`` does not move ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import attention_ref, packing
from vllm_kvcomp.kernels.triton_common import (
    check_kv_inputs,
    layout_constexprs,
    page_args,
)
from vllm_kvcomp.launch_env import STORE_SPLIT_ENV, switch
from vllm_kvcomp.layout import PageLayout

TOKEN_UNIT = 16  # tokens per hand-over unit when no per-channel key groups
_SPLIT_DEFAULT = switch(STORE_SPLIT_ENV)


def handover_unit(cfg: KvcompConfig) -> int:
    """Positions handed over per unit (one grid program's share of a request)."""
    if cfg.k_bits < 16 and cfg.key_axis == "channel":
        return cfg.group_size
    return TOKEN_UNIT


def key_slices(layout: PageLayout, sub_elems: int = 4096) -> tuple[int, int]:
    """(code bytes of a per-channel key slice, slices): a key group of
    ``group_size`` tokens cut along channels into slices of at most
    ``sub_elems`` codes, as the kernel cuts one (``KCB``)."""
    cfg = layout.config
    kpb = 8 // cfg.k_bits
    knb = triton.next_power_of_2(layout.head_size) // kpb
    kcb = max(1, min(sub_elems // (cfg.group_size * kpb), knb))
    return kcb, knb // kcb


def handover_pieces(cfg: KvcompConfig, layout: PageLayout, sub_tokens: int = 32,
                    sub_elems: int = 4096) -> int:
    """Independent pieces of one unit's hand-over, as the kernel cuts it: key
    channel slices (per-channel keys) plus value token sub-tiles."""
    unit = handover_unit(cfg)
    key_channel = cfg.k_bits < 16 and cfg.key_axis == "channel"
    n_key = key_slices(layout, sub_elems)[1] if key_channel else 0
    return n_key + unit // min(sub_tokens, unit)


def store_grid_bound(cfg: KvcompConfig, max_query_len: int) -> int:
    """Unit programs per request that cover a step with at most
    ``max_query_len`` fresh tokens per request without looping: a step of q
    tokens hands over at most ``align * ceil(q / align)`` positions (whole
    groups when ``align = group_size``, at most q otherwise)."""
    return max(1, triton.cdiv(max(max_query_len, 1), handover_unit(cfg)))


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """torch.round (ties to even) for finite fp32 ``v`` in [-1, 2**bits]."""
    y = tl.floor(v + 0.5)
    tie = (y - v) == 0.5
    odd = (y - 2.0 * tl.floor(y * 0.5)) != 0.0
    return tl.where(tie & odd, y - 1.0, y)


@triton.jit
def _quant_params(lo, hi, QMAX: tl.constexpr):
    """fp16 (scale, min) and the fp32 divisor/offset codes are computed with.
    Empty (masked) rows arrive as lo=+inf, hi=-inf: made 0 so no inf - inf."""
    ok = lo <= hi
    lo = tl.where(ok, lo, 0.0)
    hi = tl.where(ok, hi, 0.0)
    scale16 = tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)).to(tl.float16)
    mn16 = lo.to(tl.float16)
    s = scale16.to(tl.float32)
    s = tl.where(s > 0.0, s, 1.0)
    return scale16, mn16, s, mn16.to(tl.float32)


@triton.jit
def _codes(x, s, m, QMAX: tl.constexpr):
    c = _round_half_even(tl.math.div_rn(x - m, s))
    c = tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0)
    return c


@triton.jit
def _load_src(
    key_ptr, stride_kt, stride_kh,
    res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt,
    rbt_row_ptr,
    pos, valid, start, qs, h, KV: tl.constexpr, dch, dmask,
    BS_R: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Tile [U, NB, PB] (model dtype) of K (KV=0) or V (KV=1) at positions
    ``pos`` [U]: residual pages where pos < start, else the fresh rows."""
    is_fresh = pos >= start
    t = (qs + (pos - start)).to(tl.int64)
    off_f = t * stride_kt + h * stride_kh
    m_f = (valid & is_fresh)[:, None, None] & dmask[None, :, :]
    x = tl.load(key_ptr + off_f[:, None, None] + dch[None, :, :], mask=m_f, other=0.0)
    if HAS_RESIDUAL:
        is_res = valid & (pos < start)
        rb = tl.load(rbt_row_ptr + pos // BS_R, mask=is_res, other=0).to(tl.int64)
        off_r = rb * stride_rb + KV * stride_rkv + h * stride_rh + (pos % BS_R) * stride_rt
        m_r = is_res[:, None, None] & dmask[None, :, :]
        xr = tl.load(res_ptr + off_r[:, None, None] + dch[None, :, :], mask=m_r, other=0.0)
        x = tl.where(m_r, xr.to(x.dtype), x)
    return x


@triton.jit
def _store_region(
    cache_ptr, page_off, slot, x, valid,
    j, c, dmask,
    BITS: tl.constexpr, CODES_OFF: tl.constexpr, PARAMS_OFF: tl.constexpr,
    ROW: tl.constexpr, PER_CHANNEL: tl.constexpr, GC: tl.constexpr, NG: tl.constexpr,
    D: tl.constexpr, PB: tl.constexpr, NB: tl.constexpr,
):
    """Quantize and write one region (keys or values) of tokens ``x``
    [U, NB, PB] at (page_off[u], slot[u]). Channel d = j * PB + c.
    PER_CHANNEL: the U tokens are one whole group (params row slot[0] // U)."""
    U: tl.constexpr = x.shape[0]
    m3 = valid[:, None, None] & dmask[None, :, :]
    if BITS == 16:
        ES: tl.constexpr = x.dtype.primitive_bitwidth // 8
        ep = cache_ptr.to(tl.pointer_type(x.dtype))
        e_off = (page_off + CODES_OFF + slot * ROW) // ES
        d = j[:, None] * PB + c[None, :]
        tl.store(ep + e_off[:, None, None] + d[None, :, :], x, mask=m3)
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        xf = x.to(tl.float32)
        fp = cache_ptr.to(tl.pointer_type(tl.float16))
        if PER_CHANNEL:
            lo = tl.min(tl.where(m3, xf, float("inf")), axis=0)  # [NB, PB]
            hi = tl.max(tl.where(m3, xf, float("-inf")), axis=0)
            scale16, mn16, s, m = _quant_params(lo, hi, QMAX)
            codes = _codes(xf, s[None, :, :], m[None, :, :], QMAX)
            # params [rows, D, 2] fp16; one program owns the whole group
            row = tl.max(slot, axis=0) // U
            p_off = (tl.max(page_off, axis=0) + PARAMS_OFF) // 2 + row * (D * 2)
            d = j[:, None] * PB + c[None, :]
            tl.store(fp + p_off + d * 2, scale16, mask=dmask)
            tl.store(fp + p_off + d * 2 + 1, mn16, mask=dmask)
        else:
            GB: tl.constexpr = GC // PB  # bytes per channel group
            p_off = (page_off + PARAMS_OFF) // 2 + slot * (NG * 2)  # [U]
            if NG > 1 and NB * PB == NG * GC:
                # power-of-two head: one reduction over [U, NG, GB, PB]
                gi = tl.arange(0, NG)
                lo = tl.min(tl.min(tl.reshape(tl.where(m3, xf, float("inf")), (U, NG, GB, PB)),
                                   axis=3), axis=2)  # [U, NG]
                hi = tl.max(tl.max(tl.reshape(tl.where(m3, xf, float("-inf")), (U, NG, GB, PB)),
                                   axis=3), axis=2)
                scale16, mn16, s, m = _quant_params(lo, hi, QMAX)
                pm = valid[:, None] & (gi < NG)[None, :]
                tl.store(fp + p_off[:, None] + gi[None, :] * 2, scale16, mask=pm)
                tl.store(fp + p_off[:, None] + gi[None, :] * 2 + 1, mn16, mask=pm)
                s_full = tl.reshape(tl.broadcast_to(s[:, :, None, None], (U, NG, GB, PB)),
                                    (U, NB, PB))
                m_full = tl.reshape(tl.broadcast_to(m[:, :, None, None], (U, NG, GB, PB)),
                                    (U, NB, PB))
            else:
                jg = j // GB  # [NB] group of each byte column
                s_full = tl.full(x.shape, 1.0, tl.float32)
                m_full = tl.zeros(x.shape, tl.float32)
                for g in tl.static_range(NG):
                    gm = m3 & (jg == g)[None, :, None]
                    lo = tl.min(tl.min(tl.where(gm, xf, float("inf")), axis=2), axis=1)  # [U]
                    hi = tl.max(tl.max(tl.where(gm, xf, float("-inf")), axis=2), axis=1)
                    scale16, mn16, s, m = _quant_params(lo, hi, QMAX)
                    tl.store(fp + p_off + g * 2, scale16, mask=valid)
                    tl.store(fp + p_off + g * 2 + 1, mn16, mask=valid)
                    sel = (jg == g)[None, :, None]
                    s_full = tl.where(sel, s[:, None, None], s_full)
                    m_full = tl.where(sel, m[:, None, None], m_full)
            codes = _codes(xf, s_full, m_full, QMAX)
        codes = tl.where(m3, codes, 0.0).to(tl.int32)
        shifts = c * BITS
        packed = tl.sum(codes << shifts[None, None, :], axis=2).to(tl.uint8)  # [U, NB]
        b_off = page_off + CODES_OFF + slot * ROW  # [U]
        m2 = valid[:, None] & (j < ROW)[None, :]
        tl.store(cache_ptr + b_off[:, None] + j[None, :], packed, mask=m2)


@triton.jit
def _kvcomp_store_kernel(
    key_ptr, value_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    cache_ptr, stride_cb, stride_ch,
    res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt,
    bt_ptr, stride_bt, rbt_ptr, stride_rbt,
    res_slot_ptr, qsl_ptr, seq_lens_ptr,
    D: tl.constexpr, BS: tl.constexpr, BS_R: tl.constexpr,
    R: tl.constexpr, ALIGN: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    K_GC: tl.constexpr, K_NG: tl.constexpr, V_GC: tl.constexpr, V_NG: tl.constexpr,
    K_CODES_OFF: tl.constexpr, K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr,
    V_CODES_OFF: tl.constexpr, V_PARAMS_OFF: tl.constexpr, V_ROW: tl.constexpr,
    UNIT: tl.constexpr, BLOCK_D: tl.constexpr, SUB_T: tl.constexpr, SUB_ELEMS: tl.constexpr,
    DO_HANDOVER: tl.constexpr, DO_RESIDUAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    i = tl.program_id(0)
    pid = tl.program_id(1)
    nprog = tl.num_programs(1)
    h = tl.program_id(2)
    qs = tl.load(qsl_ptr + i)
    qe = tl.load(qsl_ptr + i + 1)
    n = tl.load(seq_lens_ptr + i)
    start = n - (qe - qs)
    u_ar = tl.arange(0, UNIT)

    if DO_HANDOVER:
        q_old = tl.maximum(start - R, 0) // ALIGN * ALIGN
        q_new = tl.maximum(n - R, 0) // ALIGN * ALIGN
        n_units = tl.cdiv(q_new - q_old, UNIT)
        bt_row = bt_ptr + i.to(tl.int64) * stride_bt
        rbt_row = rbt_ptr + i.to(tl.int64) * stride_rbt
        # Tiles are [tokens, NB, PB] with channel d = j * PB + c. Sub-tiles
        # keep a program's registers bounded: per-channel key groups (UNIT
        # tokens) are cut along channels, per-token rows along tokens.
        KPB: tl.constexpr = 1 if K_BITS == 16 else 8 // K_BITS
        KNB: tl.constexpr = BLOCK_D // KPB
        kc = tl.arange(0, KPB)
        VPB: tl.constexpr = 1 if V_BITS == 16 else 8 // V_BITS
        VNB: tl.constexpr = BLOCK_D // VPB
        vj = tl.arange(0, VNB)
        vc = tl.arange(0, VPB)
        vd = vj[:, None] * VPB + vc[None, :]
        vdm = vd < D
        TS: tl.constexpr = SUB_T if SUB_T < UNIT else UNIT
        t_ar = tl.arange(0, TS)
        KCB: tl.constexpr = (SUB_ELEMS // (UNIT * KPB)) if (SUB_ELEMS // (UNIT * KPB)) < KNB else KNB
        # A unit's pieces are independent: key channel slices (min/max run over
        # tokens, per channel) and value token sub-tiles (per token). SPLIT
        # gives each piece a program of its own, so that a decode step's few
        # hand-overs (whole groups) are not one long serial chain each.
        N_KP: tl.constexpr = (KNB // KCB) if KEY_CHANNEL else 0
        N_VP: tl.constexpr = UNIT // TS
        PIECES: tl.constexpr = (N_KP + N_VP) if SPLIT else 1
        EVERY: tl.constexpr = not SPLIT
        for w in range(pid, n_units * PIECES, nprog):
            if SPLIT:
                u = w // PIECES
                piece = w % PIECES
            else:
                # a compile-time piece: every `if` below folds away and the
                # unsplit kernel is the one without pieces
                u = w
                piece: tl.constexpr = -1
            base = q_old + u * UNIT
            if KEY_CHANNEL:
                # one whole key group; min/max over its tokens per channel
                pos = base + u_ar
                valid = pos < q_new
                if SPLIT:
                    valid = valid & (piece < N_KP)
                blk = tl.load(bt_row + pos // BS, mask=valid, other=0).to(tl.int64)
                page_off = blk * stride_cb + h * stride_ch
                slot = pos % BS
                for cb in tl.static_range(N_KP):
                    if (piece == cb) | EVERY:
                        kj = cb * KCB + tl.arange(0, KCB)
                        kd = kj[:, None] * KPB + kc[None, :]
                        kdm = kd < D
                        xk = _load_src(key_ptr, stride_kt, stride_kh,
                                       res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt, rbt_row,
                                       pos, valid, start, qs, h, 0, kd, kdm, BS_R, HAS_RESIDUAL)
                        _store_region(cache_ptr, page_off, slot, xk, valid, kj, kc, kdm,
                                      K_BITS, K_CODES_OFF, K_PARAMS_OFF, K_ROW,
                                      True, K_GC, K_NG, D, KPB, KCB)
            for ts in tl.static_range(N_VP):
                if (piece == N_KP + ts) | EVERY:
                    # names of their own: under a runtime `if` (SPLIT) the key group's [UNIT]
                    # tiles may not take a [TS] shape
                    tpos = base + ts * TS + t_ar
                    tvalid = tpos < q_new
                    tblk = tl.load(bt_row + tpos // BS, mask=tvalid, other=0).to(tl.int64)
                    tpage_off = tblk * stride_cb + h * stride_ch
                    tslot = tpos % BS
                    if not KEY_CHANNEL:
                        kj = tl.arange(0, KNB)
                        kd = kj[:, None] * KPB + kc[None, :]
                        kdm = kd < D
                        xk = _load_src(key_ptr, stride_kt, stride_kh,
                                       res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt, rbt_row,
                                       tpos, tvalid, start, qs, h, 0, kd, kdm, BS_R, HAS_RESIDUAL)
                        _store_region(cache_ptr, tpage_off, tslot, xk, tvalid, kj, kc, kdm,
                                      K_BITS, K_CODES_OFF, K_PARAMS_OFF, K_ROW,
                                      False, K_GC, K_NG, D, KPB, KNB)
                    xv = _load_src(value_ptr, stride_vt, stride_vh,
                                   res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt, rbt_row,
                                   tpos, tvalid, start, qs, h, 1, vd, vdm, BS_R, HAS_RESIDUAL)
                    _store_region(cache_ptr, tpage_off, tslot, xv, tvalid, vj, vc, vdm,
                                  V_BITS, V_CODES_OFF, V_PARAMS_OFF, V_ROW,
                                  False, V_GC, V_NG, D, VPB, VNB)

    if DO_RESIDUAL:
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        RT: tl.constexpr = SUB_T
        r_ar = tl.arange(0, RT)
        n_chunks = tl.cdiv(qe - qs, RT)
        for u in range(pid, n_chunks, nprog):
            t = qs + u * RT + r_ar
            tv = t < qe
            slot = tl.load(res_slot_ptr + t, mask=tv, other=-1).to(tl.int64)
            ok = tv & (slot >= 0)
            rb = slot // BS_R
            ro = rb * stride_rb + h * stride_rh + (slot % BS_R) * stride_rt
            m = ok[:, None] & dm[None, :]
            t64 = t.to(tl.int64)
            xk = tl.load(key_ptr + (t64 * stride_kt + h * stride_kh)[:, None] + d[None, :],
                         mask=m, other=0.0)
            xv = tl.load(value_ptr + (t64 * stride_vt + h * stride_vh)[:, None] + d[None, :],
                         mask=m, other=0.0)
            dst = res_ptr + ro[:, None] + d[None, :]
            tl.store(dst, xk.to(res_ptr.dtype.element_ty), mask=m)
            tl.store(dst + stride_rkv, xv.to(res_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------


def kvcomp_store(
    key: torch.Tensor,
    value: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    residual_slot_mapping: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    cfg: KvcompConfig,
    residual_block_size: int,
    max_query_len: int,
    num_unit_programs: int | None = None,
    fuse_residual_write: bool = True,
    sub_tokens: int = 32,
    sub_elems: int = 4096,
    num_warps: int | None = None,
    split_handover: bool | None = None,
    handover: bool = True,
) -> None:
    """Hand-over (2) and residual write (3) of one layer's step.

    key/value [T, H, D] (any row/head strides, channel stride 1), packed_cache
    uint8 [nb, H, head_page_bytes], residual_cache [nb_r, 2, H, bs_r, D] (may
    be a strided view) or None, block tables int32 [num_reqs, *],
    query_start_loc int32 [num_reqs + 1], seq_lens int32 [num_reqs] (device
    tensors). ``max_query_len`` (Python int) only sizes the grid; any value
    >= 1 gives the same result (``num_unit_programs`` overrides it).
    ``sub_tokens`` (tokens per per-token sub-tile and residual-write chunk)
    and ``sub_elems`` (elements per per-channel key sub-tile) bound the
    registers a program holds; powers of two. ``split_handover`` gives each
    piece of a unit (``handover_pieces``) a program of its own instead of one
    program walking them all; ``None`` reads ``KVCOMP_STORE_SPLIT``.
    ``handover=False``: the residual write alone (a ring window's, after the
    step's attention has read the slots it overwrites).
    """
    assert layout.config == cfg
    num_reqs = seq_lens.shape[0]
    H = key.shape[1]
    check_kv_inputs(key, value, packed_cache, layout)
    if num_reqs == 0:
        return
    has_res = residual_cache is not None
    pages, bs_r = page_args(
        cfg, packed_cache, residual_cache,
        residual_block_table if residual_block_table is not None else block_table,
        residual_block_size, block_table, key)
    do_res = has_res and residual_slot_mapping is not None
    slots = residual_slot_mapping if do_res else seq_lens
    unit = handover_unit(cfg)
    if split_handover is None:
        split_handover = _SPLIT_DEFAULT
    pieces = handover_pieces(cfg, layout, sub_tokens, sub_elems) if split_handover else 1
    nprog = num_unit_programs or store_grid_bound(cfg, max_query_len) * pieces
    if num_warps is None:  # H100: 8 warps ~1.6x faster for key groups, 4 otherwise
        num_warps = 8 if unit > TOKEN_UNIT else 4
    common = dict(
        BS_R=bs_r,
        R=cfg.residual_tokens,
        ALIGN=cfg.key_token_align,
        UNIT=unit,
        SUB_T=sub_tokens,
        SUB_ELEMS=sub_elems,
        HAS_RESIDUAL=has_res,
        SPLIT=bool(split_handover),
        num_warps=num_warps,
        **layout_constexprs(layout),
    )
    args = (
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *pages,
        slots, query_start_loc, seq_lens,
    )
    grid = (num_reqs, nprog, H)
    if not handover:
        if do_res:
            _kvcomp_store_kernel[grid](*args, DO_HANDOVER=False, DO_RESIDUAL=True, **common)
    elif fuse_residual_write or not do_res:
        _kvcomp_store_kernel[grid](*args, DO_HANDOVER=True, DO_RESIDUAL=do_res, **common)
    else:
        _kvcomp_store_kernel[grid](*args, DO_HANDOVER=True, DO_RESIDUAL=False, **common)
        _kvcomp_store_kernel[grid](*args, DO_HANDOVER=False, DO_RESIDUAL=True, **common)


def ring_window_slots(slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, cfg: KvcompConfig) -> torch.Tensor:
    """``slot_mapping`` with -1 for the tokens a ring window (``residual_ring``)
    must not write: those below ``Q(n)`` of their request, packed straight from
    the fresh K/V, whose slots a long chunk's later tokens share, and the
    padding past the step's tokens. Device ops only (no host sync: CUDA-graph
    safe); ``attention_ref.kvcomp_step_reference`` writes the same tokens."""
    t = torch.arange(slot_mapping.shape[0], device=slot_mapping.device)
    ends = query_start_loc[1:].to(t.dtype)
    req = torch.searchsorted(ends, t, right=True).clamp_(max=ends.shape[0] - 1)
    n = seq_lens.to(t.dtype)[req]
    pos = n - (ends[req] - t)
    a = cfg.key_token_align
    q_n = torch.clamp(n - cfg.residual_tokens, min=0) // a * a
    keep = (pos >= q_n) & (t < ends[-1])
    return torch.where(keep, slot_mapping, torch.full_like(slot_mapping, -1))


# --------------------------------------------------------------------------
# PyTorch reference of the same two writes
# --------------------------------------------------------------------------


def store_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    residual_slot_mapping: torch.Tensor | None,
    query_start_loc,
    seq_lens,
    layout: PageLayout,
    cfg: KvcompConfig,
    residual_block_size: int,
) -> None:
    """What ``kvcomp_step_reference`` writes (hand-over, then residual
    write), without the attention: built from ``attention_ref._handover``."""
    qsl = [int(x) for x in query_start_loc]
    for i, qs, qe, n, start in attention_ref.step_requests(qsl, seq_lens):
        q_old, q_new = cfg.quantized_prefix_len(start), cfg.quantized_prefix_len(n)
        if q_new <= q_old:
            continue
        ks, vs = [], []
        old_hi = min(q_new, start)
        if old_hi > q_old:
            kr, vr = attention_ref.gather_residual(
                residual_cache, residual_block_table[i], residual_block_size, q_old, old_hi,
                key.dtype,
            )
            ks.append(kr)
            vs.append(vr)
        if q_new > start:
            ks.append(key[qs:qe][: q_new - start])
            vs.append(value[qs:qe][: q_new - start])
        attention_ref._handover(
            packed_cache, layout, cfg, block_table[i], torch.cat(ks), torch.cat(vs), q_old
        )
    if residual_cache is not None and residual_slot_mapping is not None:
        T = qsl[-1]
        slots = residual_slot_mapping[:T].long()
        keep = slots >= 0
        if bool(keep.any()):
            bs_r = residual_block_size
            b, o = slots[keep] // bs_r, slots[keep] % bs_r
            residual_cache[b, 0, :, o, :] = packing.to_window(key[:T][keep], residual_cache.dtype)
            residual_cache[b, 1, :, o, :] = packing.to_window(value[:T][keep],
                                                              residual_cache.dtype)


__all__ = [
    "TOKEN_UNIT",
    "handover_unit",
    "key_slices",
    "kvcomp_store",
    "ring_window_slots",
    "store_grid_bound",
    "store_reference",
]

