"""A stand-in for vLLM's block manager and worker block tables, for driving
the reference step (and the Triton kernels) without an engine.

It allocates packed blocks for ``[0, n)`` and residual blocks only for the
live window ``[Q(n), n)`` (older entries are the null block 0, as
``KvcompResidualManager`` does), in shuffled order so that a kernel that
ignores the block table fails. With ``residual_ring`` the window's entries
repeat one ring of pages per request, as ``KvcompRingWindowManager``'s do.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.attention_ref import BatchView, kvcomp_step_reference
from vllm_kvcomp.kernels.packing import residual_torch_dtype
from vllm_kvcomp.layout import PageLayout, residual_block_size


class SimPagedCache:
    def __init__(self, cfg: KvcompConfig, block_size: int, num_kv_heads: int, head_size: int,
                 num_reqs: int, max_len: int, dtype=torch.float32, seed: int = 0):
        self.cfg = cfg
        self.layout = PageLayout(cfg, block_size, head_size, dtype.itemsize)
        self.bs = block_size
        self.bs_r = residual_block_size(self.layout)
        max_blocks = -(-max_len // block_size)
        max_blocks_r = -(-max_len // self.bs_r)
        rng = random.Random(seed)
        ids = list(range(1, num_reqs * max_blocks + 1))
        rng.shuffle(ids)
        self.block_table = torch.tensor(ids, dtype=torch.int32).view(num_reqs, max_blocks)
        self.packed = torch.zeros(num_reqs * max_blocks + 1, num_kv_heads,
                                  self.layout.head_page_bytes, dtype=torch.uint8)
        ids_r = list(range(1, num_reqs * max_blocks_r + 1))
        rng.shuffle(ids_r)
        self._pool_r = torch.tensor(ids_r, dtype=torch.int32).view(num_reqs, max_blocks_r)
        self.residual_table = torch.zeros(num_reqs, max_blocks_r, dtype=torch.int32)
        self.ring_pages = (-(-cfg.residual_window // self.bs_r) if cfg.residual_ring
                           else max_blocks_r)
        self.residual = torch.zeros(num_reqs * max_blocks_r + 1, 2, num_kv_heads, self.bs_r,
                                    head_size, dtype=residual_torch_dtype(cfg, dtype)
                                    ) if cfg.needs_residual_cache else None

    def batch(self, starts: list[int], ends: list[int]) -> BatchView:
        """Metadata of one step where request i goes from ``starts[i]`` to
        ``ends[i]`` cached tokens (its fresh tokens are in that order)."""
        qsl, slots = [0], []
        for i, (s, e) in enumerate(zip(starts, ends)):
            qsl.append(qsl[-1] + e - s)
            first_live = self.cfg.quantized_prefix_len(e) // self.bs_r
            for b in range(first_live, -(-e // self.bs_r)):
                # a ring (residual_ring) repeats its pages along the row
                self.residual_table[i, b] = self._pool_r[i, b % self.ring_pages]
            for p in range(s, e):
                blk = int(self.residual_table[i, p // self.bs_r])  # 0 = null block
                slots.append(blk * self.bs_r + p % self.bs_r)
        return BatchView(
            query_start_loc=qsl, seq_lens=list(ends), block_table=self.block_table,
            residual_block_table=self.residual_table.clone(),
            residual_slot_mapping=torch.tensor(slots, dtype=torch.int64),
            residual_block_size=self.bs_r)

    def reference_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                       end: int, prompt_len: int | None = None) -> torch.Tensor:
        """Output of ``kvcomp_step_reference`` for the step that takes request 0
        from ``start`` to ``end`` cached tokens, its fresh tokens the rows
        ``[start, end)`` of ``q`` / ``k`` / ``v``; ``prompt_len``: its prompt's
        length, for the policies that act once the prompt is processed."""
        batch = self.batch([start], [end])
        if prompt_len is not None:
            batch.prompt_lens = [prompt_len]
        out = torch.zeros(end - start, *q.shape[1:])
        kvcomp_step_reference(q[start:end], k[start:end], v[start:end], out, self.packed,
                              self.residual, self.layout, self.cfg, q.shape[-1] ** -0.5, batch)
        return out


def manager_on_pool(spec, num_blocks: int, max_in_flight_tokens: int = 512,
                    max_model_len: int = 1 << 16, enable_caching: bool = True,
                    kv_cache_group_id: int = 0, scheduler_block_size: int | None = None):
    """(pool, manager): vLLM's own block pool of ``num_blocks`` and the
    manager vLLM picks for ``spec``, as the scheduler builds them."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=enable_caching,
                     hash_block_size=spec.block_size)
    mgr = get_manager_for_kv_cache_spec(
        spec, max_in_flight_tokens=max_in_flight_tokens, max_model_len=max_model_len,
        block_pool=pool, enable_caching=enable_caching, kv_cache_group_id=kv_cache_group_id,
        scheduler_block_size=scheduler_block_size or spec.block_size)
    return pool, mgr


# ------------------------------------------------------------------ capacity

# the capacity vLLM reports for a shape's specs: one computation for the tests and the tool
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quality.capacity import CAPACITY_SHAPES, reported_tokens, shape_specs  # noqa: E402,F401
