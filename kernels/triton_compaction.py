"""Triton compaction: each KV head's kept tokens moved to the front of a
request's packed pages in one launch; ``compaction.compact_kept`` is its
PyTorch reference (the same arguments, the same bytes written).

Grid ``(H, parts, requests)``: program ``(h, part, r)`` owns, for request
``r``'s KV head ``h``, a set of byte columns of every token's row that no
other program reads or writes:

* per-channel keys (``compaction.keys_regrouped``): a channel slice of
  ``KCB`` code bytes (and those channels' (scale, min) pairs), as the store
  kernel cuts a key group. Group ``n`` of kept keys (kept indices ``[nG,
  (n + 1)G)``, the last group padded with copies of the last kept key) is
  dequantized from its source groups and quantized again by the store
  kernel's own code (``triton_store._store_region``: the same rounding as
  ``packing.quantize_lastdim``), codes of the pad slots included;
* every other region (value codes, value params, per-token or 16-bit key
  codes and params, H2O / A2SF score slots): one part each, rows copied as
  32-bit words (every region offset and row of a layout is 4-byte aligned,
  ``_copy_words``), ``T`` tokens a step.

Why reading and writing in place is correct: kept positions are ascending
and distinct, so kept index ``j`` reads position ``kept[j] >= j`` and writes
position ``j``. A program walks its tiles of kept indices in order; tile
``[j0, j0 + T)`` reads positions ``>= j0`` and writes ``[j0, j0 + T)``, so
no later tile reads what an earlier one wrote (positions below ``j0 + T``
are read by indices below ``j0 + T`` only), and the positions a tile reads
and writes itself are all loaded, then a barrier, then stored. For key
groups the same holds of the group's (scale, min) row: tile ``n`` reads the
rows of the source groups of positions ``>= nG`` and writes row ``n``. Work
across programs never shares a byte, so no order between programs is
needed; a prefetch of a later tile's loads (Triton's pipelining) reads
positions no earlier tile writes. Tiles split across programs along the
tokens would not be correct without a second pass: a tile's sources can be
a later tile's destinations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcomp.kernels.compaction import keys_regrouped
from vllm_kvcomp.kernels.triton_common import layout_constexprs, load_params
from vllm_kvcomp.kernels.triton_store import _store_region, key_slices
from vllm_kvcomp.layout import PARAM_BYTES, SCORE_BYTES, PageLayout

SUB_ELEMS = 4096  # elements a program holds per tile (a key slice's, a copy tile's words)


@triton.constexpr_function
def _pow2_at_least(n):
    return triton.next_power_of_2(n)


@triton.constexpr_function
def _copy_tile(words, sub_elems):
    """Tokens a copy step moves: ``sub_elems`` words, at most 256 rows."""
    return max(1, min(256, sub_elems // triton.next_power_of_2(words)))


def copy_regions(layout: PageLayout) -> list[tuple[int, int]]:
    """(offset, row bytes) of the regions whose rows move byte for byte."""
    cfg = layout.config
    out = []
    if not keys_regrouped(layout):
        out.append((layout.k_codes_offset, layout.k_code_row_bytes))
        if cfg.k_bits < 16:
            out.append((layout.k_params_offset, layout.k_param_shape[1] * PARAM_BYTES))
    out.append((layout.v_codes_offset, layout.v_code_row_bytes))
    if cfg.v_bits < 16:
        out.append((layout.v_params_offset, layout.v_param_shape[1] * PARAM_BYTES))
    if layout.has_scores:
        out.append((layout.scores_offset, SCORE_BYTES))
    return out


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------


@triton.jit
def _copy_words(cache_ptr, stride_cb, stride_ch, row_ptr, kept_row, h, k,
                OFF: tl.constexpr, ROW: tl.constexpr, BS: tl.constexpr,
                SUB: tl.constexpr):
    """Rows of ``ROW`` bytes at ``OFF + slot * ROW`` of head ``h``'s pages:
    the row of position ``kept_row[j]`` to position ``j``, ``j < k``, tiles
    in order, each loaded whole before it is stored (module docstring)."""
    NE: tl.constexpr = ROW // 4
    RP: tl.constexpr = _pow2_at_least(NE)
    T: tl.constexpr = _copy_tile(NE, SUB)
    wp = cache_ptr.to(tl.pointer_type(tl.int32))
    e = tl.arange(0, RP)
    t = tl.arange(0, T)
    head = h.to(tl.int64) * stride_ch
    for j0 in range(0, k, T):
        j = j0 + t
        ok = j < k
        src = tl.load(kept_row + j, mask=ok, other=0).to(tl.int64)
        sb = tl.load(row_ptr + src // BS, mask=ok, other=0).to(tl.int64)
        s_off = (sb * stride_cb + head + OFF + (src % BS) * ROW) // 4
        m = ok[:, None] & (e < NE)[None, :]
        x = tl.load(wp + s_off[:, None] + e[None, :], mask=m, other=0)
        tl.debug_barrier()  # the tile's sources are read before any is overwritten
        db = tl.load(row_ptr + j // BS, mask=ok, other=0).to(tl.int64)
        d_off = (db * stride_cb + head + OFF + (j % BS) * ROW) // 4
        tl.store(wp + d_off[:, None] + e[None, :], x, mask=m)


@triton.jit
def _regroup_keys(cache_ptr, stride_cb, stride_ch, row_ptr, kept_row, h, k, cb,
                  D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
                  K_BITS: tl.constexpr, K_CODES_OFF: tl.constexpr,
                  K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr, K_GC: tl.constexpr,
                  K_NG: tl.constexpr, KCB: tl.constexpr):
    """Channel slice ``cb`` (code bytes ``[cb * KCB, (cb + 1) * KCB)``) of
    the kept keys, group by group: dequantized as stored, quantized again as
    new groups of ``G`` kept keys, the last padded with its last key."""
    KPB: tl.constexpr = 8 // K_BITS
    QMAX: tl.constexpr = (1 << K_BITS) - 1
    kj = cb * KCB + tl.arange(0, KCB)
    kc = tl.arange(0, KPB)
    kd = kj[:, None] * KPB + kc[None, :]
    kdm = kd < D
    u = tl.arange(0, G)
    full = u < G
    head = h.to(tl.int64) * stride_ch
    wp = cache_ptr.to(tl.pointer_type(tl.int32))
    for j0 in range(0, k, G):
        src = tl.load(kept_row + tl.minimum(j0 + u, k - 1)).to(tl.int64)
        s_page = tl.load(row_ptr + src // BS).to(tl.int64) * stride_cb + head
        s_slot = src % BS
        b = tl.load(cache_ptr + (s_page + K_CODES_OFF + s_slot * K_ROW)[:, None] + kj[None, :],
                    mask=(kj < K_ROW)[None, :], other=0)
        code = (b.to(tl.int32)[:, :, None] >> (kc * K_BITS)[None, None, :]) & QMAX
        p_idx = ((s_page + K_PARAMS_OFF) // 4 + (s_slot // G) * D)[:, None, None] + kd[None, :, :]
        sc, mn = load_params(wp, p_idx, kdm[None, :, :])
        x = code.to(tl.float32) * sc + mn
        tl.debug_barrier()  # the group's sources are read before any is overwritten
        dst = j0 + u
        d_page = tl.load(row_ptr + dst // BS).to(tl.int64) * stride_cb + head
        _store_region(cache_ptr, d_page, dst % BS, x, full, kj, kc, kdm,
                      K_BITS, K_CODES_OFF, K_PARAMS_OFF, K_ROW, True, K_GC, K_NG, D, KPB, KCB)


# --------------------------------------------------------------------------
# the kernel: several requests in one launch
# --------------------------------------------------------------------------


@triton.jit
def _kvcomp_compact_kernel(
    cache_ptr, stride_cb, stride_ch, rows_ptr, stride_rr, kept_ptr, stride_kr, stride_kh,
    counts_ptr,
    D: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    KEY_CHANNEL: tl.constexpr, K_GC: tl.constexpr, K_NG: tl.constexpr,
    V_GC: tl.constexpr, V_NG: tl.constexpr,
    K_CODES_OFF: tl.constexpr, K_PARAMS_OFF: tl.constexpr, K_ROW: tl.constexpr,
    V_CODES_OFF: tl.constexpr, V_PARAMS_OFF: tl.constexpr, V_ROW: tl.constexpr,
    BLOCK_D: tl.constexpr, G: tl.constexpr, KCB: tl.constexpr, N_KP: tl.constexpr,
    COPIES: tl.constexpr, SUB: tl.constexpr,
):
    """Program ``(h, part, r)``: request ``r``'s (its own block-table row,
    kept positions and kept count) KV head ``h``, part ``part``: parts
    ``[0, N_KP)`` are key channel slices, then one part per copied region,
    ``COPIES[c]`` its (offset, row bytes). Requests hold their own pages, so
    programs of different requests share no byte either."""
    h = tl.program_id(0)
    part = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    row_ptr = rows_ptr + r * stride_rr
    kept_row = kept_ptr + r * stride_kr + h.to(tl.int64) * stride_kh
    k = tl.load(counts_ptr + r).to(tl.int32)
    if KEY_CHANNEL:
        if part < N_KP:
            _regroup_keys(cache_ptr, stride_cb, stride_ch, row_ptr, kept_row, h, k, part,
                          D, BS, G, K_BITS, K_CODES_OFF, K_PARAMS_OFF, K_ROW, K_GC, K_NG, KCB)
    for c in tl.static_range(len(COPIES)):
        if part == N_KP + c:
            _copy_words(cache_ptr, stride_cb, stride_ch, row_ptr, kept_row, h, k,
                        COPIES[c][0], COPIES[c][1], BS, SUB)


def triton_compact_batch(cache: torch.Tensor, layout: PageLayout, block_rows: torch.Tensor,
                         kept: torch.Tensor, counts: torch.Tensor,
                         sub_elems: int = SUB_ELEMS, num_warps: int = 4) -> None:
    """The compaction of several requests in one launch: request ``r``
    (``block_rows[r]``, ``[R, NB]``) keeps, for each KV head ``h``, its
    ``counts[r]`` positions ``kept[r, h, :counts[r]]`` (``[R, H, kmax]``,
    ascending; the entries past the count are not read; a count of 0 leaves
    the request as it is). Writes the bytes ``compaction.compact_kept``
    writes request by request, without a host sync."""
    R, H, kmax = kept.shape
    if R == 0 or kmax == 0:
        return
    assert cache.dtype == torch.uint8 and cache.stride(-1) == 1
    assert cache.shape[1] == H and cache.shape[2] == layout.head_page_bytes
    # the word copies and (scale, min) words need 4-byte aligned page rows
    assert cache.stride(0) % 4 == 0 and cache.stride(1) % 4 == 0
    regions = copy_regions(layout)
    assert all(off % 4 == 0 and row % 4 == 0 for off, row in regions), regions
    dev = cache.device
    kept = kept.to(dev).contiguous()
    rows = block_rows.to(dev).contiguous()
    counts = counts.to(dev).contiguous()
    regroup = keys_regrouped(layout)
    kcb, n_kp = key_slices(layout, sub_elems) if regroup else (1, 0)
    grid = (H, n_kp + len(regions), R)
    _kvcomp_compact_kernel[grid](
        cache, cache.stride(0), cache.stride(1), rows, rows.stride(0), kept, kept.stride(0),
        kept.stride(1), counts,
        G=layout.config.group_size, KCB=kcb, N_KP=n_kp, COPIES=tuple(regions), SUB=sub_elems,
        num_warps=num_warps, **layout_constexprs(layout),
    )


# --------------------------------------------------------------------------
# one request
# --------------------------------------------------------------------------


def triton_compact(cache: torch.Tensor, layout: PageLayout, block_row: torch.Tensor,
                   kept: torch.Tensor, model_dtype: torch.dtype | None = None,
                   sub_elems: int = SUB_ELEMS, num_warps: int = 4) -> None:
    """``compaction.compact_kept`` in one launch, without a host sync: for
    each KV head ``h``, the tokens at positions ``kept[h]`` (``[H, k]``,
    ascending) of the pages in ``block_row`` moved to positions ``[0, k)``
    (``triton_compact_batch`` for one request). ``model_dtype`` is not read:
    16-bit rows move as bytes. ``sub_elems`` (a power of two) bounds the
    elements a program holds per tile."""
    H, k = kept.shape
    if k == 0:
        return
    count = torch.full((1,), k, dtype=torch.int32, device=cache.device)
    triton_compact_batch(cache, layout, block_row[None], kept[None], count, sub_elems,
                         num_warps)


__all__ = ["copy_regions", "key_slices", "triton_compact", "triton_compact_batch"]
