"""Does the engine start and serve? One small Llama-shaped model per head size,
one vLLM engine per (setting, engine mode), several engines side by side on
one GPU.

    python benchmarks/engine_matrix.py --out DIR [--modes default,fast] [--parallel 4]

``default`` is vLLM's own engine set-up (torch.compile, FULL_AND_PIECEWISE CUDA
graphs over the default capture sizes); ``fast`` is the benchmarks'
fast-start (no torch.compile, FULL_DECODE_ONLY graphs). Each engine serves
prompts from 1 token to nearly ``max_model_len`` (several prefill chunks)
beside a batch of short ones (decode batches inside the captured graphs), all
greedy with ``ignore_eos``. A row passes when every request returns its full
output. The bf16 / fp16 reference rows (vLLM's default backend) give each
kvcomp row its first-token agreement with an uncompressed cache on the same
weights. Writes ``DIR/engine_matrix.json`` and ``DIR/engine_matrix.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# model: (head size, query heads, KV heads); settings: (name, model, dtype, kvcomp settings)
MODELS = {"d64": (64, 8, 2), "d128": (128, 8, 2), "d256": (256, 4, 1)}
SETTINGS = [
    ("k4v4", "d128", "bfloat16", {"k_bits": 4, "v_bits": 4}),
    ("k4v4", "d128", "float16", {"k_bits": 4, "v_bits": 4}),
    ("k4v4", "d64", "bfloat16", {"k_bits": 4, "v_bits": 4}),
    ("k4v4", "d256", "bfloat16", {"k_bits": 4, "v_bits": 4}),
    ("k4v4_r0", "d128", "bfloat16", {"k_bits": 4, "v_bits": 4, "residual_tokens": 0}),
    ("k4v4_r32", "d128", "bfloat16", {"k_bits": 4, "v_bits": 4, "residual_tokens": 32}),
    ("k4v4_r0", "d256", "float16", {"k_bits": 4, "v_bits": 4, "residual_tokens": 0}),
    ("k2v2", "d128", "bfloat16", {"k_bits": 2, "v_bits": 2}),
    ("k2v2", "d256", "float16", {"k_bits": 2, "v_bits": 2}),
    ("k8v8", "d128", "bfloat16", {"k_bits": 8, "v_bits": 8}),
    ("k8v8", "d64", "float16", {"k_bits": 8, "v_bits": 8}),
    ("k4v2_g32", "d128", "bfloat16", {"k_bits": 4, "v_bits": 2, "group_size": 32}),
    ("k4v2_g32_r32", "d64", "float16",
     {"k_bits": 4, "v_bits": 2, "group_size": 32, "residual_tokens": 32}),
    ("k2v2_g32_vg128", "d128", "bfloat16",
     {"k_bits": 2, "v_bits": 2, "group_size": 32, "value_group_size": 128}),
    ("k16v16", "d128", "bfloat16", {"k_bits": 16, "v_bits": 16}),
    ("k8v8_r0", "d128", "bfloat16", {"k_bits": 8, "v_bits": 8, "residual_tokens": 0}),
    ("k8v8_r0", "d64", "float16", {"k_bits": 8, "v_bits": 8, "residual_tokens": 0}),
    ("k16v16_r0", "d128", "bfloat16", {"k_bits": 16, "v_bits": 16, "residual_tokens": 0}),
    ("k4v2_g32_r0", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 2, "group_size": 32, "residual_tokens": 0}),
    ("k4v4_full_precision", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "prompt_attention": "full_precision"}),
    ("k4v4_flash_attn", "d128", "float16",
     {"k_bits": 4, "v_bits": 4, "fresh_prefill": "flash_attn"}),
    # Quest: both layers sparse, 4 of the longest prompts' 32 pages
    ("k4v4_quest512", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "quest": {"budget_tokens": 512, "dense_layers": 0}}),
    # head split: one of each layer's two KV heads streaming, sinks
    # 64 + window 256, so the longer prompts' streaming heads drop most of their context;
    # the map (a dict here) is written to a file beside the model, what head_map takes
    ("k4v4_split50", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4,
      "head_map": {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]]}}),
    # the same, its prompts served twice ("_rounds"): the second round hits the streaming
    # heads' sinks + window and the retrieval heads' pages the first one cached (reported:
    # hit tokens, and how many tokens the rounds share)
    ("k4v4_split50_prefix", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "_rounds": 2,
      "head_map": {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]]}}),
    ("k4v2_g32_split50", "d64", "float16",
     {"k_bits": 4, "v_bits": 2, "group_size": 32, "sink_tokens": 16, "recent_tokens": 100,
      "head_map": {"layers": [["streaming", "retrieval"], ["retrieval", "streaming"]]}}),
    # opt-in: the full-precision window as a ring of pages per request (residual_ring),
    # its residual write after the attention; the longer prompts' chunks outrun the ring
    ("k4v4_ring", "d128", "bfloat16", {"k_bits": 4, "v_bits": 4, "residual_ring": True}),
    ("k2v2_ring", "d256", "float16", {"k_bits": 2, "v_bits": 2, "residual_ring": True}),
    ("k4v2_g32_ring", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 2, "group_size": 32, "residual_ring": True}),
    # opt-in: the ring in float8 e4m3 (residual_dtype), the capacity bar's setting
    ("k4v4_ring_fp8", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "residual_ring": True, "residual_dtype": "fp8_e4m3"}),
    ("k2v2_ring_fp8", "d256", "float16",
     {"k_bits": 2, "v_bits": 2, "residual_ring": True, "residual_dtype": "fp8_e4m3"}),
    # opt-in window settings at the capacity bar (bench_e2e.py's kvcomp_k4v4_ring_g64, ...):
    # 64-token key groups with one value group, a 0..63-token ring in the model dtype
    ("k4v4_ring_g64", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "group_size": 64, "value_group_size": 128,
      "residual_ring": True}),
    # the same groups, a 64..127-token ring in e4m3
    ("k4v4_ring_fp8_g64_r64", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "group_size": 64, "value_group_size": 128,
      "residual_tokens": 64, "residual_ring": True, "residual_dtype": "fp8_e4m3"}),
    # k2v2, windows of 160..287 and 224..351 tokens in e4m3
    ("k2v2_ring_fp8_r160", "d128", "bfloat16",
     {"k_bits": 2, "v_bits": 2, "residual_tokens": 160, "residual_ring": True,
      "residual_dtype": "fp8_e4m3"}),
    ("k2v2_ring_fp8_r224", "d64", "float16",
     {"k_bits": 2, "v_bits": 2, "residual_tokens": 224, "residual_ring": True,
      "residual_dtype": "fp8_e4m3"}),
    # SnapKV keeps 512 of the longer prompts' tokens a KV
    # head, StreamingLLM sinks 4 + 256 recent; the kernels skip the freed pages
    ("k4v4_snapkv", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "snapkv", "budget_tokens": 512}}),
    ("k4v2_g32_streaming", "d64", "float16",
     {"k_bits": 4, "v_bits": 2, "group_size": 32,
      "eviction": {"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 256}}),
    # H2O keeps 512 tokens a KV head (256 heavy hitters
    # scored by the decode kernel's own probabilities, 256 recent), its decode steps
    # captured in CUDA graphs (the eviction as fixed-shape device work)
    ("k4v4_h2o", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512}}),
    # A2SF (H2O with a forgetting factor)
    ("k4v4_a2sf", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4,
      "eviction": {"method": "a2sf", "budget_tokens": 512, "alpha": 0.9}}),
    # H2O with its decode steps eager (KVCOMP_EVICTION_GRAPHS=0; "_env": set in the
    # engine's process before it starts): the captured engine's tokens (SAME_TOKENS)
    ("k4v4_h2o_eager", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_env": {"KVCOMP_EVICTION_GRAPHS": "0"}}),
    # the rows' eviction steps found by torch ops before the selection launch
    # (KVCOMP_DECODE_ROWS_KERNEL=0): the same bytes, so the eager engine's tokens (SAME_TOKENS)
    ("k4v4_h2o_torch_rows", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_env": {"KVCOMP_DECODE_ROWS_KERNEL": "0"}}),
    # captured and eager with at most 8 requests running, the 1-token prompt served apart
    # ("_late_one_token", one_token_among_decodes): it joins seven requests that are
    # decoding, a step of one query a request of which one ends a prompt, the step that
    # patches/prompt_steps.py keeps out of the captured graphs; batches of 3, 5, 6 and 7
    # requests are padded to a captured size. A captured step sizes its split-K for
    # max_model_len, an eager one for its longest request, so at these batches the two sum
    # attention in different orders and H2O's near-ties may go either way: compared by
    # agreement. With every decode step at 4 splits (KVCOMP_DECODE_LAUNCH num_splits) what
    # is left to differ is the captured eviction itself: the tokens must be equal
    # (SAME_TOKENS)
    ("k4v4_h2o_late", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_late_one_token": True}),
    ("k4v4_h2o_eager_late", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_late_one_token": True, "_env": {"KVCOMP_EVICTION_GRAPHS": "0"}}),
    ("k4v4_h2o_late_s4", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_late_one_token": True, "_env": {"KVCOMP_DECODE_LAUNCH": "num_splits=4"}}),
    ("k4v4_h2o_eager_late_s4", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_late_one_token": True,
      "_env": {"KVCOMP_EVICTION_GRAPHS": "0", "KVCOMP_DECODE_LAUNCH": "num_splits=4"}}),
    # H2O captured with the selection by a stable sort and the probabilities normalised in a
    # pass of their own (KVCOMP_SELECT_KERNEL=0, KVCOMP_SCORE_FROM_LOGITS=0): the sort keeps the
    # Triton selection's tokens; the normalising path's scores differ from the logits
    # path's in exp2's last bits, so its tokens are compared by agreement, not required equal
    ("k4v4_h2o_sort", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "_env": {"KVCOMP_SELECT_KERNEL": "0", "KVCOMP_SCORE_FROM_LOGITS": "0"}}),
    # a head map whose retrieval heads keep their window as an e4m3 ring
    ("k4v4_split50_ring_fp8", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "residual_ring": True, "residual_dtype": "fp8_e4m3",
      "head_map": {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]]}}),
    # a head map with eviction from its retrieval heads
    ("k4v4_split50_h2o", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "h2o", "budget_tokens": 512},
      "head_map": {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]]}}),
    # Quest over the pages SnapKV kept
    ("k4v4_snapkv_quest256", "d128", "bfloat16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "snapkv", "budget_tokens": 1024},
      "quest": {"budget_tokens": 256, "dense_layers": 0}}),
    ("k4v4_split50_snapkv", "d64", "float16",
     {"k_bits": 4, "v_bits": 4, "eviction": {"method": "snapkv", "budget_tokens": 512},
      "head_map": {"layers": [["streaming", "retrieval"], ["retrieval", "streaming"]]}}),
]
# the eviction settings whose decode steps run eagerly by default, captured
# (KVCOMP_EVICTION_GRAPHS=1): their eager twins' tokens (SAME_TOKENS), what
# eviction_gpu.captured_by_default asks of a setting before capturing it by default
EAGER_BY_DEFAULT = ("k4v4_snapkv", "k4v4_a2sf", "k4v4_split50_h2o", "k4v4_snapkv_quest256",
                    "k4v4_split50_snapkv")
SETTINGS += [(name + "_graphs", model, dtype,
              {**kv, "_env": {**kv.get("_env", {}), "KVCOMP_EVICTION_GRAPHS": "1"}})
             for name, model, dtype, kv in SETTINGS if name in EAGER_BY_DEFAULT]
REFERENCES = [("reference", m, dt, None) for m in MODELS for dt in ("bfloat16", "float16")]
MAX_MODEL_LEN = 4096
PROMPT_LENS = [1, 7, 130, 300, 1000, 2100, 4000] + [50] * 64
OUTPUT_LEN = 24


def model_dir(root: str, name: str) -> str:
    from vllm_kvcomp.tiny_model import make_tiny_llama

    d, heads, kv = MODELS[name]
    return make_tiny_llama(os.path.join(root, name), num_layers=2, hidden_size=512,
                           num_heads=heads, num_kv_heads=kv, head_dim=d, vocab_size=512,
                           max_position_embeddings=MAX_MODEL_LEN)


def run_one(spec: dict) -> None:
    """In a fresh process: one engine, every prompt; prints RESULT <json>."""
    import random

    from vllm import LLM, SamplingParams

    kw = {}
    kvcomp = spec["kvcomp"]
    rounds, late_one_token = 1, False
    if kvcomp is not None:  # the row's own keys, not settings
        kvcomp = dict(kvcomp)
        os.environ.update(kvcomp.pop("_env", {}))  # before the engine's processes start
        rounds = kvcomp.pop("_rounds", 1)
        late_one_token = kvcomp.pop("_late_one_token", False)
    if kvcomp is not None and "eviction" in kvcomp:
        from vllm_kvcomp.launch_env import EVICTION_GPU_ENV

        os.environ[EVICTION_GPU_ENV] = "1"
    if kvcomp is not None and isinstance(kvcomp.get("head_map"), dict):
        # one file per engine: both modes of a row may start at once
        path = os.path.join(spec["model"], f"head_map_{spec['name']}_{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(kvcomp["head_map"], f)
        kvcomp = {**kvcomp, "head_map": path}
    if kvcomp is not None:
        kw = dict(attention_backend="kvcomp", additional_config={"kvcomp": kvcomp})
    if spec["mode"] == "fast":
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    t0 = time.perf_counter()
    # token ids cover the model's vocabulary, not the tiny tokenizer's; several engines
    # share the GPU, so each asks for a small share (vLLM checks it is free at start)
    llm = LLM(spec["model"], dtype=spec["dtype"], max_model_len=MAX_MODEL_LEN, seed=0,
              skip_tokenizer_init=True, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=2 << 30, max_num_seqs=8 if late_one_token else 128, **kw)
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(n)]}
               for n in PROMPT_LENS]
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True,
                            detokenize=False)
    if late_one_token:
        tokens = one_token_among_decodes(llm, prompts, params)
    else:
        tokens = [list(o.outputs[0].token_ids)
                  for o in llm.generate(prompts, params, use_tqdm=False)]
    result = dict(startup_s=startup, tokens=tokens)
    for _ in range(rounds - 1):  # the same prompts again: prefix-cache hits
        again = llm.generate(prompts, params, use_tqdm=False)
        result["rounds_hit_tokens"] = sum(o.num_cached_tokens or 0 for o in again)
        result["rounds_token_agreement"] = sum(
            x == y for o, t in zip(again, tokens) for x, y in zip(o.outputs[0].token_ids, t)
        ) / (len(tokens) * OUTPUT_LEN)
    print("RESULT " + json.dumps(result), flush=True)


def one_token_among_decodes(llm, prompts: list, params) -> list:
    """The tokens of ``prompts`` (in their order), the 1-token prompts served
    apart: each added to the engine once seven requests of 50-token prompts
    are all decoding (a step of one query a request, one of which ends its
    prompt); those seven requests' tokens follow, beyond the prompts' count."""
    late = [i for i, n in enumerate(PROMPT_LENS) if n == 1]
    rest = [i for i in range(len(prompts)) if i not in late]
    tokens = [None] * len(prompts)
    for i, o in zip(rest, llm.generate([prompts[i] for i in rest], params, use_tqdm=False)):
        tokens[i] = list(o.outputs[0].token_ids)
    from vllm.sampling_params import RequestOutputKind

    companions = [prompts[i] for i, n in enumerate(PROMPT_LENS) if n == 50][:7]
    engine, extra = llm.llm_engine, []
    # LLM.generate left params' output kind at FINAL_ONLY; each step's tokens so far
    # are what says the companions are decoding
    params = params.clone()
    params.output_kind = RequestOutputKind.CUMULATIVE
    for n_late, i in enumerate(late):
        # outputs carry the ids given here (the engine's own have a suffix)
        ids = [f"late{n_late}-c{j}" for j in range(len(companions))]
        for r, p in zip(ids, companions):
            engine.add_request(r, p, params)
        produced, done = {}, {}

        def step():
            assert engine.has_unfinished_requests(), (produced, ids)
            for o in engine.step():
                produced[o.request_id] = len(o.outputs[0].token_ids)
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)

        while min(produced.get(r, 0) for r in ids) < 2:  # every companion past its prompt
            step()
        late_id = f"late{n_late}"
        engine.add_request(late_id, prompts[i], params)
        while late_id not in produced:
            step()
        # its first token came from a step in which the companions were decoding
        assert all(produced[r] < OUTPUT_LEN for r in ids), produced
        while engine.has_unfinished_requests():
            step()
        tokens[i] = done[late_id]
        extra += [done[r] for r in ids]
    return tokens + extra


def launch(spec: dict, timeout: int) -> dict:
    t = time.time()
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    row = dict(spec, wall_s=round(time.time() - t, 1), ok=bool(lines) and p.returncode == 0)
    if lines:
        row.update(json.loads(lines[-1][7:]))
    else:
        row["error"] = (p.stdout + p.stderr)[-3000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--modes", default="default,fast")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--models-dir", default="/tmp/engine_matrix_models")
    ap.add_argument("--rows", help="comma-separated setting names to run (default: all)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(json.loads(args.one))
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    dirs = {m: model_dir(args.models_dir, m) for m in MODELS}
    settings = SETTINGS
    if args.rows:
        wanted = set(args.rows.split(","))
        unknown = wanted - {n for n, *_ in SETTINGS}
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}")
        settings = [row for row in SETTINGS if row[0] in wanted]
    specs = [dict(name=n, model_name=m, model=dirs[m], dtype=dt, kvcomp=kv, mode=mode)
             for mode in args.modes.split(",") for n, m, dt, kv in settings]
    specs += [dict(name=n, model_name=m, model=dirs[m], dtype=dt, kvcomp=None, mode="fast")
              for n, m, dt, _ in REFERENCES]
    # references right after the first mode's rows: a run cut short keeps both
    n_first = len(settings)
    specs = specs[:n_first] + specs[len(specs) - len(REFERENCES):] + specs[n_first:-len(REFERENCES)]
    rows, lock = [], threading.Lock()

    def one(spec):
        row = launch(spec, args.timeout)
        with lock:  # the tables so far are rewritten after every engine
            rows.append(row)
            report(args, rows)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, specs))
    report(args, rows, final=True)


# rows whose tokens must be another row's, token for token (the same computation on another
# path: a captured decode step against the eager one), reported as "same tokens as"
SAME_TOKENS = {"k4v4_h2o": "k4v4_h2o_eager", "k4v4_h2o_torch_rows": "k4v4_h2o_eager",
               "k4v4_h2o_late_s4": "k4v4_h2o_eager_late_s4",
               **{name + "_graphs": name for name in EAGER_BY_DEFAULT}}


def report(args, rows, final=False) -> None:
    refs = {(r["model_name"], r["dtype"]): r.get("tokens") for r in rows if r["kvcomp"] is None}
    for r in rows:
        toks, ref = r.get("tokens"), refs.get((r["model_name"], r["dtype"]))
        r["complete"] = bool(toks) and all(len(t) == OUTPUT_LEN for t in toks)
        r["first_token_agreement"] = (
            sum(a[0] == b[0] for a, b in zip(toks, ref)) / len(ref) if toks and ref else None)
        r["token_agreement"] = (
            sum(x == y for a, b in zip(toks, ref) for x, y in zip(a, b)) / (len(ref) * OUTPUT_LEN)
            if toks and ref else None)
    by_name = {(r["name"], r["mode"]): r.get("tokens") for r in rows}
    for r in rows:
        twin = SAME_TOKENS.get(r["name"])
        other = by_name.get((twin, r["mode"])) if twin else None
        if r.get("tokens") and other:
            r["same_tokens_as"] = twin
            r["same_tokens"] = r["tokens"] == other
            # where they part: (request, token) of the first difference, and how many of
            # the requests differ (a near-tie flipped once, or a path that is wrong)
            diff = [(i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y),
                             min(len(a), len(b))))
                    for i, (a, b) in enumerate(zip(r["tokens"], other)) if a != b]
            r["requests_differing"] = len(diff)
            r["first_difference"] = diff[0] if diff else None
    with open(os.path.join(args.out, "engine_matrix.json"), "w") as f:
        json.dump(dict(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"),
                       rows=[{k: v for k, v in r.items() if k != "tokens"} for r in rows]), f,
                  indent=1)
    lines = ["| setting | head size | dtype | engine | starts and serves | start-up s | "
             "first-token agreement | token agreement |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if r["ok"] and r["complete"] else "**no**"
        fa = "-" if r["first_token_agreement"] is None else f"{r['first_token_agreement']:.3f}"
        ta = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.3f}"
        st = f"{r['startup_s']:.0f}" if "startup_s" in r else "-"
        lines.append(f"| {r['name']} | {MODELS[r['model_name']][0]} | {r['dtype']} | {r['mode']} "
                     f"| {ok} | {st} | {fa} | {ta} |")
    for r in rows:
        if "same_tokens" in r:
            same = "equal to" if r["same_tokens"] else "**differ from**"
            where = "" if r["same_tokens"] or not r["first_difference"] else (
                f" in {r['requests_differing']} of {len(r['tokens'])} requests, first at "
                f"request {r['first_difference'][0]}, token {r['first_difference'][1]}")
            lines.append(f"\n{r['name']} ({r['mode']}): tokens {same} "
                         f"{r['same_tokens_as']}'s{where}")
        if "rounds_hit_tokens" in r:
            lines.append(f"\n{r['name']} ({r['mode']}): second round {r['rounds_hit_tokens']} "
                         f"prefix-hit tokens, token agreement with the first "
                         f"{r['rounds_token_agreement']:.3f}")
    with open(os.path.join(args.out, "engine_matrix.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not final:
        return
    print("\n".join(lines))
    for r in rows:
        if not (r["ok"] and r["complete"]):
            print(f"--- {r['name']} {r['model_name']} {r['dtype']} {r['mode']}:\n"
                  f"{r.get('error', '')[-1500:]}")


if __name__ == "__main__":
    main()
