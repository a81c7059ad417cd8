"""Small, explicit hooks into vLLM where it has no extension point.

Each module patches one thing, names the vLLM version it was written against
(``VLLM_VERSION``) and the upstream function it wraps, and exposes a
``fingerprint()`` of that function's source. ``tests/test_patches.py`` fails
when upstream changes under a patch, so a vLLM upgrade cannot silently break
one. Every patch is a wrapper: it changes behaviour only when the KVCOMP
backend is selected.
"""

from __future__ import annotations

import hashlib
import inspect

VLLM_VERSION = "0.26.0"


def source_fingerprint(fn) -> str:
    src = inspect.getsource(inspect.unwrap(fn))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def apply_all() -> None:
    from vllm_kvcomp.patches import attention_layer, backend_enum, platform_hooks

    backend_enum.apply()
    platform_hooks.apply()
    attention_layer.apply()
