"""Quality of KV-cache formats through vLLM: perplexity, passkey, agreement.

    python -m quality.evaluate --model quality/model --out results [--device cpu|gpu] [--quick]
        [--settings baseline,kvcomp_k4v4] [--jobs 3] [--resume]

For every KV setting a fresh process starts a vLLM ``LLM`` (engines do not
free cleanly in-process) and measures, on the same token prompts:

* perplexity of held-out text through ``prompt_logprobs`` at several
  context lengths (whole window, and its last quarter);
* passkey retrieval: contexts x needle depths, greedy, exact match;
* greedy continuations of held-out text, compared with the baseline: token
  match rate and first-divergence position.

Prefill is chunked (``--prefill-chunk``, default 16 tokens a step): the
kvcomp backend attends to the tokens of the current step in full precision
and reads only earlier steps from the compressed pages, so an unchunked
prompt would not exercise quantization at all. With 16-token chunks and
``group_size`` / ``residual_tokens`` multiples of 16, a scored token reads
exactly the packed / full-precision split it would read decoding; longer
chunks leave up to chunk - 1 more tokens unquantized and flatter the codes
(256-token chunks, the grids before 2026-12-02: ~2.5x at 2 bits on the
6M model, docs/quality.md). fp8 (FlashAttention) reads even the current
chunk back from its fp8 cache; TurboQuant attends a request's first chunk
raw and later ones from its cache; the chunk size is in every results file.
Tokens further back than ``residual_tokens`` + ``group_size`` are the ones
read quantized: texts must be longer than ~512 tokens to measure anything.

Outputs in ``--out``: ``results.json`` (everything, plus model / device /
date / command), ``results.md`` (tables), ``passkey.png`` (heat map per
setting), ``ppl_vs_bits.png``, ``nll_by_position.png``; per-setting raw
results and engine logs under ``raw/`` and ``logs/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from quality import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HELDOUT = os.path.join(HERE, "data", "heldout.jsonl.gz")
KV_SIZE_RE = re.compile(r"KV cache size: ([\d,]+) tokens")


# ---------------------------------------------------------------- settings
def _kvcomp(k, v, residual=128, axis="channel", group=None, value_group=None, quest=None,
            snapkv=None, head_map=None, scored=None, fp8_window=False, ring=False):
    kv = {"k_bits": k, "v_bits": v, "residual_tokens": residual, "key_axis": axis}
    if ring:
        # the window's pages as one ring a request: the same tokens, the capacity it logs
        kv["residual_ring"] = True
    if fp8_window:
        # the full-precision window held in float8 e4m3
        kv["residual_dtype"] = "fp8_e4m3"
    if group is not None:
        kv["group_size"] = group
    if value_group is not None:
        kv["value_group_size"] = value_group
    if quest is not None:
        # Quest's own default of two dense layers
        kv["quest"] = {"budget_tokens": quest}
    if head_map is not None:
        # a head map in quality/maps/ (retrieval / streaming heads, 64 + 256 tokens)
        kv["head_map"] = os.path.join(HERE, "maps", f"{head_map}.json")
    if snapkv is not None:
        # SnapKV keeping snapkv % of each prompt, its other settings at their defaults
        kv["eviction"] = {"method": "snapkv", "budget_ratio": snapkv / 100}
    if scored is not None:
        # (method, tokens): h2o / a2sf keeping that many tokens a KV head (their
        # recent share and a2sf's alpha at the defaults), streamingllm that many recent
        method, tokens = scored
        key = "recent_tokens" if method == "streamingllm" else "budget_tokens"
        kv["eviction"] = {"method": method, key: tokens}
    return {"kvcomp": kv, "bits": (k + v) / 2}


def all_settings() -> dict:
    """name -> {kv_cache_dtype?, kvcomp?, bits, gpu_only?}. ``bits`` is the
    nominal code width of K and V (scales and zero points not counted)."""
    s = {
        "baseline": {"bits": 16},
        "fp8": {"kv_cache_dtype": "fp8", "bits": 8},
        "int4_per_token_head": {"kv_cache_dtype": "int4_per_token_head", "bits": 4,
                                "gpu_only": True},
        "turboquant_k3v4_nc": {"kv_cache_dtype": "turboquant_k3v4_nc", "bits": 3.5,
                               "gpu_only": True},
        "turboquant_4bit_nc": {"kv_cache_dtype": "turboquant_4bit_nc", "bits": 4,
                               "gpu_only": True},
    }
    for b in (8, 4, 2):
        for r in (128, 0):
            for axis in ("channel", "token"):
                s[f"kvcomp_k{b}v{b}_r{r}_{axis}"] = _kvcomp(b, b, r, axis)
                # smaller quantization groups (default 128): KIVI's 2-bit
                # default is 32 (keys: 32 tokens per channel; values: 32
                # channels per token), at the cost of more scales per token
                for g in (32, 64):
                    s[f"kvcomp_k{b}v{b}_r{r}_{axis}_g{g}"] = _kvcomp(b, b, r, axis, g)
    return s


QUICK_SETTINGS = ("baseline", "kvcomp_k4v4_r128_channel")
ALIASES = {"kvcomp_k4v4": "kvcomp_k4v4_r128_channel", "kvcomp_k8v8": "kvcomp_k8v8_r128_channel",
           "kvcomp_k2v2": "kvcomp_k2v2_r128_channel", "bf16": "baseline",
           # KIVI-2's defaults: group 32, residual 128, per-channel keys
           "kvcomp_k2v2_kivi": "kvcomp_k2v2_r128_channel_g32"}


KVCOMP_NAME_RE = re.compile(
    r"kvcomp_k(\d+)v(\d+)_r(\d+)_(channel|token)(?:_g(\d+))?(?:_vg(\d+))?(?:_quest(\d+))?"
    r"(?:_snapkv(\d+))?(?:_(h2o|a2sf|streamingllm)(\d+))?(?:_map([a-z0-9-]+))?"
    r"(_ring)?(_fp8window)?")


def settings_for(names) -> dict:
    """The catalogue plus any other kvcomp combination named in the same
    grammar, e.g. ``kvcomp_k2v4_r128_channel_g32`` (bits are checked by the
    backend at engine start, like a user's)."""
    cat = all_settings()
    for n in names:
        m = KVCOMP_NAME_RE.fullmatch(n)
        if n not in cat and m:
            k, v, r, axis, g, vg, quest, snap, method, tokens, head_map, ring, fp8 = m.groups()
            cat[n] = _kvcomp(int(k), int(v), int(r), axis, int(g) if g else None,
                             int(vg) if vg else None, int(quest) if quest else None,
                             int(snap) if snap else None, head_map,
                             (method, int(tokens)) if method else None, bool(fp8), bool(ring))
    return cat


def select_settings(names: str | None, quick: bool) -> list:
    known = all_settings()
    if not names:
        return list(QUICK_SETTINGS) if quick else list(known)
    out = []
    for n in names.split(","):
        n = ALIASES.get(n.strip(), n.strip())
        if n not in known and not KVCOMP_NAME_RE.fullmatch(n):
            raise SystemExit(f"unknown setting {n!r}; known: {', '.join(known)}, or "
                             "kvcomp_k<bits>v<bits>_r<residual>_<channel|token>[_g<group>][_vg<value group>]"
                             "[_quest<budget tokens>][_snapkv<budget %>][_<h2o|a2sf|streamingllm><tokens>]"
                             "[_map<quality/maps/NAME.json>][_ring][_fp8window]")
        out.append(n)
    if "baseline" not in out:
        out.insert(0, "baseline")  # agreement is measured against it
    return out


# ---------------------------------------------------------------- plan
def plan(quick: bool, device: str) -> dict:
    """What to measure. ``quick`` is sized for 2 CPU cores."""
    if quick:
        return dict(ppl_lengths=[1024], ppl_tokens=2048, passkey_contexts=[1024],
                    passkey_depths=[0.0, 0.5, 1.0], passkey_trials=1, gen_prompts=2,
                    gen_context=768, gen_tokens=16)
    if device == "cpu":
        return dict(ppl_lengths=[1024, 2048], ppl_tokens=4096, passkey_contexts=[1024, 2048],
                    passkey_depths=[0.0, 0.5, 1.0], passkey_trials=2, gen_prompts=2,
                    gen_context=1024, gen_tokens=32)
    return dict(ppl_lengths=[512, 1024, 2048, 4096], ppl_tokens=32768,
                passkey_contexts=[1024, 2048, 3072, 4096],
                passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], passkey_trials=6, gen_prompts=8,
                gen_context=2048, gen_tokens=64)


def load_heldout_text(path: str) -> list:
    """Documents of a .jsonl[.gz] file ({"text": ...} per line) or one plain text."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        from quality.prepare_corpus import read_jsonl

        return [d["text"] for d in read_jsonl(path)]
    with open(path) as f:
        return [f.read()]


def build_tasks(tok, texts: list, p: dict, seed: int = 1234) -> dict:
    """Token prompts for every measurement (the same for every setting)."""
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = tok.bos_token_id
    stream = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if tok.eos_token_id is not None:
            stream.append(tok.eos_token_id)
    ppl = {}
    for L in p["ppl_lengths"]:
        ppl[str(L)] = tasks.text_windows(stream, L, max(1, p["ppl_tokens"] // L), bos_id=bos)
    # continuations: windows from the second half of the stream, shifted so
    # that they are not the perplexity windows
    half = stream[len(stream) // 2 + 97:]
    gen = tasks.text_windows(half, p["gen_context"], p["gen_prompts"], bos_id=bos)
    hay = tasks.Haystack(stream, tasks.sentence_end_ids(tok.get_vocab()))
    passkey = []
    for c in p["passkey_contexts"]:
        for d in p["passkey_depths"]:
            for t in range(p["passkey_trials"]):
                rng = random.Random(f"{seed}-{c}-{d}-{t}")
                pk = tasks.build_passkey(encode, hay, c, d, tasks.random_key(rng), rng, bos_id=bos)
                passkey.append({"ids": pk.ids, "key": pk.key, "context": c, "depth": d,
                                "answer_len": len(pk.answer_ids)})
    return {"plan": p, "ppl": ppl, "gen": gen, "passkey": passkey,
            "stream_tokens": len(stream)}


# ---------------------------------------------------------------- worker
def worker(spec_path: str) -> None:
    """One engine, every measurement; writes spec['result']."""
    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["tasks"]) as f:
        work = json.load(f)
    from vllm import LLM, SamplingParams

    kw = dict(spec["engine"])
    t0 = time.time()
    llm = LLM(spec["model"], **kw)
    t_start = time.time() - t0
    res = {"engine_start_s": round(t_start, 1)}

    def lp_of(o):
        return [None if d is None else round(d[t].logprob, 5)
                for d, t in zip(o.prompt_logprobs, o.prompt_token_ids)]

    t0 = time.time()
    ppl_params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    res["ppl"] = {}
    for L, windows in work["ppl"].items():
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], ppl_params,
                            use_tqdm=False)
        res["ppl"][L] = [lp_of(o) for o in outs]
    res["ppl_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    pk = work["passkey"]
    n_ans = max((p["answer_len"] for p in pk), default=6) + 2
    outs = llm.generate([{"prompt_token_ids": p["ids"]} for p in pk],
                        SamplingParams(max_tokens=n_ans, temperature=0), use_tqdm=False)
    res["passkey"] = [o.outputs[0].text for o in outs]
    res["passkey_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    outs = llm.generate([{"prompt_token_ids": g} for g in work["gen"]],
                        SamplingParams(max_tokens=work["plan"]["gen_tokens"], temperature=0,
                                       ignore_eos=True), use_tqdm=False)
    res["gen"] = [list(o.outputs[0].token_ids) for o in outs]
    res["gen_s"] = round(time.time() - t0, 1)
    with open(spec["result"], "w") as f:
        json.dump(res, f)
    print("WORKER DONE", flush=True)


def engine_kwargs(setting: dict, args, max_len: int) -> dict:
    kw = dict(max_model_len=max_len, enforce_eager=True, seed=0, dtype=args.dtype,
              enable_prefix_caching=False, enable_chunked_prefill=True,
              max_num_batched_tokens=args.prefill_chunk,
              max_num_seqs=min(64, args.prefill_chunk))
    if args.device == "gpu":
        # A fixed KV budget: every setting gets the same bytes (the logged
        # capacity then compares formats), and no start-up memory profiling,
        # which engines starting side by side (--jobs) would disturb.
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
        kw["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
    if "kv_cache_dtype" in setting:
        kw["kv_cache_dtype"] = setting["kv_cache_dtype"]
    if "kvcomp" in setting:
        kw["attention_backend"] = "kvcomp"
        kv = dict(setting["kvcomp"])
        if getattr(args, "prompt_attention", None):
            kv["prompt_attention"] = args.prompt_attention
        kw["additional_config"] = {"kvcomp": kv}
    return kw


def failure_reason(text: str) -> str:
    """The line of a failed run's log that says why. vLLM's engine ends with
    a generic "Engine core initialization failed. See root cause above": the
    worker's own error ("Worker failed with error '...'") is preferred."""
    lines = [l for l in text.splitlines() if l.strip()]
    root = [l for l in lines if "failed with error" in l]
    err = [l for l in lines if re.search(r"Error|error:|Exception|not supported", l)]
    line = (root or err or lines or ["no output"])[-1]
    return line.strip()[-400:]


def kv_tokens_logged(log: str) -> int | None:
    """The KV capacity vLLM logged at start-up ("KV cache size: N tokens")."""
    if not os.path.exists(log):
        return None
    with open(log) as f:
        m = KV_SIZE_RE.search(f.read())
    return int(m.group(1).replace(",", "")) if m else None


def run_setting(name: str, setting: dict, args, max_len: int, tasks_path: str) -> dict:
    raw = os.path.join(args.out, "raw", f"{name}.json")
    log = os.path.join(args.out, "logs", f"{name}.log")
    if args.resume and os.path.exists(raw):
        with open(raw) as f:
            return {"status": "ok", "raw": json.load(f), "resumed": True,
                    "kv_cache_tokens": kv_tokens_logged(log)}
    if setting.get("gpu_only") and args.device == "cpu" and not args.try_all:
        return {"status": "skipped",
                "reason": f"needs CUDA: {setting['kv_cache_dtype']} is implemented by "
                          "Triton kernels; on vLLM 0.26's CPU platform int4_per_token_head "
                          "fails at KV cache allocation and turboquant_* are silently "
                          "ignored (--try-all shows both)"}
    spec = {"model": args.model, "tasks": tasks_path, "result": raw,
            "engine": engine_kwargs(setting, args, max_len)}
    spec_path = os.path.join(args.out, "logs", f"{name}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", "quality.evaluate", "--worker", spec_path],
                                stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=os.path.dirname(HERE), timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = round(time.time() - t0, 1)
    with open(log) as f:
        text = f.read()
    kv_tokens = kv_tokens_logged(log)
    if rc != 0 or not os.path.exists(raw):
        return {"status": "failed", "returncode": rc, "wall_s": wall,
                "reason": failure_reason(text), "log": os.path.relpath(log, args.out)}
    with open(raw) as f:
        return {"status": "ok", "raw": json.load(f), "wall_s": wall, "kv_cache_tokens": kv_tokens}


# ---------------------------------------------------------------- metrics
def silently_unapplied(setting: dict, run: dict, base: dict | None) -> str | None:
    """Why a compressed setting's engine ran, in fact, at full precision, or
    None. vLLM 0.26's CPU platform accepts ``kv_cache_dtype=turboquant_*``
    and then stores the KV cache in the model dtype without a word (seen
    2026-11-23): same logged capacity as the baseline, logprobs identical to
    it. Such a row must not be reported as a result of that format."""
    if base is None or setting.get("bits", 16) >= 16 or "metrics" not in run:
        return None
    same_capacity = run.get("kv_cache_tokens") is not None and \
        run.get("kv_cache_tokens") == base.get("kv_cache_tokens")
    gaps = [e.get("mean_abs_dlogprob") for e in run["metrics"]["ppl"].values()]
    identical = bool(gaps) and all(g == 0.0 for g in gaps)
    if same_capacity and identical:
        return ("the engine ran but did not apply this KV format: logged KV capacity equals "
                "the baseline's and every prompt logprob is identical to it (vLLM on this "
                "platform ignores the setting silently)")
    return None


def turboquant_boundary_covers_model(setting: dict, model_dir: str) -> str | None:
    """Why a TurboQuant row quantized no layer at all, or None. vLLM 0.26 keeps
    the first and last ``min(2, L // 2)`` attention layers of a dense model in
    the model dtype for TurboQuant ("boundary protection",
    ``TurboQuantConfig.get_boundary_skip_layers``, applied in
    ``EngineArgs.create_engine_config`` with no way to turn it off), so on a
    model of 4 layers or fewer every layer stays unquantized (seen on the H200
    2026-11-30: capacity of the baseline, logprobs within bf16 noise)."""
    if not str(setting.get("kv_cache_dtype", "")).startswith("turboquant_"):
        return None
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            layers = int(json.load(f)["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return None
    if layers > 4:
        return None
    return (f"vLLM's TurboQuant keeps the first and last {min(2, layers // 2)} layers in the "
            f"model dtype (boundary protection, not configurable), i.e. all {layers} layers of "
            "this model: nothing was quantized")


def summarize(name: str, run: dict, work: dict, base: dict | None) -> dict:
    raw = run["raw"]
    out = {"engine_start_s": raw.get("engine_start_s"), "kv_cache_tokens": run.get("kv_cache_tokens"),
           "wall_s": run.get("wall_s"),
           "phase_s": {k: raw.get(k + "_s") for k in ("ppl", "passkey", "gen")}}
    ppl = {}
    for L, lps in raw["ppl"].items():
        n = int(L)
        entry = {"ppl": tasks.perplexity(lps, 1), "ppl_last_quarter": tasks.perplexity(lps, 3 * n // 4),
                 "windows": len(lps)}
        if base is not None and L in base["raw"]["ppl"]:
            gaps = [abs(a - b) for ra, rb in zip(lps, base["raw"]["ppl"][L])
                    for a, b in zip(ra, rb) if a is not None and b is not None]
            entry["mean_abs_dlogprob"] = sum(gaps) / max(1, len(gaps))
        ppl[L] = entry
    out["ppl"] = ppl
    longest = max(raw["ppl"], key=int)
    out["nll_by_position"] = nll_by_position(raw["ppl"][longest])
    out["nll_by_position_length"] = int(longest)
    grid, hits = {}, 0
    for p, text in zip(work["passkey"], raw["passkey"]):
        ok = tasks.passkey_correct(text, p["key"])
        hits += ok
        key = f"{p['context']}|{p['depth']}"
        g = grid.setdefault(key, [0, 0])
        g[0] += ok
        g[1] += 1
    out["passkey_grid"] = {k: v[0] / v[1] for k, v in grid.items()}
    out["passkey_accuracy"] = hits / max(1, len(work["passkey"]))
    if base is not None:
        rates, divs = [], []
        for a, b in zip(raw["gen"], base["raw"]["gen"]):
            rates.append(tasks.match_rate(a, b))
            d = tasks.first_divergence(a, b)
            divs.append(len(b) if d is None else d)
        out["gen_match_rate"] = sum(rates) / max(1, len(rates))
        out["gen_first_divergence_mean"] = sum(divs) / max(1, len(divs))
        out["gen_first_divergence"] = divs
        out["gen_identical"] = sum(1 for d, b in zip(divs, base["raw"]["gen"]) if d == len(b))
    return out


def nll_by_position(lps: list, bucket: int = 256) -> list:
    """Mean NLL per bucket of positions (from position 1)."""
    sums, counts = {}, {}
    for seq in lps:
        for i, lp in enumerate(seq):
            if lp is None:
                continue
            b = i // bucket
            sums[b] = sums.get(b, 0.0) - lp
            counts[b] = counts.get(b, 0) + 1
    return [round(sums[b] / counts[b], 4) for b in sorted(sums)]


# ---------------------------------------------------------------- report
def write_markdown(path: str, report: dict) -> None:
    m = report["meta"]
    lines = [f"# KV-cache quality: {os.path.basename(m['model'].rstrip('/'))}", "",
             f"- model: `{m['model']}` ({m.get('model_info', '')})",
             f"- device: {m['device_name']}; dtype {m['dtype']}; vLLM {m['vllm']}; "
             f"prefill chunk {m['prefill_chunk']} tokens",
             f"- date: {m['date']}; commit {m.get('git_commit')}",
             f"- command: `{m['command']}`",
             f"- held-out text: {m['heldout']} ({report['tasks_summary']['stream_tokens']} tokens)",
             ""]
    lengths = report["plan"]["ppl_lengths"]
    head = ["setting", "bits"] + [f"ppl@{L}" for L in lengths] + \
           [f"ppl@{lengths[-1]} last ¼", "Δppl %", "mean abs Δlogp", "passkey",
            "gen match", "1st div", "KV tokens", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["results"].get("baseline", {}).get("metrics")
    for name, r in report["results"].items():
        s = report["settings"][name]
        if r["status"] != "ok":
            row = [name, f"{s['bits']:g}"] + [""] * (len(head) - 3) + \
                  [f"{r['status']}: {r.get('reason', '')}".replace("|", "/")]
            lines.append("| " + " | ".join(row) + " |")
            continue
        mt = r["metrics"]
        Lmax = str(lengths[-1])
        dppl = ""
        if base and name != "baseline":
            dppl = f"{100 * (mt['ppl'][Lmax]['ppl'] / base['ppl'][Lmax]['ppl'] - 1):+.2f}"
        row = [name, f"{s['bits']:g}"] + [f"{mt['ppl'][str(L)]['ppl']:.3f}" for L in lengths] + [
            f"{mt['ppl'][Lmax]['ppl_last_quarter']:.3f}", dppl,
            f"{mt['ppl'][Lmax].get('mean_abs_dlogprob', 0):.4f}" if name != "baseline" else "",
            f"{mt['passkey_accuracy']:.2f}",
            f"{mt['gen_match_rate']:.3f}" if "gen_match_rate" in mt else "",
            f"{mt['gen_first_divergence_mean']:.1f}" if "gen_first_divergence_mean" in mt else "",
            str(mt.get("kv_cache_tokens") or ""), "ok"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Passkey accuracy by context (rows) and needle depth (columns):", ""]
    depths = report["plan"]["passkey_depths"]
    for name, r in report["results"].items():
        if r["status"] != "ok":
            continue
        g = r["metrics"]["passkey_grid"]
        lines += [f"**{name}**", "", "| context | " + " | ".join(f"{d:g}" for d in depths) + " |",
                  "|---|" + "---|" * len(depths)]
        for c in report["plan"]["passkey_contexts"]:
            lines.append(f"| {c} | " + " | ".join(f"{g.get(f'{c}|{d}', float('nan')):.2f}"
                                                   for d in depths) + " |")
        lines.append("")
    lines += ["Columns: bits = nominal code width of K and V (scales not counted); ppl@L = "
              "perplexity of held-out windows of L tokens; last ¼ = positions 3L/4..L only; "
              "Δppl % and mean abs Δlogp (per token, nats) vs baseline at the longest length; passkey = exact-match "
              "accuracy over the grid below; gen match = share of greedy continuation tokens "
              "equal to the baseline's at the same position; 1st div = mean first-divergence "
              "position (= continuation length when identical); KV tokens = capacity vLLM logged."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(out: str, report: dict) -> list:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in report["results"].items() if r["status"] == "ok"}
    if not ok:
        return []
    files = []
    ctxs, depths = report["plan"]["passkey_contexts"], report["plan"]["passkey_depths"]
    cols = min(4, len(ok))
    rows = math.ceil(len(ok) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, r) in zip(axes.flat, ok.items()):
        g = r["metrics"]["passkey_grid"]
        data = [[g.get(f"{c}|{d}", float("nan")) for d in depths] for c in ctxs]
        ax.axis("on")
        ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(ctxs)), [str(c) for c in ctxs], fontsize=7)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"{name} ({r['metrics']['passkey_accuracy']:.2f})", fontsize=7)
        ax.set_xlabel("needle depth", fontsize=7)
        ax.set_ylabel("context", fontsize=7)
    fig.suptitle(f"passkey accuracy -- {os.path.basename(report['meta']['model'].rstrip('/'))}, "
                 f"{report['meta']['device_name']}", fontsize=9)
    fig.tight_layout()
    files.append(os.path.join(out, "passkey.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    Lmax = str(report["plan"]["ppl_lengths"][-1])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in ok.items():
        b = report["settings"][name]["bits"]
        y = r["metrics"]["ppl"][Lmax]["ppl"]
        marker = "s" if name.startswith("kvcomp") else ("*" if name == "baseline" else "o")
        ax.scatter([b], [y], marker=marker)
        ax.annotate(name.replace("kvcomp_", "kc_"), (b, y), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    if "baseline" in ok:
        ax.axhline(ok["baseline"]["metrics"]["ppl"][Lmax]["ppl"], ls="--", lw=0.8, c="gray")
    ax.set_xlabel("nominal bits per K/V element")
    ax.set_ylabel(f"held-out perplexity @ {Lmax} tokens")
    ax.set_title("perplexity vs KV bits", fontsize=9)
    fig.tight_layout()
    files.append(os.path.join(out, "ppl_vs_bits.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = ok.get("baseline")
    for name, r in ok.items():
        nll = r["metrics"]["nll_by_position"]
        if base is not None:
            bn = base["metrics"]["nll_by_position"]
            nll = [a - b for a, b in zip(nll, bn)]
        ax.plot([256 * i + 128 for i in range(len(nll))], nll, label=name, lw=1)
    ax.set_xlabel("position (256-token buckets)")
    ax.set_ylabel("NLL - baseline NLL (nats)" if base is not None else "NLL (nats)")
    ax.set_title(f"per-position loss gap, {Lmax}-token windows", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    files.append(os.path.join(out, "nll_by_position.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def device_name(device: str) -> str:
    if device == "gpu":
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            return "gpu (unknown)"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def rerender(out: str, model_dir: str | None) -> dict:
    """Rewrite ``out``'s results.md and plots from its results.json after
    re-applying the checks that need no raw logprobs (the recorded rows keep
    their metrics; a row found not applied says why instead)."""
    with open(os.path.join(out, "results.json")) as f:
        report = json.load(f)
    model_dir = model_dir or report["meta"]["model"]
    for name, r in report["results"].items():
        why = turboquant_boundary_covers_model(report["settings"].get(name, {}), model_dir)
        if r["status"] == "ok" and why:
            r["status"], r["reason"] = "not applied", why
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(os.path.join(out, "results.md"), report)
    write_plots(out, report)
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="KV-cache quality harness (see module doc)")
    ap.add_argument("--model", required=False)
    ap.add_argument("--out", required=False)
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--quick", action="store_true", help="baseline vs kvcomp k4v4, short text")
    ap.add_argument("--settings", help="comma-separated setting names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    ap.add_argument("--heldout", default=DEFAULT_HELDOUT, help="jsonl[.gz] ({'text'}) or plain text")
    ap.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on GPU, "
                                                  "float32 on CPU)")
    ap.add_argument("--prefill-chunk", type=int, default=16,
                    help="tokens a prefill step (16: decode's split, see the docstring)")
    ap.add_argument("--prompt-attention", default=None,
                    choices=["auto", "as_stored", "full_precision"],
                    help="kvcomp prompt_attention for every kvcomp setting (default: the "
                         "setting's own, i.e. the backend's default)")
    ap.add_argument("--jobs", type=int, default=None, help="engines at once (GPU default 3)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--kv-cache-gib", type=float, default=4.0,
                    help="GPU: KV cache bytes per engine (CPU: VLLM_CPU_KVCACHE_SPACE, default 1)")
    ap.add_argument("--resume", action="store_true", help="reuse raw/<setting>.json present")
    ap.add_argument("--try-all", action="store_true", help="also try GPU-only settings on CPU")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per setting")
    ap.add_argument("--plan", help="JSON overriding plan entries, e.g. '{\"ppl_lengths\": [768]}'")
    ap.add_argument("--rerender", metavar="DIR",
                    help="re-apply the status checks to DIR/results.json (e.g. one recorded on "
                         "a GPU) with --model's config, and rewrite its results.md and plots")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    if args.rerender:
        return rerender(args.rerender, args.model)
    if args.list:
        for n, s in all_settings().items():
            print(n, json.dumps(s))
        return {}
    if not args.model or not args.out:
        ap.error("--model and --out are required")
    if args.device is None:
        try:
            import torch

            args.device = "gpu" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    args.jobs = args.jobs or (3 if args.device == "gpu" else 1)
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = round(min(0.85 / args.jobs, 0.5), 2)
    args.model = os.path.abspath(args.model)
    args.out = os.path.abspath(args.out)
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    p = plan(args.quick, args.device)
    if args.plan:
        p.update(json.loads(args.plan))
    work = build_tasks(tok, load_heldout_text(args.heldout), p)
    tasks_path = os.path.join(args.out, "raw", "tasks.json")
    with open(tasks_path, "w") as f:
        json.dump(work, f)
    max_len = max(p["ppl_lengths"] + p["passkey_contexts"] + [p["gen_context"]]) + \
        max(p["gen_tokens"], 16) + 16
    names = select_settings(args.settings, args.quick)
    catalog = settings_for(names)
    catalog["baseline"]["bits"] = 32 if args.dtype == "float32" else 16  # KV in model dtype
    print(f"{len(names)} settings on {args.device}, {args.jobs} at a time: {', '.join(names)}",
          flush=True)

    results = {}

    def one(name):
        t0 = time.time()
        r = run_setting(name, catalog[name], args, max_len, tasks_path)
        print(f"  {name}: {r['status']} ({time.time() - t0:.0f}s) {r.get('reason', '')}",
              flush=True)
        return name, r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, r in pool.map(one, names):
            results[name] = r
    base = results.get("baseline") if results.get("baseline", {}).get("status") == "ok" else None
    for name, r in results.items():
        if r["status"] == "ok":
            r["metrics"] = summarize(name, r, work, base if name != "baseline" else None)
            why = (silently_unapplied(catalog[name], r, base)
                   or turboquant_boundary_covers_model(catalog[name], args.model))
            if why:
                r["status"], r["reason"] = "not applied", why
    for r in results.values():
        r.pop("raw", None)

    model_info = ""
    log_path = os.path.join(args.model, "train_log.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            tl = json.load(f)
        model_info = (f"trained: {tl.get('parameters', 0) / 1e6:.1f} M params, "
                      f"{tl.get('steps_done')} steps, held-out ppl {tl.get('heldout_ppl', 0):.2f}, "
                      f"passkey {tl.get('passkey_accuracy', 0):.2f} in training eval")
    import vllm

    report = {
        "meta": {"model": args.model, "model_info": model_info, "device": args.device,
                 "device_name": device_name(args.device), "dtype": args.dtype,
                 "vllm": vllm.__version__, "prefill_chunk": args.prefill_chunk,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join([os.path.basename(sys.executable), "-m", "quality.evaluate"]
                                     + (argv if argv is not None else sys.argv[1:])),
                 "git_commit": git_commit(), "heldout": args.heldout, "quick": args.quick},
        "plan": p, "tasks_summary": {"stream_tokens": work["stream_tokens"],
                                     "ppl_windows": {L: len(w) for L, w in work["ppl"].items()},
                                     "passkey_prompts": len(work["passkey"]),
                                     "gen_prompts": len(work["gen"])},
        "settings": {n: catalog[n] for n in names},
        "results": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(os.path.join(args.out, "results.md"), report)
    plots = write_plots(args.out, report)
    print(f"wrote {args.out}/results.json, results.md" +
          (", " + ", ".join(os.path.basename(x) for x in plots) if plots else
           " (no plots: matplotlib missing)"), flush=True)
    return report


if __name__ == "__main__":
    main()
