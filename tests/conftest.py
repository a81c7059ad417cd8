import os
import sys
from pathlib import Path

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
