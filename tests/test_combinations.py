"""Settings that compose, each pair against the reference of the simpler
setting. Pairs that do not compose are start-up errors naming both
(``test_config.py``, ``test_validation.py``).

The window's storage (``residual_ring``: a ring of pages; ``residual_dtype``
fp8: e4m3 values) must not change what attention computes: with K and V
rounded to e4m3 as the backend rounds them on arrival, a ring of e4m3 pages
holds exactly the values a sliding window in the model dtype holds. So under
eviction, a head map and Quest, the ring and the fp8 window must give the
outputs of the plain window, on the reference path and on the Triton path.
"""
import pytest
import torch

import vllm_kvcomp
from sim_paged import SimPagedCache
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.packing import round_to_window

vllm_kvcomp.register()
# the Triton steps' tensors: on a GPU where there is one (the interpreter
# only runs without one); the references on the host
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

STORAGE = {"residual_ring": True, "residual_dtype": "fp8_e4m3"}


def _rounded(*kv):
    """K, V as the backend hands them on with an fp8 window: every setting
    compared here gets these values."""
    fp8 = KvcompConfig(residual_dtype="fp8_e4m3")
    assert fp8.residual_fp8
    return tuple(round_to_window(x, fp8) for x in kv)


# ------------------------------------------------ eviction, step by step

BASE = {"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16}
# (settings, eviction, prompts, schedule: per step, each request's new
# tokens); SnapKV with 16-bit values, which its selection reads back in the
# model dtype
EVICTION_CASES = {
    "streamingllm": (BASE, {"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 24},
                     [150, 90], [[64, 40], [64, 50], [1, 22]] + [[1, 1]] * 30),
    "snapkv": ({**BASE, "v_bits": 16}, {"method": "snapkv", "window": 8, "budget_tokens": 40},
               [100, 190], [[64, 100], [36, 84], [1, 6]] + [[1, 1]] * 30),
    "h2o": (BASE, {"method": "h2o", "budget_tokens": 48, "recent_tokens": 16},
            [40, 60], [[40, 30], [1, 30]] + [[1, 1]] * 40),
    "a2sf": (BASE, {"method": "a2sf", "budget_tokens": 56, "recent_tokens": 16, "alpha": 0.3},
             [120], [[64], [56]] + [[1]] * 40),
}


@pytest.mark.parametrize("method", list(EVICTION_CASES))
def test_ring_and_fp8_window_under_eviction(method):
    """Each eviction method with the window as an e4m3 ring: the reference
    steps give the plain window's outputs (eviction compacts and frees packed
    pages only; the ring goes round many times), and the backend's Triton
    steps (``KVCOMP_EVICTION_GPU``) give the reference's. The eviction did
    change what later queries read."""
    from test_eviction_gpu import _inputs, _run

    base, ev, prompts, schedule = EVICTION_CASES[method]
    cfg = KvcompConfig.from_dict({**base, **STORAGE, "eviction": ev})
    plain = KvcompConfig.from_dict({**base, "eviction": ev})
    bs = 16
    sim = SimPagedCache(cfg, bs, 2, 32, 1, 1)
    assert sim.ring_pages * sim.bs_r < max(map(sum, zip(*schedule)))  # the ring wraps
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    k, v = _rounded(k, v)
    ref = _run(cfg, prompts, schedule, q, k, v, bs, triton=False)
    want = _run(plain, prompts, schedule, q, k, v, bs, triton=False)
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
    tri = _run(cfg, prompts, schedule, q, k, v, bs, triton=True)
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    kept_all = KvcompConfig.from_dict(base)
    full = _run(kept_all, prompts, schedule, q, k, v, bs, triton=False)
    assert (full - ref).abs().max() > 1e-2


# ------------------------------------------- eviction under a head map

SPLIT = ([0, 3], [1, 2])  # (retrieval, streaming) KV heads of a 4-head layer
SINK_RECENT = {"sink_tokens": 8, "recent_tokens": 40}


@pytest.mark.parametrize("method", ["snapkv", "h2o", "a2sf"])
def test_eviction_on_the_retrieval_heads_of_a_split_layer(method):
    """A layer split by a head map, evicting from its retrieval heads: each
    KV head's kept set is its own (SnapKV / H2O / A2SF score per KV head, a
    budget per head), so the retrieval heads equal the unsplit evicting
    layer on those heads, and the streaming heads equal the split layer
    without eviction (they keep sinks and window). The backend's Triton
    steps of the split layer give the reference's, pages freed under them.
    Tolerances: the same float32 arithmetic on fewer heads (1e-6); Triton
    against the reference as in test_eviction_gpu (1e-5); H2O's host work on
    the step's eviction rows alone, the same Triton outputs bit for bit."""
    from test_eviction_gpu import D, _run

    base, ev, prompts, schedule = EVICTION_CASES[method]
    cfg = KvcompConfig.from_dict({**base, **SINK_RECENT, "eviction": ev})
    total = sum(map(sum, schedule))
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (8, 4, 4))
    split = _run(cfg, prompts, schedule, q, k, v, 16, triton=False, head_split=SPLIT)
    whole = _run(cfg, prompts, schedule, q, k, v, 16, triton=False)
    kept_all = KvcompConfig.from_dict({**base, **SINK_RECENT})
    no_eviction = _run(kept_all, prompts, schedule, q, k, v, 16, triton=False,
                       head_split=SPLIT)
    r, s_ = list(SPLIT[0]), list(SPLIT[1])
    heads = (lambda x: x.view(total, 4, 2, D))
    assert torch.isfinite(split).all()
    torch.testing.assert_close(heads(split)[:, r], heads(whole)[:, r], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(heads(split)[:, s_], heads(no_eviction)[:, s_], atol=0, rtol=0)
    # eviction did change what the retrieval heads read
    assert (heads(split)[:, r] - heads(no_eviction)[:, r]).abs().max() > 1e-2
    tri = _run(cfg, prompts, schedule, q, k, v, 16, triton=True, head_split=SPLIT)
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri, split, atol=1e-5, rtol=1e-5)
    if method == "h2o":  # the host work on the step's eviction rows (KVCOMP_EVICTION_ROWS)
        rows = _run(cfg, prompts, schedule, q, k, v, 16, triton=True, head_split=SPLIT,
                    by_rows=True)
        assert torch.equal(rows, tri)


def test_fp8_ring_on_the_retrieval_heads_of_a_split_layer():
    """A split layer whose retrieval heads keep their window as an e4m3 ring:
    the retrieval heads give the plain window's outputs on K/V rounded to
    e4m3, the streaming heads read their K/V unrounded (their pages are in
    the model dtype), on the reference path and the backend's Triton steps.
    Tolerances: exact against the plain window (the same values on the same
    path); Triton against the reference as in test_eviction_gpu (1e-5)."""
    from test_eviction_gpu import D, _run

    base, _, prompts, schedule = EVICTION_CASES["streamingllm"]
    cfg = KvcompConfig.from_dict({**base, **STORAGE, **SINK_RECENT})
    plain = KvcompConfig.from_dict({**base, **SINK_RECENT})
    total = sum(map(sum, schedule))
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (8, 4, 4))
    r = list(SPLIT[0])
    k_r, v_r = k.clone(), v.clone()
    k_r[:, r], v_r[:, r] = _rounded(k[:, r], v[:, r])
    assert not torch.equal(k_r, k)
    ref = _run(cfg, prompts, schedule, q, k, v, 16, triton=False, head_split=SPLIT)
    want = _run(plain, prompts, schedule, q, k_r, v_r, 16, triton=False, head_split=SPLIT)
    torch.testing.assert_close(ref, want, atol=0, rtol=0)
    tri = _run(cfg, prompts, schedule, q, k, v, 16, triton=True, head_split=SPLIT)
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    # rounding every head instead would change the streaming heads
    every = _run(plain, prompts, schedule, q, *_rounded(k, v), 16, triton=False,
                 head_split=SPLIT)
    assert (every - ref).abs().max() > 1e-4


# ------------------------------------------------- Quest under SnapKV

# (settings, SnapKV, block size, prompts, schedule): decodes long enough that
# the pages SnapKV kept and those written since exceed Quest's budget
QUEST_SNAP_CASES = [
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16},
     {"method": "snapkv", "window": 8, "budget_tokens": 40}, 16, [100, 190],
     [[64, 100], [36, 84], [1, 6]] + [[1, 1]] * 40),
    ({"k_bits": 2, "v_bits": 4, "group_size": 16, "residual_tokens": 16,
      "prompt_attention": "as_stored"},
     {"method": "snapkv", "window": 8, "budget_ratio": 0.4}, 32, [251],
     [[120], [131]] + [[1]] * 50),
]


@pytest.mark.parametrize("kvcomp,snap,bs,prompts,schedule", QUEST_SNAP_CASES)
def test_quest_selects_among_the_pages_snapkv_kept(kvcomp, snap, bs, prompts, schedule):
    """Quest under SnapKV reads, per KV head, its budget of the pages a
    request still holds (those SnapKV kept, the last of them maybe part
    stale, and those written since), never a page given back: freed pages
    point at a page of NaNs. A budget covering every held page gives
    SnapKV's own outputs (exactly); a small one leaves pages out; the
    backend's Triton steps (Quest over each request's held pages as one
    sequence, the stale part of a selected page masked) give the
    reference's. Tolerance: Quest's Triton steps against its reference as
    in test_quest (2e-3)."""
    from test_eviction_gpu import _inputs, _run

    from vllm_kvcomp.policies.quest import Quest

    cfg = KvcompConfig.from_dict({**kvcomp, "eviction": snap,
                                  "quest": {"budget_tokens": 2 * bs}})
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=7)
    alone = _run(cfg, prompts, schedule, q, k, v, bs, triton=False)
    wide = _run(cfg, prompts, schedule, q, k, v, bs, triton=False, quest=Quest(4096, bs))
    torch.testing.assert_close(wide, alone, atol=0, rtol=0)
    quest = Quest(2 * bs, bs)
    ref = _run(cfg, prompts, schedule, q, k, v, bs, triton=False, quest=quest)
    assert torch.isfinite(ref).all()
    assert (ref - alone).abs().max() > 1e-2
    tri = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, quest=quest)
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri, ref, atol=2e-3, rtol=2e-3)


def test_head_map_snapkv_and_quest_together():
    """All of it in one layer: k4v4 pages, a head map, SnapKV on the
    retrieval heads and Quest over the pages they kept. The retrieval heads
    equal the unsplit layer with SnapKV and Quest on those heads, the
    streaming heads the split layer with neither, and the backend's Triton
    steps the reference's (tolerances as above: 1e-6 / exact / 2e-3)."""
    from test_eviction_gpu import D, _run

    from vllm_kvcomp.policies.quest import Quest

    kvcomp, snap, bs, prompts, schedule = QUEST_SNAP_CASES[0]
    cfg = KvcompConfig.from_dict({**kvcomp, **SINK_RECENT, "eviction": snap,
                                  "quest": {"budget_tokens": 2 * bs}})
    quest = Quest(2 * bs, bs)
    total = sum(map(sum, schedule))
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (8, 4, 4))
    split = _run(cfg, prompts, schedule, q, k, v, bs, triton=False, head_split=SPLIT,
                 quest=quest)
    whole = _run(cfg, prompts, schedule, q, k, v, bs, triton=False, quest=quest)
    plain = _run(KvcompConfig.from_dict({**kvcomp, **SINK_RECENT}), prompts, schedule, q, k, v,
                 bs, triton=False, head_split=SPLIT)
    r, s_ = list(SPLIT[0]), list(SPLIT[1])
    heads = (lambda x: x.view(total, 4, 2, D))
    assert torch.isfinite(split).all()
    torch.testing.assert_close(heads(split)[:, r], heads(whole)[:, r], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(heads(split)[:, s_], heads(plain)[:, s_], atol=0, rtol=0)
    assert (heads(split)[:, r] - heads(plain)[:, r]).abs().max() > 1e-2
    # Quest left some of SnapKV's pages out
    snap_only = _run(cfg, prompts, schedule, q, k, v, bs, triton=False, head_split=SPLIT)
    assert (heads(split)[:, r] - heads(snap_only)[:, r]).abs().max() > 1e-2
    tri = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, head_split=SPLIT, quest=quest)
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri, split, atol=2e-3, rtol=2e-3)


def test_quest_composes_with_snapkv_only():
    """H2O / A2SF score what decode reads, and StreamingLLM leaves only its
    window: beside Quest each is refused, naming the pair."""
    from vllm_kvcomp.config import KvcompConfigError

    quest = {"quest": {"budget_tokens": 256}}
    KvcompConfig.from_dict({**quest, "eviction": {"method": "snapkv", "budget_tokens": 512}})
    for method in ("h2o", "a2sf", "streamingllm"):
        ev = {"method": method} if method == "streamingllm" else {
            "method": method, "budget_tokens": 512}
        with pytest.raises(KvcompConfigError, match=f"quest and eviction .method='{method}'"):
            KvcompConfig.from_dict({**quest, "eviction": ev})


@pytest.mark.parametrize("method, other", [("snapkv", "head_map"), ("h2o", "head_map"),
                                           ("snapkv", "quest"), ("snapkv", "both")])
def test_gpu_serves_eviction_beside_a_head_map_or_quest(tmp_path, monkeypatch, method, other):
    """Eviction beside a head map or under Quest served on an H200, so a GPU
    serves each pair; a head map, eviction and Quest in one layer have not run
    there, so a GPU serves the three only with KVCOMP_EVICTION_GPU=1. The CPU
    path serves all."""
    from vllm_kvcomp.config import KvcompConfigError
    from vllm_kvcomp.validation import check_eviction_platform

    f = tmp_path / "map.json"
    f.write_text("{}")
    extra = {"head_map": {"head_map": str(f)}, "quest": {"quest": {"budget_tokens": 256}},
             "both": {"head_map": str(f), "quest": {"budget_tokens": 256}}}[other]
    cfg = KvcompConfig.from_dict({**extra, "eviction": {"method": method, "budget_tokens": 512}})
    monkeypatch.delenv("KVCOMP_EVICTION_GPU", raising=False)
    check_eviction_platform(cfg, on_cpu=True)
    if other != "both":
        check_eviction_platform(cfg, on_cpu=False)
        return
    with pytest.raises(KvcompConfigError, match="with quest and a head_map runs only on the CPU"):
        check_eviction_platform(cfg, on_cpu=False)
    monkeypatch.setenv("KVCOMP_EVICTION_GPU", "1")
    check_eviction_platform(cfg, on_cpu=False)


# ------------------------------------------- Quest and head maps, step by step

H, REP, D, BS = 2, 2, 64, 32
# per step, tokens of each request: prefill chunks longer than the ring's
# span, then decodes that go round it (one-token rows first, as vLLM orders
# them)
PLAN = [(100, 40), (90, 150), (1, 70)] + [(1, 1)] * 40


def _steps(cfg, quest=None, head_split=None, triton=False):
    """Two requests through ``PLAN``, on the reference path or through the
    backend's Triton launch code (interpreted); the outputs, step after step."""
    from unittest import mock

    from vllm_kvcomp import backend
    from vllm_kvcomp.backend import KvcompImpl, KvcompMetadata
    from vllm_kvcomp.kernels.attention_ref import kvcomp_step_reference
    from vllm_kvcomp.kernels.head_split_ref import split_step_reference

    T = [sum(p[i] for p in PLAN) for i in range(2)]
    g = torch.Generator().manual_seed(3)
    heads = len(head_split[0]) if head_split else H
    qkv = [(torch.randn(t, H * REP, D, generator=g),
            *_rounded(2 * torch.randn(t, H, D, generator=g),
                      torch.randn(t, H, D, generator=g))) for t in T]
    sim = SimPagedCache(cfg, BS, heads, D, 2, max(T), seed=5)
    # the streaming heads' pages by position, every one held (as a window
    # longer than the sequences): sinks and recent tokens stay where they were
    stream = SimPagedCache(KvcompConfig(k_bits=16, v_bits=16, residual_tokens=max(T)), BS,
                           H - heads, D, 2, max(T), seed=6) if head_split else None
    if triton:  # the caches the kernels read and write on DEVICE
        sim.packed = sim.packed.to(DEVICE)
        sim.residual = None if sim.residual is None else sim.residual.to(DEVICE)
        with mock.patch.object(backend, "current_config", lambda: cfg):
            impl = KvcompImpl(num_heads=H * REP, head_size=D, scale=D ** -0.5,
                              num_kv_heads=H)
        impl._decode_launch = {}
    outs, done = [], [0, 0]
    for chunks in PLAN:
        ends = [s + c for s, c in zip(done, chunks)]
        b = sim.batch(list(done), ends)
        q, k, v = (torch.cat([qkv[i][j][s:e] for i, (s, e) in enumerate(zip(done, ends))])
                   for j in range(3))
        out = torch.zeros_like(q)
        if head_split:
            sb = stream.batch(list(done), ends)
            split_step_reference(q, k, v, out, sim.packed, sim.residual, sim.layout, cfg,
                                 D ** -0.5, b, head_split, stream.residual,
                                 sb.residual_block_table, sb.residual_slot_mapping,
                                 sb.residual_block_size, quest=quest)
        elif not triton:
            kvcomp_step_reference(q, k, v, out, sim.packed, sim.residual, sim.layout, cfg,
                                  D ** -0.5, b, quest=quest)
        else:
            qsl = torch.tensor(b.query_start_loc, dtype=torch.int32, device=DEVICE)
            lens = torch.tensor(b.seq_lens, dtype=torch.int32, device=DEVICE)
            dev = lambda t: t.to(DEVICE)  # noqa: E731

            def md(table, block, slots):
                return KvcompMetadata(
                    num_actual_tokens=q.shape[0], num_reqs=2, query_start_loc=qsl,
                    seq_lens=lens, block_table=table, slot_mapping=slots, block_size=block,
                    max_query_len=max(chunks), max_seq_len=max(ends),
                    num_decodes=2 if max(chunks) == 1 else (1 if chunks[0] == 1 else 0))
            o = dev(out)
            impl._forward_triton(dev(q).reshape(q.shape[0], -1), dev(k).reshape(k.shape[0], -1),
                                 dev(v).reshape(v.shape[0], -1), o.view(q.shape[0], -1),
                                 sim.packed, sim.residual, md(dev(b.block_table), BS, None),
                                 md(dev(b.residual_block_table), b.residual_block_size,
                                    dev(b.residual_slot_mapping)), sim.layout, quest)
            out = o.cpu()
        outs.append(out)
        done = ends
    assert sim.ring_pages * sim.bs_r < 90 or not cfg.residual_ring
    return torch.cat(outs)


QUEST_KV = {"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 8}


def test_ring_and_fp8_window_under_quest():
    """Quest's decode steps with the window as an e4m3 ring: the reference
    gives the plain window's outputs, and the backend's Triton launch code
    (page selection, then the decode kernel over the
    selected pages and the window, whose block-table row repeats the ring's
    pages) gives the reference's. The selection left pages out."""
    from vllm_kvcomp.policies.quest import Quest

    quest = Quest(64, BS)
    cfg = KvcompConfig(**QUEST_KV, **STORAGE, quest={"budget_tokens": 64})
    ref = _steps(cfg, quest)
    want = _steps(KvcompConfig(**QUEST_KV, quest={"budget_tokens": 64}), quest)
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
    tri = _steps(cfg, quest, triton=True)
    torch.testing.assert_close(tri, ref, atol=2e-3, rtol=2e-3)
    assert (_steps(cfg) - ref).abs().max() > 1e-2


def test_ring_under_a_head_map_with_quest():
    """A split layer (one retrieval, one streaming KV head) whose retrieval
    head's window is a ring, with Quest selecting its pages: the reference
    gives the outputs of the sliding window. (fp8 windows are refused with a
    head map.)"""
    from vllm_kvcomp.policies.quest import Quest

    quest = Quest(64, BS)
    split = ([1], [0])
    kv = {**QUEST_KV, "sink_tokens": 8, "recent_tokens": 48}
    ring = _steps(KvcompConfig(**kv, residual_ring=True), quest, split)
    sliding = _steps(KvcompConfig(**kv), quest, split)
    torch.testing.assert_close(ring, sliding, atol=0, rtol=0)
    assert (_steps(KvcompConfig(**kv), None, split) - sliding).abs().max() > 1e-2


# --------------------------------------------------------------- end to end

@pytest.mark.parametrize("policy", ["h2o", "head_map_quest", "head_map_fp8"])
def test_engine_ring_serves_the_sliding_windows_tokens(tiny_llama, tmp_path, policy):
    """The ring's block manager beside eviction's (H2O frees and compacts
    packed pages during decode, and holds a page for every token still in
    the window) or beside a head map's streaming group, with Quest or with
    the retrieval heads' window in e4m3: chunked prompts up to 1400 tokens,
    prefix caching on, the same tokens as the sliding window, with more
    capacity reported."""
    from e2e_util import POLICY_BASE, policy_spec, run_engines

    if policy == "h2o":
        kv = {**POLICY_BASE, "eviction": {"method": "h2o", "budget_tokens": 128,
                                          "recent_tokens": 64}}
    else:
        kv = {**POLICY_BASE, "head_map": _half_map(tmp_path), "sink_tokens": 16,
              "recent_tokens": 64}
        kv.update({"quest": {"budget_tokens": 128, "dense_layers": 1}}
                  if policy == "head_map_quest" else {"residual_dtype": "fp8_e4m3"})
    sliding, ring = run_engines(dict(spec=policy_spec(tiny_llama, kv)),
                                dict(spec=policy_spec(tiny_llama, {**kv, "residual_ring": True})))
    assert ring["tokens"] == sliding["tokens"]
    assert ring["kv_cache_tokens"] > sliding["kv_cache_tokens"]
    assert ring["kv_cache_usage"] == 0


def _half_map(tmp_path):
    import json

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layers": [["retrieval", "streaming"],
                                           ["streaming", "retrieval"]] * 2}))
    return str(path)


def test_engine_head_map_with_eviction_on_its_retrieval_heads(tiny_llama, tmp_path):
    """A head map beside eviction from its retrieval heads: a SnapKV budget
    covering every prompt gives the head map's tokens alone; H2O at 128
    tokens serves every request with prefix caching on, changes what the
    long prompts generate and not the 40-token one, and gives every page
    back."""
    from e2e_util import POLICY_BASE, policy_spec, run_engines

    kv = {**POLICY_BASE, "head_map": _half_map(tmp_path), "sink_tokens": 16,
          "recent_tokens": 64}
    split, wide, h2o = run_engines(
        dict(spec=policy_spec(tiny_llama, kv)),
        dict(spec=policy_spec(tiny_llama, {**kv, "eviction": {"method": "snapkv",
                                                               "budget_tokens": 2048}})),
        dict(spec=policy_spec(tiny_llama, {**kv, "eviction": {
            "method": "h2o", "budget_tokens": 128, "recent_tokens": 32}})))
    assert wide["tokens"] == split["tokens"]
    assert [len(t) for t in h2o["tokens"]] == [24] * 4
    assert h2o["tokens"][:3] != split["tokens"][:3]
    assert h2o["tokens"][3] == split["tokens"][3]
    assert h2o["kv_cache_usage"] == 0


def test_engine_pool_holds_snapkvs_budget_beside_a_head_map(tiny_llama, tmp_path):
    """~4K-token prompts, SnapKV at 512 tokens on the retrieval heads of a
    head map: once its prompt is processed a request holds exactly SnapKV's
    pages in the packed group (read from vLLM's block manager after every
    step), given-back pages serve other requests, and the pool (packed,
    window and streaming-head pages alike) ends as full as it started."""
    from e2e_util import POLICY_BASE, check_snapkv_pool, eviction_pool_run

    kv = {**POLICY_BASE, "head_map": _half_map(tmp_path), "sink_tokens": 16,
          "recent_tokens": 64, "eviction": {"method": "snapkv", "budget_tokens": 512}}
    check_snapkv_pool(eviction_pool_run(tmp_path, dict(
        model=tiny_llama, kvcomp=kv, engine=dict(max_num_batched_tokens=1024, max_num_seqs=4,
                                                 num_gpu_blocks_override=600),
        long=[4000, 3900, 4050], short=[50, 300, 700, 120, 33], max_tokens=8,
        abort_every=4, in_flight=5, seed=2)), requests=8)


def test_engine_quest_over_the_pages_snapkv_kept(tiny_llama, tmp_path):
    """SnapKV with Quest: a Quest budget covering every page gives SnapKV's
    tokens alone; a 64-token budget serves every request with prefix
    caching on, changes what the long prompts generate and not the
    40-token one, and gives every page back; so does an engine with a head
    map besides (SnapKV and Quest on its retrieval heads)."""
    from e2e_util import POLICY_BASE, policy_spec, run_engines

    snap = {**POLICY_BASE, "eviction": {"method": "snapkv", "budget_tokens": 256}}
    small_quest = {"quest": {"budget_tokens": 64, "dense_layers": 0}}
    alone, wide, small, with_map = run_engines(
        dict(spec=policy_spec(tiny_llama, snap)),
        dict(spec=policy_spec(tiny_llama, {**snap, "quest": {"budget_tokens": 2048,
                                                            "dense_layers": 0}})),
        dict(spec=policy_spec(tiny_llama, {**snap, **small_quest}, max_tokens=48)),
        dict(spec=policy_spec(tiny_llama, {**snap, **small_quest, **SINK_RECENT,
                                           "head_map": _half_map(tmp_path)}, max_tokens=48)))
    assert wide["tokens"] == alone["tokens"]
    assert [len(t) for t in small["tokens"]] == [48] * 4
    assert [t[:24] for t in small["tokens"][:3]] != alone["tokens"][:3]
    assert small["tokens"][3][:24] == alone["tokens"][3]
    assert small["kv_cache_usage"] == 0
    assert [len(t) for t in with_map["tokens"]] == [48] * 4
    assert with_map["kv_cache_usage"] == 0
