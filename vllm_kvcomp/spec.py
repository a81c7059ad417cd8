"""KV cache specs and block managers of the KVCOMP backend.

Two groups per model:

* ``KvcompSpec`` (one per attention layer): the packed pages. It is a
  ``FullAttentionSpec`` so the scheduler, prefix caching and preemption treat
  it as ordinary full attention; its page size differs, and its manager
  (``KvcompPackedManager``) takes a page from the pool only once packed
  tokens reach it, not while its tokens still sit in the residual window.
* ``KvcompResidualSpec`` (one per virtual sub-layer ``<layer>.kvcomp_residual``):
  the full-precision window of the most recent tokens. Its manager keeps only
  the blocks that cover ``[Q(n), n)`` and hands everything older back to the
  pool, so its per-request footprint is bounded by the window, not the prompt.

* ``KvcompRingWindowSpec`` replaces ``KvcompResidualSpec`` with
  ``residual_ring``: the window as a fixed ring of pages per request
  (``KvcompRingWindowManager``), one window per request however many engine
  steps are unsettled.

* ``KvcompEvictionSpec`` replaces ``KvcompSpec`` when token eviction is on
  (``eviction`` setting): the same packed pages, but its manager
  (``KvcompEvictionManager``) hands the pages that the eviction policy drops
  back to the pool as the request grows.

* ``KvcompStreamSpec`` (one per virtual sub-layer ``<layer>.kvcomp_stream``,
  head maps only): the streaming heads' K/V in the model dtype. Its manager
  (``KvcompStreamManager``) holds per request only the sink pages and the
  pages of the recent window, so the streaming heads cost a bounded amount
  per request; the layer's own ``KvcompSpec`` then covers the retrieval heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from typing_extensions import Self
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    SlidingWindowManager,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.layout import PageLayout


def longest_hit(manager_cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                block_size: int, drop_eagle_block: bool, alignment_tokens: int,
                dcp_world_size: int, pcp_world_size: int, held_pages) -> tuple:
    """``find_longest_cache_hit`` of a manager that holds, at ``h`` tokens,
    only the pages ``held_pages(h)`` (null placeholders
    elsewhere): the longest ``h`` (whole pages, a multiple of
    ``alignment_tokens``, at most ``max_length``) whose held pages are all
    cached, as ``(per group: those pages, null elsewhere), h``."""
    assert not drop_eagle_block, "KVCOMP does not support speculative decoding"
    assert dcp_world_size == 1 and pcp_world_size == 1
    bs = block_size
    assert alignment_tokens % bs == 0
    block_hashes = resolve_block_hashes(
        block_hashes, block_pool.hash_block_size, bs,
        supports_fine_grained_hash_lookup=manager_cls.supports_fine_grained_hash_lookup,
        alignment_tokens=alignment_tokens,
    )
    lookup: dict[int, list] = {}

    def cached(i):
        if i not in lookup:
            lookup[i] = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
        return lookup[i]

    for num_blocks in range(max_length // bs, 0, -1):
        h = num_blocks * bs
        if h % alignment_tokens:
            continue
        held = held_pages(h)
        if all(cached(i) for i in held):
            computed = tuple([block_pool.null_block] * num_blocks for _ in kv_cache_group_ids)
            for i in held:
                for blocks, blk in zip(computed, cached(i)):
                    blocks[i] = blk
            return computed, h
    return tuple([] for _ in kv_cache_group_ids), 0


class _OneSpecPerGroup:
    """A spec that every layer of its KV cache group holds alike: no
    per-layer field to reconcile, so merging keeps the first."""

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        assert all(s == specs[0] for s in specs), (
            f"all KVCOMP layers of a KV cache group must share one {cls.__name__}"
        )
        return specs[0]


class _BoundedPagesSpec(_OneSpecPerGroup):
    """A spec whose manager (``_BoundedPagesManager``) frees a request's older
    pages as it grows, so a request holds at most
    ``max_admission_blocks_per_request`` pages at any context length: the
    pool is sized by that bound, as vLLM does for its own recycling specs."""

    # Tokens scheduled but not settled that the bound covers (vLLM's
    # max_in_flight_tokens); a dataclass field where the bound depends on it.
    max_in_flight_tokens = 0

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.max_admission_blocks_per_request(
            vllm_config.max_in_flight_tokens, vllm_config.model_config.max_model_len
        ) * self.page_size_bytes


class _BoundedPagesManager:
    """Manager of a ``_BoundedPagesSpec``: admits by the spec's bound, and
    never finds a prefix-cache hit (the pages a cached prefix needs were
    freed by its own request, maybe reused since)."""

    def __init__(self, kv_cache_spec: _BoundedPagesSpec, **kwargs) -> None:
        # vLLM computes an admission cap only for its own recycling specs.
        if kwargs.get("max_admission_blocks_per_request") is None:
            kwargs["max_admission_blocks_per_request"] = (
                kv_cache_spec.max_admission_blocks_per_request(
                    kv_cache_spec.max_in_flight_tokens, 1 << 62))
        super().__init__(kv_cache_spec, **kwargs)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        return tuple([] for _ in kv_cache_group_ids), 0

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0


@dataclass(frozen=True, kw_only=True)
class KvcompSpec(FullAttentionSpec):
    """Packed K/V pages; ``dtype`` is uint8 and the page is bytes."""

    kvcomp_config: KvcompConfig = KvcompConfig()
    model_dtype: torch.dtype = torch.bfloat16

    # cached: the spec is frozen, so the layout can never go stale
    @cached_property
    def layout(self) -> PageLayout:
        return PageLayout(
            self.kvcomp_config,
            self.block_size,
            self.head_size,
            self.model_dtype.itemsize,
        )

    @property
    def real_page_size_bytes(self) -> int:
        return self.layout.page_bytes(self.num_kv_heads)

    def packed_tokens(self, num_tokens: int) -> int:
        """Q(n): the tokens of an n-token sequence that live in packed pages."""
        return self.kvcomp_config.quantized_prefix_len(num_tokens)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # pages for Q(max_model_len) tokens: the window's are in the residual group
        max_model_len = vllm_config.model_config.max_model_len
        return cdiv(self.packed_tokens(max_model_len), self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        fields = ("kvcomp_config", "model_dtype")
        for f in fields:
            assert all(getattr(s, f) == getattr(specs[0], f) for s in specs), (
                f"all KVCOMP layers of a KV cache group must share {f}"
            )
        return replace(merged, **{f: getattr(specs[0], f) for f in fields})


@dataclass(frozen=True, kw_only=True)
class KvcompResidualSpec(_OneSpecPerGroup, SlidingWindowSpec):
    """Full-precision (model dtype) K and V of the most recent tokens.

    ``sliding_window = residual_tokens + token_align`` covers the longest span
    ``n - Q(n)`` plus one, which is what a prefix-cache hit must find cached.
    The page is padded to the packed page size (``page_size_padded``)."""

    residual_tokens: int = 0
    token_align: int = 1
    # Engine steps that can be scheduled and not yet settled at once (vLLM's
    # max_concurrent_batches: 2 with async scheduling): each still reads the
    # window it started from, so their windows are all held.
    concurrent_steps: int = 1

    def quantized_prefix_len(self, num_tokens: int) -> int:
        a = self.token_align
        return max(0, num_tokens - self.residual_tokens) // a * a

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        # A step over [start, end) still reads the old window [Q(start),
        # start) and writes the new one [Q(end), end), however long the chunk;
        # with k steps unsettled (async scheduling), k + 1 windows are held.
        # A window is at most R + align - 1 tokens and starts where Q (a
        # multiple of align) falls in a block: at most bs - gcd(align, bs)
        # slots in, none when the key groups are block-aligned.
        bs = self.block_size
        longest = self.residual_tokens + self.token_align - 1
        per_window = cdiv(longest + bs - math.gcd(self.token_align, bs), bs)
        return min((self.concurrent_steps + 1) * per_window, cdiv(max_model_len, bs))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(s, KvcompResidualSpec) and s == self for s in kv_cache_specs.values()
        )


class KvcompResidualManager(SlidingWindowManager):
    """Holds, per request, only the residual blocks covering ``[Q(n), n)``.

    Blocks whose tokens are all below ``Q(num_tokens)`` at allocation time
    are never taken from the pool (they are ``null_block`` placeholders): the
    worker packs those tokens straight from the fresh K/V of the step.
    """

    kv_cache_spec: KvcompResidualSpec

    def _first_live_block(self, num_tokens: int) -> int:
        return self.kv_cache_spec.quantized_prefix_len(num_tokens) // self.block_size

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return self.kv_cache_spec.quantized_prefix_len(num_computed_tokens)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        """Longest hit ``h`` whose residual blocks ``[Q(h), h)`` are all cached.

        The parent asks for a fixed run of ``sliding_window - 1`` tokens, but
        what a hit needs here depends on ``h``: ``Q`` moves in steps of the
        key group, and blocks below ``Q`` at allocation time were never taken
        from the pool (null placeholders), so a fixed run longer than
        ``h - Q(h)`` misses hits that are really there."""
        spec = kv_cache_spec
        return longest_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                           spec.block_size, drop_eagle_block, alignment_tokens,
                           dcp_world_size, pcp_world_size,
                           lambda h: range(spec.quantized_prefix_len(h) // spec.block_size,
                                           h // spec.block_size))

    def get_num_blocks_to_allocate(
        self,
        request_id,
        num_tokens,
        new_computed_blocks,
        total_computed_tokens,
        num_local_computed_tokens,
        num_tokens_main_model,
        apply_admission_cap: bool = False,
    ) -> int:
        held = len(self.req_to_blocks.get(request_id, ()))
        required = cdiv(num_tokens, self.block_size)
        if request_id in self.num_cached_block:
            assert len(new_computed_blocks) == 0
            return max(0, required - max(held, self._first_live_block(num_tokens)))
        # New or resumed request: exactly what add_local_computed_blocks and
        # allocate_new_blocks take. The parent's count charges every block of
        # the chunk, though those below Q are never taken: a long first chunk
        # then needed more blocks than the pool that start-up accepted, and
        # the request waited forever.
        hits = held + len(new_computed_blocks)
        new = max(0, required - max(hits, self._first_live_block(num_tokens)))
        # cached hit blocks with no other user leave the free queue when touched
        new += self._get_num_evictable_blocks(new_computed_blocks)
        if self._has_partial_local_hit(new_computed_blocks, num_local_computed_tokens):
            new += 1  # allocate_new_blocks' copy-on-write block
        return new

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        # A prefix hit on a partly filled block: let the parent redirect it to
        # a private copy first (that path never touches the window logic).
        cow_blocks = []
        if request_id in self._partial_hit_reqs:
            cow_blocks = super().allocate_new_blocks(request_id, 0, 0)
        req_blocks = self.req_to_blocks[request_id]
        prev_len = len(req_blocks)
        required = cdiv(num_tokens, self.block_size)
        first_live = min(self._first_live_block(num_tokens), required)
        if prev_len < first_live:
            req_blocks.extend([self._null_block] * (first_live - prev_len))
        num_new = required - len(req_blocks)
        if num_new > 0:
            new_blocks = self.block_pool.get_new_blocks(num_new)
            req_blocks.extend(new_blocks)
            if self._record_new_block_ids:
                self.new_block_ids.extend(b.block_id for b in new_blocks)
        # The worker appends what we return to its block-table row, so the
        # null placeholders must be returned too or every later position
        # would shift.
        return cow_blocks + req_blocks[prev_len:]


@dataclass(frozen=True, kw_only=True)
class KvcompRingWindowSpec(KvcompResidualSpec):
    """The window held as a ring (``residual_ring``): ``ring_pages`` pages
    per request for its whole life, position ``p`` in slot ``p mod span``.
    A step reads the old window before it writes the new one and steps run
    in order, so one ring serves every unsettled step."""

    @property
    def ring_pages(self) -> int:
        # the window after a step, [Q(n), n), is at most R + align - 1 tokens,
        # all distinct modulo the span
        return cdiv(self.residual_tokens + self.token_align - 1, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int,
                                         max_model_len: int) -> int:
        return self.ring_pages


class KvcompRingWindowManager(KvcompResidualManager):
    """Manager of a ``KvcompRingWindowSpec``: a request takes its ring at its
    first allocation and keeps it until it is freed (finished or preempted).

    Block-table entry ``i`` is ring page ``i mod ring_pages`` (``null_block``
    where the whole block was below ``Q`` when it was allocated), so vLLM's
    own slot mapping, and every reader that indexes the row by position,
    address the ring. Ring pages are rewritten in place, so they are never
    hashed: the only prefix-cache hits are those that need no window
    (``Q(h) == h``, the parent's search finds them from null blocks alone)."""

    kv_cache_spec: KvcompRingWindowSpec

    def __init__(self, kv_cache_spec: KvcompRingWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._rings: dict[str, list] = {}

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap: bool = False):
        # hits are null blocks only: nothing to take from the free queue
        return 0 if request_id in self._rings else self.kv_cache_spec.ring_pages

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        ring = self._rings.get(request_id)
        if ring is None:
            ring = self._rings[request_id] = self.block_pool.get_new_blocks(
                self.kv_cache_spec.ring_pages)
        blocks = self.req_to_blocks[request_id]
        prev = len(blocks)
        required = cdiv(num_tokens, self.block_size)
        first_live = self._first_live_block(num_tokens)
        for i in range(prev, required):
            blocks.append(self._null_block if i < first_live else ring[i % len(ring)])
        # the worker appends these to its block-table row
        return blocks[prev:]

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None):
        pass  # the ring is held until the request is freed

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        self.num_cached_block[request.request_id] = len(
            self.req_to_blocks.get(request.request_id, ()))

    def pop_blocks_for_free(self, request_id):
        # the row repeats ring pages and holds nulls: free each page once
        super().pop_blocks_for_free(request_id)
        return self._rings.pop(request_id, [])

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0


class KvcompPackedManager(FullAttentionManager):
    """Full attention over packed pages, holding per request only the pages
    that packed tokens ``[0, Q(n))`` reach.

    The tokens ``[Q(n), n)`` live in the residual group; the packed page
    they will land in is taken from the pool when the store kernel first
    writes into it (``Q`` of the step's end), so a request does not hold 1-2
    empty pages for its window (about 7 % of a 3K-token request at k4v4).
    Block positions stay those of full attention: page ``i`` holds tokens
    ``[i * bs, (i + 1) * bs)``, so a prefix-cache hit of ``h`` tokens finds
    the pages of ``[0, h)`` only where an earlier request had packed that far
    (``h <= Q(n)`` of that request); the coordinator's search stops at the
    first missing page, as for full attention.
    """

    kv_cache_spec: KvcompSpec

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap: bool = False):
        return super().get_num_blocks_to_allocate(
            request_id, self.kv_cache_spec.packed_tokens(num_tokens), new_computed_blocks,
            total_computed_tokens, num_local_computed_tokens, num_tokens_main_model,
            apply_admission_cap)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(
            request_id, self.kv_cache_spec.packed_tokens(num_tokens), num_tokens_main_model)

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        # only pages that exist: full blocks of tokens past the last page are
        # not taken yet (their hashes are cached when the pages are)
        held = len(self.req_to_blocks.get(request.request_id, ()))
        return super().cache_blocks(request, min(num_tokens, held * self.block_size),
                                    *args, **kwargs)


@dataclass(frozen=True, kw_only=True)
class KvcompEvictionSpec(_BoundedPagesSpec, AttentionSpec):
    """Packed pages under token eviction (``kvcomp_config.eviction``).

    Not a ``FullAttentionSpec``: vLLM groups a spec with every layer that is an
    instance of the first layer's registered base, so a subclass of it would
    be merged into a full-attention group (and get its manager) whenever some
    other layer is full attention. It is registered as its own base instead.
    """

    kvcomp_config: KvcompConfig
    model_dtype: torch.dtype = torch.bfloat16
    # Tokens scheduled but not settled (vLLM's max_in_flight_tokens): the
    # pages they still read are freed only once they are processed.
    max_in_flight_tokens: int = 0

    layout = cached_property(KvcompSpec.layout.func)
    real_page_size_bytes = KvcompSpec.real_page_size_bytes
    packed_tokens = KvcompSpec.packed_tokens

    @cached_property
    def policy(self):
        return self.kvcomp_config.eviction.policy(self.block_size)

    @property
    def scored(self) -> bool:
        """H2O / A2SF: tokens' scores live in their pages' score slots."""
        return self.layout.has_scores

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int,
                                         max_model_len: int) -> int:
        """Packed pages a request can hold at once: the sink pages, and the
        pages from the lowest one still kept for the processed tokens to the
        newest packed token. The lowest kept position is ``min(c - R, Q(c))``
        for ``c`` processed tokens (``policies.streaming``), at least
        ``c - max(R, residual window)``; the newest packed token is below
        ``c + max_in_flight_tokens``. SnapKV frees only once the prompt is
        processed, so a prompt holds all its pages while it is prefilled."""
        cfg = self.kvcomp_config
        if cfg.eviction.method == "snapkv":
            return cdiv(self.packed_tokens(max_model_len), self.block_size)
        if self.scored:
            # H2O / A2SF evict only once the prompt is processed, and hold a
            # page for every cached token (its score slot)
            return cdiv(max_model_len, self.block_size)
        lag = max(cfg.eviction.recent_tokens, cfg.residual_window) + max_in_flight_tokens
        full = cdiv(self.packed_tokens(max_model_len), self.block_size)
        return min(self.policy.max_held_pages(lag), full)


class KvcompEvictionManager(_BoundedPagesManager, KvcompPackedManager):
    """Packed pages of a request under eviction: pages are taken as for
    ``KvcompPackedManager`` (once packed tokens reach them) and given back,
    replaced in place by vLLM's null block, as soon as the policy drops them
    for the processed tokens (SnapKV: once the prompt is processed, the pages
    between the moved kept tokens and the tail kept in place). Block-table rows keep their positions; the
    worker's copy of a row keeps the stale ids of freed pages, which the
    attention never reads (it asks the same policy). No prefix-cache hits
    either way: what a prompt token attended depends on the drops made while
    it was prefilled."""

    kv_cache_spec: KvcompEvictionSpec

    # H2O / A2SF: a page for every cached token, packed or still in the
    # full-precision window, whose score slot the decode steps accumulate into
    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap: bool = False):
        if not self.kv_cache_spec.scored:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap)
        return FullAttentionManager.get_num_blocks_to_allocate(
            self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model, apply_admission_cap)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if not self.kv_cache_spec.scored:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        return FullAttentionManager.allocate_new_blocks(self, request_id, num_tokens,
                                                        num_tokens_main_model)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None):
        c = processed_computed_tokens
        spec = self.kv_cache_spec
        if spec.scored:
            # the worker's eviction steps follow from the token count alone
            # (policies.h2o.PagedH2O): the same pages are empty on both sides
            if num_prompt_tokens is None:
                return
            lo, hi = spec.policy.freed_pages(c, spec.packed_tokens(c), num_prompt_tokens)
        elif spec.kvcomp_config.eviction.method == "snapkv":
            # the step that completed the prompt moved the kept tokens below
            # the freed pages; the layout follows from the prompt length alone
            P = num_prompt_tokens
            if P is None or c < P:
                return
            lo, hi = spec.policy.freed_pages(P, spec.packed_tokens(P))
            hi = min(hi, len(self.req_to_blocks.get(request_id, ())))
        else:
            lo, hi = spec.policy.dropped_pages(c, spec.packed_tokens(c))
        self._remove_blocks_in_range(request_id, lo, hi)

    def cache_blocks(self, request, num_tokens, *args, **kwargs):
        # No page gets a hash (nothing could hit it, see find_longest_cache_hit),
        # so a freed page goes back to the pool as a plain free page.
        held = len(self.req_to_blocks.get(request.request_id, ()))
        self.num_cached_block[request.request_id] = min(num_tokens // self.block_size, held)


@dataclass(frozen=True, kw_only=True)
class KvcompStreamSpec(_BoundedPagesSpec, AttentionSpec):
    """Streaming heads of a head map: model-dtype K and V pages
    ``(2, num_kv_heads, block_size, head_size)``, padded to the packed page
    size (``page_size_padded``); a request keeps the first ``sink_tokens`` and
    the last ``recent_tokens`` tokens (whole pages). Its own registry base, not
    ``FullAttentionSpec`` or ``SlidingWindowSpec``: a subclass of either would
    be grouped with (and managed as) those layers."""

    sink_tokens: int
    recent_tokens: int
    # engine steps scheduled and not yet settled at once (see KvcompResidualSpec)
    concurrent_steps: int = 1

    @cached_property
    def policy(self):
        from vllm_kvcomp.policies.streaming import StreamingLLM

        return StreamingLLM(self.sink_tokens, self.recent_tokens, self.block_size)

    def live_pages(self, num_tokens: int) -> tuple[int, int, int]:
        """``(sink_pages, lo, hi)``: after a step that ends at ``num_tokens``
        only pages ``[0, sink_pages)`` and ``[lo, hi)`` are ever read again;
        the step's other tokens are attended from the fresh K/V."""
        bs = self.block_size
        return (self.policy.sink_pages, max(0, num_tokens - self.recent_tokens) // bs,
                cdiv(num_tokens, bs))

    def held_pages(self, num_tokens: int, start: int = 0) -> list[int]:
        """The pages from ``start`` on that a request holds from the pool
        after a step ending at ``num_tokens``: ``live_pages``' sinks and
        window; the pages between are null placeholders."""
        sink, lo, hi = self.live_pages(num_tokens)
        return [*range(start, min(sink, hi)), *range(max(lo, sink, start), hi)]

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int,
                                         max_model_len: int) -> int:
        # sinks, the window still read by the oldest unsettled step, and the
        # window each unsettled step writes (their chunks' middles are never
        # taken from the pool)
        per_window = cdiv(self.recent_tokens + self.block_size - 1, self.block_size)
        held = self.policy.sink_pages + (self.concurrent_steps + 1) * per_window
        return min(held, cdiv(max_model_len, self.block_size))


class KvcompStreamManager(_BoundedPagesManager, FullAttentionManager):
    """Pages of a request's streaming heads: a page is taken from the pool only
    when some later query will read it (a sink page, or one in the recent
    window of the step's end), the others are ``null_block`` placeholders, and
    pages leave for the pool, in place, once the processed tokens' window has
    passed them. Full pages are hashed as vLLM hashes full attention's, so a
    prefix of ``h`` tokens hits where its sink pages and the pages of the
    window before ``h`` are still cached (where an earlier request's chunk
    or decode ended, as a sliding window's hits); the pages between are
    placeholders, never read."""

    kv_cache_spec: KvcompStreamSpec
    # hits are whole pages (find_longest_cache_hit)
    supports_fine_grained_hash_lookup = False

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        """Longest ``h`` whose pages ``live_pages(h)`` (the sinks and the window
        every query from ``h`` on reads) are all cached; the others are null."""
        return longest_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                           kv_cache_spec.block_size, drop_eagle_block, alignment_tokens,
                           dcp_world_size, pcp_world_size, kv_cache_spec.held_pages)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap: bool = False):
        held = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        # cached hit pages with no other user leave the free queue when touched
        return (len(self.kv_cache_spec.held_pages(num_tokens, start=held))
                + self._get_num_evictable_blocks(new_computed_blocks))

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        blocks = self.req_to_blocks[request_id]
        prev = len(blocks)
        held = self.kv_cache_spec.held_pages(num_tokens, start=prev)
        hi = cdiv(num_tokens, self.block_size)
        new = iter(self.block_pool.get_new_blocks(len(held)))
        live = set(held)
        blocks.extend(next(new) if i in live else self._null_block for i in range(prev, hi))
        # the worker appends every entry to its block-table row: positions stay
        # page-indexed, null placeholders included
        return blocks[prev:]

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None):
        # the placeholders sit between held pages, so this walks the whole
        # range (the parent's walk stops at the first null entry)
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        sink, lo, _ = self.kv_cache_spec.live_pages(processed_computed_tokens)
        freed = []
        for i in range(min(lo, len(blocks)) - 1, sink - 1, -1):
            if blocks[i] != self._null_block:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)

    def _cache_partial_tail_block(self, request, num_tokens) -> None:
        # a prompt's partly filled last page is never looked up (hits are whole
        # pages), and the page there may be a placeholder
        return


_REGISTERED = False


def register_specs() -> None:
    """Register the specs with vLLM's registry; safe to call many times."""
    global _REGISTERED
    if _REGISTERED:
        return
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KvcompSpec, KvcompPackedManager, uniform_type_base_spec=FullAttentionSpec
    )
    KVCacheSpecRegistry.register(
        KvcompEvictionSpec, KvcompEvictionManager, uniform_type_base_spec=KvcompEvictionSpec
    )
    KVCacheSpecRegistry.register(
        KvcompStreamSpec, KvcompStreamManager, uniform_type_base_spec=KvcompStreamSpec
    )
    KVCacheSpecRegistry.register(
        KvcompResidualSpec,
        KvcompResidualManager,
        uniform_type_base_spec=KvcompResidualSpec,
    )
    KVCacheSpecRegistry.register(
        KvcompRingWindowSpec, KvcompRingWindowManager,
        uniform_type_base_spec=KvcompRingWindowSpec,
    )
    _REGISTERED = True
