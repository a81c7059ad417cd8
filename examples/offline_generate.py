"""Offline generation with kvcomp, and the KV capacity gain vLLM reports.

Starts three engines on the same generated tiny Llama and the same memory
budget (VLLM_CPU_KVCACHE_SPACE, 1 GiB): upstream bf16 (CPU_ATTN), kvcomp
k4v4 and kvcomp k2v2, each in its own process (engines do not free cleanly
inside one), and prints the "GPU KV cache size" each one logs next to a
greedy continuation of a ~1,500-token prompt (long enough that most of its
KV is stored packed). About one minute per engine on 2 CPU cores.

    python examples/offline_generate.py            # the comparison
    python examples/offline_generate.py k4v4       # one engine only
"""
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
MODEL_DIR = "/tmp/kvcomp-tiny-llama"
MAX_MODEL_LEN = 4096  # a length people serve, where the full-precision window costs most
SETTINGS = {
    "bf16": dict(attention_backend=None),
    "k4v4": dict(attention_backend="kvcomp", additional_config={"kvcomp": {"k_bits": 4, "v_bits": 4}}),
    "k2v2": dict(attention_backend="kvcomp", additional_config={"kvcomp": {"k_bits": 2, "v_bits": 2}}),
}
KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def run_one(name):
    from vllm import LLM, SamplingParams

    from vllm_kvcomp.tiny_model import make_tiny_llama

    llm = LLM(make_tiny_llama(MODEL_DIR), max_model_len=MAX_MODEL_LEN, enforce_eager=True,
              seed=0, **{k: v for k, v in SETTINGS[name].items() if v is not None})
    story = ("The quick brown fox jumps over the lazy dog while the keys are quantized "
             "per channel and the values per token. ")
    prompts = [story * 70 + "In the end, the fox", "Compressed caches let a server"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    print("RESULT " + json.dumps({
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs]}), flush=True)


def main():
    names = [a for a in sys.argv[1:] if a in SETTINGS] or list(SETTINGS)
    rows = {}
    for name in names:
        print(f"[{name}] starting engine ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--engine", name],
                              capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not result:
            print(log[-3000:])
            sys.exit(f"[{name}] engine failed")
        m = KV_TOKENS.search(log)
        rows[name] = (int(m.group(1).replace(",", "")), json.loads(result[-1][7:]))
        for n, text in zip(rows[name][1]["prompt_tokens"], rows[name][1]["texts"]):
            print(f"[{name}] prompt of {n} tokens -> {text!r}")
    base = rows.get("bf16", (None,))[0]
    print(f"\nKV cache capacity logged by vLLM (same model, {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, "
          f"max_model_len {MAX_MODEL_LEN}):")
    for name, (tokens, _) in rows.items():
        ratio = f"{tokens / base:.2f}x bf16" if base else ""
        print(f"  {name:5s} {tokens:>11,} tokens  {ratio}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--engine":
        run_one(sys.argv[2])
    else:
        main()
