"""Start-up checks, run in process 0 while vLLM builds its config.

Everything that KVCOMP cannot serve correctly yet is refused here with a
message that names it; nothing is silently computed differently.
"""

from __future__ import annotations

import os

from vllm_kvcomp.config import KvcompConfig, KvcompConfigError, config_from_vllm_config
from vllm_kvcomp.names import FORCE_TRITON_ENV
from vllm_kvcomp.launch_env import (
    DECODE_LAUNCH_ENV,
    PREFILL_LAUNCH_ENV,
    check_switches,
    parse_decode_launch,
    parse_prefill_launch,
    switch,
)


def _on_cpu_path(on_cpu: bool | None) -> bool:
    """Whether attention runs the PyTorch reference (the CPU platform, Triton
    not forced): what policies without a GPU run yet need."""
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    return on_cpu and not switch(FORCE_TRITON_ENV)


def kvcomp_selected(vllm_config) -> bool:
    from vllm_kvcomp.names import BACKEND_NAME

    attn = getattr(vllm_config, "attention_config", None)
    backend = getattr(attn, "backend", None)
    if backend is not None and getattr(backend, "name", None) == BACKEND_NAME:
        return True
    per_kind = getattr(attn, "backend_per_kind", None) or {}
    return any(getattr(b, "name", b) == BACKEND_NAME for b in per_kind.values())


def check_settings_have_backend(vllm_config) -> None:
    """kvcomp settings without ``--attention-backend kvcomp`` would serve with
    an uncompressed cache while the user believes it compressed (and would
    hide a bad setting): an error naming both, not a silent bf16 run."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if isinstance(extra, dict) and "kvcomp" in extra:
        attn = getattr(vllm_config, "attention_config", None)
        backend = getattr(getattr(attn, "backend", None), "name", None) or "vLLM's default"
        raise KvcompConfigError(
            f"kvcomp settings {extra['kvcomp']!r} were given but the attention backend is "
            f"{backend}: add --attention-backend kvcomp (LLM(..., attention_backend='kvcomp')), "
            "or drop the kvcomp settings")


def capacity_ratio(cfg: KvcompConfig, vllm_config) -> float:
    """KV tokens per byte against the model dtype's cache, for one request of
    ``max_model_len`` tokens as vLLM's start-up check counts it: packed pages
    for Q(max_model_len) tokens plus the residual window's admission cap."""
    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    n, heads, head = mc.max_model_len, mc.get_num_kv_heads(pc), mc.get_head_size()
    split = served_head_split(cfg)
    # heads: this rank's; the split counts every rank's
    retrieval = heads - split.num_streaming // pc.tensor_parallel_size if split else heads
    packed = packed_spec(cfg, vllm_config.cache_config.block_size, retrieval, head, mc.dtype)
    used = packed.max_memory_usage_bytes(vllm_config)
    if cfg.needs_residual_cache:
        res = residual_spec(packed, vllm_config.max_concurrent_batches)
        used += res.max_admission_blocks_per_request(0, n) * res.page_size_bytes
    if split:
        from vllm_kvcomp.stream_layer import stream_spec

        used += stream_spec(cfg, packed, split.num_streaming // pc.tensor_parallel_size,
                            vllm_config.max_concurrent_batches).max_memory_usage_bytes(vllm_config)
    return n * 2 * heads * head * mc.dtype.itemsize / used


def log_startup(cfg: KvcompConfig, vllm_config) -> None:
    from vllm.logger import init_logger

    if vllm_config.cache_config.num_gpu_blocks is not None:
        return  # vLLM's check after sizing the KV cache: logged on the first pass

    # the values in force, not "auto" / None
    mc = vllm_config.model_config
    resolved = {**cfg.to_dict(), "block_size": vllm_config.cache_config.block_size,
                "prompt_attention": "as_stored" if cfg.prompt_as_stored else "full_precision"}
    if mc is not None:
        resolved["value_group_size"] = cfg.value_group(mc.get_head_size())
    if resolved.get("residual_dtype") == "auto":
        if mc is not None:
            resolved["residual_dtype"] = str(mc.dtype).replace("torch.", "")
        else:
            resolved.pop("residual_dtype")
    if resolved.get("head_map") is None:
        # the head split's own settings mean nothing without a map
        for key in ("head_map", "streaming_ratio", "sink_tokens", "recent_tokens"):
            resolved.pop(key, None)
    elif served_head_split(cfg):
        split = served_head_split(cfg)
        resolved["head_split"] = (f"{split.num_retrieval} retrieval + {split.num_streaming} "
                                  "streaming KV heads per layer")
    if resolved.get("eviction") is None:
        resolved.pop("eviction", None)
    else:  # the method's own settings, not the other methods' defaults
        from vllm_kvcomp.config import EVICTION_SETTINGS

        ev = resolved["eviction"]
        resolved["eviction"] = {k: ev[k] for k in ("method", *EVICTION_SETTINGS[ev["method"]])
                                if ev[k] is not None}
    if resolved.get("quest") is None:
        resolved.pop("quest", None)
    no_hits = prefix_hits_refused(cfg)
    if no_hits and vllm_config.cache_config.enable_prefix_caching:
        resolved["prefix_caching"] = f"no hits ({no_hits})"
    settings = ", ".join(f"{k}={v}" for k, v in resolved.items())
    ratio = capacity_ratio(cfg, vllm_config) if mc is not None else float("nan")
    init_logger("vllm.kvcomp").info(
        "KVCOMP attention backend: %s; KV capacity %.2fx the %s cache at "
        "max_model_len %d", settings, ratio,
        str(mc.dtype).replace("torch.", "") if mc is not None else "model dtype",
        mc.max_model_len if mc is not None else 0)


def prefix_hits_refused(cfg: KvcompConfig) -> str | None:
    """Why settings get no prefix-cache hits with prefix caching on, if they
    get none: the start-up line says so rather than leave a user to find it
    in the hit rate."""
    if cfg.eviction is not None:
        return (f"eviction {cfg.eviction.method} drops or moves a request's tokens once "
                "cached, so its pages are never hashed")
    if cfg.residual_ring and cfg.residual_tokens > 0:
        return (f"the window ring always holds at least {cfg.residual_tokens} tokens and is "
                "never hashed; \"residual_ring\": false keeps hits")
    return None


def _sliding_window_layers(hf_config) -> str | None:
    sw = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any("sliding" in str(t) for t in layer_types):
        return "sliding-window attention layers (layer_types)"
    use_sw = getattr(hf_config, "use_sliding_window", True)
    if sw is not None and use_sw and not layer_types:
        return f"sliding-window attention (sliding_window={sw})"
    if getattr(hf_config, "attention_chunk_size", None):
        return "chunked local attention"
    return None


def served_head_split(cfg: KvcompConfig):
    """The head map's split as served (``policies.head_map.served_split``);
    ``None`` without a map or when no head streams."""
    if cfg.head_map is None:
        return None
    from vllm_kvcomp.policies.head_map import load_served_split

    split = load_served_split(cfg.head_map, cfg.streaming_ratio)
    return split if split.num_streaming else None


def check_head_map(cfg: KvcompConfig, hf_config) -> None:
    """Load ``cfg.head_map``, check it against the model's layers and KV heads
    and that it can be served (the same number of streaming heads in every
    layer, at least one retrieval head)."""
    from vllm_kvcomp.policies.head_map import HeadMapError, load_head_map, served_split

    try:
        head_map = load_head_map(cfg.head_map)
        if hf_config is not None:
            layers = hf_config.num_hidden_layers
            kv_heads = getattr(hf_config, "num_key_value_heads", None) or \
                hf_config.num_attention_heads
            head_map.check_model_shape(layers, kv_heads)
        served_split(head_map, cfg.streaming_ratio)
    except HeadMapError as e:
        raise KvcompConfigError(f"kvcomp head_map: {e}") from None


def check_tensor_parallel(cfg: KvcompConfig, tp_size: int, hf_config,
                          on_cpu: bool | None = None) -> None:
    """Each rank packs, windows, evicts and selects pages for its own KV heads,
    which needs every rank to hold distinct heads (vLLM replicates KV heads
    when there are fewer than ranks) and, with a head map, the same number of
    streaming heads on every rank and layer (one KV cache config for all)."""
    if tp_size == 1:
        return
    if not _on_cpu_path(on_cpu):
        raise KvcompConfigError(
            f"kvcomp with tensor parallelism (tensor_parallel_size={tp_size}) runs only on "
            "the CPU path for now: the GPU (Triton) path has not run with more than one "
            "rank yet; use tensor_parallel_size=1")
    if hf_config is not None:
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or \
            hf_config.num_attention_heads
        if kv_heads < tp_size or kv_heads % tp_size:
            raise KvcompConfigError(
                f"kvcomp needs the model's KV heads split evenly over the tensor-parallel "
                f"ranks, but the model has {kv_heads} KV heads and tensor_parallel_size="
                f"{tp_size} (vLLM would replicate KV heads over ranks); use a "
                "tensor_parallel_size that divides the number of KV heads")
    split = served_head_split(cfg)
    if split is not None:
        from vllm_kvcomp.policies.head_map import HeadMapError, check_ranks

        try:
            check_ranks(split, tp_size)
        except HeadMapError as e:
            raise KvcompConfigError(f"kvcomp head_map {cfg.head_map!r}: {e}") from None


# what the GPU (Triton) path evicts with (kernels/eviction_gpu.py)
GPU_EVICTION = ("snapkv", "streamingllm", "h2o", "a2sf")
# those of them whose engines have served on a GPU (H200, vLLM's default engine
# settings: benchmarks/results/2026-12-04-h200-quest-eviction; A2SF in
# 2026-12-04-h200-w4-eviction-rows), SnapKV and H2O beside a head map and SnapKV
# under Quest too (2026-12-04-h200-window-defaults-quest); a head map, eviction and
# Quest all in one layer have not run there
GPU_RUN_EVICTION = ("snapkv", "streamingllm", "h2o", "a2sf")


def check_eviction_platform(cfg: KvcompConfig, on_cpu: bool | None = None) -> None:
    """Eviction frees pages whose block-table entries then go stale; the
    Triton kernels skip them (``kernels/eviction_gpu.py``). A GPU serves the
    methods that path has, and a method whose engine has not yet run on a GPU
    only when asked to (``KVCOMP_EVICTION_GPU=1``)."""
    from vllm_kvcomp.launch_env import EVICTION_GPU_ENV

    if cfg.eviction is None or _on_cpu_path(on_cpu):
        return
    method = cfg.eviction.method
    if method not in GPU_EVICTION:
        raise KvcompConfigError(
            f"kvcomp eviction (method={method!r}) runs only on the CPU path: the GPU (Triton) "
            f"path evicts with {list(GPU_EVICTION)}; remove eviction from the kvcomp settings "
            "or choose one of those")
    asked = switch(EVICTION_GPU_ENV)
    if cfg.quest is not None and cfg.head_map is not None and not asked:
        raise KvcompConfigError(
            f"kvcomp eviction (method={method!r}) with quest and a head_map runs only on the "
            "CPU path by default: the three in one layer have passed their interpreter tests "
            "but have not yet served on a GPU (each pair has); remove one of them, or set "
            f"{EVICTION_GPU_ENV}=1 to serve it unverified")
    if method not in GPU_RUN_EVICTION and not asked:
        raise KvcompConfigError(
            f"kvcomp eviction (method={method!r}) runs only on the CPU path by default: its "
            "GPU (Triton) path has passed its interpreter tests and an sm_90 build but has "
            f"not yet served on a GPU; choose one of {list(GPU_RUN_EVICTION)}, or set "
            f"{EVICTION_GPU_ENV}=1 to serve it unverified")


def request_prompt_lengths(cfg: KvcompConfig, model_config) -> None:
    """SnapKV selects in the step that completes a prompt, and H2O / A2SF
    evict only from there on, so the attention needs each request's prompt
    length. vLLM hands prompt lengths to the
    attention metadata (``rswa_prefix_lens``) when the model declares a
    reference sliding window; declaring one (of no width that any KVCOMP
    layer reads) asks for them. Only other backends' builders read the window
    itself, and every attention layer runs on KVCOMP."""
    if (cfg.eviction is None or cfg.eviction.method not in ("snapkv", "h2o", "a2sf")
            or model_config is None):
        return
    if model_config.rswa_window not in (None, 1):  # 1: asked already
        raise KvcompConfigError(
            f"kvcomp eviction {cfg.eviction.method} cannot serve a model with reference "
            "sliding-window attention (rswa_window)")
    model_config.model_arch_config.rswa_window = 1


def validate_vllm_config(vllm_config) -> KvcompConfig:
    cfg = config_from_vllm_config(vllm_config)
    try:
        # the kernel modules read them only at the first prefill / decode
        parse_prefill_launch(os.environ.get(PREFILL_LAUNCH_ENV, ""))
        parse_decode_launch(os.environ.get(DECODE_LAUNCH_ENV, ""))
        check_switches()
    except ValueError as e:
        raise KvcompConfigError(str(e)) from None
    problems: list[str] = []
    mc = vllm_config.model_config
    if mc is not None:
        hf = mc.hf_text_config
        if mc.use_mla:
            problems.append("MLA attention (e.g. DeepSeek-V2/V3)")
        if mc.is_encoder_decoder:
            problems.append("encoder-decoder models")
        if getattr(mc, "is_hybrid", False) or getattr(mc, "has_noops", False):
            problems.append("hybrid models with non-attention (e.g. Mamba) layers")
        sw = _sliding_window_layers(hf)
        if sw:
            problems.append(sw)
        if getattr(hf, "model_type", "") in ("gemma2", "gemma3", "gemma3_text", "cohere2"):
            problems.append(f"model type {hf.model_type} (interleaved sliding-window layers)")
        if getattr(mc, "is_attention_free", False):
            problems.append("attention-free models")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        problems.append(f"pipeline parallelism (pipeline_parallel_size={pc.pipeline_parallel_size})")
    if getattr(pc, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism")
    if getattr(pc, "use_ubatching", False) and cfg.eviction is not None:
        from vllm_kvcomp.kernels.eviction_gpu import graph_eviction

        # micro-batches would share the one prompt-length buffer (unset: eager)
        if graph_eviction(cfg, vllm_config):
            problems.append("micro-batching (--enable-dbo / ubatch_size) with "
                            "KVCOMP_EVICTION_GRAPHS=1 (unset or 0, such an engine runs "
                            "eviction's decode steps eagerly)")
    cc = vllm_config.cache_config
    if cc.cache_dtype not in ("auto", None):
        problems.append(
            f"--kv-cache-dtype {cc.cache_dtype} (KVCOMP quantizes the cache itself; "
            "set k_bits/v_bits in --additional-config instead)"
        )
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV transfer connectors")
    if problems:
        raise KvcompConfigError(
            "the KVCOMP attention backend does not support: " + "; ".join(problems)
        )

    if mc is not None:
        head = mc.get_head_size()
        groups = []
        if cfg.v_bits < 16:
            groups.append(("value_group_size" if cfg.value_group_size else "group_size",
                           cfg.value_group(head)))
        if cfg.k_bits < 16 and cfg.key_axis == "token":
            groups.append(("group_size", cfg.key_channel_group(head)))
        for name, g in groups:
            if head % g:
                raise KvcompConfigError(
                    f"kvcomp {name}={g} does not divide the model's head size {head} "
                    f"(channels are quantized in groups of {g} per token)"
                )

    if cfg.head_map is not None:
        check_head_map(cfg, mc.hf_text_config if mc is not None else None)
    check_tensor_parallel(cfg, pc.tensor_parallel_size,
                          mc.hf_text_config if mc is not None else None)
    check_eviction_platform(cfg)
    request_prompt_lengths(cfg, mc)

    align = cfg.key_token_align
    if cc.num_gpu_blocks is not None:
        # vLLM checks the config again once the KV cache is sized, with
        # block_size then the smallest group's (the window's pages): the
        # packed pages' block size was settled on the first pass.
        pass
    elif cfg.block_size is not None:
        if cc.user_specified_block_size and cc.block_size != cfg.block_size:
            raise KvcompConfigError(
                f"--block-size {cc.block_size} conflicts with kvcomp block_size={cfg.block_size}"
            )
        cc.block_size = cfg.block_size
    elif cc.block_size % align:
        if cc.user_specified_block_size:
            raise KvcompConfigError(
                f"--block-size {cc.block_size} must be a multiple of kvcomp group_size="
                f"{cfg.group_size} (keys are quantized per channel in token groups)"
            )
        cc.block_size = (cc.block_size // align + 1) * align
    if cfg.quest is not None:
        cfg.quest.check_block_size(cc.block_size)
    if cfg.needs_residual_cache and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise KvcompConfigError(
            "kvcomp's full-precision residual window needs vLLM's hybrid KV cache "
            "manager; remove --disable-hybrid-kv-cache-manager, or set residual_tokens=0 "
            "with key_axis='token'"
        )
    if cfg.head_map is not None and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise KvcompConfigError(
            "kvcomp head_map keeps the streaming heads in a KV cache group of their own, which "
            "needs vLLM's hybrid KV cache manager; remove --disable-hybrid-kv-cache-manager")
    return cfg
