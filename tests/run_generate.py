"""Run greedy generation in a fresh process and print token ids as JSON."""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, backend, kv, dtype = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    llm = LLM(model, attention_backend=backend, additional_config={"kvcomp": kv},
              max_model_len=4096, enforce_eager=True, seed=0, dtype=dtype)
    prompts = ["The quick brown fox", "Keys are quantized per channel and values"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
