"""kvcomp end to end against vLLM's own GPU backend, on a model with trained
weights (GPU, CUDA graphs on).

    python benchmarks/gpu_check_16bit.py --model quality/model --out check.json

Runs FLASH_ATTN (bf16 cache) and kvcomp at k16v16 / k8v8 / k4v4 on held-out
text: teacher-forced prompt logprobs (chunked prefill, 512-token chunks, so
later chunks read earlier chunks' pages) and greedy continuations (decode
through the captured CUDA graphs). Reports, per setting against FLASH_ATTN,
the prompt-logprob gaps (mean / p99 / max), the greedy token match rate and
each request's first divergence, with the baseline's top-2 margin there (a
flip on a margin of ~1e-2 is bf16 rounding, not a bug).
"""
import argparse
import gzip
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from e2e_util import run_engine  # noqa: E402

SETTINGS = {"FLASH_ATTN": None, "k16v16": {"k_bits": 16, "v_bits": 16},
            "k8v8": {"k_bits": 8, "v_bits": 8}, "k4v4": {"k_bits": 4, "v_bits": 4}}


def prompts(model, n, length):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    with gzip.open(ROOT / "quality" / "data" / "heldout.jsonl.gz", "rt") as f:
        docs = [json.loads(l)["text"] for l in f]
    bos = tok.token_to_id("<s>")
    bos = 0 if bos is None else bos
    out = []
    for d in docs:
        ids = tok.encode(d).ids
        if len(ids) >= length:
            out.append({"prompt_token_ids": [bos] + ids[: length - 1]})
        if len(out) == n:
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--settings", default=",".join(k for k in SETTINGS if k != "FLASH_ATTN"),
                    help="kvcomp settings to compare with FLASH_ATTN")
    args = ap.parse_args()
    wanted = ["FLASH_ATTN"] + [s for s in args.settings.split(",") if s]
    unknown = [s for s in wanted if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    ps = prompts(args.model, args.requests, args.prompt_len)
    engine = dict(dtype="bfloat16", enforce_eager=False, max_model_len=4096,
                  enable_chunked_prefill=True, max_num_batched_tokens=512,
                  gpu_memory_utilization=0.5)
    runs = {}
    for name in wanted:
        kv = SETTINGS[name]
        backend = "FLASH_ATTN" if kv is None else "kvcomp"
        runs[name] = run_engine(dict(model=args.model, backend=backend, kvcomp=kv, engine=engine,
                                     prompts=ps, max_tokens=args.max_tokens, logprobs=2,
                                     prompt_logprobs=True))
    base = runs["FLASH_ATTN"]
    report = {}
    for name, r in runs.items():
        gaps = sorted(abs(a - b) for ra, rb in zip(r["prompt_logprobs"], base["prompt_logprobs"])
                      for a, b in zip(ra, rb) if a is not None and b is not None)
        match = sum(x == y for ta, tb in zip(r["tokens"], base["tokens"]) for x, y in zip(ta, tb))
        total = sum(len(t) for t in base["tokens"])
        first_div = []
        for ta, tb in zip(r["tokens"], base["tokens"]):
            d = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
            first_div.append(d)
        margins = [base["top2_margin"][i][d] for i, d in enumerate(first_div) if d is not None]
        decode_gaps = sorted(abs(p - q) for ta, tb, la, lb in zip(r["tokens"], base["tokens"],
                                                                  r["logprobs"], base["logprobs"])
                             for x, y, p, q in zip(ta, tb, la, lb) if x == y)
        report[name] = dict(
            kv_cache_tokens=r["kv_cache_tokens"], completed=[len(t) for t in r["tokens"]],
            prompt_lp_gap_mean=sum(gaps) / len(gaps), prompt_lp_gap_p99=gaps[int(0.99 * len(gaps))],
            prompt_lp_gap_max=gaps[-1], prompt_positions=len(gaps),
            greedy_match_rate=match / total, first_divergence=first_div,
            baseline_top2_margin_at_divergence=margins,
            decode_lp_gap_max=decode_gaps[-1] if decode_gaps else None,
            baseline_mean_chosen_logprob=sum(x for lp in base["logprobs"] for x in lp) / total)
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).write_text(json.dumps(dict(model=args.model, engine=engine, report=report,
                                              runs=runs), indent=1))


if __name__ == "__main__":
    main()
