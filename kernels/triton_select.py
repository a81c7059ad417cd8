"""Triton selection of H2O / A2SF's kept tokens for a batch of eviction steps:
one program per (request, KV head) finds the ``k1`` best-scoring of its
candidates and writes their positions, ascending, for the compaction
(``triton_compaction.triton_compact_batch``). ``h2o_ref.select_and_compact``
is its PyTorch reference (a stable sort of every row's padded candidates:
the same kept positions).

Why not a sort: in a captured decode step every row of the batch goes
through the selection, although a row evicts once a page of its steps; a
program whose request keeps nothing returns after one load, so the step's
selection costs what its evicting rows need. A program that selects holds
its ``C`` candidates' scores in registers and finds the ``k1``-th largest
by a binary search on their order-preserving integer keys (32 counting
passes over registers, no memory traffic), then keeps every score above
it and, of the scores equal to it, the latest ones (an equal score evicts
the earlier token, ``policies.h2o.H2O.evict``), and writes the kept
positions in order through a prefix sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcomp.kernels.h2o_ref import decode_rows_candidates
from vllm_kvcomp.layout import PageLayout

# the most candidates a launch holds: its block (the next power of two) compiles in
# about a second for sm_90 and fits a captured H2O 2048 step's 2,304 candidates; a
# prompt's last chunk can bring its whole length, whose block would take minutes to
# compile and spill its registers, so larger selections are sorted
MAX_CANDIDATES = 4096


@triton.jit
def _order_key(s):
    """int64 keys ordered as the fp32 scores ``s`` (finite): the bits of a
    non-negative float, the magnitude bits flipped for a negative one; -0.0
    first made +0.0, the key of an equal score (as a sort compares them)."""
    i = (s + 0.0).to(tl.int32, bitcast=True)
    return tl.where(i >= 0, i, i ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _kvcomp_select_kernel(
    cache_ptr, stride_cb, stride_ch, table_ptr, stride_tb,
    k0_ptr, e0_ptr, count_ptr, k1_ptr, kept_ptr, stride_kb, stride_kh,
    BS: tl.constexpr, SCORES_OFF: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    k = tl.load(k1_ptr + r).to(tl.int64)
    if k > 0:
        _select_row(cache_ptr, stride_cb, stride_ch, table_ptr, stride_tb, kept_ptr, stride_kb,
                    stride_kh, r, h, tl.load(k0_ptr + r).to(tl.int64),
                    tl.load(e0_ptr + r).to(tl.int64), tl.load(count_ptr + r).to(tl.int64), k,
                    BS, SCORES_OFF, BLOCK_C)


@triton.jit
def _scored_layout(n, P, RECENT: tl.constexpr, RESIDUAL: tl.constexpr, ALIGN: tl.constexpr,
                   BS: tl.constexpr, HEAVY: tl.constexpr):
    """``eviction_gpu.scored_layout``: ``(K, E)`` after ``n`` tokens of a
    request with prompt ``P`` (int64 scalars)."""
    q = tl.maximum(n - RESIDUAL, 0) // ALIGN * ALIGN
    e = tl.maximum(tl.minimum(n - RECENT, q), 0) // BS * BS
    e = tl.where(n >= P, e, 0)
    return tl.minimum(e, HEAVY), e


@triton.jit
def _kvcomp_select_rows_kernel(
    cache_ptr, stride_cb, stride_ch, table_ptr, stride_tb, seq_ptr, prompt_ptr,
    counts_ptr, kept_ptr, stride_kb, stride_kh,
    RECENT: tl.constexpr, RESIDUAL: tl.constexpr, ALIGN: tl.constexpr, HEAVY: tl.constexpr,
    BS: tl.constexpr, SCORES_OFF: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``_kvcomp_select_kernel`` for a batch of one-token steps, each row's
    step worked out here from its length and prompt length (what
    ``eviction_gpu.evict_decode_rows`` computes with elementwise torch ops):
    the row's kept count goes to ``counts`` for the compaction."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    n = tl.load(seq_ptr + r).to(tl.int64)
    P = tl.load(prompt_ptr + r).to(tl.int64)
    k0, e0 = _scored_layout(n - 1, P, RECENT, RESIDUAL, ALIGN, BS, HEAVY)
    k1, e1 = _scored_layout(n, P, RECENT, RESIDUAL, ALIGN, BS, HEAVY)
    count = k0 + tl.maximum(e1 - e0, 0)
    # h2o_ref.moves_nothing
    still = ((k1 == k0) & (e1 == e0)) | ((count == k1) & ((e1 <= e0) | (e0 == k0)))
    k = tl.where(still | (n - 1 < P) | (n <= 0), 0, k1)
    if h == 0:
        tl.store(counts_ptr + r, k)
    if k > 0:
        _select_row(cache_ptr, stride_cb, stride_ch, table_ptr, stride_tb, kept_ptr, stride_kb,
                    stride_kh, r, h, k0, e0, count, k, BS, SCORES_OFF, BLOCK_C)


@triton.jit
def _select_row(cache_ptr, stride_cb, stride_ch, table_ptr, stride_tb, kept_ptr, stride_kb,
                stride_kh, r, h, k0, e0, count, k,
                BS: tl.constexpr, SCORES_OFF: tl.constexpr, BLOCK_C: tl.constexpr):
    """Request ``r``, KV head ``h``: the positions of its ``k`` best of the
    ``count`` candidates ``[0, k0)`` then ``[e0, ...)``, ascending, to
    ``kept[r, h, :k]``."""
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    real = c < count
    pos = tl.where(c < k0, c, c - k0 + e0)
    blk = tl.load(table_ptr + r * stride_tb + pos // BS, mask=real, other=0).to(tl.int64)
    sp = cache_ptr.to(tl.pointer_type(tl.float32)) + (
        blk * stride_cb + h * stride_ch + SCORES_OFF + (pos % BS) * 4) // 4
    key = _order_key(tl.load(sp, mask=real, other=0.0))
    key = tl.where(real, key, -(1 << 40))  # below every real key
    # the largest t with at least k keys >= t: the k-th largest key
    lo = tl.full([], -(1 << 31), tl.int64)
    hi = tl.full([], (1 << 31) - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        enough = tl.sum((key >= mid).to(tl.int64), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo
    tie = key == lo
    need = k - tl.sum(above.to(tl.int64), axis=0)
    # of the ties, the latest ``need``: count each one's ties at or after it
    from_end = tl.cumsum(tie.to(tl.int64), axis=0, reverse=True)
    keep = above | (tie & (from_end <= need))
    slot = tl.cumsum(keep.to(tl.int64), axis=0) - 1
    tl.store(kept_ptr + r * stride_kb + h * stride_kh + slot, pos, mask=keep)


def _check_pages(packed_cache: torch.Tensor, layout: PageLayout) -> None:
    # the scores are read as fp32 words of the byte pages
    assert layout.has_scores and layout.scores_offset % 4 == 0
    assert packed_cache.dtype == torch.uint8 and packed_cache.stride(-1) == 1
    assert packed_cache.stride(0) % 4 == 0 and packed_cache.stride(1) % 4 == 0


def _num_warps(block_c: int) -> int:
    return min(16, max(4, block_c // 256))


def triton_select_and_compact(packed_cache: torch.Tensor, layout: PageLayout,
                              block_rows: torch.Tensor, k0: torch.Tensor, e0: torch.Tensor,
                              count: torch.Tensor, k1: torch.Tensor, C: int,
                              kmax: int) -> None:
    """``h2o_ref.select_and_compact`` (the same arguments, the same bytes
    written) with the selection by one Triton launch: requests ``block_rows``
    (``[R, NB]``), device tensors ``[R, 1]``: candidates ``[0, k0)`` then
    ``[e0, ...)``, ``count`` of them (at most ``C``); each KV head keeps its
    ``k1`` best (at most ``kmax``), moved to ``[0, k1)``; a request with
    ``k1`` 0 is left as it is. Scores must be finite. No host sync.
    More than ``MAX_CANDIDATES`` candidates: the reference's sort."""
    from vllm_kvcomp.kernels.triton_compaction import triton_compact_batch

    if C > MAX_CANDIDATES:
        from vllm_kvcomp.kernels.h2o_ref import select_and_compact

        return select_and_compact(packed_cache, layout, block_rows, k0, e0, count, k1, C, kmax)
    R = block_rows.shape[0]
    H = packed_cache.shape[1]
    if R == 0 or kmax == 0:
        return
    _check_pages(packed_cache, layout)
    dev = packed_cache.device
    rows = block_rows.to(dev).contiguous()
    assert rows.stride(1) == 1
    k0, e0, count, k1 = (x.reshape(R).to(dev).contiguous() for x in (k0, e0, count, k1))
    kept = torch.empty(R, H, kmax, dtype=torch.int64, device=dev)
    block_c = triton.next_power_of_2(max(C, 16))
    _kvcomp_select_kernel[(R, H)](
        packed_cache, packed_cache.stride(0), packed_cache.stride(1), rows, rows.stride(0),
        k0, e0, count, k1, kept, kept.stride(0), kept.stride(1),
        BS=layout.block_size, SCORES_OFF=layout.scores_offset, BLOCK_C=block_c,
        num_warps=_num_warps(block_c),
    )
    triton_compact_batch(packed_cache, layout, rows, kept, k1)


def triton_select_decode_rows(packed_cache: torch.Tensor, layout: PageLayout, cfg,
                              block_table: torch.Tensor, seq_lens: torch.Tensor,
                              prompt_lens: torch.Tensor) -> None:
    """``eviction_gpu.evict_decode_rows`` (the same arguments, the same bytes
    written) with each row's step worked out inside the selection launch:
    two launches (selection, compaction) where the torch ops that find the
    rows' layouts are about fifty small launches a layer. No host sync. The
    config's candidate bound must be at most ``MAX_CANDIDATES``."""
    from vllm_kvcomp.kernels.triton_compaction import triton_compact_batch

    R = seq_lens.shape[0]
    H = packed_cache.shape[1]
    bs = layout.block_size
    policy = cfg.eviction.policy(bs)
    kmax = policy.heavy_tokens
    if R == 0 or kmax == 0:
        return
    _check_pages(packed_cache, layout)
    dev = packed_cache.device
    rows = block_table[:R].to(dev).contiguous()
    seq_lens, prompt_lens = seq_lens.to(dev), prompt_lens[:R].to(dev)
    counts = torch.empty(R, dtype=torch.int64, device=dev)
    kept = torch.empty(R, H, kmax, dtype=torch.int64, device=dev)
    C = decode_rows_candidates(cfg, bs)
    assert C <= MAX_CANDIDATES, C
    block_c = triton.next_power_of_2(max(C, 16))
    _kvcomp_select_rows_kernel[(R, H)](
        packed_cache, packed_cache.stride(0), packed_cache.stride(1), rows, rows.stride(0),
        seq_lens, prompt_lens, counts, kept, kept.stride(0), kept.stride(1),
        RECENT=policy.rule.recent_tokens, RESIDUAL=cfg.residual_tokens,
        ALIGN=cfg.key_token_align, HEAVY=kmax, BS=bs, SCORES_OFF=layout.scores_offset,
        BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )
    triton_compact_batch(packed_cache, layout, rows, kept, counts)


__all__ = ["MAX_CANDIDATES", "triton_select_and_compact", "triton_select_decode_rows"]
