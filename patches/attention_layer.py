"""Hooks on ``vllm.model_executor.layers.attention.Attention``.

vLLM never asks a backend for its KV cache spec: ``Attention.get_kv_cache_spec``
builds it from ``kv_cache_dtype``. For KVCOMP layers it must return the packed
spec (so vLLM sizes the pool by the real packed page), and each such layer
needs a residual sub-layer created next to it at construction time.
"""

from __future__ import annotations

import functools

from vllm.model_executor.layers.attention.attention import Attention

_APPLIED = False


def is_kvcomp_layer(layer) -> bool:
    from vllm_kvcomp.names import BACKEND_NAME

    backend = getattr(layer, "attn_backend", None)
    return backend is not None and backend.get_name() == BACKEND_NAME


def apply() -> None:
    global _APPLIED
    if _APPLIED or getattr(Attention.__init__, "__kvcomp_wrapped__", False):
        _APPLIED = True
        return
    orig_init = Attention.__init__
    orig_spec = Attention.get_kv_cache_spec

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if is_kvcomp_layer(self):
            from vllm_kvcomp.residual_layer import KvcompResidualCache
            from vllm_kvcomp.stream_layer import KvcompStreamCache, layer_head_split

            cfg = self.impl.config
            self.impl.layer_name = self.layer_name
            # a head map splits the KV heads: the layer's own cache holds the
            # retrieval heads, the stream sub-layer the streaming heads
            split = layer_head_split(cfg, self.layer_name)
            self.impl.head_split = split
            kv_heads = len(split[0]) if split else self.num_kv_heads
            if split:
                object.__setattr__(self, "_kvcomp_stream",
                                   KvcompStreamCache(self, cfg, kv_heads, len(split[1])))
            if cfg.needs_residual_cache:
                # Not an nn attribute: the sub-layer holds no weights and
                # must not appear in the model's module tree.
                object.__setattr__(self, "_kvcomp_residual",
                                   KvcompResidualCache(self, cfg, kv_heads))

    @functools.wraps(orig_spec)
    def get_kv_cache_spec(self, vllm_config):
        if not is_kvcomp_layer(self):
            return orig_spec(self, vllm_config)
        from vllm_kvcomp.residual_layer import packed_spec

        split = self.impl.head_split
        return packed_spec(
            self.impl.config,
            vllm_config.cache_config.block_size,
            len(split[0]) if split else self.num_kv_heads,
            self.head_size,
            self.kv_cache_torch_dtype,
            vllm_config.max_in_flight_tokens,
        )

    __init__.__kvcomp_wrapped__ = True
    Attention.__init__ = __init__
    Attention.get_kv_cache_spec = get_kv_cache_spec
    _APPLIED = True
