"""Small, explicit hooks into vLLM where it has no extension point.

Each module patches one thing, names the vLLM version it was written against
(``VLLM_VERSION``) and the upstream function it wraps, and exposes a
``fingerprint()`` of that function's source. ``tests/test_patches.py`` fails
when upstream changes under a patch, so a vLLM upgrade cannot silently break
one. Every patch is a wrapper: it changes behaviour only when the KVCOMP
backend is selected.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util

VLLM_VERSION = "0.26.0"

# Upstream code each patch wraps, subclasses or relies on, with the hash of
# its source in vLLM 0.26.0 (``module:Class.function``). Read from the source
# files without importing them, so CUDA-only modules are checked on CPU too.
UPSTREAM_FINGERPRINTS = {
    # platform_hooks.py
    "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls": "62bd49f6e72a3c91",
    "vllm.platforms.cpu:CpuPlatform.check_and_update_config": "e442f2664f1fb95f",
    "vllm.platforms.cuda:CudaPlatformBase.check_and_update_config": "cb5f866a58af2525",
    "vllm.platforms.cuda:CudaPlatformBase.get_attn_backend_cls": "8a86d6b9b6748af8",
    # attention_layer.py
    "vllm.model_executor.layers.attention.attention:Attention.__init__": "6e077a73cd216c32",
    "vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec": "66290c44cc2320e6",
    # backend_enum.py
    "vllm.v1.attention.backends.registry:register_backend": "b01ecba97fc5db23",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum": "d3b90792778adb4b",
    # prompt_steps.py (the wrapped method, and the batch state it reads)
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._determine_batch_execution_and_padding": "7b647d9f2a09e811",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._is_uniform_decode": "d79b56da8d536ab9",
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.execute_model": "f2d75f2d8b5b616e",
    "vllm.v1.worker.gpu.cudagraph_utils:get_uniform_token_count": "3d6eaeb0f2466c27",
    "vllm.v1.worker.gpu.states:RequestState.__init__": "33b45b73f082331e",
    # vllm_kvcomp/spec.py (KvcompResidualManager subclasses these)
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.allocate_new_blocks": "a4ae9bf5c410bb0e",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.remove_skipped_blocks": "d53184d3e8ecb933",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.get_num_blocks_to_allocate": "963d92c2823d64fa",
    "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager.find_longest_cache_hit": "07545b251f319901",
    "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager.get_num_skipped_tokens": "e002c0f87ec1d6f8",
    "vllm.v1.kv_cache_interface:SlidingWindowSpec.max_admission_blocks_per_request": "be754f73555d3547",
}


def source_fingerprint(target: str) -> str:
    """Hash of the source of ``module:Qual.name``, found by parsing the file."""
    module, qualname = target.split(":")
    origin = importlib.util.find_spec(module).origin
    with open(origin) as f:
        text = f.read()
    node: ast.AST = ast.parse(text)
    for part in qualname.split("."):
        node = next(
            n for n in ast.iter_child_nodes(node)
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name == part
        )
    src = ast.get_source_segment(text, node)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def apply_all() -> None:
    from vllm_kvcomp.patches import attention_layer, backend_enum, platform_hooks, prompt_steps

    backend_enum.apply()
    platform_hooks.apply()
    attention_layer.apply()
    prompt_steps.apply()
