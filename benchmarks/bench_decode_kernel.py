"""Microbenchmark of the packed-page decode attention kernel (GPU).

    python benchmarks/bench_decode_kernel.py --out decode_kernel.json

At Llama-3.1-8B's attention shape (Hq=32, H=8, D=128; packed block 128,
group 128, residual 128) for k4v4 / k2v2 (per-channel keys, KIVI) and
k16v16 (bf16 pages through the same kernel), batch x context in
{1, 8, 32, 64} x {1K .. 128K} (combinations whose cache exceeds
``--max-cache-gib`` are skipped), it reports per call: microseconds (median of
``triton.testing.do_bench``, L2 flushed between calls), the bytes the kernel
must move (packed pages of ``[0, Q)``, the residual window, queries, fresh
K/V, output), the achieved GB/s and its share of the device's copy bandwidth
(measured here: bytes read + written by a large device-to-device copy).
For comparison it times a bf16 decode over an equivalent bf16 cache:
flash-attn's paged ``flash_attn_with_kvcache`` (``vllm.vllm_flash_attn`` or
``flash_attn``) if importable, and torch SDPA over a contiguous cache.
Prints a markdown table; ``--out`` writes JSON.

``--smoke`` runs a tiny shape on CPU under ``TRITON_INTERPRET=1`` (checked
against the PyTorch reference) so the script can be tested without a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def _import_kernels():
    """The kernels are installed as ``vllm_kvcomp.kernels``; on a bare GPU box
    (no ``pip install``) map the repo's ``kernels/`` onto that name."""
    try:
        import vllm_kvcomp.kernels  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        import vllm_kvcomp  # noqa: F401

        spec = importlib.util.spec_from_file_location(
            "vllm_kvcomp.kernels", root / "kernels" / "__init__.py",
            submodule_search_locations=[str(root / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vllm_kvcomp.kernels"] = mod
        spec.loader.exec_module(mod)


_import_kernels()
import triton  # noqa: E402

from vllm_kvcomp.config import KvcompConfig  # noqa: E402
from vllm_kvcomp.kernels.triton_decode import (  # noqa: E402
    decode_attention_reference,
    decode_num_splits,
    decode_tiles,
    kvcomp_decode_attention,
)
from vllm_kvcomp.layout import PageLayout, residual_block_size  # noqa: E402

CONFIGS = {
    "k4v4": dict(k_bits=4, v_bits=4),
    "k2v2": dict(k_bits=2, v_bits=2),
    "k16v16": dict(k_bits=16, v_bits=16),
    "k4v4-token": dict(k_bits=4, v_bits=4, key_axis="token"),
}
GiB = 1 << 30


# ---------------------------------------------------------------- problem


class Problem:
    """Random packed pages (valid fp16 params), a residual window, shuffled
    block tables, all requests at the same length ``ctx``."""

    def __init__(self, cfg, B, ctx, Hq, H, D, block_size, dtype, device, seed=0):
        self.cfg, self.B, self.ctx = cfg, B, ctx
        self.layout = layout = PageLayout(cfg, block_size, D, torch.finfo(dtype).bits // 8)
        self.bs_r = bs_r = residual_block_size(layout)
        self.scale = D ** -0.5
        g = torch.Generator(device=device).manual_seed(seed)
        start = ctx - 1
        self.q_old = Q = cfg.quantized_prefix_len(start)
        nblk = max(1, -(-Q // block_size))
        self.packed = torch.randint(0, 256, (B * nblk + 1, H, layout.head_page_bytes),
                                    dtype=torch.uint8, device=device, generator=g)
        for off, rows, cols, bits in (
                (layout.k_params_offset, *layout.k_param_shape, cfg.k_bits),
                (layout.v_params_offset, *layout.v_param_shape, cfg.v_bits)):
            if bits < 16:  # scale, min: sane fp16 (random bits hold NaNs)
                p = self.packed[:, :, off: off + rows * cols * 4].view(torch.float16)
                p.uniform_(-0.1, 0.1, generator=g)
        for off, bits, row_bytes in ((layout.k_codes_offset, cfg.k_bits,
                                      layout.k_code_row_bytes),
                                     (layout.v_codes_offset, cfg.v_bits,
                                      layout.v_code_row_bytes)):
            if bits == 16:  # raw model-dtype rows
                raw = self.packed[:, :, off: off + block_size * row_bytes].view(dtype)
                raw.normal_(generator=g)
        perm = torch.randperm(B * nblk, device=device, generator=g) + 1
        self.block_table = perm.to(torch.int32).view(B, nblk)
        # residual pages only for the live window [Q, start), as vLLM keeps them
        nb_r = -(-ctx // bs_r)
        first = Q // bs_r
        live = nb_r - first
        self.residual = None
        self.residual_table = torch.zeros(B, nb_r, dtype=torch.int32, device=device)
        if cfg.needs_residual_cache:
            self.residual = torch.randn(B * live + 1, 2, H, bs_r, D, device=device,
                                        dtype=torch.float32, generator=g).to(dtype)
            ids = torch.arange(1, B * live + 1, device=device, dtype=torch.int32)
            self.residual_table[:, first:] = ids.view(B, live)
        self.query = torch.randn(B, Hq, D, device=device, dtype=torch.float32,
                                 generator=g).to(dtype)
        self.key_new = torch.randn(B, H, D, device=device, generator=g).to(dtype)
        self.value_new = torch.randn(B, H, D, device=device, generator=g).to(dtype)
        self.seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        self.out = torch.empty_like(self.query)

        es = dtype.itemsize
        self.bytes = {
            "packed": B * H * Q * layout.head_page_bytes // block_size,
            "residual": B * H * (start - Q) * 2 * D * es,
            "qkvo": (2 * B * Hq * D + 2 * B * H * D) * es,
        }
        self.bytes["total"] = sum(self.bytes.values())

    def args(self):
        return (self.query, self.key_new, self.value_new, self.packed, self.residual,
                self.block_table, self.residual_table, self.seq_lens, self.layout, self.cfg,
                self.scale, self.bs_r)

    def run(self, num_splits=None, **kw):
        return kvcomp_decode_attention(*self.args(), self.ctx, num_splits=num_splits,
                                       out=self.out, **kw)


def cache_gib(cfg, B, ctx, H, D, block_size, es=2) -> float:
    layout = PageLayout(cfg, block_size, D, es)
    return B * ctx * H * layout.head_page_bytes / block_size / GiB


# ---------------------------------------------------------------- baselines


def _flash_attn_fn():
    for name in ("vllm.vllm_flash_attn", "flash_attn"):
        try:
            mod = __import__(name, fromlist=["flash_attn_with_kvcache"])
            return name, mod.flash_attn_with_kvcache
        except Exception:  # noqa: BLE001 - any import failure means "not here"
            continue
    return None, None


def bench_bf16_baselines(B, ctx, Hq, H, D, dtype, device, timer):
    """us of a bf16 decode over a bf16 cache of the same length: paged
    flash-attn (block 256, which every flash-attn 2 build accepts) and torch
    SDPA (contiguous cache, GQA)."""
    res = {}
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, Hq, D, device=device, generator=g).to(dtype)
    name, fa = _flash_attn_fn()
    if fa is not None:
        try:
            bs = 256
            nblk = -(-ctx // bs)
            k = torch.randn(B * nblk, bs, H, D, device=device, generator=g).to(dtype)
            v = torch.randn_like(k)
            bt = (torch.randperm(B * nblk, device=device, generator=g)
                  .to(torch.int32).view(B, nblk))
            lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
            q4 = q.unsqueeze(1)
            fn = lambda: fa(q4, k, v, cache_seqlens=lens, block_table=bt,  # noqa: E731
                            softmax_scale=D ** -0.5, causal=True)
            fn()
            res["flash_attn"] = (name, timer(fn))
            del k, v
        except Exception as e:  # noqa: BLE001
            res["flash_attn"] = (name, f"failed: {type(e).__name__}: {e}"[:120])
    try:
        k = torch.randn(B, H, ctx, D, device=device, generator=g).to(dtype)
        v = torch.randn_like(k)
        q4 = q.unsqueeze(2)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q4, k, v, enable_gqa=True)
        fn()
        res["sdpa"] = ("torch.sdpa", timer(fn))
        del k, v
    except Exception as e:  # noqa: BLE001
        res["sdpa"] = ("torch.sdpa", f"failed: {type(e).__name__}: {e}"[:120])
    return res


def copy_bandwidth(device, nbytes=2 * GiB, timer=None) -> float:
    """GB/s of a device-to-device copy, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (us * 1e-6) / 1e9


def make_timer(device, warmup_ms, rep_ms, mode="graph"):
    """Median microseconds of ``fn``. ``graph``: replays of a CUDA graph of
    ``fn`` (what vLLM's decode does; no launch overhead, L2 not flushed);
    ``eager``: ``triton.testing.do_bench`` (launch overhead included, L2
    flushed between calls). On CPU: one timed call."""
    if device == "cuda" and mode == "graph":
        def timer(fn):
            fn()
            torch.cuda.synchronize()
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms,
                                                           return_mode="median")
    elif device == "cuda":
        def timer(fn):
            return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                 return_mode="median")
    else:
        def timer(fn):
            fn()
            t = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t)
    return timer


# ---------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape on CPU (TRITON_INTERPRET=1), checked against the reference")
    ap.add_argument("--configs", default="k4v4,k2v2,k16v16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="1024,4096,16384,32768,65536,131072")
    ap.add_argument("--max-cache-gib", type=float, default=40.0)
    ap.add_argument("--num-splits", type=int, default=None, help="override the heuristic")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=3)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="tuning grid (block_n x num_warps x num_stages x splits) at the "
                         "first batch / context of the lists, per config")
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph",
                    help="graph: CUDA-graph replays (default); eager: do_bench, L2 flushed")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=40)
    a = ap.parse_args(argv)

    if a.smoke:
        device, dtype = "cpu", torch.float32
        Hq, H, D, bs, G, R = 4, 2, 64, 32, 32, 16
        batches, contexts = [2], [150]
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA device (or --smoke for a CPU check)")
        device, dtype = "cuda", torch.bfloat16
        Hq, H, D, bs, G, R = 32, 8, 128, 128, 128, 128
        batches = [int(x) for x in a.batches.split(",")]
        contexts = [int(x) for x in a.contexts.split(",")]
    timer = make_timer(device, a.warmup_ms, a.rep_ms, a.timing)
    kw = dict(block_n=a.block_n, num_warps=a.num_warps, num_stages=a.num_stages)

    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "shape": dict(Hq=Hq, H=H, D=D, block_size=bs, group_size=G, residual_tokens=R),
            "dtype": str(dtype), "kernel_kwargs": kw, "num_splits_override": a.num_splits,
            "timing": a.timing}
    # eager timing for the copy: a graph-captured 2 GiB copy read ~20% lower
    copy_gbs = copy_bandwidth(device, 2 * GiB if device == "cuda" else 1 << 24,
                              make_timer(device, a.warmup_ms, a.rep_ms, "eager"))
    info["copy_GBps"] = copy_gbs
    print(f"# decode kernel on {info['device']}: copy bandwidth {copy_gbs:.0f} GB/s "
          f"(read + write)\n")

    if a.sweep:
        return sweep(a, device, dtype, timer, copy_gbs, info, batches[0], contexts[0],
                     (Hq, H, D, bs, G, R))

    rows, baselines = [], {}
    t_start = time.time()
    for B in batches:
        for ctx in contexts:
            if device == "cuda" and not a.no_baselines:
                if cache_gib(KvcompConfig(k_bits=16, v_bits=16), B, ctx, H, D, bs) <= \
                        a.max_cache_gib:
                    baselines[(B, ctx)] = bench_bf16_baselines(B, ctx, Hq, H, D, dtype,
                                                               device, timer)
                    torch.cuda.empty_cache()
            for name in a.configs.split(","):
                cfg = KvcompConfig(group_size=G, residual_tokens=R, block_size=bs,
                                   **CONFIGS[name])
                if cache_gib(cfg, B, ctx, H, D, bs) > a.max_cache_gib:
                    continue
                p = Problem(cfg, B, ctx, Hq, H, D, bs, dtype, device)
                splits = a.num_splits or decode_num_splits(
                    B, H, ctx, cfg, decode_tiles(p.layout, a.block_n),
                    num_sms=(torch.cuda.get_device_properties(0).multi_processor_count
                             if device == "cuda" else 132))
                out = p.run(a.num_splits, **kw).clone()
                if a.smoke:
                    ref = decode_attention_reference(*p.args())
                    err = (out - ref).abs().max().item()
                    assert err < 2e-3, f"{name}: max |err| {err}"
                else:
                    assert torch.isfinite(out).all(), f"{name}: non-finite output"
                us = timer(lambda: p.run(a.num_splits, **kw))
                gbs = p.bytes["total"] / (us * 1e-6) / 1e9
                row = dict(config=name, batch=B, context=ctx, num_splits=splits,
                           us=us, bytes=p.bytes, GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs,
                           cache_GiB=cache_gib(cfg, B, ctx, H, D, bs))
                base = baselines.get((B, ctx), {})
                for key, (bname, val) in base.items():
                    row[f"{key}_us"] = val
                rows.append(row)
                del p
                if device == "cuda":
                    torch.cuda.empty_cache()

    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v))

    print("| config | batch | context | splits | us | MB moved | GB/s | % copy BW "
          "| bf16 flash-attn us | bf16 SDPA us | speedup vs best bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fa, sd = r.get("flash_attn_us"), r.get("sdpa_us")
        best = min([x for x in (fa, sd) if isinstance(x, float)], default=None)
        sp = f"{best / r['us']:.2f}x" if best else "-"
        print(f"| {r['config']} | {r['batch']} | {r['context']} | {r['num_splits']} "
              f"| {r['us']:.1f} | {r['bytes']['total'] / 1e6:.1f} | {r['GBps']:.0f} "
              f"| {r['pct_copy_bw']:.1f} | {fmt(fa)} | {fmt(sd)} | {sp} |")
    info["wall_s"] = time.time() - t_start
    print(f"\n{len(rows)} rows in {info['wall_s']:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1,
                                          default=str))
    return rows


def sweep(a, device, dtype, timer, copy_gbs, info, B, ctx, shape):
    """Tuning grid at one shape: tile, warps, pipeline stages, splits and
    code element width, for each config."""
    Hq, H, D, bs, G, R = shape
    rows = []
    print("| config | kernel kwargs | splits | us | GB/s | % copy BW |")
    print("|---|---|---|---|---|---|")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    for name in a.configs.split(","):
        cfg = KvcompConfig(group_size=G, residual_tokens=R, block_size=bs, **CONFIGS[name])
        p = Problem(cfg, B, ctx, Hq, H, D, bs, dtype, device)
        grid = []
        for bn in (64, 128):
            auto = decode_num_splits(B, H, ctx, cfg, decode_tiles(p.layout, bn), num_sms=sms)
            grid += [(dict(block_n=bn, num_warps=nw, num_stages=ns), auto)
                     for nw in (2, 4) for ns in (2, 3, 4)]
            grid += [(dict(block_n=bn, num_warps=4, num_stages=3), s)
                     for s in sorted({1, auto // 2, 2 * auto} - {0, auto})]
        grid += [(dict(block_n=128, num_warps=4, num_stages=3, elem_bits=e), auto)
                 for e in (8, 16) if cfg.k_bits < 16]
        for kw, splits in grid:
            try:
                p.run(splits, **kw)
                us = timer(lambda: p.run(splits, **kw))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"| {name} | {kw} | {splits} | failed: {type(e).__name__} | | |")
                continue
            gbs = p.bytes["total"] / (us * 1e-6) / 1e9
            rows.append(dict(config=name, batch=B, context=ctx, num_splits=splits, us=us,
                             GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs, **kw))
            print(f"| {name} | {kw} | {splits} | {us:.1f} | {gbs:.0f} "
                  f"| {100 * gbs / copy_gbs:.1f} |")
        del p
    if a.out:
        Path(a.out).write_text(json.dumps({"info": info, "sweep": rows}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
