"""``benchmarks/bench_decode_kernel.py --smoke`` keeps working: the packed decode
kernel, Quest's decode (selection + attention over the selected pages), a head
split's layer and H2O / A2SF's decode and eviction steps at a tiny shape, each
checked against its PyTorch reference inside the script (max |err| < 2e-3,
fp32), with budgets below the context so that Quest reads fewer pages than the
dense kernel and eviction skips some. Triton interpreter on CPU, child process."""
import pytest
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


@pytest.mark.parametrize("rows_flag", [(), ("--eviction-rows",)])
def test_decode_bench_smoke_with_eviction(tmp_path, rows_flag):
    """``--eviction``: an H2O and an A2SF layer per config (per-channel keys,
    regrouped by the compaction, and 16-bit rows, copied), each past its
    budget: the scored decode's output is the plain launch's over the same
    positions, its accumulated mass and the eviction step's pages the
    references' (the script checks them and fails otherwise), and the
    per-step figures are the per-layer ones times the layers; the same with
    the host work on the step's eviction rows (``--eviction-rows``)."""
    report, stdout = bench_smoke("bench_decode_kernel.py", "--smoke", "--configs", "k4v4,k16v16",
                                 "--no-baselines", "--eviction", "h2o,a2sf",
                                 "--eviction-budget", "64", "--num-layers", "4", *rows_flag,
                                 out=tmp_path / "eviction.json")
    rows = {row["config"]: row for row in report["rows"]}
    tag = "+rows" if rows_flag else ""
    assert set(rows) == {"k4v4", "k16v16", f"k4v4+h2o64{tag}", f"k4v4+a2sf64{tag}",
                         f"k16v16+h2o64{tag}", f"k16v16+a2sf64{tag}"}
    for name in ("k4v4", "k16v16"):
        for method in ("h2o", "a2sf"):
            r = rows[f"{name}+{method}64{tag}"]
            assert r["recent_tokens"] == 32 and r["seq_len"] <= r["context"]
            # the pages between the heavy hitters and the recent tokens are skipped
            lo, hi = r["evicted"]
            assert 0 < lo < hi and r["read_tokens"] == r["seq_len"] - (hi - lo) == \
                r["probs_width"]
            assert r["checks_ok"] and r["out_equal"] and r["out_max_abs_diff"] == 0
            assert r["ref_max_abs_err"] < r["ref_tol"]
            assert r["mass_accumulated"] and r["mass_max_abs_err"] < r["mass_tol"]
            # every request evicts a page: a page's worth of candidates more than it keeps
            assert r["compacted"] and r["compact_equal"]
            # the pieces as KVCOMP_EVICTION_GRAPHS captures them ran (timed once on the host)
            assert r["graph_probs_width"] >= r["probs_width"]
            assert all(r[k] > 0 for k in ("graph_kept_us", "graph_probs_us", "graph_scores_us",
                                          "graph_logits_us",
                                          "graph_layer_us", "graph_layer_logits_us",
                                          "graph_select_idle_us",
                                          "graph_select_all_us", "graph_select_kernel_idle_us",
                                          "graph_select_kernel_all_us",
                                          "graph_select_rows_idle_us",
                                          "graph_select_rows_all_us"))
            assert r["evict_candidates"] - r["evict_kept"] == 32
            assert min(r["plain_us"], r["kept_us"], r["scored_us"], r["evict_us"]) > 0
            assert r["overhead_us"] == r["scored_us"] - r["kept_us"]
            assert r["overhead_step_us"] == 4 * r["overhead_us"]
            assert r["evict_amortized_step_us"] == 4 * r["evict_us"] / 32
            assert r["eviction_step_us"] == r["overhead_step_us"] + r["evict_amortized_step_us"]
    assert "eviction overhead per decode step" in stdout
    # the decode table, the eager eviction table and the captured one
    assert stdout.count(f"+h2o64{tag} |") == 6 and stdout.count(f"+a2sf64{tag} |") == 6
