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
  8 rather than 16), which halves the MMAs. Default launch (``DEFAULT_LAUNCH``):
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
  mantissa of 128.0 / 1024.0 (``_unpack_asm``: one LOP3, plus one shift per
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

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import DECODE_LAUNCH_ENV, KvcompConfig, parse_decode_launch
from vllm_kvcomp.kernels import attention_ref, packing
from vllm_kvcomp.kernels.triton_store import check_alignment, interpreted, layout_constexprs
from vllm_kvcomp.layout import PageLayout

# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _pick(j: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    if j == 0:
        return x0
    elif j == 1:
        return x1
    elif j == 2:
        return x2
    elif j == 3:
        return x3
    elif j == 4:
        return x4
    elif j == 5:
        return x5
    elif j == 6:
        return x6
    else:
        return x7


@triton.jit
def _acc_phase(j: tl.constexpr, pv, alpha, a0, a1, a2, a3, a4, a5, a6, a7):
    """The 8 phase accumulators with phase j's rescaled by ``alpha`` (already
    broadcast to its shape) and ``pv`` added."""
    if j == 0:
        a0 = a0 * alpha + pv
    elif j == 1:
        a1 = a1 * alpha + pv
    elif j == 2:
        a2 = a2 * alpha + pv
    elif j == 3:
        a3 = a3 * alpha + pv
    elif j == 4:
        a4 = a4 * alpha + pv
    elif j == 5:
        a5 = a5 * alpha + pv
    elif j == 6:
        a6 = a6 * alpha + pv
    else:
        a7 = a7 * alpha + pv
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _split_phases(x, PH: tl.constexpr):
    """[N, PH * W] -> the PH tensors [N, W] of columns PH*w + j (8 returned,
    the unused ones repeated), by reshapes and splits in registers."""
    N: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1] // PH
    if PH == 1:
        return x, x, x, x, x, x, x, x
    elif PH == 2:
        a, b = tl.split(tl.reshape(x, [N, W, 2]))
        return a, b, a, b, a, b, a, b
    elif PH == 4:
        e, o = tl.split(tl.reshape(x, [N, W, 2, 2]))  # column 4w + 2*j1 + j0
        p0, p2 = tl.split(e)
        p1, p3 = tl.split(o)
        return p0, p1, p2, p3, p0, p1, p2, p3
    else:
        e, o = tl.split(tl.reshape(x, [N, W, 2, 2, 2]))  # 8w + 4*j2 + 2*j1 + j0
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        p0, p4 = tl.split(e0)
        p2, p6 = tl.split(e1)
        p1, p5 = tl.split(o0)
        p3, p7 = tl.split(o1)
        return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _operand(x, IEEE: tl.constexpr, DT: tl.constexpr):
    """x as a dot operand: fp32 (IEEE dots) or the model dtype."""
    if IEEE:
        return x.to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b with fp32 accumulation; operands in DT (model dtype) or fp32."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _phase(x, j: tl.constexpr, BITS: tl.constexpr, PH: tl.constexpr):
    """int32 codes of phase j of (zero-extended) int32 elements."""
    if PH == 1:
        return x
    elif j == 0:
        return x & ((1 << BITS) - 1)
    elif j == PH - 1:
        return x >> (BITS * j)
    else:
        return (x >> (BITS * j)) & ((1 << BITS) - 1)


@triton.jit
def _codes_operand(code, CVT: tl.constexpr, DT: tl.constexpr):
    """int32 codes -> dot operand. CVT 0: exact conversion. CVT 1: OR the code
    into the mantissa of fp16 1024.0 (the operand is then ``1024 + code``
    and the caller subtracts ``1024 * sum(other operand)``); the portable
    form of ``_unpack_asm``, kept so the CPU tests cover that bookkeeping."""
    if CVT == 1:
        return (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return code.to(DT)


# The bf16/fp16 mantissa trick on 4 packed bytes at once (PTX): PRMT spreads
# bytes (0, 1) and (2, 3) into the two 16-bit halves of a word, then one LOP3
# per phase and pair of codes does ``(x >> shift) & mask | MAGIC``: about one
# instruction per code, against ~2 plus packing when Triton unpacks bytes
# element by element. Output j holds phase j of the 4 input bytes.
_ASM_SPREAD = """
.reg .b32 t<4>;
prmt.b32 t0, $IN, 0, 0x4140;
prmt.b32 t1, $IN, 0, 0x4342;
"""
_ASM4 = tl.constexpr("{" + _ASM_SPREAD.replace("$IN", "$4") + """
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xEA;
shr.b32 t2, t0, 4;
shr.b32 t3, t1, 4;
lop3.b32 $2, t2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $3, t3, 0x000F000F, MAGIC, 0xEA;
}""")
_ASM2 = tl.constexpr("{" + _ASM_SPREAD.replace("$IN", "$8") + "".join(f"""
shr.b32 t2, t0, {2 * j};
shr.b32 t3, t1, {2 * j};
lop3.b32 ${2 * j}, t2, 0x00030003, MAGIC, 0xEA;
lop3.b32 ${2 * j + 1}, t3, 0x00030003, MAGIC, 0xEA;""" for j in range(4)) + "\n}")
_ASM8 = tl.constexpr("{" + _ASM_SPREAD.replace("$IN", "$2") + """
or.b32 $0, t0, MAGIC;
or.b32 $1, t1, MAGIC;
}""")


# 16-bit elements (two per register, from the two halves): no spreading,
# one SHF + one LOP3 per phase and pair of codes
def _asm16(bits, magic):
    """4 16-bit elements in two registers -> 16/bits phases, each two
    registers (two bf16/fp16 pairs): the pair of registers an mma fragment
    takes, so no register moves are needed between the unpack and the dot."""
    nout = 16 // bits
    mask = {2: "0x00030003", 4: "0x000F000F", 8: "0x00FF00FF"}[bits]
    body = []
    for i in range(2):
        src = f"${2 * nout + i}"
        body.append(f"lop3.b32 ${i}, {src}, {mask}, {magic}, 0xEA;")
        for j in range(1, nout):
            body.append(f"shr.b32 t0, {src}, {bits * j};")
            body.append(f"lop3.b32 ${2 * j + i}, t0, {mask}, {magic}, 0xEA;")
    return tl.constexpr("{\n.reg .b32 t0;\n" + "\n".join(body) + "\n}")


_ASM16 = {(bits, magic): _asm16(bits, m)
          for bits in (2, 4, 8) for magic, m in (("bf16", "0x43004300"),
                                                 ("fp16", "0x64006400"))}
_ASM16_2_BF16 = _ASM16[(2, "bf16")]
_ASM16_4_BF16 = _ASM16[(4, "bf16")]
_ASM16_2_FP16 = _ASM16[(2, "fp16")]
_ASM16_4_FP16 = _ASM16[(4, "fp16")]
_ASM16_8_FP16 = _ASM16[(8, "fp16")]
_ASM4_BF16 = tl.constexpr(_ASM4.value.replace("MAGIC", "0x43004300"))
_ASM4_FP16 = tl.constexpr(_ASM4.value.replace("MAGIC", "0x64006400"))
_ASM2_BF16 = tl.constexpr(_ASM2.value.replace("MAGIC", "0x43004300"))
_ASM2_FP16 = tl.constexpr(_ASM2.value.replace("MAGIC", "0x64006400"))
_ASM8_FP16 = tl.constexpr(_ASM8.value.replace("MAGIC", "0x64006400"))


@triton.jit
def _unpack_asm(x, BITS: tl.constexpr, EW: tl.constexpr, DT: tl.constexpr):
    """uint8 / uint16 (EW) packed codes -> their EW/BITS phases as DT
    ``MAGIC + code`` (GPU only; bf16: 2/4-bit codes, MAGIC 128; fp16: MAGIC
    1024). Returns 8 tensors, the unused ones repeated."""
    if EW == 16:
        if DT == tl.bfloat16:
            if BITS == 4:
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    _ASM16_4_BF16, "=r," * 8 + "r,r", [x], dtype=(tl.bfloat16,) * 4,
                    is_pure=True, pack=4)
                return c0, c1, c2, c3, c0, c1, c2, c3
            else:
                return tl.inline_asm_elementwise(
                    _ASM16_2_BF16, "=r," * 16 + "r,r", [x],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=4)
        else:
            if BITS == 4:
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    _ASM16_4_FP16, "=r," * 8 + "r,r", [x], dtype=(tl.float16,) * 4,
                    is_pure=True, pack=4)
                return c0, c1, c2, c3, c0, c1, c2, c3
            elif BITS == 2:
                return tl.inline_asm_elementwise(
                    _ASM16_2_FP16, "=r," * 16 + "r,r", [x],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=4)
            else:
                c0, c1 = tl.inline_asm_elementwise(
                    _ASM16_8_FP16, "=r,=r,=r,=r,r,r", [x], dtype=(tl.float16,) * 2,
                    is_pure=True, pack=4)
                return c0, c1, c0, c1, c0, c1, c0, c1
    elif DT == tl.bfloat16:
        if BITS == 4:
            c0, c1 = tl.inline_asm_elementwise(
                _ASM4_BF16, "=r,=r,=r,=r,r", [x], dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True, pack=4)
            return c0, c1, c0, c1, c0, c1, c0, c1
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM2_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True,
                pack=4)
            return c0, c1, c2, c3, c0, c1, c2, c3
    else:
        if BITS == 4:
            c0, c1 = tl.inline_asm_elementwise(
                _ASM4_FP16, "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4)
            return c0, c1, c0, c1, c0, c1, c0, c1
        elif BITS == 2:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM2_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
            return c0, c1, c2, c3, c0, c1, c2, c3
        else:
            c0 = tl.inline_asm_elementwise(_ASM8_FP16, "=r,=r,r", [x], dtype=tl.float16,
                                           is_pure=True, pack=4)
            return c0, c0, c0, c0, c0, c0, c0, c0


@triton.jit
def _load_elems(cache_ptr, row0, slot, valid, ROW: tl.constexpr, RP: tl.constexpr,
                EW: tl.constexpr):
    """[BLOCK_N, RP] packed code rows of ``slot`` as uint8 or uint16 (EW)
    elements (vector loads); a row is ROW bytes."""
    jb = tl.arange(0, RP)
    NE: tl.constexpr = ROW * 8 // EW
    if RP == NE:
        m = valid[:, None]
    else:
        m = valid[:, None] & (jb < NE)[None, :]
    if EW == 16:
        ep = cache_ptr.to(tl.pointer_type(tl.uint16))
        return tl.load(ep + row0 // 2 + slot[:, None] * NE + jb[None, :], mask=m, other=0)
    else:
        return tl.load(cache_ptr + row0 + slot[:, None] * ROW + jb[None, :], mask=m, other=0)


@triton.jit
def _load_elems3(cache_ptr, row0, slot, valid, ROW: tl.constexpr, RP: tl.constexpr,
                 EW: tl.constexpr, KEYS: tl.constexpr):
    """Warp-tile form of ``_load_elems``: ``slot`` / ``valid`` are [WT, TS];
    returns [WT, RP, TS] (KEYS: the key dots' B operand) or [WT, TS, RP]."""
    jb = tl.arange(0, RP)
    NE: tl.constexpr = ROW * 8 // EW
    if KEYS:
        rows = slot[:, None, :]
        cols = jb[None, :, None]
        m = valid[:, None, :] & (cols < NE)
    else:
        rows = slot[:, :, None]
        cols = jb[None, None, :]
        m = valid[:, :, None] & (cols < NE)
    if EW == 16:
        ep = cache_ptr.to(tl.pointer_type(tl.uint16))
        return tl.load(ep + row0 // 2 + rows * NE + cols, mask=m, other=0)
    else:
        return tl.load(cache_ptr + row0 + rows * ROW + cols, mask=m, other=0)


@triton.jit
def _load_raw(cache_ptr, row0, slot, valid, d, ROW: tl.constexpr, D: tl.constexpr,
              MODEL_DTYPE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] unquantized rows (a 16-bit region), model dtype."""
    ES: tl.constexpr = MODEL_DTYPE.primitive_bitwidth // 8
    ep = cache_ptr.to(tl.pointer_type(MODEL_DTYPE))
    rows = row0 // ES + slot * (ROW // ES)
    if d.shape[0] == D:
        m = valid[:, None]
    else:
        m = valid[:, None] & (d < D)[None, :]
    return tl.load(ep + rows[:, None] + d[None, :], mask=m, other=0.0)


@triton.jit
def _params(wp, idx, mask):
    """fp32 (scale, min) of the fp16 pairs number ``idx``: each pair is read
    as one 32-bit word (half the loads, and wide enough for Triton to
    pipeline them with asynchronous copies like the codes)."""
    w = tl.load(wp + idx, mask=mask, other=0)
    sc = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    mn = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return sc, mn


@triton.jit
def _dequant(code, wp, pbase, slot, valid, ch, chm, PER_CHANNEL: tl.constexpr,
             G: tl.constexpr, GC: tl.constexpr, NG: tl.constexpr, D: tl.constexpr):
    """Fallback ``code * scale + min`` (fp32) of channels ``ch`` for layouts the
    folded dots do not cover (several key groups in a tile, several channel
    groups in a token); params are gathered per element (L1 hits)."""
    if PER_CHANNEL:
        idx = (slot // G)[:, None] * D + ch[None, :]
    else:
        idx = slot[:, None] * NG + (ch // GC)[None, :]
    sc, mn = _params(wp, pbase + idx, valid[:, None] & chm[None, :])
    return code.to(tl.float32) * sc + mn


@triton.jit
def _softmax_step(s, s_row, mask, m_i, l_i):
    """Online-softmax bookkeeping for one tile of base-2 scores
    ``s + s_row[:, None]``."""
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) + s_row)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - (m_new - s_row)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


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
    seq_lens_ptr, qk_scale,
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
):
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

    # 1. this split's share of the packed tiles of [0, Q(start))
    n_tiles = tl.cdiv(q_old, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    lo = sp * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, q_old)
    nn = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + i64 * stride_bt
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
        for n0 in range(lo, hi, BLOCK_N):
            valid3 = n0 + nn3 < q_old
            blk = tl.load(bt_row + n0 // BS).to(tl.int64)
            page_off = blk * stride_cb + h * stride_ch
            s0 = n0 % BS
            slot3 = s0 + nn3
            # keys as the A operand [WT, TS, K_RP]: s^T = codes @ (q * s)^T
            kraw = _load_elems3(cache_ptr, page_off + K_CODES_OFF, slot3, valid3, K_ROW, K_RP,
                                K_EW, False)
            if K_ASM:
                k0, k1, k2, k3, k4, k5, k6, k7 = _unpack_asm(kraw, K_BITS, K_EW, K_DT)
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
                qj = _pick(j, q0, q1, q2, q3, q4, q5, q6, q7)
                if K_ASM:
                    kop = _pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
                else:
                    kop = _codes_operand(_phase(kint, j, K_BITS, K_PH), CVT_K, OP_DT)
                if K_SLICE_G:
                    sc3, mn3 = _params(wp, pbase + kgrp[:, None] * D + (kb * K_PH + j)[None, :],
                                       kgm)
                    a3 = _operand(qj[None, :, :] * sc3[:, None, :], IEEE, K_DT)
                    corr3 += qj[None, :, :] * mn3[:, None, :]
                    if K_MAGIC != 0.0:
                        corr3 -= K_MAGIC * a3.to(tl.float32)
                    s += _mm(kop, tl.permute(a3, (0, 2, 1)), IEEE, K_DT)
                else:
                    if K_FOLD_CH:
                        sc, mn = _params(wp, pbase + (s0 // G) * D + kb * K_PH + j, kbm)
                        a = _operand(qj * sc[None, :], IEEE, K_DT)
                        corr += qj * mn[None, :]
                        s += _mm(kop, tl.broadcast_to(tl.trans(a)[None, :, :],
                                                      [WT, K_RP, REP_P]), IEEE, K_DT)
                    else:
                        a = _operand(qj, IEEE, MODEL_DTYPE)
                        s += _mm(kop, tl.broadcast_to(tl.trans(a)[None, :, :],
                                                      [WT, K_RP, REP_P]), IEEE, MODEL_DTYPE)
                    if K_MAGIC != 0.0:
                        corr -= K_MAGIC * a.to(tl.float32)
            if K_SLICE_G:
                s = s + tl.sum(corr3, axis=2)[:, None, :]
            else:
                s = s + tl.sum(corr, axis=1)[None, None, :]
            if not K_FOLD_CH:
                sc, mn = _params(wp, pbase + slot3, valid3)
                s = s * sc[:, :, None] + qsum[None, None, :] * mn[:, :, None]
            s = tl.where(valid3[:, :, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m3, tl.max(s, axis=1))
            alpha = tl.exp2(m3 - m_new)
            p = tl.exp2(s - m_new[:, None, :])
            l3 = l3 * alpha + tl.sum(p, axis=1)
            m3 = m_new
            # values as the A operand [WT, V_RP, TS]: o^T = codes^T @ (p * s)^T
            vraw = _load_elems3(cache_ptr, page_off + V_CODES_OFF, slot3, valid3, V_ROW, V_RP,
                                V_EW, True)
            if V_ASM:
                v0, v1, v2, v3, v4, v5, v6, v7 = _unpack_asm(vraw, V_BITS, V_EW, MODEL_DTYPE)
            else:
                vint = vraw.to(tl.int32)
            sc, mn = _params(wp, (page_off + V_PARAMS_OFF) // 4 + slot3, valid3)
            a = _operand(p * sc[:, :, None], IEEE, MODEL_DTYPE)
            # the bias is one number per head: kept apart and added at the end
            vb3 = vb3 * alpha + tl.sum(p * mn[:, :, None] - V_MAGIC * a.to(tl.float32), axis=1)
            for j in tl.static_range(V_PH):
                if V_ASM:
                    vop = _pick(j, v0, v1, v2, v3, v4, v5, v6, v7)
                else:
                    vop = _codes_operand(_phase(vint, j, V_BITS, V_PH), CVT_V, OP_DT)
                pv = _mm(vop, a, IEEE, MODEL_DTYPE)
                b0, b1, b2, b3, b4, b5, b6, b7 = _acc_phase(
                    j, pv, alpha[:, None, :], b0, b1, b2, b3, b4, b5, b6, b7)
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
    else:
        for n0 in range(lo, hi, BLOCK_N):
            valid = n0 + nn < q_old
            blk = tl.load(bt_row + n0 // BS).to(tl.int64)
            page_off = blk * stride_cb + h * stride_ch
            s0 = n0 % BS
            slot = s0 + nn

            # ---- scores q.k of the tile
            s_row = tl.zeros([REP_P], tl.float32)
            if K_BITS == 16:
                k = _load_raw(cache_ptr, page_off + K_CODES_OFF, slot, valid, d, K_ROW, D,
                              MODEL_DTYPE)
                s = _mm(qn, tl.trans(k), IEEE, MODEL_DTYPE) * qk_scale
            else:
                kraw = _load_elems(cache_ptr, page_off + K_CODES_OFF, slot, valid, K_ROW, K_RP,
                                   K_EW)
                if K_ASM:
                    k0, k1, k2, k3, k4, k5, k6, k7 = _unpack_asm(kraw, K_BITS, K_EW, K_DT)
                else:
                    kint = kraw.to(tl.int32)
                pbase = (page_off + K_PARAMS_OFF) // 4
                s = tl.zeros([REP_P, BLOCK_N], tl.float32)
                # per-row constants, summed over channels once after the phases
                corr = tl.zeros([REP_P, K_RP], tl.float32)
                for j in tl.static_range(K_PH):
                    qj = _pick(j, q0, q1, q2, q3, q4, q5, q6, q7)
                    ch = kb * K_PH + j
                    if K_ASM:
                        kop = _pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
                    else:
                        code = _phase(kint, j, K_BITS, K_PH)
                        if K_FOLD_CH or K_FOLD_TOK:
                            kop = _codes_operand(code, CVT_K, OP_DT)
                    if K_FOLD_CH:
                        # q.k = sum_c (q_c s_c) code_c + sum_c q_c m_c: the tile is
                        # inside one key group, so fold its scales into the query
                        sc, mn = _params(wp, pbase + (s0 // G) * D + ch, kbm)
                        # the softmax scale rides on the key scales (a few
                        # numbers a tile), not on every score
                        qs = qj * (sc * qk_scale)[None, :]
                        a = _operand(qs, IEEE, K_DT)
                        s += _mm(a, tl.trans(kop), IEEE, K_DT)
                        if K_SPLIT_FOLD:
                            # the rounding error of q*s as a second operand: a bf16
                            # q*s is off by up to 2^-9 relative, and on a large-scale
                            # (outlier) key channel that moved 2-bit outputs 0.03
                            a_lo = _operand(qs - a.to(tl.float32), IEEE, MODEL_DTYPE)
                            s += _mm(a_lo, tl.trans(kop), IEEE, MODEL_DTYPE)
                            a = a.to(tl.float32) + a_lo.to(tl.float32)  # for the bias below
                        corr += qj * (mn * qk_scale)[None, :]
                        if K_MAGIC != 0.0:
                            corr -= K_MAGIC * a.to(tl.float32)
                    elif K_FOLD_TOK:
                        a = _operand(qj, IEEE, MODEL_DTYPE)
                        s += _mm(a, tl.trans(kop), IEEE, MODEL_DTYPE)
                        if K_MAGIC != 0.0:
                            corr -= K_MAGIC * a.to(tl.float32)
                    else:
                        x = _dequant(code, wp, pbase, slot, valid, ch, kbm, KEY_CHANNEL, G, K_GC,
                                     K_NG, D)
                        s += _mm(qj, tl.trans(x), IEEE, MODEL_DTYPE)
                if K_FOLD_CH:
                    # the per-row constant joins the max and the exponent's
                    # offset instead of every score
                    s_row = tl.sum(corr, axis=1)
                elif K_FOLD_TOK:
                    # q.k_t = s_t (q.code_t) + m_t sum(q)
                    sc, mn = _params(wp, pbase + slot, valid)
                    s = (s + tl.sum(corr, axis=1)[:, None]) * (sc * qk_scale)[None, :] + \
                        qsum[:, None] * (mn * qk_scale)[None, :]
                else:
                    s = s * qk_scale
            p, alpha, m_i, l_i = _softmax_step(s, s_row, valid[None, :], m_i, l_i)

            # ---- p @ V of the tile, per phase
            if V_BITS == 16:
                v = _load_raw(cache_ptr, page_off + V_CODES_OFF, slot, valid, d, V_ROW, D,
                              MODEL_DTYPE)
                acc0 = acc0 * alpha[:, None] + _mm(p, v, IEEE, MODEL_DTYPE)
            else:
                vraw = _load_elems(cache_ptr, page_off + V_CODES_OFF, slot, valid, V_ROW, V_RP,
                                   V_EW)
                if V_ASM:
                    v0, v1, v2, v3, v4, v5, v6, v7 = _unpack_asm(vraw, V_BITS, V_EW, MODEL_DTYPE)
                else:
                    vint = vraw.to(tl.int32)
                pbase = (page_off + V_PARAMS_OFF) // 4
                if V_NG == 1:
                    # sum_t p_t (s_t code_t + m_t) = (p * s) @ code + p.m
                    sc, mn = _params(wp, pbase + slot, valid)
                    a = _operand(p * sc[None, :], IEEE, MODEL_DTYPE)
                    # one number per row: kept apart and added at the end
                    if V_MAGIC != 0.0:
                        vbias = tl.sum(p * mn[None, :] - V_MAGIC * a.to(tl.float32), axis=1)
                    else:
                        vbias = tl.sum(p * mn[None, :], axis=1)
                    vba = vba * alpha + vbias
                for j in tl.static_range(V_PH):
                    if V_ASM:
                        pv = _mm(a, _pick(j, v0, v1, v2, v3, v4, v5, v6, v7), IEEE,
                                 MODEL_DTYPE)
                    elif V_NG == 1:
                        code = _phase(vint, j, V_BITS, V_PH)
                        pv = _mm(a, _codes_operand(code, CVT_V, OP_DT), IEEE,
                                 MODEL_DTYPE)
                    else:
                        code = _phase(vint, j, V_BITS, V_PH)
                        x = _dequant(code, wp, pbase, slot, valid, vb * V_PH + j, vbm, False, 1,
                                     V_GC, V_NG, D)
                        pv = _mm(p, x, IEEE, MODEL_DTYPE)
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _acc_phase(
                        j, pv, alpha[:, None], acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)

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
            k = tl.load(res_ptr + off[:, None] + d[None, :], mask=mk, other=0.0)
            v = tl.load(res_ptr + stride_rkv + off[:, None] + d[None, :], mask=mk, other=0.0)
            k = tl.where(is_new, kn[None, :].to(k.dtype), k)
            v = tl.where(is_new, vn[None, :].to(v.dtype), v)
        else:
            zero = tl.zeros([BLOCK_R, BLOCK_D], MODEL_DTYPE)
            k = tl.where(is_new, kn[None, :], zero)
            v = tl.where(is_new, vn[None, :], zero)
        s = _mm(qn, tl.trans(k), IEEE, MODEL_DTYPE) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, tl.zeros([REP_P], tl.float32),
                                           (pos <= start)[None, :], m_i, l_i)
        vba = vba * alpha
        # the rows are read in channel order (coalesced), then cut into the
        # value phases in registers
        v0, v1, v2, v3, v4, v5, v6, v7 = _split_phases(v, V_PH)
        for j in tl.static_range(V_PH):
            pv = _mm(p, _pick(j, v0, v1, v2, v3, v4, v5, v6, v7), IEEE, MODEL_DTYPE)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _acc_phase(
                j, pv, alpha[:, None], acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)

    # partials are normalised, so the merge needs no separate m and l
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    part = (i64 * (H * REP) + hq) * NUM_SPLITS + sp
    for j in tl.static_range(V_PH):
        out = (_pick(j, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7) + vba[:, None]) / \
            l_safe[:, None]
        ch = vb * V_PH + j
        m = row_ok[:, None] & vbm[None, :]
        if SPLIT:
            tl.store(part_o_ptr + part[:, None] * BLOCK_D + ch[None, :], out, mask=m)
        else:
            tl.store(o_ptr + i64 * stride_ob + hq[:, None] * stride_oh + ch[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=m)
    if SPLIT:
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



@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def code_conversion(bits: int, dtype: torch.dtype, ieee: bool) -> int:
    """How codes become dot operands: 0 exact int->float conversion; 1 the
    fp16 mantissa trick in Triton ops (``_codes_operand``, 1024 + code; fp16
    models or IEEE fp32 dots, i.e. the CPU tests); 3 the mantissa trick in
    inline PTX (``_unpack_asm``; GPU only, the default there: 128 + code for
    bf16, up to 4-bit codes, 1024 + code for fp16)."""
    if ieee or dtype not in (torch.float16, torch.bfloat16) or (
            bits >= 8 and dtype == torch.bfloat16):
        return 0
    return 3


def _magic(cvt: int, dtype: torch.dtype) -> float:
    """The offset the mantissa trick adds to every code."""
    if cvt == 0:
        return 0.0
    if cvt == 1 or (cvt == 3 and dtype == torch.float16):
        return 1024.0
    return 128.0


# How bf16 decode folds per-channel key scales into the query (see
# kvcomp_decode_attention's key_fold).
KEY_FOLD_DEFAULT = "fp16"


# Launch overrides for the serving path (the backend passes them on; the
# benchmarks name their own): KVCOMP_DECODE_LAUNCH, checked at start-up.
DECODE_LAUNCH = parse_decode_launch(os.environ.get(DECODE_LAUNCH_ENV, ""))


# (cfg, block_size, head_size, dtype, rep, device) -> the launch that passed
_CHECKED_LAUNCHES: dict[tuple, dict] = {}


def check_decode_launch(cfg: KvcompConfig, block_size: int, head_size: int,
                        dtype: torch.dtype, rep: int, device: torch.device,
                        launch: dict | None = None, check_on_cpu: bool = False) -> dict:
    """The decode launch to serve with (``launch``, default ``DECODE_LAUNCH``),
    after one comparison on this GPU against ``decode_attention_reference``
    on a small batch of this model's page format and head shape
    (``decode_batch.DecodeBatch``, ``decode_batch.TOL``), with one split and
    with three. CI has no GPU and the interpreter runs only fp32 dots, so the
    16-bit tensor-core paths are otherwise checked only by the device runs of
    the kernel tests; a launch that fails here is replaced by the shared tile
    (``warp_tiles=1``) with a warning, and if that fails too the engine
    refuses to start: never silently wrong output. On CPU the launch is
    returned unchecked (the interpreter tests cover it) unless
    ``check_on_cpu`` (the tests of this check). Milliseconds a config and
    process; call it outside CUDA-graph capture."""
    from vllm_kvcomp.kernels.decode_batch import TOL, DecodeBatch, lens_for

    launch = dict(DECODE_LAUNCH if launch is None else launch)
    device = torch.device(device)
    if device.type != "cuda" and not check_on_cpu:
        return launch
    key = (cfg, block_size, head_size, dtype, rep, str(device), tuple(sorted(launch.items())))
    if key in _CHECKED_LAUNCHES:
        return _CHECKED_LAUNCHES[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "kvcomp: the decode launch must be checked before CUDA-graph capture "
            "(KvcompMetadataBuilder does it); this config was not")
    batch = DecodeBatch(cfg, lens_for(cfg), H=2, D=head_size, rep=rep, dtype=dtype,
                        block_size=block_size, seed=7)
    ref = batch.reference().float()

    def error(kw) -> float:
        worst = 0.0
        for splits in (1, 3):
            out = batch.triton(num_splits=splits, device=device, **kw).float()
            # scaled like assert_close(atol=rtol=tol): <= 1 passes
            err = (out - ref).abs() / (TOL[dtype] * (1 + ref.abs()))
            worst = max(worst, float(err.max()) if torch.isfinite(out).all() else math.inf)
        return worst

    tried = [launch]
    if launch.get("warp_tiles", DEFAULT_LAUNCH["warp_tiles"]) != 1:
        tried.append({**launch, "warp_tiles": 1})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    errors = []
    for kw in tried:
        errors.append(error(kw))
        if errors[-1] <= 1:
            if kw is not launch:
                logging.getLogger("vllm_kvcomp").warning(
                    "kvcomp: the decode launch %s disagrees with the reference on %s "
                    "(%s, head_size %d, %d query heads a KV head; error %.3g of the "
                    "tolerance): serving with the shared tile %s instead",
                    launch, where, dtype, head_size, rep, errors[0], kw)
            _CHECKED_LAUNCHES[key] = kw
            return kw
    raise RuntimeError(
        f"kvcomp: the decode kernel disagrees with its reference on "
        f"{where} for {cfg} ({dtype}, head_size {head_size}, "
        f"{rep} query heads a KV head): launches {tried}, errors {errors} of the tolerance. "
        f"Refusing to serve wrong attention; please report this.")


def decode_tiles(layout: PageLayout, block_n: int = 128, key_group_cap: bool = True) -> int:
    """BLOCK_N of the shared tile: packed tokens per inner step. A power of two
    <= ``block_n`` dividing the block size (tiles never straddle pages) and,
    for per-channel keys, <= group_size (a tile lies in one key group, so its
    scales fold into the query; ``key_group_cap=False`` drops this, see
    ``decode_tiles_and_slices``); at least 16 for ``tl.dot``."""
    cfg = layout.config
    bn = 1 << (max(block_n, 1).bit_length() - 1)
    while layout.block_size % bn:
        bn //= 2
    if key_group_cap and cfg.k_bits < 16 and cfg.key_axis == "channel" and cfg.group_size >= 16:
        bn = min(bn, cfg.group_size)
    if bn < 16:
        raise NotImplementedError(
            f"the Triton decode kernel needs a block size divisible by 16, "
            f"got {layout.block_size}")
    return bn


def decode_warp_tiles(cfg: KvcompConfig, consts: dict, block_n: int, warp_tiles: int) -> int:
    """Warp tiles the packed loop uses: up to ``warp_tiles`` (a power of two)
    slices of at least 16 tokens (the smallest dot) per tile, on the folded
    paths only (both sides quantized, keys per channel with a tile inside one
    group or per token in one channel group, values in one channel group);
    1 (one tile shared by all warps) elsewhere."""
    _check_warp_tiles(warp_tiles)
    warp_tiles = min(warp_tiles, max(1, block_n // 16))
    if warp_tiles == 1:
        return 1
    keys_folded = (block_n <= cfg.group_size if cfg.key_axis == "channel"
                   else consts["K_NG"] == 1)
    if not keys_folded or not _values_fold(cfg, consts):
        return 1
    return warp_tiles


def _check_warp_tiles(warp_tiles: int) -> None:
    if warp_tiles & (warp_tiles - 1) or warp_tiles < 1:
        raise ValueError(f"warp_tiles={warp_tiles}: must be a power of two")


def _values_fold(cfg: KvcompConfig, consts: dict) -> bool:
    """Both sides quantized and a token's values one channel group: what the
    warp-tile loop needs besides keys folded per slice."""
    return cfg.k_bits < 16 and cfg.v_bits < 16 and consts["V_NG"] == 1


# The launch the backend runs with no KVCOMP_DECODE_LAUNCH, where warp tiles
# apply (benchmarks/pick_decode_launch.py compares sweeps against it). The
# shared tile of the quantized configs also ran fastest with 2 warps and 2
# stages in the same sweep; 16-bit pages keep the launch they were tuned with.
DEFAULT_LAUNCH = {"block_n": 128, "num_warps": 2, "num_stages": 2, "warp_tiles": 2}
SIXTEEN_BIT_LAUNCH = {"num_warps": 4, "num_stages": 3}


def decode_tiles_and_slices(layout: PageLayout, consts: dict, block_n: int,
                            warp_tiles: int) -> tuple[int, int]:
    """(BLOCK_N, warp tiles) of the packed loop. Per-channel keys in key groups
    shorter than ``block_n`` (KIVI-2's 32 tokens) cap the shared tile at one
    group, which makes the loop pay its fixed cost per tile 4x as often. Warp
    tiles need only each slice in one group: there the tile widens to
    ``block_n`` with one slice per group at most (more slices than warps: each
    warp takes several), where values fold too (one channel group). Elsewhere
    ``decode_tiles`` and ``decode_warp_tiles``."""
    cfg = layout.config
    _check_warp_tiles(warp_tiles)
    bn = decode_tiles(layout, block_n)
    if warp_tiles > 1 and cfg.key_axis == "channel" and _values_fold(cfg, consts):
        wide = decode_tiles(layout, block_n, key_group_cap=False)
        ts = min(wide // warp_tiles, cfg.group_size)
        if wide > bn and ts >= 16:
            return wide, wide // ts
    return bn, decode_warp_tiles(cfg, consts, bn, warp_tiles)


def decode_warps_stages(cfg: KvcompConfig, num_warps: int | None,
                        num_stages: int | None) -> tuple[int, int]:
    """(num_warps, num_stages): the caller's, else the measured default of
    the config's pages (quantized or 16-bit)."""
    base = SIXTEEN_BIT_LAUNCH if cfg.k_bits == 16 and cfg.v_bits == 16 else DEFAULT_LAUNCH
    if num_warps is None:
        # more slices than warps: each warp takes several (4 slices on 2 or 4
        # warps ran within 5 % of each other, H200, 2026-11-30)
        num_warps = base["num_warps"]
    return num_warps, base["num_stages"] if num_stages is None else num_stages


def decode_num_splits(
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    cfg: KvcompConfig,
    block_n: int,
    num_sms: int = 132,
    programs_per_sm: int = 8,
    min_tiles_per_split: int = 2,
    max_splits: int = 64,
) -> int:
    """Splits per (request, KV head): enough programs to fill the GPU
    (``programs_per_sm`` per SM keeps several tile loads in flight per SM),
    but at least ``min_tiles_per_split`` tiles of work each (packed tiles plus
    the residual window), so the partial writes and the merge stay small next
    to the page reads. Python ints only: the same answer at capture and
    replay of a CUDA graph."""
    packed = cfg.quantized_prefix_len(max(max_seq_len - 1, 0))
    tiles = triton.cdiv(packed, block_n) + triton.cdiv(
        min(cfg.residual_window, max_seq_len) + 1, block_n)
    want = triton.cdiv(programs_per_sm * num_sms, max(1, num_reqs * num_kv_heads))
    cap = triton.cdiv(tiles, min_tiles_per_split)
    return max(1, min(want, cap, max_splits))


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
    """
    assert layout.config == cfg
    B, Hq, D = query.shape
    H = key_new.shape[1]
    assert D == layout.head_size and Hq % H == 0
    assert key_new.shape == (B, H, D) and value_new.shape == (B, H, D)
    assert query.stride(-1) == 1 and key_new.stride(-1) == 1 and value_new.stride(-1) == 1
    assert key_new.dtype == value_new.dtype
    assert key_new.element_size() == layout.model_dtype_bytes
    assert packed_cache.dtype == torch.uint8 and packed_cache.stride(-1) == 1
    assert packed_cache.shape[1] == H and packed_cache.shape[2] == layout.head_page_bytes
    check_alignment(layout, key_new.element_size(), packed_cache)
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.stride(-1) == 1
    if B == 0:
        return out
    has_res = residual_cache is not None
    if cfg.needs_residual_cache:
        assert has_res, "this config keeps a residual window: residual_cache is required"
    if has_res:
        assert residual_cache.stride(-1) == 1 and residual_cache.dtype == key_new.dtype
        res, rs = residual_cache, residual_cache.stride()[:4]
        rbt = residual_block_table
    else:
        res, rs, rbt = key_new, (0, 0, 0, 0), block_table

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
        sms = _num_sms(query.device.index or 0) if query.is_cuda else 132
        num_splits = decode_num_splits(B, H, max_seq_len, cfg, bn, num_sms=sms)
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
        consts[f"{which}_MAGIC"] = _magic(
            consts[f"CVT_{which}"], torch.float16 if which == "K" and fp16_keys else query.dtype)
    num_warps, num_stages = decode_warps_stages(cfg, num_warps, num_stages)
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, block_d, dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    _kvcomp_decode_kernel[(B, H, num_splits)](
        query, query.stride(0), query.stride(1),
        key_new, key_new.stride(0), key_new.stride(1),
        value_new, value_new.stride(0), value_new.stride(1),
        out, out.stride(0), out.stride(1),
        part_o, part_lse,
        packed_cache, packed_cache.stride(0), packed_cache.stride(1),
        res, *rs,
        block_table, block_table.stride(0), rbt, rbt.stride(0),
        seq_lens, float(scale) * math.log2(math.e),
        BS_R=residual_block_size if has_res else 1,
        R=cfg.residual_tokens, ALIGN=cfg.key_token_align, G=cfg.group_size,
        REP=rep, REP_P=rep_p, BLOCK_N=bn, BLOCK_R=br, SPLIT=num_splits > 1,
        HAS_RESIDUAL=has_res, IEEE=ieee, WT=wt,
        K_SPLIT_FOLD=fold == "split", K_FP16_FOLD=fp16_keys,
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
) -> torch.Tensor:
    """The attention half of ``attention_ref.kvcomp_step_reference`` for a
    decode batch (same pieces: ``packing.dequantize_pages``,
    ``gather_residual``, ``attend``); ``max_seq_len``/``num_splits`` are
    ignored. A request with ``seq_lens[i] <= 0`` gets zeros."""
    if out is None:
        out = torch.empty_like(query)
    model_dtype = key_new.dtype
    bs = layout.block_size
    for i, n in enumerate(int(x) for x in seq_lens):
        if n <= 0:
            out[i] = 0
            continue
        start = n - 1
        q_old = cfg.quantized_prefix_len(start)
        parts_k, parts_v = [], []
        if q_old > 0:
            nblk = -(-q_old // bs)
            kp, vp = packing.dequantize_pages(
                packed_cache, layout, block_table[i, :nblk].long(), model_dtype)
            parts_k.append(kp[:q_old])
            parts_v.append(vp[:q_old])
        if start > q_old:
            kr, vr = attention_ref.gather_residual(
                residual_cache, residual_block_table[i], residual_block_size, q_old, start)
            parts_k.append(kr.float())
            parts_v.append(vr.float())
        parts_k.append(key_new[i: i + 1].float())
        parts_v.append(value_new[i: i + 1].float())
        o = attention_ref.attend(query[i: i + 1], torch.cat(parts_k), torch.cat(parts_v),
                                 scale, start)
        out[i] = o[0].to(out.dtype)
    return out


__all__ = [
    "decode_attention_reference",
    "decode_num_splits",
    "decode_tiles",
    "kvcomp_decode_attention",
]
