"""CPU time of vLLM's KV cache manager per decode step: bf16 against kvcomp.

The W2 profile on an H200 (2026-11-30) shows the GPU idle 1.9 ms of each
27.4 ms kvcomp decode step (bf16: 0.5 of 39.6 ms). With async scheduling the
engine's CPU work for step N+1 runs under step N on the GPU, so the CPU side
shows as idle GPU once it takes longer than a step. kvcomp adds a second KV
cache group (the full-precision window, a sliding-window manager) and its own
managers; this times what they cost the scheduler, on the scheduler's own
classes: ``KVCacheManager.allocate_slots`` for every running request of a
decode step, with prefix caching on (block hashing of the new tokens).

    python benchmarks/bench_kv_manager_cpu.py [--requests 512] [--steps 256]

No GPU, no model: the block pool is only bookkeeping.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import vllm_kvcomp


def _configs(num_blocks_bf16: int, num_blocks_kvcomp: int):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    layers = [f"model.layers.{i}.self_attn.attn" for i in range(32)]
    bf16 = KVCacheConfig(
        num_blocks=num_blocks_bf16, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(layers, FullAttentionSpec(
            block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16))])
    out = {"bf16": (bf16, 16, 16)}
    for name, kw in (("kvcomp_k4v4", {}), ("kvcomp_k4v4_r128", {"residual_tokens": 128})):
        cfg = KvcompConfig(k_bits=4, v_bits=4, **kw)
        packed = packed_spec(cfg, 128, 8, 128, torch.bfloat16)
        res = residual_spec(packed, concurrent_steps=2)  # async scheduling, as on a GPU
        conf = KVCacheConfig(
            num_blocks=num_blocks_kvcomp, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(layers, packed),
                             KVCacheGroupSpec([n + ".kvcomp_residual" for n in layers], res)])
        out[name] = (conf, 128, res.block_size)  # scheduler block lcm, hash block gcd
    return out


def run(name, conf, sched_bs, hash_bs, requests, prompt, steps, max_model_len) -> dict:
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request
    from vllm.utils.hashing import sha256

    init_none_hash(sha256)
    hasher = get_request_block_hasher(hash_bs, sha256)
    mgr = KVCacheManager(conf, max_model_len=max_model_len, scheduler_block_size=sched_bs,
                         hash_block_size=hash_bs, max_in_flight_tokens=8192, enable_caching=True)
    params = SamplingParams(max_tokens=steps + 1)
    reqs = []
    for r in range(requests):
        toks = [1000 + (r * 7919 + t) % 100000 for t in range(prompt)]
        req = Request(f"r{r}", toks, params, None, block_hasher=hasher)
        assert mgr.allocate_slots(req, prompt) is not None, "pool too small for the prompts"
        req.num_computed_tokens = prompt
        reqs.append(req)
    per_step = []
    for s in range(steps):
        t0 = time.perf_counter()
        for req in reqs:
            req.append_output_token_ids(5 + s)  # hashes any block this token completes
            if mgr.allocate_slots(req, 1) is None:
                raise SystemExit(f"{name}: out of blocks at step {s}")
            req.num_computed_tokens += 1
        per_step.append(time.perf_counter() - t0)
    per_step.sort()
    # pages the first group (bf16's pages, kvcomp's packed pages) holds a request
    held = len(mgr.coordinator.single_type_managers[0].req_to_blocks[reqs[0].request_id])
    return {"setting": name, "requests": requests, "prompt": prompt, "steps": steps,
            "packed_pages_per_request": held,
            "ms_per_step_median": 1e3 * per_step[len(per_step) // 2],
            "ms_per_step_p90": 1e3 * per_step[int(0.9 * len(per_step))],
            "us_per_request": 1e6 * per_step[len(per_step) // 2] / requests}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    vllm_kvcomp.register()
    max_len = a.prompt + a.steps + 16
    need_bf16 = a.requests * (max_len // 16 + 2) + 1
    need_kv = a.requests * 2 * (max_len // 32 + 2) + 1
    rows = [run(n, c, sb, hb, a.requests, a.prompt, a.steps, max_len)
            for n, (c, sb, hb) in _configs(need_bf16, need_kv).items()]
    print(f"\nKV cache manager, {a.requests} requests decoding (prompt {a.prompt}, "
          f"{a.steps} steps), CPU time a step:\n")
    print("| setting | ms / step (median) | p90 | µs / request |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['ms_per_step_median']:.2f} | {r['ms_per_step_p90']:.2f} | "
              f"{r['us_per_request']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
