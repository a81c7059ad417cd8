"""``benchmarks/bench_kv_manager_cpu.py`` keeps working: vLLM's KVCacheManager
with kvcomp's two groups (packed pages + window) serves decode steps of a few
requests, and holds what the managers say it should."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kv_manager_bench_smoke(tmp_path):
    out = tmp_path / "kv.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kv_manager_cpu.py"),
                        "--requests", "8", "--prompt", "300", "--steps", "140", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["setting"]: x for x in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bf16", "kvcomp_k4v4", "kvcomp_k4v4_r128"}
    # 300 + 140 tokens: k4v4 (no window) packs [0, 384) (three pages), the
    # 128-token window leaves [0, 256) (two)
    assert rows["kvcomp_k4v4"]["packed_pages_per_request"] == 3
    assert rows["kvcomp_k4v4_r128"]["packed_pages_per_request"] == 2
    assert all(x["ms_per_step_median"] > 0 for x in rows.values())
