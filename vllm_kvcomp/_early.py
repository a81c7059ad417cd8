"""Registers the KVCOMP enum member as soon as vLLM's backend registry loads.

vLLM parses ``LLM(attention_config={"backend": "KVCOMP"})`` (and
``--attention-config``) before it loads any plugin, so the entry point alone
is too late for that spelling. The one-line ``vllm_kvcomp_early.pth`` that
the package installs imports this module at interpreter start; it costs one
meta-path finder and imports nothing from vLLM until vLLM itself is imported.
"""

from __future__ import annotations

import importlib.abc
import sys

_TARGET = "vllm.v1.attention.backends.registry"


class _AfterRegistryImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                from vllm_kvcomp.patches import backend_enum

                backend_enum.apply()
            except Exception as exc:  # never break vLLM's own import
                print(f"vllm-kvcomp: could not register KVCOMP early: {exc}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        return
    if not any(isinstance(f, _AfterRegistryImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryImport())


install()
