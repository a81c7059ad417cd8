"""The KVCOMP attention backend: Backend, MetadataBuilder and Impl.

The packed pages of each attention layer are one uint8 tensor
``(num_blocks, num_kv_heads, head_page_bytes)`` (``layout.PageLayout``); the
full-precision residual of the recent tokens lives in a virtual sub-layer
``<layer>.kvcomp_residual`` with its own KV cache group
(``KvcompResidualBackend``, ``residual_layer.KvcompResidualCache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_kvcomp.kernels.attention_ref import BatchView, kvcomp_step_reference
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError, current_config
from vllm_kvcomp.launch_env import switch
from vllm_kvcomp.layout import PageLayout
from vllm_kvcomp.names import BACKEND_NAME, FORCE_TRITON_ENV, RESIDUAL_SUFFIX

# Runs the GPU path (Triton store / prefill / decode) on CPU tensors too, for
# testing the backend's kernel wiring under TRITON_INTERPRET=1 in CI.
FORCE_TRITON = switch(FORCE_TRITON_ENV)


@lru_cache(maxsize=None)
def _layout(cfg: KvcompConfig, block_size: int, head_size: int, dtype_bytes: int) -> PageLayout:
    return PageLayout(cfg, block_size, head_size, dtype_bytes)


def _model_dtype() -> torch.dtype:
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is not None and vc.model_config is not None:
        return vc.model_config.dtype
    return torch.bfloat16


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------


@dataclass
class KvcompMetadata:
    num_actual_tokens: int
    num_reqs: int
    # Device tensors: what the Triton kernels read (CUDA-graph safe).
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int
    max_query_len: int
    max_seq_len: int
    # The batch is reordered decodes first (reorder_batch_threshold = 1):
    # requests [0, num_decodes) have one query token each and go to the
    # split-K decode kernel, the rest to the prefill kernel.
    num_decodes: int = 0
    # Host lists for the CPU reference path only (None on GPU: a .tolist()
    # there would sync the device every step).
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # prompt lengths (CPU path, SnapKV / H2O / A2SF only: validation asks vLLM for them)
    prompt_lens_cpu: list[int] | None = None
    # the same on the device (GPU path, SnapKV / H2O / A2SF)
    prompt_lens: torch.Tensor | None = None
    # GPU path's SnapKV / H2O / A2SF (unless KVCOMP_EVICTION_ROWS=0): the rows whose host work
    # after attention does anything (``eviction_gpu.host_rows``, once a step rather than
    # every layer walking every request) and what the step's layers share, filled by the
    # first layer that needs it
    eviction_rows: list[int] | None = None
    eviction_shared: dict | None = None
    # where eviction's decode steps are captured (eviction_gpu.graph_eviction): a one-token
    # step whose every row is past its prompt (or a CUDA-graph capture batch), whose
    # eviction is fixed-shape device work reading
    # ``prompt_lens`` from the builder's persistent buffer (eviction_gpu.graph_after_attention)
    graph_decode: bool = False


# what a row without a request of its own counts as: inside a prompt longer than any sequence
PADDING_PROMPT_LEN = 2**31 - 1


def padded_prompt_lens(prompt_lens: torch.Tensor, num_reqs: int) -> torch.Tensor:
    """The step's prompt lengths on the host, one per row of ``num_reqs``:
    Model Runner V2 gives one per scheduled request, fewer than a padded
    captured batch's rows (those get ``PADDING_PROMPT_LEN``). A copy the
    runner does not own: V1's pinned rows change with the next step's batch,
    possibly before an asynchronous copy of them has run."""
    got = prompt_lens[:num_reqs].to("cpu", copy=True)
    if got.shape[0] < num_reqs:
        pad = torch.full((num_reqs - got.shape[0],), PADDING_PROMPT_LEN, dtype=got.dtype)
        got = torch.cat([got, pad])
    return got


class KvcompMetadataBuilder(AttentionMetadataBuilder[KvcompMetadata]):
    # Decode-only batches are captured whole (the decode kernel's grid depends
    # on the batch size alone); mixed batches run eagerly between graph pieces.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first: in mixed steps (chunked prefill beside running
        # requests) each decode still gets the split-K decode kernel instead
        # of one program walking its whole context in the prefill kernel.
        self._init_reorder_batch_threshold(1)
        self.on_cpu = torch.device(device).type == "cpu"
        self.max_model_len = vllm_config.model_config.max_model_len
        from vllm_kvcomp.config import config_from_vllm_config
        from vllm_kvcomp.kernels.eviction_gpu import eviction_rows_config, selects_on_host

        # the GPU path's SnapKV / H2O / A2SF select host-side: they get the host lists too
        cfg = config_from_vllm_config(vllm_config)
        self.host_lists = self.on_cpu or selects_on_host(cfg)
        # the config whose eviction rows each step's metadata carries, or None
        self.rows_config = None if self.on_cpu else eviction_rows_config(cfg)
        from vllm_kvcomp.kernels.eviction_gpu import graph_eviction

        self.prompt_lens_buffer = None
        if not self.on_cpu and graph_eviction(cfg, vllm_config):
            # a captured step reads the prompt lengths where the capture found them; rows
            # not filled by a step count as inside a prompt far longer than any sequence
            sc = vllm_config.scheduler_config
            rows = max(sc.max_num_seqs,
                       vllm_config.compilation_config.max_cudagraph_capture_size or 0)
            self.prompt_lens_buffer = torch.full((rows,), PADDING_PROMPT_LEN,
                                                 dtype=torch.int32, device=device)
        from vllm_kvcomp.spec import KvcompSpec

        if not self.on_cpu and isinstance(kv_cache_spec, KvcompSpec):
            # Before CUDA-graph capture, where the Impls find it already checked.
            from vllm_kvcomp.config import config_from_vllm_config
            from vllm_kvcomp.kernels.decode_launch import check_decode_launch

            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            check_decode_launch(
                config_from_vllm_config(vllm_config), kv_cache_spec.block_size,
                kv_cache_spec.head_size, mc.dtype,
                mc.get_num_attention_heads(pc) // mc.get_num_kv_heads(pc), torch.device(device))

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        from vllm.platforms import current_platform

        from vllm_kvcomp.config import config_from_vllm_config
        from vllm_kvcomp.kernels.eviction_gpu import graph_eviction, selects_on_host

        cfg = config_from_vllm_config(vllm_config)
        if current_platform.is_cpu() or (selects_on_host(cfg)
                                           and not graph_eviction(cfg, vllm_config)):
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KvcompMetadata:
        cam = common_attn_metadata
        num_reqs = cam.num_reqs
        md = KvcompMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            num_reqs=num_reqs,
            query_start_loc=cam.query_start_loc[: num_reqs + 1],
            seq_lens=cam.seq_lens[:num_reqs],
            block_table=cam.block_table_tensor[:num_reqs],
            slot_mapping=cam.slot_mapping,
            block_size=self.kv_cache_spec.block_size,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            num_decodes=split_decodes_and_prefills(cam, decode_threshold=1)[0],
        )
        if self.host_lists:
            md.query_start_loc_cpu = cam.query_start_loc_cpu[: num_reqs + 1].tolist()
            md.seq_lens_cpu = cam.seq_lens_cpu[:num_reqs].tolist()
            if cam.rswa_prefix_lens is not None:
                prompt_lens = padded_prompt_lens(cam.rswa_prefix_lens, num_reqs)
                md.prompt_lens_cpu = prompt_lens.tolist()
                if self.prompt_lens_buffer is not None:
                    md.prompt_lens = self.prompt_lens_buffer[:num_reqs]
                    md.prompt_lens.copy_(prompt_lens, non_blocking=True)
                    # padding rows (no tokens) read and write nothing
                    md.graph_decode = cam.max_query_len == 1 and all(
                        n > p or n == 0 for n, p in zip(md.seq_lens_cpu, md.prompt_lens_cpu))
                else:
                    md.prompt_lens = prompt_lens.to(cam.seq_lens.device, non_blocking=True)
                # a captured step's eviction reads no host list
                if self.rows_config is not None and not md.graph_decode:
                    from vllm_kvcomp.kernels.eviction_gpu import host_rows

                    md.eviction_rows = host_rows(self.rows_config, md.block_size, md)
                    md.eviction_shared = {}
        return md

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata):
        # Captured decode graphs are replayed for any context length: size
        # the decode kernel's split-K for the longest one.
        md = self.build(0, common_attn_metadata)
        md.max_seq_len = self.max_model_len
        if self.prompt_lens_buffer is not None:
            # what each replay's build copies the step's prompt lengths into
            md.prompt_lens = self.prompt_lens_buffer[: md.num_reqs]
            md.graph_decode = True
        return md


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------


class KvcompBackend(AttentionBackend):
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    # Quantize-on-write and attention share one pass over the batch.
    forward_includes_kv_cache_update: ClassVar[bool] = True

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["KvcompImpl"]:
        return KvcompImpl

    @staticmethod
    def get_builder_cls() -> type[KvcompMetadataBuilder]:
        return KvcompMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        cfg = current_config()
        if cfg.block_size is not None:
            return cfg.block_size
        return max(default_block_size, cfg.key_token_align, 16)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        layout = _layout(current_config(), block_size, head_size, _model_dtype().itemsize)
        return (num_blocks, num_kv_heads, layout.head_page_bytes)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0

    @classmethod
    def is_mla(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False


class KvcompResidualBackend(KvcompBackend):
    """Backend of the ``<layer>.kvcomp_residual`` sub-layers: model-dtype
    pages ``(num_blocks, 2, num_kv_heads, block_size, head_size)``, padded to
    the packed page size by a strided view (see ``spec.KvcompResidualSpec``)."""

    @staticmethod
    def get_impl_cls():
        raise RuntimeError("residual sub-layers are driven by their parent layer")

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        return (num_blocks, 2, num_kv_heads, block_size, head_size)


# --------------------------------------------------------------------------
# impl
# --------------------------------------------------------------------------


class KvcompImpl(AttentionImpl[KvcompMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding-window attention")
        if logits_soft_cap:
            unsupported.append("logits soft-capping")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type!r}")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        if kv_cache_dtype != "auto":
            unsupported.append(f"--kv-cache-dtype {kv_cache_dtype} (kvcomp quantizes itself)")
        if unsupported:
            raise KvcompConfigError(
                "the KVCOMP backend does not support " + ", ".join(unsupported) + " yet"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.config = current_config()
        self.layer_name: str | None = None
        self._flash_attn = self._find_flash_attn(head_size)
        # KVCOMP_DECODE_LAUNCH over the default, once checked on this GPU
        # (decode_launch.check_decode_launch; the metadata builder runs the check)
        self._decode_launch: dict | None = None
        # (retrieval, streaming) KV head indices under a head map, set with
        # the layer's sub-layers (patches/attention_layer.py); None: no split
        self.head_split: tuple[list[int], list[int]] | None = None
        # the layer's Quest page selection (None: dense), found at its first step
        self._quest = False

    def _find_flash_attn(self, head_size: int):
        """(flash_attn_varlen_func, fa_version, merge_attn_states) when the
        fresh tokens of prefill chunks go to vLLM's FlashAttention, else None."""
        mode = self.config.fresh_prefill
        if mode == "triton" or self.config.prompt_as_stored:
            return None
        from vllm.platforms import current_platform

        found = None
        if current_platform.is_cuda() and _model_dtype() in (torch.float16, torch.bfloat16):
            try:
                from vllm.v1.attention.backends.fa_utils import (
                    flash_attn_varlen_func,
                    get_flash_attn_version,
                )
                from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

                version = get_flash_attn_version(head_size=head_size)
                if version is not None:
                    found = (flash_attn_varlen_func, version, merge_attn_states)
            except ImportError:
                pass
        if found is None and mode == "flash_attn":
            raise KvcompConfigError(
                "kvcomp fresh_prefill='flash_attn' needs vLLM's FlashAttention (a CUDA GPU "
                "and an fp16/bf16 model); use 'auto' or 'triton'"
            )
        return found

    def _quest_for(self, layer_name: str, block_size: int):
        """The Quest policy of this layer, None in the dense first layers."""
        if self._quest is False:
            quest = self.config.quest
            if quest is not None:
                from vllm.model_executor.models.utils import extract_layer_index

                if extract_layer_index(layer_name) < quest.dense_layers:
                    quest = None
            self._quest = quest.policy(block_size) if quest is not None else None
        return self._quest

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KvcompMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by KVCOMP")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        cfg = self.config
        layout = _layout(cfg, attn_metadata.block_size, self.head_size, query.dtype.itemsize)
        if cfg.residual_fp8 and self.head_split is None:
            from vllm_kvcomp.kernels.packing import round_to_window

            # every path then reads the values the e4m3 window will hold (a
            # split layer rounds its retrieval heads only: the streaming
            # heads keep theirs in the model dtype)
            key, value = round_to_window(key, cfg), round_to_window(value, cfg)

        residual_cache = None
        res_meta = None
        if cfg.needs_residual_cache:
            ctx = get_forward_context()
            res_name = layer.layer_name + RESIDUAL_SUFFIX
            residual_cache = ctx.no_compile_layers[res_name].kv_cache
            md = ctx.attn_metadata
            res_meta = md[res_name] if isinstance(md, dict) else None

        quest = self._quest_for(layer.layer_name, layout.block_size)
        if query.is_cuda or FORCE_TRITON:
            if self.head_split is not None:
                from vllm_kvcomp.names import STREAM_SUFFIX

                ctx = get_forward_context()
                stream_name = layer.layer_name + STREAM_SUFFIX
                self._forward_triton_split(
                    query, key, value, output, kv_cache, residual_cache, attn_metadata,
                    res_meta, layout, quest, ctx.no_compile_layers[stream_name].kv_cache,
                    ctx.attn_metadata[stream_name])
                return output
            self._forward_triton(query, key, value, output, kv_cache, residual_cache,
                                 attn_metadata, res_meta, layout, quest)
            return output

        batch = BatchView(
            query_start_loc=attn_metadata.query_start_loc_cpu,
            seq_lens=attn_metadata.seq_lens_cpu,
            block_table=attn_metadata.block_table,
            residual_block_table=res_meta.block_table if res_meta else None,
            residual_slot_mapping=res_meta.slot_mapping if res_meta else None,
            residual_block_size=res_meta.block_size if res_meta else 1,
            prompt_lens=attn_metadata.prompt_lens_cpu,
        )
        if self.head_split is not None:
            from vllm_kvcomp.kernels.head_split_ref import split_step_reference
            from vllm_kvcomp.names import STREAM_SUFFIX

            ctx = get_forward_context()
            stream_name = layer.layer_name + STREAM_SUFFIX
            stream_md = ctx.attn_metadata[stream_name]
            split_step_reference(
                query[:n], key[:n], value[:n], output[:n], kv_cache, residual_cache, layout,
                cfg, self.scale, batch, self.head_split,
                ctx.no_compile_layers[stream_name].kv_cache, stream_md.block_table,
                stream_md.slot_mapping, stream_md.block_size,
                quest=quest)
            return output
        kvcomp_step_reference(
            query[:n],
            key[:n],
            value[:n],
            output[:n],
            kv_cache,
            residual_cache,
            layout,
            cfg,
            self.scale,
            batch,
            quest=quest,
        )
        return output

    def _forward_triton_ring(self, query, key, value, output, packed_cache, residual_cache,
                             md: KvcompMetadata, res_md: KvcompMetadata, layout,
                             quest=None) -> None:
        """``_forward_triton`` for a window held as a ring (``residual_ring``):
        a step's new tokens take the slots of tokens that leave the window,
        which its hand-over and attention still read, so the residual write
        follows them (only the new window's tokens: ``ring_window_slots``)."""
        from dataclasses import replace

        from vllm_kvcomp.kernels.triton_store import kvcomp_store, ring_window_slots

        self._forward_triton(query, key, value, output, packed_cache, residual_cache, md,
                             replace(res_md, slot_mapping=None), layout, quest)
        slots = ring_window_slots(res_md.slot_mapping, md.query_start_loc, md.seq_lens,
                                  self.config)
        kvcomp_store(key.view(key.shape[0], -1, self.head_size),
                     value.view(value.shape[0], -1, self.head_size), packed_cache,
                     residual_cache, md.block_table, res_md.block_table, slots,
                     md.query_start_loc, md.seq_lens, layout, self.config, res_md.block_size,
                     md.max_query_len, handover=False)

    def _forward_triton(self, query, key, value, output, packed_cache, residual_cache,
                        md: KvcompMetadata, res_md: KvcompMetadata | None, layout,
                        quest=None) -> None:
        """GPU path: one store launch (hand-over + residual write), then
        attention straight from the packed pages (under ``quest``, a decode
        step reads only the pages it selects).

        Storing first is equivalent to the reference's attend-then-store: the
        store writes packed positions [Q(start), Q(n)) and residual slots of
        the fresh tokens, while attention reads packed [0, Q(start)),
        residual [Q(start), start) and the fresh K/V from registers."""
        if self.config.residual_ring and res_md is not None and res_md.slot_mapping is not None:
            self._forward_triton_ring(query, key, value, output, packed_cache, residual_cache,
                                      md, res_md, layout, quest)
            return
        from vllm_kvcomp.kernels.triton_store import kvcomp_store

        cfg = self.config
        # heads from the tensors: a split layer passes its retrieval heads only
        key = key.view(key.shape[0], -1, self.head_size)
        value = value.view(value.shape[0], -1, self.head_size)
        bs_r = res_md.block_size if res_md is not None else 1
        res_table = res_md.block_table if res_md is not None else None
        kvcomp_store(
            key, value, packed_cache, residual_cache, md.block_table, res_table,
            res_md.slot_mapping if res_md is not None else None,
            md.query_start_loc, md.seq_lens, layout, cfg, bs_r, md.max_query_len,
        )
        q = query.view(query.shape[0], -1, self.head_size)
        out = output.view(output.shape[0], -1, self.head_size)
        # A decode-only batch (the CUDA-graph case) takes all num_reqs rows,
        # padding included; a mixed one its leading decode requests.
        nd = md.num_reqs if md.max_query_len == 1 else md.num_decodes
        ev = probs = lse = None
        if cfg.eviction is not None:
            from vllm_kvcomp.kernels import eviction_gpu

            if eviction_gpu.step_evicts(cfg, md):
                ev = eviction_gpu.step_ranges(cfg, layout.block_size, md)
        if nd > 0 and self._decode_launch is None:
            from vllm_kvcomp.kernels.decode_launch import check_decode_launch

            self._decode_launch = check_decode_launch(
                cfg, layout.block_size, self.head_size, q.dtype,
                self.num_heads // self.num_kv_heads, q.device)
        if nd > 0 and quest is not None:
            from vllm_kvcomp.kernels.triton_quest import quest_decode_attention, quest_select

            table, lens = md.block_table[:nd], md.seq_lens[:nd]
            rt = res_table[:nd] if res_table is not None else None
            stale = None
            if ev is not None:  # SnapKV: Quest over the pages each request holds
                from vllm_kvcomp.kernels.triton_quest import quest_held_batch, quest_stale_ranges

                table, lens, rt = quest_held_batch(ev[0][:nd], table, lens, rt, layout, bs_r)
            selected = quest_select(q[:nd], packed_cache, table, lens, layout, cfg, quest)
            if ev is not None:
                stale = quest_stale_ranges(selected, ev[0][:nd], layout)
            quest_decode_attention(
                q[:nd], key[:nd], value[:nd], packed_cache, residual_cache, table, rt, lens,
                selected, layout, cfg, self.scale, bs_r, quest, out=out[:nd], stale=stale,
                **self._decode_launch)
        elif nd > 0:
            from vllm_kvcomp.kernels.triton_decode import kvcomp_decode_attention

            if ev is not None and eviction_gpu.scores_by_decode(cfg):
                # H2O / A2SF score from the decode kernel's own probabilities
                width = (eviction_gpu.decode_probs_width(cfg, layout.block_size)
                         if md.graph_decode else
                         eviction_gpu.decode_read_width(cfg, layout.block_size, md, nd))
                probs = torch.empty(nd, q.shape[1], width, dtype=torch.float32,
                                    device=q.device)
                if eviction_gpu.scores_from_logits():
                    lse = torch.empty(nd, q.shape[1], dtype=torch.float32, device=q.device)
            kvcomp_decode_attention(
                q[:nd], key[:nd], value[:nd], packed_cache, residual_cache,
                md.block_table[:nd], res_table[:nd] if res_table is not None else None,
                md.seq_lens[:nd], layout, cfg, self.scale, bs_r, md.max_seq_len, out=out[:nd],
                **self._decode_launch, **({"evicted": ev[0][:nd]} if ev else {}),
                **({"probs": probs} if probs is not None else {}),
                **({"probs_lse": lse} if lse is not None else {}),
            )
        if nd < md.num_reqs:
            self._prefill_triton(q, key, value, out, packed_cache, residual_cache, md, layout,
                                 res_table, bs_r, nd, ev)
        if ev is not None and md.graph_decode:
            eviction_gpu.graph_after_attention(packed_cache, layout, cfg, md, ev[0], probs,
                                               lse)
        elif ev is not None:
            eviction_gpu.after_attention(q, key, value, out, packed_cache, residual_cache, layout,
                                         cfg, self.scale, md, res_table, bs_r, probs, lse)

    def _prefill_triton(self, q, key, value, out, packed_cache, residual_cache,
                        md: KvcompMetadata, layout, res_table, bs_r: int, nd: int,
                        ev: tuple | None) -> None:
        """The prefill requests ``[nd, num_reqs)`` of ``_forward_triton``'s
        batch (``ev``: ``eviction_gpu.step_ranges``)."""
        cfg = self.config
        evicted = {"evicted": ev[0][nd:], "evicted_recent": ev[1]} if ev else {}
        if self._flash_attn is not None:
            from vllm_kvcomp.kernels.triton_prefill import prefill_with_flash_attn

            prefill_with_flash_attn(
                q, key, value, out, packed_cache, residual_cache, md.block_table[nd:],
                res_table[nd:] if res_table is not None else None, md.query_start_loc[nd:],
                md.seq_lens[nd:], layout, cfg, self.scale, bs_r, md.max_query_len, nd,
                md.num_actual_tokens, *self._flash_attn, **evicted,
            )
            return
        from vllm_kvcomp.kernels.triton_prefill import kvcomp_prefill_attention

        # query_start_loc holds absolute row offsets, so the prefill kernel
        # takes the tail of every per-request tensor and the whole q/k/v/out.
        kvcomp_prefill_attention(
            q, key, value, packed_cache, residual_cache, md.block_table[nd:],
            res_table[nd:] if res_table is not None else None,
            md.query_start_loc[nd:], md.seq_lens[nd:], layout, cfg, self.scale, bs_r,
            md.max_query_len, out, as_stored=cfg.prompt_as_stored, **evicted,
        )

    def _forward_triton_split(self, query, key, value, output, packed_cache, residual_cache,
                              md: KvcompMetadata, res_md: KvcompMetadata | None, layout,
                              quest, stream_cache, stream_md: KvcompMetadata) -> None:
        """GPU path of a layer split by a head map: the retrieval heads,
        gathered into the packed pages' head order, through ``_forward_triton``;
        the streaming heads through the stream kernel, which reads the layer's
        own query / K / V and writes its output rows in place through a head
        index (attention over sinks + window, and the store of its pages)."""
        from vllm_kvcomp.kernels.packing import round_to_window
        from vllm_kvcomp.kernels.triton_stream import stream_attention

        D = self.head_size
        T = key.shape[0]
        key = key.view(T, -1, D)
        value = value.view(T, -1, D)
        H = key.shape[1]
        q4 = query.view(T, H, -1, D)
        retrieval, streaming = self._split_index(key.device)
        q_r = q4.index_select(1, retrieval)
        out_r = torch.empty_like(q_r)
        cfg = self.config
        self._forward_triton(q_r.view(T, -1, D),
                             round_to_window(key.index_select(1, retrieval), cfg),
                             round_to_window(value.index_select(1, retrieval), cfg),
                             out_r.view(T, -1, D), packed_cache, residual_cache, md, res_md,
                             layout, quest)
        out = output.view(T, H, -1, D)
        out.index_copy_(1, retrieval, out_r)
        stream_attention(query.view(T, -1, D), key, value, stream_cache, stream_md.block_table,
                         stream_md.slot_mapping, md.query_start_loc, md.seq_lens,
                         cfg.sink_tokens, cfg.recent_tokens, self.scale, md.max_query_len,
                         out.view(T, -1, D), heads=streaming)

    def _split_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(retrieval int64, streaming int32) head indices on ``device``, made
        once: at the eager warm-up step, not inside a CUDA-graph capture."""
        cached = getattr(self, "_split_idx", None)
        if cached is None or cached[0].device != device:
            retrieval, streaming = self.head_split
            cached = (torch.tensor(retrieval, dtype=torch.long, device=device),
                      torch.tensor(streaming, dtype=torch.int32, device=device))
            self._split_idx = cached
        return cached
