"""Triton step of a split layer's streaming heads (head map, ``stream_layer``).

For each request ``i`` (``qs, qe = query_start_loc[i], [i + 1]``,
``n = seq_lens[i]``, ``start = n - (qe - qs)``) the query at position ``p``
attends the keys ``j <= p`` with ``j < sink_tokens`` or
``j >= p + 1 - recent_tokens`` (DuoAttention's streaming heads), with GQA
(query head ``kvh * rep + r`` reads KV head ``kvh``). Keys below ``start``
come from the model-dtype stream pages ``[nb, 2, Hs, block_size, D]`` through
the block table, the step's own from the fresh ``key`` / ``value`` rows. Only
the sinks ``[0, min(S, start))`` and the window the program's first query
sees, ``[p0 + 1 - R, start)``, are read from the pages: the manager has given
the others back (their table entries are the null block, or pages now owned
by other requests), and every other position is masked out of the loads, so
nothing of a freed page is read.

Grid ``(num_reqs, cdiv(max_query_len, BLOCK_T), Hs)``: a program takes
``BLOCK_T`` query tokens of one request and all ``rep`` query heads of one
streaming KV head (rows = token x head, padded to a power of two), so each
K/V byte is loaded once per query group; programs past a request's query
length exit at once. Only Python ints size the grid: a decode-only batch has
a grid fixed by its batch size (CUDA-graph safe, no host reads). A program
walks at most sinks + window + its own tokens, whatever the context length,
so decode rows and prefill chunks share the launch.

The same launch stores the fresh K/V at ``slot_mapping`` (slot -1: no page,
e.g. a chunk's middle that no later query reads): the programs' query tokens
are exactly the rows to store, so a second launch per layer and step would
only add its latency. Storing while other programs read is safe because the
writes are positions ``>= start`` of each request and the reads positions
``< start`` of the same request's live pages: distinct addresses (a page given
back this step is read by no one, and a page newly taken by another request
is only read there for positions that request writes in a later step).
``heads`` maps a streaming head to the model's KV head, so ``query`` /
``key`` / ``value`` / ``out`` are the layer's whole tensors, never gathered.

fp32 accumulation and online softmax; fp16/bf16 dots on the tensor cores (fp32
IEEE dots for fp32 models and under ``TRITON_INTERPRET=1``, whose bf16
``tl.dot`` is wrong).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_kvcomp.kernels.triton_common import interpreted, matmul, softmax_step

# --------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------


@triton.jit
def _attend(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, DT: tl.constexpr):
    """Online-softmax update with one K/V tile (log2-unit scores)."""
    s = matmul(q, tl.trans(k), IEEE, DT) * qk_scale
    p, alpha, m_i, l_i = softmax_step(s, tl.zeros_like(m_i), seen, m_i, l_i)
    acc = acc * alpha[:, None] + matmul(p, v, IEEE, DT)
    return m_i, l_i, acc


@triton.jit
def _stream_kernel(
    q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
    o_ptr, stride_ot, stride_oh, heads_ptr,
    cache_ptr, stride_cb, stride_ckv, stride_ch, stride_ct, bt_ptr, stride_bt,
    slot_ptr, qsl_ptr, seq_lens_ptr, qk_scale,
    D: tl.constexpr, BS: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
    REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, STORE: tl.constexpr,
):
    i = tl.program_id(0)
    tile = tl.program_id(1)
    h = tl.program_id(2)
    qs = tl.load(qsl_ptr + i)
    q_len = tl.load(qsl_ptr + i + 1) - qs
    t0 = tile * BLOCK_T
    if t0 >= q_len:
        return
    n = tl.load(seq_lens_ptr + i)
    start = n - q_len
    kvh = tl.load(heads_ptr + h)
    MODEL_DTYPE: tl.constexpr = k_ptr.dtype.element_ty

    ROWS: tl.constexpr = BLOCK_T * REP_P
    r = tl.arange(0, ROWS)
    tq = t0 + r // REP_P
    hr = r % REP_P
    row_ok = (tq < q_len) & (hr < REP)
    qpos = start + tq
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    hq = kvh * REP + hr
    q_off = (qs + tq).to(tl.int64) * stride_qt + hq * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & dm[None, :],
                other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    m_i = tl.full([ROWS], -1.0e30, tl.float32)  # finite: padded rows stay NaN-free
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    nn = tl.arange(0, BLOCK_N)
    t_hi = tl.minimum(q_len, t0 + BLOCK_T)
    p_first = start + t0
    p_last = start + t_hi - 1

    # 1. cached: the sinks, then the window of the first query (live pages only)
    sink_hi = tl.minimum(SINK, start)
    win_lo = tl.maximum(sink_hi, p_first + 1 - RECENT)
    bt_row = bt_ptr + i.to(tl.int64) * stride_bt
    head_off = h * stride_ch
    for part in tl.static_range(2):
        if part == 0:
            lo = 0
            hi = sink_hi
        else:
            lo = win_lo
            hi = start
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + nn
            valid = pos < hi
            blk = tl.load(bt_row + pos // BS, mask=valid, other=0).to(tl.int64)
            off = blk * stride_cb + head_off + (pos % BS) * stride_ct
            mk = valid[:, None] & dm[None, :]
            k = tl.load(cache_ptr + off[:, None] + d[None, :], mask=mk, other=0.0)
            v = tl.load(cache_ptr + stride_ckv + off[:, None] + d[None, :], mask=mk, other=0.0)
            seen = valid[None, :] & ((pos[None, :] < SINK)
                                     | (pos[None, :] >= qpos[:, None] + 1 - RECENT))
            m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE, MODEL_DTYPE)

    # 2. fresh [start, p_last]: its sinks, then the window of the first query
    fs_hi = tl.maximum(start, tl.minimum(SINK, p_last + 1))
    fw_lo = tl.maximum(fs_hi, p_first + 1 - RECENT)
    for part in tl.static_range(2):
        if part == 0:
            lo = start
            hi = fs_hi
        else:
            lo = fw_lo
            hi = p_last + 1
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + nn
            valid = pos < hi
            jt = (qs + pos - start).to(tl.int64)
            mk = valid[:, None] & dm[None, :]
            k = tl.load(k_ptr + (jt * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                        mask=mk, other=0.0)
            v = tl.load(v_ptr + (jt * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                        mask=mk, other=0.0)
            seen = valid[None, :] & (pos[None, :] <= qpos[:, None]) & (
                (pos[None, :] < SINK) | (pos[None, :] >= qpos[:, None] + 1 - RECENT))
            m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, qk_scale, IEEE, MODEL_DTYPE)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = (qs + tq).to(tl.int64) * stride_ot + hq * stride_oh
    tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dm[None, :])

    if STORE:
        # this program's tokens of head h (one row each, not one per query head)
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < q_len
        row = (qs + t).to(tl.int64)
        slot = tl.load(slot_ptr + row, mask=t_ok, other=-1).to(tl.int64)
        keep = (t_ok & (slot >= 0))[:, None] & dm[None, :]
        dst = (slot // BS) * stride_cb + head_off + (slot % BS) * stride_ct
        k = tl.load(k_ptr + (row * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=keep, other=0.0)
        v = tl.load(v_ptr + (row * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=keep, other=0.0)
        tl.store(cache_ptr + dst[:, None] + d[None, :], k.to(cache_ptr.dtype.element_ty),
                 mask=keep)
        tl.store(cache_ptr + stride_ckv + dst[:, None] + d[None, :],
                 v.to(cache_ptr.dtype.element_ty), mask=keep)


# --------------------------------------------------------------------------
# host wrapper
# --------------------------------------------------------------------------


def stream_tiles(num_q_per_kv: int, max_query_len: int, block_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_T, REP_P): query tokens per program and padded GQA group; rows
    stay >= 16 (tensor-core minimum) and ~``block_rows``."""
    rep_p = triton.next_power_of_2(num_q_per_kv)
    bt = max(1, block_rows // rep_p)
    bt = min(bt, triton.next_power_of_2(max(1, max_query_len)))
    return max(bt, triton.cdiv(16, rep_p)), rep_p


def _head_index(heads: torch.Tensor | None, num_kv_heads: int, device) -> torch.Tensor:
    if heads is None:
        return torch.arange(num_kv_heads, dtype=torch.int32, device=device)
    assert heads.dtype == torch.int32 and heads.device == device
    return heads


def stream_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, stream_cache: torch.Tensor,
    block_table: torch.Tensor, slot_mapping: torch.Tensor | None,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, sink_tokens: int,
    recent_tokens: int, scale: float, max_query_len: int, out: torch.Tensor,
    heads: torch.Tensor | None = None, block_rows: int = 64, block_n: int = 32,
    num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """The streaming heads' step (module docstring) for a batch; writes ``out``.

    query / out [T, Hq, D], key / value [T, H, D]: the layer's whole tensors
    (channel stride 1, any row/head strides); ``heads`` int32 [Hs] on the
    device: the KV heads that stream, in the cache's head order (None: all H).
    stream_cache [nb, 2, Hs, block_size, D] in the model dtype (strided view
    allowed), block_table int32 [B, maxb], slot_mapping int64 [>= T] (None:
    no store), query_start_loc int32 [B + 1], seq_lens int32 [B].
    ``max_query_len`` (Python int) bounds every request's query length: it
    sizes the grid."""
    T, Hq, D = query.shape
    H = key.shape[1]
    assert Hq % H == 0 and key.shape[2] == D and out.shape == query.shape
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    assert out.stride(-1) == 1 and stream_cache.stride(-1) == 1
    assert key.dtype == value.dtype == stream_cache.dtype
    nb, two, Hs, bs, Dc = stream_cache.shape
    assert two == 2 and Dc == D
    heads = _head_index(heads, H, key.device)
    assert heads.shape == (Hs,)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or max_query_len <= 0:
        return out
    rep = Hq // H
    ieee = query.dtype == torch.float32 or interpreted()
    block_t, rep_p = stream_tiles(rep, max_query_len, block_rows)
    _stream_kernel[(num_reqs, triton.cdiv(max_query_len, block_t), Hs)](
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1),
        value, value.stride(0), value.stride(1), out, out.stride(0), out.stride(1), heads,
        stream_cache, *stream_cache.stride()[:4], block_table, block_table.stride(0),
        slot_mapping if slot_mapping is not None else seq_lens, query_start_loc, seq_lens,
        float(scale) * math.log2(math.e),
        D=D, BS=bs, SINK=sink_tokens, RECENT=recent_tokens, REP=rep, REP_P=rep_p,
        BLOCK_T=block_t, BLOCK_N=max(16, block_n), BLOCK_D=triton.next_power_of_2(D),
        IEEE=ieee, STORE=slot_mapping is not None, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------


def stream_attention_reference(
    query, key, value, stream_cache, block_table, slot_mapping, query_start_loc, seq_lens,
    sink_tokens, recent_tokens, scale, max_query_len, out, heads=None,
) -> torch.Tensor:
    """``stream_attention`` by ``head_split_ref.stream_step_reference`` on the
    streaming heads' slices (the CPU path's step); the other heads of ``out``
    are left as they are."""
    from vllm_kvcomp.kernels.head_split_ref import stream_step_reference

    T, Hq, D = query.shape
    H = key.shape[1]
    rep = Hq // H
    idx = _head_index(heads, H, key.device).long()
    q = query.view(T, H, rep, D)[:, idx].reshape(T, -1, D)
    o = out.new_empty(q.shape)
    stream_step_reference(q, key[:, idx], value[:, idx], o, stream_cache, block_table,
                          slot_mapping, stream_cache.shape[3], query_start_loc.tolist(),
                          seq_lens.tolist(), sink_tokens, recent_tokens, scale)
    out.view(T, H, rep, D)[:, idx] = o.view(T, -1, rep, D)
    return out


__all__ = ["stream_attention", "stream_attention_reference", "stream_tiles"]
