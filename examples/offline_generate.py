"""Generate with KVCOMP on a generated tiny Llama (CPU); argv[1] = bits for K and V (default 4)."""
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama("/tmp/kvcomp-tiny-llama")
    kv = {"k_bits": int(sys.argv[1]) if len(sys.argv) > 1 else 4}
    kv["v_bits"] = kv["k_bits"]
    llm = LLM(model, attention_backend="kvcomp", additional_config={"kvcomp": kv},
              max_model_len=32768, enforce_eager=True, seed=0)
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].outputs[0].text)
