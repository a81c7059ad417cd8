"""vllm-kvcomp: a compressed (KIVI-style KV4/KV2) KV cache backend for vLLM.

``register`` is the ``vllm.general_plugins`` entry point; vLLM calls it in the
API server, the engine core and every worker, so it is idempotent.
"""

from __future__ import annotations

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm_kvcomp.patches import apply_all
    from vllm_kvcomp.spec import register_specs

    apply_all()
    register_specs()
    _REGISTERED = True


def resolve_backend_member(name: str):
    """Unpickling hook of ``AttentionBackendEnum.KVCOMP`` (see
    ``patches/backend_enum.py``): registers first, then returns the member."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]
