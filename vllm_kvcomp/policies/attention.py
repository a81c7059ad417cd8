"""Masked attention shared by the head calibrations and their tests.

Tensors follow transformers' attention-function layout: query ``[batch,
query_heads, q_len, head_dim]``, key / value ``[batch, kv_heads, k_len,
head_dim]``; query head ``j`` reads KV head ``j // (query_heads // kv_heads)``
(GQA, as ``repeat_kv`` in transformers' Llama).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def window_mask(q_len: int, k_len: int, sink: int | None = None, recent: int | None = None,
                device: torch.device | str | None = None, first: int | None = None
                ) -> torch.Tensor:
    """``[q_len, k_len]`` bool, ``True`` where the query may attend the key.

    The queries are the last ``q_len`` of ``k_len`` positions, or, with
    ``first``, the positions ``first`` to ``first + q_len - 1``. Without ``sink``
    / ``recent``: causal. With them, a streaming head's view: causal, and the key
    is among the first ``sink`` tokens or the last ``recent`` up to the query
    (the query itself included), as DuoAttention's streaming heads.
    """
    first = k_len - q_len if first is None else first
    i = torch.arange(first, first + q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    mask = j <= i
    if sink is not None or recent is not None:
        mask = mask & ((j < (sink or 0)) | (i - j < (recent or 0)))
    return mask


def expand_kv(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """KV heads -> one per query head."""
    groups = num_query_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Softmax probabilities ``[batch, query_heads, q_len, k_len]`` in float32
    (or the inputs' dtype when wider)."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    k = expand_kv(key, query.shape[1]).to(dtype)
    scores = torch.matmul(query.to(dtype), k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """Attention output ``[batch, query_heads, q_len, head_dim]`` under ``mask``
    (fused SDPA: no probability matrix is kept for the backward pass)."""
    heads = query.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, expand_kv(key, heads), expand_kv(value, heads), attn_mask=mask, scale=scaling)


def register(name: str, function) -> str:
    """Register ``function`` in transformers' ``AttentionInterface`` as
    ``name`` (for ``attention_implementation``); returns ``name``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    return name


@contextmanager
def attention_implementation(model, name: str):
    """Run ``model`` with the attention function registered as ``name`` in
    transformers' ``AttentionInterface`` (it sets ``config._attn_implementation``),
    then restore the previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
