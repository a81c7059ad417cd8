"""``benchmarks/bench_store_kernel.py`` keeps working: at a tiny shape under
the Triton interpreter it builds decode steps with and without hand-overs,
checks that the split and one-program hand-overs write the same packed bytes
(and that a hand-over step writes any), and reports every variant. ~40 s."""
from e2e_util import bench_smoke


def test_store_bench_smoke(tmp_path):
    rows = bench_smoke("bench_store_kernel.py", "--configs", "k4v4", "--shares", "0,1",
                       out=tmp_path / "store.json")[0]["rows"]
    assert len(rows) == 2 * 2  # shares x split
    assert {(x["split"], x["n_hand"] > 0) for x in rows} == {
        (False, False), (False, True), (True, False), (True, True)}
    # k4v4's 128-token group splits into 8 pieces a head
    assert {x["programs"] for x in rows if x["config"] == "k4v4" and x["split"]} == {4 * 8}
