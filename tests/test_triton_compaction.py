"""The Triton compaction kernel (kernels/triton_compaction.py) against its
reference (kernels/compaction.compact_kept), under the interpreter: random
pages of every bit width, key axis, key group, page size and KV head count,
kept counts that are no multiple of a page or a key group, with and without
H2O / A2SF score slots. The kernel's cache must equal the reference's byte
for byte, requantized per-channel keys included: both quantize with the same
fp32 operations and rounding (``packing.quantize_lastdim``, the store
kernel's ``_store_region``), and the dequantized keys they start from are
exact products (a code of at most 8 bits times an fp16 scale fits fp32's
mantissa), so a fused multiply-add on the GPU gives the same values. On a
GPU the kernel runs there, against the reference on the CPU."""
import random

import pytest
import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.kernels.compaction import compact_kept, keys_regrouped
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.kernels.triton_compaction import SUB_ELEMS, key_slices, triton_compact
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H2O = {"method": "h2o", "budget_tokens": 64}
A2SF = {"method": "a2sf", "budget_tokens": 64, "alpha": 0.5}

# (k/v bits, key axis, group, value group, page, KV heads, head size, model
# dtype bytes, eviction, kept); per-channel keys need page % group == 0
CASES = [
    ((4, 4), "channel", 32, None, 32, 2, 64, 2, None, 37),
    ((4, 4), "channel", 64, None, 64, 8, 64, 2, H2O, 101),
    ((4, 4), "channel", 128, None, 128, 1, 128, 2, None, 150),
    ((2, 2), "channel", 32, None, 32, 8, 64, 4, H2O, 45),
    ((2, 2), "channel", 32, 128, 64, 2, 128, 2, None, 77),
    ((2, 2), "channel", 128, None, 128, 2, 128, 2, A2SF, 131),
    ((8, 8), "channel", 64, None, 64, 2, 64, 2, None, 70),
    ((8, 8), "channel", 32, None, 32, 1, 32, 4, H2O, 33),
    ((4, 16), "channel", 32, None, 32, 2, 64, 2, A2SF, 61),
    ((16, 16), "channel", 128, None, 16, 2, 64, 2, None, 37),
    ((16, 16), "channel", 128, None, 32, 8, 32, 4, H2O, 45),
    ((16, 4), "channel", 32, None, 16, 2, 64, 2, None, 50),
    ((4, 4), "token", 32, None, 16, 2, 64, 2, None, 29),
    ((2, 2), "token", 64, None, 32, 8, 128, 2, H2O, 53),
    ((8, 8), "token", 128, None, 16, 1, 128, 2, None, 21),
    ((4, 2), "token", 32, None, 16, 2, 64, 4, A2SF, 40),
    ((2, 4), "token", 32, 64, 32, 2, 64, 2, H2O, 95),
]
IDS = [f"k{c[0][0]}v{c[0][1]}-{c[1]}-g{c[2]}-vg{c[3]}-bs{c[4]}-h{c[5]}-d{c[6]}-e{c[7]}-"
       f"{c[8]['method'] if c[8] else 'noscores'}-kept{c[9]}" for c in CASES]


def random_pages(layout: PageLayout, H: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Random bytes in every region, the (scale, min) pairs and scores finite:
    the reference moves those as fp16 / fp32 values and dequantizes keys."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randint(0, 256, (num_blocks, H, layout.head_page_bytes), dtype=torch.uint8,
                          generator=g)
    for which in ("k", "v"):
        p = packing._param_view(cache, layout, which)
        if p.numel():
            p[..., 0] = (torch.rand(p.shape[:-1], generator=g) * 0.3 + 1e-3).half()
            p[..., 1] = torch.randn(p.shape[:-1], generator=g).half()
    if layout.has_scores:
        s = score_view(cache, layout)
        s.copy_(torch.rand(s.shape, generator=g))
    return cache


def kept_positions(H: int, length: int, k: int, seed: int) -> torch.Tensor:
    """``[H, k]`` ascending positions of ``[0, length)``, each head its own:
    a spread sample, one that keeps a leading run in place, one from the
    end (every kept token moves by the most it can)."""
    rng = random.Random(seed)
    rows = []
    for h in range(H):
        kind = h % 3
        if kind == 0:
            rows.append(sorted(rng.sample(range(length), k)))
        elif kind == 1:
            run = k // 3
            rows.append(list(range(run)) + sorted(rng.sample(range(run, length), k - run)))
        else:
            rows.append(list(range(length - k, length)))
    return torch.tensor(rows, dtype=torch.int64)


def _setup(bits, axis, G, VG, bs, H, D, es, ev, k, seed=0):
    cfg = KvcompConfig.from_dict({
        "k_bits": bits[0], "v_bits": bits[1], "key_axis": axis, "group_size": G,
        "value_group_size": VG, "residual_tokens": 0, "eviction": ev})
    layout = PageLayout(cfg, bs, D, es)
    pages = -(-(2 * k + 3 * bs) // bs)  # the request's pages: kept tokens come from all of them
    num_blocks = pages + 5
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    row = torch.tensor(ids[:pages], dtype=torch.int32)
    cache = random_pages(layout, H, num_blocks, seed)
    kept = kept_positions(H, pages * bs - 5, k, seed)
    dtype = {2: torch.bfloat16, 4: torch.float32}[es]
    return cfg, layout, row, cache, kept, dtype


@pytest.mark.parametrize("bits,axis,G,VG,bs,H,D,es,ev,k", CASES, ids=IDS)
def test_kernel_cache_is_the_reference_cache(bits, axis, G, VG, bs, H, D, es, ev, k):
    """Byte for byte, at the default tiles and at tiles so small that every
    walk takes many steps (tile order and each tile's read-before-write
    matter there: a tile's sources are later tiles' destinations)."""
    cfg, layout, row, cache, kept, dtype = _setup(bits, axis, G, VG, bs, H, D, es, ev, k)
    assert layout.has_scores == (ev is not None)
    want = cache.clone()
    compact_kept(want, layout, row, kept, dtype)
    assert not torch.equal(want, cache)
    for sub in (SUB_ELEMS, 64):
        got = cache.clone().to(DEVICE)
        triton_compact(got, layout, row.to(DEVICE), kept.to(DEVICE), dtype, sub_elems=sub)
        got = got.cpu()
        bad = (got != want).nonzero()
        assert bad.shape[0] == 0, (f"sub_elems={sub}: {bad.shape[0]} bytes differ, first "
                                   f"(block, head, byte) {bad[:4].tolist()}")


def test_requantized_keys_are_the_kept_keys_regrouped():
    """What the byte equality above stands for with per-channel keys: each
    head's kept keys, as stored, quantized again as new groups of
    ``group_size`` tokens (the last padded with its last key); one more
    rounding of at most half a step of the new groups."""
    bits, G, bs, H, D, k = (2, 2), 32, 64, 2, 64, 77
    cfg, layout, row, cache, kept, dtype = _setup(bits, "channel", G, None, bs, H, D, 4, None, k)
    assert keys_regrouped(layout)
    k_st, _ = packing.dequantize_pages(cache, layout, row.long(), dtype)
    dev = cache.to(DEVICE)
    triton_compact(dev, layout, row.to(DEVICE), kept.to(DEVICE), dtype, sub_elems=64)
    k2, _ = packing.dequantize_pages(dev.cpu(), layout, row.long(), dtype)
    sel = k_st[kept, torch.arange(H)[:, None]]  # [H, k, D]
    n = -(-k // G)
    padded = torch.cat([sel, sel[:, -1:].expand(H, n * G - k, D)], 1).view(H, n, G, D)
    codes, scale, mn = packing.quantize_lastdim(padded.transpose(-1, -2), bits[0])
    regrouped = packing.dequantize_lastdim(codes, scale, mn).transpose(-1, -2).reshape(H, -1, D)
    torch.testing.assert_close(k2[:n * G].transpose(0, 1), regrouped, atol=0, rtol=0)
    assert (k2[:k].transpose(0, 1) - sel).abs().max() <= scale.float().max() / 2 + 1e-6


@pytest.mark.parametrize("regrouped", [True, False])
def test_nothing_but_the_kept_rows_changes(regrouped):
    """Pages of other requests and the pages past the kept tokens (past their
    last key group, with per-channel keys) are left as they were; with no
    kept token nothing changes."""
    axis = "channel" if regrouped else "token"
    bs, G, H, k = 32, 32, 2, 45
    cfg, layout, row, cache, kept, dtype = _setup((4, 4), axis, G, None, bs, H, 64, 2, H2O, k)
    before = cache.clone()
    cache, row, kept = cache.to(DEVICE), row.to(DEVICE), kept.to(DEVICE)
    triton_compact(cache, layout, row, kept[:, :0], dtype)
    assert torch.equal(cache.cpu(), before)
    triton_compact(cache, layout, row, kept, dtype)
    cache, row = cache.cpu(), row.cpu()
    others = sorted(set(range(cache.shape[0])) - set(row.tolist()))
    assert torch.equal(cache[others], before[others])
    end = -(-k // G) * G if regrouped else k
    last = -(-end // bs)  # pages from the one after the last written position
    assert torch.equal(cache[row[last:].long()], before[row[last:].long()])
