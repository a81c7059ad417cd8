"""Virtual sub-layer that owns one layer's full-precision residual pages.

vLLM maps each layer name to exactly one KV cache spec, so the residual window
of layer ``L`` is declared by a module registered as ``L.kvcomp_residual`` in
the static forward context (the pattern vLLM uses for its own side caches).
vLLM then gives it a KV cache group, a block table and a slot mapping; the
parent layer's impl reads them from the forward context. ``KvcompSubLayer``
is that pattern, shared with the streaming heads' sub-layer (``stream_layer``).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

from vllm_kvcomp.backend import KvcompResidualBackend
from vllm_kvcomp.names import RESIDUAL_SUFFIX
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.packing import residual_torch_dtype
from vllm_kvcomp.layout import PageLayout, residual_block_size
from vllm_kvcomp.spec import (
    KvcompEvictionSpec,
    KvcompResidualSpec,
    KvcompRingWindowSpec,
    KvcompSpec,
)


def packed_spec(
    cfg: KvcompConfig, block_size: int, num_kv_heads: int, head_size: int,
    model_dtype: torch.dtype, max_in_flight_tokens: int = 0,
) -> KvcompSpec | KvcompEvictionSpec:
    common = dict(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size,
                  dtype=torch.uint8, kvcomp_config=cfg, model_dtype=model_dtype)
    if cfg.eviction is not None:
        return KvcompEvictionSpec(**common, max_in_flight_tokens=max_in_flight_tokens)
    return KvcompSpec(**common)


def residual_spec(packed: KvcompSpec | KvcompEvictionSpec, concurrent_steps: int = 1) -> KvcompResidualSpec:
    layout: PageLayout = packed.layout
    cfg = layout.config
    spec_cls = KvcompRingWindowSpec if cfg.residual_ring else KvcompResidualSpec
    return spec_cls(
        block_size=residual_block_size(layout),
        num_kv_heads=packed.num_kv_heads,
        head_size=packed.head_size,
        dtype=residual_torch_dtype(cfg, packed.model_dtype),
        sliding_window=cfg.residual_tokens + cfg.key_token_align,
        residual_tokens=cfg.residual_tokens,
        token_align=cfg.key_token_align,
        concurrent_steps=concurrent_steps,
        page_size_padded=packed.page_size_bytes,
    )


class KvcompSubLayer(torch.nn.Module, AttentionLayerBase):
    """A KV cache of its own for ``num_kv_heads`` of ``parent``'s heads,
    registered as ``<parent><layer_suffix>``; its pages are model-dtype K and
    V, ``(2, heads, block, head_size)``."""

    layer_suffix: str

    def __init__(self, parent: torch.nn.Module, cfg: KvcompConfig, num_kv_heads: int) -> None:
        super().__init__()
        self.parent_name = parent.layer_name
        self.layer_name = parent.layer_name + self.layer_suffix
        self.num_kv_heads = num_kv_heads
        self.head_size = parent.head_size
        self.model_dtype = parent.kv_cache_torch_dtype
        self.config = cfg
        self.kv_cache = torch.tensor([])
        self.impl = None
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if self.layer_name in ctx:
            raise ValueError(f"Duplicate layer name: {self.layer_name}")
        ctx[self.layer_name] = self

    def get_attn_backend(self):
        return KvcompResidualBackend

    def forward(self):  # never called: the parent layer drives this cache
        raise RuntimeError(f"{type(self).__name__} has no forward")


class KvcompResidualCache(KvcompSubLayer):
    layer_suffix = RESIDUAL_SUFFIX

    def __init__(self, parent: torch.nn.Module, cfg: KvcompConfig,
                 num_kv_heads: int | None = None) -> None:
        # the retrieval heads only, under a head map
        super().__init__(parent, cfg, num_kv_heads or parent.num_kv_heads)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KvcompResidualSpec:
        packed = packed_spec(
            self.config,
            vllm_config.cache_config.block_size,
            self.num_kv_heads,
            self.head_size,
            self.model_dtype,
        )
        return residual_spec(packed, vllm_config.max_concurrent_batches)
