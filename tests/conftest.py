import os
import sys
from pathlib import Path

import pytest

# e2e_util and engine_runner live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run under the interpreter. The switch must
# be on before anything imports triton.language (vLLM does, at collection):
# triton's own @jit helpers (tl.cdiv, tl.sum, ...) are built as interpreted
# or compiled functions when that module is first imported, and compiled ones
# cannot be called from an interpreted kernel.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """The tiny Llama the engine tests share: one path, so that a reference
    run that tests of several files compare against (``run_engine(...,
    shared=True)``) is one engine."""
    from vllm_kvcomp.tiny_model import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))
