"""``vllm_kvcomp.kernels`` for the benchmark scripts, installed or not.

The kernels are installed as ``vllm_kvcomp.kernels``; on a bare GPU box (no
``pip install``) the repo's ``kernels/`` is mapped onto that name. The scripts
import this module from their own folder (``sys.path[0]``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def import_kernels() -> None:
    try:
        import vllm_kvcomp.kernels  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        import vllm_kvcomp  # noqa: F401

        spec = importlib.util.spec_from_file_location(
            "vllm_kvcomp.kernels", root / "kernels" / "__init__.py",
            submodule_search_locations=[str(root / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vllm_kvcomp.kernels"] = mod
        spec.loader.exec_module(mod)
