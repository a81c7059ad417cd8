"""H2O / A2SF's batched eviction step (``h2o_ref.evict_steps``, the
compaction ``triton_compaction.triton_compact_batch``), under the
interpreter: the cache it leaves is, byte for byte, the one that
``h2o_ref.evict_step(..., compact=triton_compact, on_device=True)`` leaves
request by request, and the Triton steps with it (``KVCOMP_EVICTION_BATCH``)
give the outputs of the steps without it."""
import random

import pytest
import torch
from test_eviction_gpu import SCORED_CASES, _inputs, _run
from test_triton_compaction import random_pages

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import h2o_ref, triton_compaction
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.kernels.triton_compaction import triton_compact
from vllm_kvcomp.launch_env import EVICTION_BATCH_ENV
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (k/v bits, key axis, key group, page, KV heads, method); the budget leaves
# 2 pages and 4 tokens of heavy hitters, so kept counts are no multiple of a page
CASES = [
    ((4, 4), "channel", 16, 16, 2, "h2o"),
    ((4, 4), "channel", 32, 32, 8, "a2sf"),
    ((2, 2), "channel", 32, 64, 1, "h2o"),
    ((2, 2), "token", 32, 16, 8, "a2sf"),
    ((16, 16), "channel", 128, 32, 2, "h2o"),
    ((16, 16), "channel", 128, 16, 1, "a2sf"),
]
IDS = [f"k{b[0]}v{b[1]}-{a}-g{g}-bs{bs}-h{h}-{m}" for b, a, g, bs, h, m in CASES]


def _config(bits, axis, G, bs, method):
    ev = {"method": method, "budget_tokens": 2 * bs + 20, "recent_tokens": 16}
    if method == "a2sf":
        ev["alpha"] = 0.7
    return KvcompConfig.from_dict({"k_bits": bits[0], "v_bits": bits[1], "key_axis": axis,
                                   "group_size": G, "residual_tokens": 16, "eviction": ev})


def _steps(cfg, bs):
    """(start, n, prompt) of a batch's requests: prompts completing in one
    step and in a chunk, one-token and multi-token decodes crossing a page,
    a decode that moves nothing, a first eviction already in place."""
    policy = cfg.eviction.policy(bs)

    def crossing(P, t, skip=0):
        for start in range(P, P + 20 * bs):
            if h2o_ref._eviction_layouts(cfg, policy, start, start + t, P) is not None:
                if skip == 0:
                    return start, start + t, P
                skip -= 1
        raise AssertionError("no eviction step")

    in_place = next((s, s + 1, 2) for s in range(2, 10 * bs)
                    if policy.layout(s, cfg.quantized_prefix_len(s), 2) !=
                    policy.layout(s + 1, cfg.quantized_prefix_len(s + 1), 2))
    return [(bs, 5 * bs + 3, 5 * bs + 3), crossing(3 * bs, 1), (0, 4 * bs + 7, 4 * bs + 7),
            crossing(2 * bs + 5, 7, skip=2), (3 * bs + 3, 3 * bs + 4, 3 * bs), in_place,
            crossing(bs + 1, 1, skip=3)]


def _setup(bits, axis, G, bs, H, method, seed):
    cfg = _config(bits, axis, G, bs, method)
    layout = PageLayout(cfg, bs, 64, 2)
    steps = _steps(cfg, bs)
    pages = -(-max(n for _, n, _ in steps) // bs) + 1
    R = len(steps) + 2  # two requests beside the batch's, their pages left alone
    ids = list(range(1, R * pages + 3))
    random.Random(seed).shuffle(ids)
    table = torch.tensor(ids[:R * pages], dtype=torch.int32).view(R, pages)
    cache = random_pages(layout, H, len(ids) + 1, seed)
    # few distinct scores: ties everywhere, settled by the later index staying
    g = torch.Generator().manual_seed(seed)
    sv = score_view(cache, layout)
    sv.copy_(torch.randint(0, 3, sv.shape, generator=g).float())
    rows = [r for r in range(R) if r not in (1, 4)]
    return cfg, layout, steps, table, cache, rows


def _batched_and_per_request(cfg, layout, steps, table, cache, rows):
    """The cache on the host after ``evict_steps`` for ``rows`` and after
    ``evict_step`` row by row (the kernels on DEVICE)."""
    want = cache.clone().to(DEVICE)
    table = table.to(DEVICE)
    for r, (start, n, P) in zip(rows, steps):
        h2o_ref.evict_step(want, layout, cfg, table[r], start, n, P, torch.bfloat16,
                           compact=triton_compact, on_device=True)
    got = cache.clone().to(DEVICE)
    h2o_ref.evict_steps(got, layout, cfg, table, rows, *zip(*steps), torch.bfloat16)
    return got.cpu(), want.cpu()


@pytest.mark.parametrize("bits,axis,G,bs,H,method", CASES, ids=IDS)
def test_batched_step_is_the_per_request_steps(bits, axis, G, bs, H, method):
    """Byte for byte the cache of ``evict_step`` request by request, over a
    batch of requests whose candidates differ in count (prompt ends,
    decodes), some not moving, one already in place; pages of requests
    outside the batch untouched."""
    cfg, layout, steps, table, cache, rows = _setup(bits, axis, G, bs, H, method, seed=bs + H)
    policy = cfg.eviction.policy(bs)
    moves = [h2o_ref._eviction_layouts(cfg, policy, *s) is not None for s in steps]
    assert sum(moves) >= 4 and not all(moves)
    assert any(policy.layout(s, cfg.quantized_prefix_len(s), P) !=
               policy.layout(n, cfg.quantized_prefix_len(n), P) and not m
               for (s, n, P), m in zip(steps, moves))  # in place, not merely unmoved
    got, want = _batched_and_per_request(cfg, layout, steps, table, cache, rows)
    assert not torch.equal(want, cache)
    bad = (got != want).nonzero()
    assert bad.shape[0] == 0, f"{bad.shape[0]} bytes differ, first {bad[:4].tolist()}"
    others = table[[r for r in range(table.shape[0]) if r not in rows]].flatten().long().cpu()
    assert torch.equal(got[others], cache[others])


def test_requests_keeping_different_counts(monkeypatch):
    """Requests of one batch keeping different counts (a policy's layouts
    give every moving step the same count; the batched step does not rely
    on it): each keeps its own best, as ``evict_step`` does."""
    real = h2o_ref._eviction_layouts

    def fewer(cfg, policy, start, n, P):
        step = real(cfg, policy, start, n, P)
        if step is None:
            return None
        k0, e0, k1, e1 = step
        return k0, e0, k1 - start % 7 - 1, e1

    monkeypatch.setattr(h2o_ref, "_eviction_layouts", fewer)
    cfg, layout, steps, table, cache, rows = _setup((4, 4), "channel", 16, 16, 2, "h2o", 3)
    assert len({s[0] % 7 for s in steps
                if fewer(cfg, cfg.eviction.policy(16), *s) is not None}) > 1
    got, want = _batched_and_per_request(cfg, layout, steps, table, cache, rows)
    assert not torch.equal(want, cache)
    assert torch.equal(got, want)


# ------------------------------------------------ the backend's Triton steps

def _through_evictions(cfg, bs, prompts, schedule, count):
    """``schedule`` up to its ``count``-th step in which a request compacts
    (the rest of a long decode costs the interpreter time and shows nothing new)."""
    policy = cfg.eviction.policy(bs)
    done = [0] * len(prompts)
    for si, step in enumerate(schedule):
        count -= any(t and h2o_ref._eviction_layouts(cfg, policy, c, c + t, P) is not None
                     for c, t, P in zip(done, step, prompts))
        if count == 0:
            return schedule[:si + 1]
        done = [c + t for c, t in zip(done, step)]
    return schedule


@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", SCORED_CASES)
def test_triton_steps_with_the_batched_eviction_are_the_same(monkeypatch, kvcomp, bs, prompts,
                                                              schedule):
    """With the eviction rows, the batched eviction steps (the default;
    ``KVCOMP_EVICTION_BATCH=0`` takes them request by request) give every
    output of the Triton steps bit for bit: its eviction steps taken by
    ``evict_steps`` (compactions among them), none by ``evict_step``."""
    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    schedule = _through_evictions(cfg, bs, prompts, schedule, 2)
    monkeypatch.setenv(EVICTION_BATCH_ENV, "0")
    plain = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True)
    compacted, single = [], []
    compact, evict_step = triton_compaction.triton_compact_batch, h2o_ref.evict_step
    monkeypatch.setattr(triton_compaction, "triton_compact_batch",
                        lambda *a: compacted.append(1) or compact(*a))
    monkeypatch.setattr(h2o_ref, "evict_step",
                        lambda *a, **kw: single.append(1) or evict_step(*a, **kw))
    monkeypatch.delenv(EVICTION_BATCH_ENV, raising=False)
    got = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True)
    assert torch.equal(got, plain)
    assert len(compacted) >= 2 and not single
