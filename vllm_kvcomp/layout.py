"""The packed page format: the one place that says where every byte lives.

A layer's packed cache is one uint8 tensor ``(num_blocks, num_kv_heads,
head_page_bytes)``. Heads are the second axis so that a per-head split
(retrieval vs streaming heads) or per-head eviction can address one head's
page without touching the others. One head's page holds ``block_size`` tokens
as four consecutive regions (offsets in bytes, all even so fp16 views work):

====================  =========================================================
region                contents
====================  =========================================================
``k_codes``           ``[block_size, head_size * k_bits / 8]``: codes of each
                      token, packed little-endian along channels (2-bit: 4 per
                      byte, 4-bit: 2 per byte, 8-bit: 1 per byte); for
                      ``k_bits == 16`` the raw fp16/bf16 keys.
``k_params``          fp16 ``(scale, min)`` pairs. Per-channel keys (KIVI):
                      ``[block_size / group_size, head_size, 2]``, one pair per
                      channel per token group. Per-token keys:
                      ``[block_size, head_size / kg, 2]``. Empty at 16 bits.
``v_codes``           as ``k_codes`` with ``v_bits``.
``v_params``          ``[block_size, head_size / vg, 2]`` fp16 pairs, values
                      quantized per token in groups of ``vg`` channels
                      (``value_group_size``, by default ``group_size``).
``scores``            only under H2O / A2SF eviction: ``[block_size]`` fp32,
                      each token's accumulated attention in this head
                      (``kernels/h2o_ref.py``), at a 4-byte aligned offset;
                      the page is then padded to a multiple of 4 bytes.
====================  =========================================================

Dequantization is ``x = code * scale + min`` (asymmetric, codes in
``[0, 2**bits - 1]``).

Bytes per token per KV head (head_size 128, group_size 128, model dtype 2 B):

====== ========= ======== ============
k/v    key axis  bytes    vs bf16 (512)
====== ========= ======== ============
16/16  -         512      1.00x
8/8    channel   264      1.94x
4/4    channel   136      3.76x
2/2    channel   72       7.11x
4/4    token     136      3.76x
====== ========= ======== ============

The full-precision residual window (``residual_tokens``, KIVI's R) lives in a
second KV cache group (see ``spec.KvcompResidualSpec``), in the model dtype or
float8 e4m3 (``residual_dtype``), whose pages are padded
to the packed page size so both groups share vLLM's block pool. That cost is
part of the per-request budget vLLM uses when it logs its KV capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from vllm_kvcomp.config import KvcompConfig

PARAM_BYTES = 4  # fp16 scale + fp16 min
SCORE_BYTES = 4  # fp32 accumulated attention of a token (H2O / A2SF)


def code_bytes(bits: int, head_size: int, model_dtype_bytes: int) -> int:
    if bits == 16:
        return head_size * model_dtype_bytes
    assert (head_size * bits) % 8 == 0
    return head_size * bits // 8


@dataclass(frozen=True)
class PageLayout:
    config: KvcompConfig
    block_size: int
    head_size: int
    model_dtype_bytes: int = 2

    def __post_init__(self):
        cfg = self.config
        if cfg.k_bits < 16 and cfg.key_axis == "channel":
            assert self.block_size % cfg.group_size == 0, (
                "per-channel keys need block_size % group_size == 0"
            )
        if cfg.k_bits < 16 and cfg.key_axis == "token":
            assert self.head_size % cfg.key_channel_group(self.head_size) == 0
        if cfg.v_bits < 16:
            assert self.head_size % cfg.value_group(self.head_size) == 0

    # --- sizes of the four regions of one head's page -----------------------
    @cached_property
    def k_code_row_bytes(self) -> int:
        return code_bytes(self.config.k_bits, self.head_size, self.model_dtype_bytes)

    @cached_property
    def v_code_row_bytes(self) -> int:
        return code_bytes(self.config.v_bits, self.head_size, self.model_dtype_bytes)

    @cached_property
    def k_param_shape(self) -> tuple[int, int]:
        """(rows, pairs per row) of fp16 (scale, min) pairs for keys."""
        cfg = self.config
        if cfg.k_bits == 16:
            return (0, 0)
        if cfg.key_axis == "channel":
            return (self.block_size // cfg.group_size, self.head_size)
        return (self.block_size, self.head_size // cfg.key_channel_group(self.head_size))

    @cached_property
    def v_param_shape(self) -> tuple[int, int]:
        cfg = self.config
        if cfg.v_bits == 16:
            return (0, 0)
        return (self.block_size, self.head_size // cfg.value_group(self.head_size))

    @cached_property
    def k_codes_offset(self) -> int:
        return 0

    @cached_property
    def k_params_offset(self) -> int:
        return self.block_size * self.k_code_row_bytes

    @cached_property
    def v_codes_offset(self) -> int:
        r, c = self.k_param_shape
        return self.k_params_offset + r * c * PARAM_BYTES

    @cached_property
    def v_params_offset(self) -> int:
        return self.v_codes_offset + self.block_size * self.v_code_row_bytes

    @cached_property
    def has_scores(self) -> bool:
        ev = self.config.eviction
        return ev is not None and ev.method in ("h2o", "a2sf")

    @cached_property
    def scores_offset(self) -> int:
        r, c = self.v_param_shape
        end = self.v_params_offset + r * c * PARAM_BYTES
        # scores live in the page so that they count in vLLM's KV budget and
        # move with their tokens; aligned so the bytes view as fp32
        return -(-end // 4) * 4 if self.has_scores else end

    @cached_property
    def head_page_bytes(self) -> int:
        return self.scores_offset + (SCORE_BYTES * self.block_size if self.has_scores else 0)

    def page_bytes(self, num_kv_heads: int) -> int:
        return num_kv_heads * self.head_page_bytes

    @property
    def residual_dtype_bytes(self) -> int:
        """Bytes of one channel of the full-precision window (``residual_dtype``)."""
        return 1 if self.config.residual_fp8 else self.model_dtype_bytes

    @property
    def bytes_per_token_head(self) -> float:
        return self.head_page_bytes / self.block_size

    @property
    def compression_vs_model_dtype(self) -> float:
        return 2 * self.head_size * self.model_dtype_bytes / self.bytes_per_token_head


def residual_block_size(layout: PageLayout) -> int:
    """Largest power-of-two block size whose full-precision (K and V) page
    fits in one packed page, so both groups share one pool with little
    padding, and the packed block size stays a multiple of it (prefix-cache
    hashing needs that)."""
    fp_bytes_per_token = 2 * layout.head_size * layout.residual_dtype_bytes
    cap = layout.head_page_bytes // fp_bytes_per_token
    bs = 1
    while bs * 2 <= cap and layout.block_size % (bs * 2) == 0:
        bs *= 2
    return bs
