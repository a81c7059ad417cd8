"""`vllm serve` with the KVCOMP backend under load, on a pool small enough to
preempt (benchmarks/soak_serve.py, a smaller run than the recorded soak of
1,000 requests): every request completes with its exact token count, is
cancelled mid-stream by its client, or (too long for max_model_len) is
rejected with a 4xx; a burst sized so that its outputs outgrow the pool
preempts and still completes exactly; no 5xx, no time-outs; at the end vLLM's pool is back
to full and nothing runs or waits."""
import json
import os
import subprocess
import sys
from pathlib import Path

from e2e_util import next_port_base
from vllm_kvcomp.tiny_model import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def test_soak_serve_small(tmp_path):
    model = make_tiny_llama(str(tmp_path / "tiny"))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak_serve.py"), "--model", model,
         "--requests", "80", "--concurrency", "8", "--too-long", "0.08", "--cancel", "0.3",
         "--deadline", "900", "--seed", "1", "--burst", "8"],
        capture_output=True, text=True, timeout=1200,
        env={**os.environ, "VLLM_PORT": str(next_port_base())})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(lines[-1][7:])
    assert r["ok"], r
    assert r["5xx"] == r["timed_out"] == r["short"] == r["unexpected_4xx"] == 0, r
    # the run exercised what it is for
    assert r["cancelled"] > 0 and r["rejected"] > 0, r
    assert r["metrics_at_end"]["vllm:num_preemptions_total"] > 0, r
    assert r["complete"] + r["cancelled"] + r["rejected"] == 80, r
    assert r["burst"]["complete"] == 8, r
