"""KV capacity at max_model_len 4096 against bf16, as tests/test_capacity.py
computes it: vLLM's get_kv_cache_capacity on the packed and window specs,
128-token pages, async scheduling's two unsettled steps, for the Llama-3.1-8B
shape (32 layers, 8 KV heads, 54.3 GiB) and the CPU demo's tiny Llama (4
layers, 2 KV heads, 1 GiB). Prints a markdown table.

    .venv/bin/python quality/results/2026-12-04-cpu-6m-window-defaults/capacity.py
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))

import vllm_kvcomp  # noqa: E402
from sim_paged import CAPACITY_SHAPES, reported_tokens, shape_specs  # noqa: E402
from vllm_kvcomp.config import KvcompConfig  # noqa: E402
from vllm_kvcomp.tiny_model import make_tiny_llama  # noqa: E402

# (k/v bits, key group, value group, residual_tokens, ring, window dtype)
ROWS = [
    (4, 128, None, 0, False, "auto"), (4, 128, None, 0, True, "auto"),
    (4, 128, None, 0, True, "fp8_e4m3"), (4, 64, 128, 0, False, "auto"),
    (4, 64, None, 0, True, "auto"), (4, 64, 128, 0, True, "auto"),
    (4, 64, 128, 32, True, "auto"), (4, 64, 128, 0, True, "fp8_e4m3"),
    (4, 64, 128, 64, True, "fp8_e4m3"), (4, 32, None, 0, True, "auto"),
    (4, 32, 128, 0, True, "auto"), (4, 32, 128, 0, True, "fp8_e4m3"),
    (2, 128, None, 128, False, "auto"), (2, 128, None, 128, True, "auto"),
    (2, 128, None, 64, True, "auto"), (2, 128, None, 32, True, "auto"),
    (2, 128, None, 0, True, "auto"), (2, 64, None, 0, True, "auto"),
    (2, 64, 128, 64, True, "auto"), (2, 64, 128, 32, True, "auto"),
    (2, 64, 128, 0, True, "auto"), (2, 32, 128, 128, True, "auto"),
    (2, 32, 128, 0, True, "auto"), (2, 32, None, 128, True, "auto"),
    (2, 128, None, 128, True, "fp8_e4m3"), (2, 128, None, 160, True, "fp8_e4m3"),
    (2, 128, None, 192, True, "fp8_e4m3"), (2, 128, None, 224, True, "fp8_e4m3"),
    (2, 128, None, 256, True, "fp8_e4m3"), (2, 64, 128, 128, True, "fp8_e4m3"),
    (2, 64, 128, 160, True, "fp8_e4m3"), (2, 64, 128, 192, True, "fp8_e4m3"),
    (2, 32, 128, 128, True, "fp8_e4m3"), (2, 32, None, 128, True, "fp8_e4m3"),
]
BAR = {4: 3.4, 2: 5.5}


def main():
    from vllm.engine.arg_utils import EngineArgs

    vllm_kvcomp.register()
    model = make_tiny_llama(os.path.join(tempfile.gettempdir(), "kvcomp-capacity-tiny"))
    vc = EngineArgs(model=model, max_model_len=4096, block_size=128,
                    max_num_batched_tokens=8192).create_engine_config()
    bf16 = {s: reported_tokens(vc, shape_specs(None, layers, heads, 2), memory)
            for s, (layers, heads, memory) in CAPACITY_SHAPES.items()}
    print(f"bf16: Llama-3.1-8B shape {bf16['llama8b']:,} tokens, tiny {bf16['tiny']:,} tokens\n")
    print("| bits | key group | value group | window (tokens) | held | window dtype "
          "| 8B shape tokens | vs bf16 | tiny tokens | vs bf16 | bar |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bits, g, vg, r, ring, dtype in ROWS:
        cfg = KvcompConfig(k_bits=bits, v_bits=bits, group_size=g, value_group_size=vg,
                           residual_tokens=r, residual_ring=ring, residual_dtype=dtype)
        got = {s: reported_tokens(vc, shape_specs(cfg, layers, heads, 2), memory)
               for s, (layers, heads, memory) in CAPACITY_SHAPES.items()}
        ratio = {s: got[s] / bf16[s] for s in got}
        ok = all(x >= BAR[bits] for x in ratio.values())
        print(f"| k{bits}v{bits} | {g} | {cfg.value_group(128)} | {r}..{cfg.residual_window} "
              f"| {'ring' if ring else 'by position'} | {'e4m3' if dtype != 'auto' else 'model'} "
              f"| {got['llama8b']:,} | {ratio['llama8b']:.3f}x | {got['tiny']:,} "
              f"| {ratio['tiny']:.3f}x | {'**yes**' if ok else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
