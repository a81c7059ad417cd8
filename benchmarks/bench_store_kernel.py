"""Store kernel (hand-over + residual write) on decode steps, the shape of W2.

The W2 profile on an H200 (2026-11-30, ``results/2026-11-30-h200-w2-profile``) put
the store at 71 µs a layer for 512 decode tokens: 2.3 ms of a 27 ms step, for
~2 MB of fresh K/V a layer. A decode step writes one token a request into the
residual window, and the requests whose window just filled a key group hand
that group over: 128 tokens quantized and packed by one program per KV head.
This times that launch for a share of handing-over requests (0, 1/16: W2's
staggered starts, 1: all at once), with the hand-over in one program per
(request, head) or split into its independent pieces (``split_handover``), at
4 and 8 warps. Page contents are random: the work does not depend on them.

    python benchmarks/bench_store_kernel.py --out store.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton

from bench_decode_kernel import make_timer  # noqa: E402
from vllm_kvcomp.config import KvcompConfig  # noqa: E402
from vllm_kvcomp.kernels.triton_store import handover_pieces, kvcomp_store  # noqa: E402
from vllm_kvcomp.layout import PageLayout, residual_block_size  # noqa: E402

# 128-token key groups and the window by position, named (k4v4's and k2v2's
# defaults are other layouts: config.default_layout)
CONFIGS = {
    "k4v4": dict(k_bits=4, v_bits=4, group_size=128),
    "k4v4-r0": dict(k_bits=4, v_bits=4, residual_tokens=0),
    "k2v2": dict(k_bits=2, v_bits=2, group_size=128),
    "k2v2-g32-vg128": dict(k_bits=2, v_bits=2, group_size=32, value_group_size=128),
}


def decode_step(cfg: KvcompConfig, B: int, ctx: int, handover_share: float, H: int, D: int,
                dtype, device, block_size: int = 128, seed: int = 0) -> dict:
    """Tensors of one decode step: B requests near ``ctx`` tokens, the first
    ``round(B * handover_share)`` of them at a length that hands a key group over."""
    g = torch.Generator().manual_seed(seed)
    layout = PageLayout(cfg, block_size, D, torch.tensor([], dtype=dtype).element_size())
    bs_r = residual_block_size(layout) if cfg.needs_residual_cache else 1
    align, R = cfg.key_token_align, cfg.residual_tokens
    n_hand = round(B * handover_share)
    base = (ctx - R) // align * align + R  # Q(n) moves at n = R + k * align
    lens = [base if i < n_hand else base + max(1, align // 2) for i in range(B)]
    per_req = triton.cdiv(max(lens), block_size)
    per_req_r = triton.cdiv(max(lens), bs_r)
    nb = B * per_req + 1
    nb_r = B * per_req_r + 1
    packed = torch.randint(0, 256, (nb, H, layout.head_page_bytes), generator=g,
                           dtype=torch.uint8).to(device)
    residual = torch.randn(nb_r, 2, H, bs_r, D, generator=g).to(dtype).to(device)
    bt = (1 + torch.randperm(B * per_req, generator=g)).view(B, per_req).int().to(device)
    rbt = (1 + torch.randperm(B * per_req_r, generator=g)).view(B, per_req_r).int().to(device)
    pos = torch.tensor(lens) - 1
    slots = (rbt.cpu()[torch.arange(B), pos // bs_r].long() * bs_r + pos % bs_r).to(device)
    key = torch.randn(B, H, D, generator=g).to(dtype).to(device)
    value = torch.randn(B, H, D, generator=g).to(dtype).to(device)
    return dict(key=key, value=value, packed=packed, residual=residual, bt=bt, rbt=rbt,
                slots=slots, qsl=torch.arange(B + 1, dtype=torch.int32, device=device),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                layout=layout, cfg=cfg, bs_r=bs_r, n_hand=n_hand)


def run(step: dict, **kw):
    kvcomp_store(step["key"], step["value"], step["packed"], step["residual"], step["bt"],
                 step["rbt"], step["slots"], step["qsl"], step["seq_lens"], step["layout"],
                 step["cfg"], step["bs_r"], 1, **kw)


def check_split(step: dict) -> None:
    """Split and one-program hand-overs write the same bytes, and a step with
    hand-overs writes packed pages at all (else the timing measures nothing)."""
    before = step["packed"].clone(), step["residual"].clone()
    outs = []
    for split in (False, True):
        step["packed"].copy_(before[0])
        step["residual"].copy_(before[1])
        run(step, split_handover=split)
        outs.append(step["packed"].clone())
    if not torch.equal(outs[0], outs[1]):
        raise SystemExit("split hand-over wrote different packed bytes")
    if step["n_hand"] and torch.equal(outs[0], before[0]):
        raise SystemExit("no hand-over happened in a step set up to hand over")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="k4v4,k4v4-r0,k2v2-g32-vg128")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--context", type=int, default=1536)
    ap.add_argument("--shares", default="0,0.0625,1")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # a smoke run under the interpreter (tests/test_bench_store.py)
        a.batch, a.context, a.warps = 4, 300, "4"
    H = 8 if device == "cuda" else 2
    timer = make_timer(device, 10, 40)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    print(f"# store kernel on {name}: one decode step, batch {a.batch}, context {a.context}, "
          f"Llama-3.1-8B KV heads (H 8, D 128), bf16\n")
    print("| config | hand-over share | split | warps | programs / head | µs |")
    print("|---|---|---|---|---|---|")
    for c in a.configs.split(","):
        cfg = KvcompConfig(**CONFIGS[c])
        for share in (float(x) for x in a.shares.split(",")):
            step = decode_step(cfg, a.batch, a.context, share, H, 128, torch.bfloat16, device)
            check_split(step)
            for split in (False, True):
                for w in (int(x) for x in a.warps.split(",")):
                    us = timer(lambda: run(step, split_handover=split, num_warps=w))
                    progs = handover_pieces(cfg, step["layout"]) if split else 1
                    rows.append(dict(config=c, share=share, split=split, warps=w,
                                     programs=a.batch * progs, us=us, n_hand=step["n_hand"]))
                    print(f"| {c} | {share:g} ({step['n_hand']}) | {split} | {w} | "
                          f"{a.batch * progs} | {us:.1f} |", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "date": time.strftime("%Y-%m-%d"),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
