"""``benchmarks/bench_prefill_kernel.py`` keeps working: its ``--smoke`` mode
builds the three benchmark cases at a tiny shape, checks the kernel against the
PyTorch reference on each, runs the launch grid (one config the wrapper must
reject included) and picks ``BEST_LAUNCH`` among the configs that agree. Triton
interpreter on CPU, in a child process (~10 s)."""
from e2e_util import bench_smoke
from vllm_kvcomp.launch_env import parse_prefill_launch


def test_prefill_bench_smoke(tmp_path):
    report, stdout = bench_smoke("bench_prefill_kernel.py", "--smoke",
                                 out=tmp_path / "smoke.json")
    best = stdout.strip().splitlines()[-1]
    assert best.startswith("BEST_LAUNCH=")
    launch = parse_prefill_launch(best.split("=", 1)[1])
    assert set(launch) == {"block_rows", "block_n", "num_warps", "num_stages"}
    assert set(report["cases"]) == {"w1", "chunk2", "8x2048"}
    for name, case in report["cases"].items():
        rows = {row["config"]: row for row in case["rows"]}
        # the rejected config is recorded with the wrapper's reason, not dropped
        assert any("key tiles of >= 16 tokens" in row.get("error", "") for row in rows.values())
        assert rows[case["best"]]["ok"], name
    assert report["best_launch"] == best.split("=", 1)[1]
