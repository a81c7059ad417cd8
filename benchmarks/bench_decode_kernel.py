"""Microbenchmark of the packed-page decode attention kernel (GPU), with
vLLM's own decode paths as baselines at the same shapes.

    python benchmarks/bench_decode_kernel.py --out decode_kernel.json
    python benchmarks/bench_decode_kernel.py --check   # baselines vs an fp32 reference only

At Llama-3.1-8B's attention shape (Hq=32, H=8, D=128; packed block 128,
group 128, residual 128) for k4v4 / k2v2 (per-channel keys, KIVI) and
k16v16 (bf16 pages through the same kernel), batch x context in
{1, 8, 32, 64} x {1K .. 128K} (combinations whose cache exceeds
``--max-cache-gib`` are skipped), it reports per call: microseconds (median of
CUDA-graph replays, or with ``--timing eager`` of ``triton.testing.do_bench``,
L2 flushed between calls), the bytes the kernel must move (packed pages of
``[0, Q)``, the residual window, queries, fresh K/V, output), the achieved
GB/s and its share of the device's copy bandwidth (measured here: bytes read +
written by a large device-to-device copy).

Baselines (``--baselines``, default all; each one isolated: a failed import or
launch is recorded as ``failed: <reason>`` in its cells and the run goes on;
they run after all of our rows, and the JSON is rewritten after every step):

  sdpa      torch SDPA over a contiguous bf16 cache [B, H, L, D] (GQA).
  fa3_bf16  vLLM's FlashAttention backend on Hopper: ``vllm.vllm_flash_attn.
            flash_attn_varlen_func(fa_version=3)`` over the paged bf16 cache
            [num_blocks, H, 16, 2*D] (NHD), AOT scheduler metadata and
            ``num_splits`` = 32 as under full CUDA graphs. 512 B/token/head.
  fa3_fp8   the same with kv_cache_dtype=fp8: fp8_e4m3 cache and query, unit
            k/v/q descales (vLLM's default scales). 256 B/token/head.
  int4      kv_cache_dtype=int4_per_token_head through ``TritonAttentionImpl``:
            ``do_kv_cache_update`` fills the cache, ``forward`` is timed
            (unified_attention -> unified_attention_int4, incl. the RHT of q
            and the inverse RHT of the output). D/2 codes + fp32 scale (with
            the zero-point in its low bits) for K and for V: 136 B/token/head.
  tq_k3v4,  turboquant_k3v4_nc / turboquant_4bit_nc through
  tq_4bit   ``TurboQuantAttentionImpl`` (store: triton_turboquant_store;
            timed forward: triton_turboquant_decode_attention, 32 KV splits).
            Key codes + fp16 norm, 4-bit value codes + fp16 scale and zero:
            118 / 134 B/token/head. Its stage-1 grid is (B, Hq, splits), so
            each KV byte is requested once per query head of the group (L2
            may absorb the repeats); the bytes counted are the cache's.

The baselines' caches use vLLM's default block size 16 (``--baseline-block-
size``), every request's K/V already stored; only the attention call is timed
(upstream stores the step's own token in a separate op). Their "bytes moved"
is the KV cache of all tokens (incl. scales) + query + output.

``--check`` compares each baseline's output (bf16) with an fp32 attention over
the K/V the kernel reads (the dequantized cache; also reported: the error
against the K/V before quantization), tolerances in ``CHECK_TOL``. On a GPU it
uses the Llama shape and lengths 1000 / 4113 / 37 (the full run does the same
check first and stores it in the JSON); on CPU a tiny shape under
``TRITON_INTERPRET=1`` (FlashAttention skipped). ``--configs ''`` runs the
baselines only.

Prints a markdown table: our rows with the baselines' microseconds beside
them, then one row per baseline with its own bytes, GB/s and % of copy
bandwidth. ``--out`` writes JSON (``rows``, ``baselines``, ``info``).

``--quest-budgets 2048`` adds, for each per-channel-key config, Quest's decode
at that token budget (``kernels/triton_quest.py``: page scoring, top-k
selection and the attention over the selected pages, timed together as one
decode call): rows ``<config>+quest<budget>``; its bytes are the key
(scale, min) of every page, the selected pages, the window, q/k/v/o. The row
also times the two halves alone: ``quest_select_us`` (scoring and top-k;
``quest_score_us`` the scoring alone) and
``quest_attention_us`` (the rewritten batch and the split-K attention over a
selection made before); ``num_splits`` is the split count the attention ran
with (``triton_quest.quest_num_splits``). ``--quest-splits 1,2,5,10`` adds rows
``<config>+quest<budget>-s<splits>`` with the attention at each of these split
counts instead.

``--head-split 0.5`` adds, for each config, a layer whose head map streams that
share of the KV heads (``kernels/triton_stream.py``: sinks ``--sink-tokens``
+ window ``--recent-tokens`` from model-dtype pages, the step's token stored)
and packs the rest (the config's decode kernel on those heads), timed
together as one decode call: rows ``<config>+split<percent>``; its bytes are
the retrieval heads' packed pages and window, the streaming heads' sinks and
window, q/k/v/o.

``--eviction h2o,a2sf`` (with ``--eviction-budget 2048``) adds, for each config,
an H2O / A2SF layer on one packed cache (a score slot per token, every
request in the layout the policy gives it at that context): rows
``<config>+<method><budget>`` (``eviction_row``) time (a) the decode launch
over the positions the step reads, (b) the engine's decode under that
eviction (the launch with its attention-mass output, the mass accumulated
into the score slots, each request's eviction check) and (c) the eviction
step of a batch in which every request moves a page (selection and
compaction); (b) - (a) per layer and x ``--num-layers`` per step, and (c)
amortized over the steps between a request's page moves, make
``eviction_step_us``. A second table prints them.

``--smoke`` runs a tiny shape on CPU under ``TRITON_INTERPRET=1`` (checked
against the PyTorch reference, baselines included) so the script can be tested
without a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if "--check" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path in tests
import triton  # noqa: E402

from vllm_kvcomp.config import SCORED_EVICTION, KvcompConfig  # noqa: E402
from vllm_kvcomp.kernels import eviction_gpu, h2o_ref  # noqa: E402
from vllm_kvcomp.kernels.attention_ref import RequestStep, step_model_dtype  # noqa: E402
from vllm_kvcomp.kernels.compaction import compact_kept  # noqa: E402
from vllm_kvcomp.kernels.decode_launch import (  # noqa: E402
    DEFAULT_LAUNCH,
    decode_num_splits,
    decode_tiles_and_slices,
)
from vllm_kvcomp.kernels.h2o_ref import score_view  # noqa: E402
from vllm_kvcomp.kernels.triton_common import layout_constexprs  # noqa: E402
from vllm_kvcomp.kernels.triton_compaction import triton_compact  # noqa: E402
from vllm_kvcomp.kernels.triton_decode import (  # noqa: E402
    decode_attention_reference,
    kvcomp_decode_attention,
)
from vllm_kvcomp.kernels.triton_quest import (  # noqa: E402
    quest_decode_attention,
    quest_decode_reference,
    quest_num_splits,
    quest_page_scores,
    quest_select,
    quest_top_pages,
)
from vllm_kvcomp.kernels.triton_select import (  # noqa: E402
    triton_select_and_compact, triton_select_decode_rows)
from vllm_kvcomp.kernels.triton_stream import (  # noqa: E402
    stream_attention,
    stream_attention_reference,
)
from vllm_kvcomp.layout import PageLayout, residual_block_size  # noqa: E402
from vllm_kvcomp.policies.quest import Quest  # noqa: E402

CONFIGS = {
    "k4v4": dict(k_bits=4, v_bits=4),
    "k2v2": dict(k_bits=2, v_bits=2),
    "k16v16": dict(k_bits=16, v_bits=16),
    "k4v4-token": dict(k_bits=4, v_bits=4, key_axis="token"),
    # KIVI's 2-bit setting (32-token key groups, 32-channel value groups): the
    # quality-recommended k2v2; its tiles are 32 tokens and values unfolded
    "k2v2-kivi": dict(k_bits=2, v_bits=2, group_size=32),
    # KIVI's key groups, one value group a head: near-KIVI quality (docs/quality.md),
    # 128-token warp tiles with one key group a slice
    "k2v2-g32-vg128": dict(k_bits=2, v_bits=2, group_size=32, value_group_size=128),
    # 64-token key groups, one value group a head: the packed pages of the k4v4
    # setting at the capacity bar (quality/results/2026-12-04-cpu-6m-window-defaults;
    # its ring changes where the window's pages are, not what decode reads)
    "k4v4-g64-vg128": dict(k_bits=4, v_bits=4, group_size=64, value_group_size=128),
}
GiB = 1 << 30


# ---------------------------------------------------------------- problem


class Problem:
    """Random packed pages (valid fp16 params), a residual window, shuffled
    block tables, all requests at the same length ``ctx``. ``all_pages``: a
    packed page for every token, the window's too, as a request holds them
    under H2O / A2SF (its window's tokens have score slots); random scores."""

    def __init__(self, cfg, B, ctx, Hq, H, D, block_size, dtype, device, seed=0,
                 all_pages=False):
        self.cfg, self.B, self.ctx = cfg, B, ctx
        self.layout = layout = PageLayout(cfg, block_size, D, torch.finfo(dtype).bits // 8)
        self.bs_r = bs_r = residual_block_size(layout)
        self.scale = D ** -0.5
        g = torch.Generator(device=device).manual_seed(seed)
        start = ctx - 1
        self.q_old = Q = cfg.quantized_prefix_len(start)
        nblk = max(1, -(-(ctx if all_pages else Q) // block_size))
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
        if layout.has_scores:  # finite, as accumulated attention is
            score_view(self.packed, layout).uniform_(0, 1, generator=g)
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

    def run_quest(self, quest, num_splits=None):
        """Quest's decode call: selection, then attention over the selected pages."""
        return self.quest_attention(quest, self.quest_select(quest), num_splits)

    def quest_select(self, quest):
        return quest_select(self.query, self.packed, self.block_table, self.seq_lens,
                            self.layout, self.cfg, quest)

    def quest_scores(self, quest, **launch):
        return quest_page_scores(self.query, self.packed, self.block_table, self.seq_lens,
                                 self.layout, self.cfg, quest, **launch)

    def quest_top_at(self, quest, scores, num_warps):
        return quest_top_pages(scores, self.seq_lens, self.layout, self.cfg, quest,
                               num_warps=num_warps)

    def quest_attention(self, quest, sel, num_splits=None):
        return quest_decode_attention(*self.args()[:8], sel, *self.args()[8:], quest,
                                      out=self.out, num_splits=num_splits)

    def quest_bytes(self, quest):
        """What Quest's decode must move: every page's key (scale, min), the
        selected pages (at most the packed prefix's), the window, q/k/v/o."""
        layout, B, H = self.layout, self.B, self.packed.shape[1]
        pages = -(-self.q_old // layout.block_size)
        key_params = layout.k_param_shape[0] * layout.k_param_shape[1] * 4
        read = min(pages, quest.budget_pages) * layout.head_page_bytes
        b = {"key_params": B * H * pages * key_params, "packed": B * H * read,
             "residual": self.bytes["residual"], "qkvo": self.bytes["qkvo"]}
        b["total"] = sum(b.values())
        return b


class StreamProblem:
    """The streaming heads of a split layer's decode step: model-dtype pages
    for each request's sinks and recent window only (the rest of its
    block-table row is the null block, as the stream manager leaves it), the
    step's token stored as it attends."""

    def __init__(self, B, ctx, Hq, H, D, sink, recent, block_size, dtype, device, seed=1):
        g = torch.Generator(device=device).manual_seed(seed)
        self.sink, self.recent, self.B = sink, recent, B
        self.scale = D ** -0.5
        start = ctx - 1
        nb = -(-ctx // block_size)
        sink_hi = min(sink, start)
        recent_lo = max(sink_hi, start + 1 - recent)
        pages = sorted(set(range(-(-sink_hi // block_size))) |
                       set(range(recent_lo // block_size, nb)))
        self.cache = torch.randn(B * len(pages) + 1, 2, H, block_size, D, device=device,
                                 generator=g).to(dtype)
        table = torch.zeros(B, nb, dtype=torch.int32)
        table[:, pages] = torch.arange(1, B * len(pages) + 1, dtype=torch.int32).view(B, -1)
        self.block_table = table.to(device)
        self.slot_mapping = (self.block_table[:, start // block_size].long() * block_size
                             + start % block_size)
        self.query = torch.randn(B, Hq, D, device=device, generator=g).to(dtype)
        self.key = torch.randn(B, H, D, device=device, generator=g).to(dtype)
        self.value = torch.randn(B, H, D, device=device, generator=g).to(dtype)
        self.qsl = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        self.out = torch.empty_like(self.query)
        es = dtype.itemsize
        self.bytes = {"stream": B * H * (sink_hi + start - recent_lo) * 2 * D * es,
                      "qkvo": (2 * B * Hq * D + 4 * B * H * D) * es}
        self.bytes["total"] = sum(self.bytes.values())

    def args(self, n=None):
        n = self.B if n is None else n
        return (self.query[:n], self.key[:n], self.value[:n], self.cache, self.block_table[:n],
                self.slot_mapping[:n], self.qsl[:n + 1], self.seq_lens[:n], self.sink,
                self.recent, self.scale, 1)

    def run(self):
        return stream_attention(*self.args(), self.out)

    def check(self, n, tol):
        """max |err| of the first ``n`` requests' output against the reference
        (on copies of the pages: both store)."""
        out = torch.empty_like(self.query[:n])
        args = list(self.args(n))
        args[3] = self.cache.clone()
        stream_attention(*args, out)
        ref = torch.empty_like(out)
        args[3] = self.cache.clone()
        stream_attention_reference(*args, ref)
        return (out.float() - ref.float()).abs().max().item()


def quest_launch_sweep(p, quest, timer) -> dict:
    """µs of Quest's scoring at each launch choice (pages a program, one query
    head at a time or all, warps) and of its top-k at each warp count; every
    choice's scores are checked against the default launch's first."""
    base = p.quest_scores(quest)
    score = {}
    for block_p in (4, 8, 16, 32):
        for split_heads in (False, True):
            for warps in (2, 4, 8):
                kw = dict(block_p=block_p, split_heads=split_heads, num_warps=warps)
                got = p.quest_scores(quest, **kw)
                torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-4)
                score[f"p{block_p}-{'split' if split_heads else 'all'}-w{warps}"] = timer(
                    lambda: p.quest_scores(quest, **kw))
    top = {f"w{w}": timer(lambda: p.quest_top_at(quest, base, w)) for w in (1, 2, 4, 8)}
    best = min(score, key=score.get)
    print(f"quest launches: scoring best {best} {score[best]:.1f} us of "
          f"{', '.join(f'{k} {v:.1f}' for k, v in sorted(score.items(), key=lambda x: x[1]))}; "
          f"top-k {', '.join(f'{k} {v:.1f}' for k, v in top.items())} us")
    return {"score_us": score, "top_us": top}


def cache_gib(cfg, B, ctx, H, D, block_size, es=2) -> float:
    layout = PageLayout(cfg, block_size, D, es)
    return B * ctx * H * layout.head_page_bytes / block_size / GiB


# ---------------------------------------------------------------- baselines
#
# Each baseline builds its cache in the layout and dtype vLLM 0.26 allocates
# for that ``kv_cache_dtype`` (the backend's ``get_kv_cache_shape`` and
# ``get_kv_cache_stride_order``, as the model runner does), fills it (the
# quantized formats through upstream's own store op, i.e. the backend's
# ``do_kv_cache_update``) and times the decode call the backend issues for a
# batch of single-token decodes under full CUDA graphs. Only the attention
# call is timed: the store of the step's new token is a separate op upstream.

VLLM_BLOCK_SIZE = 16  # vLLM's default block size (CacheConfig.DEFAULT_BLOCK_SIZE)


def _upstream_triton_ready():
    """vLLM hands ``triton`` / ``tl`` placeholders to its kernel modules when
    it finds no GPU driver (``vllm.triton_utils``), so on a CPU box its
    ``@triton.jit`` kernels are plain functions. Under ``TRITON_INTERPRET=1``
    point it at the real triton and drop the upstream modules that were
    already imported with the placeholders (and those that imported names
    from them), so that the kernels run in the interpreter. No-op on a GPU."""
    import vllm.triton_utils as vtu

    if vtu.HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    from vllm.triton_utils import importing

    fake = (importing.TritonPlaceholder, importing.TritonLanguagePlaceholder)
    vtu.triton, vtu.tl, vtu.tldevice = triton, tl, tldevice
    vtu.HAS_TRITON = importing.HAS_TRITON = True
    mods = {n: getattr(m, "__dict__", {}) for n, m in list(sys.modules.items())
            if n.startswith("vllm.") and not n.startswith("vllm.triton_utils")}
    stale = {n for n, d in mods.items() if any(isinstance(v, fake) for v in d.values())}
    grew = True
    while grew:
        more = {n for n, d in mods.items() if n not in stale and any(
            getattr(v, "__module__", None) in stale for v in d.values() if callable(v))}
        stale |= more
        grew = bool(more)
    for n in stale:
        sys.modules.pop(n, None)


_VLLM_CONFIG = None


def _vllm_config():
    """A default ``VllmConfig`` (what a serving process would hold for these
    knobs: full-cudagraph decode, NHD cache layout, split counts)."""
    global _VLLM_CONFIG
    if _VLLM_CONFIG is None:
        from vllm.config import VllmConfig

        _VLLM_CONFIG = VllmConfig()
    return _VLLM_CONFIG


def _vllm_kv_cache(backend, num_blocks, block_size, H, D, cache_dtype_str, dtype, device):
    """The layer's KV cache as vLLM's model runner shapes it: logical
    ``get_kv_cache_shape`` over physical ``get_kv_cache_stride_order`` (NHD for
    FlashAttention / Triton; TurboQuant has none, so identity). Returns the
    logical view the backend receives and the physical (contiguous) tensor."""
    from vllm.config import set_current_vllm_config

    shape = backend.get_kv_cache_shape(num_blocks, block_size, H, D,
                                       cache_dtype_str=cache_dtype_str)
    try:
        with set_current_vllm_config(_vllm_config()):
            order = tuple(backend.get_kv_cache_stride_order())
    except (AttributeError, NotImplementedError):
        order = tuple(range(len(shape)))
    phys = torch.zeros([shape[i] for i in order], dtype=dtype, device=device)
    return phys.permute([order.index(i) for i in range(len(order))]), phys


def _cudagraph_seq_threshold(H):
    """TritonAttentionMetadataBuilder's 2D/3D switch under full CUDA graphs:
    the default capture size closest to ``128 // H`` (16 for H = 8)."""
    from vllm.v1.attention.backends.triton_attn import MIN_LAUNCH_GRID_SIZE_2D

    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
    thr = MIN_LAUNCH_GRID_SIZE_2D // H
    return min(sizes, key=lambda x: abs(x - thr))


def attention_reference(q, ks, vs, scale):
    """fp32 attention of each request's query heads (``q``: [B, Hq, D]) over
    its own K/V (``ks[b]``, ``vs[b]``: [L_b, H, D]), GQA head h -> h // (Hq/H)."""
    out = []
    for b in range(q.shape[0]):
        k, v = ks[b].float(), vs[b].float()
        H, D = k.shape[1], k.shape[2]
        qb = q[b].float().view(H, -1, D)
        p = (torch.einsum("hgd,thd->hgt", qb, k) * scale).softmax(-1)
        out.append(torch.einsum("hgt,thd->hgd", p, v).reshape(-1, D))
    return torch.stack(out)


class _Decode:
    """One baseline at one shape: requests of lengths ``lens`` (each a single
    decode token whose K/V are already in the cache), shuffled block table.
    ``run()`` is the timed call; ``bytes`` what it must move (KV of every
    token incl. scales, query, output); with ``keep_kv`` the random K/V are
    kept (``self.kv``) for the check."""

    kv_cache_dtype = "auto"
    call = ""

    def __init__(self, B, lens, Hq, H, D, dtype, device, block_size=VLLM_BLOCK_SIZE,
                 seed=0, keep_kv=False):
        self.B, self.lens, self.Hq, self.H, self.D = B, list(lens), Hq, H, D
        self.dtype, self.device, self.bs = dtype, device, block_size
        self.scale = D ** -0.5
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.keep_kv, self.kv = keep_kv, []
        nblk = [-(-n // block_size) for n in self.lens]
        self.num_blocks = sum(nblk)
        perm = torch.randperm(self.num_blocks, device=device, generator=self.g).to(torch.int32)
        self.block_table = torch.zeros(B, max(nblk), dtype=torch.int32, device=device)
        for b, off in enumerate([0] + list(itertools.accumulate(nblk))[:-1]):
            self.block_table[b, :nblk[b]] = perm[off: off + nblk[b]]
        self.seq_lens = torch.tensor(self.lens, dtype=torch.int32, device=device)
        self.cu_q = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.query = self._randn(B, Hq, D)
        self.key_new, self.value_new = self._randn(B, H, D), self._randn(B, H, D)
        self.out = torch.empty(B, Hq, D, dtype=dtype, device=device)
        self.build()
        es = dtype.itemsize
        self.bytes_per_token_head = self.token_head_bytes()
        self.bytes = {"kv": sum(self.lens) * H * self.bytes_per_token_head,
                      "qo": B * Hq * D * (self.query_bytes() + es)}
        self.bytes["total"] = self.bytes["kv"] + self.bytes["qo"]

    def _randn(self, *shape):
        return torch.randn(*shape, device=self.device, generator=self.g).to(self.dtype)

    def slots(self, b, t):
        return (self.block_table[b, t // self.bs].long() * self.bs + t % self.bs)

    def fill_through_impl(self, backend):
        """Allocate ``backend``'s uint8 KV cache and fill it with upstream's
        own store (``self.impl.do_kv_cache_update``)."""
        self.layer = types.SimpleNamespace()
        self.kv_cache, _ = _vllm_kv_cache(backend, self.num_blocks, self.bs, self.H, self.D,
                                          self.kv_cache_dtype, torch.uint8, self.device)
        self.fill_by_store(lambda k, v, slots: self.impl.do_kv_cache_update(
            self.layer, k, v, self.kv_cache, slots))

    def fill_by_store(self, store, chunk=1 << 16):
        """Random K/V through ``store(k, v, slot_mapping)`` in prefill-sized chunks."""
        for b, n in enumerate(self.lens):
            ks, vs = [], []
            for t0 in range(0, n, chunk):
                t = torch.arange(t0, min(n, t0 + chunk), device=self.device)
                k, v = self._randn(len(t), self.H, self.D), self._randn(len(t), self.H, self.D)
                store(k, v, self.slots(b, t))
                if self.keep_kv:
                    ks.append(k)
                    vs.append(v)
            if self.keep_kv:
                self.kv.append((torch.cat(ks), torch.cat(vs)))

    def gather(self, paged, b):
        """Request ``b``'s tokens of a ``[num_blocks, block_size, H, X]`` view."""
        t = torch.arange(self.lens[b], device=self.device)
        return paged[self.block_table[b, t // self.bs].long(), t % self.bs]

    def query_bytes(self):
        return self.dtype.itemsize

    def build(self):
        raise NotImplementedError

    def token_head_bytes(self):
        raise NotImplementedError

    def run(self):
        raise NotImplementedError

    def dequantized(self):
        """(query, [K_b], [V_b]) as the kernel sees them, in fp32."""
        raise NotImplementedError


class SdpaDecode(_Decode):
    """torch SDPA over a contiguous bf16 cache [B, H, L, D] (GQA), all
    requests at one length."""

    call = "torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)"

    def build(self):
        assert len(set(self.lens)) == 1, "SDPA baseline: one length for all requests"
        self.k = self._randn(self.B, self.H, self.lens[0], self.D)
        self.v = self._randn(self.B, self.H, self.lens[0], self.D)
        self.q4 = self.query.unsqueeze(2)

    def token_head_bytes(self):
        return 2 * self.D * self.dtype.itemsize

    def run(self):
        return torch.nn.functional.scaled_dot_product_attention(
            self.q4, self.k, self.v, enable_gqa=True).squeeze(2)

    def dequantized(self):
        return (self.query.float(), [k.transpose(0, 1) for k in self.k],
                [v.transpose(0, 1) for v in self.v])


class FA3Decode(_Decode):
    """vLLM's FlashAttention backend on Hopper: ``flash_attn_varlen_func``
    (``fa_version=3``) over the paged cache [num_blocks, H, 16, 2*D] (NHD),
    AOT ``scheduler_metadata`` and ``num_splits`` = the full-cudagraph cap
    (``flash_attn_max_num_splits_for_cuda_graph``), unit descales as the
    backend passes them. ``fp8``: kv_cache_dtype=fp8, an fp8_e4m3 cache and
    query (static per-tensor scales, 1.0 by default)."""

    fp8 = False

    def build(self):
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
        from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

        self.kv_cache_dtype = "fp8" if self.fp8 else "auto"
        store_dtype = torch.uint8 if self.fp8 else self.dtype
        self.kv_cache, phys = _vllm_kv_cache(FlashAttentionBackend, self.num_blocks, self.bs,
                                             self.H, self.D, self.kv_cache_dtype, store_dtype,
                                             self.device)
        step = max(1, (1 << 28) // phys[0].numel())
        for i in range(0, phys.shape[0], step):  # random K/V (scale 1.0: cache = fp8(k))
            x = torch.randn(phys[i: i + step].shape, device=self.device, generator=self.g)
            phys[i: i + step] = (x.to(current_platform.fp8_dtype()).view(torch.uint8)
                                 if self.fp8 else x.to(self.dtype))
        key_cache, value_cache = self.kv_cache.transpose(1, 2).split(self.D, dim=-1)
        self.q_in = self.query
        qkv_dtype = self.dtype
        if self.fp8:
            qkv_dtype = current_platform.fp8_dtype()
            key_cache, value_cache = key_cache.view(qkv_dtype), value_cache.view(qkv_dtype)
            self.q_in = self.query.to(qkv_dtype)  # the layer's static query quant, scale 1
        self.key_cache, self.value_cache = key_cache, value_cache
        splits = _vllm_config().attention_config.flash_attn_max_num_splits_for_cuda_graph
        sched = get_scheduler_metadata(
            batch_size=self.B, max_seqlen_q=1, max_seqlen_k=max(self.lens),
            num_heads_q=self.Hq, num_heads_kv=self.H, headdim=self.D,
            cache_seqlens=self.seq_lens, qkv_dtype=qkv_dtype, cu_seqlens_q=self.cu_q,
            page_size=self.bs, causal=True, window_size=(-1, -1), num_splits=splits)
        one = torch.ones((), dtype=torch.float32, device=self.device).expand(self.B, self.H)
        self.kwargs = dict(
            q=self.q_in, k=key_cache, v=value_cache, out=self.out, cu_seqlens_q=self.cu_q,
            max_seqlen_q=1, seqused_k=self.seq_lens, max_seqlen_k=max(self.lens),
            softmax_scale=self.scale, causal=True, alibi_slopes=None, window_size=[-1, -1],
            block_table=self.block_table, softcap=0, scheduler_metadata=sched, fa_version=3,
            q_descale=one, k_descale=one, v_descale=one, num_splits=splits, s_aux=None)
        self.fn = flash_attn_varlen_func
        self.call = (f"vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3, "
                     f"num_splits={splits}, scheduler_metadata, block_size={self.bs})")

    def token_head_bytes(self):
        return self.kv_cache.shape[-1] * self.kv_cache.element_size()

    def query_bytes(self):
        return self.q_in.element_size()

    def run(self):
        return self.fn(**self.kwargs)

    def dequantized(self):  # fp8: descales are 1.0; gathered as bytes (no fp8 indexing)
        def read(cache, b):
            if not self.fp8:
                return self.gather(cache, b).float()
            return self.gather(cache.view(torch.uint8), b).view(cache.dtype).float()

        return (self.q_in.float(), [read(self.key_cache, b) for b in range(self.B)],
                [read(self.value_cache, b) for b in range(self.B)])


class FA3Fp8Decode(FA3Decode):
    fp8 = True


class Int4Decode(_Decode):
    """vLLM's TritonAttention backend, kv_cache_dtype=int4_per_token_head:
    ``TritonAttentionImpl.do_kv_cache_update`` (RHT + asymmetric int4, the
    zero-point in the fp32 scale's low mantissa bits, scale inline after each
    head's codes) and ``TritonAttentionImpl.forward`` (``unified_attention``
    -> ``unified_attention_int4``: RHT of q, packed kernel, 3D split-softmax
    below the cudagraph threshold, inverse RHT of the output)."""

    kv_cache_dtype = "int4_per_token_head"

    def build(self):
        _upstream_triton_ready()
        from vllm.v1.attention.backends.triton_attn import (
            NUM_PAR_SOFTMAX_SEGMENTS,
            TritonAttentionBackend,
            TritonAttentionImpl,
            TritonAttentionMetadata,
        )

        self.impl = TritonAttentionImpl(self.Hq, self.D, self.scale, self.H, None, None,
                                        self.kv_cache_dtype)
        self.fill_through_impl(TritonAttentionBackend)
        thr, seg = _cudagraph_seq_threshold(self.H), NUM_PAR_SOFTMAX_SEGMENTS
        dp = triton.next_power_of_2(self.D)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.meta = TritonAttentionMetadata(
            num_actual_tokens=self.B, max_query_len=1, query_start_loc=self.cu_q,
            max_seq_len=max(self.lens), seq_lens=self.seq_lens, block_table=self.block_table,
            slot_mapping=self.slots(torch.arange(self.B, device=self.device),
                                    self.seq_lens.long() - 1),
            seq_threshold_3D=thr, num_par_softmax_segments=seg,
            softmax_segm_output=torch.empty(thr, self.Hq, seg, dp, **f32),
            softmax_segm_max=torch.empty(thr, self.Hq, seg, **f32),
            softmax_segm_expsum=torch.empty(thr, self.Hq, seg, **f32),
            causal=True, use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
            prefix_kv_lens=None, suffix_kv_lens=None)
        self.call = (f"TritonAttentionImpl.forward -> unified_attention(kv_quant_mode="
                     f"INT4_PER_TOKEN_HEAD, seq_threshold_3D={thr}, block_size={self.bs})")

    def token_head_bytes(self):  # K codes D/2 + fp32 scale, the same for V
        return self.kv_cache.shape[-1] * self.kv_cache.element_size()

    def run(self):
        return self.impl.forward(self.layer, self.query, self.key_new, self.value_new,
                                 self.kv_cache, self.meta, self.out)

    def dequantized(self):
        from vllm.v1.attention.ops.int4_per_token_head import _get_rht_signs

        key_cache, value_cache = self.impl._pth_key_value_caches(self.kv_cache)
        D = self.D
        hadamard = torch.ones(1, 1, device=self.device)
        while hadamard.shape[0] < D:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1),
                                  torch.cat([hadamard, -hadamard], 1)])
        signs = _get_rht_signs(D, 0, self.device)

        def dequant(codes, scales):
            x = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2).float()
            bits = scales.contiguous().view(torch.int32)
            zp, s = (bits & 0xF).float(), (bits & -16).view(torch.float32)
            x_rot = (x - zp[..., None]) * s[..., None]  # the RHT-rotated vector
            return (x_rot @ hadamard) * signs / D  # H D1 x = y  =>  x = D1 H y / D

        ks, vs = [], []
        for b in range(self.B):
            ks.append(dequant(self.gather(key_cache, b)[..., : D // 2],
                              self.gather(self.impl._k_scale_cache, b)))
            vs.append(dequant(self.gather(value_cache, b)[..., : D // 2],
                              self.gather(self.impl._v_scale_cache, b)))
        return self.query.float(), ks, vs


class TurboQuantDecode(_Decode):
    """vLLM's TurboQuant backend: ``TurboQuantAttentionImpl.do_kv_cache_update``
    (``triton_turboquant_store``: Hadamard-rotated, Lloyd-Max coded keys + fp16
    norm, 4-bit uniform values + fp16 scale/zero, one slot per token and head
    in a [num_blocks, H, 16, slot] uint8 cache) and ``forward`` on a pure
    decode batch (``triton_turboquant_decode_attention``: q @ Pi^T, split-KV
    stage 1 with NUM_KV_SPLITS = ``tq_max_kv_splits_for_cuda_graph``, stage 2),
    scratch from vLLM's workspace manager as in serving."""

    def build(self):
        _upstream_triton_ready()
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backends.turboquant_attn import (
            TurboQuantAttentionBackend,
            TurboQuantAttentionImpl,
            TurboQuantMetadata,
        )
        from vllm.v1.worker.workspace import (
            init_workspace_manager,
            is_workspace_manager_initialized,
        )

        if not is_workspace_manager_initialized():
            init_workspace_manager(torch.device(self.device))
        with set_current_vllm_config(_vllm_config()):
            self.impl = TurboQuantAttentionImpl(self.Hq, self.D, self.scale, self.H, None,
                                                None, self.kv_cache_dtype)
        self.fill_through_impl(TurboQuantAttentionBackend)
        self.meta = TurboQuantMetadata(
            seq_lens=self.seq_lens,
            slot_mapping=self.slots(torch.arange(self.B, device=self.device),
                                    self.seq_lens.long() - 1),
            block_table=self.block_table, query_start_loc=self.cu_q,
            num_actual_tokens=self.B, max_query_len=1, max_seq_len=max(self.lens),
            is_prefill=False, num_decodes=self.B, num_decode_tokens=self.B)
        self.call = (f"TurboQuantAttentionImpl.forward -> triton_turboquant_decode_attention("
                     f"max_num_kv_splits={self.impl.max_num_kv_splits}, block_size={self.bs})")

    def token_head_bytes(self):  # key codes + fp16 norm, value codes + fp16 scale, zero
        return self.kv_cache.shape[-1] * self.kv_cache.element_size()

    def run(self):
        return self.impl.forward(self.layer, self.query, self.key_new, self.value_new,
                                 self.kv_cache, self.meta, self.out)

    def dequantized(self):
        cfg, D, dev = self.impl.tq_config, self.D, self.device
        assert not cfg.key_fp8 and cfg.value_quant_bits == 4, cfg
        slots = self.kv_cache.transpose(1, 2)  # [num_blocks, block_size, H, slot]
        mse_bytes, kps = -(-D * cfg.key_mse_bits // 8), cfg.key_packed_size
        bit = torch.arange(D, device=dev) * cfg.key_mse_bits
        lo_byte, hi_byte = bit // 8, torch.clamp(bit // 8 + 1, max=mse_bytes - 1)

        def fp16_at(x, off):
            return x[..., off: off + 2].contiguous().view(torch.float16)[..., 0].float()

        ks, vs = [], []
        for b in range(self.B):
            s = self.gather(slots, b).long()
            stream = s[..., lo_byte] | (s[..., hi_byte] << 8)  # little-endian bit stream
            idx = (stream >> (bit % 8)) & ((1 << cfg.key_mse_bits) - 1)
            c = self.layer._tq_centroids[idx]
            if cfg.norm_correction:
                c = c / c.norm(dim=-1, keepdim=True)
            ks.append(fp16_at(s.to(torch.uint8), mse_bytes)[..., None]
                      * (c @ self.layer._tq_Pi))  # y = x^ Pi^T  =>  x^ = y Pi
            codes = s[..., kps: kps + D // 2]
            v = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2).float()
            u8 = s.to(torch.uint8)
            vs.append(v * fp16_at(u8, kps + D // 2)[..., None]
                      + fp16_at(u8, kps + D // 2 + 2)[..., None])
        return self.query.float(), ks, vs


class TQk3v4Decode(TurboQuantDecode):
    kv_cache_dtype = "turboquant_k3v4_nc"


class TQ4bitDecode(TurboQuantDecode):
    kv_cache_dtype = "turboquant_4bit_nc"


# name -> (class, label in the table)
BASELINES = {
    "sdpa": (SdpaDecode, "torch SDPA bf16"),
    "fa3_bf16": (FA3Decode, "vLLM FA3 bf16"),
    "fa3_fp8": (FA3Fp8Decode, "vLLM FA3 fp8"),
    "int4": (Int4Decode, "vLLM int4_per_token_head"),
    "tq_k3v4": (TQk3v4Decode, "vLLM turboquant_k3v4_nc"),
    "tq_4bit": (TQ4bitDecode, "vLLM turboquant_4bit_nc"),
}
# Max |out - reference| allowed by --check (bf16 output, reference in fp32 over
# the K/V the kernel reads: the dequantized cache; the quantization error
# itself, vs the K/V before the store, is ~0.1 at the check shapes). int4
# rounds its rotated query and rotated output to bf16 on the way; FA3 fp8
# rounds the softmax probabilities to e4m3 for the PV product.
CHECK_TOL = {"sdpa": 1e-2, "fa3_bf16": 1e-2, "fa3_fp8": 8e-2, "int4": 2e-2,
             "tq_k3v4": 1e-2, "tq_4bit": 1e-2}


def _failed(e):
    msg = f"failed: {type(e).__name__}: {e}"
    return msg.replace("\n", " ").replace("|", "/")[:160]  # one markdown table cell


def check_baselines(names, device, dtype=torch.bfloat16, Hq=4, H=2, D=128, lens=(40, 70),
                    block_size=VLLM_BLOCK_SIZE, tamper=None):
    """Each baseline's output against ``attention_reference`` over the K/V it
    reads (its dequantized cache), and for information against the K/V before
    quantization. ``tamper(baseline)`` runs between fill and call (tests use
    it to make sure a wrong call fails). Returns one dict per baseline."""
    res = []
    for name in names:
        r = dict(baseline=name, tol=CHECK_TOL[name])
        res.append(r)
        if name.startswith("fa3") and device != "cuda":
            r.update(ok=None, skipped="FlashAttention 3 needs a CUDA device")
            continue
        if name == "sdpa" and len(set(lens)) > 1:
            lens_b = [max(lens)] * len(lens)
        else:
            lens_b = list(lens)
        try:
            bl = BASELINES[name][0](len(lens_b), lens_b, Hq, H, D, dtype, device, block_size,
                                    keep_kv=True)
            if tamper is not None:
                tamper(bl)
            out = bl.run().float()
            q, ks, vs = bl.dequantized()
            ref = attention_reference(q, ks, vs, bl.scale)
            r["max_err"] = (out - ref).abs().max().item()
            r["ref_max"] = ref.abs().max().item()
            if bl.kv:
                raw = attention_reference(bl.query.float(), *zip(*bl.kv), bl.scale)
                r["max_err_unquantized"] = (out - raw).abs().max().item()
            r["ok"] = bool(torch.isfinite(out).all()) and r["max_err"] <= r["tol"]
        except Exception as e:  # noqa: BLE001 - record and go on
            r["failed"] = _failed(e)
            r["ok"] = False
    return res


def print_check(res):
    print("| baseline | max abs err vs dequantized-cache ref | tol | max abs err vs "
          "unquantized K/V | max abs ref | ok |")
    print("|---|---|---|---|---|---|")
    for r in res:
        if "skipped" in r or "failed" in r:
            print(f"| {r['baseline']} | {r.get('skipped') or r['failed']} | | | | "
                  f"{'-' if 'skipped' in r else 'NO'} |")
            continue
        unq = r.get("max_err_unquantized")
        print(f"| {r['baseline']} | {r['max_err']:.2e} | {r['tol']:.0e} | "
              f"{'-' if unq is None else f'{unq:.2e}'} | {r['ref_max']:.3f} | "
              f"{'ok' if r['ok'] else 'NO'} |")


def bench_baseline(name, B, ctx, Hq, H, D, dtype, device, block_size, timer, copy_gbs):
    """One baseline at batch B x context ctx; ``us`` is a float or ``failed: ...``."""
    cls, label = BASELINES[name]
    rec = dict(baseline=name, label=label, batch=B, context=ctx, block_size=block_size)
    bl = None
    try:
        bl = cls(B, [ctx] * B, Hq, H, D, dtype, device, block_size)
        rec.update(kv_cache_dtype=bl.kv_cache_dtype, call=bl.call,
                   bytes_per_token_head=bl.bytes_per_token_head, bytes=bl.bytes)
        out = bl.run()
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("non-finite output")
        us = timer(bl.run)
        gbs = bl.bytes["total"] / (us * 1e-6) / 1e9
        rec.update(us=us, GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs)
    except Exception as e:  # noqa: BLE001 - a broken baseline must not cost our rows
        rec["us"] = _failed(e)
    del bl
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


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
    ap.add_argument("--check", action="store_true",
                    help="only check the baselines' outputs against an fp32 reference on the "
                         "K/V they read (GPU: Llama shape; CPU: tiny shape, interpreter)")
    ap.add_argument("--configs", default="k4v4,k2v2,k16v16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="1024,4096,16384,32768,65536,131072")
    ap.add_argument("--max-cache-gib", type=float, default=40.0)
    ap.add_argument("--num-splits", type=int, default=None, help="override the heuristic")
    ap.add_argument("--quest-budgets", default="", metavar="LIST",
                    help="also time Quest's decode at these token budgets (per-channel "
                         "key configs)")
    ap.add_argument("--quest-splits", default="", metavar="LIST",
                    help="with --quest-budgets: also time Quest's attention at each of these "
                         "split counts (default: its rule's only)")
    ap.add_argument("--quest-launches", action="store_true",
                    help="with --quest-budgets: also time the scoring launch at each tile "
                         "(pages a program), query-head loop and warp count, and the top-k "
                         "at each warp count (row key quest_launches)")
    ap.add_argument("--head-split", default="", metavar="LIST",
                    help="also time a split layer's decode with these shares of the KV heads "
                         "streaming")
    ap.add_argument("--sink-tokens", type=int, default=64, help="with --head-split")
    ap.add_argument("--recent-tokens", type=int, default=256, help="with --head-split")
    ap.add_argument("--eviction", default="", metavar="LIST",
                    help=f"also time an H2O / A2SF layer's decode step and eviction step "
                         f"(methods of {', '.join(SCORED_EVICTION)}) per config")
    ap.add_argument("--eviction-budget", type=int, default=2048,
                    help="with --eviction: tokens each KV head keeps (budget_tokens)")
    ap.add_argument("--eviction-rows", action="store_true",
                    help="with --eviction: the host work once a step for the requests it "
                         "concerns, candidates made on the device (KVCOMP_EVICTION_ROWS)")
    ap.add_argument("--num-layers", type=int, default=32,
                    help="with --eviction: attention layers a decode step runs (Llama-3.1-8B's "
                         "32), for the per-step figures")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=None, help="default: the kernel's")
    ap.add_argument("--num-stages", type=int, default=None, help="default: the kernel's")
    ap.add_argument("--warp-tiles", type=int, default=None,
                    help="kvcomp_decode_attention's warp_tiles (1: one tile shared by all "
                         "warps; default: the kernel's)")
    ap.add_argument("--max-registers", type=int, default=0, help="register cap (maxnreg); 0: none")
    ap.add_argument("--key-fold", default=None, choices=("split", "fp16", "bf16"),
                    help="bf16 per-channel key fold of the decode kernel (default: its default)")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help=f"comma list of {', '.join(BASELINES)} (default: all)")
    ap.add_argument("--baseline-block-size", type=int, default=VLLM_BLOCK_SIZE,
                    help="vLLM block size of the baselines' paged caches")
    ap.add_argument("--no-baselines", action="store_true", help="same as --baselines ''")
    ap.add_argument("--sweep", action="store_true",
                    help="tuning grid (block_n x num_warps x num_stages x splits) at the "
                         "first batch / context of the lists, per config")
    ap.add_argument("--sweep-splits", default=None, metavar="LIST",
                    help="with --sweep: only the split count, over this list (e.g. 1,2,3,4,6,8), "
                         "at the default tile; shows wave quantization of the split grid")
    ap.add_argument("--sweep-block-n", default="64,128", metavar="LIST", help="with --sweep")
    ap.add_argument("--sweep-warps", default="2,4,8", metavar="LIST", help="with --sweep")
    ap.add_argument("--sweep-stages", default="2,3,4,5", metavar="LIST", help="with --sweep")
    ap.add_argument("--sweep-warp-tiles", default="1", metavar="LIST",
                    help="with --sweep: warp tiles per tile (kvcomp_decode_attention's "
                         "warp_tiles; 1 = one tile shared by all warps)")
    ap.add_argument("--sweep-max-registers", default="", metavar="LIST",
                    help="with --sweep: also each of these register caps for warp tiles > 1")
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph",
                    help="graph: CUDA-graph replays (default); eager: do_bench, L2 flushed")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=40)
    a = ap.parse_args(argv)
    names = [] if a.no_baselines else [n for n in a.baselines.split(",") if n]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        ap.error(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    methods = [m for m in a.eviction.split(",") if m]
    if set(methods) - set(SCORED_EVICTION):
        ap.error(f"--eviction {a.eviction}: choose from {', '.join(SCORED_EVICTION)}")

    if a.check:
        cuda = torch.cuda.is_available()
        shape = dict(Hq=32, H=8, D=128, lens=(1000, 4113, 37)) if cuda else \
            dict(Hq=4, H=2, D=128, lens=(40, 70))
        res = check_baselines(names, "cuda" if cuda else "cpu",
                              block_size=a.baseline_block_size, **shape)
        print(f"# baseline check on {torch.cuda.get_device_name() if cuda else 'cpu'}"
              f" (bf16, {shape}, block {a.baseline_block_size})\n")
        print_check(res)
        if a.out:
            Path(a.out).write_text(json.dumps({"check": res, "shape": shape}, indent=1,
                                              default=str))
        bad = [r["baseline"] for r in res if not r["ok"] and "skipped" not in r]
        if bad:
            sys.exit(f"check failed: {bad}")
        return res

    if a.smoke:
        device, dtype = "cpu", torch.float32
        Hq, H, D, bs, G, R = 4, 2, 64, 32, 32, 16
        batches, contexts = [2], [150]
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA device (or --smoke / --check for a CPU check)")
        device, dtype = "cuda", torch.bfloat16
        Hq, H, D, bs, G, R = 32, 8, 128, 128, 128, 128
        batches = [int(x) for x in a.batches.split(",")]
        contexts = [int(x) for x in a.contexts.split(",")]
    timer = make_timer(device, a.warmup_ms, a.rep_ms, a.timing)
    kw = dict(block_n=a.block_n, num_warps=a.num_warps, num_stages=a.num_stages,
              key_fold=a.key_fold, **_wt(a.warp_tiles, a.max_registers))

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

    def save():
        if a.out:
            Path(a.out).write_text(json.dumps(
                {"info": info, "rows": rows, "baselines": base_rows}, indent=1, default=str))

    # Our kernel first: a baseline that breaks (even the CUDA context) must
    # not cost these rows. The JSON is written when they are done and again
    # after every baseline.
    rows, base_rows = [], []
    t_start = time.time()
    for B in batches:
        for ctx in contexts:
            for name in [n for n in a.configs.split(",") if n]:  # '': baselines only
                cfg = KvcompConfig(**{"group_size": G, "residual_tokens": R, "block_size": bs,
                                      **CONFIGS[name]})
                if cache_gib(cfg, B, ctx, H, D, bs) > a.max_cache_gib:
                    continue
                p = Problem(cfg, B, ctx, Hq, H, D, bs, dtype, device)
                sms = (torch.cuda.get_device_properties(0).multi_processor_count
                       if device == "cuda" else 132)
                splits = a.num_splits or decode_num_splits(
                    B, H, ctx, cfg, _tile(p.layout, a.block_n, a.warp_tiles), num_sms=sms)
                out = p.run(a.num_splits, **kw).clone()
                if a.smoke:
                    ref = decode_attention_reference(*p.args())
                    err = (out - ref).abs().max().item()
                    assert err < 2e-3, f"{name}: max |err| {err}"
                else:
                    assert torch.isfinite(out).all(), f"{name}: non-finite output"
                us = timer(lambda: p.run(a.num_splits, **kw))
                gbs = p.bytes["total"] / (us * 1e-6) / 1e9
                rows.append(dict(config=name, batch=B, context=ctx, num_splits=splits,
                                 us=us, bytes=p.bytes, GBps=gbs,
                                 pct_copy_bw=100 * gbs / copy_gbs,
                                 cache_GiB=cache_gib(cfg, B, ctx, H, D, bs)))
                for budget in _ints(a.quest_budgets):
                    if cfg.k_bits == 16 or cfg.key_axis != "channel":
                        continue
                    quest = Quest(budget, bs)
                    # Quest runs the kernel's default launch, whatever --block-n says
                    qsplits = quest_num_splits(B, H, quest, cfg,
                                               _tile(p.layout, DEFAULT_LAUNCH["block_n"], None),
                                               num_sms=sms)
                    # the reference walks requests in Python: two of them on a GPU;
                    # bf16 outputs there (one rounding of values of magnitude ~1)
                    n, tol = (B, 2e-3) if a.smoke else (2, 3e-2)
                    args = [x[:n] if torch.is_tensor(x) and x.shape[0] == B else x
                            for x in p.args()]
                    try:
                        ref = quest_decode_reference(*args, quest).float()
                    except Exception as e:  # the timing still counts; the JSON says why
                        ref = f"failed: {type(e).__name__}: {e}"
                    qb = p.quest_bytes(quest)
                    sel = p.quest_select(quest)
                    for s in [None] + _ints(a.quest_splits):
                        label = f"{name}+quest{budget}" + (f"-s{s}" if s else "")
                        out = p.run_quest(quest, s)
                        err = ref if isinstance(ref, str) else \
                            (out[:n].float() - ref).abs().max().item()
                        if a.smoke:
                            assert isinstance(err, float) and err < tol, f"{label}: |err| {err}"
                        elif not (isinstance(err, float) and err < tol):
                            print(f"WARNING {label}: reference check {err}")
                        assert torch.isfinite(out).all(), f"{label}: non-finite output"
                        qus = timer(lambda: p.run_quest(quest, s))
                        gbs = qb["total"] / (qus * 1e-6) / 1e9
                        row = dict(config=label, batch=B, context=ctx, num_splits=s or qsplits,
                                   heuristic_splits=qsplits, us=qus, bytes=qb, GBps=gbs,
                                   pct_copy_bw=100 * gbs / copy_gbs,
                                   cache_GiB=cache_gib(cfg, B, ctx, H, D, bs),
                                   dense_us=us, speedup_vs_dense=us / qus,
                                   quest_attention_us=timer(
                                       lambda: p.quest_attention(quest, sel, s)),
                                   ref_max_abs_err=err, ref_tol=tol)
                        if s is None:
                            row["quest_select_us"] = timer(lambda: p.quest_select(quest))
                            row["quest_score_us"] = timer(lambda: p.quest_scores(quest))
                            if a.quest_launches:
                                row["quest_launches"] = quest_launch_sweep(p, quest, timer)
                        rows.append(row)
                for share in (float(x) for x in a.head_split.split(",") if x):
                    rows.append(split_row(a, cfg, name, share, B, ctx, Hq, H, D, bs, dtype,
                                          device, timer, kw, us, copy_gbs))
                for method in methods:
                    try:
                        rows.append(eviction_row(
                            a, {"group_size": G, "residual_tokens": R, "block_size": bs,
                                **CONFIGS[name]}, name, method, B, ctx, Hq, H, D, bs, dtype,
                            device, timer, kw, copy_gbs))
                    except Exception as e:  # noqa: BLE001 - must not cost the other rows
                        if a.smoke:
                            raise
                        info.setdefault("eviction_failed", []).append(dict(
                            config=name, method=method, batch=B, context=ctx, error=_failed(e)))
                        print(f"WARNING {name}+{method} at {B} x {ctx}: {_failed(e)}")
                del p
                if device == "cuda":
                    torch.cuda.empty_cache()
    save()

    if names and (device == "cuda" or a.smoke):  # smoke: the interpreter, bf16 too
        info["baseline_check"] = check_baselines(
            names, device, Hq=Hq, H=H, D=D, block_size=a.baseline_block_size,
            lens=(1000, 4113, 37) if device == "cuda" else (40, 70))
        print("# baselines checked against an fp32 reference on the K/V they read\n")
        print_check(info["baseline_check"])
        print()
        save()
        for B in batches:
            for ctx in contexts:
                if cache_gib(KvcompConfig(k_bits=16, v_bits=16), B, ctx, H, D, bs) > \
                        a.max_cache_gib:
                    continue  # every baseline's cache is at most bf16's
                for name in names:
                    base_rows.append(bench_baseline(name, B, ctx, Hq, H, D, torch.bfloat16,
                                                    device, a.baseline_block_size, timer,
                                                    copy_gbs))
                    save()
    for r in rows:
        for b in base_rows:
            if (b["batch"], b["context"]) == (r["batch"], r["context"]):
                r[f"{b['baseline']}_us"] = b["us"]

    def fmt(v):
        if isinstance(v, str) and v.startswith("failed"):
            return "failed"
        return f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v))

    extra = [n for n in BASELINES if n not in ("fa3_bf16", "sdpa")]
    print("| config | batch | context | splits | us | MB moved | GB/s | % copy BW "
          "| bf16 flash-attn (FA3) us | bf16 SDPA us | speedup vs best bf16 | "
          + " | ".join(f"{BASELINES[n][1].removeprefix('vLLM ')} us" for n in extra) + " |")
    print("|---" * (11 + len(extra)) + "|")
    dash = " | -" * len(extra)
    for B in batches:
        for ctx in contexts:
            for r in rows:
                if (r["batch"], r["context"]) != (B, ctx):
                    continue
                fa, sd = r.get("fa3_bf16_us"), r.get("sdpa_us")
                best = min([x for x in (fa, sd) if isinstance(x, float)], default=None)
                sp = f"{best / r['us']:.2f}x" if best else "-"
                print(f"| {r['config']} | {B} | {ctx} | {r['num_splits']} "
                      f"| {r['us']:.1f} | {r['bytes']['total'] / 1e6:.1f} | {r['GBps']:.0f} "
                      f"| {r['pct_copy_bw']:.1f} | {fmt(fa)} | {fmt(sd)} | {sp} | "
                      + " | ".join(fmt(r.get(f"{n}_us")) for n in extra) + " |")
            for b in base_rows:
                if (b["batch"], b["context"]) != (B, ctx):
                    continue
                if isinstance(b["us"], float):
                    print(f"| {b['label']} | {B} | {ctx} | - | {b['us']:.1f} "
                          f"| {b['bytes']['total'] / 1e6:.1f} | {b['GBps']:.0f} "
                          f"| {b['pct_copy_bw']:.1f} | - | - | -{dash} |")
                else:
                    print(f"| {b['label']} | {B} | {ctx} | - | {b['us']} | - | - | - "
                          f"| - | - | -{dash} |")
    ev_rows = [r for r in rows if "scored_us" in r]
    if ev_rows:
        print_eviction(ev_rows)
    info["wall_s"] = time.time() - t_start
    print(f"\n{len(rows)} rows + {len(base_rows)} baseline rows in {info['wall_s']:.0f} s")
    save()
    return rows


def print_eviction(rows) -> None:
    """The eviction rows' per-layer and per-step figures (``eviction_row``)."""
    def f(r, key):
        return f"{r[key]:.1f}" if key in r else "-"

    L = rows[0]["num_layers"]
    print(f"\n# eviction overhead per decode step (H2O / A2SF; us, eager; x{L} layers)\n")
    print("| config | batch | context | read tokens | plain us | (a) kept us | (b) scored us "
          "| (b-a) us/layer | (b-a) us/step | (b) - plain us/step | (c) evict us, batch "
          "| (c) us/request | (c) amortized us/step | eviction us/step | checks |")
    print("|---" * 15 + "|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['context']} | {r['read_tokens']} "
              f"| {r['plain_us']:.1f} | {r['kept_us']:.1f} | {r['scored_us']:.1f} "
              f"| {r['overhead_us']:.1f} | {r['overhead_step_us']:.1f} | {r['net_step_us']:.1f} "
              f"| {f(r, 'evict_us')} | {f(r, 'evict_request_us')} "
              f"| {f(r, 'evict_amortized_step_us')} | {r['eviction_step_us']:.1f} "
              f"| {'ok' if r['checks_ok'] else 'NO'} |")
    if any("graph_layer_us" in r for r in rows):
        print("\n# the same layers as KVCOMP_EVICTION_GRAPHS captures them (us, CUDA-graph "
              "replays)\n")
        print("| config | (a) kept us | probs width | + probs us | + scores us "
              "| + scores, logits us | layer us (normalised / logits) "
              "| selection, none evicts us (sort / kernel / rows in kernel) "
              "| selection, all evict us (sort / kernel / rows in kernel) |")
        print("|---" * 9 + "|")
        for r in rows:
            if "graph_layer_us" in r:
                print(f"| {r['config']} | {r['graph_kept_us']:.1f} "
                      f"| {r['graph_probs_width']} | {r['graph_probs_us']:.1f} "
                      f"| {r['graph_scores_us']:.1f} | {r['graph_logits_us']:.1f} "
                      f"| {r['graph_layer_us']:.1f} / {r['graph_layer_logits_us']:.1f} "
                      f"| {r['graph_select_idle_us']:.1f} / {r['graph_select_kernel_idle_us']:.1f} "
                      f"/ {r['graph_select_rows_idle_us']:.1f} "
                      f"| {f(r, 'graph_select_all_us')} / {f(r, 'graph_select_kernel_all_us')} "
                      f"/ {f(r, 'graph_select_rows_all_us')} |")


def split_row(a, cfg, name, share, B, ctx, Hq, H, D, bs, dtype, device, timer, kw, dense_us,
              copy_gbs) -> dict:
    """One split layer's decode (``--head-split``): the config's decode kernel
    on the retrieval heads, then the stream kernel on the streaming heads."""
    from vllm_kvcomp.residual_layer import packed_spec
    from vllm_kvcomp.stream_layer import stream_block_size

    rep = Hq // H
    hs = round(H * share)
    hr = H - hs
    assert 0 < hs < H, f"--head-split {share}: {hs} of {H} KV heads stream"
    pr = Problem(cfg, B, ctx, hr * rep, hr, D, bs, dtype, device)
    ps = StreamProblem(B, ctx, hs * rep, hs, D, a.sink_tokens, a.recent_tokens,
                       stream_block_size(packed_spec(cfg, bs, hr, D, dtype), hs), dtype, device)
    # the references walk requests in Python: two of them on a GPU; bf16 outputs there
    n, tol = (B, 2e-3) if a.smoke else (min(B, 2), 3e-2)
    out = pr.run(a.num_splits, **kw)
    args = [x[:n] if torch.is_tensor(x) and x.shape[0] == B else x for x in pr.args()]
    err = max((out[:n].float() - decode_attention_reference(*args).float()).abs().max().item(),
              ps.check(n, tol))
    if a.smoke:
        assert err < tol, f"{name}+split: |err| {err}"
    elif not err < tol:
        print(f"WARNING {name}+split{share}: reference check {err}")
    us = timer(lambda: (pr.run(a.num_splits, **kw), ps.run()))
    stream_us = timer(ps.run)
    b = {"retrieval": pr.bytes["total"], "streaming": ps.bytes["total"]}
    b["total"] = sum(b.values())
    gbs = b["total"] / (us * 1e-6) / 1e9
    splits = a.num_splits or decode_num_splits(
        B, hr, ctx, cfg, _tile(pr.layout, a.block_n, a.warp_tiles),
        num_sms=(torch.cuda.get_device_properties(0).multi_processor_count
                 if device == "cuda" else 132))
    return dict(config=f"{name}+split{round(share * 100)}", batch=B, context=ctx,
                num_splits=splits, us=us, stream_us=stream_us, bytes=b, GBps=gbs,
                pct_copy_bw=100 * gbs / copy_gbs, dense_us=dense_us,
                speedup_vs_dense=dense_us / us, ref_max_abs_err=err, ref_tol=tol,
                sink_tokens=a.sink_tokens, recent_tokens=a.recent_tokens)


def _scored_layout(cfg, policy, n: int, prompt_len: int) -> tuple[int, int]:
    return policy.layout(n, cfg.quantized_prefix_len(n), prompt_len)


def _steady_len(cfg, policy, ctx: int, prompt_len: int) -> int:
    """The longest length up to ``ctx`` whose decode step moves no page
    (its layout is its start's): the step most decode steps are."""
    n = ctx
    while _scored_layout(cfg, policy, n - 1, prompt_len) != \
            _scored_layout(cfg, policy, n, prompt_len):
        n -= 1
    return n


def _evicting_len(cfg, policy, n_max: int, prompt_len: int) -> int | None:
    """The longest length up to ``n_max`` whose decode step runs
    ``h2o_ref.evict_step``'s selection and compaction (the in-place range
    moves up a page and the kept set is not simply the positions it held);
    None where no step within two pages of ``n_max`` does (a context within
    the budget)."""
    bs = policy.block_size
    for n in range(n_max, max(prompt_len, n_max - 2 * bs), -1):
        k0, e0 = _scored_layout(cfg, policy, n - 1, prompt_len)
        k1, e1 = _scored_layout(cfg, policy, n, prompt_len)
        if (k1, e1) != (k0, e0) and not (k0 == e0 and k1 == e1):
            return n
    return None


def eviction_row(a, base, name, method, B, ctx, Hq, H, D, bs, dtype, device, timer, kw,
                 copy_gbs) -> dict:
    """One H2O / A2SF layer's decode (``--eviction``) on one packed cache, at
    the longest length up to ``ctx`` whose step moves no page, every request
    in the same layout (kept heavy hitters, the pages between them and the
    recent tokens skipped):

    * ``kept_us`` (a): the decode launch over the positions the step reads,
      without the attention-mass output (``plain_us``: the same launch over
      every position, as without eviction);
    * ``scored_us`` (b): the layer's decode under H2O / A2SF as
      ``backend.KvcompImpl._forward_triton`` issues it for a decode batch:
      the evicted ranges, the read width from the host lists, the launch
      with ``evicted`` and ``probs``, and ``eviction_gpu.after_attention``
      (the mass accumulated into the score slots, each request's eviction
      check);
    * ``evict_us`` (c): ``h2o_ref.evict_step`` with the Triton compaction,
      as ``after_attention`` runs it, for every request of the batch at the
      longest length whose step evicts a page (selection among the heavy
      hitters and the page leaving the in-place range, the kept set moved
      to the front); by default (``eviction_gpu.eviction_batch``) one
      ``h2o_ref.evict_steps`` for the whole batch.

    These are the engine's eager steps (``eviction_gpu.selects_on_host``;
    ``KVCOMP_EVICTION_GRAPHS=0``, or a setting not captured by default),
    so all three are timed eagerly (launches included, L2 flushed);
    ``plain_graph_us`` is the plain launch under the run's ``--timing``,
    what a captured decode without eviction costs. Checks: (b)'s output is
    (a)'s bit for bit, and (b)'s output and score slots are those of
    ``h2o_ref.scored_step`` (fp64 mass), (c)'s pages those of
    ``compaction.compact_kept``, for the first requests."""
    cfg = KvcompConfig(**{**base, "eviction": {"method": method,
                                               "budget_tokens": a.eviction_budget}})
    policy = cfg.eviction.policy(bs)
    P = ctx // 2  # any prompt up to the step's start gives the same layout
    n = _steady_len(cfg, policy, ctx, P)
    n_evict = _evicting_len(cfg, policy, n, P)
    p = Problem(cfg, B, n, Hq, H, D, bs, dtype, device, all_pages=True)
    layout, table, lens = p.layout, p.block_table, p.seq_lens
    res_table = p.residual_table if p.residual is not None else None
    i32 = dict(dtype=torch.int32, device=device)
    # the fields of backend.KvcompMetadata that eviction reads (that module
    # needs vLLM, which the kernel rows do without)
    md = types.SimpleNamespace(
        query_start_loc=torch.arange(B + 1, **i32), seq_lens=lens, block_table=table,
        prompt_lens=torch.full((B,), P, **i32), query_start_loc_cpu=list(range(B + 1)),
        seq_lens_cpu=[n] * B, prompt_lens_cpu=[P] * B, eviction_rows=None,
        eviction_shared=None)
    if a.eviction_rows:
        # as the builder makes them once a step (KVCOMP_EVICTION_ROWS); the share is the
        # step's, so repeated timings count the first layer's ranges once, as 32 layers do
        md.eviction_rows = eviction_gpu.host_rows(cfg, bs, md)
        md.eviction_shared = {}
    ranges = eviction_gpu.step_ranges(cfg, bs, md)[0]
    width = eviction_gpu.decode_read_width(cfg, bs, md, B)

    def plain():
        return p.run(a.num_splits, **kw)

    def kept():
        return p.run(a.num_splits, evicted=ranges, **kw)

    def scored():
        ev = eviction_gpu.step_ranges(cfg, bs, md)
        probs = torch.empty(B, Hq, eviction_gpu.decode_read_width(cfg, bs, md, B),
                            dtype=torch.float32, device=device)
        # as the backend's eager step: logits and log-sum-exps unless KVCOMP_SCORE_FROM_LOGITS=0
        lse = (torch.empty(B, Hq, dtype=torch.float32, device=device)
               if eviction_gpu.scores_from_logits() else None)
        kvcomp_decode_attention(*p.args(), n, num_splits=a.num_splits, out=p.out,
                                evicted=ev[0], probs=probs, probs_lse=lse, **kw)
        eviction_gpu.after_attention(p.query, p.key_new, p.value_new, p.out, p.packed,
                                     p.residual, layout, cfg, p.scale, md, res_table, p.bs_r,
                                     probs, lse)

    model_dtype = step_model_dtype(cfg, p.residual, p.query)

    batch = eviction_gpu.eviction_batch()

    def evict():
        if batch:
            h2o_ref.evict_steps(p.packed, layout, cfg, table, range(B), [n_evict - 1] * B,
                                [n_evict] * B, [P] * B, model_dtype,
                                select=eviction_gpu.selector())
            return
        for i in range(B):
            h2o_ref.evict_step(p.packed, layout, cfg, table[i], n_evict - 1, n_evict, P,
                               model_dtype, compact=triton_compact, on_device=a.eviction_rows)

    # the references walk requests in Python: two of them on a GPU; bf16 there
    m, tol, mass_tol = (B, 2e-3, 1e-5) if a.smoke else (min(B, 2), 3e-2, 1e-2)
    torch_scores = eviction_gpu.score_adder() is eviction_gpu.add_decode_scores
    label = (f"{name}+{method}{a.eviction_budget}{'+rows' if a.eviction_rows else ''}"
             f"{'+torch-scores' if torch_scores else ''}"
             f"{'' if batch else '+per-request'}"
             f"{'+sort' if eviction_gpu.selector() is h2o_ref.select_and_compact else ''}")
    assert torch.isfinite(plain()).all(), f"{label}: non-finite output"
    out_kept = kept().clone()
    pages = table[:m].flatten().long()
    ref_cache = p.packed.clone()
    scores_before = score_view(ref_cache, layout)[pages]
    scored()
    out_equal = torch.equal(p.out, out_kept)
    ref_err = 0.0
    for i in range(m):
        res_row = res_table[i] if res_table is not None else None
        o = h2o_ref.scored_step(RequestStep(
            p.query[i: i + 1], p.key_new[i: i + 1], p.value_new[i: i + 1], ref_cache,
            p.residual, layout, cfg, table[i], res_row, p.bs_r, n - 1, p.scale, model_dtype,
            True, None, P))
        ref_err = max(ref_err, (p.out[i].float() - o[0].float()).abs().max().item())
    got = score_view(p.packed, layout)[pages]
    mass_err = (got - score_view(ref_cache, layout)[pages]).abs().max().item()
    checks = dict(out_equal=out_equal,
                  out_max_abs_diff=(p.out.float() - out_kept.float()).abs().max().item(),
                  ref_max_abs_err=ref_err, ref_tol=tol, mass_max_abs_err=mass_err,
                  mass_tol=mass_tol, mass_accumulated=not torch.equal(got, scores_before))
    del ref_cache
    ok = (out_equal and ref_err < tol and mass_err < mass_tol and checks["mass_accumulated"])
    row = {}
    if n_evict is not None:
        # the reference on the host, as the compaction tests run it: the first requests'
        # pages gathered, their block tables renumbered to match
        before = p.packed[pages].cpu()
        ref_cache = before.clone()
        ref_table = torch.arange(len(pages), dtype=table.dtype).view(m, -1)
        evict()
        for i in range(m):
            h2o_ref.evict_step(ref_cache, layout, cfg, ref_table[i], n_evict - 1, n_evict, P,
                               model_dtype, compact=compact_kept)
        after = p.packed[pages].cpu()
        checks["compact_equal"] = torch.equal(after, ref_cache)
        checks["compact_bytes_differ"] = int((after != ref_cache).sum())
        checks["compacted"] = not torch.equal(after, before)
        del ref_cache, before, after
        ok = ok and checks["compact_equal"] and checks["compacted"]
        k0, e0 = _scored_layout(cfg, policy, n_evict - 1, P)
        k1, e1 = _scored_layout(cfg, policy, n_evict, P)
        row.update(evict_seq_len=n_evict, evict_candidates=k0 + e1 - e0, evict_kept=k1)
    checks["checks_ok"] = ok
    if a.smoke:
        assert ok, f"{label}: checks {checks}"
    elif not ok:
        print(f"WARNING {label}: checks {checks}")

    etimer = make_timer(device, a.warmup_ms, a.rep_ms, "eager")
    plain_us, kept_us, scored_us = etimer(plain), etimer(kept), etimer(scored)
    L = a.num_layers
    lo, hi = ranges[0].tolist()
    start = n - 1
    q_old = cfg.quantized_prefix_len(start)
    es = dtype.itemsize
    b = {"packed": B * H * (q_old - (hi - lo)) * layout.scores_offset // bs,
         "residual": B * H * (start - q_old) * 2 * D * es,
         "qkvo": (2 * B * Hq * D + 2 * B * H * D) * es,
         # probabilities written, read back; each read slot's score read and written
         "probs": 2 * B * Hq * width * 4, "scores": 2 * B * H * width * 4}
    b["total"] = sum(b.values())
    gbs = b["total"] / (scored_us * 1e-6) / 1e9
    row = dict(
        config=label, method=method, batch=B, context=ctx, seq_len=n, prompt_len=P,
        budget_tokens=cfg.eviction.budget_tokens, recent_tokens=cfg.eviction.recent_tokens,
        evicted=[lo, hi], read_tokens=n - (hi - lo), probs_width=width,
        num_splits=a.num_splits or decode_num_splits(
            B, H, n, cfg, _tile(layout, a.block_n, a.warp_tiles),
            num_sms=(torch.cuda.get_device_properties(0).multi_processor_count
                     if device == "cuda" else 132)),
        us=scored_us, bytes=b, GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs,
        cache_GiB=cache_gib(cfg, B, n, H, D, bs), num_layers=L,
        plain_us=plain_us, plain_graph_us=timer(plain), kept_us=kept_us, scored_us=scored_us,
        overhead_us=scored_us - kept_us, overhead_step_us=L * (scored_us - kept_us),
        net_us=scored_us - plain_us, net_step_us=L * (scored_us - plain_us),
        **row, **checks)
    row.update(captured_breakdown(a, cfg, p, md, ranges, n, n_evict, timer, kw))
    if n_evict is not None:
        evict_us = etimer(evict)
        # a request's in-place range moves a page every block_size of its
        # steps: requests at spread lengths evict B / block_size of a batch a
        # step, while a batch admitted together evicts all at once
        row.update(evict_us=evict_us, evict_request_us=evict_us / B,
                   evict_amortized_step_us=L * evict_us / bs, evict_peak_step_us=L * evict_us)
        row["eviction_step_us"] = row["overhead_step_us"] + row["evict_amortized_step_us"]
    else:
        row["eviction_step_us"] = row["overhead_step_us"]
    del p
    return row


def captured_breakdown(a, cfg, p, md, ranges, n, n_evict, timer, kw) -> dict:
    """The GPU time of a decode layer's pieces as ``KVCOMP_EVICTION_GRAPHS``
    captures them (``eviction_gpu.graph_after_attention``), each timed by
    ``timer`` (``--timing graph``: CUDA-graph replays, no launch overhead):
    the decode over the kept positions (``graph_kept_us``), with its
    probabilities at ``decode_probs_width``
    (``graph_probs_us``), with the scores added (``graph_scores_us``; with
    the normalisation left to the score kernel, ``probs_lse``: ``graph_logits_us``), the
    whole layer at a length whose step moves no page (``graph_layer_us``:
    every row's fixed-shape selection with nothing kept; from logits,
    ``graph_layer_logits_us``), and the eviction
    step alone there (``graph_select_idle_us``) and at a length where every
    row evicts a page (``graph_select_all_us``), by the stable sort and by
    the Triton selection (``graph_select_kernel_*``, ``KVCOMP_SELECT_KERNEL``).
    Without ``--timing graph``
    or a GPU: nothing (``--smoke`` runs them once on the host)."""
    if a.timing != "graph" or (p.packed.device.type != "cuda" and not a.smoke):
        return {}
    B, Hq = p.query.shape[:2]
    width = eviction_gpu.decode_probs_width(cfg, p.layout.block_size)
    probs = torch.empty(B, Hq, width, dtype=torch.float32, device=p.packed.device)
    table, lens, prompts = md.block_table, md.seq_lens, md.prompt_lens

    def kept():
        kvcomp_decode_attention(*p.args(), n, num_splits=a.num_splits, out=p.out,
                                evicted=ranges, **kw)

    def with_probs():
        kvcomp_decode_attention(*p.args(), n, num_splits=a.num_splits, out=p.out,
                                evicted=ranges, probs=probs, **kw)

    def with_scores():
        with_probs()
        eviction_gpu.score_adder()(probs, p.packed, p.layout, cfg, table, lens, ranges)

    def layer():
        with_probs()
        eviction_gpu.graph_after_attention(p.packed, p.layout, cfg, md, ranges, probs)

    lse = torch.empty(B, Hq, dtype=torch.float32, device=p.packed.device)

    def logits():  # the normalisation left to the score kernel (KVCOMP_SCORE_FROM_LOGITS)
        kvcomp_decode_attention(*p.args(), n, num_splits=a.num_splits, out=p.out,
                                evicted=ranges, probs=probs, probs_lse=lse, **kw)

    def with_logits():
        logits()
        eviction_gpu.score_adder()(probs, p.packed, p.layout, cfg, table, lens, ranges,
                                   lse=lse)

    def layer_logits():
        logits()
        eviction_gpu.graph_after_attention(p.packed, p.layout, cfg, md, ranges, probs, lse)

    got = dict(graph_probs_width=width, graph_kept_us=timer(kept),
               graph_probs_us=timer(with_probs),
               graph_scores_us=timer(with_scores), graph_logits_us=timer(with_logits),
               graph_layer_us=timer(layer), graph_layer_logits_us=timer(layer_logits))
    lens_evict = None if n_evict is None else torch.full_like(lens, n_evict)
    for tag, select in (("", h2o_ref.select_and_compact),
                        ("_kernel", triton_select_and_compact)):
        got[f"graph_select{tag}_idle_us"] = timer(lambda select=select: (
            eviction_gpu.evict_decode_rows(p.packed, p.layout, cfg, table, lens, prompts,
                                           select)))
        if lens_evict is not None:
            got[f"graph_select{tag}_all_us"] = timer(lambda select=select: (
                eviction_gpu.evict_decode_rows(p.packed, p.layout, cfg, table, lens_evict,
                                               prompts, select)))
    # the rows' steps worked out inside the selection launch (KVCOMP_DECODE_ROWS_KERNEL)
    got["graph_select_rows_idle_us"] = timer(lambda: triton_select_decode_rows(
        p.packed, p.layout, cfg, table, lens, prompts))
    if lens_evict is not None:
        got["graph_select_rows_all_us"] = timer(lambda: triton_select_decode_rows(
            p.packed, p.layout, cfg, table, lens_evict, prompts))
    return got


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x]


def _tile(layout, block_n: int, warp_tiles: int | None) -> int:
    """BLOCK_N the kernel runs with (warp tiles widen it past small key groups)."""
    wt = DEFAULT_LAUNCH["warp_tiles"] if warp_tiles is None else warp_tiles
    return decode_tiles_and_slices(layout, layout_constexprs(layout), block_n, wt)[0]


def _wt(warp_tiles: int | None, max_registers: int) -> dict:
    """Kernel kwargs of a warp-tile variant (None: the kernel's default)."""
    kw = {} if warp_tiles is None else {"warp_tiles": warp_tiles}
    if max_registers:
        kw["max_registers"] = max_registers
    return kw


def sweep(a, device, dtype, timer, copy_gbs, info, B, ctx, shape):
    """Tuning grid at one shape: tile, warps, pipeline stages, splits and
    code element width, for each config."""
    Hq, H, D, bs, G, R = shape
    rows = []
    print("| config | kernel kwargs | splits | us | GB/s | % copy BW |")
    print("|---|---|---|---|---|---|")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    for name in a.configs.split(","):
        cfg = KvcompConfig(**{"group_size": G, "residual_tokens": R, "block_size": bs,
                              **CONFIGS[name]})
        p = Problem(cfg, B, ctx, Hq, H, D, bs, dtype, device)
        grid = []
        if a.sweep_splits:
            auto = decode_num_splits(B, H, ctx, cfg, _tile(p.layout, a.block_n, a.warp_tiles),
                                     num_sms=sms)
            print(f"| {name} | heuristic | {auto} | | | |")
            grid = [(dict(block_n=a.block_n, num_warps=a.num_warps, num_stages=a.num_stages,
                          key_fold=a.key_fold, **_wt(a.warp_tiles, a.max_registers)), int(s),
                     int(s) == auto) for s in a.sweep_splits.split(",")]
        for bn in (() if a.sweep_splits else _ints(a.sweep_block_n)):
            def auto_for(wt, bn=bn):
                return decode_num_splits(B, H, ctx, cfg, _tile(p.layout, bn, wt), num_sms=sms)

            auto = auto_for(DEFAULT_LAUNCH["warp_tiles"])
            grid += [(dict(block_n=bn, num_warps=nw, num_stages=ns, **_wt(wt, mr)),
                      auto_for(wt), True)
                     for wt in _ints(a.sweep_warp_tiles) for nw in _ints(a.sweep_warps)
                     for ns in _ints(a.sweep_stages)
                     for mr in ([0] + _ints(a.sweep_max_registers) if wt > 1 else [0])]
            grid += [(dict(DEFAULT_LAUNCH, block_n=bn), s, False)
                     for s in sorted({1, auto // 2, 2 * auto} - {0, auto})]
        if not a.sweep_splits:
            grid += [(dict(DEFAULT_LAUNCH, elem_bits=e), auto, True)
                     for e in (8, 16) if cfg.k_bits < 16]
        for kw, splits, heuristic in grid:
            try:
                p.run(splits, **kw)
                us = timer(lambda: p.run(splits, **kw))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"| {name} | {kw} | {splits} | failed: {type(e).__name__} | | |")
                continue
            gbs = p.bytes["total"] / (us * 1e-6) / 1e9
            rows.append(dict(config=name, batch=B, context=ctx, num_splits=splits, us=us,
                             GBps=gbs, pct_copy_bw=100 * gbs / copy_gbs,
                             heuristic_splits=heuristic, **kw))
            print(f"| {name} | {kw} | {splits} | {us:.1f} | {gbs:.0f} "
                  f"| {100 * gbs / copy_gbs:.1f} |")
        del p
    if a.out:
        Path(a.out).write_text(json.dumps({"info": info, "sweep": rows}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
