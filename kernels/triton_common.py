"""Triton pieces the KVCOMP kernels share.

Host side: the page geometry every kernel takes as constexprs
(``layout_constexprs``), the alignment and strides its pointer casts rely
on (``check_alignment``, ``check_kv_inputs``, ``check_decode_inputs``), the
page arguments they take, the residual window's included (``page_args``),
and whether Triton runs under its CPU interpreter (``interpreted``: the
launchers then choose fp32 dots).

Device side (``@triton.jit``, inlined into the kernels that call them): the
decode kernel's work on packed pages without shuffling codes back into
channel order. A packed code row is read as 8- or 16-bit elements holding
``PH`` codes each, and phase j (channels ``PH*w + j``) is a tensor of its own;
the helpers load rows (``load_code_elems*``, ``load_raw_rows``) and fp16
(scale, min) pairs (``load_params``), cut phases out (``phase_codes``,
``split_phases``, ``unpack_asm`` in inline PTX on the GPU), turn codes into
dot operands (``codes_operand``, ``dot_operand``, ``matmul``), and keep the
online softmax and the per-phase accumulators (``softmax_step``,
``accumulate_phase``, ``pick``: Triton has no lists of tensors).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_kvcomp.kernels.packing import residual_torch_dtype
from vllm_kvcomp.layout import PageLayout

# --------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (fp32 dots there: the
    interpreter's bf16 ``tl.dot`` is wrong)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_alignment(layout: PageLayout, es: int, packed_cache: torch.Tensor) -> None:
    """The kernels view pages as fp16 (params) and model dtype (16-bit
    codes) through pointer casts: those byte offsets must be aligned."""
    cfg = layout.config
    raw = cfg.k_bits == 16 or cfg.v_bits == 16
    align = max(2, es) if raw else 2
    offs = [layout.head_page_bytes, packed_cache.stride(0), packed_cache.stride(1),
            layout.k_params_offset, layout.v_params_offset]
    if cfg.k_bits == 16:
        offs += [layout.k_codes_offset, layout.k_code_row_bytes]
    if cfg.v_bits == 16:
        offs += [layout.v_codes_offset, layout.v_code_row_bytes]
    assert all(o % align == 0 for o in offs), (
        f"packed page regions are not {align}-byte aligned: {offs}")


def check_kv_inputs(key: torch.Tensor, value: torch.Tensor, packed_cache: torch.Tensor,
                    layout: PageLayout) -> None:
    """The checks the store, prefill and decode kernels' pointer arithmetic
    relies on: key / value [T, H, D] in the model dtype (channel stride 1,
    any row/head strides), packed_cache uint8 [nb, H, head_page_bytes] with
    aligned regions."""
    assert key.shape[-1] == layout.head_size
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key.dtype == value.dtype and key.element_size() == layout.model_dtype_bytes
    assert packed_cache.dtype == torch.uint8 and packed_cache.stride(-1) == 1
    assert packed_cache.shape[1] == key.shape[1]
    assert packed_cache.shape[2] == layout.head_page_bytes
    check_alignment(layout, key.element_size(), packed_cache)


def check_decode_inputs(query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor,
                        packed_cache: torch.Tensor,
                        layout: PageLayout) -> tuple[int, int, int, int]:
    """(B, Hq, H, D) of a decode batch, after ``check_kv_inputs`` and the
    query's checks: query [B, Hq, D] (channel stride 1), key_new / value_new
    [B, H, D]."""
    B, Hq, D = query.shape
    H = key_new.shape[1]
    assert D == layout.head_size and Hq % H == 0
    assert key_new.shape == (B, H, D) and value_new.shape == (B, H, D)
    assert query.stride(-1) == 1
    check_kv_inputs(key_new, value_new, packed_cache, layout)
    return B, Hq, H, D


def page_args(cfg, packed_cache: torch.Tensor, residual_cache: torch.Tensor | None,
              residual_block_table: torch.Tensor | None, residual_block_size: int,
              block_table: torch.Tensor, fresh_keys: torch.Tensor) -> tuple[tuple, int]:
    """(the pages' kernel arguments, the window's block size ``BS_R``) of
    the store, prefill and decode kernels: the packed cache and its block /
    head strides, the full-precision window and its block, K/V, head and
    token strides, the packed block table and the window's, each with its
    row stride. Without a window the kernels compile its reads out
    (``HAS_RESIDUAL``), so the fresh keys and the packed pages' block table
    fill its slots."""
    if cfg.needs_residual_cache:
        assert residual_cache is not None, (
            "this config keeps a residual window: residual_cache is required")
    if residual_cache is None:
        res, rs, rbt, bs_r = fresh_keys, (0, 0, 0, 0), block_table, 1
    else:
        assert residual_cache.stride(-1) == 1
        assert residual_cache.dtype == residual_torch_dtype(cfg, fresh_keys.dtype), (
            f"residual_dtype={cfg.residual_dtype!r} with {fresh_keys.dtype} K/V: the window "
            f"cannot hold {residual_cache.dtype}")
        res, rs, rbt, bs_r = (residual_cache, residual_cache.stride()[:4], residual_block_table,
                              residual_block_size)
    return (packed_cache, packed_cache.stride(0), packed_cache.stride(1), res, *rs,
            block_table, block_table.stride(0), rbt, rbt.stride(0)), bs_r


def layout_constexprs(layout: PageLayout) -> dict:
    """Compile-time page geometry shared by the store, prefill and decode kernels."""
    cfg = layout.config
    D = layout.head_size
    kr, kc = layout.k_param_shape
    vr, vc = layout.v_param_shape
    key_channel = cfg.k_bits < 16 and cfg.key_axis == "channel"
    return dict(
        D=D,
        BS=layout.block_size,
        K_BITS=cfg.k_bits,
        V_BITS=cfg.v_bits,
        KEY_CHANNEL=key_channel,
        K_GC=(D // kc) if (cfg.k_bits < 16 and not key_channel) else 1,
        K_NG=kc if (cfg.k_bits < 16 and not key_channel) else 1,
        V_GC=(D // vc) if cfg.v_bits < 16 else 1,
        V_NG=vc if cfg.v_bits < 16 else 1,
        K_CODES_OFF=layout.k_codes_offset,
        K_PARAMS_OFF=layout.k_params_offset,
        K_ROW=layout.k_code_row_bytes,
        V_CODES_OFF=layout.v_codes_offset,
        V_PARAMS_OFF=layout.v_params_offset,
        V_ROW=layout.v_code_row_bytes,
        BLOCK_D=triton.next_power_of_2(D),
    )


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def pick(j: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
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
def accumulate_phase(j: tl.constexpr, pv, alpha, a0, a1, a2, a3, a4, a5, a6, a7):
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
def split_phases(x, PH: tl.constexpr):
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
def dot_operand(x, IEEE: tl.constexpr, DT: tl.constexpr):
    """x as a dot operand: fp32 (IEEE dots) or the model dtype."""
    if IEEE:
        return x.to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def matmul(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b with fp32 accumulation; operands in DT (model dtype) or fp32."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def phase_codes(x, j: tl.constexpr, BITS: tl.constexpr, PH: tl.constexpr):
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
def codes_operand(code, CVT: tl.constexpr, DT: tl.constexpr):
    """int32 codes -> dot operand. CVT 0: exact conversion. CVT 1: OR the code
    into the mantissa of fp16 1024.0 (the operand is then ``1024 + code``
    and the caller subtracts ``1024 * sum(other operand)``); the portable
    form of ``unpack_asm``, kept so the CPU tests cover that bookkeeping."""
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
def unpack_asm(x, BITS: tl.constexpr, EW: tl.constexpr, DT: tl.constexpr):
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
def load_code_elems(cache_ptr, row0, slot, valid, ROW: tl.constexpr, RP: tl.constexpr,
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
def load_code_slices(cache_ptr, row0, slot, valid, ROW: tl.constexpr, RP: tl.constexpr,
                     EW: tl.constexpr, KEYS: tl.constexpr):
    """Warp-tile form of ``load_code_elems``: ``slot`` / ``valid`` are [WT, TS];
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
def load_raw_rows(cache_ptr, row0, slot, valid, d, ROW: tl.constexpr, D: tl.constexpr,
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
def load_params(wp, idx, mask):
    """fp32 (scale, min) of the fp16 pairs number ``idx``: each pair is read
    as one 32-bit word (half the loads, and wide enough for Triton to
    pipeline them with asynchronous copies like the codes)."""
    w = tl.load(wp + idx, mask=mask, other=0)
    sc = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    mn = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return sc, mn


@triton.jit
def dequant(code, wp, pbase, slot, valid, ch, chm, PER_CHANNEL: tl.constexpr,
            G: tl.constexpr, GC: tl.constexpr, NG: tl.constexpr, D: tl.constexpr):
    """Fallback ``code * scale + min`` (fp32) of channels ``ch`` for layouts the
    folded dots do not cover (several key groups in a tile, several channel
    groups in a token); params are gathered per element (L1 hits)."""
    if PER_CHANNEL:
        idx = (slot // G)[:, None] * D + ch[None, :]
    else:
        idx = slot[:, None] * NG + (ch // GC)[None, :]
    sc, mn = load_params(wp, pbase + idx, valid[:, None] & chm[None, :])
    return code.to(tl.float32) * sc + mn


@triton.jit
def softmax_step(s, s_row, mask, m_i, l_i):
    """Online-softmax bookkeeping for one tile of base-2 scores
    ``s + s_row[:, None]``."""
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) + s_row)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - (m_new - s_row)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def evicted_walk(hole_ptr, i, end, BLOCK_N: tl.constexpr):
    """Request ``i``'s evicted range ``[ev_lo, ev_hi)`` (``hole_ptr``: int32
    ``[B, 2]``, ``kernels/eviction_gpu.py``) and how a walk of BLOCK_N-token
    tiles over ``[0, end)`` skips it: ``(ev_lo, ev_hi, lo_al, gap, end - gap)``.
    The evicted pages may be other requests' by now, so the tiles run over the
    stored positions only: a tile starting at ``m0 >= lo_al`` (the first tile
    boundary at or past ``ev_lo``) reads from ``m0 + gap``, and the tile
    holding ``ev_lo`` masks its stale rest itself."""
    ev_lo = tl.load(hole_ptr + i * 2)
    ev_hi = tl.load(hole_ptr + i * 2 + 1)
    lo_al = tl.cdiv(ev_lo, BLOCK_N) * BLOCK_N
    gap = tl.maximum(ev_hi - lo_al, 0)
    return ev_lo, ev_hi, lo_al, gap, end - gap
