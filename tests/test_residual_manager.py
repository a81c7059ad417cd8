"""Prefix-cache lookups of the residual (full-precision window) group.

A hit of length ``h`` needs exactly the residual blocks covering
``[Q(h), h)``; blocks below ``Q`` at allocation time were never taken from the
pool. ``KvcompResidualManager.find_longest_cache_hit`` is checked here
against that definition over random sets of cached blocks, with a stand-in
block pool (the manager only calls ``get_cached_block``).
"""
import math
import random

import pytest

import vllm_kvcomp
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.spec import KvcompResidualManager, KvcompResidualSpec

vllm_kvcomp.register()


class _Block:
    def __init__(self, block_id, is_null=False):
        self.block_id, self.is_null = block_id, is_null


class _Pool:
    """Cached blocks by hash; hashes here are simply the block indices."""

    def __init__(self, cached: set[int], bs: int):
        self.cached, self.hash_block_size = cached, bs
        self.null_block = _Block(0, is_null=True)

    def get_cached_block(self, block_hash, group_ids):
        return [_Block(100 + block_hash)] * len(group_ids) if block_hash in self.cached else None


def _spec(residual_tokens, token_align, bs, concurrent_steps=1):
    return KvcompResidualSpec(block_size=bs, num_kv_heads=2, head_size=64, dtype=None,
                              sliding_window=residual_tokens + token_align,
                              residual_tokens=residual_tokens, token_align=token_align,
                              concurrent_steps=concurrent_steps)


def _expected(spec, cached, max_length, alignment):
    bs = spec.block_size
    for n in range(max_length // bs, 0, -1):
        h = n * bs
        if h % alignment == 0 and all(
                i in cached for i in range(spec.quantized_prefix_len(h) // bs, n)):
            return h
    return 0


def test_hit_after_a_first_chunk_needs_only_that_chunks_window():
    # residual 32, key groups of 32, residual blocks of 16: a first chunk of
    # 128 tokens holds residual blocks 6 and 7 ([96, 128)) and nothing below.
    spec = _spec(32, 32, 16)
    blocks, h = KvcompResidualManager.find_longest_cache_hit(
        list(range(20)), 270, [1], _Pool({6, 7}, 16), spec, False, 128)
    assert h == 128
    assert [b.is_null for b in blocks[0]] == [True] * 6 + [False] * 2
    assert [b.block_id for b in blocks[0][6:]] == [106, 107]
    # Without block 6 the window is incomplete: no hit at all.
    _, h = KvcompResidualManager.find_longest_cache_hit(
        list(range(20)), 270, [1], _Pool({7}, 16), spec, False, 128)
    assert h == 0


@pytest.mark.parametrize("residual,align,bs", [(32, 32, 16), (128, 128, 32), (128, 1, 16),
                                                (0, 64, 16), (40, 8, 8)])
def test_longest_hit_matches_definition(residual, align, bs):
    spec = _spec(residual, align, bs)
    rng = random.Random(residual * 7 + align + bs)
    for _ in range(200):
        n = rng.randrange(1, 40)
        cached = {i for i in range(n) if rng.random() < 0.7}
        max_length = rng.randrange(0, n * bs + 1)
        alignment = bs * rng.choice([1, 2, 4])
        blocks, h = KvcompResidualManager.find_longest_cache_hit(
            list(range(n)), max_length, [1, 2], _Pool(cached, bs), spec, False, alignment)
        assert h == _expected(spec, cached, max_length, alignment)
        assert all(len(b) == h // bs for b in blocks)
        live = range(spec.quantized_prefix_len(h) // bs, h // bs)
        for i, blk in enumerate(blocks[0]):
            assert blk.is_null == (i not in live)


@pytest.mark.parametrize("residual,align,bs", [(128, 128, 32), (128, 128, 16), (128, 32, 32),
                                                (128, 1, 16), (0, 64, 16), (40, 8, 8),
                                                (24, 12, 8), (32, 32, 64), (100, 48, 32)])
def test_admission_cap_bounds_the_blocks_a_step_holds(residual, align, bs):
    """A step over tokens [start, end) holds the residual blocks covering the
    old window [Q(start), start) (still read) and the new one [Q(end), end)
    (written); the per-request cap that vLLM's admission and capacity log use
    must bound that for every chunking (exhaustively over one period of the
    key groups and blocks, chunks of 1 token up to far beyond a window), and
    be what some chunking really holds."""
    spec = _spec(residual, align, bs)
    q = spec.quantized_prefix_len
    cap = spec.max_admission_blocks_per_request(0, 1 << 20)

    def blocks(lo, hi):  # block indices covering tokens [lo, hi)
        return range(lo // bs, -(-hi // bs)) if hi > lo else range(0)

    period = math.lcm(align, bs)
    base = (residual // period + 2) * period  # past the first window: Q(start) > 0
    worst = 0
    for start in range(base, base + period):
        old = blocks(q(start), start)
        for end in range(start + 1, start + residual + 3 * align + 2 * bs):
            new = blocks(q(end), end)
            shared = max(0, min(old.stop, new.stop) - max(old.start, new.start))
            worst = max(worst, len(old) + len(new) - shared)
    assert worst == cap


@pytest.mark.parametrize("residual,align,bs", [(128, 128, 32), (128, 1, 16), (24, 12, 8),
                                                (40, 8, 8)])
def test_admission_cap_covers_an_unsettled_step(residual, align, bs):
    """With async scheduling (vLLM's max_concurrent_batches = 2) a request's
    next step [s1, end) is scheduled while its step [s0, s1) still runs: the
    window that one reads, [Q(s0), s0), is held too. Random chunkings."""
    spec = _spec(residual, align, bs, concurrent_steps=2)
    q = spec.quantized_prefix_len
    cap = spec.max_admission_blocks_per_request(0, 1 << 20)
    assert cap > _spec(residual, align, bs).max_admission_blocks_per_request(0, 1 << 20)
    rng = random.Random(residual + align + bs)
    window = residual + align
    worst = 0
    for _ in range(20000):
        s0 = rng.randrange(window, 50 * window)
        s1 = s0 + rng.choice([1, rng.randrange(1, 3 * window)])
        end = s1 + rng.choice([1, rng.randrange(1, 3 * window)])
        held = set()
        for lo, hi in ((q(s0), s0), (q(s1), s1), (q(end), end)):
            held.update(range(lo // bs, -(-hi // bs)))
        worst = max(worst, len(held))
    assert worst <= cap
    assert worst >= cap - 2  # nearly reached by random chunkings



# ---------------------------------------------------------------- packed pages

@pytest.mark.parametrize("bits,group,residual", [(4, 128, 128), (2, 32, 128), (4, 32, 0)])
def test_packed_pages_are_taken_when_packed_tokens_reach_them(bits, group, residual):
    """The packed group holds cdiv(Q(n), bs) pages for n tokens, not cdiv(n, bs):
    the window's tokens [Q(n), n) are in the residual group. Checked through
    vLLM's own block pool and manager lookup, growing a request step by step;
    pages come back to the pool when it is freed."""
    import torch
    from sim_paged import manager_on_pool

    from vllm_kvcomp.spec import KvcompPackedManager, KvcompSpec

    bs = 128
    spec = KvcompSpec(block_size=bs, num_kv_heads=2, head_size=128, dtype=torch.uint8,
                      kvcomp_config=KvcompConfig(k_bits=bits, v_bits=bits, group_size=group,
                                                 residual_tokens=residual))
    pool, mgr = manager_on_pool(spec, 64, max_model_len=4096)
    assert isinstance(mgr, KvcompPackedManager)
    free0 = pool.get_num_free_blocks()
    held = 0
    rng = random.Random(bits + group + residual)
    n = 0
    while n < 3000:
        n += rng.choice([1, 1, 1, 37, 200])
        want = math.ceil(spec.packed_tokens(n) / bs)
        assert spec.packed_tokens(n) == max(0, n - residual) // group * group
        need = mgr.get_num_blocks_to_allocate("r", n, [], 0, 0, n)
        assert need == want - held, (n, need, want, held)
        mgr.allocate_new_blocks("r", n, n)
        held = len(mgr.req_to_blocks["r"])
        assert held == want
        assert pool.get_num_free_blocks() == free0 - held
        # fewer pages than full attention would hold, once there is a window
        assert held <= math.ceil(n / bs)
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


def test_packed_spec_memory_is_for_packed_tokens():
    """The per-request budget vLLM sizes its capacity log with: pages for
    Q(max_model_len) tokens."""
    import torch

    from vllm_kvcomp.spec import KvcompSpec

    class VC:
        class model_config:
            max_model_len = 4096

    spec = KvcompSpec(block_size=128, num_kv_heads=2, head_size=128, dtype=torch.uint8,
                      kvcomp_config=KvcompConfig(k_bits=4, v_bits=4, group_size=128,
                                                 residual_tokens=128))
    assert spec.max_memory_usage_bytes(VC) == (4096 - 128) // 128 * spec.page_size_bytes


@pytest.mark.parametrize("residual,align,bs", [(128, 128, 32), (128, 1, 16), (0, 128, 32),
                                                (24, 12, 8)])
def test_a_new_request_is_charged_what_it_takes(residual, align, bs):
    """A fresh request's first chunk (any length, prompts far beyond the
    window included) is charged exactly the residual blocks it then takes
    from vLLM's pool: the window [Q(n), n), never the whole chunk. A charge of
    the whole chunk once kept a long prompt waiting forever on a pool that
    start-up had accepted. The same holds for a request resumed after
    preemption and for each later chunk."""
    from sim_paged import manager_on_pool

    spec = _spec(residual, align, bs)
    pool, mgr = manager_on_pool(spec, 4096, enable_caching=False)
    assert isinstance(mgr, KvcompResidualManager)
    rng = random.Random(residual + align + bs)
    for r in range(60):
        rid, n = f"r{r}", 0
        first = rng.choice([1, 7, bs, residual + align, 1000, 5000, rng.randrange(1, 9000)])
        for chunk in [first] + [rng.choice([1, 1, 300]) for _ in range(4)]:
            n += chunk
            free = pool.get_num_free_blocks()
            need = mgr.get_num_blocks_to_allocate(rid, n, [], n - chunk, n - chunk, n)
            mgr.allocate_new_blocks(rid, n, n)
            assert free - pool.get_num_free_blocks() == need, (rid, n, need)
            if chunk == first:
                assert need <= -(-(spec.residual_tokens + spec.token_align + bs) // bs) + 1
            mgr.num_cached_block[rid] = 0  # running from here on, as after its first step
        mgr.free(rid)
        mgr.num_cached_block.pop(rid, None)
    assert pool.get_num_free_blocks() == 4095  # the null block aside, all back
