"""End-to-end throughput of KV formats side by side (GPU).

Each KV setting runs in its own process (a fresh engine), on the same model
shape with dummy weights, the same workload and the same memory budget:

    python benchmarks/bench_e2e.py --out results.json \
        --workload W1 --settings bf16,fp8,int4_per_token_head,k4v4

Workloads (prompt tokens are random ids; ignore_eos so every request runs
to its full output length):
    W1: 256 requests x 4096 prompt x 256 output (prefill-heavy)
    W2: 512 requests x 1024 prompt x 2048 output (decode-heavy)
Reports KV capacity (vLLM's log line), output tok/s, TTFT and TPOT p50/p99.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

SETTINGS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "int4_per_token_head": {"kv_cache_dtype": "int4_per_token_head"},
    "turboquant_k3v4_nc": {"kv_cache_dtype": "turboquant_k3v4_nc"},
    "turboquant_4bit_nc": {"kv_cache_dtype": "turboquant_4bit_nc"},
    "kvcomp_k4v4": {"attention_backend": "kvcomp",
                    "additional_config": {"kvcomp": {"k_bits": 4, "v_bits": 4}}},
    "kvcomp_k2v2": {"attention_backend": "kvcomp",
                    "additional_config": {"kvcomp": {"k_bits": 2, "v_bits": 2}}},
    "kvcomp_k16v16": {"attention_backend": "kvcomp",
                      "additional_config": {"kvcomp": {"k_bits": 16, "v_bits": 16}}},
}
WORKLOADS = {"W1": (256, 4096, 256), "W2": (512, 1024, 2048), "tiny": (8, 300, 16)}
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def make_model_dir(path, layers=None):
    from transformers import LlamaConfig

    cfg = dict(LLAMA_8B)
    if layers:
        cfg["num_hidden_layers"] = layers
    os.makedirs(path, exist_ok=True)
    c = LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    c.save_pretrained(path)
    return path


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def run_one(args):
    from vllm import LLM, SamplingParams

    import random

    n, prompt_len, out_len = WORKLOADS[args.workload]
    kwargs = dict(SETTINGS[args.setting])
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=prompt_len + out_len + 16, gpu_memory_utilization=args.gpu_mem,
              disable_log_stats=False, seed=0, enforce_eager=args.eager, **kwargs)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 120000) for _ in range(prompt_len)]}
               for _ in range(n)]
    params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0,
                            detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, tpot = [], []
    for o in outs:
        m = o.metrics
        if m is None:
            continue
        ttft.append(m.first_token_latency)
        if m.num_generation_tokens > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1))
    res = dict(setting=args.setting, workload=args.workload, requests=n, prompt_len=prompt_len,
               output_len=out_len, elapsed_s=elapsed, output_tok_s=out_tokens / elapsed,
               total_tok_s=(out_tokens + n * prompt_len) / elapsed,
               ttft_p50=_pct(ttft, 0.5), ttft_p99=_pct(ttft, 0.99),
               tpot_p50=_pct(tpot, 0.5), tpot_p99=_pct(tpot, 0.99),
               completed=sum(len(o.outputs[0].token_ids) == out_len for o in outs))
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama8b-shape")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--workload", default="W1", choices=list(WORKLOADS))
    ap.add_argument("--settings", default="bf16,kvcomp_k4v4")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1200)
    args = ap.parse_args()
    if args.setting:
        return run_one(args)
    make_model_dir(args.model, args.layers)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for s in args.settings.split(","):
        cmd = [sys.executable, __file__, "--setting", s, "--model", args.model,
               "--workload", args.workload, "--gpu-mem", str(args.gpu_mem)]
        if args.eager:
            cmd.append("--eager")
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            log = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            log, p = (e.stdout or b"").decode() + (e.stderr or b"").decode(), None
        lines = [l for l in log.splitlines() if l.startswith("RESULT ")]
        m = KV_TOKENS.search(log)
        row = json.loads(lines[-1][7:]) if lines else {"setting": s, "error": log[-1500:]}
        row["kv_cache_tokens"] = int(m.group(1).replace(",", "")) if m else None
        row["wall_s"] = time.time() - t
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if "error" in row:
            print(row["error"][-1500:], flush=True)
    base = next((r for r in rows if r.get("setting") == "bf16" and "output_tok_s" in r), None)
    print(f"\n{device}, workload {args.workload}, {time.strftime('%Y-%m-%d')}")
    print("| setting | KV tokens | output tok/s | vs bf16 | TTFT p50/p99 s | TPOT p50/p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "output_tok_s" not in r:
            print(f"| {r['setting']} | {r.get('kv_cache_tokens')} | failed | | | |")
            continue
        rel = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else ""
        print(f"| {r['setting']} | {r['kv_cache_tokens']:,} | {r['output_tok_s']:.0f} | {rel} | "
              f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} | {1e3 * r['tpot_p50']:.1f}/{1e3 * r['tpot_p99']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, date=time.strftime("%Y-%m-%d"), workload=args.workload,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
