"""Where the CPU path's time goes: one in-process engine (no engine-core
subprocess, so cProfile sees the model runner) serving a mixed load, for the
KVCOMP backend and vLLM's CPU attention on the same tiny model.

    python benchmarks/profile_cpu_path.py --out DIR [--requests 40]

Each engine serves the load once timed, then once more (other prompts)
under cProfile. Writes DIR/profile_<backend>.txt (functions by cumulative and
own time) and DIR/profile.md (wall time per backend; KVCOMP's time by part of
its step).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import subprocess
import sys
import time

PARTS = {  # cumulative time of these functions, as a share of the run
    "reference step (attention + store), total": "kvcomp_step_reference",
    "  attention (request_attention)": "request_attention",
    "    dequantize packed pages": "dequantize_pages",
    "  hand-over (quantize + pack)": "_handover",
    "scheduler": "schedule",
}


def _prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 400) for _ in range(rng.choice(
        [10, 100, 400, 900, 1464]))]} for _ in range(n)]


def run_one(backend: str, n: int, out: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama("/tmp/kvcomp-tiny-llama")
    name, _, mode = backend.partition(":")
    kw = {"attention_backend": name}
    if name == "kvcomp":
        kw["additional_config"] = {"kvcomp": {"k_bits": 4, "v_bits": 4,
                                              "prompt_attention": mode or "auto"}}
    llm = LLM(model, max_model_len=2048, enforce_eager=True, seed=0, **kw)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(_prompts(n, 0), params, use_tqdm=False)
    timed = time.perf_counter() - t0
    prof = cProfile.Profile()  # other prompts: no prefix-cache hits on the first run's
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(_prompts(n, 1), params, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    text = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(40)
    with open(os.path.join(out, f"profile_{backend.replace(':', '_')}.txt"), "w") as f:
        f.write(text.getvalue())
    parts = {}
    for label, fn in PARTS.items():
        parts[label] = sum(v[3] for k, v in stats.stats.items() if k[2] == fn)
    print("RESULT " + json.dumps(dict(backend=backend, timed_s=timed, wall_s=wall, parts=parts)),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        return run_one(args.one, args.requests, args.out)
    rows = []
    for backend in ("kvcomp:as_stored", "kvcomp:full_precision", "CPU_ATTN"):
        p = subprocess.run([sys.executable, __file__, "--out", args.out, "--requests",
                            str(args.requests), "--one", backend], capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, p.stdout[-2000:] + p.stderr[-3000:]
        rows.append(json.loads(line[-1][7:]))
    lines = [f"Command: `python benchmarks/profile_cpu_path.py --out {args.out} "
             f"--requests {args.requests}` ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores; {args.requests} requests of 10-1464 prompt tokens, 32 "
             "output tokens, k4v4)", "",
             "| backend (prompt_attention) | wall s | wall s under cProfile |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r['timed_s']:.1f} | {r['wall_s']:.1f} |" for r in rows]
    k = rows[0]
    lines += ["", f"{k['backend']} by part (cumulative seconds under cProfile, share of its "
              "wall):", "",
              "| part | s | share |", "|---|---|---|"]
    lines += [f"| {label} | {s:.1f} | {100 * s / k['wall_s']:.0f} % |"
              for label, s in k["parts"].items()]
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
