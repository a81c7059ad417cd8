"""The Triton decode-score kernel (kernels/triton_scores.py) against its
PyTorch reference (eviction_gpu.add_decode_scores), under the interpreter:
H2O and A2SF pages of several bit widths, page sizes, KV head counts and
query groups, read widths that are no multiple of the kernel's tile,
requests with and without an evicted range, and block tables whose entries
past a request's pages and inside its freed range point at other requests'
pages. Only the score slots of the positions a request read may change.

Tolerance: both sides compute in fp32 but not in one order. The kernel sums
a query group's probabilities one query head after another and writes
``old * decay + step`` (a GPU may fuse that into one FMA); the reference
sums with torch's reduction and writes ``old + (new - old)``. Each is a few
fp32 roundings off the exact score, and the scores here stay below rep + 1
(fp32 ulp under 1e-6), so 1e-6 absolute plus 1e-6 relative (10 ulps or more)
bounds the difference with room; a position scored twice, skipped or given
another's probability is off by a whole probability, and the slots that
moved are checked exactly. On a GPU the kernel runs there, against the
reference on the CPU."""
import random

import pytest
import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.eviction_gpu import add_decode_scores
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.kernels.triton_scores import BLOCK_T, triton_add_decode_scores
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = RTOL = 1e-6

# (k/v bits, page, KV heads, query heads a KV head, method, kernel tile)
CASES = [
    ((4, 4), 16, 2, 4, "h2o", 16),
    ((4, 4), 64, 8, 4, "a2sf", 64),
    ((2, 2), 32, 8, 1, "a2sf", 32),
    ((2, 2), 16, 1, 8, "h2o", 32),
    ((8, 8), 64, 1, 8, "h2o", BLOCK_T),
    ((8, 8), 32, 2, 1, "a2sf", 16),
    ((16, 16), 32, 2, 8, "a2sf", 16),
    ((16, 16), 16, 8, 4, "h2o", BLOCK_T),
]
IDS = [f"k{c[0][0]}v{c[0][1]}-bs{c[1]}-h{c[2]}-rep{c[3]}-{c[4]}-t{c[5]}" for c in CASES]


def _layout(bits, bs, method):
    ev = {"method": method, "budget_tokens": 64}
    if method == "a2sf":
        ev["alpha"] = 0.5
    cfg = KvcompConfig.from_dict({"k_bits": bits[0], "v_bits": bits[1], "group_size": 16,
                                  "residual_tokens": 16, "eviction": ev})
    return PageLayout(cfg, bs, 32, 2)


def _batch(layout, H, rep, seed, evict=True):
    """(cache, probs, block table, seq_lens, evicted ranges, lens, ranges):
    every request's pages its own, the table's entries past them and inside
    its freed range another request's, a few pages nobody's; probabilities
    past what a request read are NaN, in rows wider than the read width.
    ``evict``: some requests with an evicted range, else none."""
    bs = layout.block_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = [1, bs + 5, 3 * bs + 7, 5 * bs - 1, 2 * bs, 12 * bs + 9]
    ranges = [(0, 0), (0, 0), (5, 2 * bs), (bs // 2 + 3, 4 * bs), (0, bs), (bs + 1, 4 * bs)]
    if not evict:
        ranges = [(0, 0)] * len(lens)
    B = len(lens)
    pages = [-(-n // bs) for n in lens]
    nb = sum(pages) + 3
    perm = torch.randperm(nb, generator=g).tolist()
    own, k = [], 0
    for p in pages:
        own.append(perm[k:k + p])
        k += p
    table = torch.empty(B, max(pages) + 2, dtype=torch.int32)
    for i, (lo, hi) in enumerate(ranges):
        others = [x for j in range(B) if j != i for x in own[j]]
        row = own[i] + [rng.choice(others) for _ in range(table.shape[1] - pages[i])]
        for pg in range(-(-lo // bs), hi // bs):  # freed pages, now someone else's
            row[pg] = rng.choice(others)
        table[i] = torch.tensor(row)
    cache = torch.randint(0, 256, (nb, H, layout.head_page_bytes), dtype=torch.uint8,
                          generator=g)
    score_view(cache, layout).copy_(torch.rand(nb, H, bs, generator=g))
    reads = [n - (hi - lo) for n, (lo, hi) in zip(lens, ranges)]
    W = max(reads) + 3
    probs = torch.full((B, H * rep, W + 5), float("nan"))[:, :, :W]
    for i, r in enumerate(reads):
        probs[i, :, :r] = torch.softmax(torch.randn(H * rep, r, generator=g), dim=-1)
    seq = torch.tensor(lens, dtype=torch.int32)
    ev = torch.tensor(ranges, dtype=torch.int32)
    return cache, probs, table, seq, ev, lens, ranges


def _read_slots(layout, cache, table, lens, ranges):
    """``[nb, H, bs]`` bool: the score slots of the positions read."""
    bs = layout.block_size
    mask = torch.zeros(cache.shape[:2] + (bs,), dtype=torch.bool)
    for i, (n, (lo, hi)) in enumerate(zip(lens, ranges)):
        for pos in [*range(lo), *range(hi, n)]:
            mask[table[i, pos // bs], :, pos % bs] = True
    return mask


def _run(probs, cache, layout, table, seq, ev, block_t):
    got = cache.to(DEVICE, copy=True)
    triton_add_decode_scores(probs.to(DEVICE), got, layout, layout.config, table.to(DEVICE),
                             seq.to(DEVICE), None if ev is None else ev.to(DEVICE),
                             block_t=block_t)
    return got.cpu()


@pytest.mark.parametrize("bits,bs,H,rep,method,block_t", CASES, ids=IDS)
def test_kernel_writes_the_reference_scores(bits, bs, H, rep, method, block_t):
    layout = _layout(bits, bs, method)
    cache, probs, table, seq, ev, lens, ranges = _batch(layout, H, rep, seed=bs + H + rep)
    W = probs.shape[2]
    assert W % block_t and W > block_t or block_t == BLOCK_T  # partial tiles
    want = cache.clone()
    add_decode_scores(probs, want, layout, layout.config, table, seq, ev)
    got = _run(probs, cache, layout, table, seq, ev, block_t)
    sc_got, sc_want, sc_old = (score_view(c, layout) for c in (got, want, cache))
    torch.testing.assert_close(sc_got, sc_want, atol=ATOL, rtol=RTOL)
    # exactly the read positions' slots moved (every one of them: each read adds
    # a positive probability); other requests' pages behind past or freed table
    # entries, and the pages nobody holds, kept every bit
    assert torch.equal(sc_got != sc_old, _read_slots(layout, cache, table, lens, ranges))
    # each request's newest position holds its step's probability alone
    for i, (n, (lo, hi)) in enumerate(zip(lens, ranges)):
        t = n - 1 - (hi - lo)
        fresh = probs[i, :, t].view(H, rep).sum(dim=1)
        torch.testing.assert_close(sc_got[table[i, (n - 1) // bs], :, (n - 1) % bs], fresh,
                                   atol=ATOL, rtol=RTOL)
    off = layout.scores_offset
    got[:, :, off: off + 4 * bs] = cache[:, :, off: off + 4 * bs] = 0
    assert torch.equal(got, cache)  # nothing but score slots changes


def test_without_evicted_ranges_and_empty_batch():
    """``evicted`` None reads every position from 0, as the reference; a
    batch of no requests launches nothing."""
    layout = _layout((4, 4), 16, "a2sf")
    cache, probs, table, seq, _, lens, ranges = _batch(layout, 2, 2, seed=7, evict=False)
    want = cache.clone()
    add_decode_scores(probs, want, layout, layout.config, table, seq, None)
    got = _run(probs, cache, layout, table, seq, None, 32)
    sc_got, sc_old = score_view(got, layout), score_view(cache, layout)
    torch.testing.assert_close(sc_got, score_view(want, layout), atol=ATOL, rtol=RTOL)
    assert torch.equal(sc_got != sc_old, _read_slots(layout, cache, table, lens, ranges))
    empty = _run(torch.zeros(0, 4, 5), cache, layout, table[:0], seq[:0], None, 64)
    assert torch.equal(empty, cache)


@pytest.mark.parametrize("bits,bs,H,rep,method,block_t", [CASES[0], CASES[6]],
                         ids=[IDS[0], IDS[6]])
def test_kernel_normalises_logits_as_the_reference(bits, bs, H, rep, method, block_t):
    """With ``lse`` (the decode kernel's ``probs_lse``) both the kernel and
    its reference read base-2 logits and normalise them: the scores of the
    normalised probabilities, to the stated tolerance; positions past a
    request's reads hold garbage and are not read."""
    layout = _layout(bits, bs, method)
    cache, probs, table, seq, ev, lens, ranges = _batch(layout, H, rep, seed=bs + H + rep)
    g = torch.Generator().manual_seed(3)
    shift = torch.randn(probs.shape[:2], generator=g) * 4  # each row's own log-sum-exp
    logits = torch.log2(probs) + shift[:, :, None]
    want = cache.clone()
    add_decode_scores(probs, want, layout, layout.config, table, seq, ev)
    ref = cache.clone()
    add_decode_scores(logits, ref, layout, layout.config, table, seq, ev, lse=shift)
    got = cache.to(DEVICE, copy=True)
    triton_add_decode_scores(logits.to(DEVICE), got, layout, layout.config, table.to(DEVICE),
                             seq.to(DEVICE), ev.to(DEVICE), block_t=block_t,
                             lse=shift.to(DEVICE))
    for c in (ref, got.cpu()):
        torch.testing.assert_close(score_view(c, layout), score_view(want, layout),
                                   atol=ATOL, rtol=RTOL)
    assert torch.equal(score_view(got.cpu(), layout) != score_view(cache, layout),
                       _read_slots(layout, cache, table, lens, ranges))


def test_the_kernel_and_the_batched_step_are_the_defaults(monkeypatch):
    """A GPU step adds its decode scores with the Triton kernel and takes a
    layer's eviction steps as one batch; ``KVCOMP_SCORE_KERNEL=0`` and
    ``KVCOMP_EVICTION_BATCH=0`` ask for the torch ops and the per-request
    steps (the references both are compared with)."""
    from vllm_kvcomp.kernels import eviction_gpu
    from vllm_kvcomp.kernels.triton_scores import triton_add_decode_scores
    from vllm_kvcomp.launch_env import EVICTION_BATCH_ENV, SCORE_KERNEL_ENV

    monkeypatch.delenv(SCORE_KERNEL_ENV, raising=False)
    monkeypatch.delenv(EVICTION_BATCH_ENV, raising=False)
    assert eviction_gpu.score_adder() is triton_add_decode_scores
    assert eviction_gpu.eviction_batch()
    monkeypatch.setenv(SCORE_KERNEL_ENV, "0")
    monkeypatch.setenv(EVICTION_BATCH_ENV, "0")
    assert eviction_gpu.score_adder() is eviction_gpu.add_decode_scores
    assert not eviction_gpu.eviction_batch()
