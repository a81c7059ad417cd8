"""Microbenchmark of the Triton chunked-prefill attention kernel (GPU): a
launch-parameter sweep against vLLM's FlashAttention at the same shapes.

    python benchmarks/bench_prefill_kernel.py --quick --out prefill_kernel.json

One layer at Llama-3.1-8B's attention shape (Hq=32, H=8, D=128, bf16), k4v4
(``KvcompConfig(k_bits=4, v_bits=4, group_size=128)``: per-channel keys, group 128,
the window by position), packed block 128, residual block ``residual_block_size(layout)``, cases

  w1      4 requests x 4096 fresh tokens, no context;
  chunk2  1 request, 8192 tokens already stored (a first prefill step through
          ``kvcomp_store``) + 4096 fresh (seq_len 12288);
  8x2048  8 requests x 2048 fresh tokens, no context.

The step's own store (``kvcomp_store`` of the fresh tokens) runs once before
the attention, as in the backend, and is not part of its time; it is timed on
its own for w1. Methods per case (``triton.testing.do_bench``, warmup 25 ms,
rep 100 ms, median, L2 flushed between calls):

  triton   ``kvcomp_prefill_attention`` at every launch config of the grid
           block_rows x block_n x num_warps x num_stages (54 configs; 16 with
           ``--quick``, the recommended mode: about a minute on an H200, most
           of it compiling). A config that fails to compile or run is
           recorded with its error and skipped.
  fa       vLLM's FlashAttention (``fa_utils.flash_attn_varlen_func``, FA3 on
           Hopper) over the fresh tokens only, causal: the floor. For chunk2
           it ignores the context (its TFLOP/s counts the fresh part only).
  fa_split ``prefill_with_flash_attn``: FlashAttention over the fresh tokens,
           this kernel (module default launch) over the context, merged by
           vLLM's ``merge_attn_states`` (the backend's fresh_prefill path).

Each output is compared with the default launch's (``max_diff``: max abs
difference) and, in the no-context cases, with FlashAttention's
(``max_diff_fa``); ``ok``: both within atol = rtol = 2e-2 (the tests' bf16
tolerance: outputs are bf16, so an absolute bound alone would fail on one
rounding step of an output > 4). TFLOP/s counts causal attention:
2 * sum(q_len * (ctx + (q_len + 1) / 2)) * D * Hq * 2 (QK^T and PV).

Prints a markdown table per case and its best Triton config; ``--out`` writes
everything as JSON; the last line is ``BEST_LAUNCH=block_rows=..,block_n=..,
num_warps=..,num_stages=..``: the config with the lowest summed time over the
cases among those that ran and were ``ok`` in all of them (empty when none
did), in the format of ``KVCOMP_PREFILL_LAUNCH``.

``--smoke`` (for CPU tests of this script) runs tiny cases under
``TRITON_INTERPRET=1`` at one config, without FlashAttention, and checks the
kernel's output against the PyTorch reference.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path in tests
import triton  # noqa: E402

from vllm_kvcomp.config import KvcompConfig  # noqa: E402
from vllm_kvcomp.launch_env import PREFILL_LAUNCH_KEYS  # noqa: E402
from vllm_kvcomp.kernels import triton_prefill  # noqa: E402
from vllm_kvcomp.kernels.triton_prefill import (  # noqa: E402
    kvcomp_prefill_attention,
    prefill_attention_reference,
    prefill_with_flash_attn,
)
from vllm_kvcomp.kernels.triton_store import kvcomp_store  # noqa: E402
from vllm_kvcomp.layout import PageLayout, residual_block_size  # noqa: E402

# name: (context tokens, fresh tokens) per request
CASES = {
    "w1": [(0, 4096)] * 4,
    "chunk2": [(8192, 4096)],
    "8x2048": [(0, 2048)] * 8,
}
SMOKE_CASES = {  # same kinds, tiny: the context one has packed pages + residual
    "w1": [(0, 160)] * 2,
    "chunk2": [(300, 96)],
    "8x2048": [(0, 64)] * 3,
}
SHAPE = dict(Hq=32, H=8, D=128, block_size=128)
SMOKE_SHAPE = dict(Hq=4, H=2, D=64, block_size=128)
GRID = dict(block_rows=(64, 128, 256), block_n=(32, 64, 128), num_warps=(4, 8),
            num_stages=(1, 2, 3))
QUICK_GRID = dict(block_rows=(64, 128), block_n=(64, 128), num_warps=(4, 8),
                  num_stages=(2, 3))
# the built-in launch (not an env override): what every config is compared to
DEFAULT = dict(triton_prefill._BUILTIN_LAUNCH)
MAX_DIFF = 2e-2


def launch_str(c: dict) -> str:
    return ",".join(f"{k}={c[k]}" for k in PREFILL_LAUNCH_KEYS)


def causal_flops(plans, D: int, Hq: int, with_context: bool = True) -> float:
    """QK^T + PV multiply-adds (2 FLOPs each) of causal attention where each
    fresh token sees the request's context and the fresh tokens up to itself."""
    return 2 * sum(q * ((c if with_context else 0) + (q + 1) / 2) for c, q in plans) * D * Hq * 2


class Case:
    """One layer's step: a k4v4 packed cache + residual window holding each
    request's context (stored by ``kvcomp_store`` as a first prefill step),
    the step's fresh q/k/v, metadata as the backend hands them to the kernels
    (int32 block tables with shuffled block ids, block 0 unused; residual
    cache [nb_r, 2, H, bs_r, D])."""

    def __init__(self, plans, Hq, H, D, block_size, dtype, device, seed=0):
        self.plans, self.Hq, self.H, self.D = plans, Hq, H, D
        self.cfg = cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=128)
        self.layout = layout = PageLayout(cfg, block_size, D, torch.finfo(dtype).bits // 8)
        self.bs_r = bs_r = residual_block_size(layout)
        self.scale = D ** -0.5
        B = len(plans)
        lens = [c + q for c, q in plans]
        rng = random.Random(seed)

        def table(bs):
            nblk = [-(-n // bs) for n in lens]
            ids = list(range(1, sum(nblk) + 1))
            rng.shuffle(ids)
            t = torch.zeros(B, max(nblk), dtype=torch.int32)
            for i, nb in enumerate(nblk):
                t[i, :nb] = torch.tensor(ids[:nb], dtype=torch.int32)
                ids = ids[nb:]
            return t.to(device), sum(nblk) + 1

        self.block_table, nb = table(block_size)
        self.residual_block_table, nb_r = table(bs_r)
        self.packed = torch.zeros(nb, H, layout.head_page_bytes, dtype=torch.uint8,
                                  device=device)
        self.residual = torch.zeros(nb_r, 2, H, bs_r, D, dtype=dtype, device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
        # the context, stored as a first prefill step of each request
        if any(c for c, _ in plans):
            ctx = [(0, c) for c, _ in plans]
            T = sum(c for c, _ in plans)
            self._store(randn(T, H, D), randn(T, H, D), ctx)
        T = sum(q for _, q in plans)
        self.query, self.key, self.value = randn(T, Hq, D), randn(T, H, D), randn(T, H, D)
        self.query_start_loc, self.seq_lens, self.slots = self._metadata(plans)
        self.max_query_len = max(q for _, q in plans)
        self.store()  # the step's own store, before its attention (as the backend)

    def _metadata(self, plans):
        """query_start_loc, seq_lens (int32) and residual slot mapping (int64)
        of a step taking request i from plans[i][0] to sum(plans[i]) tokens."""
        qsl, slots = [0], []
        rbt = self.residual_block_table.cpu()
        for i, (c, q) in enumerate(plans):
            qsl.append(qsl[-1] + q)
            pos = torch.arange(c, c + q)
            slots.append(rbt[i, pos // self.bs_r].long() * self.bs_r + pos % self.bs_r)
        dev = self.packed.device
        return (torch.tensor(qsl, dtype=torch.int32, device=dev),
                torch.tensor([c + q for c, q in plans], dtype=torch.int32, device=dev),
                torch.cat(slots).to(dev))

    def _store(self, key, value, plans):
        qsl, lens, slots = self._metadata(plans)
        kvcomp_store(key, value, self.packed, self.residual, self.block_table,
                     self.residual_block_table, slots, qsl, lens, self.layout, self.cfg,
                     self.bs_r, max(q for _, q in plans))

    def store(self):
        kvcomp_store(self.key, self.value, self.packed, self.residual, self.block_table,
                     self.residual_block_table, self.slots, self.query_start_loc,
                     self.seq_lens, self.layout, self.cfg, self.bs_r, self.max_query_len)

    def attention(self, out, **launch):
        return kvcomp_prefill_attention(
            self.query, self.key, self.value, self.packed, self.residual, self.block_table,
            self.residual_block_table, self.query_start_loc, self.seq_lens, self.layout,
            self.cfg, self.scale, self.bs_r, self.max_query_len, out,
            allow_smaller_launch=False, **launch)  # a config runs as named or fails

    def reference(self):
        return prefill_attention_reference(
            self.query.cpu(), self.key.cpu(), self.value.cpu(), self.packed.cpu(),
            self.residual.cpu(), self.block_table.cpu(), self.residual_block_table.cpu(),
            self.query_start_loc.cpu(), self.seq_lens.cpu(), self.layout, self.cfg,
            self.scale, self.bs_r)

    def flash(self, fa):
        flash_attn_varlen_func, fa_version, _ = fa
        return flash_attn_varlen_func(
            q=self.query, k=self.key, v=self.value, cu_seqlens_q=self.query_start_loc,
            max_seqlen_q=self.max_query_len, cu_seqlens_k=self.query_start_loc,
            max_seqlen_k=self.max_query_len, softmax_scale=self.scale, causal=True,
            fa_version=fa_version)

    def flash_split(self, fa, out):
        return prefill_with_flash_attn(
            self.query, self.key, self.value, out, self.packed, self.residual,
            self.block_table, self.residual_block_table, self.query_start_loc, self.seq_lens,
            self.layout, self.cfg, self.scale, self.bs_r, self.max_query_len, 0,
            self.query.shape[0], *fa)


def find_flash_attn(head_size: int):
    """(flash_attn_varlen_func, fa_version, merge_attn_states) as the backend's
    ``_find_flash_attn`` finds them, or the reason they are not there."""
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
        )
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

        version = get_flash_attn_version(head_size=head_size)
        if version is None:
            return None, "get_flash_attn_version: None"
        return (flash_attn_varlen_func, version, merge_attn_states), None
    except Exception as e:  # noqa: BLE001 - a baseline must not stop the run
        return None, f"{type(e).__name__}: {e}"


def timer(smoke: bool, warmup_ms: float, rep_ms: float):
    def us(fn) -> float:
        if smoke:  # interpreter: one call, wall time (meaningless, it checks the plumbing)
            t = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t)
        return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median")
    return us


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), atol=MAX_DIFF, rtol=MAX_DIFF)


def run_case(name, case: Case, configs, fa, us) -> dict:
    flops = causal_flops(case.plans, case.D, case.Hq)
    no_ctx = all(c == 0 for c, _ in case.plans)
    res = {"plans": case.plans, "flops": flops, "bs_r": case.bs_r, "rows": []}
    tf = lambda t_us, f=flops: f / (t_us * 1e-6) / 1e12  # noqa: E731
    ref = case.attention(torch.empty_like(case.query), **DEFAULT)
    if fa is not None:
        fa_out = case.flash(fa)
        t = us(lambda: case.flash(fa))
        f_fresh = causal_flops(case.plans, case.D, case.Hq, with_context=False)
        # with context FA's output is not the step's attention: no diff
        res["fa"] = {"us": t, "tflops": tf(t, f_fresh), "fresh_only": not no_ctx,
                     "max_diff": max_diff(fa_out, ref) if no_ctx else None}
        split_out = torch.empty_like(case.query)
        try:
            case.flash_split(fa, split_out)
            t = us(lambda: case.flash_split(fa, split_out))
            res["fa_split"] = {"us": t, "tflops": tf(t), "max_diff": max_diff(split_out, ref),
                               "max_diff_fa": max_diff(split_out, fa_out) if no_ctx else None}
        except Exception as e:  # noqa: BLE001
            res["fa_split"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    for c in configs:
        row = {"config": launch_str(c), **c}
        out = torch.empty_like(case.query)
        try:
            case.attention(out, **c)
            row["max_diff"] = max_diff(out, ref)
            row["max_diff_fa"] = max_diff(out, fa_out) if fa is not None and no_ctx else None
            row["ok"] = close(out, ref) and (fa is None or not no_ctx or close(out, fa_out))
            row["us"] = us(lambda: case.attention(out, **c))
            row["tflops"] = tf(row["us"])
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory at compile
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        res["rows"].append(row)
    ok = [r for r in res["rows"] if "us" in r and r["ok"]]
    res["best"] = min(ok, key=lambda r: r["us"])["config"] if ok else None
    return res


def print_case(name, res):
    print(f"\n### {name}: plans (context, fresh) = {sorted(set(map(tuple, res['plans'])))} "
          f"x{len(res['plans'])}, {res['flops'] / 1e12:.3f} TFLOP causal\n")
    print("| method / config | µs | TFLOP/s | max diff vs default | max diff vs FA | ok |")
    print("|---|---:|---:|---:|---:|:-:|")
    fmt = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    for key, label in (("fa", "FlashAttention (fresh only)"), ("fa_split", "FA + Triton ctx")):
        r = res.get(key)
        if r is None:
            continue
        if "error" in r:
            print(f"| {label} | failed: {r['error'][:80]} | | | | |")
            continue
        print(f"| {label} | {r['us']:.1f} | {r['tflops']:.1f} | {fmt(r['max_diff'])} | "
              f"{fmt(r.get('max_diff_fa'))} | |")
    for r in sorted(res["rows"], key=lambda r: r.get("us", float("inf"))):
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error'][:80]} | | | | no |")
        else:
            print(f"| {r['config']} | {r['us']:.1f} | {r['tflops']:.1f} | "
                  f"{fmt(r['max_diff'])} | {fmt(r['max_diff_fa'])} | "
                  f"{'yes' if r['ok'] else 'NO'} |")
    print(f"\nbest Triton config ({name}): {res['best']}")


def best_launch(results: dict) -> str:
    """Lowest summed time over the cases among configs that ran and were
    ``ok`` in all of them ('' when none did)."""
    total: dict[str, float] = {}
    bad = set()
    for res in results.values():
        for r in res["rows"]:
            if "us" not in r or not r["ok"]:
                bad.add(r["config"])
            else:
                total[r["config"]] = total.get(r["config"], 0.0) + r["us"]
    good = {c: t for c, t in total.items() if c not in bad}
    return min(good, key=good.get) if good else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="smaller grid (16 configs; recommended): block_rows {64,128} x "
                         "block_n {64,128} x num_warps {4,8} x num_stages {2,3}")
    ap.add_argument("--cases", default=",".join(CASES), help="subset of " + ",".join(CASES))
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if not a.smoke and not torch.cuda.is_available():
        sys.exit("bench_prefill_kernel.py needs a CUDA GPU (--smoke runs a CPU check of "
                 "the script under TRITON_INTERPRET=1)")
    device = "cpu" if a.smoke else "cuda"
    shape = SMOKE_SHAPE if a.smoke else SHAPE
    cases = SMOKE_CASES if a.smoke else CASES
    names = [n for n in a.cases.split(",") if n]
    assert all(n in cases for n in names), f"--cases: known are {list(cases)}"
    grid = QUICK_GRID if a.quick else GRID
    configs = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    if a.smoke:  # the default, and one the wrapper rejects (block_n < 16): the failure path
        configs = [dict(DEFAULT), {**DEFAULT, "block_n": 8}]
    fa, fa_error = (None, "skipped (--smoke)") if a.smoke else find_flash_attn(shape["D"])
    us = timer(a.smoke, a.warmup_ms, a.rep_ms)
    info = {"device": torch.cuda.get_device_name() if not a.smoke else "cpu (interpreter)",
            "shape": shape, "dtype": "bfloat16", "config": "k4v4", "grid": grid,
            "default_launch": DEFAULT, "module_launch": triton_prefill.PREFILL_LAUNCH,
            "fa_version": fa[1] if fa else None, "fa_error": fa_error,
            "triton": triton.__version__, "torch": torch.__version__,
            "timing": f"do_bench warmup {a.warmup_ms} ms rep {a.rep_ms} ms, median"}
    print(f"{info['device']}: {len(configs)} configs x {len(names)} cases; "
          f"FlashAttention: {info['fa_version'] or fa_error}", flush=True)
    results, extra = {}, {}
    t_start = time.time()
    for name in names:
        t0 = time.time()
        case = Case(cases[name], dtype=torch.bfloat16, device=device, seed=len(results),
                    **shape)
        if a.smoke:
            out = case.attention(torch.empty_like(case.query))
            ref = case.reference()
            err = max_diff(out.cpu(), ref)
            assert close(out.cpu(), ref), f"{name}: kernel vs PyTorch reference {err:.3e}"
            print(f"{name}: kernel vs reference max diff {err:.2e}")
        if name == "w1":
            extra["store_w1_us"] = us(case.store)
        results[name] = run_case(name, case, configs, fa, us)
        results[name]["wall_s"] = time.time() - t0
        print_case(name, results[name])
        if name == "w1":
            print(f"\nkvcomp_store (w1, all {case.query.shape[0]} fresh tokens): "
                  f"{extra['store_w1_us']:.1f} µs")
        del case
        if a.out:  # rewritten after every case: a killed run keeps what it measured
            Path(a.out).write_text(json.dumps({"info": info, "cases": results, **extra},
                                              indent=1))
        sys.stdout.flush()
    best = best_launch(results)
    if a.out:
        Path(a.out).write_text(json.dumps(
            {"info": info, "cases": results, **extra, "best_launch": best,
             "wall_s": time.time() - t_start}, indent=1))
    if not best:
        print(f"\nno config ran in every case within atol = rtol = {MAX_DIFF}")
    print(f"BEST_LAUNCH={best}")


if __name__ == "__main__":
    main()
