# This folder is installed as ``vllm_kvcomp.kernels``. Python run from a
# checkout's root (``python -m pytest``, ``python -m ...``) also finds it as
# top-level ``kernels``: the import name of Hugging Face's kernel hub package,
# which transformers imports whenever that distribution is installed (it is
# a dependency of recent transformers). Under that name, step aside for the
# real package so that importing transformers does not break.
if __name__ == "kernels":
    import importlib
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = list(sys.path)
    _ours = sys.modules.pop("kernels", None)
    sys.path[:] = [
        p for p in sys.path if os.path.abspath(p or os.curdir) != _here
    ]
    try:
        importlib.import_module("kernels")
    except ImportError:
        # Nothing else answers to the name: stay an empty package (no version
        # metadata, so transformers treats the hub package as absent).
        sys.modules["kernels"] = _ours
    finally:
        sys.path[:] = _saved_path
