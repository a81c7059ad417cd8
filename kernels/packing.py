"""Quantize, bit-pack and place K/V in packed pages: the PyTorch reference.

These functions are the oracle for the fused Triton store/decode kernels and
the implementation used on vLLM's CPU platform. Layout: ``vllm_kvcomp.layout``.
"""

from __future__ import annotations

import torch

from vllm_kvcomp.config import FP8_E4M3_MAX, KvcompConfig
from vllm_kvcomp.layout import PARAM_BYTES, PageLayout

# ---------------------------------------------------------- the window's dtype


def residual_torch_dtype(cfg: KvcompConfig, model_dtype: torch.dtype) -> torch.dtype:
    """What the full-precision window's pages hold (``residual_dtype``)."""
    return torch.float8_e4m3fn if cfg.residual_fp8 else model_dtype


def to_window(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to the window's ``dtype``, saturating as vLLM's fp8 cache
    does: torch turns e4m3 overflow into NaN."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(dtype)


def round_to_window(x: torch.Tensor, cfg: KvcompConfig) -> torch.Tensor:
    """New K or V as the window will hold it, in ``x``'s dtype. Every path
    (window, hand-over, a prompt's own tokens) reads these values, so the
    kernels' fp8 stores are exact casts."""
    if not cfg.residual_fp8:
        return x
    return to_window(x, torch.float8_e4m3fn).to(x.dtype)

# ---------------------------------------------------------------- primitives


def quantize_lastdim(
    x: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of each row of the last dimension.

    Returns ``codes`` (uint8, same shape as x), and fp16 ``scale`` and ``mn``
    (shape ``x.shape[:-1]``). Codes are computed against the fp16-rounded
    scale/min so that ``codes * scale + mn`` is exactly what a reader sees.
    """
    qmax = (1 << bits) - 1
    xf = x.float()
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    scale16 = ((mx - mn) / qmax).to(torch.float16)
    mn16 = mn.to(torch.float16)
    s = scale16.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((xf - mn16.float().unsqueeze(-1)) / s.unsqueeze(-1))
    codes = codes.clamp_(0, qmax).to(torch.uint8)
    return codes, scale16, mn16


def dequantize_lastdim(
    codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor
) -> torch.Tensor:
    return codes.float() * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-wide codes along the last dim, little-endian in a byte:
    code ``i`` of a byte sits at bits ``[i*bits, (i+1)*bits)``."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1).to(torch.uint8)


# ---------------------------------------------------------------- page views


def _region(cache: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return cache[:, :, start:stop]


def _code_view(cache: torch.Tensor, layout: PageLayout, which: str) -> torch.Tensor:
    """[num_blocks, H, block_size, row_bytes] uint8 view of a codes region."""
    off = layout.k_codes_offset if which == "k" else layout.v_codes_offset
    row = layout.k_code_row_bytes if which == "k" else layout.v_code_row_bytes
    r = _region(cache, off, off + layout.block_size * row)
    return r.unflatten(-1, (layout.block_size, row))


def _param_view(cache: torch.Tensor, layout: PageLayout, which: str) -> torch.Tensor:
    """[num_blocks, H, rows, cols, 2] fp16 view of a (scale, min) region."""
    off = layout.k_params_offset if which == "k" else layout.v_params_offset
    rows, cols = layout.k_param_shape if which == "k" else layout.v_param_shape
    r = _region(cache, off, off + rows * cols * PARAM_BYTES)
    return r.view(torch.float16).unflatten(-1, (rows, cols, 2))


def _bits(layout: PageLayout, which: str) -> int:
    return layout.config.k_bits if which == "k" else layout.config.v_bits


# ---------------------------------------------------------------- writers


def store_per_token(
    cache: torch.Tensor,
    layout: PageLayout,
    which: str,
    x: torch.Tensor,
    block_ids: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Quantize tokens ``x`` [T, H, D] per token (channel groups) and write
    them at (block_ids[t], slots[t]). At 16 bits the raw values are written."""
    if x.shape[0] == 0:
        return
    bits = _bits(layout, which)
    codes_view = _code_view(cache, layout, which)
    if bits == 16:
        raw = x.contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1], -1)
        codes_view[block_ids, :, slots, :] = raw
        return
    T, H, D = x.shape
    g = D // _param_view(cache, layout, which).shape[3]
    codes, scale, mn = quantize_lastdim(x.reshape(T, H, D // g, g), bits)
    codes_view[block_ids, :, slots, :] = pack_codes(codes.reshape(T, H, D), bits)
    params = _param_view(cache, layout, which)
    params[block_ids, :, slots, :, 0] = scale
    params[block_ids, :, slots, :, 1] = mn


def store_key_groups_per_channel(
    cache: torch.Tensor,
    layout: PageLayout,
    k_groups: torch.Tensor,
    block_ids: torch.Tensor,
    group_in_block: torch.Tensor,
) -> None:
    """Quantize whole token groups of keys ``k_groups`` [N, G, H, D] per
    channel (KIVI) and write group ``n`` at block ``block_ids[n]``, token
    group ``group_in_block[n]`` of that block."""
    if k_groups.shape[0] == 0:
        return
    N, G, H, D = k_groups.shape
    bits = layout.config.k_bits
    codes, scale, mn = quantize_lastdim(k_groups.permute(0, 2, 3, 1), bits)  # N,H,D,G
    packed = pack_codes(codes.permute(0, 3, 1, 2), bits)  # N,G,H,row
    codes_view = _code_view(cache, layout, "k")
    slot_idx = group_in_block.unsqueeze(1) * G + torch.arange(G, device=block_ids.device)
    blk_idx = block_ids.unsqueeze(1).expand(N, G)
    codes_view[blk_idx.reshape(-1), :, slot_idx.reshape(-1), :] = packed.reshape(N * G, H, -1)
    params = _param_view(cache, layout, "k")
    params[block_ids, :, group_in_block, :, 0] = scale
    params[block_ids, :, group_in_block, :, 1] = mn


# ---------------------------------------------------------------- reader


def dequantize_pages(
    cache: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor, model_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole pages ``block_ids`` into float32 K, V of shape
    [len(block_ids) * block_size, H, D] (token order follows block_ids)."""
    pages = cache[block_ids]
    out = []
    for which in ("k", "v"):
        out.append(_dequantize_region(pages, layout, which, model_dtype))
    return out[0], out[1]


def _dequantize_region(
    pages: torch.Tensor, layout: PageLayout, which: str, model_dtype: torch.dtype
) -> torch.Tensor:
    nb, H, _ = pages.shape
    bs, D = layout.block_size, layout.head_size
    bits = _bits(layout, which)
    codes_view = _code_view(pages, layout, which)  # nb,H,bs,row
    if bits == 16:
        x = codes_view.contiguous().view(model_dtype).float()  # nb,H,bs,D
        return x.permute(0, 2, 1, 3).reshape(nb * bs, H, D)
    codes = unpack_codes(codes_view, bits)  # nb,H,bs,D
    params = _param_view(pages, layout, which).float()
    scale, mn = params[..., 0], params[..., 1]  # nb,H,rows,cols
    if which == "k" and layout.config.key_axis == "channel":
        G = layout.config.group_size
        c = codes.unflatten(2, (bs // G, G))  # nb,H,ng,G,D
        x = c.float() * scale.unsqueeze(3) + mn.unsqueeze(3)
        x = x.flatten(2, 3)
    else:
        cols = scale.shape[-1]
        c = codes.unflatten(-1, (cols, D // cols))  # nb,H,bs,cols,g
        x = (c.float() * scale.unsqueeze(-1) + mn.unsqueeze(-1)).flatten(-2)
    return x.permute(0, 2, 1, 3).reshape(nb * bs, H, D)


def key_group_ranges(
    cache: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel key range ``(lo, hi)`` of every key group of pages
    ``block_ids``, float32 ``[len(block_ids), H, groups, D]``, read from the
    groups' (scale, min): the stored keys of a group lie in ``[min, min +
    scale * (2**bits - 1)]``, the ends reached by its extreme keys (per-channel
    keys only)."""
    cfg = layout.config
    assert cfg.k_bits < 16 and cfg.key_axis == "channel", "per-channel keys only"
    params = _param_view(cache[block_ids], layout, "k").float()
    lo = params[..., 1]
    return lo, lo + params[..., 0] * ((1 << cfg.k_bits) - 1)
