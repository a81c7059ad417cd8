"""Move each KV head's kept tokens to the front of a request's packed pages.

After a selection (``policies.snapkv``, ``policies.h2o``) every KV head keeps its own set of
positions; moving them, in position order, to positions ``[0, kept)`` of the
same request's pages empties whole pages that go back to vLLM's pool while
every other position keeps its slot. A token's packed row (codes, and its
scale/min where those are per token) is copied byte for byte: values, keys
quantized per token and 16-bit keys are not requantized. Keys quantized per
channel share one scale/min per channel across a token group, so a kept key
is only meaningful inside a group quantized with it: those are dequantized as
stored and quantized again as the new groups (one more rounding of at most
half a code step). Keys were cached after RoPE, so moving them changes
nothing about their phase. Under H2O / A2SF the pages' score slots move with
their tokens. ``compact_kept`` is the reference of the GPU path's kernel
(``triton_compaction.triton_compact``), which writes the same bytes.
"""

from __future__ import annotations

import torch

from vllm_kvcomp.kernels import packing
from vllm_kvcomp.layout import PageLayout


def keys_regrouped(layout: PageLayout) -> bool:
    """Whether compaction requantizes keys (per-channel quantized keys)."""
    cfg = layout.config
    return cfg.k_bits < 16 and cfg.key_axis == "channel"


def compact_kept(cache: torch.Tensor, layout: PageLayout, block_row: torch.Tensor,
                 kept: torch.Tensor, model_dtype: torch.dtype) -> None:
    """Move, for each KV head ``h``, the tokens at positions ``kept[h]``
    (``[H, k]``, ascending, within packed pages of ``block_row``) to positions
    ``[0, k)``. Reads everything before writing, as sources and destinations
    overlap."""
    H, k = kept.shape
    if k == 0:
        return
    bs = layout.block_size
    dev = cache.device
    src = kept.to(dev).long()
    row = block_row.to(dev).long()
    heads = torch.arange(H, device=dev)[:, None].expand(H, k)
    src_blk, src_slot = row[src // bs], src % bs
    dst = torch.arange(k, device=dev)
    dst_blk, dst_slot = row[dst // bs][None].expand(H, k), (dst % bs)[None].expand(H, k)

    scores = None
    if layout.has_scores:  # H2O / A2SF: a token's score moves with it
        from vllm_kvcomp.kernels.h2o_ref import score_view

        scores = score_view(cache, layout)
        moved_scores = scores[src_blk, heads, src_slot].clone()
    regions = ["v"] if keys_regrouped(layout) else ["v", "k"]
    moved = []
    for which in regions:
        codes = packing._code_view(cache, layout, which)
        params = packing._param_view(cache, layout, which)
        has_params = params.shape[2] > 0
        moved.append((codes, codes[src_blk, heads, src_slot].clone(), params,
                      params[src_blk, heads, src_slot].clone() if has_params else None))
    regrouped = None
    if keys_regrouped(layout):
        G = layout.config.group_size
        pages = torch.arange(int(src.max()) // bs + 1, device=dev)
        k_all, _ = packing.dequantize_pages(cache, layout, row[pages], model_dtype)
        sel = k_all[src, heads]  # [H, k, D]
        # pad the last group with copies of its last token: the group's
        # min/max, so the kept tokens' codes, are those of the kept tokens alone
        n_groups = -(-k // G)
        pad = n_groups * G - k
        if pad:
            sel = torch.cat([sel, sel[:, -1:].expand(H, pad, -1)], dim=1)
        regrouped = sel.view(H, n_groups, G, -1).permute(1, 2, 0, 3)  # [N, G, H, D]

    for codes, c, params, p in moved:
        codes[dst_blk, heads, dst_slot] = c
        if p is not None:
            params[dst_blk, heads, dst_slot] = p
    if scores is not None:
        scores[dst_blk, heads, dst_slot] = moved_scores
    if regrouped is not None:
        gpos = torch.arange(regrouped.shape[0], device=dev) * layout.config.group_size
        packing.store_key_groups_per_channel(cache, layout, regrouped, row[gpos // bs],
                                             (gpos % bs) // layout.config.group_size)
