"""``benchmarks/bench_decode_kernel.py --smoke`` keeps working: the packed decode
kernel and Quest's decode (selection + attention over the selected pages) at a
tiny shape, each checked against its PyTorch reference inside the script
(max |err| < 2e-3, fp32), with a budget below the context so that Quest reads
fewer pages than the dense kernel. Triton interpreter on CPU, child process."""
from e2e_util import bench_smoke


def test_decode_bench_smoke_with_quest(tmp_path):
    """Quest's rows name the split count its attention ran with (its rule's,
    and each of ``--quest-splits``), time its selection and attention apart,
    and its scoring at each launch choice (``--quest-launches``)."""
    report, _ = bench_smoke("bench_decode_kernel.py", "--smoke", "--configs", "k4v4,k2v2,k16v16",
                            "--no-baselines", "--quest-budgets", "64", "--quest-splits", "3",
                            "--quest-launches", out=tmp_path / "smoke.json")
    rows = {row["config"]: row for row in report["rows"]}
    # Quest needs per-channel packed keys: none for 16-bit pages
    assert set(rows) == {"k4v4", "k2v2", "k16v16", "k4v4+quest64", "k2v2+quest64",
                         "k4v4+quest64-s3", "k2v2+quest64-s3"}
    for name in ("k4v4", "k2v2"):
        quest, dense = rows[f"{name}+quest64"], rows[name]
        assert quest["bytes"]["packed"] < dense["bytes"]["packed"], name
        assert quest["speedup_vs_dense"] == dense["us"] / quest["us"]
        assert quest["num_splits"] == quest["heuristic_splits"] > 1
        assert quest["quest_select_us"] > 0 and quest["quest_attention_us"] > 0
        # every scoring launch choice (each checked against the default's scores in
        # the script) and the top-k at each warp count are timed
        launches = quest["quest_launches"]
        assert len(launches["score_us"]) == 24 and len(launches["top_us"]) == 4
        assert min(launches["score_us"].values()) > 0
        swept = rows[f"{name}+quest64-s3"]
        assert swept["num_splits"] == 3 and swept["ref_max_abs_err"] < swept["ref_tol"]


def test_decode_bench_smoke_with_a_head_split(tmp_path):
    """``--head-split``: half the KV heads through the stream kernel (a window
    shorter than the context), half through the packed decode, each checked
    against its reference inside the script."""
    report, _ = bench_smoke("bench_decode_kernel.py", "--smoke", "--configs", "k4v4",
                            "--no-baselines", "--head-split", "0.5", "--sink-tokens", "4",
                            "--recent-tokens", "24", out=tmp_path / "split.json")
    rows = {row["config"]: row for row in report["rows"]}
    assert set(rows) == {"k4v4", "k4v4+split50"}
    split = rows["k4v4+split50"]
    assert split["ref_max_abs_err"] < split["ref_tol"] and split["stream_us"] > 0
    assert split["bytes"]["streaming"] > 0 and split["dense_us"] == rows["k4v4"]["us"]
