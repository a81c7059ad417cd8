"""benchmarks/w2_step_model.py: its byte count against independent counts and a
recorded measurement, its block count against the layout, and its calibration."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import w2_step_model as m  # noqa: E402

from vllm_kvcomp.config import KvcompConfig  # noqa: E402


@pytest.mark.parametrize("context", [1, 2, 129, 1025, 2048, 3072])
def test_bytes_uncompressed_are_bf16_bytes(context):
    # at 16 bits packed and window tokens cost the same: every past token, K and V, bf16
    cfg = KvcompConfig(k_bits=16, v_bits=16)
    want = 3 * m.LAYERS * m.KV_HEADS * (context - 1) * 2 * m.HEAD_SIZE * 2
    assert m.decode_read_bytes(cfg, 3, context) == want


@pytest.mark.parametrize("bits,residual", [(4, 128), (4, 0), (2, 128)])
@pytest.mark.parametrize("context", [1025, 1500, 2048, 3000])
def test_bytes_by_hand(bits, residual, context):
    # k/v codes of bits/8 bytes a channel, one (scale, min) pair per key channel per
    # 128 tokens and per value token per 128 channels: 4 bytes each
    cfg = KvcompConfig(k_bits=bits, v_bits=bits, residual_tokens=residual)
    past = context - 1
    packed = (past - residual) // 128 * 128
    per_token = 2 * 128 * bits // 8 + 4 * 128 // 128 + 4
    want = m.LAYERS * m.KV_HEADS * (packed * per_token + (past - packed) * 512)
    assert m.decode_read_bytes(cfg, 1, context) == want


def test_bytes_match_the_decode_benchmark_on_the_gpu():
    # the all-formats run's sweep (H200, 2026-11-30) recorded GB/s x time at 384 x 2K:
    # the bytes its benchmark counted (one layer, plus q/k/v/o) must be what this model counts
    sweep = json.load(open(os.path.join(m.ALL_FORMATS_RUN, "dsweep_384x2048.json")))
    info = sweep["info"]["shape"]
    for row in sweep["sweep"][:1] + sweep["sweep"][-1:]:
        bits = int(row["config"][1])
        cfg = KvcompConfig(k_bits=bits, v_bits=bits, residual_tokens=info["residual_tokens"])
        recorded = row["GBps"] * 1e9 * row["us"] * 1e-6
        qkvo = (2 * row["batch"] * info["Hq"] + 2 * row["batch"] * info["H"]) * info["D"] * 2
        ours = m.decode_read_bytes(cfg, row["batch"], row["context"]) / m.LAYERS + qkvo
        assert abs(ours / recorded - 1) < 1e-3, (row["config"], ours, recorded)


@pytest.mark.parametrize("residual", [128, 0])
def test_blocks_per_request_cover_pages_and_window(residual):
    cfg = KvcompConfig(k_bits=4, v_bits=4, residual_tokens=residual)
    prompt, output = 1024, 512
    held = m.blocks_per_request(cfg, prompt, output)
    last = prompt + output - 1  # tokens when the last step is scheduled
    pages = -(-cfg.quantized_prefix_len(last) // 128)
    window_blocks = -(-(last - cfg.quantized_prefix_len(last)) // 32)  # 32-token residual blocks
    # at least the pages and one window; at most the next page and three windows
    # (two steps in flight with async scheduling, and the one being written)
    assert pages + window_blocks <= held <= pages + 1 + 3 * window_blocks + 3


def test_eta_is_one_when_decode_runs_at_copy_bandwidth():
    cfg = m.config("kvcomp_k4v4")
    secs = m.decode_read_bytes(cfg, 512, 1500) / (4000e9)
    summary = {"families_ms_per_step": {"kvcomp decode": secs * 1e3, "gemm": 10.0,
                                        "kvcomp store": 2.0, "norm / act / rope": 1.0},
               "idle_ms_per_step": 0.5}
    step = m.step_from_profile(summary, cfg, 1500, 4000.0)
    assert step.eta == pytest.approx(1.0)
    assert (step.gemm_ms, step.other_ms, step.store_ms, step.idle_ms) == (10.0, 1.0, 2.0, 0.5)
    assert step.ms(m.decode_read_bytes(cfg, 512, 1500)) == pytest.approx(13.5 + secs * 1e3)


def test_model_on_the_recorded_runs(tmp_path):
    rows = {r["setting"]: r for r in m.main(["--out", str(tmp_path)])}
    label = "as profiled"
    bound = "bound: decode at 100 %, no store, no idle"
    # calibrated on k4v4 r0: the model gives its measured ratio back
    assert rows["kvcomp_k4v4_r0"][label] == pytest.approx(rows["kvcomp_k4v4_r0"]["measured_x"])
    for r in rows.values():
        # each improvement can only shorten the run, and nothing beats the bound
        scen = [r[c] for c in ("as profiled", "idle as bf16's, store halved",
                               "... and decode at 85 %", bound)]
        scen.append(r[[c for c in r if c.startswith("bound, rest of run")][0]])
        assert scen == sorted(scen), r
    # fewer window tokens, fewer bytes; 2 bits fewer than 4
    gb = {n: r["decode_gb_mean"] for n, r in rows.items()}
    assert gb["kvcomp_k2v2_r0"] < gb["kvcomp_k2v2"] < gb["kvcomp_k4v4_r0"] < \
        gb["kvcomp_k4v4_r32"] < gb["kvcomp_k4v4_r64"] < gb["kvcomp_k4v4"]
    assert (tmp_path / "w2_step_model.md").read_text().count("| kvcomp_") == len(rows)
