"""Prefix-cache lookups of the residual (full-precision window) group.

A hit of length ``h`` needs exactly the residual blocks covering
``[Q(h), h)``; blocks below ``Q`` at allocation time were never taken from the
pool. ``KvcompResidualManager.find_longest_cache_hit`` is checked here
against that definition over random sets of cached blocks, with a stand-in
block pool (the manager only calls ``get_cached_block``).
"""
import random

import pytest

import vllm_kvcomp
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


def _spec(residual_tokens, token_align, bs):
    return KvcompResidualSpec(block_size=bs, num_kv_heads=2, head_size=64, dtype=None,
                              sliding_window=residual_tokens + token_align,
                              residual_tokens=residual_tokens, token_align=token_align)


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
