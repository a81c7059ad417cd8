"""``benchmarks/side_by_side.py`` puts the all-format table together from recorded runs:
the newest complete run a cell, vLLM's default engine settings only, one card, and a
setting's cell filled by a run of another name that starts the same engine."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import side_by_side  # noqa: E402


def row(setting, workload, tok_s, completed=256, requests=256):
    return dict(setting=setting, workload=workload, output_tok_s=tok_s, completed=completed,
                requests=requests, kv_cache_tokens=1000, ttft_p50=1.0, ttft_p99=2.0,
                tpot_p50=0.02, tpot_p99=0.03)


def record(results: Path, folder: str, date: str, rows, device="NVIDIA H200", fast=False):
    (results / folder).mkdir(parents=True)
    command = "bench_e2e.py --workload W4" + (" --fast-start" if fast else "")
    (results / folder / "e2e.json").write_text(json.dumps(
        dict(device=device, date=date, workload="W4", command=command, rows=rows)))


def test_table_takes_the_newest_complete_default_run_of_each_engine(tmp_path):
    record(tmp_path, "2026-12-01-h200", "2026-12-01",
           [row("bf16", "W4", 4000.0), row("kvcomp_k4v4", "W4", 7000.0)])
    # newer: bf16 again, a k4v4 run cut short (left out), the default k4v4 engine under the
    # name it was measured by before it became the default
    record(tmp_path, "2026-12-04-h200", "2026-12-04",
           [row("bf16", "W4", 4400.0), row("kvcomp_k4v4", "W4", 9000.0, completed=200),
            row("kvcomp_k4v4_ring_g64", "W4", 8800.0)])
    # fast start, another card, and a run before --since: none of them counts
    record(tmp_path, "2026-12-05-h200-fast", "2026-12-05", [row("bf16", "W4", 9999.0)],
           fast=True)
    record(tmp_path, "2026-12-05-h100", "2026-12-05", [row("bf16", "W4", 1.0)],
           device="NVIDIA H100 80GB HBM3")
    table = side_by_side.newest(tmp_path, "H200", "2026-12-01")
    out = side_by_side.render(table, ["bf16", "kvcomp_k4v4", "fp8"], ["W4"])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()
             if line.startswith("| ") and "setting" not in line}
    assert "| 4,400 | 1.00x |" in lines["bf16"]
    assert "| 8,800 | 2.00x |" in lines["kvcomp_k4v4"]
    assert "as kvcomp_k4v4_ring_g64" in lines["kvcomp_k4v4"]
    assert "not measured" in lines["fp8"]
    assert "2026-12-04-h200/README.md" in lines["kvcomp_k4v4"]
    # --since after the newer runs leaves no cell
    assert side_by_side.newest(tmp_path, "H200", "2026-12-06") == {}


def test_a_ratio_against_another_days_bf16_says_so(tmp_path):
    record(tmp_path, "2026-12-01-h200", "2026-12-01", [row("bf16", "W4", 4000.0)])
    record(tmp_path, "2026-12-03-h200", "2026-12-03", [row("kvcomp_k2v2", "W4", 6000.0)])
    out = side_by_side.render(side_by_side.newest(tmp_path, "H200", ""),
                              ["kvcomp_k2v2"], ["W4"])
    assert "1.50x (bf16 of 2026-12-01)" in out
