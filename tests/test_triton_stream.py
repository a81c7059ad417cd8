"""The streaming heads' Triton step (kernels/triton_stream.py) against the CPU
path's step (``head_split_ref.stream_step_reference``) and against
DuoAttention's streaming mask written from its definition; on a GPU where
there is one (the kernel tests of benchmarks/gpu_check.sh), else interpreted.

Each batch is laid out as the stream manager leaves it: a request's pages
are live only where a later query reads them (its sinks, the window of the
step's first query, and the pages the step writes that are sinks or in the
window of its end); every other entry is the null block and a chunk's
middle has slot -1. The null block, every page given back and every cached
position no query reads hold NaN, so a read of any of them shows."""
from __future__ import annotations

import pytest
import torch

from vllm_kvcomp.kernels.triton_stream import stream_attention, stream_attention_reference
from vllm_kvcomp.policies.attention import window_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: IEEE fp32 dots against the float32 reference over a few hundred keys;
# fp16/bf16: the output's rounding (8 bits of mantissa for bf16) and, on a GPU,
# probabilities rounded to the model dtype for the tensor-core dots.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class _Batch:
    def __init__(self, reqs, H, rep, D, bs, sink, recent, dtype, streaming=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.reqs, self.sink, self.recent, self.bs = reqs, sink, recent, bs
        self.streaming = list(range(H)) if streaming is None else streaming
        Hs = len(self.streaming)
        # each request's whole K/V, positions [0, n)
        self.full = [tuple(torch.randn(c + q, H, D, generator=g).to(dtype) for _ in range(2))
                     for c, q in reqs]
        T = sum(q for _, q in reqs)
        self.query = torch.randn(T, H * rep, D, generator=g).to(dtype)
        self.key = torch.cat([k[c:] for (c, _), (k, _) in zip(reqs, self.full)])
        self.value = torch.cat([v[c:] for (c, _), (_, v) in zip(reqs, self.full)])
        maxb = max(-(-(c + q) // bs) for c, q in reqs)
        nb = 1 + sum(-(-(c + q) // bs) for c, q in reqs)
        self.cache = torch.full((nb, 2, Hs, bs, D), float("nan"), dtype=dtype)
        self.block_table = torch.zeros(len(reqs), maxb, dtype=torch.int32)  # 0: null block
        slots = []
        sh = torch.tensor(self.streaming)
        nxt = 1
        for i, ((c, q), (k, v)) in enumerate(zip(reqs, self.full)):
            n = c + q
            sink_hi = min(sink, c)
            recent_lo = max(sink_hi, c + 1 - recent)
            read = [p for p in range(c) if p < sink_hi or p >= recent_lo]
            for pg in range(-(-n // bs)):
                span = range(pg * bs, min(n, pg * bs + bs))
                wanted = (any(p in read for p in span) or
                          (span[-1] >= c and (pg * bs < sink or pg >= max(0, n - recent) // bs)))
                if not wanted:
                    continue
                self.block_table[i, pg] = nxt
                for p in span:
                    if p in read:  # the positions no query reads stay NaN
                        self.cache[nxt, 0, :, p % bs] = k[p, sh]
                        self.cache[nxt, 1, :, p % bs] = v[p, sh]
                nxt += 1
            for p in range(c, n):
                blk = int(self.block_table[i, p // bs])
                slots.append(blk * bs + p % bs if blk else -1)
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64)
        self.qsl = torch.tensor([0] + [q for _, q in reqs], dtype=torch.int32).cumsum(0).to(
            torch.int32)
        self.seq_lens = torch.tensor([c + q for c, q in reqs], dtype=torch.int32)
        self.heads = torch.tensor(self.streaming, dtype=torch.int32)

    def run(self, fn, store=True, device="cpu"):
        """(out, pages after the step) of ``fn`` on ``device``, on the CPU."""
        args = [x.to(device, copy=True) for x in (self.query, self.key, self.value, self.cache,
                                       self.block_table, self.slot_mapping, self.qsl,
                                       self.seq_lens, self.heads)]
        q, k, v, cache, table, slots, qsl, seq_lens, heads = args
        out = torch.zeros_like(q)
        fn(q, k, v, cache, table, slots if store else None, qsl, seq_lens, self.sink,
           self.recent, q.shape[-1] ** -0.5, max(n for _, n in self.reqs), out, heads=heads)
        return out.cpu(), cache.cpu()

    def duo(self, full_attention=False):
        """float64 DuoAttention streaming heads (or full causal attention) of
        the streaming heads' query rows, from each request's whole K/V."""
        H = self.full[0][0].shape[1]
        rep = self.query.shape[1] // H
        D = self.query.shape[-1]
        out = torch.zeros(self.query.shape, dtype=torch.float64)
        t = 0
        for (c, q), (k, v) in zip(self.reqs, self.full):
            n = c + q
            mask = window_mask(n, n) if full_attention else \
                window_mask(n, n, self.sink, self.recent)
            mask = mask[c:]
            for h in self.streaming:
                for r in range(rep):
                    s = self.query[t:t + q, h * rep + r].double() @ k[:, h].double().T
                    p = torch.softmax((s * D ** -0.5).masked_fill(~mask, float("-inf")), -1)
                    out[t:t + q, h * rep + r] = p @ v[:, h].double()
            t += q
        return out

    def rows(self, x):
        """The streaming heads' query rows of ``x`` [T, Hq, D]."""
        H = self.full[0][0].shape[1]
        rep = x.shape[1] // H
        return x.view(x.shape[0], H, rep, -1)[:, self.streaming]


# (requests as (context before the step, tokens in it), KV heads, query heads
# per KV head, head size, stream block size, sinks, window)
CASES = [
    # decode rows only, contexts not multiples of the block size
    ([(0, 1), (5, 1), (37, 1), (130, 1)], 2, 4, 64, 16, 4, 24),
    # prefill chunks crossing the sink and window boundaries, beside decode rows
    ([(70, 1), (0, 45), (3, 30), (90, 57)], 2, 1, 128, 16, 8, 20),
    # GQA 8, small pages, a chunk much longer than sinks + window (slot -1 middle)
    ([(200, 1), (0, 150), (41, 1)], 1, 8, 64, 4, 1, 7),
    # block size larger than the window, a window not a multiple of anything
    ([(300, 1), (12, 100), (6, 1)], 4, 4, 128, 32, 16, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_is_the_reference_step(case, dtype):
    """Output and the pages after the store equal the CPU path's step; no
    NaN page was read (the output is finite)."""
    reqs, H, rep, D, bs, sink, recent = CASES[case]
    b = _Batch(reqs, H, rep, D, bs, sink, recent, dtype, seed=case)
    out, cache = b.run(stream_attention, device=DEVICE)
    ref, ref_cache = b.run(stream_attention_reference)
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)
    # the store wrote the slots it was given (and only those, above)
    assert not torch.equal(cache.nan_to_num(), b.cache.nan_to_num())


def test_only_the_streaming_heads_are_touched():
    """With a head map, only the streaming heads' query rows are written and
    the cache's heads follow ``heads`` (the model's KV head of each)."""
    reqs = [(60, 1), (10, 33)]
    b = _Batch(reqs, 4, 2, 64, 8, 4, 16, torch.float32, streaming=[3, 1], seed=7)
    out, cache = b.run(stream_attention, device=DEVICE)
    ref, ref_cache = b.run(stream_attention_reference)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)
    H = 4
    other = out.view(out.shape[0], H, 2, -1)[:, [0, 2]]
    assert (other == 0).all()
    torch.testing.assert_close(b.rows(out).double(), b.rows(b.duo()), atol=1e-5, rtol=1e-4)


def test_no_store_without_a_slot_mapping():
    b = _Batch([(20, 1), (0, 9)], 2, 2, 64, 8, 2, 8, torch.float32, seed=3)
    _, cache = b.run(stream_attention, store=False, device=DEVICE)
    torch.testing.assert_close(cache, b.cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("sink, recent", [(4, 16), (1, 33)])
def test_mask_is_duo_attention_not_full_causal(sink, recent):
    """The kernel is DuoAttention's streaming head (sinks + window, from its
    definition, float64), which differs from full causal attention once the
    context exceeds sinks + window: a kernel with the wrong mask fails here."""
    reqs = [(150, 1), (0, 120), (70, 40)]
    b = _Batch(reqs, 2, 4, 64, 16, sink, recent, torch.float32, seed=11)
    out, _ = b.run(stream_attention, device=DEVICE)
    duo = b.rows(b.duo())
    torch.testing.assert_close(b.rows(out).double(), duo, atol=1e-5, rtol=1e-4)
    full = b.rows(b.duo(full_attention=True))
    assert (duo - full).abs().max() > 1e-2


def test_graph_padding_rows_stay_finite():
    """CUDA-graph padding (requests of length 0, one query row each, slot -1)
    reads no page and writes none; the real rows are the reference's."""
    b = _Batch([(40, 1), (9, 1)], 2, 4, 64, 16, 4, 16, torch.float32, seed=5)
    pad = 2
    q = torch.cat([b.query, torch.randn(pad, *b.query.shape[1:])])
    k = torch.cat([b.key, torch.randn(pad, *b.key.shape[1:])])
    v = torch.cat([b.value, torch.randn(pad, *b.value.shape[1:])])
    qsl = torch.arange(len(q) + 1, dtype=torch.int32)
    seq_lens = torch.cat([b.seq_lens, torch.zeros(pad, dtype=torch.int32)])
    bt = torch.cat([b.block_table, torch.zeros(pad, b.block_table.shape[1], dtype=torch.int32)])
    slots = torch.cat([b.slot_mapping, torch.full((pad,), -1, dtype=torch.int64)])
    q, k, v, qsl, seq_lens, bt, slots, cache, heads = (
        x.to(DEVICE, copy=True) for x in (q, k, v, qsl, seq_lens, bt, slots, b.cache, b.heads))
    out = torch.zeros_like(q)
    stream_attention(q, k, v, cache, bt, slots, qsl, seq_lens, 4, 16, 64 ** -0.5, 1, out,
                     heads=heads)
    out, cache = out.cpu(), cache.cpu()
    assert torch.isfinite(out).all()
    ref, ref_cache = b.run(stream_attention_reference)
    torch.testing.assert_close(out[:2], ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0, equal_nan=True)


# ------------------------------------------------------------------ backend


def _stream_pages(sink, recent, heads, bs, D, num_blocks=400):
    """The streaming heads' manager (vLLM's block pool) and its pages; the
    null block and every page given back hold NaN."""
    from sim_paged import manager_on_pool

    from vllm_kvcomp.spec import KvcompStreamSpec, register_specs

    register_specs()
    spec = KvcompStreamSpec(block_size=bs, num_kv_heads=heads, head_size=D,
                            dtype=torch.float32, sink_tokens=sink, recent_tokens=recent)
    _, mgr = manager_on_pool(spec, num_blocks)
    return mgr, torch.full((num_blocks, 2, heads, bs, D), float("nan"))


def _stream_step(mgr, cache, bs, starts, ends, maxb):
    """Block table and slot mapping of one step (request i: starts[i] ->
    ends[i] tokens), after the manager has given back what is behind the window."""
    table = torch.zeros(len(starts), maxb, dtype=torch.int32)
    slots = []
    for i, (c, n) in enumerate(zip(starts, ends)):
        rid = f"r{i}"
        before = {b.block_id for b in mgr.req_to_blocks.get(rid, []) if not b.is_null}
        mgr.remove_skipped_blocks(rid, c)
        after = {b.block_id for b in mgr.req_to_blocks.get(rid, []) if not b.is_null}
        for b in before - after:
            cache[b] = float("nan")
        mgr.allocate_new_blocks(rid, n, n)
        row = [b.block_id for b in mgr.req_to_blocks[rid]]
        table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // bs] * bs + p % bs if row[p // bs] else -1 for p in range(c, n)]
    cache[0] = float("nan")
    return table, torch.tensor(slots, dtype=torch.int64)


@pytest.mark.parametrize("kvcomp, H, rep, split", [
    ({"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32}, 4, 2,
     ([0, 3], [1, 2])),
    ({"k_bits": 2, "v_bits": 2, "group_size": 32, "residual_tokens": 0}, 2, 4, ([1], [0])),
])
def test_backend_split_layer_triton_step_is_the_reference_step(kvcomp, H, rep, split):
    """The backend's forward for a split layer on its Triton path (the launch
    code a GPU runs, interpreted) equals its CPU path (``split_step_reference``)
    step after step, prefill chunks and decodes of two requests together, and
    leaves the same streaming pages; the streaming heads' rows are not the
    retrieval kernels' (a forward that skipped the stream kernel fails)."""
    from types import SimpleNamespace
    from unittest import mock

    from sim_paged import SimPagedCache
    from vllm_kvcomp import backend
    from vllm_kvcomp.backend import KvcompImpl, KvcompMetadata
    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.names import RESIDUAL_SUFFIX, STREAM_SUFFIX

    D, bs, bs_s = 64, 32, 8
    cfg = KvcompConfig.from_dict({**kvcomp, "sink_tokens": 4, "recent_tokens": 24})
    steps = [(40, 70), (1, 1), (1, 33), (1, 1), (1, 1)]
    T = [sum(s[i] for s in steps) for i in range(2)]
    g = torch.Generator().manual_seed(H + rep)
    seqs = [[torch.randn(t, h, D, generator=g) for h in (H * rep, H, H)] for t in T]
    with mock.patch.object(backend, "current_config", lambda: cfg):
        impl = KvcompImpl(num_heads=H * rep, head_size=D, scale=D ** -0.5, num_kv_heads=H)
    impl.head_split = split
    impl._decode_launch = {}
    impl._flash_attn = None  # the Triton prefill on a GPU too (FlashAttention takes no fp32)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    name = layer.layer_name
    maxb_s = -(-max(T) // bs_s)

    def run(triton: bool):
        # the Triton path on the GPU where there is one (the reference path is the CPU's)
        dev = DEVICE if triton else "cpu"
        sim = SimPagedCache(cfg, bs, len(split[0]), D, 2, max(T), seed=3)
        packed = sim.packed.to(dev)
        residual = sim.residual.to(dev) if sim.residual is not None else None
        mgr, stream = _stream_pages(4, 24, len(split[1]), bs_s, D)
        stream = stream.to(dev)
        outs = [torch.zeros(t, H * rep, D) for t in T]
        pos = [0, 0]
        for step in steps:
            ends = [p + s for p, s in zip(pos, step)]
            batch = sim.batch(pos, ends)
            table, slots = (x.to(dev) for x in _stream_step(mgr, stream, bs_s, pos, ends,
                                                            maxb_s))
            q, k, v = (torch.cat([seqs[i][j][pos[i]:ends[i]] for i in range(2)]).to(dev)
                       for j in range(3))
            n = q.shape[0]
            qsl = torch.tensor(batch.query_start_loc, dtype=torch.int32, device=dev)
            seq_lens = torch.tensor(ends, dtype=torch.int32, device=dev)
            nd = sum(1 for s in step if s == 1) if max(step) > 1 else 2

            def md(table, block_size, slot_mapping):
                return KvcompMetadata(
                    num_actual_tokens=n, num_reqs=2, query_start_loc=qsl, seq_lens=seq_lens,
                    block_table=table, slot_mapping=slot_mapping, block_size=block_size,
                    max_query_len=max(step), max_seq_len=max(ends), num_decodes=nd,
                    query_start_loc_cpu=batch.query_start_loc, seq_lens_cpu=ends)
            main = md(sim.block_table.to(dev), bs, torch.zeros(n, dtype=torch.int64, device=dev))
            ctx = SimpleNamespace(
                no_compile_layers={name + RESIDUAL_SUFFIX: SimpleNamespace(kv_cache=residual),
                                   name + STREAM_SUFFIX: SimpleNamespace(kv_cache=stream)},
                attn_metadata={
                    name + RESIDUAL_SUFFIX: md(batch.residual_block_table.to(dev), sim.bs_r,
                                               batch.residual_slot_mapping.to(dev)),
                    name + STREAM_SUFFIX: md(table, bs_s, slots)})
            out = torch.zeros(n, H * rep * D, device=dev)
            with mock.patch.object(backend, "get_forward_context", lambda: ctx), \
                    mock.patch.object(backend, "FORCE_TRITON", triton):
                impl.forward(layer, q.view(n, -1), k.view(n, -1), v.view(n, -1),
                             packed, main, output=out)
            for i in range(2):
                lo = batch.query_start_loc[i]
                outs[i][pos[i]:ends[i]] = out.view(n, -1, D)[lo:lo + step[i]].cpu()
            pos = ends
        return outs, stream.cpu()

    got, got_stream = run(True)
    ref, ref_stream = run(False)
    for o, r in zip(got, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_stream, ref_stream, atol=0, rtol=0, equal_nan=True)
    # the streaming heads' rows were written by a kernel, not left as zeros
    s = torch.tensor(split[1])
    for o in got:
        assert (o.view(o.shape[0], H, rep, D)[:, s].abs().sum(-1) > 0).all()
