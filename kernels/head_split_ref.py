"""Reference (PyTorch) attention of a layer whose KV heads a head map splits.

DuoAttention's mixed attention (Xiao et al. 2024): retrieval heads attend the
whole context causally, streaming heads only the first ``sink_tokens`` and the
last ``recent_tokens`` tokens up to the query (its own included), as
``policies.attention.window_mask``. Query heads follow their KV head (GQA).

The retrieval heads are the layer's ordinary compressed cache
(``attention_ref.kvcomp_step_reference`` on their heads); the streaming heads'
K/V are unquantized in pages of their own (``stream_layer``), of which a step
reads only the sinks and the window its first query still sees: the manager
may have given the other pages back, and the step's own tokens are attended
from the fresh K/V. Head indices are permuted here, per layer; the weights
are untouched.

This is the CPU implementation (and the oracle for any future kernel).
"""

from __future__ import annotations

import torch

from vllm_kvcomp.kernels.attention_ref import (
    BatchView,
    attend_split,
    gather_residual,
    kvcomp_step_reference,
    step_requests,
)
from vllm_kvcomp.kernels.packing import round_to_window


def stream_step_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
    stream_cache: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor | None,
    block_size: int, query_start_loc: list[int], seq_lens: list[int], sink_tokens: int,
    recent_tokens: int, scale: float,
) -> None:
    """Streaming heads' step for a batch: attention (module docstring) over
    the cached sinks + window and the fresh tokens, then the fresh K/V written
    at ``slot_mapping`` (pages ``[nb, 2, H, block_size, D]``)."""
    S, R = sink_tokens, recent_tokens
    H, D = key.shape[1], key.shape[2]
    for i, qs, qe, n, start in step_requests(query_start_loc, seq_lens):
        row = block_table[i]
        sink_hi = min(S, start)
        recent_lo = max(sink_hi, start + 1 - R)
        ks, vs = [], []
        for lo, hi in ((0, sink_hi), (recent_lo, start)):
            if hi > lo:
                k, v = gather_residual(stream_cache, row, block_size, lo, hi)
                ks.append(k.to(key.dtype))
                vs.append(v.to(value.dtype))
        ks.append(key[qs:qe])
        vs.append(value[qs:qe])
        dev = key.device
        pos = torch.cat([torch.arange(0, sink_hi, device=dev),
                         torch.arange(recent_lo, n, device=dev)])
        qpos = torch.arange(start, n)
        # query p sees keys up to p, minus [S, p + 1 - R): sinks and its window
        dropped = torch.stack([torch.full_like(qpos, S),
                               torch.clamp(qpos + 1 - R, min=S)], dim=1)
        empty = key.new_zeros(0, H, D)
        out = attend_split(query[qs:qe], start, torch.cat(ks), torch.cat(vs), empty, empty, n,
                           qpos + 1, scale, pos, dropped)
        output[qs:qe] = out.to(output.dtype)
    if slot_mapping is not None:
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0
        if bool(keep.any()):
            b, o = slots[keep] // block_size, slots[keep] % block_size
            stream_cache[b, 0, :, o, :] = key[keep].to(stream_cache.dtype)
            stream_cache[b, 1, :, o, :] = value[keep].to(stream_cache.dtype)


def split_step_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
    packed_cache: torch.Tensor, residual_cache: torch.Tensor | None, layout, cfg, scale: float,
    batch: BatchView, head_split: tuple[list[int], list[int]], stream_cache: torch.Tensor,
    stream_block_table: torch.Tensor, stream_slot_mapping: torch.Tensor | None,
    stream_block_size: int, quest=None,
) -> None:
    """One split layer's step: ``query [T, Hq, D]``, ``key`` / ``value [T, H,
    D]`` in the model's head order; ``head_split`` = (retrieval, streaming) KV
    head indices; the packed and residual caches hold the retrieval heads in
    that order, ``stream_cache`` the streaming heads. ``quest``: page selection
    for the retrieval heads (the streaming heads read only sinks and window)."""
    D = layout.head_size
    T = key.shape[0]
    key, value = key.view(T, -1, D), value.view(T, -1, D)
    H = key.shape[1]
    q4 = query.view(T, H, -1, D)
    rep = q4.shape[2]
    out4 = output.view(T, H, rep, D)
    retrieval, streaming = (torch.tensor(h, dtype=torch.long, device=key.device)
                            for h in head_split)
    out_r = output.new_empty(T, len(retrieval) * rep, D)
    # the retrieval heads' window may be e4m3 (residual_dtype); the
    # streaming heads' pages stay in the model dtype
    kvcomp_step_reference(q4[:, retrieval].reshape(T, -1, D),
                          round_to_window(key[:, retrieval], cfg),
                          round_to_window(value[:, retrieval], cfg), out_r, packed_cache,
                          residual_cache, layout, cfg, scale, batch, quest=quest)
    out_s = output.new_empty(T, len(streaming) * rep, D)
    stream_step_reference(q4[:, streaming].reshape(T, -1, D), key[:, streaming],
                          value[:, streaming], out_s, stream_cache, stream_block_table,
                          stream_slot_mapping, stream_block_size, batch.query_start_loc,
                          batch.seq_lens, cfg.sink_tokens, cfg.recent_tokens, scale)
    out4[:, retrieval] = out_r.view(T, -1, rep, D)
    out4[:, streaming] = out_s.view(T, -1, rep, D)
