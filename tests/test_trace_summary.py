"""benchmarks/trace_summary.py on a small synthetic torch-profiler trace."""
import gzip
import json

import pytest

from benchmarks.trace_summary import load_events, summarize, to_markdown, union_us


def test_union_counts_overlap_once():
    assert union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == pytest.approx(25)
    assert union_us([]) == 0


def test_summary_of_a_trace(tmp_path):
    events = [
        # two steps: a GEMM, our decode kernel overlapping a store on another stream, a gap
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_h_bz", "ts": 0, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "_kvcomp_decode_kernel", "ts": 40, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "_kvcomp_store_kernel", "ts": 60, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x256_h_bz", "ts": 100, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "_kvcomp_decode_kernel", "ts": 140, "dur": 30},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 190,
         "dur": 10},
        # CPU-side events are not GPU time; vLLM's annotated ranges are listed apart
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
        {"ph": "X", "cat": "user_annotation", "name": "schedule: allocate_slots", "ts": 0,
         "dur": 30},
        {"ph": "X", "cat": "user_annotation", "name": "schedule: allocate_slots", "ts": 100,
         "dur": 50},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 5},
    ]
    path = tmp_path / "w.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(load_events(str(path)), steps=2)
    assert s["span_ms_per_step"] == pytest.approx(0.100)  # 200 µs over 2 steps
    assert s["busy_ms_per_step"] == pytest.approx(0.080)  # 80 + 70 + 10 µs busy
    assert s["idle_ms_per_step"] == pytest.approx(0.020)
    fam = s["families_ms_per_step"]
    assert fam["gemm"] == pytest.approx(0.040)
    assert fam["kvcomp decode"] == pytest.approx(0.030)
    assert fam["kvcomp store"] == pytest.approx(0.010)
    assert fam["copies"] == pytest.approx(0.005)
    assert s["top_kernels"][0]["name"].startswith("nvjet") and s["top_kernels"][0]["calls"] == 2
    assert s["cpu_ranges"] == [{"name": "schedule: allocate_slots", "calls": 2,
                                "ms_per_step": pytest.approx(0.040)}]
    md = to_markdown(s, "t")
    assert "| `schedule: allocate_slots` | 2 | 0.04 |" in md and "GPU busy 0.08 ms/step" in md


def test_eviction_kernels_are_a_family_of_their_own(tmp_path):
    """The score accumulation's kernel name starts like the decode kernel's; it and the
    selection and compaction count as eviction, not as decode."""
    names = ["_kvcomp_decode_kernel", "_kvcomp_decode_scores_kernel",
             "_kvcomp_select_rows_kernel", "_kvcomp_compact_kernel"]
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": 10 * i, "dur": 10}
              for i, n in enumerate(names)]
    path = tmp_path / "t.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    fam = summarize(load_events(str(path)), steps=1)["families_ms_per_step"]
    assert fam["kvcomp decode"] == pytest.approx(0.010)
    assert fam["kvcomp eviction"] == pytest.approx(0.030)
