"""How far W2's targets are from what memory bandwidth allows: a step-time model.

The W2 targets (512 requests x 1024 prompt x 2048 output) are 2.5x bf16's output
tok/s with kvcomp k4v4 and 3.5x with k2v2. This models W2's run time from parts that
were measured, to tell how much of each gap a faster kernel could close at all:

* the bytes one decode step reads, from the page layout the backend really uses
  (``PageLayout``) and the window ``[Q(n), n)`` that ``KvcompConfig`` keeps in the
  model dtype: exact, no measurement in it;
* every other part of a batch-512 decode step (GEMMs, norms, sampling, store, GPU
  idle) from a recorded profile (``trace_summary.py``'s json, the H200 W2 profile of
  2026-11-30 by default);
* the decode kernel's efficiency, eta = bytes / (time x copy bandwidth), from the same
  profile (its decode time at the profile's context);
* the 2-bit kernel's efficiency relative to k4v4's from the decode-launch sweep at W2's
  decode shape (384 x 2K, H200 x2, 2026-11-30): k2v2's kernel is bound by its per-token
  instructions, not bytes, and takes about as long as k4v4's for half the bytes;
* the rest of the run (the prefill of 512 prompts, ~14 s, during which decoding is
  slow) as ``T_rest = measured run - modelled decode steps`` of a setting whose 512
  requests all fit (k4v4 with ``residual_tokens`` 0 by default); other settings are
  then predicted and compared with their measured runs.

Run time = T_rest + sum over the 2048 decode steps (context 1025 .. 3072) of
t(c) = GEMMs + other + store + idle + decode_bytes(c) / (eta x copy bandwidth).
The model does not price preemption. The blocks column says what 512 requests at full
length hold (vLLM's own block manager counts one request's); in the run they are
staggered by the prefill (first tokens over ~13 s), so a setting a little over the pool
(k4v4 with ``residual_tokens`` 0: 6 % over, steady TPOT in its run) fits in practice,
while the default k4v4 (17 % over) ran 13 % below the model.

    python benchmarks/w2_step_model.py [--out DIR]

No GPU: it reads recorded results and prints what each improvement can buy, and the
bound with a decode kernel at 100 % of copy bandwidth, no store and no idle.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# recorded runs the model reads (H200, 2026-11-30): the W2 profile, and the run of all
# formats with its decode-launch sweep
PROFILE_RUN = os.path.join(HERE, "results", "2026-11-30-h200-w2-profile")
ALL_FORMATS_RUN = os.path.join(HERE, "results", "2026-11-30-h200x2-all-formats")

# Llama-3.1-8B's attention shape (the benchmarks' model) and W2
LAYERS, KV_HEADS, HEAD_SIZE, DTYPE_BYTES = 32, 8, 128, 2
W2 = (512, 1024, 2048)  # requests, prompt, output

# name -> kvcomp settings (the bench_e2e.py setting of the same name)
SETTINGS = {
    # recorded runs named kvcomp_k4v4 ran with the 128-token window then the default
    "kvcomp_k4v4": {"k_bits": 4, "v_bits": 4, "residual_tokens": 128},
    "kvcomp_k4v4_r64": {"k_bits": 4, "v_bits": 4, "residual_tokens": 64},
    "kvcomp_k4v4_r32": {"k_bits": 4, "v_bits": 4, "residual_tokens": 32},
    "kvcomp_k4v4_r0": {"k_bits": 4, "v_bits": 4, "residual_tokens": 0},
    "kvcomp_k2v2": {"k_bits": 2, "v_bits": 2},
    "kvcomp_k2v2_r0": {"k_bits": 2, "v_bits": 2, "residual_tokens": 0},
}


def config(name):
    from vllm_kvcomp.config import KvcompConfig

    return KvcompConfig(**SETTINGS[name])


def decode_read_bytes(cfg, requests: int, context: int, block_size: int = 128) -> int:
    """Bytes the decode kernel reads in one step, all layers, for ``requests``
    sequences of ``context`` tokens (the new token's K/V among them).

    The store runs first and the new token's K/V come from registers, so the
    kernel reads the packed pages of [0, Q(c - 1)) and the window
    [Q(c - 1), c - 1) in the model dtype."""
    from vllm_kvcomp.layout import PageLayout

    layout = PageLayout(cfg, block_size, HEAD_SIZE, DTYPE_BYTES)
    past = context - 1
    packed = cfg.quantized_prefix_len(past)
    per_head = packed * layout.head_page_bytes // block_size + \
        (past - packed) * 2 * HEAD_SIZE * DTYPE_BYTES
    return requests * LAYERS * KV_HEADS * per_head


def blocks_per_request(cfg, prompt: int, output: int, block_size: int = 128) -> int:
    """Most blocks one W2 request holds, counted by vLLM's own KVCacheManager
    with kvcomp's two groups (async scheduling: two windows in flight)."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    import vllm_kvcomp
    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    vllm_kvcomp.register()
    layers = [f"l{i}" for i in range(LAYERS)]
    packed = packed_spec(cfg, block_size, KV_HEADS, HEAD_SIZE, torch.bfloat16)
    groups = [KVCacheGroupSpec(layers, packed)]
    if cfg.needs_residual_cache:
        res = residual_spec(packed, concurrent_steps=2)
        groups.append(KVCacheGroupSpec([n + ".r" for n in layers], res))
    pool = 4 * (prompt + output) // 16 + 16
    mgr = KVCacheManager(KVCacheConfig(num_blocks=pool, kv_cache_tensors=[],
                                       kv_cache_groups=groups),
                         max_model_len=prompt + output + 16, scheduler_block_size=block_size,
                         hash_block_size=groups[-1].kv_cache_spec.block_size,
                         max_in_flight_tokens=8192, enable_caching=False)
    req = Request("r", list(range(1, prompt + 1)), SamplingParams(max_tokens=output), None)
    assert mgr.allocate_slots(req, prompt) is not None
    req.num_computed_tokens = prompt
    most = 0
    free_at_start = pool - 1  # the null block
    for t in range(output - 1):
        req.append_output_token_ids(7)
        assert mgr.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
        most = max(most, free_at_start - mgr.block_pool.get_num_free_blocks())
    return most


def pool_blocks(cfg, kv_gib: float, block_size: int = 128) -> int:
    """Blocks in ``kv_gib`` of KV memory: both groups have 32 layers and share
    one page size, so vLLM gives each block id one page in each of 32 tensors."""
    from vllm_kvcomp.layout import PageLayout

    page = PageLayout(cfg, block_size, HEAD_SIZE, DTYPE_BYTES).page_bytes(KV_HEADS)
    return int(kv_gib * 2**30) // (page * LAYERS)


@dataclass
class Step:
    """Everything of a batch-512 decode step except the decode kernel, in ms,
    and the decode kernel's efficiency on bytes read."""
    gemm_ms: float
    other_ms: float
    store_ms: float
    idle_ms: float
    eta: float
    copy_gbs: float

    def ms(self, decode_bytes: int) -> float:
        return (self.gemm_ms + self.other_ms + self.store_ms + self.idle_ms
                + decode_bytes / (self.eta * self.copy_gbs * 1e9) * 1e3)


def step_from_profile(summary: dict, cfg, profile_context: int, copy_gbs: float,
                      requests: int = 512) -> Step:
    fam = dict(summary["families_ms_per_step"])
    decode = fam.pop("kvcomp decode")
    store = fam.pop("kvcomp store", 0.0)
    gemm = fam.pop("gemm")
    bytes_ = decode_read_bytes(cfg, requests, profile_context)
    eta = bytes_ / (decode * 1e-3 * copy_gbs * 1e9)
    return Step(gemm, sum(fam.values()), store, summary["idle_ms_per_step"], eta, copy_gbs)


def eta_ratio_from_sweep(sweep: dict, config_name: str, ref: str = "k4v4") -> float:
    """eta of ``config_name``'s decode kernel over k4v4's, each at its fastest
    launch in a decode-launch sweep (``bench_decode_kernel.py --sweep``'s json)."""
    from vllm_kvcomp.config import KvcompConfig

    shape = sweep["info"]["shape"]
    best = {}
    for r in sweep["sweep"]:
        best[r["config"]] = min(best.get(r["config"], float("inf")), r["us"])
    batch, ctx = sweep["sweep"][0]["batch"], sweep["sweep"][0]["context"]

    def gbs(name):
        bits = int(name[1])
        cfg = KvcompConfig(k_bits=bits, v_bits=bits, group_size=shape["group_size"],
                           residual_tokens=shape["residual_tokens"])
        return decode_read_bytes(cfg, batch, ctx, shape["block_size"]) / LAYERS / best[name]

    return gbs(config_name) / gbs(ref)


def w2_decode_bytes(cfg, requests: int, prompt: int, output: int) -> list[int]:
    """Decode bytes of each of W2's decode steps: the first output token comes
    from the prefill, each later one is a step."""
    return [decode_read_bytes(cfg, requests, prompt + i) for i in range(2, output + 1)]


def decode_seconds(step: Step, step_bytes: list[int]) -> float:
    return sum(step.ms(b) for b in step_bytes) / 1e3


def _load(path):
    with open(path) as f:
        return json.load(f)


def _w2_row(path, setting):
    for r in _load(path)["rows"]:
        if r["workload"] == "W2" and r["setting"] == setting:
            return r
    raise KeyError(f"no W2 row for {setting} in {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile",
                    default=os.path.join(PROFILE_RUN, "profile2", "summary_kvcomp_k4v4.json"))
    ap.add_argument("--profile-setting", default="kvcomp_k4v4")
    ap.add_argument("--profile-context", type=int, default=1500,
                    help="context of the profiled steps (W2ps: 1024-token prompts, profiled "
                         "after 520 engine steps, of which ~64 prefill them at 8192 tokens)")
    ap.add_argument("--copy-gbs", type=float, default=4271.0,
                    help="copy bandwidth measured beside the profile (2026-11-30: 4,271 GB/s)")
    ap.add_argument("--sweep", default=os.path.join(ALL_FORMATS_RUN, "dsweep_384x2048.json"),
                    help="decode-launch sweep with k4v4 and k2v2 rows (2-bit kernel's eta)")
    ap.add_argument("--kv-gib", type=float, default=54.3)
    ap.add_argument("--calibrate", default="kvcomp_k4v4_r0",
                    help="the setting whose measured W2 run gives T_rest (all 512 must fit)")
    ap.add_argument("--measured", nargs="*", default=[
        f"kvcomp_k4v4={PROFILE_RUN}/e2e/e2e7_kvcomp_k4v4.json",
        f"kvcomp_k4v4_r0={PROFILE_RUN}/e2e/e2e7_kvcomp_k4v4_r0.json",
        f"kvcomp_k2v2={ALL_FORMATS_RUN}/e2e7/e2e7_kvcomp_k2v2.json",
        f"bf16={PROFILE_RUN}/e2e/e2e7_bf16.json"], help="setting=e2e json with its W2 row")
    ap.add_argument("--out", default=None, help="folder for w2_step_model.md / .json")
    a = ap.parse_args(argv)

    requests, prompt, output = W2
    measured = {}
    for item in a.measured:
        name, path = item.split("=", 1)
        measured[name] = _w2_row(path, name)
    bf16 = measured["bf16"]["output_tok_s"]
    step = step_from_profile(_load(a.profile), config(a.profile_setting), a.profile_context,
                             a.copy_gbs, requests)
    step_bytes = {n: w2_decode_bytes(config(n), requests, prompt, output) for n in SETTINGS}
    fits = {n: (requests * blocks_per_request(config(n), prompt, output),
                pool_blocks(config(n), a.kv_gib)) for n in SETTINGS}
    t_rest = measured[a.calibrate]["elapsed_s"] - decode_seconds(step, step_bytes[a.calibrate])

    bound = Step(step.gemm_ms, step.other_ms, 0.0, 0.0, 1.0, step.copy_gbs)
    # the rest of the run cannot shrink below the prefill of the last prompt, which no
    # KV format shortens (GEMM-bound): the calibration run's TTFT p99
    ttft_p99 = measured[a.calibrate]["ttft_p99"]
    # label -> (step, T_rest, whether k2v2's kernel runs at its own lower eta there;
    # the bounds put every format's decode at 100 % of copy bandwidth)
    scenarios = {
        "as profiled": (step, t_rest, True),
        "idle as bf16's, store halved": (Step(step.gemm_ms, step.other_ms, step.store_ms / 2,
                                              0.5, step.eta, step.copy_gbs), t_rest, True),
        "... and decode at 85 %": (Step(step.gemm_ms, step.other_ms, step.store_ms / 2,
                                        0.5, 0.85, step.copy_gbs), t_rest, True),
        "bound: decode at 100 %, no store, no idle": (bound, t_rest, False),
        f"bound, rest of run {ttft_p99:.1f} s (TTFT p99)": (bound, ttft_p99, False),
    }
    rows = []
    k2_eta = eta_ratio_from_sweep(_load(a.sweep), "k2v2")
    for name in SETTINGS:
        cfg = config(name)
        need, have = fits[name]
        eta_scale = k2_eta if cfg.k_bits == 2 else 1.0
        row = {"setting": name, "blocks_needed": need, "blocks_in_pool": have,
               "fits": need <= have,
               "decode_gb_mean": sum(step_bytes[name]) / len(step_bytes[name]) / 1e9,
               "measured_x": (measured[name]["output_tok_s"] / bf16) if name in measured else None}
        for label, (st, rest, own_eta) in scenarios.items():
            if own_eta:
                st = Step(**{**st.__dict__, "eta": st.eta * eta_scale})
            total = rest + decode_seconds(st, step_bytes[name])
            row[label] = requests * output / total / bf16
        rows.append(row)

    head = (f"W2 step model: profile {os.path.relpath(a.profile, HERE)} ({a.profile_setting} at "
            f"~{a.profile_context} tokens): GEMMs {step.gemm_ms:.2f} ms, other "
            f"{step.other_ms:.2f}, store {step.store_ms:.2f}, idle {step.idle_ms:.2f}, decode "
            f"eta {100 * step.eta:.1f} % of {a.copy_gbs:.0f} GB/s (k2v2's x{k2_eta:.2f}, from "
            f"the launch sweep); T_rest {t_rest:.1f} s from {a.calibrate}'s measured "
            f"{measured[a.calibrate]['elapsed_s']:.1f} s; bf16 {bf16:.0f} tok/s; pool at "
            f"{a.kv_gib} GiB.")
    cols = list(scenarios)
    lines = [head, "", "| setting | decode GB/step (W2 mean) | blocks: 512 at full length / pool | measured | "
             + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        m = f"{r['measured_x']:.2f}x" if r["measured_x"] else "-"
        fit = "" if r["fits"] else " (over the pool)"
        lines.append(f"| {r['setting']}{fit} | {r['decode_gb_mean']:.1f} | "
                     f"{r['blocks_needed']:,} / {r['blocks_in_pool']:,} | {m} | "
                     + " | ".join(f"{r[c]:.2f}x" for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "w2_step_model.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(a.out, "w2_step_model.json"), "w") as f:
            json.dump({"t_rest_s": t_rest, "step": step.__dict__, "bf16_tok_s": bf16,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
