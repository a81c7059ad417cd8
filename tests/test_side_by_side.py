"""``benchmarks/side_by_side.py`` puts the all-format table together from recorded runs:
the newest complete run a cell, vLLM's default engine settings only, one card, and a
setting's cell filled by a run of another name that started the same engine, never by a
run of the same name whose engine has changed since."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import side_by_side  # noqa: E402
from bench_e2e import engine_identity  # noqa: E402

DEFAULT_RUN = "bench_e2e.py --max-num-seqs 512 --kv-gib 54.3 --workload W4"


def row(setting, tok_s, completed=256, engine=None, **kw):
    r = dict(setting=setting, workload="W4", output_tok_s=tok_s, completed=completed,
             requests=256, kv_cache_tokens=1000.0, ttft_p50=1.0, ttft_p99=2.0,
             tpot_p50=0.02, tpot_p99=0.03, **kw)
    if engine is not None:
        r["engine"] = engine
    return r


def record(results: Path, folder: str, date: str, rows, device="NVIDIA H200",
           command=DEFAULT_RUN, name="e2e.json"):
    (results / folder).mkdir(parents=True, exist_ok=True)
    (results / folder / name).write_text(json.dumps(
        dict(device=device, date=date, workload="W4", command=command, rows=rows)))


def cells(table, settings):
    out = side_by_side.render(table, settings, ["W4"])
    return {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()
            if line.startswith("| ") and "setting" not in line}


def test_table_takes_the_newest_complete_default_run_of_each_engine(tmp_path):
    record(tmp_path, "2026-12-04-h200", "2026-12-04",
           [row("bf16", 4000.0), row("kvcomp_k4v4", 7000.0)])
    # newer: bf16 again, a k4v4 run cut short (left out), the default k4v4 engine under the
    # name it was measured by before it became the default, with its KV tokens unknown
    record(tmp_path, "2026-12-05-h200", "2026-12-05",
           [row("bf16", 4400.0), row("kvcomp_k4v4", 9000.0, completed=200),
            dict(row("kvcomp_k4v4_ring_g64", 8800.0), kv_cache_tokens=None)])
    # none of these counts: fast start, eager, another KV size, another card
    for i, cmd in enumerate((DEFAULT_RUN + " --fast-start", DEFAULT_RUN + " --eager",
                             DEFAULT_RUN.replace("54.3", "20"))):
        record(tmp_path, f"2026-12-06-h200-{i}", "2026-12-06", [row("bf16", 9999.0)],
               command=cmd)
    record(tmp_path, "2026-12-06-h100", "2026-12-06", [row("bf16", 1.0)],
           device="NVIDIA H100 80GB HBM3")
    lines = cells(side_by_side.newest(tmp_path, "H200", "2026-12-04"),
                  ["bf16", "kvcomp_k4v4", "fp8"])
    assert "| 4,400 | 1.00x |" in lines["bf16"]
    assert "| ? | 8,800 | 2.00x |" in lines["kvcomp_k4v4"]
    assert "2026-12-05-h200/README.md) as kvcomp_k4v4_ring_g64" in lines["kvcomp_k4v4"]
    assert "not measured" in lines["fp8"]


def test_rows_without_their_engine_count_only_since_the_defaults_came_in(tmp_path):
    record(tmp_path, "2026-12-01-h200", "2026-12-01",
           [row("bf16", 4000.0), row("kvcomp_k2v2", 6000.0)])
    assert side_by_side.newest(tmp_path, "H200", "2026-12-02") == {}
    out = side_by_side.render(side_by_side.newest(tmp_path, "H200", "2026-12-01"),
                              ["kvcomp_k2v2"], ["W4"])
    assert "1.50x" in out


def test_a_recorded_engine_decides_the_cell_not_the_name(tmp_path):
    """A run of kvcomp_k4v4 recorded under an older default layout (its engine text says
    so) does not fill today's kvcomp_k4v4 cell, whatever --since says; a run recorded
    with today's identity does, with a ratio that names bf16's other day."""
    record(tmp_path, "2026-12-01-h200", "2026-12-01", [row("bf16", 4000.0)])
    stale = engine_identity("kvcomp_k4v4").replace("group_size=64", "group_size=128")
    assert stale != engine_identity("kvcomp_k4v4")
    record(tmp_path, "2026-12-02-h200", "2026-12-02",
           [row("kvcomp_k4v4", 9000.0, engine=stale)])
    assert "not measured" in cells(side_by_side.newest(tmp_path, "H200", "2026-12-01"),
                                   ["kvcomp_k4v4"])["kvcomp_k4v4"]
    record(tmp_path, "2026-12-03-h200", "2026-12-03",
           [row("kvcomp_k4v4", 6000.0, engine=engine_identity("kvcomp_k4v4"))])
    line = cells(side_by_side.newest(tmp_path, "H200", "2026-12-09"),
                 ["kvcomp_k4v4"])["kvcomp_k4v4"]
    assert "| 6,000 |" in line and "not measured" not in line


def test_engine_identity_reads_the_switches_as_the_engine_does():
    """A setting's _env that names a switch's default starts the engine its plain twin
    does; one that turns a switch over starts another."""
    plain = engine_identity("kvcomp_k4v4_h2o2048")
    assert engine_identity("kvcomp_k4v4_h2o2048", {"KVCOMP_SELECT_KERNEL": "1"}) == plain
    assert engine_identity("kvcomp_k4v4_h2o2048", {"KVCOMP_EVICTION_GRAPHS": "1"}) == plain
    assert engine_identity("kvcomp_k4v4_h2o2048_eager") != plain
    assert engine_identity("kvcomp_k4v4_h2o2048_torch_rows") != plain
    assert engine_identity("kvcomp_k4v4_split50") != engine_identity("kvcomp_k4v4")


def test_switches_that_do_not_act_on_an_engine_do_not_split_its_cells(tmp_path):
    """A run recorded every switch as it read: one without eviction, recorded while
    eviction's decode steps were eager by default, fills the current cell; an H2O run
    recorded with eager decode steps does not fill the current H2O cell (captured), but
    fills the cell of the setting that names eager steps."""
    old = json.loads(engine_identity("kvcomp_k4v4"))
    old["switches"] = {"KVCOMP_FORCE_TRITON": False, "KVCOMP_STORE_SPLIT": False,
                       "KVCOMP_EVICTION_GRAPHS": False, "KVCOMP_SELECT_KERNEL": True}
    h2o_eager = json.loads(engine_identity("kvcomp_k4v4_h2o2048_eager"))
    assert h2o_eager["switches"]["KVCOMP_EVICTION_GRAPHS"] is False
    assert json.loads(engine_identity("kvcomp_k4v4_h2o2048"))["switches"][
        "KVCOMP_EVICTION_GRAPHS"] is True
    record(tmp_path, "2026-12-05-h200", "2026-12-05",
           [row("kvcomp_k4v4", 7000.0, engine=json.dumps(old)),
            row("kvcomp_k4v4_h2o2048", 6000.0, engine=json.dumps(h2o_eager))])
    lines = cells(side_by_side.newest(tmp_path, "H200", "2026-12-09"),
                  ["kvcomp_k4v4", "kvcomp_k4v4_h2o2048", "kvcomp_k4v4_h2o2048_eager"])
    assert "| 7,000 |" in lines["kvcomp_k4v4"]
    assert "not measured" in lines["kvcomp_k4v4_h2o2048"]
    assert "| 6,000 |" in lines["kvcomp_k4v4_h2o2048_eager"]


def test_a_runs_second_group_fills_cells_and_other_files_do_not(tmp_path):
    """``gpu_check.sh``'s step e2e2 writes a second group of runs to ``e2e2.json`` beside
    ``e2e.json``; older folders hold other JSON files of other shapes, never read."""
    record(tmp_path, "2026-12-05-h200", "2026-12-05", [row("bf16", 4000.0)])
    record(tmp_path, "2026-12-05-h200", "2026-12-05", [row("kvcomp_k2v2", 10000.0)],
           name="e2e2.json")
    (tmp_path / "2026-12-05-h200" / "e2e_w4_old.json").write_text(json.dumps([1, 2]))
    lines = cells(side_by_side.newest(tmp_path, "H200", "2026-12-04"), ["bf16", "kvcomp_k2v2"])
    assert "| 10,000 | 2.50x |" in lines["kvcomp_k2v2"]


def test_a_comma_list_of_cards_gives_a_section_each(tmp_path, capsys):
    record(tmp_path, "2026-12-05-h200", "2026-12-05", [row("bf16", 4000.0)])
    record(tmp_path, "2026-12-05-h100", "2026-12-05", [row("bf16", 3000.0)],
           device="NVIDIA H100 80GB HBM3")
    side_by_side.main(["--device", "H100,H200", "--since", "2026-12-04", "--workloads", "W4",
                       "--settings", "bf16", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    h100, h200 = out.split("## H100")[1].split("## H200")
    assert "| 3,000 | 1.00x |" in h100 and "4,000" not in h100
    assert "| 4,000 | 1.00x |" in h200 and "3,000" not in h200


def test_a_cut_run_fills_only_a_cell_no_whole_run_fills_and_says_so(tmp_path):
    record(tmp_path, "2026-12-05-h200", "2026-12-05",
           [row("bf16", 4000.0), row("fp8", 5000.0),
            # cut by --timeout: no rate of its own
            {"setting": "int4_per_token_head", "workload": "W4", "error": "timed out"}])
    record(tmp_path, "2026-12-06-h200", "2026-12-06",
           [row("fp8", 9000.0, completed=30, cut_after_s=420.0),
            row("int4_per_token_head", 1000.0, completed=12, cut_after_s=420.0)])
    lines = cells(side_by_side.newest(tmp_path, "H200", "2026-12-04"),
                  ["fp8", "int4_per_token_head"])
    assert "| 5,000 | 1.25x |" in lines["fp8"]  # the older whole run wins
    assert ("| 1,000 over the first 420 s (12/256 done) | 0.25x (bf16 of 2026-12-05) (cut run) |"
            in lines["int4_per_token_head"])


def test_a_ratio_against_a_cut_bf16_says_so(tmp_path):
    record(tmp_path, "2026-12-05-h200", "2026-12-05",
           [row("bf16", 2000.0, completed=100, cut_after_s=420.0), row("kvcomp_k4v4", 8000.0)])
    lines = cells(side_by_side.newest(tmp_path, "H200", "2026-12-04"), ["bf16", "kvcomp_k4v4"])
    assert "| 4.00x (bf16 cut) |" in lines["kvcomp_k4v4"]
    assert "| 1.00x (cut run) |" in lines["bf16"]
