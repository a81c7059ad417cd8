"""Run one vLLM engine in a fresh process and print its results as JSON.

Engines do not free cleanly inside one process, so every comparison in the
end-to-end tests starts its own. argv[1] is a JSON spec:

    {"model": dir, "backend": "kvcomp" | "CPU_ATTN" | ..., "kvcomp": {...},
     "engine": {extra LLM kwargs}, "prompts": [str | {"prompt_token_ids": [...]}],
     "max_tokens": int, "logprobs": bool, "prompt_logprobs": bool, "rounds": int,
     "batches": [[prompt index, ...], ...]}

The last stdout line starting with ``RESULT `` holds token ids, logprobs of
the chosen tokens, prompt logprobs, and the engine's preemption and
prefix-cache counters.
"""
import json
from pathlib import Path
import os
import sys

from engine_forkserver import ENGINE_IMPORT_DEFAULTS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The engine core and its worker run in this process rather than in two more
# that each import torch and vLLM again (most of a test engine's start-up on
# two cores). Scheduling, the KV cache managers and attention are the same
# code either way; the soak (`vllm serve`) and quality tests run vLLM's
# default process layout.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# one compute thread, no torch.compile (engine_forkserver.py says why)
for _name, _value in ENGINE_IMPORT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def _counter(metrics, name):
    return sum(getattr(m, "value", 0) for m in metrics if m.name == name)


def _chosen_logprob(step_logprobs, token_id):
    return None if step_logprobs is None else step_logprobs[token_id].logprob


def main(spec):
    from vllm import LLM, SamplingParams

    kwargs = dict(max_model_len=4096, enforce_eager=True, seed=0, dtype="float32",
                  disable_log_stats=False)
    kwargs.update(spec.get("engine", {}))
    if spec.get("kvcomp") is not None:
        kwargs["additional_config"] = {"kvcomp": spec["kvcomp"]}
    llm = LLM(spec["model"], attention_backend=spec["backend"], **kwargs)
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 16), temperature=0, ignore_eos=True,
        logprobs=int(spec["logprobs"]) if spec.get("logprobs") else None,
        prompt_logprobs=0 if spec.get("prompt_logprobs") else None,
    )
    # "rounds": the same prompts again, one generate call after the other (a
    # later round can hit the prefix cache that an earlier one filled).
    # "batches" instead: one generate call per list of prompt indices, in
    # order, so that one engine can serve the same prompts together (where a
    # small pool preempts) and one at a time (where it cannot).
    prompts = spec["prompts"]
    batches = spec.get("batches") or [list(range(len(prompts)))] * spec.get("rounds", 1)
    outs = [o for b in batches for o in llm.generate([prompts[i] for i in b], params)]
    result = {"tokens": [], "logprobs": [], "prompt_logprobs": [], "top2_margin": []}
    for o in outs:
        c = o.outputs[0]
        result["tokens"].append(list(c.token_ids))
        if c.logprobs is not None:
            result["logprobs"].append(
                [_chosen_logprob(lp, t) for lp, t in zip(c.logprobs, c.token_ids)])
            if int(spec["logprobs"]) >= 2:
                # Gap between the two most likely tokens at each step: how
                # near a tie a greedy choice was.
                result["top2_margin"].append([
                    (lambda v: v[0] - v[1] if len(v) > 1 else None)(
                        sorted((x.logprob for x in lp.values()), reverse=True))
                    for lp in c.logprobs])
        if o.prompt_logprobs is not None:
            result["prompt_logprobs"].append(
                [_chosen_logprob(lp, t) for lp, t in zip(o.prompt_logprobs, o.prompt_token_ids)])
    metrics = llm.get_metrics()
    result["preemptions"] = _counter(metrics, "vllm:num_preemptions")
    result["prefix_cache_hits"] = _counter(metrics, "vllm:prefix_cache_hits")
    result["kv_cache_usage"] = _counter(metrics, "vllm:kv_cache_usage_perc")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    arg = sys.argv[1]
    # a long spec (thousands of prompt tokens) comes as @file: argv has a size limit
    main(json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg))
