"""Triton accumulation of H2O / A2SF decode scores: one launch in place of
the torch ops of ``eviction_gpu.add_decode_scores``, which stays beside it
as its PyTorch reference (the same arguments, the same score slots written,
equal to float rounding).

Grid ``(B, H, cdiv(W, BLOCK_T))``: program ``(b, h, tile)`` sums the decode
kernel's probabilities of read indices ``t`` of the tile over KV head
``h``'s query group, maps each ``t`` to its position (past the request's
evicted range ``[lo, hi)``) and that position to its page's score slot,
and writes the new score with masked stores. No two programs write one
slot: a request's read positions are distinct and sit in pages of its own,
and positions at or past its ``seq_len`` (block-table entries past its
pages, or into its freed ones, which may be any page by now) are never
stored to, so no atomics are needed. Shapes and the grid depend on
``(B, H, W)`` only and nothing is read back to the host, so a captured
CUDA graph can hold the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.layout import PageLayout

BLOCK_T = 512  # read indices a program covers


@triton.jit
def _kvcomp_decode_scores_kernel(
    probs_ptr, stride_pb, stride_ph, stride_pt,
    cache_ptr, stride_cb, stride_ch,
    table_ptr, stride_tb, stride_tp,
    lens_ptr, ev_ptr, stride_eb, stride_ee,
    lse_ptr, stride_lb,
    W, decay,
    BS: tl.constexpr, REP: tl.constexpr, SCORES_OFF: tl.constexpr,
    HAS_EV: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(lens_ptr + b).to(tl.int64)
    pos = t.to(tl.int64)
    if HAS_EV:
        lo = tl.load(ev_ptr + b * stride_eb).to(tl.int64)
        hi = tl.load(ev_ptr + b * stride_eb + stride_ee).to(tl.int64)
        pos = tl.where(pos >= lo, pos + (hi - lo), pos)
    # only the request's own positions: indices past what it read hold
    # nothing, and their pages may be another request's
    read = (t < W) & (pos < n)
    p_row = probs_ptr + b.to(tl.int64) * stride_pb + (h * REP).to(tl.int64) * stride_ph
    step = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(REP):
        if HAS_LSE:  # base-2 logits: normalised here, positions not read give exp2(-inf)
            lg = tl.load(p_row + r * stride_ph + t * stride_pt, mask=read, other=float("-inf"))
            step += tl.exp2(lg - tl.load(lse_ptr + b.to(tl.int64) * stride_lb + h * REP + r))
        else:
            step += tl.load(p_row + r * stride_ph + t * stride_pt, mask=read, other=0.0)
    blk = tl.load(table_ptr + b.to(tl.int64) * stride_tb + (pos // BS) * stride_tp,
                  mask=read, other=0).to(tl.int64)
    off = blk * stride_cb + h.to(tl.int64) * stride_ch + SCORES_OFF + (pos % BS) * 4
    sp = cache_ptr.to(tl.pointer_type(tl.float32)) + off // 4
    old = tl.load(sp, mask=read & (pos != n - 1), other=0.0)
    # the request's newest position starts from nothing (its slot may hold a
    # previous owner's score)
    new = tl.where(pos == n - 1, step, old * decay + step)
    tl.store(sp, new, mask=read)


def triton_add_decode_scores(probs: torch.Tensor, packed_cache: torch.Tensor,
                             layout: PageLayout, cfg: KvcompConfig, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, evicted: torch.Tensor | None,
                             block_t: int = BLOCK_T, num_warps: int = 4,
                             lse: torch.Tensor | None = None) -> None:
    """``eviction_gpu.add_decode_scores`` (its PyTorch reference: the same
    arguments and semantics) in one launch, without a host sync: ``probs``
    ``[B, Hq, W]`` over the positions each request read (``[0, seq_len)``
    less its ``evicted`` range ``[B, 2]``, in order) summed over each KV
    head's query group into those positions' score slots, the request's
    newest position from nothing and the others' scores first multiplied by
    the policy's decay (1 under H2O). ``block_t``: read indices a program
    covers (a power of two). ``lse``: fp32 ``[B, Hq]``; given, ``probs``
    holds base-2 logits (the decode kernel's with ``probs_lse``), each
    normalised here as ``exp2(logit - lse)``."""
    B, Hq, W = probs.shape
    if B == 0 or W == 0:
        return
    H = packed_cache.shape[1]
    assert Hq % H == 0, (Hq, H)
    assert layout.has_scores
    assert probs.dtype == torch.float32
    assert packed_cache.dtype == torch.uint8 and packed_cache.stride(-1) == 1
    assert packed_cache.shape[2] == layout.head_page_bytes
    # the score slots are read and written through an fp32 pointer
    assert packed_cache.stride(0) % 4 == 0 and packed_cache.stride(1) % 4 == 0
    assert layout.scores_offset % 4 == 0
    assert seq_lens.stride(0) == 1
    assert lse is None or (lse.shape == (B, Hq) and lse.stride(1) == 1
                           and lse.dtype == torch.float32)
    bs = layout.block_size
    decay = float(cfg.eviction.policy(bs).decay)
    ev = evicted if evicted is not None else seq_lens  # not read without HAS_EV
    ev_strides = (evicted.stride(0), evicted.stride(1)) if evicted is not None else (0, 0)
    grid = (B, H, triton.cdiv(W, block_t))
    _kvcomp_decode_scores_kernel[grid](
        probs, probs.stride(0), probs.stride(1), probs.stride(2),
        packed_cache, packed_cache.stride(0), packed_cache.stride(1),
        block_table, block_table.stride(0), block_table.stride(1),
        seq_lens, ev, *ev_strides,
        lse if lse is not None else seq_lens, lse.stride(0) if lse is not None else 0,
        W, decay,
        BS=bs, REP=Hq // H, SCORES_OFF=layout.scores_offset,
        HAS_EV=evicted is not None, HAS_LSE=lse is not None, BLOCK=block_t,
        num_warps=num_warps,
    )


__all__ = ["BLOCK_T", "triton_add_decode_scores"]
