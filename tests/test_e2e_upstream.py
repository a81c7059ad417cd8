"""KVCOMP at 16 bits must generate exactly what upstream CPU_ATTN generates."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvcomp.tiny_model import make_tiny_llama

HERE = Path(__file__).parent


def _generate(model, backend, kv, dtype="float32"):
    out = subprocess.run(
        [sys.executable, str(HERE / "run_generate.py"), model, backend, json.dumps(kv), dtype],
        capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][7:])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def test_k16v16_matches_cpu_attn(model):
    ours = _generate(model, "kvcomp", {"k_bits": 16, "v_bits": 16, "residual_tokens": 0})
    upstream = _generate(model, "CPU_ATTN", {})
    assert all(len(t) == 16 for t in ours)
    assert ours == upstream
