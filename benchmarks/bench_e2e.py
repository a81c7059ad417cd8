"""End-to-end throughput of KV formats side by side (GPU).

Each KV setting runs in its own process (a fresh engine), on the same model
shape with dummy weights, the same workload and the same memory budget:

    python benchmarks/bench_e2e.py --out results.json \
        --workload W1 --settings bf16,fp8,int4_per_token_head,k4v4

Workloads (prompt tokens are random ids; ignore_eos so every request runs
to its full output length):
    W1: 256 requests x 4096 prompt x 256 output (prefill-heavy)
    W2: 512 requests x 1024 prompt x 2048 output (decode-heavy)
    W4: 256 requests x 512 prompt x 8192 output (long decode, as in reasoning models)
    W1q / W2q: the same shapes scaled down for a short GPU run
        (64 x 4096 x 256 and 128 x 1024 x 1024); give them a proportionally
        smaller ``--kv-gib`` so the bf16 cache binds concurrency the way the
        full workloads do on a whole H100.
    W1p: W1's prompts with one output token (its prefill time alone)
Reports KV capacity (vLLM's log line), output tok/s, TTFT and TPOT p50/p99.
``--cut-after S`` stops each workload S seconds after it starts and aborts what still runs
(a cut run, for a format too slow to run W4 whole on a time-limited GPU): its rows report the
tokens made in those S seconds, the requests done and ``cut_after_s``.

``--kv-gib`` gives every format the same KV cache memory (vLLM's
``kv_cache_memory_bytes``), so capacity differences come from the format
alone. ``--fast-start`` skips torch.compile (``mode=0``) and captures full
CUDA graphs for decode batches only (``FULL_DECODE_ONLY``), the same for
every setting; it cuts start-up from ~4 to ~1 minute.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

SETTINGS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "int4_per_token_head": {"kv_cache_dtype": "int4_per_token_head"},
    "turboquant_k3v4_nc": {"kv_cache_dtype": "turboquant_k3v4_nc"},
    "turboquant_4bit_nc": {"kv_cache_dtype": "turboquant_4bit_nc"},
    "kvcomp_k4v4": {"attention_backend": "kvcomp",
                    "additional_config": {"kvcomp": {"k_bits": 4, "v_bits": 4}}},
    # k4v4 with FlashAttention over the fresh prefill tokens (the default
    # Triton kernel does them in its one pass): the A/B of that split
    "kvcomp_k4v4_fa_prefill": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "fresh_prefill": "flash_attn"}}},
    # (2026-11-23, H200: the split's run was named kvcomp_k4v4 when it was the
    # default and the one-pass run kvcomp_k4v4_triton_prefill)
    # the window before residual_tokens defaulted to 0 for 4-bit pages: 128..255 tokens in
    # full precision instead of 0..127 (KIVI's R = 128); +0.02 % perplexity against +0.35 %
    # at decode-like positions (docs/quality.md)
    "kvcomp_k4v4_r128": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_tokens": 128}}},
    "kvcomp_k4v4_r0": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_tokens": 0}}},
    # a 32..159-token window: at decode-like positions +0.11 % perplexity against r128's
    # +0.02 % and r0's +0.35 % (docs/quality.md, 16-token chunks); modelled at
    # 1.93x bf16 on W2 (benchmarks/w2_step_model.py), not yet run
    "kvcomp_k4v4_r32": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_tokens": 32}}},
    # the same with the store's hand-over split into its pieces (KVCOMP_STORE_SPLIT; the
    # "_env" of a setting is set in its engine's process before the engine starts)
    "kvcomp_k4v4_split_store": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4}}, "_env": {"KVCOMP_STORE_SPLIT": "1"}},
    "kvcomp_k4v4_r0_split_store": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_tokens": 0}},
        "_env": {"KVCOMP_STORE_SPLIT": "1"}},
    # Quest's page selection at decode (2048 tokens, two dense layers): W4 beside kvcomp_k4v4
    "kvcomp_k4v4_quest2048": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "quest": {"budget_tokens": 2048}}}},
    # SnapKV keeping 2048 prompt tokens a KV head: W1 and W4 beside kvcomp_k4v4
    "kvcomp_k4v4_snapkv2048": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4,
                   "eviction": {"method": "snapkv", "budget_tokens": 2048}}}},
    # H2O keeping 2048 tokens a KV head (heavy hitters + recent), scored by the decode
    # kernel's probabilities, evicting a page at a time as requests grow: W1 and W4
    # beside kvcomp_k4v4
    "kvcomp_k4v4_h2o2048": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4,
                   "eviction": {"method": "h2o", "budget_tokens": 2048}}}},
    # with its decode steps eager (KVCOMP_EVICTION_GRAPHS=0; by default they are captured
    # in CUDA graphs, the eviction as fixed-shape device work): for A/B runs
    "kvcomp_k4v4_h2o2048_eager": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4,
                   "eviction": {"method": "h2o", "budget_tokens": 2048}}},
        "_env": {"KVCOMP_EVICTION_GRAPHS": "0"}},
    # with each row's step found by torch ops before the selection launch
    # (KVCOMP_DECODE_ROWS_KERNEL=0; by default the launch works them out): for A/B runs
    "kvcomp_k4v4_h2o2048_torch_rows": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4,
                   "eviction": {"method": "h2o", "budget_tokens": 2048}}},
        "_env": {"KVCOMP_DECODE_ROWS_KERNEL": "0"}},
    # and the kept tokens selected by a stable sort of every row's candidates in every
    # captured layer (KVCOMP_SELECT_KERNEL=0), the probabilities normalised in a pass of
    # their own (KVCOMP_SCORE_FROM_LOGITS=0): the steps before their defaults, for A/B runs
    "kvcomp_k4v4_h2o2048_sort": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4,
                   "eviction": {"method": "h2o", "budget_tokens": 2048}}},
        "_env": {"KVCOMP_SELECT_KERNEL": "0", "KVCOMP_SCORE_FROM_LOGITS": "0"}},
    # half of each layer's KV heads streaming (sinks 64 + window 256): W4 beside kvcomp_k4v4
    # and bf16. "_head_map_streaming": the share of each layer's KV heads that a map
    # written for the model at start-up marks streaming (a fixed map, not a calibrated
    # one: this measures speed and capacity, not quality)
    "kvcomp_k4v4_split50": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4}},
        "_head_map_streaming": 0.5},
    # the full-precision window as one ring of pages per request (residual_ring), not one
    # per unsettled step: 3.35x / 4.84x bf16's KV capacity at max_model_len 4096 against
    # 2.74x / 2.88x; its GPU launches are build-checked, not yet run on a GPU
    "kvcomp_k4v4_ring": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_ring": True}}},
    "kvcomp_k2v2_ring": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "residual_ring": True}}},
    # the ring in float8 e4m3 (residual_dtype): 3.54x / 5.83x bf16's KV capacity at
    # max_model_len 4096; build-checked, not yet run on a GPU
    "kvcomp_k4v4_ring_fp8": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "residual_ring": True,
                   "residual_dtype": "fp8_e4m3"}}},
    "kvcomp_k2v2_ring_fp8": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "residual_ring": True,
                   "residual_dtype": "fp8_e4m3"}}},
    # capacity bar at max_model_len 4096 (CPU estimates) with the window's quality measured
    # (quality/results/2026-12-04-cpu-6m-window-defaults):
    # k4v4, 64-token key groups, one value group a head, a 0..63-token model-dtype ring: 3.44x
    "kvcomp_k4v4_ring_g64": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "group_size": 64, "value_group_size": 128,
                   "residual_ring": True}}},
    # k4v4, the same groups, a 64..127-token e4m3 ring: 3.44x, the closest of them to bf16
    "kvcomp_k4v4_ring_fp8_g64_r64": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 4, "group_size": 64, "value_group_size": 128,
                   "residual_tokens": 64, "residual_ring": True,
                   "residual_dtype": "fp8_e4m3"}}},
    # k2v2, a 160..287-token e4m3 ring: 5.83x as kvcomp_k2v2_ring_fp8, with less lost to 2 bits
    "kvcomp_k2v2_ring_fp8_r160": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "residual_tokens": 160, "residual_ring": True,
                   "residual_dtype": "fp8_e4m3"}}},
    # k2v2, a 224..351-token e4m3 ring: 5.55x, the largest window that passes 5.5x
    "kvcomp_k2v2_ring_fp8_r224": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "residual_tokens": 224, "residual_ring": True,
                   "residual_dtype": "fp8_e4m3"}}},
    "kvcomp_k2v2": {"attention_backend": "kvcomp",
                    "additional_config": {"kvcomp": {"k_bits": 2, "v_bits": 2}}},
    # 4-bit keys, 2-bit values in 32-token key groups (keys carry the outliers, values
    # tolerate fewer bits: KIVI's asymmetry): the all-format table's middle format
    "kvcomp_k4v2_g32": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 2, "group_size": 32}}},
    # the same with its 128..159-token window as a ring: 3.56x bf16's KV tokens at 4096
    # against 2.78x by position, the same tokens attended
    # (quality/results/2026-12-05-cpu-6m-k4v2-window)
    "kvcomp_k4v2_g32_ring": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 4, "v_bits": 2, "group_size": 32, "residual_ring": True}}},
    # the quality-recommended 2-bit setting (KIVI: 32-token key groups, 32-channel value
    # groups); kvcomp_k2v2 above keeps 128, which costs more quality (docs/quality.md)
    "kvcomp_k2v2_kivi": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "group_size": 32}}},
    # 32-token key groups, one value group a head: within 0.3 points of KIVI-2's
    # perplexity, 14 % more KV tokens, and the decode kernel's folded warp tiles
    "kvcomp_k2v2_g32_vg128": {"attention_backend": "kvcomp", "additional_config": {
        "kvcomp": {"k_bits": 2, "v_bits": 2, "group_size": 32, "value_group_size": 128}}},
    "kvcomp_k16v16": {"attention_backend": "kvcomp",
                      "additional_config": {"kvcomp": {"k_bits": 16, "v_bits": 16}}},
}
WORKLOADS = {"W1": (256, 4096, 256), "W2": (512, 1024, 2048), "W4": (256, 512, 8192),
             "W1q": (64, 4096, 256), "W2q": (128, 1024, 1024), "tiny": (8, 300, 16),
             # W1's prefill alone (one output token): the part no KV format can shorten
             "W1p": (256, 4096, 1),
             # a slice of W1p to profile (a few 16K-token prefill steps)
             "W1ps": (16, 4096, 1),
             # W2's decode at batch 512: profile with --profile-delay 520 (prefill done,
             # 512 requests at ~1.5K context, which still fit a whole H200 in bf16)
             "W2ps": (512, 1024, 600),
             # KV capacity as vLLM logs it at max_model_len 4096 (run first, its engine then
             # serves the next workload at that length): the capacity bar's context length
             "C4K": (8, 4079, 1),
             # the same at max_model_len 32768, where a head map's streaming heads free most
             # of their pages (two requests of that length show the engine serves it)
             "C32K": (2, 32751, 1)}
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
# vLLM's periodic stats line: what a run cut short by --timeout still tells
GEN_RATE = re.compile(r"Avg generation throughput: ([\d.]+) tokens/s.*?Running: (\d+) reqs")


def make_model_dir(path, layers=None):
    from transformers import LlamaConfig

    cfg = dict(LLAMA_8B)
    if layers:
        cfg["num_hidden_layers"] = layers
    os.makedirs(path, exist_ok=True)
    c = LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    c.save_pretrained(path)
    return path


def write_head_map(model: str, share: float) -> str:
    """A head map for ``model`` (its config.json) marking the first ``share`` of
    every layer's KV heads streaming; -> its path (a new file per process)."""
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    ns = round(heads * share)
    roles = [["streaming"] * ns + ["retrieval"] * (heads - ns)] * c["num_hidden_layers"]
    path = os.path.join(tempfile.gettempdir(), f"head_map_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"layers": roles}, f)
    return path


def engine_identity(setting: str, environ=None, enforce_eager: bool = False) -> str:
    """What a setting's engine runs, as text that is equal for equal engines:
    its engine arguments, the kvcomp config as the backend resolves it (the
    defaults filled in as they stand in this checkout) and the KVCOMP_ switches
    as they read under ``environ`` (default: the setting's own ``_env`` alone),
    ``KVCOMP_EVICTION_GRAPHS`` as whether its decode steps are captured
    (``eviction_gpu.graph_eviction``, with vLLM's default graphs or none under
    ``enforce_eager``), without those that do not act on it (``_without_idle_switches``)."""
    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.kernels.eviction_gpu import graph_eviction
    from vllm_kvcomp.launch_env import (DECODE_LAUNCH_ENV, EVICTION_GRAPHS_ENV,
                                        SWITCH_DEFAULTS, switch)

    spec = copy.deepcopy(SETTINGS[setting])
    env = dict(spec.pop("_env", {})) if environ is None else dict(environ)
    share = spec.pop("_head_map_streaming", None)
    kvcomp = spec.get("additional_config", {}).pop("kvcomp", None)
    if kvcomp is not None:
        if share is not None:
            kvcomp["head_map"] = f"<{share:g} of each layer's KV heads streaming>"
        cfg = KvcompConfig(**kvcomp)
        spec["kvcomp"] = repr(cfg)
        spec["switches"] = {var: switch(var, env) for var in SWITCH_DEFAULTS}
        engine = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=enforce_eager))
        spec["switches"][EVICTION_GRAPHS_ENV] = graph_eviction(cfg, engine, env)
        spec["decode_launch"] = env.get(DECODE_LAUNCH_ENV, "")
    return json.dumps(_without_idle_switches(spec), sort_keys=True)


def _without_idle_switches(spec: dict) -> dict:
    """``spec`` without the eviction switches where its engine has no eviction:
    such an engine is the same engine whatever they read."""
    from vllm_kvcomp.launch_env import EVICTION_SWITCHES

    # the config's dataclass repr says eviction=None where it has none
    if "switches" in spec and re.search(r"\beviction=None\b", spec.get("kvcomp", "")):
        spec["switches"] = {var: on for var, on in spec["switches"].items()
                            if var not in EVICTION_SWITCHES}
    return spec


def comparable_identity(identity: str) -> str:
    """A recorded ``engine_identity`` text as this checkout writes it: runs
    recorded every switch as it read (``KVCOMP_EVICTION_GRAPHS`` was whether
    decode steps were captured then too)."""
    return json.dumps(_without_idle_switches(json.loads(identity)), sort_keys=True)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def generate_until(engine, prompts, params, deadline_s: float, clock=time.perf_counter):
    """Serve ``prompts`` on ``engine`` (vLLM's ``LLMEngine``, ``params`` with
    ``RequestOutputKind.DELTA``) step by step until every request has finished or
    ``deadline_s`` seconds have passed, then abort the rest: a workload too long
    to run whole still tells how fast its first ``deadline_s`` seconds went.
    -> (tokens, first, last, finished, seconds): output tokens per request, when
    (seconds from the start, at the end of the engine step that made them) each
    request's first and last tokens came, the finished requests' indices."""
    ids = [str(i) for i in range(len(prompts))]
    # the clock starts before the requests go in, as llm.generate's elapsed time does: the
    # engine core works on the first while the last are added
    t0 = clock()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    tokens, first, last, finished = [0] * len(ids), {}, {}, set()
    while engine.has_unfinished_requests():
        if clock() - t0 >= deadline_s:
            engine.abort_request([rid for i, rid in enumerate(ids) if i not in finished])
            break
        outs = engine.step()
        now = clock() - t0
        for out in outs:
            i = int(out.request_id)
            n = len(out.outputs[0].token_ids)
            if n:
                first.setdefault(i, now)
                last[i] = now
                tokens[i] += n
            if out.finished:
                finished.add(i)
    return tokens, first, last, finished, clock() - t0


def run_one(args):
    """One engine (one setting) runs every workload in ``args.workload``
    (comma-separated) in turn: engine start-up is paid once."""
    from vllm import LLM, SamplingParams

    import random

    workloads = args.workload.split(",")
    # a cut run counts each step's new tokens (cumulative outputs would copy every
    # request's whole output at every step)
    stream = {}
    if args.cut_after:
        from vllm.sampling_params import RequestOutputKind

        stream = {"output_kind": RequestOutputKind.DELTA}
    max_len = max(WORKLOADS[w][1] + WORKLOADS[w][2] for w in workloads) + 16
    kwargs = copy.deepcopy(SETTINGS[args.setting])
    os.environ.update(kwargs.pop("_env", {}))  # before the engine's processes start
    share = kwargs.pop("_head_map_streaming", None)
    if share is not None:
        kwargs["additional_config"]["kvcomp"]["head_map"] = write_head_map(args.model, share)
    if args.kv_gib:
        kwargs["kv_cache_memory_bytes"] = int(args.kv_gib * (1 << 30))
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.fast_start:
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    if args.profile:
        # vLLM's torch profiler over a window of engine steps; on stop it writes
        # profiler_out_0.txt (ops by self CUDA time), small enough to bring back
        kwargs["profiler_config"] = {
            "profiler": "torch", "torch_profiler_dir": os.path.join(args.profile, args.setting),
            "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True,
            "delay_iterations": args.profile_delay, "max_iterations": args.profile_iters,
            # only the engine's steps: a frontend profiler running through the delay
            # would cost the run itself
            "ignore_frontend": True}
    if args.capture_sizes:
        # the same short list for every setting: vLLM pads a decode batch to
        # the next size, and a long list costs minutes of capture per engine
        sizes = [int(x) for x in args.capture_sizes.split(",")]
        kwargs.setdefault("compilation_config", {})["cudagraph_capture_sizes"] = sizes
    t_start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=max_len, gpu_memory_utilization=args.gpu_mem,
              disable_log_stats=False, seed=0, enforce_eager=args.eager, **kwargs)
    rng = random.Random(0)
    warm = [{"prompt_token_ids": [rng.randrange(1000, 120000) for _ in range(64)]}] * 2
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
    # engine start-up (load, profile, KV allocation, graph capture, warm-up): what a
    # GPU run must allow per setting before any workload runs
    startup_s = time.perf_counter() - t_start
    for w in workloads:
        n, prompt_len, out_len = WORKLOADS[w]
        prompts = [{"prompt_token_ids": [rng.randrange(1000, 120000) for _ in range(prompt_len)]}
                   for _ in range(n)]
        params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0,
                                detokenize=False, **stream)
        if args.profile:
            llm.start_profile()
        cut = {}
        if args.cut_after:
            counts, first, last, _, elapsed = generate_until(
                llm.llm_engine, prompts, params, args.cut_after)
            out_tokens, completed = sum(counts), sum(c == out_len for c in counts)
            # step-end times: the same clock for every setting of a cut run; requests with no
            # token by the cut have no TTFT, so a slow format's p99 reads low
            ttft = list(first.values())
            tpot = [(last[i] - first[i]) / (counts[i] - 1) for i in first if counts[i] > 1]
            cut = dict(cut_after_s=args.cut_after, output_tokens=out_tokens)
        else:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            completed = sum(len(o.outputs[0].token_ids) == out_len for o in outs)
            ttft, tpot = [], []
            for o in outs:
                m = o.metrics
                if m is None:
                    continue
                ttft.append(m.first_token_latency)
                if m.num_generation_tokens > 1:
                    tpot.append((m.last_token_ts - m.first_token_ts)
                                / (m.num_generation_tokens - 1))
        if args.profile:
            llm.stop_profile()
        res = dict(setting=args.setting, workload=w, startup_s=startup_s, requests=n,
                   prompt_len=prompt_len,
                   output_len=out_len, elapsed_s=elapsed, output_tok_s=out_tokens / elapsed,
                   total_tok_s=(out_tokens + n * prompt_len) / elapsed,
                   ttft_p50=_pct(ttft, 0.5), ttft_p99=_pct(ttft, 0.99),
                   tpot_p50=_pct(tpot, 0.5), tpot_p99=_pct(tpot, 0.99),
                   completed=completed, **cut,
                   # which GPU of the host and which decode launch (kvcomp) ran it
                   gpu=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                   decode_launch=os.environ.get("KVCOMP_DECODE_LAUNCH", ""),
                   # what ran, so that tables of later days tell this engine from one of
                   # the same name whose defaults have changed since (side_by_side.py)
                   engine=engine_identity(args.setting, os.environ, args.eager),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        print("RESULT " + json.dumps(res), flush=True)


def _ms(seconds):
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"  # no TPOT with one output token


def print_tables(rows, device, workloads, kv_gib, fast_start, date):
    """One markdown table per workload, every setting against bf16's row."""
    for w in workloads:
        base = next((r for r in rows if r.get("setting") == "bf16" and r["workload"] == w
                     and "output_tok_s" in r), None)
        print(f"\n{device}, workload {w} {WORKLOADS[w]} (requests, prompt, output), "
              f"kv_gib={kv_gib}, fast_start={fast_start}, {date}")
        print("| setting | KV tokens | output tok/s | vs bf16 | TTFT p50/p99 s | TPOT p50/p99 ms | done |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if r["workload"] != w:
                continue
            if "output_tok_s" not in r:
                print(f"| {r['setting']} | {r.get('kv_cache_tokens')} | failed | | | | |")
                continue
            rel = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else ""
            kvt = f"{r['kv_cache_tokens']:,}" if r["kv_cache_tokens"] else "?"
            print(f"| {r['setting']} | {kvt} | {r['output_tok_s']:.0f} | {rel} | "
                  f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} | "
                  f"{_ms(r['tpot_p50'])}/{_ms(r['tpot_p99'])} | {r['completed']}/{r['requests']}"
                  + (f" (cut at {r['cut_after_s']:g} s)"
                     if r.get("cut_after_s") and r["completed"] < r["requests"] else "")
                  + " |")


def merge(paths, order):
    """Tables over the results of several runs (e.g. settings spread over the
    GPUs of one host, one ``--out`` file each); rows in ``order`` of setting."""
    runs = [json.load(open(p)) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    rank = {s: i for i, s in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["setting"], len(rank)))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    kv = {re.search(r"--kv-gib (\S+)", run["command"]) for run in runs}
    kv_gib = ",".join(sorted(m.group(1) for m in kv if m)) or None
    devices = ", ".join(sorted({run["device"] for run in runs}))
    fast = all("--fast-start" in run["command"] for run in runs)
    print_tables(rows, devices, workloads, kv_gib, fast,
                 ", ".join(sorted({run["date"] for run in runs})))


def _save(args, device, rows):
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, date=time.strftime("%Y-%m-%d"), workload=args.workload,
                           command=" ".join(sys.argv), rows=rows), f, indent=1)


def run_setting(args, s, gpu):
    """One setting's engine in its own process (on GPU ``gpu`` when given):
    its rows, one per workload, the failure's log where one did not finish."""
    cmd = [sys.executable, __file__, "--setting", s, "--model", args.model,
           "--workload", args.workload, "--gpu-mem", str(args.gpu_mem)]
    if args.eager:
        cmd.append("--eager")
    if args.fast_start:
        cmd.append("--fast-start")
    if args.kv_gib:
        cmd += ["--kv-gib", str(args.kv_gib)]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.capture_sizes:
        cmd += ["--capture-sizes", args.capture_sizes]
    if args.cut_after:
        cmd += ["--cut-after", str(args.cut_after)]
    if args.profile:
        cmd += ["--profile", args.profile, "--profile-delay", str(args.profile_delay),
                "--profile-iters", str(args.profile_iters)]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
    t = time.time()
    # Own process group: on timeout the engine core and workers it spawned
    # die with it (an orphaned engine keeps its GPU memory, and every later
    # setting then fails to start).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=env)
    try:
        log = p.communicate(timeout=args.timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log = p.communicate()[0] + f"\n[timed out after {args.timeout} s]"
    m = KV_TOKENS.search(log)
    kv_tokens = int(m.group(1).replace(",", "")) if m else None
    done = {}
    for line in log.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            done[r["workload"]] = r
    rows = []
    for w in args.workload.split(","):
        row = done.get(w, {"setting": s, "workload": w, "error": log[-1500:]})
        if w not in done:
            # the engine's own (tok/s, running requests) of its last ten stats intervals
            row["logged_generation"] = [(float(a), int(b)) for a, b in GEN_RATE.findall(log)][-10:]
        row["kv_cache_tokens"] = kv_tokens
        row["wall_s"] = time.time() - t
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    if len(done) < len(args.workload.split(",")):
        print(log[-2500:], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama8b-shape")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--workload", default="W1", help="comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--settings", default="bf16,kvcomp_k4v4")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--kv-gib", type=float, default=None)
    ap.add_argument("--fast-start", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="vLLM max_num_seqs for every setting (default vLLM's 256); W2 has 512 "
                         "requests, so 512 lets a format whose capacity fits them all run them "
                         "all at once")
    ap.add_argument("--capture-sizes", default=None,
                    help="CUDA-graph capture sizes for every setting, e.g. 1,2,4,8,16,32,64,128,256")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="torch-profile engine steps of each setting into DIR/<setting> "
                         "(profiler_out_0.txt: ops by self CUDA time); throughput numbers of a "
                         "profiled run are not comparable with unprofiled ones")
    ap.add_argument("--profile-delay", type=int, default=0,
                    help="engine steps to skip before the profiled window")
    ap.add_argument("--profile-iters", type=int, default=20,
                    help="engine steps in the profiled window")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print the tables of these --out files together (settings in "
                         "--settings order) and exit")
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--cut-after", type=float, default=None, metavar="S",
                    help="stop each workload S seconds after its first request and abort "
                         "the rest (a cut run: output tok/s over those S seconds, the "
                         "requests done by then); for a workload longer than the GPU time "
                         "at hand. --timeout still bounds the whole process")
    ap.add_argument("--gpus", type=int, default=1,
                    help="run up to this many settings at once, one GPU each (a multi-GPU "
                         "host); 1: one after another on the visible device")
    args = ap.parse_args()
    if args.setting:
        return run_one(args)
    if args.merge:
        return merge(args.merge, args.settings.split(","))
    make_model_dir(args.model, args.layers)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    settings = args.settings.split(",")
    by_setting = {}
    # one GPU per engine: settings run side by side on a multi-GPU host, each
    # pinned to its own device, all with the same KV memory (--kv-gib)
    free = list(range(max(1, args.gpus)))
    lock = threading.Lock()

    def one(s):
        with lock:
            gpu = free.pop(0)
        try:
            got = run_setting(args, s, gpu if args.gpus > 1 else None)
        finally:
            with lock:
                free.append(gpu)
        with lock:
            by_setting[s] = got
            _save(args, device, [r for x in settings for r in by_setting.get(x, [])])
        return got

    with ThreadPoolExecutor(max(1, args.gpus)) as pool:
        list(pool.map(one, settings))
    rows = [r for s in settings for r in by_setting[s]]
    print_tables(rows, device, args.workload.split(","), args.kv_gib, args.fast_start,
                 time.strftime("%Y-%m-%d"))
    _save(args, device, rows)


if __name__ == "__main__":
    main()
