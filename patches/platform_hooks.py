"""Platform hooks: backend selection on CPU and start-up validation.

1. ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN for any selected
   backend (it only logs "Cannot use ... on CPU"). Wrapped so that KVCOMP,
   when explicitly selected, is honoured; everything else is delegated.
2. ``<platform>.check_and_update_config`` runs in process 0 while the engine
   config is built. Wrapped so that an invalid kvcomp setting or an
   unsupported model fails there, with a message naming it, before any
   engine process or memory is started; kvcomp settings given without the
   KVCOMP backend fail there too, and a selected KVCOMP logs its settings.
"""

from __future__ import annotations

import functools

from vllm.platforms import current_platform

_APPLIED = False


def _wrap_cpu_selector(platform_cls) -> None:
    orig = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(orig)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm_kvcomp.names import BACKEND_NAME

        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            if attn_selector_config.use_mla:
                raise ValueError("KVCOMP does not support MLA models yet")
            return selected_backend.get_path()
        return orig(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls.__kvcomp_wrapped__ = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_config_check(platform_cls) -> None:
    orig = platform_cls.check_and_update_config.__func__

    @functools.wraps(orig)
    def check_and_update_config(cls, vllm_config):
        orig(cls, vllm_config)
        from vllm_kvcomp.validation import (
            check_settings_have_backend,
            kvcomp_selected,
            log_startup,
            validate_vllm_config,
        )

        if kvcomp_selected(vllm_config):
            log_startup(validate_vllm_config(vllm_config), vllm_config)
        else:
            check_settings_have_backend(vllm_config)

    check_and_update_config.__kvcomp_wrapped__ = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    platform_cls = type(current_platform)
    if current_platform.is_cpu():
        if not getattr(platform_cls.get_attn_backend_cls, "__kvcomp_wrapped__", False):
            _wrap_cpu_selector(platform_cls)
    if not getattr(platform_cls.check_and_update_config, "__kvcomp_wrapped__", False):
        _wrap_config_check(platform_cls)
    _APPLIED = True
