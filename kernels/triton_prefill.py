"""Triton attention for chunked prefill over packed pages + residual + fresh.

For each request ``i`` (``qs, qe = query_start_loc[i], [i + 1]``,
``n = seq_lens[i]``, ``start = n - (qe - qs)``, ``Q = cfg.quantized_prefix_len``)
the fresh queries attend, causally and with GQA (query head ``hq`` reads KV
head ``hq // (Hq / H)``), over

* packed ``[0, Q(start))``: read from the packed pages through the block
  table and dequantized in registers (no model-dtype copy of the cache),
* residual ``[Q(start), start)``: full-precision residual pages,
* fresh ``[start, n)``: the step's own ``key`` / ``value`` rows, causal,

with an online softmax (flash-attention style) in float32. It does not write
any cache: the store kernel (``triton_store.kvcomp_store``) hands over
``[Q(start), Q(n))`` and writes the residual, and since those regions are
disjoint from what is read here the two launches may run in either order
(the residual write after this one if blocks can be re-used within a step, as
in the reference).

Grid ``(num_reqs, cdiv(max_query_len, BLOCK_T), H)``: a program takes
``BLOCK_T`` query tokens of one request and all ``Hq / H`` query heads that
share KV head ``h`` (rows = token x head, padded to a power of two), so every
K/V tile is loaded and dequantized once for the whole GQA group. Programs past
a request's query length exit at once. Only Python ints size the grid.

Matmul precision: float32 models use IEEE fp32 dots; fp16/bf16 models cast the
dequantized K/V tiles and the probabilities to the model dtype for the tensor
cores, accumulating in float32 (tolerance ~1e-2 relative, as for bf16 KV).
Under ``TRITON_INTERPRET=1`` all dots are fp32 (the interpreter's bf16
``tl.dot`` is broken), so that path is only exercised on a GPU.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import attention_ref
from vllm_kvcomp.kernels.triton_common import (
    check_kv_inputs,
    evicted_walk,
    interpreted,
    layout_constexprs,
    page_args,
)
from vllm_kvcomp.launch_env import PREFILL_LAUNCH_ENV, parse_prefill_launch
from vllm_kvcomp.layout import PageLayout

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _unpack(byte, BITS: tl.constexpr):
    """[N, B] int32 bytes -> [N, B * 8 / BITS] codes, channel 8/BITS*j + i at
    bits [i*BITS, (i+1)*BITS) of byte j (little-endian, ``packing``)."""
    if BITS == 8:
        return byte
    elif BITS == 4:
        return tl.interleave(byte & 15, byte >> 4)
    else:
        return tl.interleave(tl.interleave(byte & 3, (byte >> 4) & 3),
                             tl.interleave((byte >> 2) & 3, byte >> 6))


@triton.jit
def _load_page_tile(
    cache_ptr, page_off, s0, valid, d, MODEL_DTYPE: tl.constexpr,
    BITS: tl.constexpr, CODES_OFF: tl.constexpr, PARAMS_OFF: tl.constexpr,
    ROW: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr,
    GC: tl.constexpr, NG: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] keys or values of slots [s0, s0 + BLOCK_N) of one
    head's page at byte ``page_off`` (s0 a multiple of BLOCK_N, which divides
    the block size; BLOCK_N and G powers of two, so a tile holds whole key
    groups or lies inside one): raw model dtype at 16 bits, else ``code *
    scale + min`` in float32. Codes are read as packed rows (vector loads) and
    unpacked in registers; params are read once per group / token."""
    BLOCK_D: tl.constexpr = d.shape[0]
    slot = s0 + tl.arange(0, BLOCK_N)
    dm = d < D
    if BITS == 16:
        ES: tl.constexpr = MODEL_DTYPE.primitive_bitwidth // 8
        ep = cache_ptr.to(tl.pointer_type(MODEL_DTYPE))
        rows = (page_off + CODES_OFF) // ES + slot * (ROW // ES)
        x = tl.load(ep + rows[:, None] + d[None, :], mask=valid[:, None] & dm[None, :],
                    other=0.0)
    else:
        PB: tl.constexpr = 8 // BITS
        NBY: tl.constexpr = BLOCK_D // PB
        jb = tl.arange(0, NBY)
        rows = page_off + CODES_OFF + slot * ROW
        byte = tl.load(cache_ptr + rows[:, None] + jb[None, :],
                       mask=valid[:, None] & (jb < ROW)[None, :], other=0)
        code = _unpack(byte.to(tl.int32), BITS).to(tl.float32)  # [N, BLOCK_D]
        fp = cache_ptr.to(tl.pointer_type(tl.float16))
        pbase = (page_off + PARAMS_OFF) // 2
        if PER_CHANNEL:
            if BLOCK_N <= G:  # one group: one (scale, min) row for the tile
                p_ptr = fp + pbase + (s0 // G) * (D * 2) + d * 2
                sc = tl.load(p_ptr, mask=dm, other=0.0).to(tl.float32)
                mn = tl.load(p_ptr + 1, mask=dm, other=0.0).to(tl.float32)
                x = code * sc[None, :] + mn[None, :]
            else:
                NGT: tl.constexpr = BLOCK_N // G
                gr = s0 // G + tl.arange(0, NGT)
                p_ptr = fp + pbase + gr[:, None] * (D * 2) + d[None, :] * 2
                sc = tl.load(p_ptr, mask=dm[None, :], other=0.0).to(tl.float32)
                mn = tl.load(p_ptr + 1, mask=dm[None, :], other=0.0).to(tl.float32)
                sc = tl.reshape(tl.broadcast_to(sc[:, None, :], (NGT, G, BLOCK_D)),
                                (BLOCK_N, BLOCK_D))
                mn = tl.reshape(tl.broadcast_to(mn[:, None, :], (NGT, G, BLOCK_D)),
                                (BLOCK_N, BLOCK_D))
                x = code * sc + mn
        else:
            if NG == 1:  # one group per token
                p_ptr = fp + pbase + slot * 2
                sc = tl.load(p_ptr, mask=valid, other=0.0).to(tl.float32)
                mn = tl.load(p_ptr + 1, mask=valid, other=0.0).to(tl.float32)
                x = code * sc[:, None] + mn[:, None]
            elif NG * GC == BLOCK_D:  # power-of-two head size: expand by reshape
                gi = tl.arange(0, NG)
                p_ptr = fp + pbase + (slot[:, None] * NG + gi[None, :]) * 2
                sc = tl.load(p_ptr, mask=valid[:, None], other=0.0).to(tl.float32)
                mn = tl.load(p_ptr + 1, mask=valid[:, None], other=0.0).to(tl.float32)
                sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, NG, GC)),
                                (BLOCK_N, BLOCK_D))
                mn = tl.reshape(tl.broadcast_to(mn[:, :, None], (BLOCK_N, NG, GC)),
                                (BLOCK_N, BLOCK_D))
                x = code * sc + mn
            else:  # other head sizes: gather each channel's group (L1 hits)
                m = valid[:, None] & dm[None, :]
                p_ptr = fp + pbase + (slot[:, None] * NG + (d // GC)[None, :]) * 2
                sc = tl.load(p_ptr, mask=m, other=0.0).to(tl.float32)
                mn = tl.load(p_ptr + 1, mask=m, other=0.0).to(tl.float32)
                x = code * sc + mn
    return x


@triton.jit
def _attend_block(q, k, v, mask, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr,
                  MASKED: tl.constexpr):
    """Online-softmax update with one K/V tile; scores in log2 units.
    ``MASKED=False``: every (row, key) pair of the tile is attended (``mask``
    is ignored), which saves the select on the bulk of a long prefill."""
    k = k.to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(mask, s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _kvcomp_prefill_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, stride_kt, stride_kh,
    v_ptr, stride_vt, stride_vh,
    o_ptr, stride_ot, stride_oh,
    cache_ptr, stride_cb, stride_ch,
    res_ptr, stride_rb, stride_rkv, stride_rh, stride_rt,
    bt_ptr, stride_bt, rbt_ptr, stride_rbt,
    qsl_ptr, seq_lens_ptr, qk_scale,
    lse_ptr, stride_lh, out_row_base, hole_ptr,
    D: tl.constexpr, BS: tl.constexpr, BS_R: tl.constexpr,
    R: tl.constexpr, ALIGN: tl.constexpr, G: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    K_GC: tl.constexpr, K_NG: tl.constexpr, V_GC: tl.constexpr, V_NG: tl.constexpr,
    K_CODES_OFF: tl.constexpr, K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr,
    V_CODES_OFF: tl.constexpr, V_PARAMS_OFF: tl.constexpr, V_ROW: tl.constexpr,
    REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
    FRESH: tl.constexpr, WRITE_LSE: tl.constexpr, AS_STORED: tl.constexpr = False,
    HOLE: tl.constexpr = False, HOLE_RECENT: tl.constexpr = 0,
):
    i = tl.program_id(0)
    tile = tl.program_id(1)
    h = tl.program_id(2)
    qs = tl.load(qsl_ptr + i)
    qe = tl.load(qsl_ptr + i + 1)
    q_len = qe - qs
    t0 = tile * BLOCK_T
    if t0 >= q_len:
        return
    n = tl.load(seq_lens_ptr + i)
    start = n - q_len
    q_old = tl.maximum(start - R, 0) // ALIGN * ALIGN
    MODEL_DTYPE: tl.constexpr = k_ptr.dtype.element_ty

    ROWS: tl.constexpr = BLOCK_T * REP_P
    r = tl.arange(0, ROWS)
    tq = t0 + r // REP_P  # query token index within the request
    hr = r % REP_P
    row_ok = (tq < q_len) & (hr < REP)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    hq = h * REP + hr
    q_off = (qs + tq).to(tl.int64) * stride_qt + hq * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & dm[None, :],
                other=0.0)
    if IEEE:
        q = q.to(tl.float32)

    m_i = tl.full([ROWS], -1.0e30, tl.float32)  # finite: padded rows stay NaN-free
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    nn = tl.arange(0, BLOCK_N)

    # AS_STORED: the query at position p reads keys below Q(p) from the packed
    # pages (the store ran first: they hold [0, Q(n))) and the rest in full
    # precision, as a decode step at p would; else the bound is Q(start).
    q_hi = q_old
    q_lo = q_old
    if AS_STORED:
        bound = tl.maximum(start + tq - R, 0) // ALIGN * ALIGN  # [ROWS]
        last = start + tl.minimum(q_len, t0 + BLOCK_T) - 1
        q_hi = tl.maximum(last - R, 0) // ALIGN * ALIGN
        q_lo = tl.maximum(start + t0 - R, 0) // ALIGN * ALIGN

    # 1. packed prefix [0, Q(start)) (AS_STORED: [0, Q(last query)), each row
    # below its own bound): tiles of BLOCK_N slots of one page
    bt_row = bt_ptr + i.to(tl.int64) * stride_bt
    q_end = q_hi
    if HOLE:
        # the range is the request's first query's; under StreamingLLM
        # (HOLE_RECENT) each row's own range ends where its recent window does
        ev_lo, ev_hi, lo_al, gap, q_end = evicted_walk(hole_ptr, i, q_hi, BLOCK_N)
        if HOLE_RECENT > 0:
            row_bound = q_old
            if AS_STORED:
                row_bound = bound
            row_hi = tl.maximum(tl.minimum(start + tq + 1 - HOLE_RECENT, row_bound), 0)
            row_hi = tl.maximum(row_hi // BS * BS, ev_lo)
    for m0 in range(0, q_end, BLOCK_N):
        n0 = m0
        if HOLE:
            n0 = tl.where(m0 >= lo_al, m0 + gap, m0)
        valid = n0 + nn < q_hi
        blk = tl.load(bt_row + n0 // BS).to(tl.int64)
        page_off = blk * stride_cb + h * stride_ch
        s0 = n0 % BS
        k = _load_page_tile(cache_ptr, page_off, s0, valid, d, MODEL_DTYPE,
                            K_BITS, K_CODES_OFF, K_PARAMS_OFF, K_ROW, KEY_CHANNEL, G,
                            K_GC, K_NG, D, BLOCK_N)
        v = _load_page_tile(cache_ptr, page_off, s0, valid, d, MODEL_DTYPE,
                            V_BITS, V_CODES_OFF, V_PARAMS_OFF, V_ROW, False, G,
                            V_GC, V_NG, D, BLOCK_N)
        seen = valid[None, :]
        if AS_STORED:
            seen = seen & ((n0 + nn)[None, :] < bound[:, None])
        if HOLE:
            kpos = (n0 + nn)[None, :]
            if HOLE_RECENT > 0:
                seen = seen & ((kpos < ev_lo) | (kpos >= row_hi[:, None]))
            else:
                seen = seen & ((kpos < ev_lo) | (kpos >= ev_hi))
        m_i, l_i, acc = _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE, True)

    # 2. residual [Q(start), start) (AS_STORED: from the tile's first bound,
    # each row from its own)
    if HAS_RESIDUAL:
        rbt_row = rbt_ptr + i.to(tl.int64) * stride_rbt
        for n0 in range(q_lo, start, BLOCK_N):
            pos = n0 + nn
            valid = pos < start
            rb = tl.load(rbt_row + pos // BS_R, mask=valid, other=0).to(tl.int64)
            off = rb * stride_rb + h * stride_rh + (pos % BS_R) * stride_rt
            mk = valid[:, None] & dm[None, :]
            # an fp8 window (residual_dtype) is read back in the model dtype
            k = tl.load(res_ptr + off[:, None] + d[None, :], mask=mk, other=0.0).to(MODEL_DTYPE)
            v = tl.load(res_ptr + stride_rkv + off[:, None] + d[None, :], mask=mk,
                        other=0.0).to(MODEL_DTYPE)
            seen = valid[None, :]
            if AS_STORED:
                seen = seen & (pos[None, :] >= bound[:, None])
            m_i, l_i, acc = _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE, True)

    # 3. fresh [start, n), causal (FRESH=False: the caller attends over them
    # itself, e.g. with FlashAttention, and merges through the LSE)
    if FRESH:
        # (a) whole tiles before the program's first query token: every key
        # j < t0 <= tq is visible to every row and j < q_len, so neither the
        # causal select nor row masks on the loads (only the channel mask)
        lo = t0 // BLOCK_N * BLOCK_N
        f0 = 0
        if AS_STORED:
            # keys below the tile's first bound are read packed by every row
            f0 = tl.maximum(q_lo - start, 0) // BLOCK_N * BLOCK_N
        for n0 in range(f0, lo, BLOCK_N):
            jt = (qs + n0 + nn).to(tl.int64)
            k = tl.load(k_ptr + (jt * stride_kt + h * stride_kh)[:, None] + d[None, :],
                        mask=dm[None, :], other=0.0)
            v = tl.load(v_ptr + (jt * stride_vt + h * stride_vh)[:, None] + d[None, :],
                        mask=dm[None, :], other=0.0)
            if AS_STORED:
                seen = (start + n0 + nn)[None, :] >= bound[:, None]
                m_i, l_i, acc = _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE, True)
            else:
                m_i, l_i, acc = _attend_block(q, k, v, None, m_i, l_i, acc, qk_scale, IEEE,
                                              False)
        # (b) the diagonal tile(s) [lo, t0 + BLOCK_T): causal and length masks
        hi = tl.minimum(q_len, t0 + BLOCK_T)
        for n0 in range(lo, hi, BLOCK_N):
            j = n0 + nn
            valid = j < q_len
            jt = (qs + j).to(tl.int64)
            mk = valid[:, None] & dm[None, :]
            k = tl.load(k_ptr + (jt * stride_kt + h * stride_kh)[:, None] + d[None, :],
                        mask=mk, other=0.0)
            v = tl.load(v_ptr + (jt * stride_vt + h * stride_vh)[:, None] + d[None, :],
                        mask=mk, other=0.0)
            causal = valid[None, :] & (j[None, :] <= tq[:, None])
            if AS_STORED:
                causal = causal & ((start + j)[None, :] >= bound[:, None])
            m_i, l_i, acc = _attend_block(q, k, v, causal, m_i, l_i, acc, qk_scale, IEEE,
                                          True)

    row = (qs + tq - out_row_base).to(tl.int64)
    if WRITE_LSE:
        # natural-log LSE, [Hq, T] like FlashAttention's; -inf where nothing
        # was attended (no context), which a merge weighs as zero
        lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.maximum(l_i, 1e-30))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lse_ptr + hq.to(tl.int64) * stride_lh + row, lse, mask=row_ok)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_off = row * stride_ot + hq * stride_oh
    tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dm[None, :])


# --------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------

# Measured on an H200 (2026-11-30, benchmarks/results/2026-11-30-h200-prefill-profile): of the
# 16 configs of ``bench_prefill_kernel.py --quick`` this one has the lowest summed
# time over the three prefill shapes (4 x 4096 fresh: 1405 vs 1606 us for the
# former 64/64/4/2), and W1 end to end ran with it.
_BUILTIN_LAUNCH = {"block_rows": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
# fp32 models (IEEE dots, twice the registers per element) keep the small tiles.
_FP32_LAUNCH_CAP = {"block_rows": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}


# Launch defaults of kvcomp_prefill_attention: the built-in ones, overridden
# by the environment (read once, here) so a config tuned on the target GPU
# (benchmarks/bench_prefill_kernel.py prints one) needs no code change.
PREFILL_LAUNCH = {**_BUILTIN_LAUNCH,
                  **parse_prefill_launch(os.environ.get(PREFILL_LAUNCH_ENV, ""))}


# Launches that ran for a requested one, per (request, head size, dtype,
# bits, device): a GPU with less shared memory than the tuning GPU (or a
# larger head) falls back once, not on every call.
_FITTED: dict = {}


def _smaller_launches(block_rows: int, block_n: int, num_warps: int, num_stages: int):
    """The launch asked for, then ones that need less shared memory and
    registers: fewer stages, narrower key tiles, fewer rows."""
    yield block_rows, block_n, num_warps, num_stages
    while num_stages > 1 or block_n > 32 or block_rows > 64:
        if num_stages > 2:
            num_stages = 2
        elif block_n > 32:
            block_n //= 2
        elif block_rows > 64:
            block_rows //= 2
            num_warps = min(num_warps, 4)
        else:
            num_stages = 1
        yield block_rows, block_n, num_warps, num_stages


def prefill_tiles(num_q_per_kv: int, max_query_len: int, block_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_T, REP_P): query tokens per program and padded GQA group; rows
    BLOCK_T * REP_P stay >= 16 (tensor-core minimum) and ~``block_rows``."""
    rep_p = triton.next_power_of_2(num_q_per_kv)
    bt = max(1, block_rows // rep_p)
    bt = min(bt, triton.next_power_of_2(max(1, max_query_len)))
    bt = max(bt, triton.cdiv(16, rep_p))
    return bt, rep_p


def kvcomp_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    cfg: KvcompConfig,
    scale: float,
    residual_block_size: int,
    max_query_len: int,
    out: torch.Tensor,
    block_n: int | None = None,
    block_rows: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    include_fresh: bool = True,
    lse: torch.Tensor | None = None,
    out_row_base: int = 0,
    allow_smaller_launch: bool = True,
    as_stored: bool = False,
    evicted: torch.Tensor | None = None,
    evicted_recent: int = 0,
) -> torch.Tensor:
    """Attention (1) for all requests of a batch; writes ``out`` [T, Hq, D].

    ``include_fresh=False`` attends over the cached context only (packed
    pages + residual window, no fresh tokens): the partial result of a split
    where FlashAttention takes the fresh tokens; ``lse`` [Hq, T'] (fp32,
    token stride 1) then receives each row's natural-log LSE, -inf for rows
    without context. ``out_row_base``: row r of the batch goes to row
    ``r - out_row_base`` of ``out`` and ``lse`` (they may cover a tail only).

    query [T, Hq, D], key/value [T, H, D] (fresh rows, channel stride 1, any
    row/head strides), packed_cache uint8 [nb, H, head_page_bytes],
    residual_cache [nb_r, 2, H, bs_r, D] (strided view allowed) or None when
    the config keeps no residual window, int32 block tables / query_start_loc
    [B + 1] / seq_lens [B] on the device. ``max_query_len`` (Python int) must
    bound every request's fresh-token count: it sizes the grid.
    ``block_n`` / ``block_rows`` / ``num_warps`` / ``num_stages``: None takes
    ``PREFILL_LAUNCH`` (built-in defaults or ``KVCOMP_PREFILL_LAUNCH``). A
    launch the GPU lacks the resources for falls back to smaller ones unless
    ``allow_smaller_launch=False`` (benchmarks: a config must run as named).
    ``as_stored``: each query reads keys below Q(its position) from the packed
    pages, which must already hold the step's hand-over (store first), and
    the rest in full precision: what a decode step there reads
    (``KvcompConfig.prompt_attention``).
    ``evicted``: int32 ``[B, 2]`` packed positions ``[lo, hi)`` each
    request's first query does not read (``eviction_gpu.evicted_ranges``);
    ``evicted_recent`` > 0: a later query's range ends where its last
    ``evicted_recent`` tokens begin, rounded down to a page (StreamingLLM).
    """
    assert layout.config == cfg
    num_reqs = seq_lens.shape[0]
    T, Hq, D = query.shape
    H = key.shape[1]
    assert D == layout.head_size and Hq % H == 0
    assert query.stride(-1) == 1 and out.stride(-1) == 1
    check_kv_inputs(key, value, packed_cache, layout)
    if num_reqs == 0 or max_query_len <= 0:
        return out
    pages, bs_r = page_args(cfg, packed_cache, residual_cache, residual_block_table,
                            residual_block_size, block_table, key)
    launch = PREFILL_LAUNCH
    if query.dtype == torch.float32:
        launch = {k: min(v, _FP32_LAUNCH_CAP[k]) for k, v in launch.items()}
    block_n = launch["block_n"] if block_n is None else block_n
    block_rows = launch["block_rows"] if block_rows is None else block_rows
    num_warps = launch["num_warps"] if num_warps is None else num_warps
    num_stages = launch["num_stages"] if num_stages is None else num_stages
    rep = Hq // H
    # packed tiles must not straddle pages: largest power of two <= block_n
    # dividing the block size (>= 16 for tl.dot)
    bs = layout.block_size
    asked_n = block_n
    block_n = 1 << (block_n.bit_length() - 1)
    while bs % block_n:
        block_n //= 2
    if block_n < 16:
        raise NotImplementedError(
            f"the Triton prefill kernel needs key tiles of >= 16 tokens dividing the block "
            f"size (tl.dot); block_n={asked_n} with block size {bs} gives {block_n}")
    # The interpreter's bf16 tl.dot is wrong (numpy has no bf16): do fp32
    # dots there, so CPU tests do not cover the bf16 tensor-core path.
    ieee = query.dtype == torch.float32 or interpreted()
    if not ieee:
        assert query.dtype == key.dtype, "fp16/bf16 dots need one dtype for Q and K/V"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.stride(-1) == 1 and lse.shape[0] == Hq
    args = (
        query, query.stride(0), query.stride(1),
        key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1),
        out, out.stride(0), out.stride(1),
        *pages,
        query_start_loc, seq_lens, float(scale) * math.log2(math.e),
        lse if lse is not None else out, lse.stride(0) if lse is not None else 0, out_row_base,
        evicted,
    )
    consts = dict(
        BS_R=bs_r,
        R=cfg.residual_tokens, ALIGN=cfg.key_token_align, G=cfg.group_size, REP=rep,
        HAS_RESIDUAL=residual_cache is not None, IEEE=ieee, FRESH=include_fresh,
        WRITE_LSE=lse is not None,
        **layout_constexprs(layout),
    )
    if as_stored:
        assert include_fresh, "as-stored prompts attend their own tokens in the same pass"
        consts["AS_STORED"] = True
    if evicted is not None:
        consts["HOLE"] = True
        if evicted_recent:
            consts["HOLE_RECENT"] = evicted_recent
    asked = (block_rows, block_n, num_warps, num_stages)
    fit_key = (asked, D, query.dtype, layout.config.k_bits, layout.config.v_bits, query.device)
    error = None
    first = _FITTED.get(fit_key, asked) if allow_smaller_launch else asked
    for block_rows, block_n, num_warps, num_stages in _smaller_launches(*first):
        block_t, rep_p = prefill_tiles(rep, max_query_len, block_rows)
        try:
            _kvcomp_prefill_kernel[(num_reqs, triton.cdiv(max_query_len, block_t), H)](
                *args, REP_P=rep_p, BLOCK_T=block_t, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages, **consts)
        except triton.runtime.errors.OutOfResources as e:
            if not allow_smaller_launch:
                raise
            error = e
            continue
        if fit_key not in _FITTED and (block_rows, block_n, num_warps, num_stages) != asked:
            logger.warning(
                "kvcomp prefill kernel: launch %s needs more than this GPU has (%s); using "
                "%s for head size %d (set KVCOMP_PREFILL_LAUNCH to choose)",
                asked, error, (block_rows, block_n, num_warps, num_stages), D)
        _FITTED[fit_key] = (block_rows, block_n, num_warps, num_stages)
        return out
    raise error


def prefill_with_flash_attn(
    query, key, value, out, packed_cache, residual_cache, block_table, residual_block_table,
    query_start_loc, seq_lens, layout: PageLayout, cfg: KvcompConfig, scale: float,
    residual_block_size: int, max_query_len: int, row_base: int, num_tokens: int,
    flash_attn_varlen_func, fa_version, merge_attn_states, evicted: torch.Tensor | None = None,
    evicted_recent: int = 0,
) -> torch.Tensor:
    """``kvcomp_prefill_attention`` for batch rows [row_base, num_tokens) in
    two parts merged through their LSEs: the fresh tokens (causal, the
    forward's own full-precision K/V) by vLLM's FlashAttention, the cached
    context (packed pages + residual window) by the Triton kernel. Rows of
    requests without context get LSE -inf there, so the merge keeps their
    fresh part alone. Per-request tensors hold the prefill requests only;
    ``query_start_loc`` is absolute (its first entry is ``row_base``)."""
    qp = query[row_base:num_tokens]
    cu = query_start_loc - row_base
    fresh_out, fresh_lse = flash_attn_varlen_func(
        q=qp, k=key[row_base:num_tokens], v=value[row_base:num_tokens], cu_seqlens_q=cu,
        max_seqlen_q=max_query_len, cu_seqlens_k=cu, max_seqlen_k=max_query_len,
        softmax_scale=scale, causal=True, return_softmax_lse=True, fa_version=fa_version,
    )
    ctx_out = torch.empty_like(qp)
    ctx_lse = torch.empty(qp.shape[1], qp.shape[0], dtype=torch.float32, device=query.device)
    kvcomp_prefill_attention(
        query, key, value, packed_cache, residual_cache, block_table, residual_block_table,
        query_start_loc, seq_lens, layout, cfg, scale, residual_block_size, max_query_len,
        ctx_out, include_fresh=False, lse=ctx_lse, out_row_base=row_base, evicted=evicted,
        evicted_recent=evicted_recent,
    )
    merge_attn_states(out[row_base:num_tokens], ctx_out, ctx_lse, fresh_out, fresh_lse)
    return out


# --------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------


def prefill_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed_cache: torch.Tensor,
    residual_cache: torch.Tensor | None,
    block_table: torch.Tensor,
    residual_block_table: torch.Tensor | None,
    query_start_loc,
    seq_lens,
    layout: PageLayout,
    cfg: KvcompConfig,
    scale: float,
    residual_block_size: int,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    include_fresh: bool = True,
    lse: torch.Tensor | None = None,
    as_stored: bool = False,
) -> torch.Tensor:
    """The attention half of ``attention_ref.kvcomp_step_reference``
    (``attention_ref.request_attention``); writes nothing but ``out``. With
    ``as_stored`` the packed pages must already hold the step's hand-over.
    ``include_fresh=False``: the cached context only, packed ``[0, Q(start))``
    and residual ``[Q(start), start)`` (rows without context get 0 and LSE
    -inf; ``lse`` [Hq, T], natural log), as ``kvcomp_prefill_attention``'s
    half of the FlashAttention split."""
    if out is None:
        out = torch.empty_like(query)
    model_dtype = key.dtype
    for i, qs, qe, _, start in attention_ref.step_requests(query_start_loc, seq_lens):
        res_row = residual_block_table[i] if residual_block_table is not None else None
        if include_fresh:
            o = attention_ref.request_attention(
                query[qs:qe], key[qs:qe], value[qs:qe], packed_cache, residual_cache, layout,
                cfg, block_table[i], res_row, residual_block_size, start, scale, model_dtype,
                as_stored)
            out[qs:qe] = o.to(out.dtype)
            continue
        q_old = cfg.quantized_prefix_len(start)
        if start == 0:
            out[qs:qe] = 0
            if lse is not None:
                lse[:, qs:qe] = float("-inf")
            continue
        # context only: every query sees all of [0, start), packed below Q(start)
        q = query[qs:qe]
        kp, vp = attention_ref.packed_prefix(packed_cache, layout, block_table[i], q_old,
                                             model_dtype, key.shape[1])
        parts_k, parts_v = [kp.float()], [vp.float()]
        if start > q_old:
            kr, vr = attention_ref.gather_residual(
                residual_cache, res_row, residual_block_size, q_old, start)
            parts_k.append(kr.float())
            parts_v.append(vr.float())
        k_all, v_all = torch.cat(parts_k), torch.cat(parts_v)
        out[qs:qe] = attention_ref.attend(q, k_all, v_all, scale, start).to(out.dtype)
        if lse is not None:
            lse[:, qs:qe] = attention_ref.attention_lse(q, k_all, scale, start)
    return out


__all__ = [
    "kvcomp_prefill_attention",
    "prefill_with_flash_attn",
    "prefill_attention_reference",
    "prefill_tiles",
    "PREFILL_LAUNCH",
]
