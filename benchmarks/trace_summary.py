"""Where a profiled window of engine steps spent its GPU time, from a torch
profiler trace (``*.pt.trace.json[.gz]``, as vLLM's torch profiler writes it).

The table vLLM writes beside the trace (``profiler_out_0.txt``) sums self CUDA
time per op; what it cannot say is how much of the wall span the GPU was idle
(the CPU side of the engine, or a sync, holding it up). This reads the GPU
events (kernels, memcpy, memset: kernels replayed from CUDA graphs included)
and prints, per profiled engine step:

  span  first GPU event's start to last one's end, divided by the steps;
  busy  the union of GPU event intervals (overlapping streams counted once);
  idle  span - busy;

then the busy time by kernel family and the kernels that took the most, and
the CPU ranges vLLM annotates (scheduler, model runner: run the engine with
``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``), which say whether the CPU side of a
step is what leaves the GPU idle.

    python benchmarks/trace_summary.py TRACE --steps 16 [--json out.json]
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

# First match wins: the order matters where names overlap (kvcomp's own
# kernels before the generic "attention" patterns).
FAMILIES = [
    # H2O / A2SF's score accumulation, selection and compaction (the score kernel's name
    # starts like the decode kernel's)
    ("kvcomp eviction", r"_kvcomp_decode_scores|_kvcomp_select|_kvcomp_compact"),
    ("kvcomp decode", r"_kvcomp_decode|_decode_reduce|kvcomp.*decode"),
    ("kvcomp store", r"_kvcomp_store|kvcomp.*store"),
    ("kvcomp prefill", r"_kvcomp_prefill"),
    ("attention (other)", r"flash|fmha|attn|attention|paged|reshape_and_cache|turboquant"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|xmma|cublas|splitKreduce|matmul"),
    ("norm / act / rope", r"rms_norm|layernorm|silu|act_and_mul|rotary|rope"),
    ("sampling / logits", r"argmax|topk|top_k|sort|softmax|sampl|logits|gumbel|exponential"),
    ("copies", r"^Memcpy|^Memset|copy|cat_|index|gather|scatter|fill"),
]


def _family(name: str) -> str:
    for fam, pat in FAMILIES:
        if re.search(pat, name, re.IGNORECASE):
            return fam
    return "other"


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: str) -> list[dict]:
    """Complete events of the GPU (kernels, copies) and of CPU-side annotations."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events
            if e.get("ph") == "X" and e.get("cat") in GPU_CATS + ("user_annotation",)
            and "dur" in e]


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: list[dict], steps: int, top: int = 25) -> dict:
    cpu = [e for e in events if e.get("cat") == "user_annotation"]
    events = [e for e in events if e.get("cat") in GPU_CATS]
    if not events:
        raise SystemExit("no GPU events in the trace (was CUDA activity profiled?)")
    iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
    span = max(e for _, e in iv) - min(s for s, _ in iv)
    busy = union_us(iv)
    by_kernel: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_kernel[e["name"]].append(float(e["dur"]))
    fam_us: dict[str, float] = defaultdict(float)
    for name, durs in by_kernel.items():
        fam_us[_family(name)] += sum(durs)
    kernels = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    per = 1e-3 / steps  # µs over the window -> ms per step
    by_range: dict[str, list[float]] = defaultdict(list)
    for e in cpu:
        by_range[e["name"]].append(float(e["dur"]))
    return {
        "steps": steps,
        "span_ms_per_step": span * per,
        "busy_ms_per_step": busy * per,
        "idle_ms_per_step": (span - busy) * per,
        "busy_fraction": busy / span if span else 0.0,
        "families_ms_per_step": {k: v * per for k, v in sorted(fam_us.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "family": _family(n), "calls": len(d),
                         "ms_per_step": sum(d) * per, "mean_us": sum(d) / len(d)}
                        for n, d in kernels],
        "cpu_ranges": [{"name": n[:120], "calls": len(d), "ms_per_step": sum(d) * per}
                       for n, d in sorted(by_range.items(), key=lambda kv: -sum(kv[1]))[:top]],
    }


def to_markdown(s: dict, title: str) -> str:
    lines = [f"### {title}", "",
             f"{s['steps']} engine steps: span {s['span_ms_per_step']:.2f} ms/step, GPU busy "
             f"{s['busy_ms_per_step']:.2f} ms/step ({100 * s['busy_fraction']:.1f} %), idle "
             f"{s['idle_ms_per_step']:.2f} ms/step", "",
             "| kernel family | ms / step |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in s["families_ms_per_step"].items()]
    lines += ["", "| kernel | family | calls | ms / step | mean µs |", "|---|---|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['family']} | {k['calls']} | {k['ms_per_step']:.2f} | "
              f"{k['mean_us']:.1f} |" for k in s["top_kernels"]]
    if s["cpu_ranges"]:
        lines += ["", "| CPU range (vLLM's annotations) | calls | ms / step |", "|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['ms_per_step']:.2f} |"
                  for r in s["cpu_ranges"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, required=True, help="engine steps in the profiled window")
    ap.add_argument("--title", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    s = summarize(load_events(args.trace), args.steps)
    print(to_markdown(s, args.title or args.trace))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
