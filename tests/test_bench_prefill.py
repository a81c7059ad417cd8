"""``benchmarks/bench_prefill_kernel.py`` keeps working: its ``--smoke`` mode
builds the three benchmark cases at a tiny shape, checks the kernel against the
PyTorch reference on each, runs the launch grid (one config the wrapper must
reject included) and picks ``BEST_LAUNCH`` among the configs that agree. Triton
interpreter on CPU, in a child process (~10 s)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from vllm_kvcomp.launch_env import parse_prefill_launch

ROOT = Path(__file__).resolve().parents[1]


def test_prefill_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill_kernel.py"),
                        "--smoke", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    best = r.stdout.strip().splitlines()[-1]
    assert best.startswith("BEST_LAUNCH=")
    launch = parse_prefill_launch(best.split("=", 1)[1])
    assert set(launch) == {"block_rows", "block_n", "num_warps", "num_stages"}
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"w1", "chunk2", "8x2048"}
    for name, case in report["cases"].items():
        rows = {row["config"]: row for row in case["rows"]}
        # the rejected config is recorded with the wrapper's reason, not dropped
        assert any("key tiles of >= 16 tokens" in row.get("error", "") for row in rows.values())
        assert rows[case["best"]]["ok"], name
    assert report["best_launch"] == best.split("=", 1)[1]
