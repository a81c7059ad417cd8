"""Virtual sub-layer that owns one layer's streaming heads under a head map.

With a head map, layer ``L``'s KV heads are split: its own spec (packed pages
and the residual window) covers the retrieval heads, and the module registered
as ``L.kvcomp_stream`` declares the streaming heads' cache, a
``KvcompStreamSpec`` group of its own whose manager frees everything outside
the sinks and the recent window (the pattern of ``residual_layer``).

Streaming heads are stored in the model dtype, not packed: a request holds at
most sinks + a few recent windows of them (a few hundred tokens), so packing
would save little, and per-channel key groups would need a full-precision
window of their own about as long as the recent window itself. Unquantized
they attend exactly as DuoAttention's streaming heads.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig

from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.names import STREAM_SUFFIX
from vllm_kvcomp.residual_layer import KvcompSubLayer, packed_spec
from vllm_kvcomp.spec import KvcompSpec, KvcompStreamSpec


def layer_head_split(cfg: KvcompConfig, layer_name: str) -> tuple[list[int], list[int]] | None:
    """(retrieval, streaming) KV head indices of ``layer_name`` under
    ``cfg.head_map``; ``None`` without a map or when nothing streams."""
    if cfg.head_map is None:
        return None
    from vllm.model_executor.models.utils import extract_layer_index

    from vllm.distributed import parallel_state as ps

    from vllm_kvcomp.policies.head_map import load_served_split

    # this rank's KV heads only, numbered as its attention sees them (a layer
    # built outside an engine has no tensor-parallel group: one rank)
    rank, tp = ((ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
                if ps.model_parallel_is_initialized() else (0, 1))
    split = load_served_split(cfg.head_map, cfg.streaming_ratio, rank, tp)
    if split.num_streaming == 0:
        return None
    layer = extract_layer_index(layer_name)
    return list(split.retrieval[layer]), list(split.streaming[layer])


def stream_block_size(packed: KvcompSpec, num_stream_heads: int) -> int:
    """Largest power-of-two block size, dividing the packed one, whose
    model-dtype page of the streaming heads fits in one packed page (one
    pool, little padding, prefix-cache hashing keeps its common divisor)."""
    per_token = 2 * num_stream_heads * packed.head_size * packed.model_dtype.itemsize
    cap = packed.page_size_bytes // per_token
    if cap < 1:
        raise KvcompConfigError(
            f"kvcomp head_map: one token of {num_stream_heads} streaming heads "
            f"({per_token} bytes) does not fit in a packed page of the retrieval heads "
            f"({packed.page_size_bytes} bytes); use a larger block_size or more bits")
    bs = 1
    while bs * 2 <= cap and packed.block_size % (bs * 2) == 0:
        bs *= 2
    return bs


def stream_spec(cfg: KvcompConfig, packed: KvcompSpec, num_stream_heads: int,
                concurrent_steps: int = 1) -> KvcompStreamSpec:
    return KvcompStreamSpec(
        block_size=stream_block_size(packed, num_stream_heads),
        num_kv_heads=num_stream_heads,
        head_size=packed.head_size,
        dtype=packed.model_dtype,
        sink_tokens=cfg.sink_tokens,
        recent_tokens=cfg.recent_tokens,
        concurrent_steps=concurrent_steps,
        page_size_padded=packed.page_size_bytes,
    )


class KvcompStreamCache(KvcompSubLayer):
    layer_suffix = STREAM_SUFFIX

    def __init__(self, parent: torch.nn.Module, cfg: KvcompConfig, num_retrieval: int,
                 num_streaming: int) -> None:
        super().__init__(parent, cfg, num_streaming)
        # the packed page the streaming heads' page is padded to holds these
        self.num_retrieval = num_retrieval

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KvcompStreamSpec:
        packed = packed_spec(self.config, vllm_config.cache_config.block_size,
                             self.num_retrieval, self.head_size, self.model_dtype)
        return stream_spec(self.config, packed, self.num_kv_heads,
                           vllm_config.max_concurrent_batches)
