"""The full-precision window held as a ring (``residual_ring``).

One ring of pages per request, taken at admission and kept until the request
ends or is preempted, instead of pages by position that vLLM frees only once
every unsettled step has passed them. Checked here: the manager's pages
(``KvcompRingWindowManager`` on vLLM's block pool), the KV capacity vLLM
reports, the start-up note on the GPU path, the engine end to end against the
same bits with the sliding window (chunked prefill, prefix
hits, preemption), and the backend's Triton launch code against the reference
step (interpreted). The reference step's reads and writes of the ring are in
``test_reference_step.py``, the store's in ``test_triton_store.py``.
"""
import pytest
import torch

import vllm_kvcomp
from e2e_util import logged_kv_tokens, run_engines, token_prompts
from sim_paged import CAPACITY_SHAPES, reported_tokens, shape_specs
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.residual_layer import packed_spec, residual_spec
from vllm_kvcomp.spec import KvcompRingWindowManager, KvcompRingWindowSpec

vllm_kvcomp.register()


def _manager(cfg, num_blocks, bs=128, head=128):
    from sim_paged import manager_on_pool

    spec = residual_spec(packed_spec(cfg, bs, 2, head, torch.bfloat16), concurrent_steps=2)
    assert isinstance(spec, KvcompRingWindowSpec)
    pool, mgr = manager_on_pool(spec, num_blocks, max_in_flight_tokens=8192,
                                max_model_len=4096, kv_cache_group_id=1,
                                scheduler_block_size=bs)
    assert isinstance(mgr, KvcompRingWindowManager)
    return spec, pool, mgr


def _step(mgr, rid, n):
    need = mgr.get_num_blocks_to_allocate(rid, n, [], 0, 0, n)
    new = mgr.allocate_new_blocks(rid, n, n)
    mgr.remove_skipped_blocks(rid, n)
    return need, new


@pytest.mark.parametrize("bits, pages", [(4, 4), (2, 16)])
def test_a_request_holds_one_ring_for_its_life(bits, pages):
    """k4v4 (window up to 127 tokens, 32-token pages) holds 4 pages and k2v2
    (up to 255, 16-token pages) 16, whatever the chunking, with entry ``i``
    of the row the ring page ``i mod pages`` where the window can be; freeing
    (end or preemption) gives every page back once."""
    cfg = KvcompConfig(k_bits=bits, v_bits=bits, residual_ring=True)
    spec, pool, mgr = _manager(cfg, 64)
    assert spec.ring_pages == pages
    free0 = pool.get_num_free_blocks()
    row, n = [], 0
    for chunk in [700, 256, 1] + [1] * 300 + [600]:
        n += chunk
        need, new = _step(mgr, "a", n)
        assert need == (pages if n == 700 else 0)
        row += [b.block_id for b in new]
        assert free0 - pool.get_num_free_blocks() == pages
    ring = row[-(-spec.quantized_prefix_len(n) // spec.block_size):][:pages]
    bs = spec.block_size
    for p in range(spec.quantized_prefix_len(n), n):
        assert row[p // bs] == ring[(p // bs - spec.quantized_prefix_len(n) // bs) % pages]
    assert len(set(row) - {0}) == pages
    mgr.free("a")
    assert pool.get_num_free_blocks() == free0
    # re-admitted after a preemption: a fresh ring
    _step(mgr, "a", 300)
    assert free0 - pool.get_num_free_blocks() == pages
    mgr.free("a")
    assert pool.get_num_free_blocks() == free0


def test_spec_reserves_one_ring_not_one_window_per_unsettled_step():
    ring, sliding = (
        residual_spec(packed_spec(KvcompConfig(k_bits=4, v_bits=4, residual_ring=r), 128, 2,
                                  128, torch.bfloat16), concurrent_steps=2)
        for r in (True, False))
    assert ring.max_admission_blocks_per_request(8192, 4096) == 4
    assert sliding.max_admission_blocks_per_request(8192, 4096) == 3 * 4


# ------------------------------------------------------------------ capacity

@pytest.mark.parametrize("shape", list(CAPACITY_SHAPES))
def test_reported_capacity_at_4096(tiny_llama, shape):
    """vLLM's reported capacity (``get_kv_cache_capacity``, the code behind
    its "GPU KV cache size" log line) at max_model_len 4096, 128-token pages,
    async scheduling's two unsettled steps, against bf16. Measured: sliding
    window k4v4 2.74x, k2v2 2.88x; ring k4v4 3.35x, k2v2 4.84x (both shapes:
    per KV head the pages are the same). The capacity bar (k4v4 3.4x, k2v2
    5.5x) also needs a window half this size."""
    from vllm.engine.arg_utils import EngineArgs

    layers, heads, memory = CAPACITY_SHAPES[shape]
    vc = EngineArgs(model=tiny_llama, max_model_len=4096, block_size=128,
                    max_num_batched_tokens=8192).create_engine_config()
    bf16 = reported_tokens(vc, shape_specs(None, layers, heads, 2), memory)
    ratio = {}
    for bits in (4, 2):
        for ring in (False, True):
            cfg = KvcompConfig(k_bits=bits, v_bits=bits, residual_ring=ring)
            specs = shape_specs(cfg, layers, heads, 2)
            ratio[bits, ring] = reported_tokens(vc, specs, memory) / bf16
    print(shape, {k: round(v, 3) for k, v in ratio.items()})
    assert ratio[4, True] > 3.3 and ratio[2, True] > 4.8
    assert ratio[4, False] < 2.8 and ratio[2, False] < 2.9
    assert ratio[4, True] < 512 / 136 and ratio[2, True] < 512 / 72


def test_logged_capacity_at_4096(tiny_llama):
    """The "GPU KV cache size" vLLM logs for the CPU demo's tiny Llama (bf16, 1
    GiB of KV, max_model_len 4096, 128-token pages) with the ring, against
    upstream's bf16 cache (CPU_ATTN). Logged: bf16 262,144 tokens, ring k4v4
    877,226 (3.35x), k2v2 1,269,149 (4.84x)."""
    bf16, k4, k2 = logged_kv_tokens(tiny_llama, {"k_bits": 4, "v_bits": 4, "residual_ring": True},
                                    {"k_bits": 2, "v_bits": 2, "residual_ring": True})
    print("logged", bf16, k4, k2, k4 / bf16, k2 / bf16)
    assert k4 / bf16 > 3.3 and k2 / bf16 > 4.8


# ------------------------------------------------------------------ engine

PROMPTS = token_prompts([20, 150, 70], seed=1, shared_prefix=600) + token_prompts(
    [800, 5, 240], seed=2)
ENGINE = dict(max_model_len=1024, max_num_batched_tokens=256, enable_chunked_prefill=True,
              enable_prefix_caching=True, max_num_seqs=4)


def _spec(model, kv, blocks=None, max_tokens=24, prefix_caching=True):
    engine = dict(ENGINE, enable_prefix_caching=prefix_caching)
    if blocks is not None:
        engine["num_gpu_blocks_override"] = blocks
    return dict(spec=dict(model=model, backend="kvcomp", kvcomp=kv, engine=engine,
                          prompts=PROMPTS, max_tokens=max_tokens))


@pytest.mark.parametrize("bits", [4, 2])
def test_engine_tokens_equal_the_sliding_windows(tiny_llama, bits):
    """Chunked prefill (256-token budget, prompts up to 800 tokens: chunks
    longer than the ring's span) and a shared 600-token prefix: the ring
    serves the same tokens as the sliding window of the same bits. k4v4's
    window (0..127 tokens) is empty on whole key groups, where the shared
    prefix hits; k2v2 keeps 128 tokens in it, so no hit (the ring's pages are
    rewritten in place and never cached), while the sliding window's pages
    are cached: there the sliding window runs without prefix caching, since a
    hit starts the prompt's chunks elsewhere and rounds differently."""
    kv = {"k_bits": bits, "v_bits": bits}  # 128-token groups: each names its window
    sliding, ring = run_engines(
        _spec(tiny_llama, {**kv, "residual_ring": False}, prefix_caching=bits == 4),
        _spec(tiny_llama, {**kv, "residual_ring": True}))
    if bits == 4:
        assert ring["prefix_cache_hits"] >= 512, ring["prefix_cache_hits"]
    else:
        assert ring["prefix_cache_hits"] == 0
    assert ring["tokens"] == sliding["tokens"]


def test_engine_preempted_ring_keeps_its_tokens(tiny_llama):
    """Preemption frees the ring and a resumed request takes a new one: on a
    pool that preempts, 16-bit pages with a 128-token window give the tokens
    of the sliding window on a pool that never does (at 16 bits nothing
    rounds differently when a recomputed prompt is batched differently; with
    4-bit codes such a change can flip a code, and a random-weight model's
    near-tie tokens, with either window)."""
    kv = {"k_bits": 16, "v_bits": 16, "residual_tokens": 128}
    sliding, ring = run_engines(
        _spec(tiny_llama, kv, max_tokens=130),
        _spec(tiny_llama, {**kv, "residual_ring": True}, blocks=10, max_tokens=130))
    assert ring["preemptions"] >= 1, ring["preemptions"]
    assert sliding["preemptions"] == 0
    assert ring["tokens"] == sliding["tokens"]


# ------------------------------------------------------------------ Triton path

@pytest.mark.parametrize("residual_dtype", ["auto", "fp8_e4m3"])
def test_backend_triton_steps_equal_the_reference_steps(residual_dtype):
    """The backend's Triton launch code with the ring (``_forward_triton``:
    hand-over, attention, then the new window's residual write), interpreted,
    over prefill chunks longer than the ring's span, a decode beside a chunk
    and decodes that go round it, gives the reference step's outputs (CPU
    path) step by step and leaves the ring's pages byte for byte as the
    reference does; with the window in e4m3 too (K/V rounded on arrival, as
    ``forward`` hands them over)."""
    from unittest import mock

    from sim_paged import SimPagedCache
    from vllm_kvcomp import backend
    from vllm_kvcomp.backend import KvcompImpl, KvcompMetadata
    from vllm_kvcomp.kernels.attention_ref import kvcomp_step_reference
    from vllm_kvcomp.kernels.packing import residual_torch_dtype, round_to_window

    H, REP, D, bs = 2, 2, 64, 32
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=8, residual_ring=True,
                       residual_dtype=residual_dtype)
    # per step, tokens of each request: prefill chunks, a decode beside a chunk, decodes
    plan = [(100, 40), (90, 50), (1, 37), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]
    T = sum(a for a, _ in plan), sum(b for _, b in plan)
    g = torch.Generator().manual_seed(3)
    qkv = [(torch.randn(t, H * REP, D, generator=g),
            round_to_window(2 * torch.randn(t, H, D, generator=g), cfg),
            round_to_window(torch.randn(t, H, D, generator=g), cfg)) for t in T]
    sims = [SimPagedCache(cfg, bs, H, D, 2, max(T), seed=5) for _ in range(2)]
    assert sims[0].ring_pages * sims[0].bs_r < 90
    with mock.patch.object(backend, "current_config", lambda: cfg):
        impl = KvcompImpl(num_heads=H * REP, head_size=D, scale=D ** -0.5, num_kv_heads=H)
    impl._decode_launch = {}
    done = [0, 0]
    for chunks in plan:
        ends = [s + c for s, c in zip(done, chunks)]
        batches = [sim.batch(list(done), ends) for sim in sims]
        q, k, v = (torch.cat([qkv[i][j][s:e] for i, (s, e) in enumerate(zip(done, ends))])
                   for j in range(3))
        ref = torch.zeros_like(q)
        kvcomp_step_reference(q, k, v, ref, sims[0].packed, sims[0].residual, sims[0].layout,
                              cfg, D ** -0.5, batches[0])
        b = batches[1]
        qsl = torch.tensor(b.query_start_loc, dtype=torch.int32)
        lens = torch.tensor(b.seq_lens, dtype=torch.int32)

        def md(table, block, slots):
            return KvcompMetadata(
                num_actual_tokens=q.shape[0], num_reqs=2, query_start_loc=qsl, seq_lens=lens,
                block_table=table, slot_mapping=slots, block_size=block,
                max_query_len=max(chunks), max_seq_len=max(ends),
                num_decodes=2 if max(chunks) == 1 else int(chunks[0] == 1))
        out = torch.zeros_like(q)
        impl._forward_triton(q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1),
                             v.reshape(v.shape[0], -1), out.view(q.shape[0], -1),
                             sims[1].packed, sims[1].residual,
                             md(b.block_table, bs, None),
                             md(b.residual_block_table, b.residual_block_size,
                                b.residual_slot_mapping), sims[1].layout)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
        done = ends
    assert sims[1].residual.dtype == residual_torch_dtype(cfg, torch.float32)
    assert torch.equal(sims[1].residual.view(torch.uint8), sims[0].residual.view(torch.uint8))
